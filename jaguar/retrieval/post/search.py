"""The one search decision: a set searched against itself under a post-processing setting, in N x N
form (jaguar.retrieval.post.dense) or, above `retrieval.topm_above` images (or with
`retrieval.mode=topm`), in top-M form (jaguar.retrieval.post.topm: O(N * M) memory, no N x N).
`search_mode` is the only place the choice is made; tune-post (`tuning_space`), score's test table,
`jaguar rank` and the report's figures (`final_ranking`) all ask it here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import numpy as np
import torch

from jaguar.config import PostConfig, RetrievalConfig
from jaguar.core.evaluator import RetrievalMetrics
from jaguar.core.features import FeatureSet
from jaguar.retrieval.post.dense import DenseSpace, final_distance
from jaguar.retrieval.post.space import SearchSpace
from jaguar.retrieval.post.topm import RankedLists, TopMSpace, final_topm

Mode = Literal["dense", "topm"]


def search_mode(retrieval: RetrievalConfig, n_items: int) -> Mode:
    """"topm" when `retrieval.mode` is topm, or auto and the set holds more than
    `retrieval.topm_above` items; "dense" otherwise."""
    if retrieval.mode == "topm" or (retrieval.mode == "auto" and n_items > retrieval.topm_above):
        return "topm"
    return "dense"


def tuning_space(features: Union[FeatureSet, torch.Tensor], labels: torch.Tensor,
                 retrieval: RetrievalConfig) -> SearchSpace:
    """tune-post's search space over a labelled set (features N x D, labels N): `DenseSpace` or
    `TopMSpace` with M = retrieval.top_m, as `search_mode` says for N."""
    if search_mode(retrieval, len(features)) == "topm":
        return TopMSpace(features, labels, int(retrieval.top_m))
    return DenseSpace(features, labels)


@dataclass
class FinalRanking:
    """The final ranking of one set against itself under a setting: each item's other items, best
    first. Dense: the N x N final distance (`distance`), from which any list is cut; top-M: each
    item's top-M lists (`lists`), searched once. `post` None is raw cosine (no tune-post result)."""

    features: FeatureSet
    post: Optional[PostConfig]
    mode: Mode
    top_m: int
    _distance: Optional[torch.Tensor] = field(default=None, repr=False)
    _lists: Optional[RankedLists] = field(default=None, repr=False)

    @property
    def setting(self) -> PostConfig:
        return self.post or PostConfig()

    def distance(self) -> torch.Tensor:
        """N x N final distance (dense mode only; ValueError in top-M mode, which never builds it)."""
        if self.mode != "dense":
            raise ValueError(f"a top-M ranking of {len(self.features)} items has no N x N distance")
        if self._distance is None:
            self._distance = final_distance(self.features, self.setting)
        return self._distance

    def similarity(self) -> np.ndarray:
        """N x N float64 scores, higher = more alike (dense mode only): the negated final distance,
        or for raw cosine (post None) the dot products of the embeddings as given (L2-normalised by
        the caller: their cosine similarity)."""
        if self.post is None:
            embeddings = self.features.embeddings
            return (embeddings @ embeddings.T).double().numpy()
        return -torch.as_tensor(self.distance()).double().numpy()

    def lists(self, top_k: Optional[int] = None) -> RankedLists:
        """Each item's top-k other items (k <= N - 1; default M in top-M mode, N - 1 dense), best first,
        ties by lower index; in top-M mode lists longer than M are searched at that length."""
        n = len(self.features)
        if self.mode == "topm":
            width = max(int(top_k or 0), self.top_m)
            if self._lists is None or self._lists.index.shape[1] < min(width, n - 1):
                self._lists = final_topm(self.features, self.setting, width)
            lists = self._lists
        else:
            distance = self.distance().clone()
            distance.fill_diagonal_(float("inf"))
            values, index = distance.sort(dim=1, stable=True)
            lists = RankedLists(index[:, :n - 1], values[:, :n - 1], self.features.embeddings, reordered=False)
        k = min(int(top_k or lists.index.shape[1]), lists.index.shape[1])
        return RankedLists(lists.index[:, :k], lists.distance[:, :k], lists.base, lists.reordered)


def final_ranking(features: FeatureSet, post: Optional[PostConfig],
                  retrieval: Optional[RetrievalConfig] = None) -> FinalRanking:
    """The final ranking of `features` (N x D, one set against itself) under `post` (None: raw
    cosine) in the form `search_mode` gives for N under `retrieval` (defaults when None). Nothing is
    computed until a distance, similarity or list is asked for."""
    retrieval = retrieval or RetrievalConfig()
    return FinalRanking(features, post, search_mode(retrieval, len(features)), int(retrieval.top_m))


def score_setting(space: SearchSpace, post: PostConfig) -> RetrievalMetrics:
    """The evaluator's figures of one whole setting in a tuning space (its labelled set)."""
    return space.metrics(space.final(post))
