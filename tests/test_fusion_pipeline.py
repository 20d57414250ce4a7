"""Calibrated fusion of the global similarity with local matches through the pipeline: tune-post's
local only and fused rows and their adoption, post.json (old files still load), the one search
decision (dense and top-M agree; weight 1 is the global ranking alone, 0 the local evidence first),
submit's comparable rows, rank and score's test table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jaguar.config import PostConfig, RetrievalConfig
from jaguar.core.evaluator import evaluate
from jaguar.core.features import FeatureSet
from jaguar.errors import MissingInputError
from jaguar.retrieval.post.fusion import FusionModel, IsotonicCalibrator, shortlist_pairs
from jaguar.retrieval.post.local_evidence import LocalEvidence, LocalEvidenceError, load_local_evidence
from jaguar.retrieval.post.search import final_ranking
from jaguar.retrieval.post.tune import format_stage_table, tune_post_run
from jaguar.run import PostResult, RunDir, StageRow
from synthetic_matches import synthetic_matches


def _features(n_ids: int = 10, per_id: int = 5, noise: float = 1.6, seed: int = 0, prefix: str = "val",
              labelled: bool = True) -> FeatureSet:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_ids, 16, generator=generator)
    labels = torch.arange(n_ids).repeat_interleave(per_id)
    embeddings = centres[labels] + noise * torch.randn(len(labels), 16, generator=generator)
    names = [f"{prefix}_{i:04d}.png" for i in range(len(labels))]
    return FeatureSet(names, torch.nn.functional.normalize(embeddings, dim=1),
                      labels if labelled else torch.full_like(labels, -1), {i: f"J{i}" for i in range(n_ids)})


def _evidence(features: FeatureSet, **kwargs) -> LocalEvidence:
    matches = synthetic_matches(features, **kwargs)
    return LocalEvidence(matches.shortlist, matches.matches.scores.astype(np.float64), matches,
                         np.arange(len(features)))


def _model(features: FeatureSet, local: LocalEvidence, weight: float, post: PostConfig = PostConfig()) -> FusionModel:
    global_scores = final_ranking(features, post).global_scores()
    g, s, same = shortlist_pairs(global_scores, local.shortlist, local.scores, features.labels.numpy())
    return FusionModel(IsotonicCalibrator.fit(g, same), IsotonicCalibrator.fit(s, same), weight)


def test_weight_1_ranks_as_the_global_setting_alone_and_0_puts_the_local_evidence_first():
    features = _features()
    local = _evidence(features)
    post = PostConfig(qe_k=2)
    for mode in ("dense", "topm"):
        retrieval = RetrievalConfig(mode=mode, top_m=20)
        alone = final_ranking(features, post, retrieval).lists(20)
        fused = final_ranking(features, post, retrieval, _model(features, local, 1.0, post), local).lists(20)
        assert torch.equal(alone.index, fused.index), mode
    model = _model(features, local, 0.0, post)
    lists = final_ranking(features, post, RetrievalConfig(mode="dense"), model, local).lists(5)
    probability = model.local_calibrator(local.scores)
    for query in range(len(features)):
        best_column = int(np.argmax(probability[query]))
        if probability[query, best_column] > model.local_floor:  # the strongest local evidence ranks first
            assert probability[query][local.shortlist[query] == int(lists.index[query, 0])][0] == \
                probability[query, best_column]


@pytest.mark.parametrize("post", [PostConfig(), PostConfig(qe_k=2, dba_k=2)])
def test_dense_and_top_m_fused_rankings_agree(post):
    features = _features(n_ids=12, per_id=5)
    local = _evidence(features, width=10)
    model = _model(features, local, 0.5, post)
    dense = final_ranking(features, post, RetrievalConfig(mode="dense"), model, local)
    topm = final_ranking(features, post, RetrievalConfig(mode="topm", top_m=15), model, local)
    assert topm.mode == "topm" and dense.mode == "dense"
    dense_lists, topm_lists = dense.lists(15), topm.lists(15)
    assert torch.equal(dense_lists.index, topm_lists.index)
    # the same values up to float32 rounding of the cosines (the calibration is steep in places)
    torch.testing.assert_close(dense_lists.distance.float(), topm_lists.distance.float(), atol=1e-4, rtol=0)
    # the fused ranking differs from the global one: the local evidence moved candidates
    assert not torch.equal(final_ranking(features, post, RetrievalConfig(mode="dense")).lists(15).index,
                           dense_lists.index)


def _run(tmp_path, informative: bool = True, with_matches: bool = True) -> RunDir:
    run = RunDir(tmp_path / "run")
    val = _features()
    run.save_features("val", val)
    if with_matches:
        run.local_matches_path("val").parent.mkdir(parents=True, exist_ok=True)
        synthetic_matches(val, informative=informative).save(run.local_matches_path("val"))
    return run


def _strict(text: str):
    return json.loads(text, parse_constant=lambda token: pytest.fail(f"non-strict JSON constant {token}"))


def test_tune_post_without_local_matches_keeps_the_global_table(tmp_path):
    result = tune_post_run(_run(tmp_path, with_matches=False))
    assert [row.name for row in result.table] == ["raw", "+QE", "+re-ranking", "blend (chosen)"]
    assert result.fusion is None and not result.fuses


def test_tune_post_with_local_matches_adds_local_only_and_fused_rows_and_adopts_by_the_1_se_rule(tmp_path):
    run = _run(tmp_path)
    result = tune_post_run(run)
    names = [row.name for row in result.table]
    assert names == ["raw", "+QE", "+re-ranking", "local only", "fused", "blend (chosen)"]
    rows = {row.name: row for row in result.table}
    fused, chosen = rows["fused"], rows["blend (chosen)"]
    assert rows["local only"].fusion_weight == 0.0 and 0.0 <= fused.fusion_weight <= 1.0
    assert fused.adopted == (fused.gain > 0 and fused.gain > fused.gain_se)
    # informative local evidence over a weak global descriptor: fused is adopted and chosen
    assert fused.adopted and result.fuses and chosen.fusion_weight == fused.fusion_weight
    assert chosen.mAP_balanced == fused.mAP_balanced > rows["raw"].mAP_balanced
    assert result.fusion.shortlist == 8 and result.fusion.folds == 2
    assert [entry["weight"] for entry in result.fusion.by_weight] == pytest.approx([0.1 * i for i in range(11)])
    stored = _strict(run.post_path.read_text())
    assert FusionModel.from_dict(stored["fusion"]["model"]).weight == fused.fusion_weight
    assert run.load_post() == result
    text = format_stage_table(result.table)
    assert "local only (inliers" in text and f"\nfused with local (w = {fused.fusion_weight:g})" in text
    assert f"chosen: {chosen.config.describe()} + fused with local (w = {fused.fusion_weight:g})" in text


def test_tune_post_fuses_in_top_m_form_too(tmp_path):
    run = _run(tmp_path)
    run.config_path.write_text("retrieval:\n  mode: topm\n  top_m: 12\n")
    result = tune_post_run(run)
    rows = {row.name: row for row in result.table}
    assert list(rows) == ["raw", "+QE", "+re-ranking", "local only", "fused", "blend (chosen)"]
    assert rows["fused"].adopted and result.fuses and result.fusion.folds == 2
    assert rows["local only"].mAP_balanced > rows["raw"].mAP_balanced + 0.1
    # the top-M figures of the chosen fusion are those of the fused lists the pipeline ranks by
    from jaguar.retrieval.post.search import score_setting, tuning_space

    features = run.load_features("val").normalized()
    local = load_local_evidence(run, "val", features.names)
    model = FusionModel.from_dict(result.fusion.model)
    space = tuning_space(features, features.labels, run.load_config().retrieval)
    whole = score_setting(space, result.chosen, model, local)  # calibrators fitted on every pair
    assert whole.mAP_balanced == pytest.approx(rows["fused"].mAP_balanced, abs=0.1)  # vs cross-fitted


def test_uninformative_local_matches_are_not_adopted(tmp_path):
    result = tune_post_run(_run(tmp_path, informative=False))
    rows = {row.name: row for row in result.table}
    assert not rows["fused"].adopted and not result.fuses and result.fusion is not None
    assert rows["blend (chosen)"].fusion_weight is None


def test_local_matches_of_other_features_are_refused(tmp_path):
    run = _run(tmp_path)
    other = _features(prefix="other")
    synthetic_matches(other).save(run.local_matches_path("val"))
    with pytest.raises(LocalEvidenceError, match=r"jaguar match .* --split val --force"):
        tune_post_run(run)
    stale = synthetic_matches(run.load_features("val"))
    stale.meta["features_sha256"] = "0" * 64  # matched on features extracted before these
    stale.save(run.local_matches_path("val"))
    with pytest.raises(LocalEvidenceError, match=r"earlier val features .* re-run `jaguar match .* --split val`"):
        tune_post_run(run)


def test_a_post_json_written_before_fusion_loads(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    row = {"name": "raw", "config": PostConfig().to_dict(), "mAP_balanced": 0.5, "mAP": 0.4, "rank1": 0.6,
           "rank5": 0.8, "rank10": 0.9, "mINP": 0.2, "gain": None, "gain_se": None, "adopted": None}
    table = [row, {**row, "name": "blend (chosen)"}]
    run.post_path.write_text(json.dumps({"chosen": PostConfig().to_dict(), "table": table, "val_size": 50,
                                         "searched": True}))
    post = run.load_post()
    assert post.fusion is None and not post.fuses and post.table[0].fusion_weight is None
    assert post.table[1].label() == "chosen: cosine similarity"


def _fused_run(tmp_path) -> tuple[RunDir, FeatureSet, FusionModel]:
    """A run whose tune-post adopted the fusion, with test features (labelled) and their matches."""
    run = _run(tmp_path)
    result = tune_post_run(run)
    assert result.fuses
    test = _features(n_ids=8, per_id=4, seed=3, prefix="test")
    run.save_features("test", test)
    return run, test, FusionModel.from_dict(result.fusion.model)


def _pair_list(tmp_path, names) -> str:
    path = tmp_path / "test.csv"
    path.write_text("row_id,query_image,gallery_image\n" + "".join(
        f"{q}_{g},{a},{b}\n" for q, a in enumerate(names) for g, b in enumerate(names) if q != g))
    return str(path)


def test_submit_fuses_and_pairs_outside_a_shortlist_sit_at_the_local_floor(tmp_path):
    from jaguar.formats import read_submission
    from jaguar.retrieval.submission import submit_run

    run, test, model = _fused_run(tmp_path)
    pairs = _pair_list(tmp_path, test.names)
    with pytest.raises(MissingInputError, match=r"jaguar match .* --split test"):
        submit_run(run, pairs)
    matches = synthetic_matches(test, seed=5)
    matches.save(run.local_matches_path("test"))
    result = submit_run(run, pairs)
    assert result.fused
    table = read_submission(result.path)
    by_row = dict(zip(table.row_ids, table.similarity))
    global_scores = final_ranking(test, result.post).global_scores()
    inliers = {(q, int(g)): float(s) for q in range(len(test))
               for g, s in zip(matches.shortlist[q], matches.matches.scores[q])}
    values = np.array(list(by_row.values()))
    assert values.min() >= 0.0 and values.max() <= 1.0
    for q in range(len(test)):
        for g in range(len(test)):
            if q == g:
                continue
            local = inliers.get((q, g))
            expected = model.fuse(global_scores[q, g], local)  # outside the shortlist: the local floor
            assert by_row[f"{q}_{g}"] == pytest.approx(float(expected), abs=2e-6)
    # every row on one scale: a pair outside its shortlist never beats the floor's fused probability
    outside = [by_row[f"{q}_{g}"] for q in range(len(test)) for g in range(len(test))
               if q != g and (q, g) not in inliers]
    assert max(outside) <= model.weight * model.global_calibrator.probabilities[-1] + \
        (1 - model.weight) * model.local_floor + 1e-9


def test_rank_and_score_table_use_the_fusion(tmp_path):
    import pyarrow.parquet as pq

    from jaguar.retrieval.rank import rank_run
    from jaguar.retrieval.score import score_run
    from jaguar.retrieval.submission import submit_run

    run, test, model = _fused_run(tmp_path)
    synthetic_matches(test, seed=5).save(run.local_matches_path("test"))
    local = load_local_evidence(run, "test", test.names)
    ranked = rank_run(run, "test", top_k=5)
    galleries = pq.read_table(ranked.path).column("gallery").to_pylist()
    expected = final_ranking(test, run.load_post().chosen, None, model, local).lists(5)
    assert galleries == [test.names[i] for i in expected.index.reshape(-1).tolist()]
    pairs = _pair_list(tmp_path, test.names)
    submit_run(run, pairs)
    labels = tmp_path / "labels.csv"
    labels.write_text("filename,ground_truth\n" + "".join(
        f"{n},J{int(l)}\n" for n, l in zip(test.names, test.labels)))
    score, score_table = score_run(run, pairs, labels)
    rows = {row.name: row for row in score_table.table}
    assert set(rows) == {"raw", "+QE", "+re-ranking", "local only", "fused", "blend (chosen)"}
    fused = evaluate(expected_distance(test, run, model, local), test.labels.numpy(), kind="distance")
    assert rows["blend (chosen)"].mAP_balanced == pytest.approx(fused.mAP_balanced)
    assert score.mAP_balanced == pytest.approx(fused.mAP_balanced)  # the submission ranks as the chosen row


def expected_distance(test, run, model, local):
    return 1 - final_ranking(test, run.load_post().chosen, None, model, local).similarity()
