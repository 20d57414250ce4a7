"""The block grid of a sharded extraction (jaguar.retrieval.extract): a split's images cut into
fixed-size blocks, each process's contiguous run of them, and the fingerprint that names a finished
block's part file. Plain Python (no torch), so the command line can show the defaults cheaply."""

from __future__ import annotations

import hashlib
import json


def contiguous_slice(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of `rank`'s share of `count` items: sizes differ by at most one, no padding."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def fingerprint(obj: object) -> str:
    """A short stable hash of what determines a part's content (weights, images, settings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


DEFAULT_BLOCK_SIZE = 1024  # images a part holds: at most this much work is lost when a process is killed


def block_grid(count: int, world_size: int, block_size: int, batch_size: int) -> list[tuple[int, int]]:
    """The blocks [start, end) of a split of `count` images. A block is `block_size` images rounded
    up to whole batches (so the eval loader's batches never straddle two blocks), or fewer when the
    split is too small to give every process one: then ceil(count / world_size), also in whole
    batches. Above world_size x block_size images the grid does not depend on the world size, so
    parts are reused when a re-run has another number of processes."""
    if count == 0:
        return []
    size = min(block_size, -(-count // world_size))
    size = max(batch_size, -(-size // batch_size) * batch_size)
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def rank_blocks(blocks: list[tuple[int, int]], rank: int, world_size: int) -> list[tuple[int, int]]:
    """`rank`'s contiguous run of blocks (contiguous_slice over the block list)."""
    first, last = contiguous_slice(len(blocks), rank, world_size)
    return blocks[first:last]
