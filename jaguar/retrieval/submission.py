"""Challenge submissions: the pair list (test.csv), the distance -> [0, 1] similarity map, and
`row_id,similarity` files validated before they are written and when they are read back."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence, Union

import numpy as np
import torch

from jaguar.errors import JaguarError
from jaguar.io import atomic_write_text

if TYPE_CHECKING:
    from jaguar.retrieval.features import FeatureSet
    from jaguar.retrieval.postprocess import PostConfig

PAIR_COLUMNS = ("row_id", "query_image", "gallery_image")
SUBMISSION_COLUMNS = ("row_id", "similarity")


class SubmissionError(JaguarError, ValueError):
    """A pair list, label file or submission that cannot be used; the message names file and rows."""


def _examples(items: Sequence, limit: int = 5) -> str:
    shown = ", ".join(str(item) for item in list(items)[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _read_csv(path: Union[str, Path], columns: Sequence[str], what: str) -> list[tuple[int, dict[str, str]]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in (reader.fieldnames or [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise SubmissionError(f"{path}: header {','.join(header) or '(empty file)'} lacks column(s) "
                                  f"{', '.join(missing)}; expected a header {','.join(columns)}")
        reader.fieldnames = header
        rows = []
        for line, record in enumerate(reader, start=2):
            empty = [c for c in columns if not (record.get(c) or "").strip()]
            if empty:
                raise SubmissionError(f"{path} line {line}: empty or missing {', '.join(empty)}")
            rows.append((line, {c: record[c].strip() for c in columns}))
    if not rows:
        raise SubmissionError(f"{path} has a header but no rows")
    return rows


def read_pairs(test_csv: Union[str, Path]) -> tuple[list[str], list[str], list[str]]:
    """(row_ids, query_names, gallery_names) from a `row_id,query_image,gallery_image` file."""
    rows = _read_csv(test_csv, PAIR_COLUMNS, "pair list")
    seen: dict[str, int] = {}
    duplicates = []
    for line, record in rows:
        if record["row_id"] in seen:
            duplicates.append(f"{record['row_id']} (lines {seen[record['row_id']]} and {line})")
        seen.setdefault(record["row_id"], line)
    if duplicates:
        raise SubmissionError(f"{test_csv}: duplicate row_id {_examples(duplicates)}")
    return ([r["row_id"] for _, r in rows], [r["query_image"] for _, r in rows],
            [r["gallery_image"] for _, r in rows])


def similarity_from_distance(dist: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    """Map distances to [0, 1] by sim = (d_max - d) / (d_max - d_min) over all given values, in
    float64: affine and decreasing, so every query's ranking is kept, no two distinct distances
    collide (float64 has ample room for float32 inputs), the smallest lands on 1 and the largest
    on 0. Nothing is clipped. All-equal input gives 0.5 everywhere."""
    values = dist.detach().cpu().double().numpy() if isinstance(dist, torch.Tensor) else np.asarray(dist, np.float64)
    if not np.isfinite(values).all():
        bad = np.argwhere(~np.isfinite(values))[:5].tolist()
        raise SubmissionError(f"distance has NaN or infinite values at {bad}; fix the features first")
    if values.size == 0:
        return values
    low, high = float(values.min()), float(values.max())
    if high == low:
        return np.full_like(values, 0.5)
    return (high - values) / (high - low)


@dataclass
class Submission:
    row_ids: list[str]
    similarity: np.ndarray  # float64, one per row_id


def _check_values(row_ids: Sequence[str], values: np.ndarray, where: str) -> None:
    nan_rows = [row_ids[i] for i in np.flatnonzero(~np.isfinite(values))]
    if nan_rows:
        raise SubmissionError(f"{where}: NaN or infinite similarity at row_id {_examples(nan_rows)}")
    outside = [f"{row_ids[i]}={values[i]:g}" for i in np.flatnonzero((values < 0) | (values > 1))]
    if outside:
        raise SubmissionError(f"{where}: similarity outside [0, 1] at row_id {_examples(outside)}")


def check_rows(row_ids: Sequence[str], expected: Iterable[str], where: str) -> None:
    """Every expected row_id exactly once and nothing else; errors name the rows."""
    counts: dict[str, int] = {}
    for row_id in row_ids:
        counts[row_id] = counts.get(row_id, 0) + 1
    duplicates = [r for r, c in counts.items() if c > 1]
    if duplicates:
        raise SubmissionError(f"{where}: duplicate row_id {_examples(duplicates)}")
    expected_list = list(expected)
    expected_set = set(expected_list)
    missing = [r for r in expected_list if r not in counts]
    if missing:
        raise SubmissionError(f"{where}: {len(missing)} row_id(s) of the pair list are missing: {_examples(missing)}")
    unknown = [r for r in row_ids if r not in expected_set]
    if unknown:
        raise SubmissionError(f"{where}: {len(unknown)} row_id(s) not in the pair list: {_examples(unknown)}")


def write_submission(path: Union[str, Path], row_ids: Sequence[str], similarities: Sequence[float],
                     expected_row_ids: Iterable[str] | None = None) -> None:
    """Validate, then write `row_id,similarity` atomically, rows in the given order: each row_id
    once (and, with expected_row_ids, exactly those), every value finite and in [0, 1]."""
    values = np.asarray(similarities, dtype=np.float64).reshape(-1)
    if values.shape[0] != len(row_ids):
        raise SubmissionError(f"{path}: {len(row_ids)} row_ids but {values.shape[0]} similarities")
    check_rows(row_ids, row_ids if expected_row_ids is None else expected_row_ids, str(path))
    _check_values(row_ids, values, str(path))
    # repr keeps every float64 digit, so distinct similarities stay distinct in the file.
    lines = [",".join(SUBMISSION_COLUMNS)] + [f"{r},{float(v)!r}" for r, v in zip(row_ids, values)]
    atomic_write_text(Path(path), "\n".join(lines) + "\n")


def read_submission(path: Union[str, Path]) -> Submission:
    """A `row_id,similarity` file with every value parsed and checked (numbers, finite, [0, 1])."""
    rows = _read_csv(path, SUBMISSION_COLUMNS, "submission")
    row_ids, values, not_numbers = [], [], []
    for line, record in rows:
        try:
            value = float(record["similarity"])
        except ValueError:
            not_numbers.append(f"{record['row_id']} (line {line}: {record['similarity']!r})")
            value = math.nan
        row_ids.append(record["row_id"])
        values.append(value)
    if not_numbers:
        raise SubmissionError(f"{path}: similarity is not a number at row_id {_examples(not_numbers)}")
    similarity = np.asarray(values, dtype=np.float64)
    _check_values(row_ids, similarity, str(path))
    return Submission(row_ids, similarity)


def read_labels(labels_csv: Union[str, Path]) -> dict[str, str]:
    """filename -> identity from a `filename,ground_truth` file."""
    rows = _read_csv(labels_csv, ("filename", "ground_truth"), "label file")
    labels: dict[str, str] = {}
    for line, record in rows:
        name = record["filename"]
        if name in labels and labels[name] != record["ground_truth"]:
            raise SubmissionError(f"{labels_csv} line {line}: {name} has two identities "
                                  f"({labels[name]} and {record['ground_truth']})")
        labels[name] = record["ground_truth"]
    return labels


def pair_similarity_matrix(query_names: Sequence[str], gallery_names: Sequence[str],
                           similarity: np.ndarray) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(images, N x N similarity, N x N candidate mask) from pair rows: each query ranks only the
    gallery images it was paired with."""
    images = list(dict.fromkeys(list(query_names) + list(gallery_names)))
    position = {name: i for i, name in enumerate(images)}
    q = torch.tensor([position[name] for name in query_names])
    g = torch.tensor([position[name] for name in gallery_names])
    matrix = torch.full((len(images), len(images)), float("-inf"), dtype=torch.float64)
    candidates = torch.zeros((len(images), len(images)), dtype=torch.bool)
    matrix[q, g] = torch.as_tensor(similarity, dtype=torch.float64)
    candidates[q, g] = True
    return images, matrix, candidates


def pair_similarities(features: "FeatureSet", row_ids: Sequence[str], query_names: Sequence[str],
                      gallery_names: Sequence[str], post: "PostConfig") -> np.ndarray:
    """Similarity in [0, 1] for every pair row: the post-processed all-vs-all distance over the
    images of the pair list (in feature-file order), mapped by similarity_from_distance over the
    requested pairs. Images without features are an error naming the rows."""
    from jaguar.retrieval.postprocess import final_distance

    known = set(features.names)
    unknown = [f"{r} ({q if q not in known else g})" for r, q, g in zip(row_ids, query_names, gallery_names)
               if q not in known or g not in known]
    if unknown:
        raise SubmissionError(f"{len(unknown)} pair row(s) name images with no features: {_examples(unknown)}")
    wanted = set(query_names) | set(gallery_names)
    subset = features.select([name for name in features.names if name in wanted])
    position = {name: i for i, name in enumerate(subset.names)}
    distance = final_distance(subset, post)
    q = torch.tensor([position[name] for name in query_names])
    g = torch.tensor([position[name] for name in gallery_names])
    return similarity_from_distance(distance[q, g])
