"""What the report measures on a labelled feature set: scores under the chosen post-processing,
per-identity and per-query AP, the best/worst queries, and the images to show for them."""

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
from jaguar.retrieval import metrics as retrieval_metrics
from jaguar.retrieval.features import FeatureSet
from jaguar.config import PostConfig, RetrievalConfig
from jaguar.retrieval.metrics import RetrievalMetrics
from jaguar.retrieval.metrics_ranked import RankedEvaluator
from jaguar.retrieval.postprocess import final_distance
from jaguar.retrieval.topm import final_topm, use_topm

logger = logging.getLogger(__name__)


RANKED_KEPT = 50  # each query's best images kept for the grids (the grids show fewer)
HISTOGRAM_SAMPLE = 3000  # images whose ordered pairs make the similarity histograms


def similarity_scores(embeddings: torch.Tensor, chosen: Optional[PostConfig]) -> tuple[np.ndarray, str]:
    """N×N scores, higher = more alike: the chosen post-processing's negated distance, or cosine."""
    if chosen is not None:
        distance = final_distance(embeddings, chosen)
        return -torch.as_tensor(distance).double().numpy(), "the chosen post-processing (tune-post)"
    return (embeddings @ embeddings.T).double().numpy(), "raw cosine similarity (no tune-post result)"


@dataclass
class Evaluation:
    split: str
    features: FeatureSet
    ranked: np.ndarray  # N x K: each query's best other images, best first (no N x N is kept)
    cosine_sample: np.ndarray  # S x S raw cosine similarities of a random sample of the images
    sample_labels: np.ndarray  # S labels of that sample
    labels: np.ndarray
    metrics: RetrievalMetrics  # the evaluator's result, all-vs-all
    ap_by_identity: dict[str, float]
    scored_with: str

    @property
    def query_ap(self) -> np.ndarray:
        """AP of each query against all other images; NaN when it has no match."""
        return self.metrics.query_ap

    @property
    def balanced_map(self) -> float:
        return self.metrics.mAP_balanced


def _cosine_sample(features: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of every ordered pair of a seeded random sample of at most HISTOGRAM_SAMPLE images."""
    n, size = len(features), HISTOGRAM_SAMPLE
    chosen = np.sort(np.random.default_rng(0).choice(n, size, replace=False)) if n > size else np.arange(n)
    sample = features.numpy()[chosen]
    return sample @ sample.T, features.labels.numpy()[chosen]


def evaluate(split: str, features: FeatureSet, chosen: Optional[PostConfig],
             retrieval: Optional[RetrievalConfig] = None) -> Evaluation:
    """The figures, grids' lists and histogram sample of one labelled set; in top-M form (never
    N x N) when `retrieval` says so for its size (jaguar.retrieval.topm)."""
    features = features.normalized()
    labels = features.labels.numpy()
    retrieval = retrieval or RetrievalConfig()
    if use_topm(retrieval, len(features)):
        lists = final_topm(features, chosen or PostConfig(), int(retrieval.top_m))
        metrics = RankedEvaluator(lists.index, lists.base, features.labels).evaluate(lists.index, lists.reordered)
        ranked = lists.index[:, :RANKED_KEPT].numpy()
        scored_with = (("the chosen post-processing (tune-post)" if chosen is not None else "raw cosine similarity")
                       + f", top-{lists.index.shape[1]} lists; figures {metrics.describe_basis()}")
    else:
        scores, scored_with = similarity_scores(features.embeddings, chosen)
        metrics = retrieval_metrics.evaluate(scores, labels, kind="similarity")
        np.fill_diagonal(scores, -np.inf)
        ranked = np.argsort(-scores, axis=1, kind="stable")[:, :min(RANKED_KEPT, len(features) - 1)]
    ap_by_identity = {features.label_names.get(int(label), str(label)): float(value)
                      for label, value in metrics.per_identity_ap.items()}
    cosine_sample, sample_labels = _cosine_sample(features)
    return Evaluation(split, features, ranked, cosine_sample, sample_labels, labels, metrics, ap_by_identity,
                      scored_with)


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
                            note=f"AP {evaluation.query_ap[q]:.2f}"))
    return rows
