"""The run's training data (RunSplit): built once from the config, saved in RUN/split.json, and read
back from there by a resumed run."""

import numpy as np
import pytest

from jaguar.config import ConfigError, load_config
from jaguar.run import RunDir
from jaguar.train import checkpoint as ckpt
from jaguar.train.data import RunSplit, build_run_split, open_train_split


def _cfg(shards_dir, run_dir, *extra):
    return load_config(None, [f"data.shards={shards_dir}", f"run.dir={run_dir}", "model.backbone=test_vit",
                              "model.img_size=[32,32]", "data.num_workers=0", "data.p_identities=2",
                              "data.k_images=2", "data.val_fraction=0.2", *extra])


def test_split_round_trips_through_the_run_directory(shards_dir, tmp_path):
    cfg = _cfg(shards_dir, tmp_path / "run")
    split = open_train_split(cfg)
    built = build_run_split(cfg, split)
    labels = np.asarray(split.labels)
    assert (labels[built.train_indices] >= 0).all() and len(np.intersect1d(built.train_indices, built.val_indices)) == 0
    assert sorted(built.class_of_label.values()) == list(range(built.num_classes))
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.save_split(built.to_record(split))
    loaded = RunSplit.from_record(run.load_split(), split, str(run.split_path))
    assert np.array_equal(loaded.train_indices, built.train_indices)
    assert np.array_equal(loaded.val_indices, built.val_indices)
    assert loaded.class_of_label == built.class_of_label

    record = built.to_record(split)
    record.val = [*record.val, "not-in-the-shards.png"]
    with pytest.raises(ConfigError, match="not-in-the-shards.png"):
        RunSplit.from_record(record, split, "RUN/split.json")


def test_a_resumed_run_trains_on_its_saved_split_not_a_rebuilt_one(shards_dir, tmp_path):
    from jaguar.train.trainer import Trainer

    run = RunDir(tmp_path / "run")
    cfg = _cfg(shards_dir, run.path)
    split = open_train_split(cfg)
    saved = build_run_split(cfg, split)
    # the run started with one more image in validation than today's config would give it
    moved = saved.train_indices[0]
    saved = RunSplit(saved.train_indices[1:], np.sort(np.append(saved.val_indices, moved)), saved.class_of_label)
    run.path.mkdir()
    run.save_split(saved.to_record(split))
    (run.checkpoints_dir / "step-000001").mkdir(parents=True)
    (run.checkpoints_dir / "step-000001" / ckpt.STATE_FILE).write_text("{}")
    trainer = Trainer(cfg)
    assert np.array_equal(trainer.run_split.val_indices, saved.val_indices)
    assert moved not in set(trainer.loader.dataset.indices.tolist())
    trainer.lock.release()  # one writer a run folder: the first trainer gives it up for the next
    # without a checkpoint to resume, the split is built from the config again and saved
    fresh = Trainer(_cfg(shards_dir, run.path, "train.resume=none"))
    assert moved in set(fresh.run_split.train_indices.tolist())
    assert run.load_split().train == fresh.run_split.to_record(split).train


def test_every_validation_image_of_a_run_has_a_match_and_two_photo_identities_train(shards_dir, tmp_path):
    cfg = _cfg(shards_dir, tmp_path / "run")
    split = open_train_split(cfg)
    built = build_run_split(cfg, split)
    labels = np.asarray(split.labels)
    val_counts = np.bincount(labels[built.val_indices], minlength=labels.max() + 1)
    assert len(built.val_indices) > 0 and (val_counts != 1).all()  # no validation query without a match
    few = [label for label, count in enumerate(np.bincount(labels[labels >= 0])) if 0 < count < 3]
    assert few  # the synthetic set has an identity with two photos: it trains whole
    assert not set(few) & set(labels[built.val_indices].tolist())
    assert set(labels[built.train_indices].tolist()) == set(labels[labels >= 0].tolist())
