"""Pseudo-labels: confident points get the right identity, ambiguous ones are rejected, the
threshold is respected, and the written shards read back with the original label space."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from jaguar.pseudo import PseudoLabelError, predict, selection_precision
from jaguar.core.features import FeatureSet

NAMES = {0: "Abril", 1: "Bagua", 2: "Lua"}


def _unit(*rows: list[float]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def _labelled() -> FeatureSet:
    """Three tight clusters along the first three axes, four images each."""
    generator = torch.Generator().manual_seed(0)
    rows, labels = [], []
    for label in range(3):
        centre = torch.zeros(4)
        centre[label] = 1.0
        rows.append(centre + 0.05 * torch.randn(4, 4, generator=generator))
        labels += [label] * 4
    embeddings = torch.nn.functional.normalize(torch.cat(rows), dim=1)
    return FeatureSet([f"train_{i:02d}.png" for i in range(12)], embeddings, torch.tensor(labels), NAMES)


def _candidates() -> FeatureSet:
    embeddings = _unit([1.0, 0.05, 0.0, 0.0],   # clearly Abril
                       [0.0, 1.0, 0.1, 0.0],    # clearly Bagua
                       [1.0, 1.0, 0.0, 0.0],    # half-way between Abril and Bagua
                       [0.1, 0.0, 1.0, 0.9])    # Lua's direction but far from everyone (cos ~ 0.74)
    names = ["test_a.png", "test_b.png", "test_mid.png", "test_far.png"]
    return FeatureSet(names, embeddings, torch.full((4,), -1), NAMES)


def test_confident_points_get_the_right_identity_and_ambiguous_ones_are_rejected():
    by_name = {p.name: p for p in predict(_labelled(), _candidates(), threshold=0.9, k=3)}
    assert by_name["test_a.png"].selected and by_name["test_a.png"].identity == "Abril"
    assert by_name["test_b.png"].selected and by_name["test_b.png"].label == 1
    assert not by_name["test_mid.png"].selected  # cos 0.71 to both centroids
    assert not by_name["test_far.png"].selected  # agreed on Lua, but below the threshold
    assert by_name["test_far.png"].agreed and by_name["test_far.png"].identity == "Lua"


def test_threshold_is_respected_exactly():
    predictions = predict(_labelled(), _candidates(), threshold=0.0, k=3)
    far = next(p for p in predictions if p.name == "test_far.png")
    just_above = predict(_labelled(), _candidates(), threshold=far.confidence, k=3)
    just_below = predict(_labelled(), _candidates(), threshold=math.nextafter(far.confidence, 2.0), k=3)
    assert next(p for p in just_above if p.name == "test_far.png").selected
    assert not next(p for p in just_below if p.name == "test_far.png").selected
    for prediction in predict(_labelled(), _candidates(), threshold=0.8, k=3):
        assert prediction.selected == (prediction.agreed and prediction.confidence >= 0.8)


def test_margin_confidence_rejects_the_point_between_two_identities():
    by_name = {p.name: p for p in predict(_labelled(), _candidates(), threshold=0.3, k=3, confidence="margin")}
    assert abs(by_name["test_mid.png"].confidence) < 0.1
    assert not by_name["test_mid.png"].selected
    assert by_name["test_a.png"].selected and by_name["test_far.png"].selected  # far but unambiguous


def test_neighbours_must_agree_with_the_centroid():
    # one Bagua image sits inside Abril's cluster: with k=1 the nearest neighbour of a point next
    # to it says Bagua while the centroid says Abril, so the point is not agreed on
    labelled = _labelled()
    embeddings = torch.cat([labelled.embeddings, _unit([1.0, 0.0, 0.0, 0.3])])
    odd = FeatureSet(labelled.names + ["train_odd.png"], embeddings, torch.cat([labelled.labels, torch.tensor([1])]),
                     NAMES)
    query = FeatureSet(["q.png"], _unit([1.0, 0.0, 0.0, 0.31]), torch.tensor([-1]), NAMES)
    (prediction,) = predict(odd, query, threshold=0.0, k=1)
    assert prediction.identity == "Abril" and not prediction.agreed and not prediction.selected


def test_precision_is_reported_honestly():
    predictions = predict(_labelled(), _candidates(), threshold=0.9, k=3)
    truth = {"test_a.png": "Abril", "test_b.png": "Lua", "test_mid.png": "Abril"}  # b is wrong
    report = selection_precision(predictions, truth)
    assert report["selected"] == {"judged": 2, "correct": 1, "precision": 0.5}
    assert report["all_predictions"]["judged"] == 3
    assert selection_precision(predictions, {})["selected"]["precision"] is None


def test_bad_options_are_named():
    with pytest.raises(PseudoLabelError, match="confidence"):
        predict(_labelled(), _candidates(), threshold=0.5, confidence="entropy")
    unlabelled = FeatureSet(["x.png"], _unit([1.0, 0, 0, 0]), torch.tensor([-1]))
    with pytest.raises(PseudoLabelError, match="no labels"):
        predict(unlabelled, _candidates(), threshold=0.5)


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    """A `jaguar prep` folder of synthetic jaguars: 4 identities, 16 train and 6 test images of 48 px."""
    from jaguar.data.prep import prepare
    from jaguar.data.synth import make_synthetic

    root = tmp_path_factory.mktemp("shards")
    source = make_synthetic(root / "raw", identities=4, train_images=16, test_images=6, size=48, workers=1)
    prepare(source, root / "shards", workers=1)
    return root / "shards"


def _run_with_features(run: Path, shards: Path) -> dict[str, str]:
    """Train features clustered by identity; test images 0-2 sit on their true identity's direction,
    3-5 half-way between two identities. Returns the expected selection {filename: identity}."""
    from jaguar.data.shards import ShardSplit

    train, test = ShardSplit(shards, "train"), ShardSplit(shards, "test")
    directions = torch.eye(8)[:4]
    generator = torch.Generator().manual_seed(1)
    train_embeddings = directions[torch.as_tensor(train.labels)] + 0.05 * torch.randn(len(train), 8,
                                                                                      generator=generator)
    (run / "features").mkdir(parents=True)
    FeatureSet(train.filenames, torch.nn.functional.normalize(train_embeddings, dim=1), torch.as_tensor(train.labels),
               train.label_names, {"split": "train"}).save(run / "features" / "train.safetensors")
    test_labels = torch.as_tensor(test.labels)
    rows = [directions[int(test_labels[i])] + 0.02 for i in range(3)]
    rows += [directions[int(test_labels[i])] + directions[(int(test_labels[i]) + 1) % 4] for i in range(3, 6)]
    FeatureSet(test.filenames, torch.nn.functional.normalize(torch.stack(rows), dim=1),
               torch.full((6,), -1), train.label_names, {"split": "test"}).save(run / "features" / "test.safetensors")
    (run / "config.yaml").write_text(f"data:\n  shards: {shards}\noptim:\n  lr: 0.001\n")
    return {test.filenames[i]: test.identities[i] for i in range(3)}


def test_pseudo_shards_read_back_with_the_predicted_labels(tmp_path, tiny_shards):
    from jaguar.data.shards import ShardSplit, load_manifest
    from jaguar.pseudo import fine_tune_command, pseudo_label_run

    run = tmp_path / "run"
    expected = _run_with_features(run, tiny_shards)
    wrong_truth = tmp_path / "labels.csv"
    first = sorted(expected)[0]
    wrong_truth.write_text("filename,ground_truth\n" + "".join(
        f"{name},{'Nobody' if name == first else identity}\n" for name, identity in expected.items()))
    summary = pseudo_label_run(run, threshold=0.9, k=3, test_labels=wrong_truth)

    out = run / "pseudo"
    assert {s["filename"]: s["identity"] for s in summary["selected"]} == expected
    assert summary["precision"]["selected"] == {"judged": 3, "correct": 2, "precision": pytest.approx(2 / 3)}
    assert load_manifest(out).verify(out) == []
    pseudo = ShardSplit(out, "train")
    source = ShardSplit(tiny_shards, "train")
    assert pseudo.label_names == source.label_names  # the label space training already uses
    assert dict(zip(pseudo.filenames, pseudo.identities)) == expected
    for i, name in enumerate(pseudo.filenames):
        image, meta = pseudo[i]
        assert meta["label"] == pseudo.labels[i] and meta["identity"] == expected[name]
        original, _ = ShardSplit(tiny_shards, "test")[ShardSplit(tiny_shards, "test").filenames.index(name)]
        assert image.tobytes() == original.tobytes()
    source_sha = {s["filename"]: s["sha256"] for s in json.loads(
        (tiny_shards / "manifest.json").read_text())["splits"]["test"]["samples"]}
    for sample in json.loads((out / "manifest.json").read_text())["splits"]["train"]["samples"]:
        assert sample["sha256"] == source_sha[sample["filename"]]  # the very same png bytes
    stored = json.loads((out / "pseudo.json").read_text())
    assert stored["selected_count"] == 3 and stored["threshold"] == 0.9
    command = fine_tune_command(run, out)
    assert f"data.extra_shards=[{out}]" in command and "optim.lr=0.0001" in command
    with pytest.raises(FileExistsError):
        pseudo_label_run(run, threshold=0.9, k=3)


def test_without_train_features_it_stops_and_names_the_command(tmp_path, tiny_shards):
    from jaguar.errors import MissingInputError
    from jaguar.pseudo import pseudo_label_run

    run = tmp_path / "run"
    _run_with_features(run, tiny_shards)
    (run / "features" / "train.safetensors").rename(run / "features" / "val.safetensors")  # validation only
    with pytest.raises(MissingInputError, match=r"has no .*train\.safetensors \(only .*val\.safetensors is "
                                                r"there\).*jaguar extract .* --split train"):
        pseudo_label_run(run, threshold=0.9, k=3)
    assert not (run / "pseudo").exists()  # nothing written
