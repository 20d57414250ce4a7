"""Train/val split, label remapping, and the train/eval DataLoaders over an in-memory split."""

import numpy as np
import pytest
import torch
from PIL import Image

from jaguar.config import Config, ConfigError
from jaguar.data.loader import (TrainDataset, build_eval_loader, build_train_loader, make_label_map,
                                split_train_val)
from jaguar.data.transforms import build_train_transform

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class FakeSplit:
    """Duck-typed stand-in for jaguar.data.shards.ShardSplit: tiny RGBA images coloured by position."""

    def __init__(self, labels) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.filenames = [f"img_{i:03d}.png" for i in range(len(self.labels))]
        self.identities = [None if v < 0 else f"jag{v}" for v in self.labels]
        self.label_names = {int(v): f"jag{v}" for v in set(self.labels.tolist()) if v >= 0}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        rgba, meta = self.read_rgba(i)
        return Image.fromarray(rgba, "RGBA"), meta

    def read_rgba(self, i: int, reduction=None):  # PNG-like: never decoded reduced
        rgba = np.zeros((12, 16, 4), dtype=np.uint8)
        rgba[..., 0] = i % 256
        rgba[..., 1] = (7 * i) % 256
        rgba[2:10, 3:13, 3] = 255
        meta = {"filename": self.filenames[i], "label": int(self.labels[i]), "alpha_bbox": [3, 2, 13, 10],
                "size": [16, 12]}
        return rgba, meta


def _labels() -> np.ndarray:
    # identities 3, 5, 9, ... with 1..7 images; a few unlabelled (-1)
    sizes = {3: 1, 5: 2, 9: 7, 11: 4, 12: 5, 20: 6, 21: 3, 30: 6}
    labels = np.concatenate([np.full(n, ident) for ident, n in sizes.items()] + [np.full(3, -1)])
    return np.random.default_rng(1).permutation(labels)


def _cfg(**data) -> Config:
    cfg = Config()
    cfg.model.img_size = [16, 16]
    cfg.run.seed = 4
    for key, value in {"num_workers": 0, "p_identities": 2, "k_images": 3, "alpha_mode": "random",
                       "rotation": 5.0, "random_erasing": 0.5, "pad": 2, **data}.items():
        setattr(cfg.data, key, value)
    return cfg


def test_stratified_split_keeps_every_identity_in_train_and_validates_those_with_three_images():
    labels = _labels()
    train, val = split_train_val(labels, 0.3, "stratified", seed=0)
    assert len(np.intersect1d(train, val)) == 0
    assert set(np.concatenate([train, val]).tolist()) == set(np.flatnonzero(labels >= 0).tolist())
    assert set(labels[train]) == set(labels[labels >= 0])
    # identity 3 has one image, 5 two: a validation query of theirs would have no match, so both train
    assert set(labels[val]) == set(labels[labels >= 0]) - {3, 5}
    assert sum(labels[val] == 21) == 2  # three images: two validate each other, one trains
    assert sum(labels[val] == 9) == 2  # round(7 * 0.3)
    assert sum(labels[val] == 30) == 2  # round(6 * 0.3)
    again = split_train_val(labels, 0.3, "stratified", seed=0)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    assert not np.array_equal(split_train_val(labels, 0.3, "stratified", seed=1)[1], val)


def test_identity_split_is_disjoint_and_zero_fraction_is_empty():
    labels = _labels()
    train, val = split_train_val(labels, 0.25, "identity", seed=0)
    assert set(labels[train]).isdisjoint(set(labels[val]))
    assert len(set(labels[val])) == 2  # round(8 identities * 0.25)
    assert len(train) + len(val) == int((labels >= 0).sum())
    train, val = split_train_val(labels, 0.0, "identity", seed=0)
    assert len(val) == 0 and len(train) == int((labels >= 0).sum())
    with pytest.raises(ConfigError, match="data.val_split"):
        split_train_val(labels, 0.2, "random", seed=0)


def test_label_map_is_contiguous_and_dataset_rejects_unlabelled():
    assert make_label_map([12, 3, 3, -1, 40]) == {3: 0, 12: 1, 40: 2}
    split = FakeSplit(_labels())
    with pytest.raises(ValueError, match="unlabelled"):
        TrainDataset(split, np.arange(len(split)), build_train_transform(_cfg(), MEAN, STD), 0)


def _batches(loader, count=None):
    out = []
    for i, (images, classes, positions) in enumerate(loader):
        if count is not None and i == count:
            break
        out.append((images, classes, positions))
    return out


def test_train_loader_batches_are_pk_and_identical_for_0_and_2_workers():
    split = FakeSplit(_labels())
    train, _ = split_train_val(split.labels, 0.3, "stratified", seed=0)
    loader = build_train_loader(_cfg(), split, train, rank=0, world_size=1, mean=MEAN, std=STD)
    loader.batch_sampler.set_epoch(1)
    serial = _batches(loader)
    label_map = loader.dataset.label_map
    assert loader.dataset.num_classes == 8 and sorted(label_map.values()) == list(range(8))
    assert len(serial) == len(loader.batch_sampler) >= 1
    for images, classes, positions in serial:
        assert images.shape == (6, 3, 16, 16)
        assert set(positions.tolist()) <= set(train.tolist())
        expected = [label_map[int(split.labels[p])] for p in positions]
        assert classes.tolist() == expected
        assert len(set(classes.tolist())) == 2 and sorted(np.bincount(classes).tolist())[-2:] == [3, 3]

    parallel_loader = build_train_loader(_cfg(num_workers=2), split, train, 0, 1, MEAN, STD)
    parallel_loader.batch_sampler.set_epoch(1)
    parallel = _batches(parallel_loader)
    for (a_img, a_cls, a_pos), (b_img, b_cls, b_pos) in zip(serial, parallel, strict=True):
        assert torch.equal(a_img, b_img) and torch.equal(a_cls, b_cls) and torch.equal(a_pos, b_pos)

    loader.batch_sampler.set_epoch(2)
    assert not torch.equal(_batches(loader, 1)[0][0], serial[0][0])


def test_train_loader_takes_the_run_class_map_and_refuses_unlabelled_positions():
    split = FakeSplit(_labels())
    train, _ = split_train_val(split.labels, 0.3, "stratified", seed=0)
    class_map = {label: 7 - cls for label, cls in make_label_map(split.labels[train]).items()}
    loader = build_train_loader(_cfg(), split, train, 0, 1, MEAN, STD, label_map=class_map)
    assert loader.dataset.label_map == class_map
    _, classes, positions = next(iter(loader))
    assert classes.tolist() == [class_map[int(split.labels[p])] for p in positions]
    unlabelled = np.flatnonzero(split.labels < 0)[:1]
    with pytest.raises(ValueError, match="unlabelled"):
        build_train_loader(_cfg(), split, np.concatenate([train, unlabelled]), 0, 1, MEAN, STD)


def test_train_loader_resume_reproduces_the_remaining_batches():
    split = FakeSplit(_labels())
    train, _ = split_train_val(split.labels, 0.0, "stratified", seed=0)
    cfg = _cfg(p_identities=2, k_images=2)
    loader = build_train_loader(cfg, split, train, 0, 1, MEAN, STD)
    loader.batch_sampler.set_epoch(0)
    full = _batches(loader)
    assert len(full) >= 3
    resumed = build_train_loader(cfg, split, train, 0, 1, MEAN, STD)
    resumed.batch_sampler.load_state_dict({"epoch": 0, "batch": 2})
    tail = _batches(resumed)
    assert len(tail) == len(full) - 2
    for (a_img, _, a_pos), (b_img, _, b_pos) in zip(full[2:], tail, strict=True):
        assert torch.equal(a_img, b_img) and torch.equal(a_pos, b_pos)


def test_shuffle_train_loader_and_eval_loader_order():
    split = FakeSplit(_labels())
    train, val = split_train_val(split.labels, 0.3, "stratified", seed=0)
    cfg = _cfg(sampler="shuffle", batch_size=4)
    ranks = [build_train_loader(cfg, split, train, rank, 2, MEAN, STD) for rank in range(2)]
    seen = [p for loader in ranks for _, _, positions in loader for p in positions.tolist()]
    assert len(seen) == len(set(seen)) == (len(train) // 8) * 8

    eval_loader = build_eval_loader(cfg, split, val[::-1], MEAN, STD, batch_size=3)
    batches = list(eval_loader)
    order = [p for _, positions in batches for p in positions.tolist()]
    assert order == val[::-1].tolist()
    again = torch.cat([images for images, _ in eval_loader])
    assert torch.equal(torch.cat([images for images, _ in batches]), again)  # deterministic


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from jaguar.data.prep import prepare
    from jaguar.data.synth import make_synthetic

    root = tmp_path_factory.mktemp("loader_shards")
    src = make_synthetic(root / "src", identities=4, train_images=24, test_images=4, size=32, workers=1)
    prepare(src, root / "shards", workers=1)
    return root / "shards"


def test_loaders_on_real_shards_with_worker_processes(tiny_shards):
    from jaguar.data.shards import ShardSplit

    split = ShardSplit(tiny_shards, "train")
    train, val = split_train_val(split.labels, 0.2, "stratified", seed=0)
    settings = {"p_identities": 2, "k_images": 2, "crop_to_alpha": True, "alpha_mode": "blur"}
    loaders = [build_train_loader(_cfg(num_workers=workers, **settings), split, train, 0, 1, MEAN, STD)
               for workers in (0, 2)]  # 2 workers: the split and transforms must pickle
    serial, parallel = (_batches(loader) for loader in loaders)
    assert len(serial) == len(train) // 4
    label_map = loaders[0].dataset.label_map
    for (a_img, a_cls, a_pos), (b_img, b_cls, b_pos) in zip(serial, parallel, strict=True):
        assert a_img.shape == (4, 3, 16, 16) and torch.equal(a_img, b_img) and torch.equal(a_pos, b_pos)
        assert a_cls.tolist() == [label_map[int(split.labels[p])] for p in a_pos]
    eval_loader = build_eval_loader(_cfg(**settings), split, val, MEAN, STD, batch_size=2)
    assert [p for _, batch in eval_loader for p in batch.tolist()] == val.tolist()
