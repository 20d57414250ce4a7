"""Open-set identification with local pattern evidence, on a small synthetic zero-shot run (a randomly
initialised resnet10t: its embeddings barely tell the jaguars apart, so the keypoint matches must):
`jaguar match` -> calibrate on the fused probability -> identify (a rotated photo of a known jaguar is
known with many inliers, a jaguar of another coat is new; the CSV and the review page carry the
evidence) -> enroll keeps the enrolled photos' local features in step. Without local features the
calibration is the global one, and a calibration.json written before local evidence loads."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from jaguar.cli.main import main
from jaguar.retrieval.local.store import LocalFeatureSet
from jaguar.retrieval.openset.calibrate import calibrate_features
from jaguar.retrieval.post.fusion import FusionModel
from jaguar.run import RunDir

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny_cpu.py")


@pytest.fixture(scope="module")
def field(tmp_path_factory) -> dict:
    """5 jaguars (128 px, 50 training photos), a zero-shot run whose val split was matched, and 2
    jaguars of other coats (another seed) never seen."""
    import timm

    from jaguar.data.prep import prepare
    from jaguar.data.synth import make_synthetic

    root = tmp_path_factory.mktemp("local_field")
    raw = make_synthetic(root / "data", identities=5, train_images=50, test_images=5, size=128, seed=0, workers=1)
    prepare(raw, root / "shards", workers=1)
    new = make_synthetic(root / "new", identities=2, train_images=4, test_images=2, size=128, seed=7, workers=1)
    torch.manual_seed(5)
    weights = root / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet10t").state_dict().items()}, str(weights))
    run = RunDir(root / "run")
    overrides = [f"data.shards={root / 'shards'}", f"run.dir={run.path}", f"model.pretrained_file={weights}",
                 "model.img_size=[48,96]", "data.val_fraction=0.3", "retrieval.local.shortlist=8"]
    assert main(["extract", "--config", TINY, *overrides, "--split", "val"]) == 0
    assert main(["calibrate", str(run.path)]) == 0  # no local features yet: the global decision
    global_only = json.loads(run.calibration_path.read_text())
    assert main(["match", str(run.path), "--split", "val"]) == 0
    assert main(["calibrate", str(run.path)]) == 0  # now on the fused probability (train extracted, announced)
    train = run.load_features("train")
    known = root / "known.png"  # a training photo of a known jaguar, rotated by 10 degrees
    Image.open(raw / "train" / train.names[3]).convert("RGBA").rotate(10, resample=Image.BICUBIC,
                                                                       expand=True).save(known)
    labels = {row["filename"]: row["ground_truth"] for row in csv.DictReader(open(raw / "train.csv", newline=""))}
    return {"root": root, "run": run, "known": known, "known_name": labels[train.names[3]],
            "new": sorted((new / "train").iterdir()), "global_only": global_only}


def test_without_local_features_the_calibration_is_the_global_one(field):
    run, before = field["run"], field["global_only"]
    assert before["local_evidence"] is False and before["fusion"] is None and before["fusion_weights"] == {}
    expected = calibrate_features(run.load_features("train"), run.load_features("val"), run.load_split().groups,
                                  seed=run.load_config().run.seed)
    assert before["figures"] == json.loads(json.dumps(expected.figures.__dict__))
    assert before["aggregate"] == expected.aggregate and before["curve"] == expected.curve
    assert main(["calibrate", str(run.path), "--no-local"]) == 0  # a matched run can still choose it
    assert json.loads(run.calibration_path.read_text()) == before
    assert main(["calibrate", str(run.path)]) == 0


def test_calibration_on_the_fused_probability(field):
    run = field["run"]
    raw = run.calibration_path.read_text()
    json.loads(raw, parse_constant=lambda name: pytest.fail(f"{name} in calibration.json"))
    calibration = run.load_calibration()
    assert calibration.local_evidence and calibration.local_shortlist == 8
    assert 0.0 <= calibration.figures.threshold <= 1.0
    model = FusionModel.from_dict(calibration.fusion)
    assert np.all(np.diff(model.local_calibrator(np.arange(0, 60))) >= 0)  # more inliers, never less likely
    assert set(calibration.fusion_weights) == {f"{w / 10:.1f}" for w in range(11)}
    # the chosen weight is the best on validation, at least as good as the cosine alone (weight 1)
    assert calibration.fusion_weights[f"{model.weight:.1f}"] == max(calibration.fusion_weights.values())
    assert calibration.figures.balanced_accuracy >= calibration.fusion_weights["1.0"]


def test_identify_known_with_many_inliers_and_new_as_new_with_the_review_page(field, tmp_path, capsys):
    run = field["run"]
    out = tmp_path / "identify.csv"
    assert main(["identify", str(run.path), str(field["known"]), str(field["new"][2]), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "on the fused probability" in printed
    rows = list(csv.DictReader(open(out, newline="")))
    assert list(rows[0]) == ["photo", "rank", "individual", "score", "decision", "inliers", "probability"]
    known = [r for r in rows if r["photo"] == str(field["known"])]
    new = [r for r in rows if r["photo"] == str(field["new"][2])]
    assert known[0]["decision"] == f"known: {field['known_name']}" and known[0]["individual"] == field["known_name"]
    assert int(known[0]["inliers"]) >= 15 and all(int(r["inliers"]) < int(known[0]["inliers"]) for r in known[1:])
    assert new[0]["decision"] == "new individual"
    threshold = run.load_calibration().figures.threshold
    assert float(known[0]["probability"]) >= threshold > float(new[0]["probability"])
    page_dir = tmp_path / "identify_review"
    page = (page_dir / "index.html").read_text()
    assert "same rosettes" in page and "P(same)" in page
    pictures = re.findall(r'class="match" src="(m\d+_\d+\.jpg)"', page)
    assert len(pictures) == len(rows)  # one correspondence picture per photo and candidate
    assert all((page_dir / name).is_file() for name in pictures)
    assert f"{known[0]['inliers']} inliers" in page


def test_enrolment_keeps_the_local_features_in_step(field, tmp_path):
    run = field["run"]
    first, second, third = field["new"][0], field["new"][1], field["new"][3]
    assert main(["enroll", str(run.path), "--name", "Newcomer", str(first)]) == 0
    assert LocalFeatureSet.load(run.enrolled_local_path).names == run.load_enrolled().names
    assert main(["enroll", str(run.path), "--name", "Stranger", str(second)]) == 0
    local = LocalFeatureSet.load(run.enrolled_local_path)
    assert local.names == run.load_enrolled().names and len(local) == 2 and len(local.keypoints) > 0
    # a gallery enrolled before local features were stored: the next enrolment re-extracts them
    run.enrolled_local_path.unlink()
    assert main(["enroll", str(run.path), "--name", "Third", str(third)]) == 0
    assert LocalFeatureSet.load(run.enrolled_local_path).names == run.load_enrolled().names
    out = tmp_path / "again.csv"
    assert main(["identify", str(run.path), str(first), "-o", str(out)]) == 0
    best = next(csv.DictReader(open(out, newline="")))
    assert best["individual"] == "Newcomer" and int(best["inliers"]) > 0  # its own photo, matched


def test_a_calibration_json_from_before_local_evidence_loads(field, tmp_path):
    old = json.loads(field["run"].calibration_path.read_text())
    for key in ("local_evidence", "fusion", "local_shortlist", "fusion_weights"):
        del old[key]
    folder = RunDir(tmp_path / "old")
    folder.path.mkdir()
    folder.calibration_path.write_text(json.dumps(old))
    calibration = folder.load_calibration()
    assert not calibration.local_evidence and calibration.fusion is None
    assert calibration.figures.threshold == old["figures"]["threshold"]
