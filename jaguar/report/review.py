"""The review page of `jaguar identify`: each photo beside its top-k candidate individuals (two
gallery images of each, their scores) and the decision, so a person can confirm or overrule it.
With local pattern evidence (a calibration on the fused probability), each candidate also shows the
verified keypoint correspondences between the photo and its best-matching gallery image, lines
between matched spots with the inlier count (jaguar.retrieval.local.draw.draw_match), as HotSpotter's
review screen does: the person confirms a match by seeing that the lines join the same rosettes. The
correspondences come with the identification (PhotoResult.correspondences); nothing is matched here.

One folder, readable offline: index.html (jinja2 with autoescaping: names of individuals and photo
paths are untrusted text) and JPEG thumbnails named by position only, never by a user's name.
Written atomically (jaguar.io.atomic_directory): an older page is replaced whole."""

from __future__ import annotations

import datetime
import io
import logging
from pathlib import Path
from typing import Optional

import jinja2
import numpy as np
from PIL import Image

from jaguar.io import atomic_directory
from jaguar.report.grids import ImageLookup, find_shards
from jaguar.report.plots import on_background
from jaguar.retrieval.local.draw import draw_match
from jaguar.retrieval.openset.identify import Identification
from jaguar.run import RunDir

log = logging.getLogger(__name__)

THUMB = 160  # pixels, long side of every picture on the page
EXAMPLES = 2  # gallery images shown per candidate individual
MATCH_HEIGHT = 220  # pixels, height of a correspondence picture

_TEMPLATE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>jaguar identify — {{ run_name }}</title>
<style>
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:20px;color:#222}
.sub{color:#666;font-size:13px} .photo{display:flex;gap:14px;border-bottom:1px solid #ddd;padding:12px 0;align-items:flex-start}
.query{width:180px;flex:none} .query img{border:3px solid #555}
.cands{display:flex;gap:10px;flex-wrap:wrap;align-items:flex-start} .cand{border:1px solid #ccc;border-radius:6px;padding:6px;font-size:13px}
.cand.best{border:2px solid #1a9850} .cand img{height:80px;margin-right:2px;border:1px solid #eee}
.decision{font-weight:bold;margin:6px 0} .new{color:#b35806} .known{color:#1a9850}
.problems{background:#fff6e0;border-left:4px solid #f0ad4e;padding:8px 12px;font-size:14px}
.name{font-weight:bold;word-break:break-all} .path{font-size:12px;color:#555;word-break:break-all}
.cand img.match{height:auto;max-width:520px;border:0}
.noimg{display:inline-block;width:80px;height:80px;background:#eee;color:#888;font-size:11px;text-align:center}
</style></head><body>
<h1>Identification review</h1>
<div class="sub">run {{ run_path }} · {{ photos|length }} photo(s) · generated {{ now }}<br>
{% if local %}Each photo's keypoints on the coat are matched against its {{ shortlist }} most similar gallery
images (cosine of the embeddings) and every match is verified geometrically; the lines in the pictures
join the matched spots, so check that they join the same rosettes. The cosine and the number of verified
matches (inliers) are each calibrated to P(same individual) on validation and averaged ({{ "%.0f"|format(100 * weight) }}%
cosine, {{ "%.0f"|format(100 - 100 * weight) }}% inliers); an individual's probability is the {{ aggregate }} of its
images'. A photo is a known individual when its best individual's probability is at least
{{ "%.4f"|format(threshold) }}, the threshold calibrated on validation (balanced accuracy {{ "%.3f"|format(balanced) }});
otherwise it is a new individual.{% else %}A photo is a known individual when its best score ({{ aggregate }} of cosine similarities to the
individual's gallery images) is at least {{ "%.4f"|format(threshold) }}, the threshold calibrated on
validation (balanced accuracy {{ "%.3f"|format(balanced) }}); otherwise it is a new individual.{% endif %}</div>
{% if problems %}<div class="problems"><b>{{ problems|length }} photo(s) could not be read:</b><ul>
{% for p in problems %}<li><span class="path">{{ p.path }}</span>: {{ p.reason }}</li>{% endfor %}</ul></div>{% endif %}
{% for photo in photos %}<div class="photo">
 <div class="query"><img src="{{ photo.image }}" alt="photo {{ loop.index }}" width="{{ thumb }}">
  <div class="path">{{ photo.path }}</div>
  <div class="decision {{ 'known' if photo.known else 'new' }}">{{ photo.decision }}</div></div>
 <div class="cands">{% for cand in photo.candidates %}<div class="cand{{ ' best' if loop.first and photo.known }}">
  <div>{{ loop.index }}. <span class="name">{{ cand.name }}</span> {% if local %}P(same) {{ "%.4f"|format(cand.probability) }} ·
  individual's cosine {{ "%.4f"|format(cand.score) }} · {{ cand.inliers }} inliers{% else %}{{ "%.4f"|format(cand.score) }}{% endif %}{% if cand.enrolled %} (enrolled){% endif %}</div>
  {% if cand.match %}<div><img class="match" src="{{ cand.match }}" alt="matched spots: {{ cand.name }}"></div>{% endif %}
  {% for src in cand.images %}{% if src %}<img src="{{ src }}" alt="{{ cand.name }}">{% else %}<span class="noimg">no image</span>{% endif %}{% endfor %}
 </div>{% endfor %}</div>
</div>{% endfor %}
</body></html>
"""


def _jpeg(image: Image.Image) -> bytes:
    picture = on_background(image)
    picture.thumbnail((THUMB, THUMB))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _gallery_image(ref: str, run: RunDir, shards: Optional[ImageLookup]) -> Optional[Image.Image]:
    """The picture of a gallery reference ("shard:<file name>" or "thumb:<hash>"), or None."""
    kind, _, key = ref.partition(":")
    try:
        if kind == "shard" and shards is not None:
            return shards.get(key)
        if kind == "thumb":
            path = run.thumbnail_path(key)
            if path.is_file():
                with Image.open(path) as opened:
                    return opened.convert("RGBA")
    except (OSError, ValueError) as err:
        log.warning("gallery image %s could not be read: %s", ref, err)
    return None


def _match_picture(photo_png: bytes, match, run: RunDir, shards: Optional[ImageLookup]) -> bytes:
    """JPEG of the photo (its review picture, `photo_png`) beside the candidate's gallery image with
    the verified correspondences `match` (jaguar.retrieval.openset.evidence.Correspondence, in each
    image's full-size pixels) drawn between them; b"" when a picture is missing."""
    gallery_picture = _gallery_image(match.ref, run, shards)
    if not photo_png or gallery_picture is None or min(match.query_size) <= 0 or min(match.gallery_size) <= 0:
        return b""
    with Image.open(io.BytesIO(photo_png)) as opened:
        photo = np.asarray(opened.convert("RGBA"))
    candidate = np.asarray(gallery_picture.convert("RGBA"))
    # the pictures shown are smaller than the images matched: points scale with them (pixel centres kept)
    to_photo = np.array([photo.shape[1] / match.query_size[1], photo.shape[0] / match.query_size[0]])
    to_candidate = np.array([candidate.shape[1] / match.gallery_size[1], candidate.shape[0] / match.gallery_size[0]])
    canvas = draw_match(photo, candidate, (match.query_xy + 0.5) * to_photo - 0.5,
                        (match.gallery_xy + 0.5) * to_candidate - 0.5, height=MATCH_HEIGHT,
                        caption=f"{match.inliers} inliers with this image · its cosine {match.cosine:.3f}")
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="JPEG", quality=88)
    return buffer.getvalue()


def write_review_page(run: RunDir, identification: Identification, out_dir: str | Path) -> Path:
    """Write the review page folder `out_dir` (index.html and its pictures); return index.html."""
    out_dir = Path(out_dir)
    gallery = identification.gallery
    shards, problem = find_shards(run.path, run.load_config().data.shards)
    if shards is None:
        log.warning("%s: training images are shown as blanks", problem)
    position = {name: i for i, name in enumerate(gallery.individuals)}
    files: dict[str, bytes] = {}
    shown: dict[str, list[str]] = {}  # individual -> its pictures' file names ("" when missing)

    def examples(name: str) -> list[str]:
        if name not in shown:
            names = []
            for k, ref in enumerate(gallery.examples(position[name], EXAMPLES)):
                picture = _gallery_image(ref, run, shards)
                file = f"g{position[name]:05d}_{k}.jpg" if picture is not None else ""
                if picture is not None:
                    files[file] = _jpeg(picture)
                names.append(file)
            shown[name] = names
        return shown[name]

    photos = []
    for index, result in enumerate(identification.results):
        file = f"q{index:05d}.jpg"
        with Image.open(io.BytesIO(result.thumbnail)) as opened:
            files[file] = _jpeg(opened.convert("RGBA"))
        candidates = [{"name": name, "score": score, "enrolled": name in gallery.enrolled,
                       "images": examples(name)} for name, score in result.candidates]
        for k, (candidate, match) in enumerate(zip(candidates, result.correspondences)):
            picture = _match_picture(result.picture, match, run, shards)
            candidate.update(probability=result.probabilities[k], inliers=result.inliers[k],
                             match=f"m{index:05d}_{k}.jpg" if picture else "")
            if picture:
                files[candidate["match"]] = picture
        photos.append({"path": result.photo, "image": file, "known": result.known, "decision": result.decision,
                       "candidates": candidates})
    calibration = identification.calibration
    page = jinja2.Environment(autoescape=True).from_string(_TEMPLATE).render(
        run_name=run.path.resolve().name, run_path=str(run.path.resolve()), photos=photos,
        problems=identification.problems, thumb=THUMB, aggregate=calibration.aggregate,
        threshold=calibration.figures.threshold, balanced=calibration.figures.balanced_accuracy,
        local=calibration.local_evidence and calibration.fusion is not None, shortlist=calibration.local_shortlist,
        weight=(calibration.fusion or {}).get("weight", 1.0),
        now=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))
    with atomic_directory(out_dir, overwrite=True) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / "index.html").write_text(page, encoding="utf-8")
    return out_dir / "index.html"
