"""What the report measures on a labelled split: scores under the run's chosen post-processing,
per-identity and per-query AP, the best/worst queries' ranked lists and a sample for the similarity
histograms (`split_figures`). The ranking is jaguar.retrieval.post.search's (`final_ranking`); at
gallery scale (top-M form) everything comes from ranked lists (`jaguar rank`'s file when the run has
an up-to-date one, `stored_lists`) and a sample of the images: O(N * k) memory and work, no N x N.
The report (jaguar.report) draws these figures; it computes none of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from jaguar.config import PostConfig, RetrievalConfig
from jaguar.core import evaluator
from jaguar.core.evaluator import CMC_RANKS, RetrievalMetrics
from jaguar.core.evaluator_ranked import list_bounds
from jaguar.core.features import FeatureSet
from jaguar.errors import JaguarError
from jaguar.retrieval.post.fusion import FusionModel
from jaguar.retrieval.post.local_evidence import LocalEvidence, split_evidence
from jaguar.retrieval.post.search import final_ranking
from jaguar.retrieval.rank import RankError, read_ranks
from jaguar.run import PostResult, RunDir

RANKED_KEPT = 50  # each query's best images kept for the grids (the grids show fewer)
HISTOGRAM_SAMPLE = 3000  # images whose ordered pairs make the similarity histograms


@dataclass
class SplitFigures:
    """The figures of one labelled split under the run's chosen post-processing, for the report."""
    split: str
    features: FeatureSet
    ranked: np.ndarray  # N x K: each query's best other images, best first (no N x N is kept)
    cosine_sample: np.ndarray  # S x S raw cosine similarities of a random sample of the images
    sample_labels: np.ndarray  # S labels of that sample
    labels: np.ndarray
    query_ap: np.ndarray  # (N,) AP of each query (from lists: AP@k, a lower bound); NaN without a match
    ap_by_identity: dict[str, float]  # identity name -> mean query_ap of its queries
    figures_text: str  # the headline figures, as the page says them
    scored_with: str
    metrics: Optional[RetrievalMetrics] = None  # the evaluator's all-vs-all result (dense path only)
    ap_upper_by_identity: Optional[dict[str, float]] = None  # from lists: the upper bound of each identity's AP
    ap_name: str = "AP"  # what query_ap is: "AP", or "AP@k" from top-k lists
    local: Optional[LocalEvidence] = None  # the split's shortlist matches (`jaguar match`), lined up with features

    def correspondences(self, query: int, gallery: int) -> Optional[tuple[np.ndarray, np.ndarray, int]]:
        """(query_xy, gallery_xy, inliers): the verified correspondences `jaguar match` kept between
        images `query` and `gallery` (positions into features), None when there are none to show."""
        return None if self.local is None else self.local.correspondences(query, gallery)


def _cosine_sample(features: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of every ordered pair of a seeded random sample of at most HISTOGRAM_SAMPLE images."""
    n, size = len(features), HISTOGRAM_SAMPLE
    chosen = np.sort(np.random.default_rng(0).choice(n, size, replace=False)) if n > size else np.arange(n)
    sample = features.numpy()[chosen]
    return sample @ sample.T, features.labels.numpy()[chosen]


def _between(lower: float, upper: float) -> str:
    return f"{lower:.4f}" if abs(upper - lower) < 5e-5 else f"between {lower:.4f} and {upper:.4f}"


def _from_lists(split: str, features: FeatureSet, lists: np.ndarray, scored_with: str) -> SplitFigures:
    labels = features.labels.numpy()
    bounds = list_bounds(lists, labels)
    lower, upper, top_k = bounds.lower, bounds.upper, bounds.top_k
    valid = ~np.isnan(lower.query_ap)
    cmc = ", ".join(f"rank-{r} {getattr(lower, f'rank{r}'):.4f}" for r in CMC_RANKS if r <= top_k)
    complete = float(bounds.complete[valid].mean())
    if complete == 1.0:
        coverage = (f"Every true match of every query is within its top-{top_k} list, so these figures are "
                    f"exact for this ranking. ")
    else:
        coverage = (f"Every true match is within the top-{top_k} list for {complete:.1%} of the queries (their "
                    f"AP is exact); the others' matches beyond it bound their AP between not retrieved and "
                    f"ranked right after the list (AP@{top_k} is shown per query and identity). ")
    text = (f"identity-balanced mAP {_between(lower.mAP_balanced, upper.mAP_balanced)}, "
            f"mAP {_between(lower.mAP, upper.mAP)}, {cmc}. {coverage}"
            f"tune-post's (validation) and score's (test) tables hold the evaluator's exact figures of the "
            f"whole ranking; with re-ranking on, theirs re-rank the top retrieval.top_m of each list, so lists "
            f"of another length can differ slightly.")

    def by_name(per_identity: dict[int, float]) -> dict[str, float]:
        return {features.label_names.get(label, str(label)): value for label, value in per_identity.items()}

    return SplitFigures(split, features, lists[:, :RANKED_KEPT], *_cosine_sample(features), labels, lower.query_ap,
                      by_name(lower.per_identity_ap), text, scored_with, None, by_name(upper.per_identity_ap),
                      f"AP@{top_k}")


def split_figures(split: str, features: FeatureSet, chosen: Optional[PostConfig],
                  retrieval: Optional[RetrievalConfig] = None, lists: Optional[tuple[torch.Tensor, str]] = None,
                  fusion: Optional[FusionModel] = None, local: Optional[LocalEvidence] = None) -> SplitFigures:
    """The figures, grids' lists and histogram sample of one labelled set (features N x D, labels
    known), ranked under `chosen` (None: raw cosine) by jaguar.retrieval.post.search: in N x N form,
    the evaluator's exact figures; in top-M form, figures of top-k lists (`evaluator_ranked.list_bounds`,
    never N x N and no N^2 work): `lists` (N x k indices, what they are) when given, e.g. read from
    `jaguar rank`'s file (`stored_lists`), else each query's top-M list searched here. `fusion` with
    the set's `local` evidence ranks by the fused score; `local` alone is kept for the pictures."""
    features = features.normalized()
    labels = features.labels.numpy()
    ranking = final_ranking(features, chosen, retrieval, fusion, local)
    fused = f", fused with local matches (w = {fusion.weight:g})" if fusion is not None else ""
    method = f"the chosen post-processing (tune-post){fused}" if chosen is not None else "raw cosine similarity"
    if ranking.mode == "topm":
        if lists is None:
            searched = ranking.lists()
            lists = (searched.index, f"{method}, top-{searched.index.shape[1]} lists searched for this report")
        figures = _from_lists(split, features, lists[0].numpy(), lists[1])
        figures.local = local
        return figures
    scores = ranking.similarity()
    scored_with = (f"the chosen post-processing (tune-post): {chosen.describe()}{fused}" if chosen is not None
                   else "raw cosine similarity (no tune-post result)")
    metrics = evaluator.evaluate(scores, labels, kind="similarity")
    np.fill_diagonal(scores, -np.inf)
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :min(RANKED_KEPT, len(features) - 1)]
    ap_by_identity = {features.label_names.get(int(label), str(label)): float(value)
                      for label, value in metrics.per_identity_ap.items()}
    text = (f"identity-balanced mAP {metrics.mAP_balanced:.4f}, mAP {metrics.mAP:.4f}, rank-1 {metrics.rank1:.4f}, "
            f"rank-5 {metrics.rank5:.4f}, mINP {metrics.mINP:.4f}.")
    return SplitFigures(split, features, ranked, *_cosine_sample(features), labels, metrics.query_ap,
                        ap_by_identity, text, scored_with, metrics, local=local)


def stored_lists(run: RunDir, split: str, features: FeatureSet, has_post: bool
                 ) -> tuple[Optional[tuple[torch.Tensor, str]], str]:
    """(lists, "") from `jaguar rank`'s file of the split when it ranks exactly these images and
    is newer than their features and post.json, else (None, why not; "" when there is no file)."""
    path = run.ranks_path(split)
    if not path.is_file():
        return None, ""
    newer = [p for p in (run.features_path(split), run.post_path if has_post else None)
             if p is not None and p.stat().st_mtime > path.stat().st_mtime]
    if newer:
        return None, f"{path.name} is older than {newer[0].name}, so its lists were not used"
    try:
        index = read_ranks(path, list(features.names))
    except RankError as err:
        return None, f"{path.name} was not used: {err}"
    where = f"the top-{index.shape[1]} lists of {path.name} (`jaguar rank`, {run.post_path.name}'s settings)"
    return (index, where), ""


def run_split_figures(run: RunDir, split: str, features: FeatureSet, chosen: Optional[PostConfig],
                      retrieval: Optional[RetrievalConfig], has_post: bool, post: Optional[PostResult] = None
                      ) -> tuple[SplitFigures, list[tuple[str, str]]]:
    """`split_figures` of a run's labelled split, with notes for the page ((text, the command that
    makes what is missing)): at gallery scale (top-M
    form) the lists of `jaguar rank`'s file when it is usable (`stored_lists`), else searched here;
    the split's local matches (RUN/local/<split>.safetensors) when it has them, fused as post.json
    says (`post`), else for the pictures only; unusable matches become a note, never a crash."""
    lists, notes, local, fusion = None, [], None, None
    try:
        local = split_evidence(run, split, features.names)
        if post is not None and post.fuses:
            fusion = FusionModel.from_dict(post.fusion.model, f"{run.post_path} fusion")
            if local is None:
                fusion = None
                notes.append((f"{run.post_path.name} fuses local matches but {run.local_matches_path(split)} does "
                              f"not exist: these figures rank by the global setting alone",
                              f"jaguar match {run.path} --split {split}"))
    except JaguarError as err:
        local, fusion = None, None
        notes.append((f"Local matches not used: {err}", f"jaguar match {run.path} --split {split} --force"))
    if final_ranking(features, chosen, retrieval).mode == "topm":
        lists, note = stored_lists(run, split, features, has_post)
        if lists is None and not note:
            note = (f"No ranked lists ({run.ranks_path(split).name}) for these {len(features):,} images: "
                    f"the report searched them itself (a kNN pass); with the file it only reads them")
        notes += [(note, f"jaguar rank {run.path} --split {split}")] if note else []
    return split_figures(split, features, chosen, retrieval, lists, fusion, local), notes
