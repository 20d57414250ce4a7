"""The open-set decision on the fused probability (WildFusion's route, Čermák et al., ECCV 2024; see
jaguar.retrieval.post.fusion): `jaguar calibrate`'s validation queries are matched locally against
their top-B training images (jaguar.retrieval.openset.evidence), the raw cosine and the verified
inlier count of every (query, training image) pair are each calibrated to P(same individual) by
isotonic regression (pairs outside the query's shortlist at 0 inliers: the local floor), and a
photo's score for an individual is the aggregate of its fused image probabilities
weight x P_global + (1 - weight) x P_local.

Cross-fitted: the queries are cut into the calibration's folds by identity (a query of a held-out
training identity goes with that fold; identities only in validation are dealt round robin), and a
query's probabilities in every fold's decision come from calibrators fitted on the other folds'
queries, so no query's own pairs shaped the map that scores it. The fusion weight, the aggregate and
the threshold are then chosen on these cross-fitted decisions (calibrate.py), and the stored model's
calibrators are refitted on every validation pair."""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np

from jaguar.core.features import FeatureSet
from jaguar.retrieval.local.keypoints import LocalFeatures
from jaguar.retrieval.openset.evidence import LocalEvidence, best_individual, match_shortlists
from jaguar.retrieval.openset.identify import aggregate_image_scores, gallery_from_features
from jaguar.retrieval.post.fusion import FusionError, FusionModel, IsotonicCalibrator

log = logging.getLogger(__name__)


def _identity_names(features: FeatureSet) -> np.ndarray:
    return np.array([features.label_names.get(label, str(label)) for label in features.labels.tolist()], dtype=object)


class FusedFolds:
    """The cross-fitted fused scores of validation queries against the training gallery in every
    fold. train: the labelled training features (gallery rows, in order); queries: the labelled
    validation features; held: the identities each fold holds out; query_local, evidence: the
    queries' and gallery rows' local features (evidence.gallery aligned with train's rows)."""

    def __init__(self, train: FeatureSet, queries: FeatureSet, held: Sequence[set[str]],
                 query_local: Sequence[LocalFeatures], evidence: LocalEvidence) -> None:
        self.train, self.queries, self.held = train, queries, list(held)
        self.similarity = (queries.embeddings.float() @ train.embeddings.float().T).numpy()
        self.gallery_identity = _identity_names(train)
        query_identity = _identity_names(queries)
        same = query_identity[:, None] == self.gallery_identity[None, :]
        cache: dict = {}
        # every pair a fold's shortlist holds is matched once (the folds' shortlists overlap)
        full, _ = match_shortlists(self.similarity, query_local, evidence, None, cache)
        self.allowed = [np.array([name not in held_out for name in self.gallery_identity], dtype=bool)
                        for held_out in self.held]
        self.fold_inliers = [match_shortlists(self.similarity, query_local, evidence, allowed, cache)[0]
                             for allowed in self.allowed]
        self.matched_pairs = len(cache)
        self.model = FusionModel(*_fit(self.similarity, full, same), weight=1.0)
        group = self._query_groups(query_identity)
        self.cross_fitted = True
        calibrators = {}
        for fold in range(len(self.held)):
            others = group != fold
            try:
                calibrators[fold] = _fit(self.similarity[others], full[others], same[others])
            except FusionError as err:  # the other folds' queries lack same- or different-pairs
                log.warning("fold %d's calibrators are fitted on every validation query (%s)", fold, err)
                calibrators[fold] = (self.model.global_calibrator, self.model.local_calibrator)
                self.cross_fitted = False
        self._global, self._local = [], []
        for inliers in self.fold_inliers:
            global_p = np.empty(self.similarity.shape, dtype=np.float64)
            local_p = np.empty(self.similarity.shape, dtype=np.float64)
            for fold, (global_calibrator, local_calibrator) in calibrators.items():
                rows = group == fold
                global_p[rows] = global_calibrator(self.similarity[rows])
                local_p[rows] = local_calibrator(inliers[rows])
            self._global.append(global_p)
            self._local.append(local_p)

    def _query_groups(self, query_identity: np.ndarray) -> np.ndarray:
        fold_of = {name: fold for fold, held_out in enumerate(self.held) for name in held_out}
        only_val = sorted(set(query_identity.tolist()) - set(fold_of))
        fold_of.update({name: i % len(self.held) for i, name in enumerate(only_val)})
        return np.array([fold_of[name] for name in query_identity.tolist()], dtype=np.int64)

    def decisions(self, weight: float, aggregate: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per fold, (best fused score, best is right, is known) of each query at fusion `weight`
        with individual scores aggregated by `aggregate` (as calibrate.fold_decisions does)."""
        truth = _identity_names(self.queries)
        out = []
        for fold, allowed in enumerate(self.allowed):
            gallery = gallery_from_features(self.train.select([n for n, a in zip(self.train.names, allowed) if a]))
            fused = weight * self._global[fold][:, allowed] + (1.0 - weight) * self._local[fold][:, allowed]
            probability = aggregate_image_scores(fused, gallery, aggregate)
            cosine = aggregate_image_scores(self.similarity[:, allowed], gallery, aggregate)
            best = best_individual(probability, cosine)
            known = np.array([name in gallery.individuals for name in truth], dtype=bool)
            right = np.array([gallery.individuals[b] == name for b, name in zip(best.tolist(), truth)], dtype=bool)
            out.append((probability[np.arange(len(best)), best].astype(np.float64), right, known))
        return out


def _fit(similarity: np.ndarray, inliers: np.ndarray, same: np.ndarray
         ) -> tuple[IsotonicCalibrator, IsotonicCalibrator]:
    """The isotonic calibrators of the raw cosine and of the inlier count on the pairs given."""
    return (IsotonicCalibrator.fit(similarity.ravel(), same.ravel()),
            IsotonicCalibrator.fit(inliers.ravel(), same.ravel()))


def fusion_model(folds: FusedFolds, weight: float) -> FusionModel:
    """The stored model: calibrators fitted on every validation pair, the chosen `weight`."""
    return FusionModel(folds.model.global_calibrator, folds.model.local_calibrator, float(weight))


def local_inputs(train_local, val_local, train: FeatureSet, queries: FeatureSet
                 ) -> tuple[list[Optional[LocalFeatures]], list[LocalFeatures]]:
    """The local features of the labelled training rows and validation queries, in their order
    (LocalFeatureSet.select; KeyError naming the images without local features)."""
    return list(train_local.select(train.names)), list(val_local.select(queries.names))
