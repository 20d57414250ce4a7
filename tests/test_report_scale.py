"""The report's evaluation at gallery scale: in top-M form it holds ranked lists and a histogram
sample, never N x N, with the dense path's figures and grids."""

from __future__ import annotations

import numpy as np
import pytest

from jaguar.config import RetrievalConfig
from jaguar.report import evaluation as report_evaluation
from jaguar.retrieval.features import FeatureSet
from tests.test_knn import clustered


def test_top_m_report_evaluation_equals_dense(monkeypatch):
    embeddings, labels = clustered(n_identities=20, per_identity=6, dim=8, duplicates=10, seed=3)
    features = FeatureSet([f"{i}.png" for i in range(len(labels))], embeddings, labels)
    dense = report_evaluation.evaluate("val", features, None, RetrievalConfig(mode="dense"))
    monkeypatch.setattr(report_evaluation, "HISTOGRAM_SAMPLE", 50)
    topm = report_evaluation.evaluate("val", features, None, RetrievalConfig(mode="topm", top_m=30))
    assert topm.balanced_map == pytest.approx(dense.balanced_map, abs=1e-9)
    np.testing.assert_allclose(topm.query_ap, dense.query_ap, atol=1e-9)
    np.testing.assert_array_equal(topm.ranked[:, :10], dense.ranked[:, :10])
    assert topm.cosine_sample.shape == (50, 50) and len(topm.sample_labels) == 50
    assert dense.cosine_sample.shape == (len(features), len(features))
    assert "top-30 lists" in topm.scored_with
