"""PK and shuffle batch samplers: batch composition, rank disjointness, determinism, resume."""

from collections import Counter

import numpy as np
import pytest

from jaguar.config import ConfigError
from jaguar.data.sampler import PKBatchSampler, ShuffleBatchSampler


def _labels() -> np.ndarray:
    # 10 identities with 2..11 images each, plus unlabelled samples that must never be drawn.
    labels = np.concatenate([np.full(n, ident) for ident, n in enumerate(range(2, 12))] + [np.full(5, -1)])
    return np.random.default_rng(0).permutation(labels)


def _epoch(labels, epoch=0, **kwargs) -> list[list[list[int]]]:
    """The batches of every rank for one epoch: result[rank][step] = batch."""
    world = kwargs.pop("world_size", 1)
    out = []
    for rank in range(world):
        sampler = PKBatchSampler(labels, rank=rank, world_size=world, **kwargs)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def test_pk_batches_are_p_identities_times_k_images_and_disjoint_across_ranks():
    labels = _labels()
    per_rank = _epoch(labels, p=3, k=4, world_size=2, seed=1)
    assert PKBatchSampler(labels, p=3, k=4).batch_size == 12
    assert len(per_rank[0]) == len(per_rank[1]) == len(labels[labels >= 0]) // (3 * 4 * 2)
    for step in range(len(per_rank[0])):
        seen = []
        for rank in range(2):
            batch = per_rank[rank][step]
            assert len(batch) == 12
            groups = [labels[batch[i * 4:(i + 1) * 4]] for i in range(3)]
            for group in groups:  # K consecutive images of one identity
                assert len(set(group.tolist())) == 1 and group[0] >= 0
            seen.extend(int(group[0]) for group in groups)
        assert len(seen) == len(set(seen)) == 6


def test_pk_equal_length_on_every_rank_even_with_uneven_world():
    labels = _labels()
    per_rank = _epoch(labels, p=2, k=2, world_size=3, seed=0, batches_per_epoch=7)
    assert [len(batches) for batches in per_rank] == [7, 7, 7]


def test_pk_deterministic_per_seed_and_epoch_and_epochs_differ():
    labels = _labels()
    first = _epoch(labels, epoch=3, p=2, k=4, seed=5)
    again = _epoch(labels, epoch=3, p=2, k=4, seed=5)
    other_epoch = _epoch(labels, epoch=4, p=2, k=4, seed=5)
    other_seed = _epoch(labels, epoch=3, p=2, k=4, seed=6)
    assert first == again
    assert first != other_epoch
    assert first != other_seed


def test_pk_small_identities_sampled_with_replacement_large_ones_without():
    labels = _labels()
    sampler = PKBatchSampler(labels, p=4, k=6, seed=0, batches_per_epoch=30)
    small_repeats = 0
    for batch in sampler:
        for i in range(4):
            group = batch[i * 6:(i + 1) * 6]
            n_images = int((labels == labels[group[0]]).sum())
            if n_images >= 6:
                assert len(set(group)) == 6
            else:
                assert set(group) == set(np.flatnonzero(labels == labels[group[0]]).tolist())
                small_repeats += 1
    assert small_repeats > 0


def test_pk_visits_every_identity_and_cycles_images_fairly():
    labels = _labels()
    sampler = PKBatchSampler(labels, p=2, k=2, seed=3, batches_per_epoch=25)  # 50 identity draws
    drawn = Counter(int(labels[batch[i * 2]]) for batch in sampler for i in range(2))
    assert set(drawn) == set(range(10))
    assert max(drawn.values()) - min(drawn.values()) <= 1  # walks a shuffled order: 5 visits each
    # The largest identity (11 images) used 5 x 2 = 10 draws: without replacement, all distinct.
    big = int(np.bincount(labels[labels >= 0]).argmax())
    picks = [i for batch in sampler for i in batch if labels[i] == big]
    assert len(picks) == 10 and len(set(picks)) == 10


def test_pk_resume_yields_the_tail_of_an_uninterrupted_epoch():
    labels = _labels()
    full = PKBatchSampler(labels, p=2, k=3, rank=1, world_size=2, seed=9, batches_per_epoch=8)
    full.set_epoch(2)
    uninterrupted = list(full)

    interrupted = PKBatchSampler(labels, p=2, k=3, rank=1, world_size=2, seed=9, batches_per_epoch=8)
    interrupted.set_epoch(2)
    iterator = iter(interrupted)
    head = [next(iterator) for _ in range(3)]
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "batch": 3}

    resumed = PKBatchSampler(labels, p=2, k=3, rank=1, world_size=2, seed=9, batches_per_epoch=8)
    resumed.load_state_dict(state)
    assert len(resumed) == 8 and resumed.remaining() == 5
    assert head + list(resumed) == uninterrupted
    # The trainer's own count overrides the sampler's (the DataLoader pre-fetches indices).
    assert interrupted.state_dict(batches_done=2) == {"epoch": 2, "batch": 2}


def test_pk_keys_carry_epoch_batch_and_slot():
    labels = _labels()
    sampler = PKBatchSampler(labels, p=2, k=2, seed=0, batches_per_epoch=3, yield_keys=True)
    sampler.set_position(4, 1)
    batches = list(sampler)
    assert [b[0][1:3] for b in batches] == [(4, 1), (4, 2)]
    assert [key[3] for key in batches[0]] == [0, 1, 2, 3]


def test_pk_error_names_the_config_key_when_too_few_identities():
    labels = _labels()
    with pytest.raises(ConfigError, match="data.p_identities"):
        PKBatchSampler(labels, p=6, k=2, world_size=2)  # 12 > 10 labelled identities


def test_shuffle_sampler_partitions_each_step_and_resumes():
    world, size = 3, 4
    per_rank = []
    for rank in range(world):
        sampler = ShuffleBatchSampler(50, size, rank, world, seed=2)
        sampler.set_epoch(1)
        per_rank.append(list(sampler))
    assert [len(b) for b in per_rank] == [50 // 12] * 3
    everything = [i for batches in per_rank for batch in batches for i in batch]
    assert len(everything) == len(set(everything)) == 4 * 12  # no index on two ranks
    assert all(len(batch) == size for batches in per_rank for batch in batches)

    tail = ShuffleBatchSampler(50, size, 2, world, seed=2)
    tail.set_position(1, 3)
    assert list(tail) == per_rank[2][3:]

    padded = ShuffleBatchSampler(50, size, 0, world, seed=2, drop_last=False)
    assert len(padded) == 5 and all(len(batch) == size for batch in padded)
    with pytest.raises(ConfigError, match="data.batch_size"):
        ShuffleBatchSampler(10, 4, 0, 3)


@pytest.mark.parametrize("accumulation", [1, 2, 3, 7])
def test_epochs_are_whole_optimizer_steps_of_the_accumulation(accumulation):
    labels = _labels()  # 65 labelled images
    plain = len(PKBatchSampler(labels, p=2, k=2, seed=0))  # 16 batches
    pk = PKBatchSampler(labels, p=2, k=2, seed=0, accumulation=accumulation)
    assert len(pk) % accumulation == 0 and len(pk) == max(1, plain // accumulation) * accumulation
    assert len(list(pk)) == len(pk)
    # fewer batches than one step: the PK sampler draws one whole step anyway (identities recycle)
    assert len(PKBatchSampler(labels, p=4, k=20, seed=0, accumulation=accumulation)) == accumulation
    shuffle = ShuffleBatchSampler(65, 4, seed=0, accumulation=accumulation)
    assert len(shuffle) % accumulation == 0 and len(shuffle) == (65 // (4 * accumulation)) * accumulation
    assert all(len(batch) == 4 for batch in shuffle)


def test_shuffle_sampler_refuses_an_epoch_shorter_than_one_optimizer_step():
    with pytest.raises(ConfigError, match="train.grad_accum=4"):
        ShuffleBatchSampler(30, 4, world_size=2, accumulation=4)
