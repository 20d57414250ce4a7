"""The run directory type: where each artifact lives, typed round trips, and the errors a user sees
for a missing or malformed artifact."""

import json

import pytest
import torch

from jaguar.config import Config
from jaguar.errors import JaguarError, MissingInputError
from jaguar.core.features import FeatureSet
from jaguar.config import PostConfig
from jaguar.run import (EnsembleRecord, PostResult, RunDir, RunDirError, Score, ScoreTable, SplitRecord,
                        StageRow, TrainingMetrics)


def _post() -> PostResult:
    chosen = PostConfig(qe_k=2, qe_alpha=3.0, rerank=True, k1=5, k2=2, lambda_value=0.3, blend=0.5)
    table = [StageRow("raw", PostConfig(), 0.5, mAP=0.4, rank1=0.6),
             StageRow("+QE", PostConfig(qe_k=2, qe_alpha=3.0), 0.55, mAP=0.45, rank1=0.62,
                      gain=0.05, gain_se=0.01, adopted=True),
             StageRow("blend (chosen)", chosen, 0.6, mAP=0.5, rank1=0.7)]
    return PostResult(chosen, table, val_size=40, searched=True)


def test_layout_names_every_artifact_inside_the_run(tmp_path):
    run = RunDir(tmp_path / "run")
    paths = [run.config_path, run.split_path, run.checkpoints_dir, run.tb_dir, run.metrics_path,
             run.features_path("val"), run.feature_parts_dir, run.post_path, run.submission_path,
             run.score_path, run.score_table_path, run.ensemble_path, run.report_dir, run.pseudo_dir]
    assert all(run.path in p.parents for p in paths)
    assert len(set(paths)) == len(paths)
    assert not run.path.exists()  # a RunDir touches nothing until something is saved
    with pytest.raises(RunDirError, match="'holdout'"):
        run.features_path("holdout")


def test_post_round_trip_is_typed(tmp_path):
    run = RunDir(tmp_path)
    run.save_post(_post())
    loaded = run.load_post()
    assert loaded == _post()
    assert isinstance(loaded.chosen, PostConfig) and isinstance(loaded.table[1], StageRow)
    assert loaded.table[1].decision_text() == "yes, +0.0500 +- 0.0100"
    assert loaded.table[0].decision_text() == ""
    assert loaded.table[-1].is_chosen and not loaded.table[0].is_chosen
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file and renamed


def test_post_written_by_earlier_versions_loads(tmp_path):
    # tune-post's dict rows before the run directory type: the same keys, rows without a decision
    row = {"name": "raw", "mAP_balanced": 0.5, "mAP": 0.4, "rank1": 0.6, "config": PostConfig().to_dict()}
    (tmp_path / "post.json").write_text(json.dumps(
        {"chosen": PostConfig().to_dict(), "table": [row, {**row, "name": "+QE", "gain": 0.01, "gain_se": 0.02,
                                                         "adopted": False}],
         "val_size": 10, "searched": True}))
    post = RunDir(tmp_path).load_post()
    assert post.chosen == PostConfig()
    assert post.table[1].decision_text() == "no, +0.0100 +- 0.0200"


def test_malformed_post_names_the_file_and_the_key(tmp_path):
    run = RunDir(tmp_path)
    run.post_path.write_text(json.dumps({"chosen": {"qe_kk": 2}, "table": [], "val_size": 1, "searched": True}))
    with pytest.raises(RunDirError, match=r"post\.json.*qe_kk"):
        run.load_post()
    run.post_path.write_text(json.dumps({"chosen": {}, "table": [{"name": "raw"}], "val_size": 1,
                                         "searched": True}))
    with pytest.raises(RunDirError, match=r"table\[0\].*missing key.*config"):
        run.load_post()
    run.post_path.write_text("{not json")
    with pytest.raises(RunDirError, match="post.json could not be read"):
        run.load_post()


def test_missing_artifacts_name_the_file_and_the_command(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(MissingInputError, match=r"post\.json.*jaguar tune-post"):
        run.load_post()
    with pytest.raises(MissingInputError, match=r"val\.safetensors.*jaguar extract .* --split val"):
        run.load_features("val")
    with pytest.raises(MissingInputError, match=r"config\.yaml"):
        run.load_config()
    with pytest.raises(MissingInputError, match="checkpoint"):
        run.default_checkpoint()
    with pytest.raises(MissingInputError, match="does not exist"):
        run.require()
    assert issubclass(MissingInputError, FileNotFoundError) and issubclass(RunDirError, JaguarError)


def test_split_config_metrics_score_and_ensemble_round_trip(tmp_path):
    run = RunDir(tmp_path)
    split = SplitRecord(train=["a.png", "b.png"], val=["c.png"], class_of_label={3: 0, 7: 1})
    run.save_split(split)
    assert run.load_split() == split  # int keys survive JSON's string keys

    cfg = Config()
    cfg.train.epochs = 7
    run.save_config(cfg)
    assert run.has_config() and run.load_config().train.epochs == 7

    metrics = TrainingMetrics(best={"epoch": 2, "mAP_balanced": 0.5}, history=[{"epoch": 2, "mAP_balanced": 0.5}],
                              steps=10, skipped_steps=0, num_classes=4, world_size=2)
    run.save_metrics(metrics)
    assert run.load_metrics() == metrics

    score = Score(mAP_balanced=0.4, per_identity={"Ana": 0.4}, num_pairs=6, num_images=3)
    run.save_score(score)
    assert run.load_score() == score
    table = ScoreTable(labels="test_labels.csv", table=_post().table)
    run.save_score_table(table)
    assert run.load_score_table() == table

    record = EnsembleRecord(members=["/a", "/b"], weights=[0.5, 0.5], mode="auto",
                            splits={"val": {"images": 3, "dim": 8, "mode": "mean"}})
    run.save_ensemble(record)
    assert run.is_ensemble() and run.load_ensemble() == record


def test_features_per_split(tmp_path):
    run = RunDir(tmp_path)
    features = FeatureSet(["a.png", "b.png"], torch.eye(2), torch.tensor([0, 1]), {0: "Ana", 1: "Bo"})
    run.save_features("val", features)
    assert run.feature_splits() == ["val"] and run.has_features("val") and not run.has_features("test")
    loaded = run.load_features("val")
    assert loaded.names == features.names and torch.equal(loaded.embeddings, features.embeddings)


def test_no_other_module_spells_a_run_file_name():
    """Paths into a run come from RunDir: a string in code (docstrings aside) that names a run file
    anywhere else in the package would be a second owner of the layout."""
    import ast
    from pathlib import Path

    import jaguar.run as run_module

    names = [getattr(run_module, constant) for constant in ("_CONFIG", "_SPLIT", "_METRICS", "_POST", "_SUBMISSION",
                                                            "_SCORE", "_SCORE_TABLE", "_ENSEMBLE")]
    package = Path(run_module.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path == Path(run_module.__file__):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                offenders += [f"{path.relative_to(package)}:{node.lineno} {name}" for name in names
                              if name in node.value]
    assert offenders == []


def test_stage_rows_are_named_by_what_they_do_and_settings_list_only_what_acts():
    assert PostConfig().active() == {} and PostConfig().describe() == "cosine similarity"
    dba = PostConfig(qe_k=0, dba_k=3, k1=30)
    assert dba.active() == {"dba_k": 3}  # k1 belongs to re-ranking, which is off
    assert StageRow("+QE", dba, 0.5).label() == "DBA"
    both = PostConfig(qe_k=2, dba_k=3, qe_alpha=3.0, rerank=True, k1=20, k2=6, lambda_value=0.3, blend=0.5)
    assert both.describe() == "QE+DBA (k 2 / 3, alpha 3) + re-ranking (k1 20, k2 6, lambda 0.3, blend 0.5)"
    assert StageRow("+QE", PostConfig(qe_k=2), 0.5).label() == "QE"
    assert StageRow("+QE", PostConfig(), 0.5).label() == "QE/DBA: none better"
    assert StageRow("+re-ranking", both, 0.5).label() == "QE+DBA + re-ranking"
    assert StageRow("+re-ranking", PostConfig(qe_k=2), 0.5).label() == "re-ranking: not run"
    assert StageRow("blend (chosen)", dba, 0.5).label() == "chosen: DBA (k 3)"
    assert StageRow("raw", PostConfig(), 0.5).label() == "raw (cosine)"
