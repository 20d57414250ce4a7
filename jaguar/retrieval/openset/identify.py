"""Open-set identification: is a new photo a known individual (which one) or a new one?

The gallery is the run's training images' embeddings (`jaguar extract RUN --split train`, done
here when missing) plus the individuals enrolled without retraining (`jaguar enroll`). A photo is
scored per individual by aggregating its cosine similarities to that individual's gallery images
("max": the best image; "mean_top<n>": the mean of the n best, all of them when fewer), and is
decided "known: NAME" when its best individual's score reaches the threshold `jaguar calibrate`
chose on validation, else "new individual" (AnimalCLEF's open-set task).

With local pattern evidence (a calibration made with it: calibration.local_evidence), each photo's
keypoints are also matched against its top-B gallery images by cosine and the photo is decided on
the aggregate of its fused image probabilities P(same individual) instead
(jaguar.retrieval.openset.evidence; the gallery's local features: local_gallery); each candidate
then carries the verified correspondences of its best-matching gallery image for the review page.

Post-processing: the run's query expansion and k-reciprocal re-ranking rank a set of queries
against each other; a field photo is identified on its own, so identification scores the plain
cosine similarity, the same score the threshold was calibrated on.

Names of individuals are untrusted text: they are stored as data (never as paths; enrolled photos'
thumbnails are named by content hash) and escaped wherever a page shows them."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from jaguar.errors import JaguarError
from jaguar.io import atomic_write_bytes
from jaguar.core.features import FeatureSet
from jaguar.retrieval.openset.gallery import IndividualGrouping, aggregate_by_individual, individual_rows
from jaguar.core.knn import stable_top
from jaguar.run import OpenSetCalibration, RunDir

log = logging.getLogger(__name__)

AGGREGATES = ("max", "mean_top2", "mean_top3")
NEW_INDIVIDUAL = "new individual"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class IdentifyError(JaguarError, ValueError):
    """An enrolment or identification the run cannot do; the message names the value at fault."""


def decision_text(individual: str, known: bool) -> str:
    return f"known: {individual}" if known else NEW_INDIVIDUAL


@dataclass
class Gallery:
    """The images an identification searches: embeddings (N x D, L2-normalised), the individual of
    each row (N, index into `individuals`), a reference for showing each row ("shard:<file name>"
    for training images, "thumb:<hash>" for enrolled photos) and which individuals were enrolled."""
    embeddings: torch.Tensor
    individual: torch.Tensor
    individuals: list[str]
    refs: list[str]
    enrolled: set[str] = field(default_factory=set)
    source: str = ""  # the weights the training features were extracted with

    def counts(self) -> dict[str, int]:
        """Images per individual, in `individuals` order."""
        tally = torch.bincount(self.individual, minlength=len(self.individuals)).tolist()
        return dict(zip(self.individuals, tally))

    def examples(self, index: int, count: int = 2) -> list[str]:
        """`count` gallery references of individual `index` (the first ones, in gallery order)."""
        rows = torch.nonzero(self.individual == index).flatten()[:count].tolist()
        return [self.refs[i] for i in rows]


def gallery_from_features(train: FeatureSet, enrolled: Optional[FeatureSet] = None) -> Gallery:
    """A Gallery of the labelled training features and, when given, the enrolled ones (their
    label_names are the individuals' names; their meta["thumbnails"] maps row name -> hash)."""
    train = train.labelled()
    refs = [f"shard:{name}" for name in train.names]
    embeddings = [train.embeddings]
    if enrolled is not None and len(enrolled):
        thumbs = enrolled.meta.get("thumbnails", {})
        refs += [f"thumb:{thumbs.get(name, name)}" for name in enrolled.names]
        embeddings.append(enrolled.embeddings)
    else:
        enrolled = None
    individuals, rows, enrolled_names = individual_rows(
        train.labels.tolist(), train.label_names, None if enrolled is None else enrolled.labels.tolist(),
        None if enrolled is None else enrolled.label_names)
    return Gallery(torch.cat(embeddings), torch.tensor(rows, dtype=torch.long), individuals, refs,
                   enrolled_names, str(train.meta.get("source", "")))


def training_features(run: RunDir, onnx_path: str | Path | None = None, needed_by: str = "jaguar identify"
                      ) -> FeatureSet:
    """The run's training-image features (the gallery), extracted first when missing with the run's
    checkpoint (or the exported model `onnx_path`), announced (extract.require_features)."""
    from jaguar.retrieval.extract import require_features

    return require_features(run, "train", needed_by, onnx_path)


def load_gallery(run: RunDir, onnx_path: str | Path | None = None) -> Gallery:
    """The run's gallery: training features plus enrolled individuals."""
    return gallery_from_features(training_features(run, onnx_path),
                                 run.load_enrolled() if run.has_enrolled() else None)


def aggregate_top_n(aggregate: str) -> int:
    """How many best images an aggregate averages: "max" 1, "mean_top<n>" n; IdentifyError otherwise."""
    if aggregate == "max":
        return 1
    if aggregate.startswith("mean_top") and aggregate[len("mean_top"):].isdigit() and int(aggregate[8:]) >= 1:
        return int(aggregate[len("mean_top"):])
    raise IdentifyError(f"aggregate {aggregate!r} is not 'max' or 'mean_top<n>' (e.g. {', '.join(AGGREGATES)})")


_CHUNK_BYTES = 256 << 20  # a chunk of queries' similarity rows (fewer, larger matrix products)


def individual_scores(queries: torch.Tensor, gallery: Gallery, aggregate: str) -> torch.Tensor:
    """Q x I scores of Q L2-normalised query embeddings against the gallery's I individuals:
    `aggregate` ("max" or "mean_top<n>") of each query's cosine similarities to the individual's
    images (all of them when it has fewer than n); -inf for an individual without images.

    No loop over individuals: the gallery's columns are grouped by individual once, and each
    chunk of similarity rows is reduced segment by segment in one vectorised pass
    (`numpy.maximum.reduceat`); for the mean of the n best, n such rounds each take every
    individual's current best value (as many copies as tie at it, up to what is still needed) and
    retire it. Memory O(chunk x N + Q x I), time O(Q x N x (D + n)). Raises IdentifyError for an
    unknown aggregate."""
    top_n = aggregate_top_n(aggregate)
    grouping = IndividualGrouping(gallery.individual.long().numpy(), len(gallery.individuals))
    grouped = gallery.embeddings.float()[torch.from_numpy(grouping.order)]
    scores = np.full((queries.shape[0], len(gallery.individuals)), -np.inf, dtype=np.float32)
    step = max(1, _CHUNK_BYTES // (8 * max(grouped.shape[0], 1)))
    buffer = torch.empty((min(step, queries.shape[0]), grouped.shape[0]), dtype=torch.float32)
    for start in range(0, queries.shape[0], step):
        rows = queries[start:start + step].float()
        similarity = torch.matmul(rows, grouped.T, out=buffer[:rows.shape[0]]).numpy()
        scores[start:start + step, grouping.present] = grouping.reduce(similarity, top_n)
    return torch.from_numpy(scores)


def aggregate_image_scores(image_scores: np.ndarray, gallery: Gallery, aggregate: str) -> np.ndarray:
    """(Q, I) per-individual `aggregate` of image scores (Q, N) given in gallery row order (e.g. the
    fused probabilities of jaguar.retrieval.openset.evidence), the way `individual_scores` aggregates
    cosines; -inf for an individual without images; the dtype of `image_scores`."""
    return aggregate_by_individual(image_scores, gallery.individual.long().numpy(), len(gallery.individuals),
                                   aggregate_top_n(aggregate))


@dataclass
class PhotoResult:
    """One identified photo: its candidates (individual, aggregated cosine score), best first, and the
    decision. With local evidence (the calibration's): each candidate's fused probability (what the
    decision and the order use), the inliers of its best-matching gallery image and that match
    (jaguar.retrieval.openset.evidence.Correspondence), and the photo's picture to draw it on."""
    photo: str
    candidates: list[tuple[str, float]]
    known: bool
    thumbnail: bytes = b""
    probabilities: list[float] = field(default_factory=list)
    inliers: list[int] = field(default_factory=list)
    correspondences: list = field(default_factory=list)
    picture: bytes = b""

    @property
    def decision(self) -> str:
        return decision_text(self.candidates[0][0], self.known)


def rank_individuals(queries: torch.Tensor, gallery: Gallery, calibration: OpenSetCalibration,
                     top_k: int) -> list[tuple[list[tuple[str, float]], bool]]:
    """For each query: its top_k (individual, score), best first (ties: gallery order), and whether
    the best score reaches the calibrated threshold (known)."""
    scores = individual_scores(queries, gallery, calibration.aggregate)
    # ties: the gallery's individual order, as a stable descending sort gives (knn.stable_top)
    _, order = stable_top(scores, min(top_k, len(gallery.individuals)))
    results = []
    for row in range(scores.shape[0]):
        candidates = [(gallery.individuals[i], float(scores[row, i])) for i in order[row].tolist()]
        results.append((candidates, candidates[0][1] >= calibration.figures.threshold))
    return results


@dataclass
class Identification:
    results: list[PhotoResult]
    problems: list  # PhotoProblem: photos that could not be read, each named
    gallery: Gallery
    calibration: OpenSetCalibration


def identify_photos(run: RunDir, items: Sequence[str | Path], top_k: int = 5,
                    checkpoint: str | Path | None = None, onnx_path: str | Path | None = None) -> Identification:
    """`jaguar identify`: embed the photos / folders `items` (jaguar.retrieval.openset.photos) with the run's
    model (or the exported model `onnx_path`, see jaguar.core.onnx_model), score them against
    the run's gallery and decide each with the run's calibration. Unreadable photos are returned as
    problems; raises when none is readable, the run is not trained or not calibrated."""
    from jaguar.retrieval.openset.gallery import require_trained_run
    from jaguar.retrieval.openset.photos import PhotoEmbedder, PhotoError, require_photos

    require_trained_run(run)
    if top_k < 1:
        raise IdentifyError(f"--top-k must be at least 1, got {top_k}")
    calibration = run.load_calibration()
    photos, problems = require_photos(items)
    gallery = load_gallery(run, onnx_path)
    local = calibration.local_evidence and calibration.fusion is not None
    embedder = PhotoEmbedder(run, checkpoint, onnx_path=onnx_path, local_extractor=_extractor(run) if local else None)
    check_same_weights(gallery, embedder.source, run)
    embedded = embedder.embed(photos)
    problems = problems + embedded.problems
    if not embedded.paths:
        raise PhotoError("no photo could be read: " + "; ".join(f"{p.path}: {p.reason}" for p in problems))
    if local:
        return Identification(_identify_with_evidence(run, embedded, gallery, calibration, top_k), problems, gallery,
                              calibration)
    ranked = rank_individuals(embedded.embeddings, gallery, calibration, top_k)
    results = [PhotoResult(str(path), candidates, known, thumb)
               for path, (candidates, known), thumb in zip(embedded.paths, ranked, embedded.thumbnails)]
    return Identification(results, problems, gallery, calibration)


def _extractor(run: RunDir):
    from jaguar.retrieval.local.configured import make_extractor

    return make_extractor(run.load_config().retrieval.local)


def _identify_with_evidence(run: RunDir, embedded, gallery: Gallery, calibration: OpenSetCalibration,
                            top_k: int) -> list[PhotoResult]:
    """The photos decided on the fused probability of the calibration's model (local evidence:
    jaguar.retrieval.openset.evidence.rank_with_evidence against the gallery's local features)."""
    from jaguar.retrieval.openset.evidence import LocalEvidence, rank_with_evidence
    from jaguar.retrieval.openset.local_gallery import gallery_local_features
    from jaguar.retrieval.post.fusion import FusionModel

    model = FusionModel.from_dict(calibration.fusion, f"{run.calibration_path} fusion")
    cfg = run.load_config()
    evidence = LocalEvidence.from_config(cfg, gallery_local_features(run, gallery.refs))
    evidence.shortlist = calibration.local_shortlist or evidence.shortlist  # the width the threshold was chosen at
    similarity = (embedded.embeddings.float() @ gallery.embeddings.float().T).numpy()
    ranked = rank_with_evidence(similarity, embedded.local, evidence, model, gallery.individual.long().numpy(),
                                len(gallery.individuals), gallery.refs, aggregate_top_n(calibration.aggregate),
                                calibration.figures.threshold, top_k)
    return [PhotoResult(str(path), [(gallery.individuals[i], cos) for i, cos in zip(r.candidates, r.cosine)], r.known,
                        thumb, r.probability, r.inliers, r.correspondences, picture)
            for path, r, thumb, picture in zip(embedded.paths, ranked, embedded.thumbnails, embedded.pictures)]


def check_same_weights(gallery: Gallery, source: str, run: RunDir) -> None:
    """Photos must be embedded by the weights the gallery was extracted with (compared by the
    weights file's last three path parts, e.g. checkpoints/best/model.safetensors, so a run folder
    reached by another path or moved still matches). An exported model counts as the weights it
    was exported from (its parity with them is checked by `jaguar export`)."""
    if gallery.source and source and Path(gallery.source).parts[-3:] != Path(source).parts[-3:]:
        raise IdentifyError(f"{run.features_path('train')} was extracted with {gallery.source} but photos would "
                            f"be embedded with {source}; re-extract (`jaguar extract {run.path} --split train "
                            f"--force`) and re-calibrate, or pass that --checkpoint")


def check_individual_name(name: str, gallery: Gallery) -> str:
    """The enrolment name, stripped; IdentifyError when empty, with control characters, or already
    an individual of the gallery (compared case-insensitively: two names differing only in case
    would read as one individual in a field notebook)."""
    cleaned = name.strip() if isinstance(name, str) else ""
    if not cleaned:
        raise IdentifyError("--name is empty; give the new individual's name")
    if _CONTROL.search(cleaned):
        raise IdentifyError(f"--name {name!r} contains a control character; give a plain name")
    if len(cleaned) > 200:
        raise IdentifyError(f"--name is {len(cleaned)} characters long; give a name of at most 200")
    taken = {known.casefold(): known for known in gallery.individuals}
    if cleaned.casefold() in taken:
        kind = "an enrolled individual" if taken[cleaned.casefold()] in gallery.enrolled else "a training identity"
        raise IdentifyError(f"--name {cleaned!r} is already {kind} ({taken[cleaned.casefold()]!r}); "
                            f"names must be unique: choose another")
    return cleaned


@dataclass
class Enrolment:
    name: str
    photos: list[Path]
    gallery_images: int  # the individual's images now in the gallery


def enroll(run: RunDir, name: str, items: Sequence[str | Path], checkpoint: str | Path | None = None,
           onnx_path: str | Path | None = None) -> Enrolment:
    """`jaguar enroll`: add individual `name` to the run's gallery from the photos `items`, without
    retraining. All or nothing: any unreadable photo, a photo already in the gallery or a taken name
    raises IdentifyError/PhotoError naming it, and the gallery is left as it was; the new
    embeddings are appended to the run's enrolled gallery (RunDir.save_enrolled) in one atomic write,
    after their local features (retrieval.local's extractor, on the photo as read for embedding) are
    appended to RunDir.enrolled_local_path, kept in step row for row (local_gallery.enrolled_local_in_step)."""
    from jaguar.retrieval.openset.gallery import require_trained_run
    from jaguar.retrieval.openset.photos import PhotoEmbedder, PhotoError, require_photos

    require_trained_run(run)
    photos, problems = require_photos(items)
    gallery = load_gallery(run, onnx_path)
    name = check_individual_name(name, gallery)
    embedder = PhotoEmbedder(run, checkpoint, onnx_path=onnx_path, local_extractor=_extractor(run))
    check_same_weights(gallery, embedder.source, run)
    embedded = embedder.embed(photos)
    problems += embedded.problems
    if problems:
        raise PhotoError(f"nothing enrolled: {len(problems)} photo(s) could not be used: " +
                         "; ".join(f"{p.path}: {p.reason}" for p in problems))
    existing = run.load_enrolled() if run.has_enrolled() else None
    known_rows = set(existing.names) if existing is not None else set()
    repeated = [str(p) for p, h in zip(embedded.paths, embedded.hashes) if h in known_rows]
    if repeated or len(set(embedded.hashes)) != len(embedded.hashes):
        raise IdentifyError(f"nothing enrolled: photo(s) already in the gallery or given twice: "
                            f"{', '.join(repeated) or 'the same file twice'}")
    label_names = dict(existing.label_names) if existing is not None else {}
    label = max(label_names, default=-1) + 1
    label_names[label] = name
    meta = dict(existing.meta) if existing is not None else {}
    meta["source"] = embedder.source
    meta["thumbnails"] = {**meta.get("thumbnails", {}), **{h: h for h in embedded.hashes}}
    meta["photos"] = {**meta.get("photos", {}), **{h: str(p) for p, h in zip(embedded.paths, embedded.hashes)}}
    for digest, thumbnail in zip(embedded.hashes, embedded.thumbnails):
        atomic_write_bytes(run.thumbnail_path(digest), thumbnail)
    new = FeatureSet(list(embedded.hashes), embedded.embeddings, torch.full((len(embedded.paths),), label))
    if existing is not None:
        names = existing.names + new.names
        embeddings = torch.cat([existing.embeddings, new.embeddings])
        labels = torch.cat([existing.labels, new.labels])
    else:
        names, embeddings, labels = new.names, new.embeddings, new.labels
    from jaguar.retrieval.openset.local_gallery import enrolled_local_in_step

    # the local features first: an enrolled row without them only counts 0 inliers, never the reverse
    enrolled_local_in_step(run, existing.names if existing is not None else [], meta["photos"], embedded.hashes,
                           embedded.local, lambda path: embedder.local_extractor.extract(embedder.read_rgba(path)[0])
                           ).save(run.enrolled_local_path)
    run.save_enrolled(FeatureSet(names, embeddings, labels, label_names, meta))
    return Enrolment(name, embedded.paths, len(embedded.paths))
