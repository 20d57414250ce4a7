"""The report's pictures of retrieval: images of a `jaguar prep` shards folder looked up by file name
(`ImageLookup`, `find_shards`), the best/worst queries' grid rows (`grid_rows`) from a split's
figures (jaguar.retrieval.split_figures.SplitFigures), and the verified correspondences between those
queries and their top candidates (`match_pictures`, drawn by jaguar.retrieval.local.draw) when the
split has local matches."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from jaguar.data.shards import ShardSplit, load_manifest
from jaguar.errors import JaguarError
from jaguar.report.plots import GridCell, GridRow
from jaguar.retrieval.local.draw import draw_match
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


def _picked(evaluation: SplitFigures, which: str, queries: int) -> list[int]:
    """The `which` ("best" or "worst") queries by AP, preferring distinct identities."""
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
    return picked


def grid_rows(evaluation: SplitFigures, shards: ImageLookup | None, which: str, queries: int,
              top_k: int) -> list[GridRow]:
    """Rows for the `which` ("best" or "worst") queries by AP, preferring distinct identities."""
    picked = _picked(evaluation, which, queries)
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


def match_pictures(evaluation: SplitFigures, shards: ImageLookup | None, which: str, queries: int, top_k: int,
                   per_query: int = 2, height: int = 200) -> list[np.ndarray]:
    """For the queries of `grid_rows(which)`, in that order: one RGB picture each, the verified
    correspondences with the first `per_query` of its top-`top_k` candidates that `jaguar match` kept
    some for, side by side (`draw_match`: both photos, a line between matched spots, the candidate's
    rank, whether the identity is the same and the inlier count); [] without local matches or shards."""
    if evaluation.local is None or shards is None:
        return []
    names, labels = evaluation.features.names, evaluation.labels
    rows = []
    for q in _picked(evaluation, which, queries):
        drawn: list[np.ndarray] = []
        for rank, g in enumerate(evaluation.ranked[q][:top_k].tolist(), start=1):
            found = evaluation.correspondences(q, int(g))
            if found is None or len(drawn) == per_query:
                continue
            query_image, gallery_image = shards.get(names[q]), shards.get(names[g])
            if query_image is None or gallery_image is None:
                continue
            query_xy, gallery_xy, inliers = found
            kind = "same" if labels[q] == labels[g] else "other"
            caption = f"rank {rank}, {kind} identity: {inliers} inliers"
            drawn.append(draw_match(np.asarray(query_image.convert("RGBA")), np.asarray(gallery_image.convert("RGBA")),
                                    query_xy, gallery_xy, height=height, caption=caption))
        if drawn:  # a query's pictures side by side (all are height + caption tall)
            gap = np.full((drawn[0].shape[0], 12, 3), 255, dtype=np.uint8)
            rows.append(np.concatenate([part for picture in drawn for part in (picture, gap)][:-1], axis=1))
    return rows
