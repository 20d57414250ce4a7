"""The evaluator on hand-computed cases (ties, whatever the order of the images, queries without a match, the Market-1501 camera rule,
candidate pairs), its errors naming the real cause, and every caller reporting its numbers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from jaguar.config import ConfigError, RetrievalConfig
from jaguar.core.features import FeatureSet
from jaguar.core.evaluator import MetricsError, evaluate, identity_balanced_map

# Five images: identities 0, 0, 1, 1 and a singleton 2 (index 4). Row = query.
HAND_SIM = np.array([
    [0.0, 0.9, 0.8, 0.1, 0.95],  # ranking 4, 1*, 2, 3        -> AP 1/2, first match at 2, INP 1/2
    [0.2, 0.0, 0.9, 0.5, 0.0],   # ranking 2, 3, 0*, 4        -> AP 1/3, first match at 3, INP 1/3
    [0.7, 0.1, 0.0, 0.6, 0.0],   # ranking 0, 3*, 1, 4        -> AP 1/2, first match at 2, INP 1/2
    [0.3, 0.3, 0.3, 0.0, 0.0],   # tie: 0, 1, then 2* (ties: non-matches first) -> AP 1/3, first match 3
    [0.5, 0.4, 0.3, 0.2, 0.0],   # singleton: no true match   -> skipped
])
HAND_LABELS = [0, 0, 1, 1, 2]


def test_all_vs_all_hand_case():
    result = evaluate(HAND_SIM, HAND_LABELS, kind="similarity")
    assert result.per_identity_ap.keys() == {0, 1}  # the singleton identity has no query with a match
    assert result.per_identity_ap[0] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert result.per_identity_ap[1] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert result.mAP_balanced == pytest.approx(5 / 12) and result.mAP == pytest.approx(5 / 12)
    np.testing.assert_allclose(result.query_ap[:4], [1 / 2, 1 / 3, 1 / 2, 1 / 3])
    assert np.isnan(result.query_ap[4]) and np.isnan(result.query_inp[4])
    assert result.first_match_rank.tolist() == [2, 3, 2, 3, 0]
    assert (result.rank1, result.rank5, result.rank10) == (0.0, 1.0, 1.0)
    assert result.mINP == pytest.approx((1 / 2 + 1 / 3 + 1 / 2 + 1 / 3) / 4)
    assert (result.num_queries, result.num_skipped, result.camera_removed) == (4, 1, 0)
    assert identity_balanced_map(HAND_SIM, HAND_LABELS) == pytest.approx(5 / 12)
    # The same scores as distances (negated) rank the same way.
    as_distance = evaluate(-HAND_SIM, HAND_LABELS, kind="distance")
    assert as_distance.summary() == pytest.approx(result.summary())


def test_ties_rank_every_non_match_first_whatever_the_order():
    # All scores equal: every non-match is ranked before the true match. Query 0 sees 1, 2* (AP 1/2),
    # query 2 sees 1, 0* (AP 1/2); identity 1 is a singleton and is skipped.
    sim = np.full((3, 3), 0.5)
    result = evaluate(sim, [0, 1, 0], kind="similarity")
    assert result.per_identity_ap == {0: pytest.approx(1 / 2)}
    assert result.rank1 == 0.0 and result.mINP == pytest.approx(1 / 2)
    # The same images in another order score the same (a stable sort would give AP 1 here).
    assert identity_balanced_map(sim, [0, 0, 1]) == pytest.approx(1 / 2)
    assert evaluate(np.zeros((3, 3)), [0, 1, 0], kind="distance").mAP == pytest.approx(1 / 2)


def _reference(scores, q_label, g_label, valid):
    """The tie rule written plainly: each query's candidates sorted by (score descending, true
    match last), AP / INP / first match over the true matches' places."""
    ap, inp, first = [], [], []
    for q in range(scores.shape[0]):
        candidates = [(-scores[q, g], g_label[g] == q_label[q]) for g in range(scores.shape[1]) if valid[q, g]]
        is_match = [m for _, m in sorted(candidates)]
        places = [i + 1 for i, m in enumerate(is_match) if m]
        if not places:
            ap.append(np.nan), inp.append(np.nan), first.append(0)
            continue
        ap.append(np.mean([(j + 1) / place for j, place in enumerate(places)]))
        inp.append(len(places) / places[-1])
        first.append(places[0])
    return np.array(ap), np.array(inp), np.array(first)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_counting_equals_the_plain_tie_rule_on_random_ties(seed, monkeypatch):
    import jaguar.core.evaluator as metrics

    monkeypatch.setattr(metrics, "_CHUNK_BYTES", 16 * 60 * 7)  # 7 query rows a chunk: several chunks
    rng = np.random.default_rng(seed)
    n_query, n_gallery = 30, 60
    scores = rng.integers(0, 4, (n_query, n_gallery)).astype(np.float32)  # many exact ties
    q_label, g_label = rng.integers(0, 5, n_query), rng.integers(0, 5, n_gallery)
    q_cam, g_cam = rng.integers(0, 2, n_query), rng.integers(0, 2, n_gallery)
    candidates = rng.random((n_query, n_gallery)) > 0.2
    result = evaluate(scores, q_label, g_label, kind="similarity", query_cams=q_cam, gallery_cams=g_cam,
                      candidates=candidates)
    valid = candidates & ~((q_label[:, None] == g_label[None, :]) & (q_cam[:, None] == g_cam[None, :]))
    ap, inp, first = _reference(scores, q_label, g_label, valid)
    np.testing.assert_allclose(result.query_ap, ap, atol=1e-12)
    np.testing.assert_allclose(result.query_inp, inp, atol=1e-12)
    np.testing.assert_array_equal(result.first_match_rank, first)
    square = scores[:, :n_query].astype(np.int64)  # all-vs-all, integer scores, as distances
    result = evaluate(square, q_label, kind="distance")
    ap, _, first = _reference(-square, q_label, q_label, ~np.eye(n_query, dtype=bool))
    np.testing.assert_allclose(result.query_ap, ap, atol=1e-12)
    np.testing.assert_array_equal(result.first_match_rank, first)
    # Every order of the images gives every query the same figures.
    order = rng.permutation(n_query)
    permuted = evaluate(square[order][:, order], q_label[order], kind="distance")
    np.testing.assert_allclose(permuted.query_ap, result.query_ap[order], atol=1e-12)
    assert permuted.summary() == pytest.approx(result.summary(), abs=1e-12)


def test_embeddings_are_evaluated_chunk_by_chunk_as_their_score_matrix(monkeypatch):
    import jaguar.core.evaluator as metrics
    from jaguar.core.evaluator import evaluate_embeddings
    from tests.test_knn import clustered

    monkeypatch.setattr(metrics, "_CHUNK_BYTES", 16 * 240 * 13)
    features, labels = clustered(dim=8, duplicates=40)  # duplicate rows: exact ties
    expected = evaluate(features @ features.T, labels, kind="similarity")
    result = evaluate_embeddings(features, labels)
    assert result.summary() == pytest.approx(expected.summary(), abs=1e-9)
    np.testing.assert_allclose(result.query_ap, expected.query_ap, atol=1e-9)
    queries, gallery = features[:50], features[50:]
    expected = evaluate(queries @ gallery.T, labels[:50], labels[50:], kind="similarity")
    result = evaluate_embeddings(queries, labels[:50], gallery, labels[50:])
    np.testing.assert_allclose(result.query_ap, expected.query_ap, atol=1e-9)


def test_score_of_a_pair_file_does_not_depend_on_its_row_order(tmp_path: Path):
    """Two gallery images tie for a query, one its match and one not: `jaguar score` gives the
    same figures whichever the pair file lists first."""
    from jaguar.formats import write_labels, write_pairs, write_submission
    from jaguar.retrieval.score import score_submission

    names = ["a1.png", "a2.png", "b1.png", "b2.png"]
    write_labels(tmp_path / "labels.csv", [("a1.png", "A"), ("a2.png", "A"), ("b1.png", "B"), ("b2.png", "B")])
    similarity = {("a1.png", "a2.png"): 0.5, ("a1.png", "b1.png"): 0.5}  # the tie
    pairs = [(q, g) for q in names for g in names if q != g]
    scored = []
    for order in (pairs, pairs[::-1]):
        rows = [(f"{q}-{g}", q, g) for q, g in order]
        write_pairs(tmp_path / "test.csv", rows)
        write_submission(tmp_path / "sub.csv", [r for r, _, _ in rows],
                         np.array([similarity.get((q, g), 0.9 if q[0] == g[0] else 0.1) for _, q, g in rows]))
        scored.append(score_submission(tmp_path / "sub.csv", tmp_path / "test.csv", tmp_path / "labels.csv"))
    assert scored[0].mAP_balanced == pytest.approx(scored[1].mAP_balanced, abs=1e-12)
    assert scored[0].per_identity == pytest.approx(scored[1].per_identity, abs=1e-12)
    assert scored[0].per_identity["A"] == pytest.approx((1 / 2 + 1) / 2)  # a1: b1 before a2 in the tie


def test_balanced_differs_from_plain_map_and_weighs_identities_equally():
    # Identity 0 has 3 perfect queries, identity 1 has 2 queries with AP 1/6, identity 2 two perfect ones.
    labels = [0, 0, 0, 1, 1, 2, 2]
    features = torch.eye(7)
    sim = features @ features.T
    sim[:3, :3] += 1.0
    sim[3, 4] = sim[4, 3] = -1.0  # identity 1's match ranked last among six others
    sim[5, 6] = sim[6, 5] = 2.0
    result = evaluate(sim, labels, kind="similarity")
    ap_one = 1 / 6
    assert result.mAP_balanced == pytest.approx((1 + ap_one + 1) / 3)
    assert result.mAP == pytest.approx((5 + 2 * ap_one) / 7)
    assert result.rank1 == pytest.approx(5 / 7) and result.rank5 == pytest.approx(5 / 7)
    assert result.rank10 == 1.0
    assert result.mINP == pytest.approx((5 + 2 * ap_one) / 7)  # one match each: INP = AP, 2/2 for identity 0


def test_perfect_and_reversed_rankings():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    same = (labels[:, None] == labels[None, :]).double()
    assert identity_balanced_map(same, labels) == pytest.approx(1.0)
    # Reversed: each query's single match is ranked last of five.
    assert identity_balanced_map(-same, labels) == pytest.approx(1 / 5)


def test_query_gallery_with_cameras_hand_case():
    # Query 0: id 0, camera 0. Gallery: g0 same id+camera (ignored with cameras), g1 other, g2 match,
    # g3 other, g4 match. Query 1: id 1, camera 1; its only match g1 shares its camera.
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5],
                     [0.5, 0.1, 0.2, 0.3, 0.4]])
    q_labels, g_labels = [0, 1], [0, 1, 0, 2, 0]
    q_cams, g_cams = [0, 1], [0, 1, 1, 0, 2]
    with_cams = evaluate(dist, q_labels, g_labels, kind="distance", query_cams=q_cams, gallery_cams=g_cams)
    assert (with_cams.num_queries, with_cams.num_skipped, with_cams.camera_removed) == (1, 1, 2)
    assert with_cams.mAP == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert (with_cams.rank1, with_cams.rank5, with_cams.rank10) == (0.0, 1.0, 1.0)
    assert with_cams.mINP == pytest.approx(2 / 4)
    assert with_cams.first_match_rank.tolist() == [2, 0]

    no_cams = evaluate(dist, q_labels, g_labels, kind="distance")
    assert no_cams.num_queries == 2
    assert no_cams.mAP == pytest.approx(((1 + 2 / 3 + 3 / 5) / 3 + 1) / 2)
    assert no_cams.per_identity_ap == {0: pytest.approx((1 + 2 / 3 + 3 / 5) / 3), 1: 1.0}
    assert no_cams.rank1 == 1.0
    assert no_cams.mINP == pytest.approx((3 / 5 + 1) / 2)
    as_similarity = evaluate(-dist, q_labels, g_labels, kind="similarity")
    assert as_similarity.summary() == pytest.approx(no_cams.summary())


def test_camera_rule_in_all_vs_all():
    # Images 0 and 1 (identity 0) share camera 5: with cameras their pair is ignored, so identity 0
    # keeps only image 2 as a match.
    sim = np.array([[0.0, 0.9, 0.1, 0.5],
                    [0.9, 0.0, 0.5, 0.1],
                    [0.1, 0.5, 0.0, 0.9],
                    [0.5, 0.1, 0.9, 0.0]])
    labels, cams = [0, 0, 0, 1], [5, 5, 6, 6]
    result = evaluate(sim, labels, kind="similarity", query_cams=cams)
    assert result.camera_removed == 2  # (0, 1) and (1, 0)
    # query 0: 3, 2* -> 1/2; query 1: 2* -> 1; query 2: 3, 1*, 0* -> (1/2 + 2/3) / 2; query 3: no match
    assert result.per_identity_ap == {0: pytest.approx((1 / 2 + 1 + (1 / 2 + 2 / 3) / 2) / 3)}
    assert result.num_skipped == 1


def test_candidate_pairs_restrict_each_query():
    candidates = np.ones((5, 5), dtype=bool)
    candidates[0, 4] = False  # query 0 no longer sees the singleton ranked first
    result = evaluate(HAND_SIM, HAND_LABELS, kind="similarity", candidates=candidates)
    assert result.query_ap[0] == pytest.approx(1.0)
    assert result.per_identity_ap[0] == pytest.approx((1 + 1 / 3) / 2)


def test_errors_name_the_real_cause():
    with pytest.raises(MetricsError, match="NaN"):
        evaluate(np.array([[0, np.nan], [1, 0]]), [0, 0], kind="similarity")
    with pytest.raises(MetricsError, match="square"):
        evaluate(np.zeros((2, 3)), [0, 0], kind="similarity")
    with pytest.raises(MetricsError, match="kind must be"):
        evaluate(np.zeros((2, 2)), [0, 0], kind="cosine")
    with pytest.raises(MetricsError, match="every identity has a single image"):
        evaluate(np.zeros((2, 2)), [0, 1], kind="similarity")
    with pytest.raises(MetricsError, match="no query's identity appears in the gallery"):
        evaluate(np.zeros((2, 2)), [0, 1], [2, 3], kind="distance")
    with pytest.raises(MetricsError, match="among the candidate pairs"):
        evaluate(np.zeros((2, 2)), [0, 0], kind="similarity", candidates=np.eye(2, dtype=bool))
    with pytest.raises(MetricsError, match="both query_cams and gallery_cams"):
        evaluate(np.zeros((2, 2)), [0, 1], [0, 1], kind="distance", query_cams=[0, 0])


def test_camera_rule_that_removes_every_match_says_so():
    # Every query's only true match was taken by its own camera (Market-1501 protocol ignores it).
    dist = np.array([[0.1, 0.2, 0.3], [0.3, 0.1, 0.2]])
    with pytest.raises(MetricsError) as caught:
        evaluate(dist, [0, 1], [0, 1, 2], kind="distance", query_cams=[0, 1], gallery_cams=[0, 1, 0])
    message = str(caught.value)
    assert "same-camera rule" in message and "removed all 2 true match(es) of the 2 quer" in message
    assert "no query's identity appears" not in message


def _labelled_set(seed: int = 0) -> FeatureSet:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4])
    centres = torch.randn(5, 16, generator=generator)
    embeddings = torch.nn.functional.normalize(centres[labels] + 2.0 * torch.randn(11, 16, generator=generator),
                                               dim=1)
    names = [f"test_{i:04d}.png" for i in range(11)]
    return FeatureSet(names, embeddings, labels, {i: f"id{i}" for i in range(5)})


def _forbidden(*args, **kwargs):
    raise AssertionError("an N x N distance matrix was built")


def test_every_caller_reports_the_evaluators_numbers(tmp_path: Path, monkeypatch):
    """Training validation, tune-post, the report, `jaguar score` and its test-side stage table give
    the evaluator's figures."""
    import jaguar.train.validation as train_evaluate
    from jaguar.formats import write_labels, write_pairs, write_submission
    from jaguar.retrieval.split_figures import split_figures as report_evaluate
    from jaguar.config import PostConfig
    from jaguar.retrieval.post.tune import tune_post
    from jaguar.retrieval.post import dense as postprocess
    from jaguar.retrieval.score import score_submission, stage_table_on
    from jaguar.retrieval.submission import pair_similarities
    from jaguar.run import StageRow

    features = _labelled_set()
    expected = evaluate(features.embeddings @ features.embeddings.T, features.labels, kind="similarity")
    assert 0 < expected.mAP_balanced < 1 and expected.rank1 < 1  # not a trivial case
    figures = ("mAP_balanced", "mAP", "rank1", "rank5", "mINP")

    logged = {}
    tb = SimpleNamespace(scalars=lambda values, step: logged.update(values), image=None)
    monkeypatch.setattr(train_evaluate, "embed_positions", lambda *args, **kwargs: features.embeddings)
    cfg = SimpleNamespace(retrieval=SimpleNamespace(flip_tta=False))
    validation = train_evaluate.validate(None, SimpleNamespace(labels=features.labels.numpy()),
                                         list(range(len(features))), cfg, SimpleNamespace(is_main_process=False),
                                         None, None, tb, 0)
    assert validation == pytest.approx({k: expected.summary()[k] for k in figures})
    assert logged == pytest.approx({f"val/{k}": expected.summary()[k] for k in figures})

    _, table = tune_post(features, RetrievalConfig(), search=False)
    assert {k: table[0][k] for k in figures} == pytest.approx({k: expected.summary()[k] for k in figures})

    report = report_evaluate("test", features, None)
    assert report.metrics.summary() == pytest.approx(expected.summary())
    assert report.ap_by_identity == pytest.approx({f"id{k}": v for k, v in expected.per_identity_ap.items()})
    np.testing.assert_allclose(report.query_ap, expected.query_ap)
    raw_row = stage_table_on(features, [StageRow("raw", PostConfig(), 0.0)])[0]
    assert {k: getattr(raw_row, k) for k in figures} == pytest.approx({k: expected.summary()[k] for k in figures})
    rows = [StageRow("raw", PostConfig(), 0.0), StageRow("+QE", PostConfig(qe_k=2), 0.0)]
    dense_rows = stage_table_on(features, rows, RetrievalConfig(mode="dense"))
    monkeypatch.setattr(postprocess, "final_distance", _forbidden)  # the top-M form never builds N x N
    topm_rows = stage_table_on(features, rows, RetrievalConfig(mode="topm", top_m=4))
    monkeypatch.undo()
    for dense_row, topm_row in zip(dense_rows, topm_rows):  # exact figures: the same in both forms
        assert {k: getattr(topm_row, k) for k in figures} == pytest.approx(
            {k: getattr(dense_row, k) for k in figures}, abs=1e-9)

    pairs = [(f"r{q}_{g}", q_name, g_name) for q, q_name in enumerate(features.names)
             for g, g_name in enumerate(features.names) if q != g]
    write_pairs(tmp_path / "test.csv", pairs)
    write_labels(tmp_path / "labels.csv", [(n, f"id{int(label)}") for n, label in zip(features.names, features.labels)])
    row_ids, queries, galleries = map(list, zip(*pairs))
    write_submission(tmp_path / "sub.csv", row_ids,
                     pair_similarities(features, row_ids, queries, galleries, PostConfig()))
    scored = score_submission(tmp_path / "sub.csv", tmp_path / "test.csv", tmp_path / "labels.csv")
    assert {k: getattr(scored, k) for k in figures} == pytest.approx({k: expected.summary()[k] for k in figures})
    assert scored.per_identity == pytest.approx({f"id{k}": v for k, v in expected.per_identity_ap.items()})


def test_validation_without_any_match_is_a_config_error(monkeypatch):
    import jaguar.train.validation as train_evaluate

    features = _labelled_set()
    monkeypatch.setattr(train_evaluate, "embed_positions", lambda *args, **kwargs: features.embeddings[[0, 3, 5]])
    cfg = SimpleNamespace(retrieval=SimpleNamespace(flip_tta=False))
    with pytest.raises(ConfigError, match="single image.*data.val_fraction"):
        train_evaluate.validate(None, SimpleNamespace(labels=features.labels.numpy()), [0, 3, 5], cfg,
                                SimpleNamespace(is_main_process=False), None, None,
                                SimpleNamespace(scalars=None, image=None), 0)


def test_per_query_ap_with_several_matches():
    labels = np.array([0, 0, 1, 1, 0])
    scores = np.array([[9, 5, 7, 1, 3],  # query 0: ranking 2(x) 1(v) 4(v) 3(x) -> AP (1/2 + 2/3) / 2
                       [5, 9, 1, 1, 1],  # query 1: 0(v), then ties 2 3 4(v) by index -> AP (1 + 2/4) / 2
                       [7, 1, 9, 6, 1],  # query 2: 0(x) 3(v) -> AP 1/2
                       [1, 1, 6, 9, 1],  # query 3: 2(v) -> AP 1
                       [3, 1, 1, 1, 9]], dtype=float)  # query 4: 0(v), then ties 2 3 1(v) -> AP (1 + 2/4) / 2
    result = evaluate(scores, labels, kind="similarity")
    np.testing.assert_allclose(result.query_ap, [(1 / 2 + 2 / 3) / 2, (1 + 2 / 4) / 2, 1 / 2, 1.0, (1 + 2 / 4) / 2])
    np.testing.assert_allclose(result.query_inp, [2 / 3, 2 / 4, 1 / 2, 1.0, 2 / 4])


def test_validation_with_non_finite_embeddings_blames_the_model(monkeypatch):
    import jaguar.train.validation as train_evaluate

    features = _labelled_set()
    embeddings = features.embeddings.clone()
    embeddings[2, 0] = float("nan")
    monkeypatch.setattr(train_evaluate, "embed_positions", lambda *args, **kwargs: embeddings)
    cfg = SimpleNamespace(retrieval=SimpleNamespace(flip_tta=False))
    with pytest.raises(FloatingPointError, match="step 7: the model gives non-finite embeddings for 1 of 11") as caught:
        train_evaluate.validate(None, SimpleNamespace(labels=features.labels.numpy()), list(range(11)), cfg,
                                SimpleNamespace(is_main_process=False), None, None,
                                SimpleNamespace(scalars=None, image=None), 7)
    assert "val_fraction" not in str(caught.value)


def test_chance_is_the_mean_of_the_evaluator_over_every_ranking():
    import itertools

    from jaguar.core.evaluator import chance_map_balanced, evaluate

    labels = [0, 0, 1, 1, 1, 2]
    candidates = np.ones((6, 6), dtype=bool)
    candidates[0, 1] = False  # query 0 loses its only match: skipped, as the evaluator skips it
    candidates[2, 5] = False
    total, count = 0.0, 0
    for ranks in itertools.permutations(range(5)):  # every ordering of each query's 5 others, jointly
        scores = np.zeros((6, 6))
        for query in range(6):
            others = [g for g in range(6) if g != query]
            scores[query, others] = [-r for r in np.roll(ranks, query)]
        total += evaluate(scores, labels, kind="similarity", candidates=candidates).mAP_balanced
        count += 1
    assert chance_map_balanced(labels, candidates) == pytest.approx(total / count, abs=1e-12)
    # one match among 3 candidates: E[1 / rank] = H_3 / 3
    assert chance_map_balanced([0, 0, 1, 1]) == pytest.approx((1 + 1 / 2 + 1 / 3) / 3, abs=1e-12)
