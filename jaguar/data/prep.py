"""`jaguar prep`: turn a challenge-layout or folder-per-identity image folder into deterministic WebDataset
shards (per sample: the image as an RGBA PNG, or as a JPEG plus a PNG alpha mask with --encoding jpeg, and a json),
a wids index per split and a manifest.json; bad input is reported in full."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

from PIL import Image

from jaguar.data.dedup import NearDuplicates, hash_groups, hash_members, summary_lines
from jaguar.data.holdout import TEST_LABELS_NAME, TEST_PAIRS_NAME, hold_out_test, with_splits, write_test_lists
from jaguar.data.image_forms import ImageFormError, read_rgba
from jaguar.data.layouts import Listing, Problem, SourceImage, read_listing
from jaguar.data.manifest import Manifest, SampleEntry, ShardEntry, SplitEntry, file_sha256
from jaguar.errors import JaguarError, MissingInputError
from jaguar.formats import capped_listing
from jaguar.io import atomic_directory, atomic_write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
PNG_COMPRESS_LEVEL = 3  # fixed: the same input always gives the same bytes
JPEG_QUALITY = 95  # --encoding jpeg: RGB at this quality with 4:2:0 chroma (4:4:4 decodes 1.6x slower), alpha as a PNG
ENCODINGS = ("png", "jpeg")
_MAX_LISTED_WARNINGS = 20


class PrepError(JaguarError, ValueError):
    """Bad input for `jaguar prep`; the message lists every bad file and its problem."""


def check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise PrepError(f"unknown --encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")


def encode_rgba(rgba: Image.Image, encoding: str) -> dict[str, bytes]:
    """The shard members of one RGBA image: {"png": RGBA PNG} (lossless) or {"jpg": RGB JPEG,
    "mask.png": alpha PNG} (lossy colour, exact mask; decodes several times faster)."""
    check_encoding(encoding)
    if encoding == "png":
        buffer = io.BytesIO()
        rgba.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        return {"png": buffer.getvalue()}
    colour, mask = io.BytesIO(), io.BytesIO()
    rgba.convert("RGB").save(colour, format="JPEG", quality=JPEG_QUALITY, subsampling=2)
    rgba.getchannel("A").save(mask, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return {"jpg": colour.getvalue(), "mask.png": mask.getvalue()}


def convert_image(path: str, require_alpha: bool, max_side: int, encoding: str = "png") -> dict:
    """Decode (any form `read_rgba` reads), check and re-encode one image (long side at most `max_side`)
    as shard members.

    Returns {"members", "orig_size", "size", "alpha_bbox", "warning"} or {"error": reason}."""
    try:
        decoded = read_rgba(path)
    except FileNotFoundError:
        return {"error": "missing: the file disappeared while preparing"}
    except ImageFormError as err:
        return {"error": f"unsupported image form: {err}"}
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return {"error": f"corrupt or truncated image ({type(err).__name__}: {err})"}
    warning = None
    rgba = decoded.rgba
    if not decoded.has_alpha:
        if require_alpha:
            return {"error": f"no alpha channel (mode {decoded.mode}): the challenge layout needs images with "
                             f"an alpha channel, a transparent palette entry or a transparency key as the "
                             f"animal mask (RGBA PNGs)"}
        warning = "no alpha channel: given an opaque mask"
    orig_size = list(rgba.size)
    if max(rgba.size) > max_side:
        scale = max_side / max(rgba.size)
        size = (max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale)))
        # RGB and alpha separately: PIL's RGBA resize premultiplies, which would alter the colour under the mask
        rgb = rgba.convert("RGB").resize(size, Image.LANCZOS)
        alpha = rgba.getchannel("A").resize(size, Image.LANCZOS)
        rgba = Image.merge("RGBA", (*rgb.split(), alpha))
    bbox = rgba.getchannel("A").getbbox()
    return {"members": encode_rgba(rgba, encoding), "orig_size": orig_size, "size": list(rgba.size),
            "alpha_bbox": list(bbox) if bbox else None, "warning": warning}


def _convert_task(task: tuple[str, bool, int, str]) -> dict:
    result = convert_image(*task)
    if "members" in result:
        result["phash"] = hash_members(result["members"])
    return result


def _format_problems(src: Path, problems: list[Problem], skip_hint: bool, full_list: Optional[Path] = None) -> str:
    """The problems, the first 20 listed (all of them written to `full_list` when there are more)."""
    lines = [f"{len(problems)} problem(s) in {src}:",
             "  " + capped_listing([f"{p.file}: {p.reason}" for p in problems], full_list=full_list)]
    if skip_hint:
        lines.append("fix or remove these files, or pass --skip-bad to leave them out (they are then listed "
                     "in manifest.json)")
    else:
        lines.append("these cannot be skipped: fix the file(s) named above")
    return "\n".join(lines)


def spool_members(handle, members: dict[str, bytes]) -> tuple[list[tuple[str, int, int]], str]:
    """Append a sample's members to the open spool file: ([(extension, offset, length)], sha256 of
    their bytes in order), the form `write_split` reads them back in."""
    digest, places = hashlib.sha256(), []
    for extension, data in members.items():
        places.append((extension, handle.tell(), len(data)))
        digest.update(data)
        handle.write(data)
    return places, digest.hexdigest()


def _convert_all(listing: Listing, max_side: int, encoding: str, workers: int, spool: Path, progress: bool
                 ) -> tuple[list[tuple[SourceImage, dict]], list[Problem]]:
    """Convert every image (in parallel), keeping the encoded bytes in a spool file so memory stays flat."""
    from jaguar.progress import progress_bar

    tasks = [(str(image.path), listing.require_alpha, max_side, encoding) for image in listing.images]
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 and len(tasks) > 1 else None
    results = pool.map(_convert_task, tasks, chunksize=4) if pool else map(_convert_task, tasks)
    converted, problems = [], []
    try:
        with spool.open("wb") as handle:
            for image, result in progress_bar(zip(listing.images, results), total=len(tasks), enabled=progress,
                                              desc="prep", unit="img"):
                if "error" in result:
                    problems.append(Problem(str(image.path), result["error"]))
                    continue
                result["spool"], result["sha256"] = spool_members(handle, result.pop("members"))
                converted.append((image, result))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return converted, problems


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # fixed owner, mode and time: the same input gives byte-identical tars
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uname = info.gname = "jaguar"
    tar.addfile(info, io.BytesIO(data))


def write_split(out: Path, split: str, samples: list[dict], spool: Path, shard_size: int) -> SplitEntry:
    """Write one split's tar shards and wids index into `out`; returns the split's manifest entry.

    `samples` (in shard order) are {"key", "meta" (the sample json), "spool": [(extension, offset,
    length)] of the image members in the file `spool` (see `spool_members`), "sha256" of those bytes}."""
    shards = []
    with spool.open("rb") as source:
        for first in range(0, len(samples), shard_size):
            name = f"{split}-{len(shards):06d}.tar"
            chunk = samples[first:first + shard_size]
            # stdlib tarfile rather than webdataset's TarWriter: same member layout, without importing torch
            with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as tar:
                for sample in chunk:
                    members = {"json": json.dumps(sample["meta"], sort_keys=True).encode("utf-8")}
                    for extension, offset, length in sample.pop("spool"):
                        source.seek(offset)
                        members[extension] = source.read(length)
                    for extension, data in members.items():
                        _add_member(tar, f"{sample['key']}.{extension}", data)
            shards.append(ShardEntry(name, len(chunk), file_sha256(out / name), (out / name).stat().st_size))
    index = f"{split}.wids.json"
    atomic_write_json(out / index, {"wids_version": 1, "name": split,
                                    "shardlist": [{"url": s.url, "nsamples": s.nsamples, "filesize": s.filesize}
                                                  for s in shards]})
    return SplitEntry(len(samples), shards, index,
                      [SampleEntry(s["key"], s["meta"]["filename"], s["meta"]["label"], s["sha256"],
                                   s["meta"].get("viewpoint")) for s in samples])


def prepare(src: str | Path, out: str | Path, max_side: int = 1024, shard_size: int = 500, workers: int = 2,
            skip_bad: bool = False, overwrite: bool = False, progress: bool = False, encoding: str = "png",
            test_fraction: float = 0.0, seed: int = 0) -> Manifest:
    """Convert `src` into shards in `out` (built in a temporary sibling, renamed at the end); returns the manifest.

    test_fraction > 0 (folder-per-identity layout only): hold out about that fraction of each
    identity's images as a labelled test split, in whole near-duplicate groups, drawn with `seed`
    (jaguar.data.holdout), and write its pair list and labels into `out` (test.csv, test_labels.csv).
    Raises PrepError listing every bad input (unless `skip_bad`, which leaves them out and lists them),
    for a test_fraction outside [0, 1), on the challenge layout, or when no identity has the three
    near-duplicate groups a hold-out needs."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise MissingInputError(f"source folder {src} does not exist; give the folder holding train.csv "
                                f"(challenge layout) or one sub-folder per identity")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists; remove it, choose another OUT or pass --overwrite")
    if max_side < 1 or shard_size < 1:
        raise PrepError(f"--max-side ({max_side}) and --shard-size ({shard_size}) must be positive")
    check_encoding(encoding)
    if not 0.0 <= test_fraction < 1.0:
        raise PrepError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    try:
        listing = read_listing(src)
    except ValueError as err:
        raise PrepError(str(err)) from None
    if test_fraction and listing.layout != "folders":
        raise PrepError(f"--test-fraction holds a test split out of a folder-per-identity data set; {src} is in the "
                        f"{listing.layout} layout, whose test split is its own (test.csv, test/): leave the option out")
    listing.images.sort(key=lambda image: (SPLITS.index(image.split), image.filename))
    fatal = [p for p in listing.problems if p.fatal]

    with atomic_directory(out, overwrite=overwrite) as tmp:
        spool = tmp / ".spool"
        converted, bad_images = _convert_all(listing, max_side, encoding, max(1, workers), spool, progress)
        problems = listing.problems + bad_images
        full_list = out.with_name(f"{out.name}.problems.txt")  # beside OUT, which is not made
        if fatal:
            raise PrepError(_format_problems(src, fatal, skip_hint=False, full_list=full_list)
                            + ("\n" + _format_problems(src, [p for p in problems if not p.fatal], True)
                               if len(problems) > len(fatal) else ""))
        if problems and not skip_bad:
            raise PrepError(_format_problems(src, problems, skip_hint=True, full_list=full_list))
        if not converted:
            raise PrepError(f"no usable images in {src}; nothing to prepare")
        groups = hash_groups([(image.split, image.filename) for image, _ in converted],
                             [result["phash"] for _, result in converted])
        if test_fraction:
            groups = _hold_out(tmp, src, converted, groups, test_fraction, seed, listing.warnings)

        identities = sorted({image.identity for image, _ in converted
                             if image.split == "train" and image.identity is not None})
        labels = {name: label for label, name in enumerate(identities)}
        warnings = listing.warnings + _warnings(converted, labels)
        per_split: dict[str, list[dict]] = {split: [] for split in SPLITS}
        for image, result in converted:
            meta = {"filename": image.filename, "identity": image.identity,
                    "label": labels.get(image.identity, -1) if image.identity is not None else -1,
                    "orig_size": result["orig_size"], "size": result["size"], "alpha_bbox": result["alpha_bbox"]}
            if image.viewpoint is not None:  # only where the source has the column: older shards stay as they were
                meta["viewpoint"] = image.viewpoint
            per_split[image.split].append({"key": image.key, "meta": meta, "spool": result["spool"],
                                           "sha256": result["sha256"]})
        splits = {split: write_split(tmp, split, samples, spool, shard_size)
                  for split, samples in per_split.items() if samples}
        spool.unlink()
        manifest = Manifest(
            layout=listing.layout,
            source=str(src.resolve()),
            options={"max_side": max_side, "shard_size": shard_size, "skip_bad": skip_bad, "encoding": encoding,
                     "png_compress_level": PNG_COMPRESS_LEVEL,
                     **({"jpeg_quality": JPEG_QUALITY} if encoding == "jpeg" else {}),
                     **({"test_fraction": test_fraction, "seed": seed} if test_fraction else {})},
            identities=labels,
            splits=splits,
            skipped=[{"file": p.file, "reason": p.reason} for p in problems],
            warnings=warnings,
            groups={"phash": groups.to_json()},
        )
        manifest.save(tmp)
    log.debug("prepared %s from %s", out, src)
    return manifest


def _hold_out(tmp: Path, src: Path, converted: list[tuple[SourceImage, dict]], groups: NearDuplicates,
              fraction: float, seed: int, warnings: list[str]) -> NearDuplicates:
    """Hold the test split out of the converted images (their split set to "test"), write its pair list
    and labels into `tmp` (adding to `warnings`); returns the near-duplicate groups with their members'
    new splits."""
    held = hold_out_test([image for image, _ in converted], groups, fraction, seed)
    if not held:
        raise PrepError(f"--test-fraction {fraction}: no identity in {src} has images in three near-duplicate "
                        f"groups (one to train on, two to test with, so each test photo has a true match): "
                        f"nothing to hold out; prepare it without --test-fraction")
    warnings += write_test_lists(tmp, held)
    return with_splits(groups, {image.filename: image.split for image in held})


def _warnings(converted: list[tuple[SourceImage, dict]], labels: dict[str, int]) -> list[str]:
    warnings = []
    opaque = [image.filename for image, result in converted if result["warning"]]
    if opaque:
        shown = ", ".join(opaque[:_MAX_LISTED_WARNINGS]) + (", ..." if len(opaque) > _MAX_LISTED_WARNINGS else "")
        warnings.append(f"{len(opaque)} image(s) had no alpha channel and were given an opaque mask: {shown}")
    unknown = sorted({image.identity for image, _ in converted
                      if image.split != "train" and image.identity is not None and image.identity not in labels})
    if unknown:
        warnings.append(f"{len(unknown)} test identit(y/ies) never seen in train get label -1: {', '.join(unknown)}")
    empty_mask = [image.filename for image, result in converted if result["alpha_bbox"] is None]
    if empty_mask:
        warnings.append(f"{len(empty_mask)} image(s) have an empty alpha mask: "
                        + ", ".join(empty_mask[:_MAX_LISTED_WARNINGS]))
    return warnings


def summary(manifest: Manifest, out: str | Path) -> str:
    """A few human-readable lines describing a prepared shard folder."""
    lines = [f"prepared {out} ({manifest.layout} layout, {len(manifest.identities)} identities)"]
    for split, entry in manifest.splits.items():
        lines.append(f"  {split}: {entry.num_samples} samples in {len(entry.shards)} shard(s), index {entry.index}")
    if manifest.skipped:
        lines.append(f"  skipped {len(manifest.skipped)} bad file(s) (all listed in manifest.json):")
        lines += [f"    {item['file']}: {item['reason']}" for item in manifest.skipped[:20]]
        if len(manifest.skipped) > 20:
            lines.append(f"    ... and {len(manifest.skipped) - 20} more")
    if manifest.options.get("test_fraction"):
        pairs, labels = Path(out) / TEST_PAIRS_NAME, Path(out) / TEST_LABELS_NAME
        line = (f"  test: held out with --test-fraction {manifest.options['test_fraction']} --seed "
                f"{manifest.options['seed']}, truth in {labels}")
        if pairs.is_file():
            line += (f", pairs in {pairs}: `jaguar submit RUN --test-csv {pairs}`, then `jaguar score RUN "
                     f"--test-csv {pairs} --labels {labels}`")
        lines.append(line)
    lines += summary_lines(manifest.groups)
    lines += [f"  warning: {w}" for w in manifest.warnings]
    return "\n".join(lines)
