"""Calibration of scores to P(same individual) and fusion of the global similarity with the local
match score, WildFusion's route (Čermák, Picek, Adam, Papafitsoros, "WildFusion: Individual Animal
Identification with Calibrated Similarity Fusion", ECCV 2024; wildlife-tools' `SimilarityCalibration`
and `WildFusion`): each score is mapped to a probability by isotonic regression fitted on validation
pairs (monotone, into [0, 1]), and the two probabilities are averaged with a weight chosen on
validation by the identity-balanced mAP.

Pairs outside a query's shortlist were never matched locally. Their local probability is the local
calibrator's value at 0 inliers (`FusionModel.local_floor`): an unexamined pair counts as one with no
verified evidence. So every pair of every row gets the same function of (global score, local score),
with local score 0 where no match was made: rows stay comparable (a threshold means the same in each),
the fused score is monotone in both inputs, and since the shortlist holds a query's best global
scores, every pair outside it fuses to at most what any shortlisted pair with no inliers gets.
Isotonic calibration is flat in places; `FusionModel.rank_scores` breaks the ties of the fused
probability by the global score (an added 1e-6 x global), so a ranking never loses the order the
global similarity gave to pairs the probabilities do not tell apart."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from jaguar.errors import JaguarError

DEFAULT_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))  # w of the global probability searched
TIE_BREAK = 1e-6  # the global score's weight in rank_scores: orders pairs of equal fused probability


class FusionError(JaguarError, ValueError):
    """Scores, labels or a stored calibration that cannot be used; the message names which and why."""


def _finite(name: str, values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise FusionError(f"{name} holds NaN or infinite values; calibration needs finite scores")
    return array


@dataclass(frozen=True)
class IsotonicCalibrator:
    """A non-decreasing, piecewise-linear map from a score to P(same individual), constant beyond its
    end points (scikit-learn's IsotonicRegression(out_of_bounds="clip") as fitted, kept as its knots).

    scores: (T,) float64 increasing knots; probabilities: (T,) float64 non-decreasing, in [0, 1]."""

    scores: np.ndarray
    probabilities: np.ndarray

    def __post_init__(self) -> None:
        scores = _finite("calibration knots", self.scores).reshape(-1)
        probabilities = _finite("calibration probabilities", self.probabilities).reshape(-1)
        if scores.size == 0 or scores.shape != probabilities.shape:
            raise FusionError(f"a calibrator needs as many probabilities as knots (at least one), got "
                              f"{scores.size} knots and {probabilities.size} probabilities")
        if np.any(np.diff(scores) < 0) or np.any(np.diff(probabilities) < 0):
            raise FusionError("a calibrator's knots and probabilities must both be non-decreasing")
        if probabilities[0] < 0 or probabilities[-1] > 1:
            raise FusionError(f"calibrated probabilities must lie in [0, 1], got "
                              f"[{probabilities[0]}, {probabilities[-1]}]")
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "probabilities", probabilities)

    @classmethod
    def fit(cls, scores: Any, same: Any) -> "IsotonicCalibrator":
        """Fit on pairs: scores (P,) any finite scale, higher = more alike; same (P,) bool, True where
        the pair shows one individual. Raises FusionError on non-finite scores, mismatched lengths or
        pairs of one kind only (a calibration needs both)."""
        from sklearn.isotonic import IsotonicRegression

        scores = _finite("scores", scores).reshape(-1)
        same = np.asarray(same, dtype=bool).reshape(-1)
        if scores.shape != same.shape:
            raise FusionError(f"{scores.size} scores but {same.size} same/different labels")
        if same.all() or not same.any():
            raise FusionError(f"calibration needs same-individual and different-individual pairs; all "
                              f"{same.size} pairs given are {'same' if same.all() else 'different'}")
        model = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        model.fit(scores, same.astype(np.float64))
        return cls(np.asarray(model.X_thresholds_, np.float64), np.clip(model.y_thresholds_, 0.0, 1.0))

    def __call__(self, scores: Any) -> np.ndarray:
        """P(same individual) of each score, float64, the shape of `scores`; NaN scores are an error."""
        array = np.asarray(scores, dtype=np.float64)
        if np.isnan(array).any():
            raise FusionError("scores to calibrate hold NaN")
        return np.interp(array, self.scores, self.probabilities)

    def to_dict(self) -> dict[str, list[float]]:
        """A JSON-safe form (finite floats only): {"scores": [...], "probabilities": [...]}."""
        return {"scores": [float(v) for v in self.scores], "probabilities": [float(v) for v in self.probabilities]}

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any], where: str = "a calibration") -> "IsotonicCalibrator":
        """The calibrator of `to_dict`; raises FusionError naming `where` when it is malformed."""
        try:
            return cls(np.asarray(mapping["scores"], dtype=np.float64),
                       np.asarray(mapping["probabilities"], dtype=np.float64))
        except (KeyError, TypeError, ValueError) as err:
            raise FusionError(f"{where} is not a stored calibrator ({type(err).__name__}: {err}); re-run the "
                              f"stage that fitted it") from err


@dataclass(frozen=True)
class FusionModel:
    """fused = weight * P_global(global score) + (1 - weight) * P_local(inliers); weight in [0, 1]."""

    global_calibrator: IsotonicCalibrator
    local_calibrator: IsotonicCalibrator
    weight: float

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.weight) <= 1.0:
            raise FusionError(f"the fusion weight must be in [0, 1], got {self.weight}")

    @property
    def local_floor(self) -> float:
        """The local probability of a pair never matched (outside its query's shortlist): 0 inliers."""
        return float(self.local_calibrator(0.0))

    def fuse(self, global_scores: Any, local_scores: Optional[Any] = None) -> np.ndarray:
        """The fused P(same individual) of pairs, float64, the broadcast shape of the inputs;
        local_scores None: pairs outside the shortlist (the local floor)."""
        global_probability = self.global_calibrator(global_scores)
        local_probability = self.local_floor if local_scores is None else self.local_calibrator(local_scores)
        return self.weight * global_probability + (1.0 - self.weight) * local_probability

    def rank_scores(self, global_scores: Any, local_scores: Optional[Any] = None) -> np.ndarray:
        """`fuse` plus TIE_BREAK x the global score: what rankings sort by (ties of the piecewise-
        constant calibration ordered by the global score)."""
        return self.fuse(global_scores, local_scores) + TIE_BREAK * np.asarray(global_scores, dtype=np.float64)

    def fuse_dense(self, global_scores: Any, shortlist: Any, local_scores: Any, rank: bool = True) -> np.ndarray:
        """(Nq, G) float64 fused scores of a dense search: global_scores (Nq, G); shortlist (Nq, B) gallery
        columns (-1: none) whose local_scores (Nq, B) are known; every other pair gets the local floor.
        rank: `rank_scores` (for rankings and the evaluator), else the probabilities of `fuse`."""
        global_scores = np.asarray(global_scores, dtype=np.float64)
        shortlist, local_scores = _shortlist_arrays(shortlist, local_scores, global_scores.shape[0])
        combine = self.rank_scores if rank else self.fuse
        fused = combine(global_scores)
        rows, columns = np.nonzero(shortlist >= 0)
        gallery = shortlist[rows, columns]
        fused[rows, gallery] = combine(global_scores[rows, gallery], local_scores[rows, columns])
        return fused

    def fuse_lists(self, list_scores: Any, list_indices: Any, shortlist: Any, local_scores: Any,
                   rank: bool = True) -> np.ndarray:
        """(Nq, M) float64 fused scores of top-M lists (the path of large galleries): list_scores
        (Nq, M) global scores of the gallery images list_indices (Nq, M) (-1: no entry, scored -inf);
        shortlist, local_scores (Nq, B) as for `fuse_dense`. Each entry equals `fuse_dense`'s at that
        gallery column, so the two paths rank alike; entries are not re-sorted."""
        list_scores = np.asarray(list_scores, dtype=np.float64)
        list_indices = np.asarray(list_indices, dtype=np.int64)
        if list_indices.shape != list_scores.shape or list_scores.ndim != 2:
            raise FusionError(f"list scores {list_scores.shape} and list indices {list_indices.shape} must both be "
                              f"(queries, M)")
        shortlist, local_scores = _shortlist_arrays(shortlist, local_scores, list_scores.shape[0])
        width = int(max(list_indices.max(initial=-1), shortlist.max(initial=-1))) + 1
        listed = list_indices >= 0
        local_rows, local_columns = np.nonzero(shortlist >= 0)
        local_keys = local_rows * width + shortlist[local_rows, local_columns]
        order = np.argsort(local_keys, kind="stable")
        local_keys, local_values = local_keys[order], local_scores[local_rows, local_columns][order]
        keys = np.arange(list_scores.shape[0])[:, None] * width + np.where(listed, list_indices, 0)
        position = np.minimum(np.searchsorted(local_keys, keys), max(len(local_keys) - 1, 0))
        found = listed & (local_keys[position] == keys) if len(local_keys) else np.zeros_like(listed)
        combine = self.rank_scores if rank else self.fuse
        fused = np.where(listed, combine(np.where(listed, list_scores, 0.0)), -np.inf)
        if found.any():
            fused[found] = combine(list_scores[found], local_values[position[found]])
        return fused

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe form (no NaN): the weight and both calibrators."""
        return {"weight": float(self.weight), "global": self.global_calibrator.to_dict(),
                "local": self.local_calibrator.to_dict()}

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any], where: str = "a fusion setting") -> "FusionModel":
        """The model of `to_dict`; raises FusionError naming `where` when it is malformed."""
        try:
            weight = float(mapping["weight"])
            if not math.isfinite(weight):
                raise ValueError(f"weight {weight}")
            return cls(IsotonicCalibrator.from_dict(mapping["global"], f"{where} (global)"),
                       IsotonicCalibrator.from_dict(mapping["local"], f"{where} (local)"), weight)
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, FusionError):
                raise
            raise FusionError(f"{where} is not a stored fusion ({type(err).__name__}: {err}); re-run the stage "
                              f"that chose it") from err


def _shortlist_arrays(shortlist: Any, local_scores: Any, n_query: int) -> tuple[np.ndarray, np.ndarray]:
    shortlist = np.asarray(shortlist, dtype=np.int64)
    local_scores = _finite("local scores", local_scores)
    if shortlist.ndim != 2 or shortlist.shape[0] != n_query or local_scores.shape != shortlist.shape:
        raise FusionError(f"shortlist {shortlist.shape} and local scores {local_scores.shape} must both be "
                          f"(queries, B) with {n_query} queries")
    return shortlist, local_scores


def shortlist_pairs(global_scores: Any, shortlist: Any, local_scores: Any, query_labels: Any,
                    gallery_labels: Optional[Any] = None, exclude_self: Optional[bool] = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(global, local, same) of every shortlisted pair with both identities known: the pairs the
    calibrators are fitted on (where both scores exist). global_scores (Nq, G); shortlist,
    local_scores (Nq, B); labels int, -1 unknown; gallery_labels None: all-vs-all (the gallery is the
    query set); exclude_self (default: all-vs-all) skips query i's column i. Each (P,) float64,
    float64, bool."""
    global_scores = np.asarray(global_scores, dtype=np.float64)
    shortlist, local_scores = _shortlist_arrays(shortlist, local_scores, global_scores.shape[0])
    query_labels = np.asarray(query_labels, dtype=np.int64).reshape(-1)
    exclude_self = gallery_labels is None if exclude_self is None else exclude_self
    gallery_labels = query_labels if gallery_labels is None else np.asarray(gallery_labels, np.int64).reshape(-1)
    rows, columns = np.nonzero(shortlist >= 0)
    gallery = shortlist[rows, columns]
    keep = (query_labels[rows] >= 0) & (gallery_labels[gallery] >= 0)
    if exclude_self:
        keep &= gallery != rows
    rows, columns, gallery = rows[keep], columns[keep], gallery[keep]
    return (global_scores[rows, gallery], local_scores[rows, columns],
            query_labels[rows] == gallery_labels[gallery])


@dataclass
class FusionSearch:
    """The validation search of the fusion weight: `model` (calibrators fitted on every validation
    pair, the chosen weight), the evaluator's figures (RetrievalMetrics) at each weight tried, in
    `weights` order, and `folds`: 2 when those figures are cross-fitted (each query's row fused by
    calibrators fitted on the other identities' queries), 1 when fitted and evaluated on the same
    pairs (a validation split too small to split)."""

    model: FusionModel
    weights: list[float]
    metrics: list[Any] = field(default_factory=list)
    folds: int = 2

    def table(self) -> list[dict[str, float]]:
        """One row a weight: {"weight": w, **metrics.summary()} (JSON-safe)."""
        return [{"weight": w, **m.summary()} for w, m in zip(self.weights, self.metrics)]


def _calibrators(global_scores: np.ndarray, shortlist: np.ndarray, local_scores: np.ndarray, labels: np.ndarray,
                 rows: np.ndarray) -> tuple[IsotonicCalibrator, IsotonicCalibrator]:
    """Both calibrators fitted on the shortlisted pairs of the queries `rows` (bool (N,))."""
    query_labels = np.where(rows, labels, -1)  # other queries' pairs are left out
    global_pairs, local_pairs, same = shortlist_pairs(global_scores, shortlist, local_scores, query_labels, labels,
                                                      exclude_self=True)
    return IsotonicCalibrator.fit(global_pairs, same), IsotonicCalibrator.fit(local_pairs, same)


def fit_fusion(global_scores: Any, labels: Any, shortlist: Any, local_scores: Any,
               weights: Sequence[float] = DEFAULT_WEIGHTS, folds: int = 2) -> FusionSearch:
    """Calibrate and choose the fusion weight on a validation split searched against itself.

    global_scores (N, N) similarity (the post-processed global scores; the diagonal is ignored);
    labels (N,) int; shortlist, local_scores (N, B) from `match_shortlist` (a query's own column in
    its shortlist is ignored). The calibrators are fitted on shortlisted pairs (`shortlist_pairs`).
    Each weight in `weights` is evaluated by the identity-balanced mAP of `FusionModel.fuse_dense`
    over all pairs, cross-fitted over `folds` = 2 folds of identities (a query's row is fused by
    calibrators fitted on the other fold's queries: an isotonic fit follows noise in the pairs it
    was fitted on, and judging a weight on those same pairs favours it); with folds = 1, or when a
    fold lacks same- or different-individual pairs, fitted and judged on all pairs (`folds` of the
    result says which). The best weight wins, ties going to the larger (the global score alone is
    the simpler model); the returned model's calibrators are fitted on all pairs. Memory O(N^2):
    the dense validation path. Raises FusionError (see IsotonicCalibrator.fit) or MetricsError when
    no query has a true match."""
    from jaguar.core.evaluator import evaluate

    global_scores = np.asarray(global_scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    shortlist, local_scores = _shortlist_arrays(shortlist, local_scores, global_scores.shape[0])

    def fused_metrics(weight: float, fitted: list) -> Any:
        fused = np.empty_like(global_scores)
        for rows, (fold_global, fold_local) in fitted:
            model = FusionModel(fold_global, fold_local, weight)
            fused[rows] = model.fuse_dense(global_scores[rows], shortlist[rows], local_scores[rows])
        return evaluate(fused, labels, kind="similarity")

    return search_weights(labels, lambda rows: _calibrators(global_scores, shortlist, local_scores, labels, rows),
                          fused_metrics, weights, folds)


def search_weights(labels: np.ndarray, calibrate: Callable[[np.ndarray], tuple[IsotonicCalibrator, IsotonicCalibrator]],
                   fused_metrics: Callable[[float, list], Any], weights: Sequence[float] = DEFAULT_WEIGHTS,
                   folds: int = 2) -> FusionSearch:
    """`fit_fusion`'s search in any form of the scores: `calibrate(rows)` fits both calibrators on
    the shortlisted pairs of the queries `rows` (bool (N,)); `fused_metrics(weight, fitted)` is the
    evaluator's result of the whole set fused at `weight`, each (rows, (global, local calibrators))
    of `fitted` fusing its rows. Folds, ties and the returned model as `fit_fusion` says."""
    weights = [float(w) for w in weights]
    if not weights or any(not 0.0 <= w <= 1.0 for w in weights):
        raise FusionError(f"fusion weights must be a non-empty list in [0, 1], got {weights}")
    everyone = np.ones(len(labels), dtype=bool)
    global_calibrator, local_calibrator = calibrate(everyone)
    identities = np.unique(labels[labels >= 0])
    fold_of = np.full(len(labels), -1, dtype=np.int64)
    fold_of[labels >= 0] = np.searchsorted(identities, labels[labels >= 0]) % max(folds, 1)
    fitted = []  # (rows fused, calibrators fitted on the other rows)
    if folds > 1:
        try:
            fitted = [(fold_of == k, calibrate((fold_of != k) & (fold_of >= 0))) for k in range(folds)]
        except FusionError:  # a fold with pairs of one kind only: too few identities to cross-fit
            fitted = []
    if not fitted:
        fitted = [(everyone, (global_calibrator, local_calibrator))]
    elif bool((fold_of < 0).any()):  # queries of unknown identity: in no fold, fused as the final model fuses
        fitted.append((fold_of < 0, (global_calibrator, local_calibrator)))
    results = [fused_metrics(weight, fitted) for weight in weights]
    best = max(range(len(weights)), key=lambda i: (results[i].mAP_balanced, weights[i]))
    return FusionSearch(FusionModel(global_calibrator, local_calibrator, weights[best]), weights, results,
                        folds=folds if len(fitted) > 1 else 1)
