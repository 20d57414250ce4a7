"""The report's pictures of retrieval: images of a `jaguar prep` shards folder looked up by file name
(`ImageLookup`, `find_shards`) and the best/worst queries' grid rows (`grid_rows`) from a split's
figures (jaguar.retrieval.split_figures.SplitFigures)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from jaguar.data.shards import ShardSplit, load_manifest
from jaguar.errors import JaguarError
from jaguar.report.plots import GridCell, GridRow
from jaguar.retrieval.split_figures import SplitFigures

logger = logging.getLogger(__name__)


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


def grid_rows(evaluation: SplitFigures, shards: ImageLookup | None, which: str, queries: int,
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
