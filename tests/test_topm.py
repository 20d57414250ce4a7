"""Post-processing in top-M form against the dense path on random clustered sets with ties
(duplicate images): QE, alpha-QE, DBA, re-ranking and the blend; tune-post in top-M mode."""

from __future__ import annotations

import copy

import pytest
import torch

from jaguar.config import Config, PostConfig, RetrievalConfig
from jaguar.core.features import FeatureSet
from jaguar.retrieval.post.dense import final_distance
from jaguar.retrieval.post.search import search_mode
from jaguar.retrieval.post.tune import tune_post
from jaguar.retrieval.post.qe import expand
from jaguar.retrieval.post.topm import expand_topm, final_topm
from tests.test_knn import clustered

POSTS = [PostConfig(), PostConfig(qe_k=3), PostConfig(qe_k=2, qe_alpha=3.0, dba_k=2), PostConfig(dba_k=3),
         PostConfig(rerank=True, k1=8, k2=3, lambda_value=0.3),
         PostConfig(qe_k=2, rerank=True, k1=5, k2=2, lambda_value=0.1, blend=0.5),
         PostConfig(rerank=True, k1=12, k2=6, lambda_value=0.6, blend=0.25)]


@pytest.fixture(scope="module")
def features():
    embeddings, labels = clustered(n_identities=30, per_identity=8, dim=12, duplicates=25, seed=7)
    return FeatureSet([f"{i}.png" for i in range(len(labels))], embeddings, labels)


@pytest.mark.parametrize("qe_k,alpha,dba_k", [(2, 0.0, 0), (3, 3.0, 0), (0, 0.0, 2), (3, 3.0, 2)])
def test_expansion_equals_dense(features, qe_k, alpha, dba_k):
    dense = expand(features.embeddings, qe_k, alpha, dba_k)
    assert torch.allclose(expand_topm(features, qe_k, alpha, dba_k), dense, atol=1e-5)


@pytest.fixture(scope="module")
def separated():
    """Clusters far enough apart that no item beyond a query's top 40 shares a k-reciprocal
    neighbour with it: where the dense top-M and the top-M mode must agree exactly."""
    embeddings, labels = clustered(n_identities=30, per_identity=8, dim=12, duplicates=25, seed=7, noise=0.25)
    return FeatureSet([f"{i}.png" for i in range(len(labels))], embeddings, labels)


@pytest.mark.parametrize("post", POSTS[4:], ids=lambda p: str(p.to_dict()))
@pytest.mark.parametrize("data", ["features", "separated"])
def test_re_ranked_lists_are_the_dense_values_in_dense_order(data, post, request):
    # Every listed pair has its dense value and the list is in dense order (ties by index).
    features = request.getfixturevalue(data)
    lists = final_topm(features, post, 40)
    dense_at_listed = final_distance(features, post).gather(1, lists.index)
    assert torch.allclose(lists.distance, dense_at_listed, atol=1e-5)
    step = dense_at_listed[:, 1:] - dense_at_listed[:, :-1]
    assert bool((step > -1e-6).all())
    own_step = lists.distance[:, 1:] - lists.distance[:, :-1]
    assert bool(((lists.index[:, 1:] > lists.index[:, :-1]) | (own_step > 0)).all())  # exact ties: by index


@pytest.mark.parametrize("post", POSTS, ids=lambda p: str(p.to_dict()))
@pytest.mark.parametrize("data", ["features", "separated"])
def test_top_m_lists_equal_the_dense_top_m(data, post, request):
    # Re-ranking brings items from beyond an item's M nearest into its top M (they share
    # k-reciprocal neighbours with it): the lists are still the whole dense top M.
    top_m, features = 40, request.getfixturevalue(data)
    lists = final_topm(features, post, top_m)
    dense = final_distance(features, post).clone()
    dense.fill_diagonal_(float("inf"))
    dense_values, dense_index = dense.sort(dim=1, stable=True)
    assert torch.allclose(lists.distance, dense_values[:, :top_m], atol=1e-5)
    assert torch.allclose(lists.distance, dense.gather(1, lists.index), atol=1e-5)  # each pair's own value
    # Order identical apart from exact ties: duplicate images, and items whose expanded vectors are
    # the same sum in another order (equal but for float rounding, ~1e-7); one past M shows a tie there.
    differs = lists.index != dense_index[:, :top_m]
    step_tied = (dense_values[:, 1:top_m + 1] - dense_values[:, :top_m]).abs() < 1e-6
    tied = step_tied.clone()
    tied[:, 1:] |= step_tied[:, :-1]
    assert not bool((differs & ~tied).any())
    assert lists.reordered == (post.rerank and post.blend > 0)


def _figures(row):
    return [row[k] for k in ("mAP_balanced", "mAP", "rank1", "rank5", "mINP")]


def tune_post_topm(features, base, search=True):
    """tune_post with the set searched in top-M form (retrieval.mode=topm)."""
    topm = copy.deepcopy(base)
    topm.mode = "topm"
    return tune_post(features, topm, search)


def use_topm(retrieval, n):
    return search_mode(retrieval, n) == "topm"


def test_tune_post_topm_with_whole_lists_equals_dense_tune_post(features):
    base = RetrievalConfig(tune_min_gain_se=0.0, top_m=len(features) - 1)
    dense_chosen, dense_table = tune_post(features, base)
    chosen, table = tune_post_topm(features, base)
    assert chosen == dense_chosen
    assert [row["name"] for row in table] == [row["name"] for row in dense_table]
    for row, dense_row in zip(table, dense_table):
        assert row["config"] == dense_row["config"]
        assert _figures(row) == pytest.approx(_figures(dense_row), abs=1e-6)


def test_tune_post_topm_short_lists_agree_before_re_ranking(features):
    base = RetrievalConfig(tune_min_gain_se=0.0, top_m=10)
    dense_chosen, dense_table = tune_post(features, base)
    chosen, table = tune_post_topm(features, base)
    for row, dense_row in zip(table[:2], dense_table[:2]):  # raw and +QE: exact at any M
        assert row["config"] == dense_row["config"]
        assert _figures(row) == pytest.approx(_figures(dense_row), abs=1e-9)


def test_mode_switch():
    retrieval = Config().retrieval
    assert retrieval.mode == "auto" and not use_topm(retrieval, retrieval.topm_above)
    assert use_topm(retrieval, retrieval.topm_above + 1)
    retrieval.mode = "dense"
    assert not use_topm(retrieval, 10**6)
    retrieval.mode = "topm"
    assert use_topm(retrieval, 10)


def test_tune_post_run_searches_in_top_m_mode_above_the_threshold(tmp_path, features):
    from jaguar.retrieval.post.tune import tune_post_run
    from jaguar.run import RunDir

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    config = Config()
    config.retrieval.topm_above, config.retrieval.top_m, config.retrieval.tune = 100, 10, False
    run.save_config(config)
    run.save_features("val", features)
    result = tune_post_run(run)
    _, table = tune_post_topm(features, config.retrieval, search=False)
    assert [row.mAP for row in result.table] == pytest.approx([row["mAP"] for row in table], abs=1e-12)
    config.retrieval.mode = "dense"
    run.save_config(config)
    _, dense_table = tune_post(features, config.retrieval, search=False)
    assert [row.mAP for row in tune_post_run(run).table] == pytest.approx([row["mAP"] for row in dense_table])
