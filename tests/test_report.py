"""The run report: a complete run folder gives every section with existing images; a bare one
still gives a page that says what is missing and how to produce it."""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from jaguar.report import build_report
from jaguar.report.tb_reader import read_scalars
from jaguar.core.features import FeatureSet
from jaguar.config import PostConfig
from jaguar.retrieval.score import labelled_test_features, stage_table_on
from jaguar.retrieval.submission import submit_run
from jaguar.run import OpenSetCalibration, OpenSetFigures, PostResult, RunDir, StageRow, TrainingMetrics


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def _image_sources(index: Path) -> list[str]:
    parser = _Images()
    parser.feed(index.read_text())
    return parser.sources


def _clustered_features(names: list[str], labels: list[int], label_names: dict[int, str], seed: int,
                        noise: float = 0.35) -> FeatureSet:
    """Embeddings near one direction an identity, so retrieval is good but not perfect."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(max(labels) + 1, 16, generator=generator), dim=1)
    embeddings = centres[torch.tensor(labels)] + noise * torch.randn(len(names), 16, generator=generator)
    return FeatureSet(names, torch.nn.functional.normalize(embeddings, dim=1), torch.tensor(labels),
                      label_names, {"split": "val"})


def _write_events(tb_dir: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tb_dir))
    for step in range(1, 21):
        writer.add_scalar("train/loss", 3.0 / step, step)
        writer.add_scalar("train/loss_ce", 2.5 / step, step)
        writer.add_scalar("train/lr/backbone", 1e-4 * (1 - step / 25), step)
        writer.add_scalar("train/images_per_sec", 40.0 + step, step)
        if step % 5 == 0:
            writer.add_scalar("val/mAP_balanced", 0.1 * step / 5, step)
            writer.add_scalar("val/rank1", 0.2 * step / 5, step)
    writer.close()


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    """A `jaguar prep` folder of synthetic jaguars: 4 identities, 16 train and 6 test images of 48 px."""
    from jaguar.data.prep import prepare
    from jaguar.data.synth import make_synthetic

    root = tmp_path_factory.mktemp("shards")
    source = make_synthetic(root / "raw", identities=4, train_images=16, test_images=6, size=48, workers=1)
    prepare(source, root / "shards", workers=1)
    return root / "shards"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_shards) -> Path:
    """A run folder holding every input of the report, test features included (labels unknown)."""
    from jaguar.data.shards import ShardSplit

    train = ShardSplit(tiny_shards, "train")
    names = list(train.filenames)
    labels = [int(v) for v in train.labels]
    label_names = dict(train.label_names)
    run = RunDir(tmp_path_factory.mktemp("runs") / "run")
    val = _clustered_features(names, labels, label_names, seed=0)
    run.save_features("val", val)
    test = FeatureSet(val.names, val.embeddings, torch.full((len(val),), -1), label_names, {"split": "test"})
    run.save_features("test", test)
    run.config_path.write_text(
        f"data:\n  shards: {tiny_shards}\nmodel:\n  backbone: resnet18\n  img_size: [64, 64]\n"
        f"train:\n  epochs: 4\nrun:\n  name: tiny-test\n")
    _write_events(run.tb_dir)
    best = {"epoch": 3, "step": 20, "mAP_balanced": 0.4, "rank1": 0.8}
    run.save_metrics(TrainingMetrics(best=best, history=[best], steps=20, skipped_steps=0, num_classes=4,
                                     world_size=1))
    qe = PostConfig(qe_k=2)
    run.save_post(PostResult(qe, [StageRow("raw", PostConfig(), 0.41, rank1=0.8),
                                  StageRow("+QE", qe, 0.43, rank1=0.8, gain=0.02, gain_se=0.01, adopted=True),
                                  StageRow("blend (chosen)", qe, 0.5, rank1=0.85)],
                             val_size=len(names), searched=True))
    run.save_calibration(OpenSetCalibration(
        OpenSetFigures(0.61, 0.8, 0.7, 0.75, 0.7483, 0.9, 40, 10), "max", 2, [0.7, 0.8], {
            "threshold": [0.5, 0.61, 0.7], "known_accuracy": [0.9, 0.8, 0.5], "unknown_accuracy": [0.4, 0.7, 0.8],
            "balanced_accuracy": [0.65, 0.75, 0.65]}, {"max": {"threshold": 0.61, "balanced_accuracy": 0.75}},
        "whole identities"))
    run.save_diagnosis(_diagnosis(val))
    return run.path


def _diagnosis(val: FeatureSet):
    """A Diagnosis of hand-made features, as `jaguar diagnose` writes one."""
    from jaguar.retrieval.diagnose import context_ratios, flank_rows, mirror_similarity, retrieval_row
    from jaguar.run import Diagnosis

    noisy = torch.nn.functional.normalize(val.embeddings + torch.randn(val.embeddings.shape,
                                                                       generator=torch.Generator().manual_seed(1)), dim=1)
    context = [retrieval_row("original", val.embeddings, val.labels),
               retrieval_row("foreground only", val.embeddings, val.labels),
               retrieval_row("background only", noisy, val.labels),
               retrieval_row("silhouette only", noisy, val.labels)]
    views = ["left" if i % 2 else "right" for i in range(len(val))]
    return Diagnosis("val", len(val), len(set(val.labels.tolist())), "hand-made", True, context,
                     *context_ratios(context), mirror_similarity(val.embeddings, noisy, val.labels),
                     flank_rows(val.embeddings, val.labels, views), {"left": len(val) // 2})


@pytest.fixture(scope="module")
def test_labels_csv(full_run) -> Path:
    val = FeatureSet.load(full_run / "features" / "val.safetensors")
    csv = full_run.parent / "test_labels.csv"
    csv.write_text("filename,ground_truth\n" + "".join(
        f"{n},{val.label_names[int(label)]}\n" for n, label in zip(val.names, val.labels.tolist())))
    return csv


@pytest.fixture(scope="module")
def pair_list_csv(full_run) -> Path:
    names = FeatureSet.load(full_run / "features" / "test.safetensors").names
    csv = full_run.parent / "test.csv"
    csv.write_text("row_id,query_image,gallery_image\n" + "".join(
        f"{q}_{g},{names[q]},{names[g]}\n" for q in range(len(names)) for g in range(len(names)) if q != g))
    return csv


def test_full_report_has_every_section_and_only_existing_images(full_run, test_labels_csv, pair_list_csv, capsys):
    from jaguar.cli.main import main

    run = RunDir(full_run)
    submit_run(run, pair_list_csv)
    assert main(["score", str(full_run), "--test-csv", str(pair_list_csv), "--labels", str(test_labels_csv)]) == 0
    score, table = run.load_score(), run.load_score_table()
    assert f"identity-balanced mAP: {score.mAP_balanced:.6f}" in capsys.readouterr().out
    assert [row.name for row in table.table] == [row.name for row in run.load_post().table]
    before = sorted(p.name for p in full_run.iterdir())
    index = build_report(full_run, test_labels=test_labels_csv)
    assert sorted(p.name for p in full_run.iterdir()) == sorted(before + ["report"])  # the report only reads
    assert index == full_run / "report" / "index.html"
    text = index.read_text()
    for split in ("val", "test"):
        for heading in ("Per-identity AP", "Retrieval examples", "Similarity distributions"):
            assert f"{heading} — {split}" in text, (heading, split)
    for heading in ("Results", "Configuration", "Training curves", "Open-set identification",
                    "Does the model see the coat?", "Context ratio background / foreground", "Flank retrieval"):
        assert heading in text, heading
    diagnosis = run.load_diagnosis("val")
    assert f"{diagnosis.context[2].mAP_balanced:.4f}" in text and f"{diagnosis.context[2].chance:.4f}" in text
    assert f"{score.mAP_balanced:.4f}" in text and "resnet18" in text
    # rows named by what they do; settings only those that act; each figure says how it was computed
    assert "<td>QE</td>" in text and "chosen: QE (k 2)" in text and "+QE" not in text
    assert 'Chosen settings: QE (k 2) <code>{&quot;qe_k&quot;: 2}</code>' in text and "k1" not in text
    assert "validation during training, best epoch (3)" in text and "no post-processing" in text
    assert "extracted features (features/, flip TTA)" in text
    assert "score_table.json" in text and f"{table.table[0].mAP_balanced:.4f}" in text
    assert "yes, +0.0200 +- 0.0100" in text  # the stage decision of post.json's +QE row
    sources = _image_sources(index)
    assert {"training_curves.png", "per_identity_ap_val.png", "retrieval_best_val.png",
            "retrieval_worst_val.png", "similarity_val.png", "retrieval_worst_test.png",
            "open_set_curve.png", "mirror_similarity_val.png"} <= set(sources)
    for source in sources:
        assert not re.match(r"^(https?:|/)", source), source  # offline: relative files only
        assert (index.parent / source).is_file(), source
    assert 'class="missing"' not in text


def test_test_scores_match_the_metric(full_run, test_labels_csv):
    """The score table is post.json's rows re-scored on the labelled test images."""
    from jaguar.core.evaluator import identity_balanced_map

    run = RunDir(full_run)
    test = labelled_test_features(run, test_labels_csv)
    rows = {row.name: row.mAP_balanced for row in stage_table_on(test, run.load_post().table)}
    raw = identity_balanced_map(test.embeddings @ test.embeddings.T, test.labels)
    assert rows["raw"] == pytest.approx(raw)
    assert set(rows) == {"raw", "+QE", "blend (chosen)"}


def test_malformed_artifact_is_a_note_not_a_crash(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.post_path.write_text('{"chosen": {"qe_kk": 1}, "table": [], "val_size": 1, "searched": true}')
    text = build_report(run).read_text()
    assert "qe_kk" in text and str(run.post_path) in text
    # a config with a wrong value is to be corrected, not re-made by training; the shards stay unknown
    run.config_path.write_text("retrieval:\n  mode: topM\n")
    labels = torch.arange(4).repeat_interleave(3)
    run.save_features("val", FeatureSet([f"v{i}.png" for i in range(12)], torch.randn(12, 8), labels))
    text = html.unescape(build_report(run).read_text())
    assert "topM" in text and f"correct it in <code>{run.config_path}</code>" in text
    assert "No resolved config" not in text
    assert "config.yaml could not be read, so its shards folder (data.shards) is unknown" in text


def test_bare_run_says_what_is_missing(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    index = build_report(run)
    text = index.read_text()
    for command in ("jaguar tune-post", "jaguar extract", "jaguar train", "jaguar score"):
        assert command in text, command
    assert _image_sources(index) == []


def test_tb_reader_keeps_the_last_value_of_a_repeated_step(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    first = SummaryWriter(str(tmp_path / "tb"))
    for step in (1, 2, 3):
        first.add_scalar("train/loss", float(step), step)
    first.close()
    resumed = SummaryWriter(str(tmp_path / "tb"))  # a resumed run re-logs step 3 in a new file
    for step in (3, 4):
        resumed.add_scalar("train/loss", 10.0 * step, step)
    resumed.close()
    series = read_scalars(tmp_path / "tb")["train/loss"]
    assert series.steps == [1, 2, 3, 4]
    assert series.values == [1.0, 2.0, 30.0, 40.0]


def test_report_shows_the_fused_rows_and_draws_the_verified_correspondences(full_run, tmp_path):
    """With the split's local matches the report's table has tune-post's local only and fused rows,
    and its retrieval examples draw the correspondences between each query and its top candidates."""
    import shutil

    from jaguar.retrieval.post.tune import tune_post_run
    from synthetic_matches import synthetic_matches

    run = RunDir(tmp_path / "run")
    shutil.copytree(full_run, run.path, ignore=shutil.ignore_patterns("report"))
    val = run.load_features("val")
    run.local_dir.mkdir()
    synthetic_matches(val, width=6).save(run.local_matches_path("val"))
    post = tune_post_run(run)
    index = build_report(run)
    text = html.unescape(index.read_text())
    assert "local only (inliers; global order after)" in text
    assert f"fused with local (w = {post.fusion.model['weight']:g})" in text
    sources = _image_sources(index)
    assert {"matches_best_val.png", "matches_worst_val.png"} <= set(sources)
    assert "verified correspondences" in text and "jaguar match" in text
    from PIL import Image

    picture = np.asarray(Image.open(index.parent / "matches_best_val.png"))
    assert picture.shape[0] > 200 and picture.std() > 10  # photos and lines, not an empty canvas
