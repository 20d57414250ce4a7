"""The report at gallery scale: in top-M form it works from ranked lists (`jaguar rank`'s file when
the run has one) and a histogram sample, never N x N; its list figures bound the evaluator's."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jaguar.config import Config, PostConfig, RetrievalConfig
from jaguar.report import build_report
from jaguar.report import grids
from jaguar.retrieval import split_figures as report_evaluation
from jaguar.retrieval.post import search
from jaguar.report import plots
from jaguar.core.features import FeatureSet
from jaguar.core.evaluator import MetricsError, evaluate
from jaguar.core.evaluator_ranked import list_bounds
from jaguar.retrieval.rank import RankError, rank_run, read_ranks, write_ranks
from jaguar.run import PostResult, RunDir
from tests.test_knn import clustered, dense_top


def _features(n_identities: int = 20, per_identity: int = 6, seed: int = 3, noise: float = 0.6) -> FeatureSet:
    embeddings, labels = clustered(n_identities=n_identities, per_identity=per_identity, dim=8, duplicates=10,
                                   seed=seed, noise=noise)
    return FeatureSet([f"img_{i:04d}.png" for i in range(len(labels))], embeddings, labels,
                      {i: f"jaguar {i}" for i in range(n_identities)})


@pytest.mark.parametrize("top_k", [3, 10, 119])
def test_list_bounds_bound_the_evaluator_and_equal_it_when_every_match_is_listed(top_k):
    features = _features(noise=1.2)  # hard: many matches fall beyond short lists
    exact = evaluate(features.embeddings @ features.embeddings.T, features.labels, kind="similarity")
    _, lists = dense_top(features.embeddings, top_k, exclude_self=True)
    bounds = list_bounds(lists.numpy(), features.labels.numpy())
    lower, upper, complete = bounds.lower, bounds.upper, bounds.complete
    assert np.all(lower.query_ap <= exact.query_ap + 1e-12)
    assert np.all(exact.query_ap <= upper.query_ap + 1e-12)
    np.testing.assert_allclose(lower.query_ap[complete], exact.query_ap[complete], atol=1e-12)
    np.testing.assert_allclose(upper.query_ap[complete], exact.query_ap[complete], atol=1e-12)
    if top_k == 119:  # the whole ranking: the bounds close
        assert complete.all()
    else:
        assert not complete.all()
    for rank in (1, 5, 10):
        if rank <= top_k:
            for bound in (lower, upper):
                assert getattr(bound, f"rank{rank}") == pytest.approx(getattr(exact, f"rank{rank}"), abs=1e-12)
    identities = sorted(exact.per_identity_ap)
    assert sorted(lower.per_identity_ap) == sorted(upper.per_identity_ap) == identities
    for i in identities:
        assert lower.per_identity_ap[i] <= exact.per_identity_ap[i] + 1e-12 <= upper.per_identity_ap[i] + 2e-12
    assert lower.mAP_balanced <= exact.mAP_balanced + 1e-12 <= upper.mAP_balanced + 2e-12


def test_list_bounds_count_missing_matches_as_not_retrieved_or_right_after_the_list():
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3])
    # query 0: miss, hit, item 2 missing; query 6: its match 7 missing from its list
    lists = np.array([[3, 1], [0, 2], [1, 0], [4, 0], [3, 0], [0, 1], [0, 1], [6, 0]])
    bounds = list_bounds(lists, labels)
    assert bounds.lower.query_ap[0] == pytest.approx((1 / 2) / 2, abs=1e-14)  # AP@2
    assert bounds.upper.query_ap[0] == pytest.approx((1 / 2 + 2 / 3) / 2)  # item 2 at rank 3
    assert bounds.lower.query_ap[6] == pytest.approx(0.0, abs=1e-14)
    assert bounds.upper.query_ap[6] == pytest.approx(1 / 3)
    assert bounds.complete.tolist() == [False, True, True, True, True, True, False, True]
    assert np.isnan(bounds.lower.query_ap[5]) and np.isnan(bounds.upper.query_ap[5])  # no match: not averaged
    assert bounds.lower.num_queries == 7
    assert bounds.lower.rank1 == pytest.approx(5 / 7) and bounds.upper.rank1 == pytest.approx(5 / 7)
    with pytest.raises(MetricsError, match="hold the query itself"):
        list_bounds(np.array([[0, 1]] * 8), labels)
    with pytest.raises(MetricsError, match="single image"):
        list_bounds(np.array([[1], [0]]), np.array([0, 1]))


def test_read_ranks_gives_back_the_written_lists_in_any_row_order(tmp_path):
    features = _features()
    names = list(features.names)
    _, lists = dense_top(features.embeddings, 7, exclude_self=True)
    path = tmp_path / "ranks.parquet"
    write_ranks(path, names, lists, torch.zeros(lists.shape), queries_per_chunk=16)
    assert torch.equal(read_ranks(path, names, batch_rows=50), lists)
    table = pq.read_table(path)
    shuffled = table.take(pa.array(np.random.default_rng(0).permutation(table.num_rows)))
    pq.write_table(shuffled, tmp_path / "shuffled.parquet")
    assert torch.equal(read_ranks(tmp_path / "shuffled.parquet", names), lists)
    with pytest.raises(RankError, match="img_0003.png.*not among"):
        read_ranks(path, names[:3] + names[4:])  # the file ranks an image these features do not hold
    pq.write_table(table.slice(0, table.num_rows - 1), tmp_path / "short.parquet")
    with pytest.raises(RankError, match="short.parquet.*equal length"):
        read_ranks(tmp_path / "short.parquet", names)
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(RankError, match="bad.parquet"):
        read_ranks(tmp_path / "bad.parquet", names)


def test_top_m_report_evaluation_searches_lists_when_it_has_none(monkeypatch):
    features = _features(noise=0.2)
    dense = report_evaluation.split_figures("val", features, None, RetrievalConfig(mode="dense"))
    monkeypatch.setattr(report_evaluation, "HISTOGRAM_SAMPLE", 50)
    monkeypatch.setattr(report_evaluation.evaluator, "evaluate", _forbidden)  # no N x N evaluation
    topm = report_evaluation.split_figures("val", features, None, RetrievalConfig(mode="topm", top_m=30))
    assert topm.metrics is None and "top-30 lists searched" in topm.scored_with
    assert grids.grid_rows(topm, None, "worst", 2, 5)[0].note.startswith("AP@30 ")
    np.testing.assert_allclose(topm.query_ap, dense.query_ap, atol=1e-9)  # 6 an identity: all within 30
    assert topm.ap_by_identity == pytest.approx(dense.ap_by_identity)
    np.testing.assert_array_equal(topm.ranked[:, :10], dense.ranked[:, :10])
    assert topm.cosine_sample.shape == (50, 50) and len(topm.sample_labels) == 50
    assert dense.cosine_sample.shape == (len(features), len(features))


def _forbidden(*args, **kwargs):
    raise AssertionError("the N x N path ran at gallery scale")


def _scale_run(tmp_path, features: FeatureSet) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.save_features("val", features)
    run.save_features("test", features)  # labels stored with them: test-side figures too
    config = Config()
    config.retrieval.mode, config.retrieval.top_m = "topm", 20
    run.save_config(config)
    run.save_post(PostResult(PostConfig(), [], val_size=len(features), searched=False))
    return run


def test_report_at_scale_reads_jaguar_ranks_lists_and_searches_nothing(tmp_path, monkeypatch):
    features = _features(n_identities=30, per_identity=8, noise=1.2)
    run = _scale_run(tmp_path, features)
    for split in ("val", "test"):
        rank_run(run, split, top_k=20)
    for name in ("final_topm", "final_distance"):  # the search computes nothing: the lists are read
        monkeypatch.setattr(search, name, _forbidden)
    monkeypatch.setattr(report_evaluation.evaluator, "evaluate", _forbidden)
    text = build_report(run).read_text()
    assert text.count("the top-20 lists of ranks_val.parquet") == 1
    assert text.count("the top-20 lists of ranks_test.parquet") == 1
    lists = read_ranks(run.ranks_path("val"), list(features.names))
    bounds = list_bounds(lists.numpy(), features.labels.numpy())
    assert f"rank-1 {bounds.lower.rank1:.4f}" in text
    assert f"between {bounds.lower.mAP_balanced:.4f} and {bounds.upper.mAP_balanced:.4f}" in text
    for figure in ("per_identity_ap_val.png", "retrieval_worst_val.png", "similarity_test.png"):
        assert (run.report_dir / figure).is_file(), figure

    # a ranking older than the post-processing it should follow is not used: the report searches
    later = run.ranks_path("val").stat().st_mtime + 10
    os.utime(run.post_path, (later, later))
    monkeypatch.undo()
    text = build_report(run).read_text()
    assert "ranks_val.parquet is older than post.json" in text and "jaguar rank" in text
    assert "top-20 lists searched for this report" in text


def test_report_at_scale_without_ranks_says_how_to_make_them(tmp_path):
    features = _features()
    run = _scale_run(tmp_path, features)
    run.ranks_path("test").write_text("not parquet")
    text = build_report(run).read_text()
    assert "No ranked lists (ranks_val.parquet)" in text
    assert "ranks_test.parquet was not used" in text and "ranks_test.parquet could not be read" in text
    assert text.count("lists searched for this report") == 2


def test_per_identity_chart_of_many_identities_stays_small(tmp_path):
    rng = np.random.default_rng(0)
    ap = {f"jaguar {i}": float(v) for i, v in enumerate(rng.uniform(size=5000))}
    upper = {name: min(1.0, value + 0.05) for name, value in ap.items()}
    path = plots.plot_per_identity_ap(ap, tmp_path / "ap.png", "Per-identity AP (val)", upper)
    with Image.open(path) as image:
        assert image.height < 1500 and image.width < 1500
    few = plots.plot_per_identity_ap(dict(list(ap.items())[:5]), tmp_path / "few.png", "few")
    with Image.open(few) as image:
        assert image.height < 400
