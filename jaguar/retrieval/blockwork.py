"""The shared machinery of a sharded, resumable stage over a split's images (`jaguar extract`,
`jaguar match`): the fingerprint of the images a stage reads (names, content sha256 and viewpoints,
in order), and a process's plan of blocks: the block grid (jaguar.core.blocks), its own contiguous
run of blocks, those already finished by an earlier attempt (reused) and those left to compute,
with the progress bar of rank 0. A stage supplies what a finished part is; the plan is the same
for every stage, so a resumed run of any of them behaves the same way."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

from jaguar.core.blocks import block_grid, fingerprint, rank_blocks
from jaguar.errors import JaguarError
from jaguar.formats import UNKNOWN_VIEWPOINT
from jaguar.progress import progress_bar

log = logging.getLogger(__name__)
T = TypeVar("T")


def split_viewpoints(split, positions: Sequence[int]) -> Optional[list[str]]:
    """The viewpoint of each image at `positions` of a shard split (a ShardSplit, or a ConcatSplit of
    several), None when no part of it has a viewpoint column; an image without one is unknown."""
    parts = getattr(split, "splits", [split])
    if all(getattr(part, "viewpoints", None) is None for part in parts):
        return None
    flat = [view for part in parts for view in (part.viewpoints or [None] * len(part))]
    return [flat[p] or UNKNOWN_VIEWPOINT for p in positions]


def image_digests(split) -> list[str]:
    """The sha256 of every image of a shard split (a ShardSplit, or a ConcatSplit of several), from
    the manifest: re-prepared images under the same names are other images."""
    return [sample.sha256 for part in getattr(split, "splits", [split])
            for sample in part.manifest.splits[part.split].samples]


def images_fingerprint(split, positions: Sequence[int]) -> str:
    """The fingerprint (16 hex) of the images at `positions` of a shard split, in that order: each
    image's name and content sha256, and the viewpoints when the split has them."""
    digests = image_digests(split)
    views = split_viewpoints(split, positions)
    return fingerprint([[split.filenames[p], digests[p]] for p in positions]
                       + ([["viewpoints", views]] if views is not None else []))


@dataclass
class BlockPlan:
    """One process's share of a split cut into blocks [start, end) of item positions.

    blocks: the whole grid (every process's, in order; what rank 0 merges); mine: this process's
    contiguous run of them; todo: those of `mine` not finished by an earlier attempt."""

    blocks: list[tuple[int, int]]
    mine: list[tuple[int, int]]
    todo: list[tuple[int, int]]

    @property
    def total(self) -> int:
        """Items (images, queries) of this process."""
        return sum(end - start for start, end in self.mine)

    @property
    def left(self) -> int:
        """Items of this process still to compute."""
        return sum(end - start for start, end in self.todo)

    def progress(self, desc: str, unit: str, rank: int, world: int):
        """The progress bar of this process's items (shown by rank 0 only), starting at those reused."""
        return progress_bar(total=self.total, initial=self.total - self.left, unit=unit, enabled=rank == 0,
                            desc=desc + (f" (rank 0 of {world})" if world > 1 else ""))


def plan_blocks(count: int, rank: int, world: int, block_size: int, batch_size: int,
                finished: Callable[[int, int], bool], what: str = "images were extracted") -> BlockPlan:
    """The plan of process `rank` of `world` over `count` items: block_grid(count, world, block_size,
    batch_size), its rank_blocks, and the blocks `finished(start, end)` does not accept as done
    (a stage's check of its part file: present, readable, made under the same fingerprint). Logs how
    many of its items an earlier attempt finished, when any (`what`: the items and their verb)."""
    blocks = block_grid(count, world, block_size, batch_size)
    mine = rank_blocks(blocks, rank, world)
    plan = BlockPlan(blocks, mine, [(start, end) for start, end in mine if not finished(start, end)])
    if plan.left < plan.total:
        log.info("rank %d: %d of its %d %s by an earlier attempt; %d to go",
                 rank, plan.total - plan.left, plan.total, what, plan.left)
    return plan


def finished_part(path: Path, load: Callable[[Path], T], fits: Callable[[T], bool], what: str,
                  newer_than: Optional[int] = None) -> Optional[T]:
    """The part at `path` (read with `load`) when it is complete, `fits` it (holds the block's images or
    queries, made under the block's key) and was written after `newer_than` (ns since the epoch) if
    given; None otherwise. An unreadable or mismatched part is logged, `what` naming it, and recomputed."""
    if not path.is_file() or (newer_than is not None and path.stat().st_mtime_ns <= newer_than):
        return None
    try:
        part = load(path)
    except JaguarError as err:  # every reader's file errors (checksum, truncation) are JaguarErrors
        log.warning("%s %s is unreadable (%s); recomputing it", what, path, err)
        return None
    if not fits(part):
        log.warning("%s %s does not hold this block of these settings; recomputing it", what, path)
        return None
    return part


def reads_back(path: Path, load: Callable[[Path], object]) -> bool:
    """Whether a stage's finished output at `path` reads back whole with `load` (its checksum and
    checks); one that fails is logged and then recomputed by the caller."""
    try:
        load(path)
    except JaguarError as err:
        log.warning("%s fails its check (%s); recomputing it", path, err)
        return False
    return True
