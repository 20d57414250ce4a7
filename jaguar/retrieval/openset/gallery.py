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
