"""The retrieval evaluator: the one implementation of AP, CMC and mINP in jaguar, used by training
validation, `jaguar tune-post`, `jaguar score`, the report and (through those) the ensemble.
`evaluate` ranks a full score matrix; `jaguar.core.evaluator_ranked` gives the same figures at any
N from top-M ranked lists in O(N * M) memory (gallery scale), through `_figures` here.

`evaluate` ranks each query's candidates and returns a `RetrievalMetrics`: per-query AP, per-identity
AP, the challenge's identity-balanced mAP, plain (per-query) mAP, CMC rank-1/5/10 and mINP.

- All-vs-all (the challenge, validation): every image queries all others, self excluded.
- Query/gallery (Market-1501 protocol): with camera ids, gallery images of the query's identity
  *taken by the query's camera* are ignored (neither hits nor misses), as in Zheng et al., "Scalable
  Person Re-identification: A Benchmark" (ICCV 2015); mINP as in Ye et al., "Deep Learning for
  Person Re-identification: A Survey and Outlook" (TPAMI 2021).
- A candidate mask restricts each query to the pairs it was scored on (a challenge pair list).

AP of a query = mean of precision@k over the ranks k of its true matches; INP = (number of true
matches) / (rank of the last one); CMC rank-k = share of queries whose first true match is within
the top k. Queries with no true match among their candidates are not averaged (`num_skipped`).
Identity-balanced mAP averages AP within each query identity, then over identities.

Ties are ranked pessimistically: among candidates of equal score, every non-match comes before
every true match (so the k-th true match by score has rank = non-matches scoring at least as high
+ k). The figures then depend on the scores alone, never on the order of the images, rows or pair
files; breaking ties by position instead (what a stable sort does) lets a scorer gain from the
file order: a constant score over a file sorted by identity would reach an mAP near 1. Of the
order-free rules, the pessimistic one never credits a tie (a match must be scored strictly
above a non-match to be ranked before it), and it is exact at every N by counting, where the
average over tie orders (McSherry & Najork, ECIR 2008) needs each tie group's composition.
torchreid's and fast-reid's evaluators break ties by position (a stable argsort), so they differ
from these figures only where scores tie exactly.

Cost: rows are evaluated in chunks of queries (at most ~256 MB of working memory beside the
score matrix, O(chunk x G)); each row is counted against its true matches' scores
(`jaguar.core.ranks`, O(G log T)), never sorted whole. `evaluate_embeddings` computes the
score rows chunk by chunk from embeddings, so nothing of size N^2 is ever held."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from jaguar.errors import JaguarError
from jaguar.core.ranks import match_ranks
from jaguar.run_records import OpenSetFigures  # the record calibration.json holds; computed here

ArrayLike = Union[np.ndarray, "torch.Tensor", Sequence]  # torch is imported only where tensors are made
KINDS = ("similarity", "distance")
CMC_RANKS = (1, 5, 10)


class MetricsError(JaguarError, ValueError):
    """Scores or labels that cannot be evaluated; the message names the input and the cause."""


@dataclass(frozen=True)
class RetrievalMetrics:
    """What `evaluate` measured. Arrays have one entry a query (Q), in query order."""

    query_ap: np.ndarray  # (Q,) float64; NaN where the query has no true match (not averaged)
    query_inp: np.ndarray  # (Q,) float64; NaN where the query has no true match
    first_match_rank: np.ndarray  # (Q,) int64, 1-based rank of the first true match; 0 where none
    query_labels: np.ndarray  # (Q,) int64
    per_identity_ap: dict[int, float]  # query label -> mean AP of its queries that have a match
    mAP_balanced: float  # mean over identities of per_identity_ap (the challenge metric)
    mAP: float  # mean over queries
    rank1: float
    rank5: float
    rank10: float
    mINP: float
    num_queries: int  # queries with a true match: the ones averaged
    num_skipped: int  # queries without one
    camera_removed: int  # true matches ignored by the same-camera rule (0 without camera ids)
    # Set by `RankedEvaluator.evaluate` when the lists were re-ordered (e.g. re-ranked) within each query's
    # top M: the figures are over those lists, the items beyond M in their base score order.
    reordered_top_m: Optional[int] = None

    def describe_basis(self) -> str:
        """What the figures rank: all candidates, or re-ordered top-M lists and the rest."""
        return ranked_basis(self.reordered_top_m)

    def summary(self) -> dict[str, float]:
        """The headline figures as a plain dict (what tables and JSON files hold)."""
        return {"mAP_balanced": self.mAP_balanced, "mAP": self.mAP, "rank1": self.rank1, "rank5": self.rank5,
                "rank10": self.rank10, "mINP": self.mINP, "num_queries": self.num_queries}


def ranked_basis(reordered_top_m: Optional[int]) -> str:
    """What figures rank: every candidate's score (None), or lists re-ordered within the top M."""
    if reordered_top_m is None:
        return "over every candidate's score"
    return (f"over re-ranked top-{reordered_top_m} lists (re-ranking orders only the top "
            f"{reordered_top_m}; the rest keep their base score order)")


def _array(value: ArrayLike) -> np.ndarray:
    """A numpy view of an array, sequence or tensor (a tensor on any device; bfloat16 as float64),
    without importing torch: tensors are recognised by their `detach` method."""
    if hasattr(value, "detach"):
        tensor = value.detach().cpu()
        try:
            return tensor.numpy()
        except TypeError:  # bfloat16 has no numpy type
            return tensor.double().numpy()
    return np.asarray(value)


def _matrix(name: str, value: ArrayLike) -> np.ndarray:
    """The scores as a 2-D array, without a copy where the input is a float32/float64 array or
    CPU tensor (rows are converted and checked for NaN chunk by chunk, `_rows`)."""
    matrix = _array(value)
    if matrix.ndim != 2:
        raise MetricsError(f"{name} must be a 2-D matrix, got shape {tuple(matrix.shape)}")
    return matrix


def _rows(name: str, matrix: np.ndarray, start: int, stop: int, negate: bool) -> np.ndarray:
    """Rows start:stop of the scores as float32/float64 (exact: other types go to float64),
    negated for distances so that higher always ranks first; MetricsError naming a NaN's place."""
    values = matrix[start:stop]
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)
    if bool(np.isnan(values).any()):
        where = (np.argwhere(np.isnan(values))[:5] + [start, 0]).tolist()
        raise MetricsError(f"{name} contains NaN at {where}; every pair needs a score")
    return np.negative(values) if negate else values


def _block_ranks(block: np.ndarray, start: int, q_label: np.ndarray, g_label: np.ndarray, all_vs_all: bool,
                 valid: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(query, rank) of the true matches of query rows start, start + 1, ... (B x G `block`,
    higher first) among their candidates (`valid`, B x G bool; None: all; all-vs-all: self out)."""
    if valid is None:
        valid = np.ones(block.shape, dtype=bool)
    if all_vs_all:
        valid[np.arange(block.shape[0]), np.arange(start, start + block.shape[0])] = False
    match = q_label[start:start + block.shape[0], None] == g_label[None, :]
    rows, ranks = match_ranks(block, match & valid, valid & ~match)
    return rows + start, ranks


_CHUNK_BYTES = 32 << 20  # working memory of a chunk of query rows: ~16 bytes a (query, candidate) pair


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def _chunk_rows(n_columns: int) -> int:
    return max(1, _CHUNK_BYTES // (16 * max(n_columns, 1)))


def _vector(name: str, value: ArrayLike, length: int) -> np.ndarray:
    vector = _array(value).astype(np.int64).reshape(-1)
    if vector.size != length:
        raise MetricsError(f"{name} has {vector.size} entries, expected {length}")
    return vector


def _no_match_message(all_vs_all: bool, restricted: bool, camera_removed: int, queries_with_any: int) -> str:
    """Why no query kept a true match: the cause that actually removed them."""
    if camera_removed:
        return (f"the same-camera rule (Market-1501: gallery images of the query's identity taken by the "
                f"query's camera are ignored) removed all {camera_removed} true match(es) of the "
                f"{queries_with_any} quer(y/ies) that had any, so no query is left with a match and mAP is "
                f"undefined; add gallery images from other cameras, or evaluate without camera ids")
    if restricted:
        return ("no query has a true match among the candidate pairs it is scored on; mAP is undefined "
                "(does the pair list pair images of the same identity?)")
    if all_vs_all:
        return "no query has a true match (every identity has a single image); mAP is undefined"
    return "no query's identity appears in the gallery; mAP is undefined (are these the right labels?)"


def evaluate(scores: ArrayLike, query_labels: ArrayLike, gallery_labels: Optional[ArrayLike] = None, *,
             kind: str, query_cams: Optional[ArrayLike] = None, gallery_cams: Optional[ArrayLike] = None,
             candidates: Optional[ArrayLike] = None) -> RetrievalMetrics:
    """Evaluate a Q x G score matrix.

    scores: Q x G; kind="similarity" (higher = more alike) or "distance" (lower = more alike).
    gallery_labels None means all-vs-all: scores is N x N over one set, each query's own column is
    excluded, and gallery_cams defaults to query_cams. query_cams/gallery_cams: camera ids, both or
    neither (Market-1501 same-camera rule). candidates: Q x G bool, False excludes that pair.

    Raises MetricsError on a shape mismatch, NaN scores, or when no query has a true match left
    (naming the cause: single-image identities, the pair list, or the camera rule)."""
    if kind not in KINDS:
        raise MetricsError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    matrix = _matrix("scores", scores)
    n_query, n_gallery = matrix.shape
    all_vs_all = gallery_labels is None
    if all_vs_all and n_query != n_gallery:
        raise MetricsError(f"scores must be square (N x N) for all-vs-all evaluation, got {tuple(matrix.shape)}")
    q_label = _vector("query labels", query_labels, n_query)
    g_label = q_label if all_vs_all else _vector("gallery labels", gallery_labels, n_gallery)
    mask = None
    if candidates is not None:
        mask = _array(candidates)
        if tuple(mask.shape) != (n_query, n_gallery):
            raise MetricsError(f"candidates has shape {tuple(mask.shape)}, expected {(n_query, n_gallery)}")
        mask = mask.astype(bool, copy=False)
    if all_vs_all and gallery_cams is None:
        gallery_cams = query_cams
    if (query_cams is None) != (gallery_cams is None):
        raise MetricsError("give both query_cams and gallery_cams, or neither")
    q_cam = g_cam = None
    if query_cams is not None:
        q_cam = _vector("query_cams", query_cams, n_query)
        g_cam = _vector("gallery_cams", gallery_cams, n_gallery)
    q_np, g_np = q_label, g_label
    query_ids, ranks, camera_removed, queries_with_any = [], [], 0, 0
    step = _chunk_rows(n_gallery)
    for start in range(0, n_query, step):
        stop = min(start + step, n_query)
        block = _rows("scores", matrix, start, stop, negate=(kind == "distance"))
        valid = np.ones(block.shape, dtype=bool) if mask is None else mask[start:stop].copy()
        if q_cam is not None:
            if all_vs_all:
                valid[np.arange(stop - start), np.arange(start, stop)] = False
            match = q_np[start:stop, None] == g_np[None, :]
            same_camera_match = match & valid & (q_cam[start:stop, None] == g_cam[None, :])
            camera_removed += int(same_camera_match.sum())
            queries_with_any += int((match & valid).any(axis=1).sum())
            valid &= ~same_camera_match
        block_ids, block_ranks = _block_ranks(block, start, q_np, g_np, all_vs_all, valid)
        query_ids.append(block_ids)
        ranks.append(block_ranks)
    message = _no_match_message(all_vs_all, candidates is not None, camera_removed, queries_with_any)
    figures = _figures(_cat(query_ids), _cat(ranks), q_label, None, message)
    return dataclasses.replace(figures, camera_removed=camera_removed)


def evaluate_embeddings(query_features: ArrayLike, query_labels: ArrayLike, gallery_features: Optional[ArrayLike] = None,
                        gallery_labels: Optional[ArrayLike] = None) -> RetrievalMetrics:
    """`evaluate` of the cosine similarities of query_features (Q x D) to gallery_features (G x D;
    None: all-vs-all over the queries, self excluded), both L2-normalised here, without ever
    holding the Q x G matrix: score rows are computed and counted chunk by chunk, O(chunk x G)
    memory, O(Q x G x D) time, at every N. Equal to `evaluate(normalised queries @ gallery.T, ...,
    kind="similarity")`. Raises MetricsError / ValueError on bad shapes or values."""
    import torch

    from jaguar.core.knn import normalise

    query = normalise("query features", query_features)
    gallery = query if gallery_features is None else normalise("gallery features", gallery_features)
    if gallery.shape[1] != query.shape[1]:
        raise MetricsError(f"query features have {query.shape[1]} dimensions, the gallery {gallery.shape[1]}")
    all_vs_all = gallery_features is None
    q_label = _vector("query labels", query_labels, query.shape[0])
    g_label = q_label if all_vs_all else _vector("gallery labels", gallery_labels, gallery.shape[0])
    query_ids, ranks = [], []
    step = _chunk_rows(gallery.shape[0])
    buffer = torch.empty((min(step, query.shape[0]), gallery.shape[0]), dtype=torch.float32)  # reused: no churn
    for start in range(0, query.shape[0], step):
        rows = query[start:start + step]
        block = torch.matmul(rows, gallery.T, out=buffer[:rows.shape[0]]).numpy()
        block_ids, block_ranks = _block_ranks(block, start, q_label, g_label, all_vs_all)
        query_ids.append(block_ids)
        ranks.append(block_ranks)
    return _figures(_cat(query_ids), _cat(ranks), q_label, None,
                    _no_match_message(all_vs_all, False, 0, 0))


def _figures(query_ids: ArrayLike, ranks: ArrayLike, q_label: ArrayLike,
             reordered_top_m: Optional[int], message: str) -> RetrievalMetrics:
    """The evaluator's figures from the 1-based ranks of every true match (query_ids[i] holds
    ranks[i]; int64 arrays or CPU tensors): the one place AP, INP, CMC and their averages are
    computed, for a full ranking (`evaluate`) and for ranked lists (`RankedEvaluator.evaluate`) alike."""
    query_ids, ranks, q_label = (_array(v).astype(np.int64, copy=False) for v in (query_ids, ranks, q_label))
    n_query = q_label.size
    # By (query, rank): by rank, then stably by query (ranks may be as large as 2^53, see
    # `evaluator_ranked.list_bounds`, so no single int64 key holds both).
    order = np.argsort(ranks, kind="stable")
    order = order[np.argsort(query_ids[order], kind="stable")]
    query_ids, ranks = query_ids[order], ranks[order].astype(np.float64)
    n_hits = np.bincount(query_ids, minlength=n_query)
    has = n_hits > 0
    if not bool(has.any()):
        raise MetricsError(message)
    start = np.cumsum(n_hits) - n_hits
    position = np.arange(query_ids.size) - start[query_ids] + 1  # i-th hit of its query
    precision_sum = np.bincount(query_ids, weights=position / ranks, minlength=n_query)
    ap = np.where(has, precision_sum / np.maximum(n_hits, 1), np.nan)
    # Hits are sorted by (query, rank): a query's first and last hit open and close its run.
    first = np.where(has, ranks[np.minimum(start, max(ranks.size - 1, 0))], 0.0)
    last = np.where(has, ranks[np.maximum(start + n_hits - 1, 0)], 0.0)
    inp = np.where(has, n_hits / np.maximum(last, 1), np.nan)
    first = first.astype(np.int64)
    identities, inverse = np.unique(q_label[has], return_inverse=True)
    inverse = inverse.reshape(-1)
    sums = np.bincount(inverse, weights=ap[has], minlength=len(identities))
    counts = np.bincount(inverse, minlength=len(identities)).astype(np.float64)
    cmc = {k: float((first[has] <= k).mean()) for k in CMC_RANKS}
    return RetrievalMetrics(
        query_ap=ap, query_inp=inp, first_match_rank=first, query_labels=q_label,
        per_identity_ap={int(i): float(s / c) for i, s, c in zip(identities.tolist(), sums, counts)},
        mAP_balanced=float((sums / counts).mean()), mAP=float(ap[has].mean()), rank1=cmc[1], rank5=cmc[5],
        rank10=cmc[10], mINP=float(inp[has].mean()), num_queries=int(has.sum()), num_skipped=int((~has).sum()),
        camera_removed=0, reordered_top_m=reordered_top_m)


def identity_balanced_map(similarity: ArrayLike, labels: ArrayLike,
                          candidates: Optional[ArrayLike] = None) -> float:
    """The challenge metric of one set searched against itself (see `evaluate`): shorthand for
    `evaluate(similarity, labels, kind="similarity", candidates=candidates).mAP_balanced`."""
    return evaluate(similarity, labels, kind="similarity", candidates=candidates).mAP_balanced


def chance_map_balanced(labels: ArrayLike, candidates: Optional[ArrayLike] = None) -> float:
    """The identity-balanced mAP a random ranking scores in expectation on one set searched against
    itself (as `identity_balanced_map`, with the same candidate mask): each query's expected AP with
    m true matches among its n candidates is (m - 1) / (n - 1) + (n - m) H_n / (n (n - 1)) (H_n the
    n-th harmonic number; 1 when n = m = 1), averaged as the evaluator averages APs: over the
    queries of an identity that have a match, then over identities. Raises MetricsError when no
    query has a match."""
    import torch

    q_label = torch.from_numpy(_vector("labels", labels, len(np.asarray(labels))))
    n = q_label.numel()
    valid = ~torch.eye(n, dtype=torch.bool)
    if candidates is not None:
        mask = torch.as_tensor(np.asarray(candidates) if not isinstance(candidates, torch.Tensor) else candidates)
        if tuple(mask.shape) != (n, n):
            raise MetricsError(f"candidates has shape {tuple(mask.shape)}, expected {(n, n)}")
        valid &= mask.bool()
    count = valid.sum(dim=1).double()
    matches = ((q_label[:, None] == q_label[None, :]) & valid).sum(dim=1).double()
    has = matches > 0
    if not bool(has.any()):
        raise MetricsError("no query has a true match among its candidates; chance mAP is undefined")
    harmonic = torch.cumsum(1.0 / torch.arange(1, n + 1, dtype=torch.float64), 0)
    count_h, match_h = count[has], matches[has]
    many = count_h > 1
    expected = torch.ones_like(count_h)
    c, m = count_h[many], match_h[many]
    expected[many] = (m - 1) / (c - 1) + (c - m) * harmonic[(c - 1).long()] / (c * (c - 1))
    identities, inverse = torch.unique(q_label[has], return_inverse=True)
    sums = torch.zeros(len(identities), dtype=torch.float64).index_add_(0, inverse, expected)
    counts = torch.bincount(inverse, minlength=len(identities)).double()
    return float((sums / counts).mean())


def open_set_figures(best_score: ArrayLike, best_is_right: ArrayLike, is_known: ArrayLike,
                     threshold: float) -> OpenSetFigures:
    """OpenSetFigures of Q queries. best_score: (Q,) score of each query's best individual;
    best_is_right: (Q,) bool, that individual is the query's own (False for unknown queries);
    is_known: (Q,) bool, the query's individual is in the gallery. Raises MetricsError on shape
    mismatches."""
    score = np.asarray(best_score, dtype=np.float64).reshape(-1)
    right = np.asarray(best_is_right, dtype=bool).reshape(-1)
    known = np.asarray(is_known, dtype=bool).reshape(-1)
    if not score.shape == right.shape == known.shape:
        raise MetricsError(f"open-set inputs differ in length: scores {score.shape}, right {right.shape}, "
                           f"known {known.shape}")
    if bool((right & ~known).any()):
        raise MetricsError("a query of an individual absent from the gallery cannot be named right")
    accepted = score >= threshold
    num_known, num_unknown = int(known.sum()), int((~known).sum())
    known_acc = float((accepted & right)[known].mean()) if num_known else float("nan")
    unknown_acc = float((~accepted)[~known].mean()) if num_unknown else float("nan")
    rank1 = float(right[known].mean()) if num_known else float("nan")
    return OpenSetFigures(float(threshold), known_acc, unknown_acc, (known_acc + unknown_acc) / 2,
                          float(np.sqrt(known_acc * unknown_acc)), rank1, num_known, num_unknown)


def open_set_sweep(best_score: ArrayLike, best_is_right: ArrayLike, is_known: ArrayLike) -> list[OpenSetFigures]:
    """OpenSetFigures at every threshold that changes a decision: each distinct best score (a query
    at exactly the threshold is accepted) and one above the highest (everything new), ascending."""
    score = np.asarray(best_score, dtype=np.float64).reshape(-1)
    distinct = np.unique(score)
    top = float(distinct[-1]) if distinct.size else 0.0
    thresholds = list(distinct) + [np.nextafter(top, np.inf)]
    return [open_set_figures(score, best_is_right, is_known, float(t)) for t in thresholds]
