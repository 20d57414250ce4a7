"""Which individual each gallery row belongs to, from the labels of the run's training features and
of its enrolled individuals: shared by the gallery `jaguar identify` searches
(`jaguar.retrieval.openset.identify.gallery_from_features`) and the `jaguar gallery` listing, which reads
only the feature files' labels and so runs without torch."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from jaguar.errors import MissingInputError
from jaguar.run import RunDir


def require_trained_run(run: RunDir) -> RunDir:
    """Raise MissingInputError when `run` is no trained run folder (no folder, or no config)."""
    run.require()
    if not run.has_config():
        raise MissingInputError(f"{run.path} is not a trained run folder (no {run.config_path.name}); give the "
                                f"run.dir of a `jaguar train` run")
    return run


def individual_rows(train_labels: Sequence[int], train_label_names: dict[int, str],
                    enrolled_labels: Optional[Sequence[int]] = None,
                    enrolled_label_names: Optional[dict[int, str]] = None) -> tuple[list[str], list[int], set[str]]:
    """(individuals, row -> index into individuals, enrolled individuals' names) of the labelled
    training rows (label >= 0; named by train_label_names, or the label itself) followed by the
    enrolled rows (named by enrolled_label_names); individuals in order of first appearance."""
    individuals: list[str] = []
    index_of: dict[str, int] = {}

    def index(name: str) -> int:
        if name not in index_of:
            index_of[name] = len(individuals)
            individuals.append(name)
        return index_of[name]

    rows = [index(train_label_names.get(label, str(label))) for label in train_labels if label >= 0]
    enrolled: set[str] = set()
    for label in enrolled_labels if enrolled_labels is not None else []:
        enrolled.add(enrolled_label_names[label])
        rows.append(index(enrolled_label_names[label]))
    return individuals, rows, enrolled


def gallery_listing(run: RunDir) -> list[tuple[str, int, str]]:
    """`jaguar gallery`: (individual, images, "training" or "enrolled") for each individual, in
    gallery order. Reads the labels of the run's feature files (extracting the training features
    first when the run has none, announced, as `jaguar identify` does)."""
    from jaguar.core.features import load_identities

    require_trained_run(run)
    if not run.has_features("train"):
        from jaguar.retrieval.extract import require_features

        require_features(run, "train", "jaguar gallery")
    train = load_identities(run.features_path("train"), f"run `jaguar extract {run.path} --split train --force`")
    enrolled = (load_identities(run.enrolled_path, "restore it, or remove it and enrol again")
                if run.has_enrolled() else (None, None))
    individuals, rows, enrolled_names = individual_rows(train[0].tolist(), train[1],
                                                        None if enrolled[0] is None else enrolled[0].tolist(),
                                                        enrolled[1])
    counts = np.bincount(np.asarray(rows, dtype=np.int64), minlength=len(individuals)).tolist()
    return [(name, count, "enrolled" if name in enrolled_names else "training")
            for name, count in zip(individuals, counts)]


class IndividualGrouping:
    """The gallery's columns grouped by individual (`individual`: (N,) int, each row's individual
    among `count`): `order` sorts gallery rows by individual (stable), `present` the individuals
    with images, `starts` their first grouped column. Used to aggregate a photo's image scores per
    individual without a loop over individuals (jaguar.retrieval.openset.identify.individual_scores)."""

    def __init__(self, individual: np.ndarray, count: int) -> None:
        counts = np.bincount(individual, minlength=count)
        self.present = np.nonzero(counts)[0]
        self.starts = (np.cumsum(counts) - counts)[self.present]
        self.counts = counts[self.present]
        self.order = np.argsort(individual, kind="stable")
        self.segment = np.repeat(np.arange(self.present.size), self.counts)  # grouped column -> its individual

    def reduce(self, similarity: np.ndarray, top_n: int) -> np.ndarray:
        """(rows, present individuals) max (top_n 1) or mean of the top_n best of each individual's
        columns of `similarity` (rows, grouped columns), which is overwritten."""
        best = np.maximum.reduceat(similarity, self.starts, axis=1)
        if top_n == 1:
            return best
        wanted = np.minimum(self.counts, top_n)
        total = np.zeros_like(best)
        needed = np.broadcast_to(wanted, best.shape).copy()
        for round_ in range(top_n):
            at_best = similarity == best[:, self.segment]
            taken = np.minimum(np.add.reduceat(at_best, self.starts, axis=1, dtype=np.int64), needed)
            total += np.where(taken > 0, best, 0.0).astype(best.dtype) * taken
            needed -= taken
            if round_ == top_n - 1 or not needed.any():
                break
            similarity[at_best] = -np.inf
            best = np.maximum.reduceat(similarity, self.starts, axis=1)
        return total / wanted.astype(best.dtype)


def aggregate_by_individual(image_scores: np.ndarray, individual: np.ndarray, count: int, top_n: int) -> np.ndarray:
    """(Q, count) max (top_n 1) or mean of the top_n best of each individual's image scores
    (image_scores: (Q, N) in gallery row order; individual: (N,) each row's individual); -inf for an
    individual without images; the dtype of `image_scores`."""
    grouping = IndividualGrouping(np.asarray(individual, dtype=np.int64), count)
    scores = np.full((image_scores.shape[0], count), -np.inf, dtype=image_scores.dtype)
    if image_scores.shape[0]:
        scores[:, grouping.present] = grouping.reduce(np.array(image_scores[:, grouping.order]), top_n)
    return scores
