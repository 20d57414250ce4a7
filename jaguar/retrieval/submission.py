"""Challenge submissions (`jaguar submit`): the distance -> [0, 1] similarity map, the similarity of
every pair of a pair list under the run's chosen post-processing, and the submission written from
them. The files themselves (pair list, labels, submission) are read and written by jaguar.formats;
scoring a submission is jaguar.retrieval.score."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np

from jaguar.config import PostConfig
from jaguar.errors import JaguarError
from jaguar.formats import count_pair_rows, examples, read_pairs, write_submission
from jaguar.run import RunDir

if TYPE_CHECKING:
    import torch

    from jaguar.core.features import FeatureSet
    from jaguar.retrieval.post.fusion import FusionModel
    from jaguar.retrieval.post.local_evidence import LocalEvidence


class SubmissionError(JaguarError, ValueError):
    """Inputs that cannot be scored or submitted together (images without features or labels, a
    distance with NaN); the message names the rows or values at fault."""


def similarity_from_distance(dist: Union[np.ndarray, "torch.Tensor"]) -> np.ndarray:
    """Map distances to [0, 1] by sim = (d_max - d) / (d_max - d_min) over all given values, in
    float64: affine and decreasing, so every query's ranking is kept, no two distinct distances
    collide (float64 has ample room for float32 inputs), the smallest lands on 1 and the largest
    on 0. Nothing is clipped. All-equal input gives 0.5 everywhere."""
    values = dist.detach().cpu().double().numpy() if hasattr(dist, "detach") else np.asarray(dist, np.float64)
    if not np.isfinite(values).all():
        bad = np.argwhere(~np.isfinite(values))[:5].tolist()
        raise SubmissionError(f"distance has NaN or infinite values at {bad}; fix the features first")
    if values.size == 0:
        return values
    low, high = float(values.min()), float(values.max())
    if high == low:
        return np.full_like(values, 0.5)
    return (high - values) / (high - low)


def pair_similarity_matrix(query_names: Sequence[str], gallery_names: Sequence[str],
                           similarity: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(images, N x N float64 similarity, N x N bool candidate mask) from pair rows: each query
    ranks only the gallery images it was paired with."""
    images = list(dict.fromkeys(list(query_names) + list(gallery_names)))
    position = {name: i for i, name in enumerate(images)}
    q = np.array([position[name] for name in query_names], dtype=np.int64)
    g = np.array([position[name] for name in gallery_names], dtype=np.int64)
    matrix = np.full((len(images), len(images)), -np.inf, dtype=np.float64)
    candidates = np.zeros((len(images), len(images)), dtype=bool)
    matrix[q, g] = np.asarray(similarity, dtype=np.float64)
    candidates[q, g] = True
    return images, matrix, candidates


def pair_similarities(features: "FeatureSet", row_ids: Sequence[str], query_names: Sequence[str],
                      gallery_names: Sequence[str], post: "PostConfig", fusion: Optional["FusionModel"] = None,
                      local: Optional["LocalEvidence"] = None) -> np.ndarray:
    """Similarity in [0, 1] for every pair row: the post-processed all-vs-all distance over the
    images of the pair list (in feature-file order), mapped by similarity_from_distance over the
    requested pairs. Images without features are an error naming the rows. Where re-ranking cannot
    run (a pair list of 2-3 images) the pairs are scored without it, and a warning says so.

    With `fusion` (and `local`, the split's shortlist matches): each pair's fused P(same individual)
    (`FusionModel.fuse`: the calibrated global score 1 - distance and the calibrated inliers; a pair
    outside its query's shortlist gets the local floor, so every row is on the same scale) with the
    tie-break of `FusionModel.rank_scores` (1e-6 x the global score), mapped by one affine map over
    all requested pairs into [0, 1]: the ranking of rank_scores exactly, each value within about
    1e-6 of the probability."""
    import torch

    from jaguar.retrieval.post.dense import final_distance

    known = set(features.names)
    unknown = [f"{r} ({q if q not in known else g})" for r, q, g in zip(row_ids, query_names, gallery_names)
               if q not in known or g not in known]
    if unknown:
        raise SubmissionError(f"{len(unknown)} pair row(s) name images with no features: {examples(unknown)}")
    wanted = set(query_names) | set(gallery_names)
    subset = features.select([name for name in features.names if name in wanted])
    position = {name: i for i, name in enumerate(subset.names)}
    try:
        distance = final_distance(subset, post)
    except ValueError as err:  # k-reciprocal re-ranking of a handful of images: nothing to re-rank
        if not post.rerank:
            raise
        logging.getLogger(__name__).warning(
            "re-ranking cannot run on the pair list's %d image(s) (%s); these pairs are scored without it "
            "(with the chosen query expansion / DBA)", len(subset), err)
        distance = final_distance(subset, dataclasses.replace(post, rerank=False))
    q = torch.tensor([position[name] for name in query_names])
    g = torch.tensor([position[name] for name in gallery_names])
    if fusion is None:
        return similarity_from_distance(distance[q, g])
    from jaguar.retrieval.post.fusion import TIE_BREAK

    subset_local = local.subset(subset.names)
    global_scores = 1.0 - distance.double().numpy()
    ranked = fusion.fuse_dense(global_scores, subset_local.shortlist, subset_local.scores)[q.numpy(), g.numpy()]
    pair_global = global_scores[q.numpy(), g.numpy()]
    low, spread = float(pair_global.min()), float(pair_global.max() - pair_global.min())
    # rank_scores = P + 1e-6 x global, mapped affinely into [0, 1]: the same order, within ~1e-6 of P
    return np.clip((ranked - TIE_BREAK * low) / (1.0 + TIE_BREAK * spread), 0.0, 1.0)


@dataclass
class SubmitResult:
    path: Path
    rows: int
    post: Optional[PostConfig]  # None: raw cosine, tune-post has not run
    repeated: list[int] = dataclasses.field(default_factory=list)  # pair-list lines repeating a row exactly (read once)
    fused: bool = False  # fused with the test split's local matches (post.json's fusion adopted)


MAX_SUBMISSION_ROWS = 10**8  # an all-pairs file past this (~10,000 images) is the wrong tool: `jaguar rank`


def submit_run(run: RunDir, test_csv: str | Path, output: str | Path | None = None,
               max_rows: int = MAX_SUBMISSION_ROWS) -> SubmitResult:
    """Score every pair of `test_csv` with the run's test features and chosen post-processing (raw
    cosine when tune-post has not run; fused with RUN/local/test.safetensors when it chose a fusion,
    MissingInputError naming `jaguar match RUN --split test` when that file is absent) and write a
    validated submission (default: the run's).
    A pair list of more than `max_rows` rows is refused (SubmissionError) before it is read: the
    all-pairs file is for the challenge; large galleries take `jaguar rank`'s top-k lists."""
    output = Path(output) if output else run.submission_path
    rows = count_pair_rows(test_csv)
    if rows > max_rows:
        raise SubmissionError(f"{test_csv} has {rows:,} pair rows, more than an all-pairs submission should hold "
                              f"({max_rows:,}); write each image's top-k list instead: "
                              f"`jaguar rank {run.path} --split test --top-k 100`")
    from jaguar.retrieval.post.local_evidence import run_fusion

    features = run.load_features("test")
    result = run.load_post() if run.has_post() else None
    post = result.chosen if result is not None else None
    fusion, local = run_fusion(run, result, "test", features.names)
    pairs = read_pairs(test_csv)
    similarity = pair_similarities(features, pairs.row_ids, pairs.query_images, pairs.gallery_images,
                                   post or PostConfig(), fusion, local)
    write_submission(output, pairs.row_ids, similarity, expected_row_ids=pairs.row_ids)
    return SubmitResult(output, len(pairs), post, list(pairs.repeated), fused=fusion is not None)
