"""What the report measures on a labelled feature set: scores under the chosen post-processing,
per-identity and per-query AP, the best/worst queries, and the images to show for them."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jaguar.report.plots import GridCell, GridRow
from jaguar.retrieval.features import FeatureSet

logger = logging.getLogger(__name__)


def read_identity_csv(path: str | Path) -> dict[str, str]:
    """`filename,ground_truth` rows (the challenge's label format) as {filename: identity}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} does not exist (expected a CSV with filename,ground_truth)")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        if not {"filename", "ground_truth"} <= columns:
            raise ValueError(f"labels file {path} needs the columns filename,ground_truth; "
                             f"it has {sorted(columns)}")
        return {row["filename"]: row["ground_truth"] for row in reader}


def attach_labels(features: FeatureSet, identity_by_name: dict[str, str]) -> FeatureSet:
    """A copy of `features` labelled from {filename: identity}, in the features' own label space;
    identities the training set never saw get new label ids after the known ones."""
    label_of = {name: label for label, name in features.label_names.items()}
    label_names = dict(features.label_names)
    labels = features.labels.clone()
    for i, name in enumerate(features.names):
        identity = identity_by_name.get(name)
        if identity is None:
            continue
        if identity not in label_of:
            label_of[identity] = max(label_names, default=-1) + 1
            label_names[label_of[identity]] = identity
        labels[i] = label_of[identity]
    return FeatureSet(list(features.names), features.embeddings, labels, label_names, dict(features.meta))


def load_labelled_test(test_path: Path, test_labels: str | Path | None) -> FeatureSet | None:
    """The test features with labels (from the CSV, or already stored), restricted to the labelled
    images; None when fewer than two are labelled."""
    features = FeatureSet.load(test_path)
    if test_labels:
        identity_by_name = read_identity_csv(test_labels)
        known = [n for n in features.names if n in identity_by_name]
        if not known:
            raise ValueError(f"none of the {len(features)} test images in {test_path} is named in "
                             f"{test_labels}; is it the right labels file?")
        features = attach_labels(features, identity_by_name)
    labelled = [n for n, label in zip(features.names, features.labels.tolist()) if label >= 0]
    return features.select(labelled) if len(labelled) >= 2 else None


def _post_config(chosen: dict[str, Any]):
    from jaguar.retrieval.postprocess import PostConfig

    known = {f.name for f in fields(PostConfig)}
    return PostConfig(**{k: v for k, v in chosen.items() if k in known})


def similarity_scores(embeddings: torch.Tensor, chosen: dict[str, Any] | None) -> tuple[np.ndarray, str]:
    """N×N scores, higher = more alike: the chosen post-processing's negated distance, or cosine."""
    if chosen:
        from jaguar.retrieval.postprocess import final_distance

        distance = final_distance(embeddings, _post_config(chosen))
        return -torch.as_tensor(distance).double().numpy(), "the chosen post-processing (post.json)"
    return (embeddings @ embeddings.T).double().numpy(), "raw cosine similarity (no post.json)"


def query_average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AP of each query against all other images (self excluded); NaN when it has no match."""
    n = len(labels)
    result = np.full(n, np.nan)
    for q in range(n):
        others = np.arange(n) != q
        order = np.argsort(-scores[q, others], kind="stable")
        hits = (labels[others] == labels[q])[order]
        if not hits.any():
            continue
        precision_at_hit = np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)
        result[q] = precision_at_hit.mean()
    return result


@dataclass
class Evaluation:
    split: str
    features: FeatureSet
    scores: np.ndarray  # N×N, higher = more alike
    cosine: np.ndarray  # N×N raw cosine similarities
    labels: np.ndarray
    ap_by_identity: dict[str, float]
    query_ap: np.ndarray
    balanced_map: float
    scored_with: str


def evaluate(split: str, features: FeatureSet, chosen: dict[str, Any] | None) -> Evaluation:
    from jaguar.retrieval.metrics import identity_balanced_map, per_identity_ap

    features = features.normalized()
    labels = features.labels.numpy()
    scores, scored_with = similarity_scores(features.embeddings, chosen)
    ap = per_identity_ap(torch.from_numpy(scores), torch.from_numpy(labels))
    ap_by_identity = {features.label_names.get(int(label), str(label)): float(value)
                      for label, value in ap.items()}
    return Evaluation(split, features, scores, features.numpy() @ features.numpy().T, labels, ap_by_identity,
                      query_average_precision(scores, labels),
                      float(identity_balanced_map(torch.from_numpy(scores), torch.from_numpy(labels))),
                      scored_with)


class ImageLookup:
    """Images of a `jaguar prep` shards folder by file name, over all its splits."""

    def __init__(self, shards_dir: Path):
        from jaguar.data.shards import ShardSplit, load_manifest

        self.shards_dir = shards_dir
        manifest = load_manifest(shards_dir)
        self._splits = {name: ShardSplit(shards_dir, name) for name in manifest["splits"]}
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
    candidates = [Path(setting), run_dir / setting]
    for candidate in candidates:
        if (candidate / "manifest.json").is_file():
            try:
                return ImageLookup(candidate), ""
            except Exception as err:  # the page still renders, with captions only
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
        row_scores = evaluation.scores[q].copy()
        row_scores[q] = -np.inf
        top = np.argsort(-row_scores, kind="stable")[:top_k]
        rows.append(GridRow(cell(q, None),
                            [cell(int(i), bool(evaluation.labels[i] == evaluation.labels[q])) for i in top],
                            note=f"AP {evaluation.query_ap[q]:.2f}"))
    return rows


def ablation_configs(post: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The post-processing settings behind each row of post.json's table (rows may carry their own)."""
    chosen = dict(post.get("chosen") or {})
    configs = {}
    for row in post.get("table") or []:
        name = str(row.get("name", ""))
        if isinstance(row.get("config"), dict):  # what `jaguar tune-post` writes
            configs[name] = dict(row["config"])
            continue
        off = dict(chosen, qe_k=0, dba_k=0, rerank=False, blend=1.0)
        if name == "raw":
            configs[name] = off
        elif name == "+QE":
            configs[name] = dict(off, qe_k=chosen.get("qe_k", 0), qe_alpha=chosen.get("qe_alpha", 0.0),
                                 dba_k=chosen.get("dba_k", 0))
        elif name == "+re-ranking":
            configs[name] = dict(chosen, rerank=True, blend=1.0)
        elif "chosen" in name:
            configs[name] = chosen
    return configs


def test_score_table(features: FeatureSet, post: dict[str, Any]) -> list[dict[str, Any]]:
    """post.json's rows re-scored on labelled test features (identity-balanced mAP)."""
    from jaguar.retrieval.metrics import identity_balanced_map

    features = features.normalized()
    labels = torch.from_numpy(features.labels.numpy())
    rows = []
    for name, config in ablation_configs(post).items():
        scores, _ = similarity_scores(features.embeddings, config)
        rows.append({"name": name, "mAP_balanced": float(identity_balanced_map(torch.from_numpy(scores), labels))})
    return rows
