"""`jaguar match`: the local features of a split hold exactly its images in the global features'
order; the shortlist is each image's top-B others by raw cosine; 1 and 2 processes give the same
SplitMatches; a killed matching run resumed reuses its finished blocks and gives identical scores; a
re-run is a no-op, re-extracted global features invalidate the matches; on the flank-true synthetic
set an image's same-jaguar same-flank candidates get more verified inliers than the others."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from jaguar.config import load_config
from jaguar.core.features import FeatureSet
from jaguar.data.shards import ShardSplit
from jaguar.retrieval.local import stage
from jaguar.retrieval.local.split_features import local_features
from jaguar.retrieval.local.store import LocalFeatureSet, SplitMatches
from jaguar.run import RunDir

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny_cpu.py")


def _make_run(shards_dir: Path, path: Path, split: str = "test", seed: int = 0) -> RunDir:
    """A run folder with a config and global features of `split` (all its images, random unit
    embeddings: cheap, and a shortlist that mixes jaguars) — no model is trained or run."""
    cfg = load_config(TINY, [f"data.shards={shards_dir}", f"run.dir={path}", "data.num_workers=0",
                             "retrieval.local.shortlist=5", "retrieval.local.keep_best=2"])
    run = RunDir(path)
    run.path.mkdir(parents=True)
    run.save_config(cfg)
    _save_global(run, shards_dir, split, seed)
    return run


def _save_global(run: RunDir, shards_dir: Path, split: str, seed: int) -> FeatureSet:
    images = ShardSplit(shards_dir, split)
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.nn.functional.normalize(torch.randn(len(images), 16, generator=generator), dim=1)
    features = FeatureSet(list(images.filenames), embeddings, torch.as_tensor(images.labels))
    run.save_features(split, features)
    return features


def _match(run: RunDir, split: str = "test", **kwargs) -> stage.MatchResult:
    return stage.match_run(run, split, **kwargs)


@pytest.fixture(scope="module")
def matched(shards_dir, tmp_path_factory) -> RunDir:
    """A run whose test split was matched in blocks of 4 (12 images: 3 blocks), one process."""
    run = _make_run(shards_dir, tmp_path_factory.mktemp("match") / "run")
    _match(run, block_size=4)
    return run


def test_local_features_hold_the_split_in_the_features_order(matched, shards_dir):
    local = LocalFeatureSet.load(matched.local_features_path("test"))
    assert local.names == matched.load_features("test").names == ShardSplit(shards_dir, "test").filenames
    assert len(local.keypoints) > 0 and local.meta["extractor"]["extractor"] == "rootsift"
    assert not matched.local_part_files("features", "test")  # merged and cleaned up
    assert local_features(matched, "test", "a test").names == local.names  # the entry point of later stages


def test_killed_local_extraction_resumes_and_later_stages_extract_announced(matched, shards_dir, tmp_path,
                                                                            monkeypatch, caplog):
    reference = LocalFeatureSet.load(matched.local_features_path("test"))
    run = _make_run(shards_dir, tmp_path / "run")
    original, reads = ShardSplit.read_rgba, []

    def read_until_killed(self, i, reduction=None):
        if len(reads) == 6:
            raise KeyboardInterrupt  # a kill in the middle of the second block of 4
        reads.append(i)
        return original(self, i, reduction)

    monkeypatch.setattr(ShardSplit, "read_rgba", read_until_killed)
    with pytest.raises(KeyboardInterrupt):
        _match(run, block_size=4)
    parts = run.local_part_files("features", "test")
    assert [p.name.startswith("features-test-0000000-0000004-") for p in parts] == [True]
    reads.clear()
    monkeypatch.setattr(ShardSplit, "read_rgba", lambda self, i, reduction=None: reads.append(i) or original(self, i))
    _match(run, block_size=4)
    assert reads == list(range(4, 12))  # the finished block was not read again
    resumed = LocalFeatureSet.load(run.local_features_path("test"))
    np.testing.assert_array_equal(resumed.descriptors, reference.descriptors)
    np.testing.assert_array_equal(resumed.offsets, reference.offsets)

    fresh = _make_run(shards_dir, tmp_path / "fresh")
    with caplog.at_level("WARNING"):
        features = local_features(fresh, "test", "jaguar identify")
    assert f"jaguar identify needs {fresh.local_features_path('test')}" in caplog.text
    assert f"`jaguar match {fresh.path} --split test`" in caplog.text
    np.testing.assert_array_equal(features.descriptors, reference.descriptors)


def test_shortlist_is_each_images_top_b_others_by_raw_cosine(matched):
    result = SplitMatches.load(matched.local_matches_path("test"))
    embeddings = matched.load_features("test").embeddings
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-np.inf)
    expected = torch.sort(similarity, dim=1, descending=True, stable=True).indices[:, :5].numpy()
    assert result.shortlist.shape == (12, 5) and result.meta["shortlist"] == 5
    np.testing.assert_array_equal(result.shortlist, expected)
    assert result.names == matched.load_features("test").names
    assert result.matches.best.shape == (12, 2)  # keep_best
    assert not matched.local_part_files("matches", "test")


def test_shortlist_is_clipped_to_the_split(shards_dir, tmp_path):
    run = _make_run(shards_dir, tmp_path / "run")
    _match(run, overrides=["retrieval.local.shortlist=50"])
    result = SplitMatches.load(run.local_matches_path("test"))
    assert result.shortlist.shape == (12, 11)
    assert all(sorted(row) == sorted(set(range(12)) - {i}) for i, row in enumerate(result.shortlist.tolist()))


def test_rerun_is_a_noop_and_force_recomputes(matched, monkeypatch):
    before = SplitMatches.load(matched.local_matches_path("test"))
    calls = []
    original = stage.match_shortlist
    monkeypatch.setattr(stage, "match_shortlist", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert _match(matched, block_size=4).reused and not calls
    assert not _match(matched, block_size=4, force=True).reused and len(calls) == 3
    after = SplitMatches.load(matched.local_matches_path("test"))
    np.testing.assert_array_equal(after.matches.scores, before.matches.scores)


def test_killed_matching_resumes_with_identical_scores(matched, shards_dir, tmp_path, monkeypatch, caplog, capsys):
    reference = SplitMatches.load(matched.local_matches_path("test"))
    run = _make_run(shards_dir, tmp_path / "run")
    original = stage.match_shortlist
    computed = []

    def killed_after_two(*args, **kwargs):
        if len(computed) == 2:
            raise KeyboardInterrupt  # stands for a kill between blocks
        computed.append((args[4], args[5]))
        return original(*args, **kwargs)

    monkeypatch.setattr(stage, "match_shortlist", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        _match(run, block_size=4)
    assert not run.local_matches_path("test").exists()
    assert len(run.local_part_files("matches", "test")) == 2

    computed.clear()
    capsys.readouterr()
    monkeypatch.setattr(stage, "match_shortlist", lambda *a, **k: computed.append((a[4], a[5])) or original(*a, **k))
    with caplog.at_level("INFO"):
        _match(run, block_size=4)
    assert computed == [(8, 12)]  # the finished blocks were reused
    assert "rank 0: 8 of its 12 queries were matched by an earlier attempt; 4 to go" in caplog.text
    progress = capsys.readouterr().err  # not a terminal: plain progress lines, starting at the reused queries
    assert "match test (B=5): 8/12 query" in progress and "match test (B=5): 12/12 query" in progress
    resumed = SplitMatches.load(run.local_matches_path("test"))
    np.testing.assert_array_equal(resumed.shortlist, reference.shortlist)
    np.testing.assert_array_equal(resumed.matches.scores, reference.matches.scores)
    np.testing.assert_array_equal(resumed.matches.best, reference.matches.best)
    np.testing.assert_array_equal(resumed.matches.query_xy, reference.matches.query_xy)
    assert not run.local_part_files("matches", "test")


def test_changed_global_features_invalidate_the_matches(shards_dir, tmp_path):
    run = _make_run(shards_dir, tmp_path / "run", seed=0)
    _match(run)
    first = SplitMatches.load(run.local_matches_path("test"))
    _save_global(run, shards_dir, "test", seed=1)  # a re-extracted split
    assert not _match(run).reused
    second = SplitMatches.load(run.local_matches_path("test"))
    assert second.meta["features_sha256"] != first.meta["features_sha256"]
    assert not np.array_equal(second.shortlist, first.shortlist)


def test_global_features_of_other_images_are_refused(shards_dir, tmp_path):
    run = _make_run(shards_dir, tmp_path / "run")
    features = run.load_features("test")
    run.save_features("test", features.select(features.names[::-1]))
    with pytest.raises(Exception, match="extract .* --force"):
        _match(run)
    assert not run.local_matches_path("test").exists()


def test_same_jaguar_same_flank_gets_more_inliers(shards_dir, tmp_path):
    """The whole stage on the flank-true synthetic training images (60, 6 jaguars, both flanks):
    every image against all others."""
    run = _make_run(shards_dir, tmp_path / "run", split="train")
    _match(run, split="train", overrides=["retrieval.local.shortlist=59"])
    result = SplitMatches.load(run.local_matches_path("train"))
    images = ShardSplit(shards_dir, "train")
    assert result.names == images.filenames and images.viewpoints is not None
    same = np.zeros(result.shortlist.shape, dtype=bool)
    for query, row in enumerate(result.shortlist.tolist()):
        for column, candidate in enumerate(row):
            same[query, column] = (images.labels[query] == images.labels[candidate]
                                   and images.viewpoints[query] == images.viewpoints[candidate])
    scores = result.matches.scores
    assert same.any() and scores[same].mean() > 2 * scores[~same].mean()


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


@pytest.mark.slow
def test_one_and_two_processes_agree(matched, tmp_path):
    two = tmp_path / "two"
    shutil.copytree(matched.path, two)
    for path in (RunDir(two).local_matches_path("test"), RunDir(two).local_features_path("test")):
        path.unlink()
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                             str(ROOT / "launch" / "cpu_2proc.yaml"), "-m", "jaguar.cli.main", "match", str(two),
                             "--split", "test", "--block-size", "4"],
                            capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # rank 0's progress lines: 3 blocks of 4, rank 0 the first 2
    assert "local features test (rank 0 of 2): 8/8 img" in result.stderr
    assert "match test (B=5) (rank 0 of 2): 8/8 query" in result.stderr
    one_result = SplitMatches.load(matched.local_matches_path("test"))
    two_result = SplitMatches.load(RunDir(two).local_matches_path("test"))
    assert two_result.meta["world_size"] == 2 and one_result.meta["world_size"] == 1
    assert two_result.names == one_result.names
    for name in ("scores", "best", "offsets", "query_xy", "gallery_xy"):
        np.testing.assert_array_equal(getattr(two_result.matches, name), getattr(one_result.matches, name))
    np.testing.assert_array_equal(two_result.shortlist, one_result.shortlist)
    one_local = LocalFeatureSet.load(matched.local_features_path("test"))
    two_local = LocalFeatureSet.load(RunDir(two).local_features_path("test"))
    np.testing.assert_array_equal(two_local.descriptors, one_local.descriptors)
    assert not (two / "local" / "parts").exists()
