"""What the report measures on a labelled feature set: scores under the chosen post-processing,
per-identity and per-query AP, the best/worst queries, and the images to show for them. At gallery
scale (top-M form) everything comes from ranked lists (`jaguar rank`'s file when the run has it)
and a sample of the images: O(N * k) memory and work, no N x N."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from jaguar.data.shards import ShardSplit, load_manifest
from jaguar.errors import JaguarError
from jaguar.report.plots import GridCell, GridRow
from jaguar.core import evaluator as retrieval_metrics
from jaguar.core.features import FeatureSet
from jaguar.config import PostConfig, RetrievalConfig
from jaguar.core.evaluator import CMC_RANKS, RetrievalMetrics
from jaguar.core.evaluator_ranked import list_bounds
from jaguar.retrieval.post.dense import final_distance
from jaguar.retrieval.rank import RankError, read_ranks
from jaguar.retrieval.post.topm import final_topm, use_topm
from jaguar.run import RunDir

logger = logging.getLogger(__name__)


RANKED_KEPT = 50  # each query's best images kept for the grids (the grids show fewer)
HISTOGRAM_SAMPLE = 3000  # images whose ordered pairs make the similarity histograms


def similarity_scores(embeddings: torch.Tensor, chosen: Optional[PostConfig]) -> tuple[np.ndarray, str]:
    """N×N scores, higher = more alike: the chosen post-processing's negated distance, or cosine."""
    if chosen is not None:
        distance = final_distance(embeddings, chosen)
        return (-torch.as_tensor(distance).double().numpy(),
                f"the chosen post-processing (tune-post): {chosen.describe()}")
    return (embeddings @ embeddings.T).double().numpy(), "raw cosine similarity (no tune-post result)"


@dataclass
class Evaluation:
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


def _cosine_sample(features: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of every ordered pair of a seeded random sample of at most HISTOGRAM_SAMPLE images."""
    n, size = len(features), HISTOGRAM_SAMPLE
    chosen = np.sort(np.random.default_rng(0).choice(n, size, replace=False)) if n > size else np.arange(n)
    sample = features.numpy()[chosen]
    return sample @ sample.T, features.labels.numpy()[chosen]


def _between(lower: float, upper: float) -> str:
    return f"{lower:.4f}" if abs(upper - lower) < 5e-5 else f"between {lower:.4f} and {upper:.4f}"


def _from_lists(split: str, features: FeatureSet, lists: np.ndarray, scored_with: str) -> Evaluation:
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

    return Evaluation(split, features, lists[:, :RANKED_KEPT], *_cosine_sample(features), labels, lower.query_ap,
                      by_name(lower.per_identity_ap), text, scored_with, None, by_name(upper.per_identity_ap),
                      f"AP@{top_k}")


def evaluate(split: str, features: FeatureSet, chosen: Optional[PostConfig],
             retrieval: Optional[RetrievalConfig] = None, lists: Optional[tuple[torch.Tensor, str]] = None
             ) -> Evaluation:
    """The figures, grids' lists and histogram sample of one labelled set. Below the top-M
    threshold (`retrieval`, jaguar.retrieval.post.topm) the evaluator's exact figures of the N x N
    scores; above it, figures of top-k lists (`metrics_ranked.list_bounds`, never N x N and no N^2 work): `lists`
    (N x k indices, what they are) when given, e.g. read from `jaguar rank`'s file, else each
    query's top-M list searched here."""
    features = features.normalized()
    labels = features.labels.numpy()
    retrieval = retrieval or RetrievalConfig()
    method = "the chosen post-processing (tune-post)" if chosen is not None else "raw cosine similarity"
    if use_topm(retrieval, len(features)):
        if lists is None:
            searched = final_topm(features, chosen or PostConfig(), int(retrieval.top_m))
            lists = (searched.index, f"{method}, top-{searched.index.shape[1]} lists searched for this report")
        return _from_lists(split, features, lists[0].numpy(), lists[1])
    scores, scored_with = similarity_scores(features.embeddings, chosen)
    metrics = retrieval_metrics.evaluate(scores, labels, kind="similarity")
    np.fill_diagonal(scores, -np.inf)
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :min(RANKED_KEPT, len(features) - 1)]
    ap_by_identity = {features.label_names.get(int(label), str(label)): float(value)
                      for label, value in metrics.per_identity_ap.items()}
    text = (f"identity-balanced mAP {metrics.mAP_balanced:.4f}, mAP {metrics.mAP:.4f}, rank-1 {metrics.rank1:.4f}, "
            f"rank-5 {metrics.rank5:.4f}, mINP {metrics.mINP:.4f}.")
    return Evaluation(split, features, ranked, *_cosine_sample(features), labels, metrics.query_ap, ap_by_identity,
                      text, scored_with, metrics)


def ranked_lists(run: RunDir, split: str, features: FeatureSet, has_post: bool
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


class ImageLookup:
    """Images of a `jaguar prep` shards folder by file name, over all its splits."""

    def __init__(self, shards_dir: Path):
        self.shards_dir = shards_dir
        manifest = load_manifest(shards_dir)
        self._splits = {name: ShardSplit(shards_dir, name) for name in manifest.splits}
        self._where = {}
        for name, split in self._splits.items():
            for index, filename in enumerate(split.filenames):
                self._where.setdefault(filename, (name, index))

    def get(self, filename: str):
        where = self._where.get(filename)
        if where is None:
            return None
        image, _ = self._splits[where[0]][where[1]]
        return image


def find_shards(run_dir: Path, setting: str) -> tuple[ImageLookup | None, str]:
    """The run's shards folder (as configured, or relative to the run), or why it is unavailable."""
    if not setting:
        return None, "The run config names no shards folder (data.shards), so no pictures can be shown"
    for candidate in (Path(setting), run_dir / setting):
        if candidate.is_dir():
            try:
                return ImageLookup(candidate), ""
            except (JaguarError, OSError, ValueError) as err:  # the page still renders, with captions only
                logger.warning("cannot read shards %s: %s", candidate, err)
                return None, f"Shards folder {candidate} could not be read ({err})"
    return None, f"Shards folder {setting} (data.shards) was not found, so no pictures can be shown"


def grid_rows(evaluation: Evaluation, shards: ImageLookup | None, which: str, queries: int,
              top_k: int) -> list[GridRow]:
    """Rows for the `which` ("best" or "worst") queries by AP, preferring distinct identities."""
    valid = np.flatnonzero(~np.isnan(evaluation.query_ap))
    if not len(valid):
        return []
    # many queries tie at AP 1, so one query an identity keeps the rows from showing one animal
    order = valid[np.argsort(evaluation.query_ap[valid], kind="stable")]
    if which == "best":
        order = order[::-1]
    picked: list[int] = []
    seen_labels: set[int] = set()
    for q in order:
        if evaluation.labels[q] not in seen_labels:
            picked.append(int(q))
            seen_labels.add(int(evaluation.labels[q]))
        if len(picked) == queries:
            break
    names, label_names = evaluation.features.names, evaluation.features.label_names

    def cell(index: int, is_match: bool | None) -> GridCell:
        image = shards.get(names[index]) if shards is not None else None
        identity = label_names.get(int(evaluation.labels[index]), str(evaluation.labels[index]))
        return GridCell(image, f"{identity}\n{names[index]}", is_match)

    rows = []
    for q in picked:
        top = evaluation.ranked[q][:top_k]
        rows.append(GridRow(cell(q, None),
                            [cell(int(i), bool(evaluation.labels[i] == evaluation.labels[q])) for i in top],
                            note=f"{evaluation.ap_name} {evaluation.query_ap[q]:.2f}"))
    return rows
