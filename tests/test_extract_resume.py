"""Resumable extraction: a run killed part-way and started again with the same command computes only
the blocks it had not finished and ends with the same features as an uninterrupted run; parts made
with other weights or another image list are never reused; the features file is the old one or the
new one, never half of one; 2 processes pick up the blocks a killed run left."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from jaguar.config import load_config
from jaguar.data.shards import ShardSplit
from jaguar.models import build_model
from jaguar.core.blocks import block_grid, rank_blocks
from jaguar.retrieval.extract import extract_split
from jaguar.core.features import FeatureSet
from jaguar.run import RunDir, SplitRecord

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny_cpu.py")
SMALL = ["model.backbone=test_resnet", "model.img_size=[32,32]", "data.num_workers=0", "data.batch_size=4"]
BLOCK = 8  # 60 training images: blocks of 8, the last of 4


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the subprocess tests have (OMP_NUM_THREADS=1): on a shared 2-core machine
    two threads make these tiny convolutions ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Interrupted(Exception):
    """Stands for the kill of a process (Slurm preemption, kill -9) at a chosen moment."""


@pytest.fixture
def reads(monkeypatch):
    """Counts the images the extraction reads; `reads.stop_after = n` interrupts it at the n+1-th."""
    original = ShardSplit.read_rgba

    class Counter:
        count = 0
        stop_after = None

    def counting(self, i):
        if Counter.stop_after is not None and Counter.count >= Counter.stop_after:
            raise Interrupted(f"interrupted after {Counter.count} images")
        Counter.count += 1
        return original(self, i)

    monkeypatch.setattr(ShardSplit, "read_rgba", counting)
    return Counter


def _cfg(shards_dir: Path, run: Path):
    return load_config(TINY, [f"data.shards={shards_dir}", f"run.dir={run}", *SMALL])


def _weights(cfg, path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_model(cfg, 1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _extract(shards_dir, run_path, weights, reads, stop_after=None, split="train", force=False):
    reads.count, reads.stop_after = 0, stop_after
    run = RunDir(run_path)
    return extract_split(run, split, _cfg(shards_dir, run_path), weights, block_size=BLOCK, force=force)


@pytest.fixture
def weights(shards_dir, tmp_path) -> tuple[Path, Path]:
    cfg = _cfg(shards_dir, tmp_path / "unused")
    return _weights(cfg, tmp_path / "a.safetensors", 0), _weights(cfg, tmp_path / "b.safetensors", 1)


def _reference(shards_dir, tmp_path, weights_file, reads, name="reference") -> FeatureSet:
    _extract(shards_dir, tmp_path / name, weights_file, reads)
    return RunDir(tmp_path / name).load_features("train")


@pytest.mark.parametrize("count,world,block,batch", [(60, 1, 8, 4), (60, 2, 8, 4), (60, 3, 10, 4), (12, 2, 1024, 7),
                                                     (5, 2, 1024, 32), (0, 2, 8, 4), (100, 4, 16, 16)])
def test_block_grid_covers_the_split_in_whole_batches(count, world, block, batch):
    blocks = block_grid(count, world, block, batch)
    assert [i for start, end in blocks for i in range(start, end)] == list(range(count))
    assert all((end - start) % batch == 0 for start, end in blocks[:-1])  # batches never straddle blocks
    per_rank = [rank_blocks(blocks, rank, world) for rank in range(world)]
    assert [b for run in per_rank for b in run] == blocks  # each rank a contiguous run, in rank order
    if count >= world * batch:
        assert all(per_rank), "every process gets work"


def test_block_grid_is_the_same_at_any_world_size_on_large_splits():
    assert block_grid(100_000, 1, 1024, 32) == block_grid(100_000, 2, 1024, 32) == block_grid(100_000, 8, 1024, 32)
    assert len(block_grid(100_000, 2, 1024, 32)) == 98


def test_interrupted_extraction_resumes_where_it_stopped(shards_dir, tmp_path, weights, reads):
    reference = _reference(shards_dir, tmp_path, weights[0], reads)
    run = RunDir(tmp_path / "run")
    with pytest.raises(Interrupted):
        _extract(shards_dir, run.path, weights[0], reads, stop_after=2 * BLOCK + 3)
    assert not run.features_path("train").exists()
    finished = [p.name for p in run.feature_part_files("train") if not p.name.startswith(".")]
    assert len(finished) == 2  # blocks [0, 8) and [8, 16); the third was cut short
    leftover = run.feature_parts_dir / f".{finished[0]}.x1y2.tmp"  # what a kill -9 mid-write leaves
    leftover.write_bytes(b"half a part")

    _extract(shards_dir, run.path, weights[0], reads)
    assert reads.count == 60 - 2 * BLOCK  # the finished blocks were not read again
    resumed = run.load_features("train")
    assert resumed.names == reference.names
    assert torch.equal(resumed.embeddings, reference.embeddings)  # bit for bit
    assert torch.equal(resumed.labels, reference.labels)
    assert run.feature_part_files("train") == [] and not run.feature_parts_dir.exists()  # leftover too

    _extract(shards_dir, run.path, weights[0], reads)
    assert reads.count == 0  # up to date: nothing read


def test_an_interrupted_forced_extraction_resumes_with_the_same_command(shards_dir, tmp_path, weights, reads):
    """`extract --force` stopped half-way and run again as the interruption line says (with --force)
    reuses the blocks the forced attempt finished; a forced run with none recomputes every block."""
    run = RunDir(tmp_path / "run")
    _extract(shards_dir, run.path, weights[0], reads)
    before = run.load_features("train")
    with pytest.raises(Interrupted):
        _extract(shards_dir, run.path, weights[0], reads, stop_after=2 * BLOCK + 3, force=True)
    assert torch.equal(run.load_features("train").embeddings, before.embeddings)  # the old file is kept
    assert len([p for p in run.feature_part_files("train") if not p.name.startswith(".")]) == 2
    _extract(shards_dir, run.path, weights[0], reads, force=True)
    assert reads.count == 60 - 2 * BLOCK  # the forced attempt's two blocks were reused
    assert torch.equal(run.load_features("train").embeddings, before.embeddings)

    _extract(shards_dir, run.path, weights[0], reads, force=True)
    assert reads.count == 60  # nothing interrupted: --force recomputes every block


def test_parts_of_other_weights_at_the_same_path_are_not_reused(shards_dir, tmp_path, weights, reads):
    reference_b = _reference(shards_dir, tmp_path, weights[1], reads)
    moving = tmp_path / "weights.safetensors"
    moving.write_bytes(weights[0].read_bytes())
    run = RunDir(tmp_path / "run")
    with pytest.raises(Interrupted):
        _extract(shards_dir, run.path, moving, reads, stop_after=3 * BLOCK)
    moving.write_bytes(weights[1].read_bytes())  # e.g. retrained into the same checkpoint path
    _extract(shards_dir, run.path, moving, reads)
    assert reads.count == 60  # every block recomputed with the new weights
    assert torch.equal(run.load_features("train").embeddings, reference_b.embeddings)


def test_parts_of_another_image_list_are_not_reused(shards_dir, tmp_path, weights, reads):
    names = ShardSplit(shards_dir, "train").filenames
    run = RunDir(tmp_path / "run")
    run.save_split(SplitRecord(train=list(names), val=[], class_of_label={}))
    with pytest.raises(Interrupted):
        _extract(shards_dir, run.path, weights[0], reads, stop_after=3 * BLOCK)
    # The run's split changes (one image less; the first blocks keep their boundaries and the
    # other images their order): nothing made for the old list may be reused.
    fewer = names[:20] + names[21:]
    run.save_split(SplitRecord(train=fewer, val=[], class_of_label={}))
    _extract(shards_dir, run.path, weights[0], reads)
    assert reads.count == len(fewer)
    features = run.load_features("train")
    assert features.names == fewer
    full = _reference(shards_dir, tmp_path, weights[0], reads)
    torch.testing.assert_close(features.select(fewer[:16]).embeddings, full.select(fewer[:16]).embeddings)


def test_features_file_is_the_old_or_the_new_one_never_half(shards_dir, tmp_path, weights, reads, monkeypatch):
    run = RunDir(tmp_path / "run")
    _extract(shards_dir, run.path, weights[0], reads)
    old_bytes = run.features_path("train").read_bytes()
    moved = tmp_path / "weights.safetensors"
    moved.write_bytes(weights[1].read_bytes())
    with pytest.raises(Interrupted):  # killed while embedding with new weights: the old file stays
        _extract(shards_dir, run.path, moved, reads, stop_after=BLOCK + 1)
    assert run.features_path("train").read_bytes() == old_bytes

    # Killed in the middle of writing the features file (after its bytes, before the rename).
    import jaguar.io

    original_save, fsync, writing = RunDir.save_features, jaguar.io.os.fsync, []

    def save_features(self, split, features):
        writing.append(split)
        return original_save(self, split, features)

    def killed_fsync(fd):
        if writing:
            raise Interrupted("killed while writing the features file")
        return fsync(fd)

    monkeypatch.setattr(RunDir, "save_features", save_features)
    monkeypatch.setattr(jaguar.io.os, "fsync", killed_fsync)
    with pytest.raises(Interrupted):
        _extract(shards_dir, run.path, moved, reads)
    monkeypatch.undo()
    assert run.features_path("train").read_bytes() == old_bytes
    assert [p.name for p in run.features_dir.iterdir() if p.name.endswith(".tmp")] == []
    assert len(run.feature_part_files("train")) == len(block_grid(60, 1, BLOCK, 4))  # kept for the re-run

    reads.count = 0
    monkeypatch.setattr(ShardSplit, "read_rgba", _counting_read(reads))
    _extract(shards_dir, run.path, moved, reads)
    assert reads.count == 0  # assembled from the parts alone
    assert torch.equal(run.load_features("train").embeddings, _reference(shards_dir, tmp_path, moved, reads).embeddings)


def _counting_read(reads):
    original = ShardSplit.read_rgba

    def counting(self, i):
        reads.count += 1
        return original(self, i)

    return counting


def test_a_model_without_checkpoint_is_the_same_in_every_process_and_run(shards_dir, tmp_path, reads):
    """`extract --config` without weights embeds with the randomly initialised layers as built: they
    are drawn from run.seed, so two runs (or two processes, each building its own) agree and a
    part of one process matches the others'."""
    first, second = RunDir(tmp_path / "first"), RunDir(tmp_path / "second")
    torch.manual_seed(1)
    extract_split(first, "test", _cfg(shards_dir, first.path), None, block_size=BLOCK)
    torch.manual_seed(2)  # the caller's random state does not leak into the model
    extract_split(second, "test", _cfg(shards_dir, second.path), None, block_size=BLOCK)
    assert torch.equal(first.load_features("test").embeddings, second.load_features("test").embeddings)
    reseeded = RunDir(tmp_path / "reseeded")
    extract_split(reseeded, "test", load_config(TINY, [f"data.shards={shards_dir}", f"run.dir={reseeded.path}",
                                                       *SMALL, "run.seed=7"]), None, block_size=BLOCK)
    assert not torch.equal(first.load_features("test").embeddings, reseeded.load_features("test").embeddings)
    assert first.load_features("test").meta["key"] != reseeded.load_features("test").meta["key"]


@pytest.mark.slow
def test_two_processes_resume_a_killed_run(shards_dir, tmp_path, weights, reads):
    """A 1-process extraction killed after 2 blocks, re-run with 2 processes (accelerate, gloo): the
    2 processes take over the finished blocks and the result equals the uninterrupted run bit for bit
    (the block grid does not depend on the number of processes)."""
    reference = _reference(shards_dir, tmp_path, weights[0], reads)
    run = RunDir(tmp_path / "run")
    with pytest.raises(Interrupted):
        _extract(shards_dir, run.path, weights[0], reads, stop_after=2 * BLOCK + 1)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / "cpu_2proc.yaml"),
         "-m", "jaguar.cli.main", "extract", str(run.path), "--config", TINY, f"data.shards={shards_dir}",
         f"run.dir={run.path}", *SMALL, "--split", "train", "--checkpoint", str(weights[0]),
         "--block-size", str(BLOCK)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0: 16 of its 32 images were extracted by an earlier attempt" in result.stderr
    features = run.load_features("train")
    assert features.meta["world_size"] == 2
    assert features.names == reference.names
    assert torch.equal(features.embeddings, reference.embeddings)
    assert run.feature_part_files("train") == []
