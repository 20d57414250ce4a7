"""Final distance (QE + re-ranking blend), the validation grid search and the tune-post / submit CLIs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from jaguar.cli.main import main
from jaguar.config import RetrievalConfig
from jaguar.core.features import FeatureSet
from jaguar.core.evaluator import identity_balanced_map
from jaguar.config import PostConfig
from jaguar.core.evaluator import evaluate
from jaguar.retrieval.post.dense import final_distance
from jaguar.retrieval.post.tune import identity_gain, tune_post
from jaguar.retrieval.post.qe import expand
from jaguar.retrieval.post.rerank import euclidean_distance, k_reciprocal_rerank_single
from jaguar.formats import read_pairs, read_submission


def _feature_set(n_ids: int = 8, per_id: int = 5, seed: int = 0, prefix: str = "val") -> FeatureSet:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_ids, 16, generator=generator)
    labels = torch.arange(n_ids).repeat_interleave(per_id)
    embeddings = centres[labels] + 1.0 * torch.randn(len(labels), 16, generator=generator)
    names = [f"{prefix}_{i:04d}.png" for i in range(len(labels))]
    return FeatureSet(names, torch.nn.functional.normalize(embeddings, dim=1), labels)


def test_final_distance_is_the_documented_blend():
    features = _feature_set()
    post = PostConfig(qe_k=2, qe_alpha=0.0, rerank=True, k1=6, k2=2, lambda_value=0.3, blend=0.25)
    expanded = expand(features.embeddings, qe_k=2)
    raw = 1 - expanded @ expanded.T
    reranked = k_reciprocal_rerank_single(euclidean_distance(expanded), 6, 2, 0.3)
    torch.testing.assert_close(final_distance(features, post), 0.75 * raw + 0.25 * reranked)
    torch.testing.assert_close(final_distance(features, PostConfig()), 1 - features.embeddings @ features.embeddings.T)


def test_tune_post_reports_each_stage_and_never_loses_to_raw():
    features = _feature_set()
    chosen, table = tune_post(features, RetrievalConfig())
    assert [row["name"] for row in table] == ["raw", "+QE", "+re-ranking", "blend (chosen)"]
    scores = [row["mAP_balanced"] for row in table]
    assert scores[1] >= scores[0] and scores[3] >= scores[0]
    recomputed = identity_balanced_map(-final_distance(features, chosen), features.labels)
    assert recomputed == pytest.approx(scores[3])
    assert table[3]["config"] == chosen.to_dict()
    for row in table[1:3]:  # each stage says what it gained, how noisy that is, and whether it was kept
        assert row["adopted"] == (row["gain"] > row["gain_se"] and row["gain"] > 0)
        assert row["gain_se"] >= 0


def _two_per_identity_distances() -> tuple[torch.Tensor, torch.Tensor]:
    """Three identities of two images; every image has one impostor closer than its match, so
    every query's AP is 1/2."""
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    distance = torch.full((6, 6), 0.9)
    distance[labels[:, None] == labels[None, :]] = 0.5
    for a, b in [(0, 2), (1, 5), (3, 4)]:  # impostor pairs, each image in exactly one
        distance[a, b] = distance[b, a] = 0.2
    distance.fill_diagonal_(0.0)
    return distance, labels


def paired_gain(candidate, incumbent, labels):
    """Gain of distance `candidate` over `incumbent` on one labelled set (tune-post's adoption figure)."""
    return identity_gain(evaluate(candidate, labels, kind="distance").per_identity_ap,
                         evaluate(incumbent, labels, kind="distance").per_identity_ap)


def test_paired_gain_separates_a_consistent_gain_from_one_lucky_identity():
    distance, labels = _two_per_identity_distances()
    perfect = torch.where(labels[:, None] == labels[None, :], 0.1, 0.9).fill_diagonal_(0.0)
    consistent = paired_gain(perfect, distance, labels)  # every identity 0.5 -> 1.0
    assert consistent.gain == pytest.approx(0.5) and consistent.se == pytest.approx(0.0)
    assert consistent.identities == 3 and consistent.clears(1.0) and consistent.clears(100.0)

    lucky = distance.clone()
    lucky[0, 1] = lucky[1, 0] = 0.1  # identity 0 becomes perfect, the others are untouched
    gain = paired_gain(lucky, distance, labels)
    # one identity of k gains g: the mean is g / k and its standard error is exactly g / k too
    assert gain.gain == pytest.approx(0.5 / 3) and gain.se == pytest.approx(0.5 / 3)
    assert gain.clears(0.5) and not gain.clears(1.5)
    assert not paired_gain(distance, lucky, labels).clears(0.0)  # a loss is never adopted


def test_tune_post_keeps_raw_unless_a_stage_clears_the_noise():
    features = _feature_set()
    strict, table = tune_post(features, RetrievalConfig(tune_min_gain_se=1e9))
    assert table[1]["gain"] > 0 and table[2]["gain"] > 0  # both stages gain, yet neither clears the bar
    assert strict == PostConfig()
    assert table[3]["mAP_balanced"] == table[0]["mAP_balanced"]
    assert not table[1]["adopted"] and not table[2]["adopted"]
    # With 0 any gain is adopted: the chosen setting scores as well as the best stage.
    loose, table = tune_post(features, RetrievalConfig(tune_min_gain_se=0.0))
    assert table[3]["mAP_balanced"] == pytest.approx(max(row["mAP_balanced"] for row in table[:3]))
    assert loose.rerank == table[2]["adopted"]
    with pytest.raises(ValueError, match="tune_min_gain_se"):
        tune_post(features, RetrievalConfig(tune_min_gain_se=-1.0))


def test_tune_post_cli_and_submit_cli(tmp_path, capsys):
    run = tmp_path / "run"
    _feature_set().save(run / "features" / "val.safetensors")
    test = _feature_set(4, 3, seed=5, prefix="test")
    test.labels[:] = -1
    test.save(run / "features" / "test.safetensors")
    (run / "config.yaml").write_text(yaml.safe_dump({"retrieval": {"tune": False, "post": {
        "qe_k": 2, "rerank": True, "k1": 4, "k2": 2, "blend": 0.5}}}))
    assert main(["tune-post", str(run)]) == 0
    post = json.loads((run / "post.json").read_text())
    assert post["val_size"] == 40 and post["searched"] is False
    assert post["chosen"] == PostConfig(qe_k=2, rerank=True, k1=4, k2=2, blend=0.5).to_dict()
    assert [row["name"] for row in post["table"]] == ["raw", "+QE", "+re-ranking", "blend (chosen)"]
    out = capsys.readouterr().out
    assert "chosen: QE (k 2) + re-ranking (k1 4, k2 2, lambda 0.3, blend 0.5)" in out

    names = test.names
    rows = [f"p{q}_{g},{names[q]},{names[g]}" for q in range(len(names)) for g in range(len(names)) if q != g]
    (tmp_path / "test.csv").write_text("\n".join(["row_id,query_image,gallery_image"] + rows) + "\n")
    assert main(["submit", str(run), "--test-csv", str(tmp_path / "test.csv")]) == 0
    submission = read_submission(run / "submission.csv")
    assert submission.row_ids == read_pairs(tmp_path / "test.csv").row_ids
    assert len(submission.row_ids) == 12 * 11
    assert submission.similarity.min() == 0.0 and submission.similarity.max() == 1.0

    # Without post.json the submission is raw cosine, and the command says so.
    (run / "post.json").unlink()
    out = tmp_path / "raw.csv"
    assert main(["submit", str(run), "--test-csv", str(tmp_path / "test.csv"), "-o", str(out)]) == 0
    assert "raw cosine" in capsys.readouterr().out
    raw = read_submission(out).similarity
    cosine = torch.tensor([float(test.embeddings[int(r[1:].split("_")[0])] @ test.embeddings[int(r.split("_")[1])])
                           for r in submission.row_ids], dtype=torch.float64)
    assert torch.equal(torch.argsort(-cosine, stable=True), torch.argsort(-torch.tensor(raw), stable=True))


def test_submit_cli_names_missing_images(tmp_path, capsys):
    run = tmp_path / "run"
    _feature_set(2, 2, prefix="test").save(run / "features" / "test.safetensors")
    (tmp_path / "t.csv").write_text("row_id,query_image,gallery_image\nx1,test_0000.png,nope.png\n")
    assert main(["submit", str(run), "--test-csv", str(tmp_path / "t.csv")]) == 2
    assert "x1 (nope.png)" in capsys.readouterr().err
    assert not (run / "submission.csv").exists()
