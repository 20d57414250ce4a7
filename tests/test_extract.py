"""Sharded extraction: every image exactly once at any world size, 1 and 2 processes agree, finished
work is reused (resuming an interrupted extraction: test_extract_resume.py), a pretrained/random backbone can be scored without a checkpoint, and the features
feed a validated submission for every ordered test pair."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jaguar.data.shards import ShardSplit
from jaguar.core.blocks import contiguous_slice
from jaguar.retrieval.extract import merge_parts
from jaguar.core.features import FeatureSet
from jaguar.run import RunDir

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny_cpu.py")
SMALL = ["model.backbone=test_resnet", "model.img_size=[32,32]", "data.p_identities=2", "data.k_images=4",
         "data.val_fraction=0.25", "data.num_workers=0", "data.batch_size=7"]


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _run(*cmd: str) -> subprocess.CompletedProcess:
    result = subprocess.run(list(cmd), capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _jaguar(*args: str) -> subprocess.CompletedProcess:
    return _run(sys.executable, "-m", "jaguar.cli.main", *args)


@pytest.fixture(scope="module")
def trained_run(shards_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("extract") / "run"
    _jaguar("train", TINY, f"data.shards={shards_dir}", f"run.dir={run}", "train.epochs=2", *SMALL)
    return run


@pytest.mark.parametrize("count,world", [(0, 1), (5, 1), (5, 2), (12, 5), (7, 3), (2, 4)])
def test_contiguous_slices_cover_every_item_once(count, world):
    covered = []
    sizes = []
    for rank in range(world):
        start, end = contiguous_slice(count, rank, world)
        covered.extend(range(start, end))
        sizes.append(end - start)
    assert covered == list(range(count))
    assert max(sizes) - min(sizes) <= 1


def test_merge_refuses_parts_that_do_not_cover_the_split(tmp_path):
    part = tmp_path / "a.safetensors"
    FeatureSet(["a.png", "b.png"], torch.eye(2), torch.tensor([0, 1])).save(part)
    with pytest.raises(RuntimeError, match="1 missing"):
        merge_parts([part], ["a.png", "b.png", "c.png"], {}, {})
    assert merge_parts([part], ["a.png", "b.png"], {}, {}).names == ["a.png", "b.png"]


def test_viewpoints_travel_with_the_features(tmp_path):
    features = FeatureSet(["a.png", "b.png", "c.png"], torch.eye(3), torch.tensor([0, 1, 0]),
                          viewpoints=["left", None, "right"])
    assert features.viewpoints == ["left", "unknown", "right"]
    features.save(tmp_path / "f.safetensors")
    loaded = FeatureSet.load(tmp_path / "f.safetensors")
    assert loaded.viewpoints == ["left", "unknown", "right"]
    assert loaded.select(["c.png", "a.png"]).viewpoints == ["right", "left"]
    assert loaded.with_identities({"b.png": "x"}).normalized().viewpoints == loaded.viewpoints
    FeatureSet(["a.png"], torch.eye(1), torch.tensor([0])).save(tmp_path / "plain.safetensors")
    assert FeatureSet.load(tmp_path / "plain.safetensors").viewpoints is None
    with pytest.raises(ValueError, match="viewpoints"):
        FeatureSet(["a.png"], torch.eye(1), torch.tensor([0]), viewpoints=["front"])


def test_one_and_two_processes_agree(trained_run, shards_dir, tmp_path):
    two = tmp_path / "two"
    shutil.copytree(trained_run, two)
    _jaguar("extract", str(trained_run), "--split", "test")
    _run(sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / "cpu_2proc.yaml"),
         "-m", "jaguar.cli.main", "extract", str(two), "--split", "test")
    one_set = FeatureSet.load(trained_run / "features" / "test.safetensors")
    two_set = FeatureSet.load(two / "features" / "test.safetensors")
    split = ShardSplit(shards_dir, "test")
    assert one_set.names == two_set.names == split.filenames
    assert two_set.meta["world_size"] == 2
    # the viewpoint column (test_labels.csv -> prep -> shards) reaches the features, at any world size
    assert split.viewpoints is not None and set(split.viewpoints) <= {"left", "right"}
    assert one_set.viewpoints == two_set.viewpoints == split.viewpoints
    torch.testing.assert_close(one_set.embeddings, two_set.embeddings, rtol=1e-5, atol=1e-5)
    norms = one_set.embeddings.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-5, atol=1e-5)
    assert not list((two / "features" / "parts").glob("*.safetensors")), "parts left behind after the merge"


def test_rerun_is_a_noop_and_val_split_follows_the_run(trained_run):
    _jaguar("extract", str(trained_run), "--split", "val")
    features = FeatureSet.load(trained_run / "features" / "val.safetensors")
    assert features.names == json.loads((trained_run / "split.json").read_text())["val"]
    assert (features.labels >= 0).all()
    again = _jaguar("extract", str(trained_run), "--split", "val")
    assert "up to date" in again.stderr


def test_extract_with_a_recipe_and_no_checkpoint(shards_dir, tmp_path):
    out = tmp_path / "baseline"
    _jaguar("extract", str(out), "--config", TINY, f"data.shards={shards_dir}", *SMALL, "--split", "test")
    features = FeatureSet.load(out / "features" / "test.safetensors")
    assert len(features) == len(ShardSplit(shards_dir, "test"))
    assert (out / "config.yaml").is_file()


def test_extract_with_a_recipe_takes_the_run_folder_from_run_dir(shards_dir, tmp_path):
    run = RunDir(tmp_path / "from-run-dir")
    _jaguar("extract", "--config", TINY, f"data.shards={shards_dir}", f"run.dir={run.path}", *SMALL,
            "--split", "train")
    features = run.load_features("train")
    assert features.names == ShardSplit(shards_dir, "train").filenames  # no split.json: every training image
    assert run.load_config().data.shards == str(shards_dir)


def test_extract_with_a_recipe_and_no_split_takes_the_configs_validation_images(shards_dir, tmp_path):
    from jaguar.config import load_config
    from jaguar.core.run_split import build_run_split, open_train_split

    # A baseline run (never trained) gets the same validation images training with its config would hold out.
    run = RunDir(tmp_path / "baseline")
    overrides = [f"data.shards={shards_dir}", f"run.dir={run.path}", *SMALL]
    _jaguar("extract", "--config", TINY, *overrides, "--split", "val")
    cfg = load_config(TINY, overrides)
    split = open_train_split(cfg)
    expected = [split.filenames[i] for i in build_run_split(cfg, split).val_indices]
    assert expected and run.load_features("val").names == expected


@pytest.mark.parametrize("argv,expected", [
    (["extract", "--config", "R.py", "a.b=1", "run.dir=x", "--split", "val"], (None, ["a.b=1", "run.dir=x"])),
    (["extract", "RUN", "--config", "R.py", "a.b=1"], ("RUN", ["a.b=1"])),
    (["extract", "RUN", "--split", "val"], ("RUN", [])),
])
def test_run_folder_and_overrides_are_told_apart(argv, expected):
    from jaguar.cli.cmd_extract import run_and_overrides
    from jaguar.cli.main import build_parser, parse_args

    assert run_and_overrides(parse_args(build_parser(), argv)) == expected


def test_key_value_as_run_folder_is_a_clear_error(capsys):
    from jaguar.cli.main import main

    assert main(["extract", "run.dir=runs/x", "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "'run.dir=runs/x' looks like a key=value override" in err and "--config RECIPE" in err
    assert "Traceback" not in err
    assert main(["extract", "--split", "test"]) == 2
    assert "give a run folder" in capsys.readouterr().err


def test_submission_for_every_ordered_pair(trained_run, synth_dir, shards_dir, tmp_path):
    _jaguar("extract", str(trained_run), "--split", "val")
    _jaguar("extract", str(trained_run), "--split", "test")
    _jaguar("tune-post", str(trained_run))
    submission = tmp_path / "submission.csv"
    _jaguar("submit", str(trained_run), "--test-csv", str(synth_dir / "test.csv"), "-o", str(submission))
    with open(submission) as handle:
        rows = list(csv.reader(handle))
    count = len(ShardSplit(shards_dir, "test"))
    assert rows[0] == ["row_id", "similarity"]
    assert len(rows) - 1 == count * (count - 1)
    assert [int(r[0]) for r in rows[1:]] == list(range(count * (count - 1)))
    assert all(0.0 <= float(r[1]) <= 1.0 for r in rows[1:])
    scored = _jaguar("score", str(submission), "--test-csv", str(synth_dir / "test.csv"), "--labels",
                     str(synth_dir / "test_labels.csv"))
    assert "identity-balanced mAP" in scored.stdout


def test_diagnose_writes_its_figures_into_the_run_and_the_report_shows_them(trained_run, tmp_path, capsys):
    from jaguar.cli.main import main
    from jaguar.report import build_report
    from jaguar.core.evaluator import evaluate

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    (run_dir / "features" / "val.safetensors").unlink(missing_ok=True)  # whatever ran before
    assert main(["diagnose", str(run_dir), "--split", "val"]) == 2  # no features yet: says which command
    assert f"jaguar extract {run_dir} --split val" in capsys.readouterr().err
    _jaguar("extract", str(run_dir), "--split", "val")
    assert main(["diagnose", str(run_dir), "--split", "val"]) == 0
    printed = capsys.readouterr().out
    for words in ("foreground only", "background only", "silhouette only", "context ratio", "chance",
                  "mirror self-similarity", "same flank", "cross flank"):
        assert words in printed, words
    run = RunDir(run_dir)
    diagnosis = run.load_diagnosis("val")
    features = run.load_features("val")
    original = evaluate(features.embeddings @ features.embeddings.T, features.labels, kind="similarity")
    assert diagnosis.context[0].name == "original" and diagnosis.context[0].mAP_balanced == original.mAP_balanced
    assert diagnosis.images == len(features) and sum(diagnosis.mirror.histogram_counts) == len(features)
    assert sum(diagnosis.viewpoint_counts.values()) == len(features)
    page = build_report(run).read_text()
    assert "Does the model see the coat?" in page and "mirror_similarity_val.png" in page
    assert (run.report_dir / "mirror_similarity_val.png").is_file()
