"""A folder made by one command and given to another is recognised and named, with the command
that takes it (jaguar.folders, checked once by the CLI before a command runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaguar.cli.main import main
from jaguar.folders import CHALLENGE, IDENTITIES, RUN, SHARDS, folder_kind
from jaguar.run import RunDir


def _run_folder(root: Path) -> Path:
    run = RunDir(root / "run")
    run.checkpoints_dir.mkdir(parents=True)
    run.config_path.write_text("data:\n  shards: demo/shards\nrun:\n  dir: demo/run\n")
    return run.path


def _shards_folder(root: Path) -> Path:
    shards = root / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")
    return shards


def _challenge_folder(root: Path) -> Path:
    data = root / "data"
    (data / "train").mkdir(parents=True)
    (data / "train.csv").write_text("filename,ground_truth\n")
    return data


def _error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err  # one line
    return err


def test_each_kind_is_recognised(tmp_path):
    (tmp_path / "ids" / "Abril").mkdir(parents=True)
    (tmp_path / "ids" / "Abril" / "001.png").write_bytes(b"")
    assert folder_kind(_run_folder(tmp_path)) == RUN
    assert folder_kind(_shards_folder(tmp_path)) == SHARDS
    assert folder_kind(_challenge_folder(tmp_path)) == CHALLENGE
    assert folder_kind(tmp_path / "ids") == IDENTITIES
    assert folder_kind(tmp_path / "absent") is None
    (tmp_path / "empty").mkdir()
    assert folder_kind(tmp_path / "empty") is None
    (tmp_path / "other" / "notes").mkdir(parents=True)  # sub-folders without photos: not a data set
    assert folder_kind(tmp_path / "other") is None


def test_train_given_a_run_folder_says_how_to_continue_it(tmp_path, capsys):
    run = _run_folder(tmp_path)
    err = _error(capsys, "train", str(run))
    assert f"{run} is a run folder (made by jaguar train)" in err
    assert f"jaguar train {RunDir(run).config_path}" in err
    assert "a recipe is a .py or .yaml config file" in err
    assert "does not exist" not in err


def test_train_given_a_shards_or_raw_folder_says_where_it_goes(tmp_path, capsys):
    shards = _shards_folder(tmp_path)
    err = _error(capsys, "train", str(shards))
    assert f"{shards} is a shards folder" in err and f"data.shards={shards}" in err
    data = _challenge_folder(tmp_path)
    err = _error(capsys, "train", str(data))
    assert "raw data set in the challenge layout" in err and f"jaguar prep {data} SHARDS" in err


def test_tune_post_given_a_shards_folder_says_it_is_not_a_run(tmp_path, capsys):
    shards = _shards_folder(tmp_path)
    err = _error(capsys, "tune-post", str(shards))
    assert f"{shards} is a shards folder (manifest.json; made by jaguar prep), not a run folder" in err
    assert f"jaguar extract {shards} --split val" not in err  # the old, failing advice
    assert f"data.shards={shards}" in err and "jaguar tune-post RUN" in err


@pytest.mark.parametrize("command", ["extract", "submit", "report", "calibrate", "gallery", "rank"])
def test_commands_taking_a_run_name_a_raw_data_set(tmp_path, capsys, command):
    data = _challenge_folder(tmp_path)
    extra = {"submit": ["--test-csv", "t.csv"], "rank": ["--split", "test"]}.get(command, [])
    err = _error(capsys, command, str(data), *extra)
    assert f"{data} is a raw data set in the challenge layout (train.csv + train/), not a run folder" in err
    assert f"jaguar prep {data} SHARDS" in err


def test_verify_given_a_run_points_at_its_shards(tmp_path, capsys):
    run = _run_folder(tmp_path)  # `jaguar verify RUN` checks a run's own files; this one has none yet
    err = _error(capsys, "verify", str(run))
    assert f"{run} holds neither a manifest.json nor a run's checkpoints, features or gallery" in err
    assert "jaguar verify demo/shards" in err


def test_prep_given_shards_or_a_run_says_so(tmp_path, capsys):
    shards = _shards_folder(tmp_path)
    err = _error(capsys, "prep", str(shards), str(tmp_path / "out"))
    assert f"{shards} is a shards folder" in err and "not a raw data set" in err
    run = _run_folder(tmp_path)
    err = _error(capsys, "prep", str(run), str(tmp_path / "out"))
    assert f"{run} is a run folder" in err and f"jaguar tune-post {run}" in err


def test_extract_config_given_a_run_folder_suggests_extracting_the_run(tmp_path, capsys):
    run = _run_folder(tmp_path)
    err = _error(capsys, "extract", "--config", str(run), "--split", "val")
    assert f"jaguar extract {run} --split val" in err


def test_score_given_a_shards_folder_says_so(tmp_path, capsys):
    shards = _shards_folder(tmp_path)
    err = _error(capsys, "score", str(shards), "--test-csv", "t.csv", "--labels", "l.csv")
    assert f"{shards} is a shards folder" in err and "not a submission file" in err
