"""Ensembles: a run with itself is the run; two runs combine exactly as documented."""

from __future__ import annotations

import json

import pytest
import torch

from jaguar.ensemble import EnsembleError, combine_features, ensemble_runs
from jaguar.core.features import FeatureSet
from jaguar.run import RunDir


def _features(seed: int, n: int = 12, dim: int = 8, names: list[str] | None = None) -> FeatureSet:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=1)
    names = names or [f"img_{i:03d}.png" for i in range(n)]
    labels = torch.arange(n) % 3
    return FeatureSet(names, embeddings, labels, {0: "Abril", 1: "Bagua", 2: "Lua"}, {"split": "val"})


def _write_run(root, name: str, splits: dict[str, FeatureSet]):
    run = root / name
    (run / "features").mkdir(parents=True)
    for split, features in splits.items():
        features.save(run / "features" / f"{split}.safetensors")
    (run / "config.yaml").write_text(f"run:\n  name: {name}\n")
    return run


@pytest.mark.parametrize("mode", ["auto", "mean", "concat"])
def test_ensemble_of_a_run_with_itself_equals_the_run(mode):
    run = _features(0)
    combined = combine_features([run, run], [0.3, 0.7], mode=mode)
    assert combined.names == run.names
    similarity = combined.embeddings @ combined.embeddings.T
    expected = run.embeddings @ run.embeddings.T
    assert torch.allclose(similarity, expected, atol=1e-6)
    assert torch.equal(similarity.argsort(dim=1, descending=True)[:, :3],
                       expected.argsort(dim=1, descending=True)[:, :3])


def test_equal_widths_average_the_normalised_embeddings():
    a, b = _features(1), _features(2)
    a.embeddings = a.embeddings * 5.0  # stored unnormalised: the ensemble must normalise first
    combined = combine_features([a, b], [1.0, 3.0])
    by_hand = torch.nn.functional.normalize(
        0.25 * torch.nn.functional.normalize(a.embeddings, dim=1) + 0.75 * b.embeddings, dim=1)
    assert combined.meta["ensemble"]["mode"] == "mean"
    assert torch.allclose(combined.embeddings, by_hand, atol=1e-6)


def test_different_widths_give_the_weighted_mean_of_cosines():
    a, b = _features(3, dim=8), _features(4, dim=5)
    combined = combine_features([a, b], [2.0, 1.0])
    assert combined.meta["ensemble"]["mode"] == "concat"
    assert combined.embeddings.shape == (12, 13)
    expected = (2 / 3) * (a.embeddings @ a.embeddings.T) + (1 / 3) * (b.embeddings @ b.embeddings.T)
    assert torch.allclose(combined.embeddings @ combined.embeddings.T, expected, atol=1e-5)


def test_rows_are_matched_by_name_not_position():
    a = _features(5)
    shuffled_order = list(reversed(a.names))[:10]  # another order, and two images fewer
    b = a.select(shuffled_order)
    combined = combine_features([a, b], mode="concat")
    assert combined.names == [n for n in a.names if n in set(shuffled_order)]
    # b holds a's own embeddings: matched by name, the ensemble reproduces a's similarities
    kept = a.select(combined.names)
    assert torch.allclose(combined.embeddings @ combined.embeddings.T, kept.embeddings @ kept.embeddings.T,
                          atol=1e-6)


def test_bad_requests_name_the_problem():
    a, b = _features(6, dim=8), _features(7, dim=5)
    with pytest.raises(EnsembleError, match="equal embedding widths"):
        combine_features([a, b], mode="mean")
    with pytest.raises(EnsembleError, match="one weight per run"):
        combine_features([a, b], [1.0])
    disjoint = _features(8, names=[f"other_{i}.png" for i in range(12)])
    with pytest.raises(EnsembleError, match="no image name in common"):
        combine_features([a, disjoint])


def test_ensemble_runs_writes_every_shared_split(tmp_path):
    run_a = _write_run(tmp_path, "a", {"val": _features(9), "test": _features(10), "train": _features(11)})
    run_b = _write_run(tmp_path, "b", {"val": _features(12, dim=6), "test": _features(13, dim=6)})
    out = tmp_path / "ens"
    splits = ensemble_runs([run_a, run_b], out, weights=[1, 1])
    assert splits == ["val", "test"]  # train is not in run b
    members = json.loads((out / "ensemble.json").read_text())
    assert members["weights"] == [0.5, 0.5] and len(members["members"]) == 2
    assert RunDir(out).load_config() == RunDir(run_a).load_config()
    assert RunDir(out).load_config().run.name == "a"
    val = FeatureSet.load(out / "features" / "val.safetensors")
    expected = combine_features([_features(9), _features(12, dim=6)])
    assert torch.allclose(val.embeddings, expected.embeddings, atol=1e-6)
    assert val.label_names[1] == "Bagua"


def test_cli_features_only(tmp_path):
    from jaguar.cli.main import main

    run_a = _write_run(tmp_path, "a", {"val": _features(14)})
    assert main(["ensemble", str(run_a), str(run_a), "-o", str(tmp_path / "e"), "--features-only"]) == 0
    assert (tmp_path / "e" / "features" / "val.safetensors").is_file()
    assert main(["ensemble", str(run_a), "-o", str(tmp_path / "f"), "--weights", "1", "2"]) == 2


def test_cli_runs_every_later_stage_on_the_ensemble(tmp_path, capsys):
    from jaguar.cli.main import main

    names = [f"img_{i:03d}.png" for i in range(12)]
    run_a = _write_run(tmp_path, "a", {"val": _features(20), "test": _features(21)})
    run_b = _write_run(tmp_path, "b", {"val": _features(22), "test": _features(23)})
    pairs = tmp_path / "test.csv"
    pairs.write_text("row_id,query_image,gallery_image\n" + "".join(
        f"{q}_{g},{q},{g}\n" for q in names for g in names if q != g))
    labels = tmp_path / "labels.csv"
    truth = _features(21)
    labels.write_text("filename,ground_truth\n" + "".join(
        f"{n},{truth.label_names[int(label)]}\n" for n, label in zip(truth.names, truth.labels.tolist())))
    out = RunDir(tmp_path / "ens")
    assert main(["ensemble", str(run_a), str(run_b), "-o", str(out.path), "--test-csv", str(pairs),
                 "--test-labels", str(labels)]) == 0
    printed = capsys.readouterr().out
    score = out.load_score()
    assert f"identity-balanced mAP: {score.mAP_balanced:.6f}" in printed
    assert out.load_post().table[-1].is_chosen and out.submission_path.is_file()
    assert [row.name for row in out.load_score_table().table] == [row.name for row in out.load_post().table]
    assert (out.report_dir / "index.html").is_file() and out.load_ensemble().members[1].endswith("b")
