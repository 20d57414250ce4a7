"""Rank-aware, resumable batch samplers: identity-balanced PK batches and plain shuffled batches.

Every rank computes the same global plan for an epoch from (seed, epoch) alone and takes its own
slice of it, so all ranks yield the same number of batches (no DDP hang) and a run can resume at
any batch of any epoch by recomputing the plan and skipping the batches already trained on.

Position semantics: `len(sampler)` is the full epoch; `remaining()` is what the next iteration
will yield after `set_position(epoch, batch)`. The DataLoader pre-fetches batch indices ahead of
the training loop, so the sampler cannot know how many batches were trained on: the trainer
passes its own count to `state_dict(batches_done)` (with num_workers=0 the sampler's own count
of yielded batches is exact and is used when no count is given).
"""

from __future__ import annotations

from collections import deque
from typing import Iterator, Sequence

import numpy as np

from jaguar.config import ConfigError

# A sample key carries what a dataset needs to derive its augmentation RNG:
# (index into the dataset, epoch, batch position within the epoch, slot within the batch).
SampleKey = tuple[int, int, int, int]


class _EpochBatchSampler:
    """Epoch and resume-position bookkeeping shared by the samplers; subclasses build the plan."""

    def __init__(self, rank: int, world_size: int, seed: int, yield_keys: bool) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"sampler rank {rank} is not in [0, world_size={world_size})")
        self.rank = rank
        self.world_size = world_size
        self.seed = int(seed)
        self.yield_keys = yield_keys
        self.epoch = 0
        self.start_batch = 0
        self._yielded = 0

    def _epoch_rng(self) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))

    def _rank_batches(self) -> list[list[int]]:  # this rank's batches of the current epoch
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def remaining(self) -> int:
        """Batches the next iteration yields (the epoch minus the resume position)."""
        return len(self) - self.start_batch

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch."""
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, batch: int) -> None:
        """Make the next iteration yield batches `batch`, `batch`+1, ... of `epoch`."""
        if not 0 <= batch <= len(self):
            raise ValueError(f"sampler position batch={batch} is outside epoch of {len(self)} batches; "
                             f"the checkpoint was written with a different data config")
        self.epoch = int(epoch)
        self.start_batch = int(batch)
        self._yielded = 0

    def state_dict(self, batches_done: int | None = None) -> dict:
        """Position to resume from; `batches_done` = batches of this iteration the trainer used."""
        done = self._yielded if batches_done is None else int(batches_done)
        return {"epoch": self.epoch, "batch": self.start_batch + done}

    def load_state_dict(self, state: dict) -> None:
        self.set_position(int(state["epoch"]), int(state["batch"]))

    def __iter__(self) -> Iterator[list]:
        batches = self._rank_batches()
        self._yielded = 0
        for position in range(self.start_batch, len(batches)):
            batch = batches[position]
            # Counted before the yield: a batch handed out counts as consumed (exact for num_workers=0).
            self._yielded += 1
            if self.yield_keys:
                yield [(int(index), self.epoch, position, slot) for slot, index in enumerate(batch)]
            else:
                yield [int(index) for index in batch]


class PKBatchSampler(_EpochBatchSampler):
    """Batches of P identities x K images for this rank; each step's P*world identities are distinct.

    Unlabelled samples (label < 0) are never drawn. Identities are visited in a per-epoch shuffled
    order, reshuffled when exhausted; an identity's images are drawn without replacement until
    used up, and with replacement only when it has fewer than K images. A batch lists each
    identity's K images consecutively. The epoch has `batches_per_epoch` batches, by default
    (labelled images) // (P*K*world_size) rounded down to whole optimizer steps of `accumulation`
    batches (at least one step), the same on every rank.
    """

    def __init__(self, labels: Sequence[int], p: int, k: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, batches_per_epoch: int | None = None, yield_keys: bool = False,
                 accumulation: int = 1) -> None:
        super().__init__(rank, world_size, seed, yield_keys)
        labels = np.asarray(labels, dtype=np.int64)
        identities = np.unique(labels[labels >= 0])
        if p * world_size > len(identities):
            raise ConfigError(
                f"config key 'data.p_identities'={p} x world_size={world_size} needs {p * world_size} "
                f"distinct identities per step but the training set has only {len(identities)} labelled "
                f"identities; lower data.p_identities to at most {len(identities) // world_size or 1} "
                f"or use fewer processes")
        self.p = p
        self.k = k
        self.identities = identities
        self.images_of = {int(ident): np.flatnonzero(labels == ident) for ident in identities}
        labelled = int((labels >= 0).sum())
        if accumulation < 1:
            raise ValueError(f"accumulation must be >= 1, got {accumulation}")
        # An epoch holds whole optimizer steps, so that checkpoints fall on step boundaries.
        default_length = max(1, labelled // (p * k * world_size) // accumulation) * accumulation
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        self.batches_per_epoch = default_length if batches_per_epoch is None else int(batches_per_epoch)
        self._plan_cache: tuple[int, list[list[int]]] | None = None

    @property
    def batch_size(self) -> int:
        """Samples per batch on this rank (P x K)."""
        return self.p * self.k

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _rank_batches(self) -> list[list[int]]:
        if self._plan_cache is None or self._plan_cache[0] != self.epoch:
            self._plan_cache = (self.epoch, self._build_plan())
        return self._plan_cache[1]

    def _build_plan(self) -> list[list[int]]:
        rng = self._epoch_rng()
        identity_queue: deque[int] = deque()
        image_queues: dict[int, deque[int]] = {int(i): deque() for i in self.identities}
        per_step = self.p * self.world_size
        batches = []
        for _ in range(self.batches_per_epoch):
            # Every rank draws the whole step so that all ranks agree on who gets which identities.
            step_identities = _draw_distinct(identity_queue, per_step, lambda: rng.permutation(self.identities))
            mine = step_identities[self.rank * self.p:(self.rank + 1) * self.p]
            batch: list[int] = []
            for ident in step_identities:
                images = self._draw_images(ident, image_queues[ident], rng)
                if ident in mine:
                    batch.extend(images)
            batches.append(batch)
        return batches

    def _draw_images(self, ident: int, queue: deque[int], rng: np.random.Generator) -> list[int]:
        images = self.images_of[ident]
        if len(images) < self.k:
            # Too few images: all of them once, the rest drawn with replacement.
            extra = rng.choice(images, size=self.k - len(images), replace=True)
            return [int(i) for i in rng.permutation(np.concatenate([images, extra]))]
        return _draw_distinct(queue, self.k, lambda: rng.permutation(images))


def _draw_distinct(queue: deque[int], count: int, refill) -> list[int]:
    """Take `count` distinct items from the front of `queue`, refilling it with `refill()` (a
    permutation of the whole population) when empty; items skipped as duplicates stay in front."""
    chosen: list[int] = []
    seen: set[int] = set()
    skipped: list[int] = []
    while len(chosen) < count:
        if not queue:
            queue.extend(int(x) for x in refill())
        item = queue.popleft()
        if item in seen:
            skipped.append(item)
        else:
            seen.add(item)
            chosen.append(item)
    queue.extendleft(reversed(skipped))
    return chosen


class ShuffleBatchSampler(_EpochBatchSampler):
    """Shuffled batches of `batch_size` for this rank; one permutation per (seed, epoch).

    Step s gives rank r the r-th contiguous chunk of that step's batch_size*world_size samples.
    An epoch holds whole optimizer steps of `accumulation` batches: drop_last=True drops the
    incomplete final step; drop_last=False completes it by wrapping around the permutation, so
    every rank still yields equal, full batches.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, drop_last: bool = True, yield_keys: bool = False,
                 accumulation: int = 1) -> None:
        super().__init__(rank, world_size, seed, yield_keys)
        if accumulation < 1:
            raise ValueError(f"accumulation must be >= 1, got {accumulation}")
        per_step = batch_size * world_size * accumulation  # samples per optimizer step
        if drop_last and num_samples < per_step:
            raise ConfigError(
                f"config key 'data.batch_size'={batch_size} x world_size={world_size} x train.grad_accum="
                f"{accumulation} exceeds the {num_samples} training samples, so an epoch would be empty; "
                f"lower data.batch_size or train.grad_accum")
        if num_samples < 1:
            raise ValueError("ShuffleBatchSampler needs at least one sample")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.drop_last = drop_last
        steps = num_samples // per_step if drop_last else -(-num_samples // per_step)
        self._length = steps * accumulation

    def __len__(self) -> int:
        return self._length

    def _rank_batches(self) -> list[list[int]]:
        order = self._epoch_rng().permutation(self.num_samples)
        per_batch = self.batch_size * self.world_size  # one batch on every rank
        needed = self._length * per_batch
        if needed > len(order):
            order = np.resize(order, needed)  # wraps around the permutation
        batches = []
        for position in range(self._length):
            start = position * per_batch + self.rank * self.batch_size
            batches.append(order[start:start + self.batch_size].tolist())
        return batches
