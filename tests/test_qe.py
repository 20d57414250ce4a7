"""Query expansion, αQE and DBA on hand-built 2-D examples."""

from __future__ import annotations

import math

import pytest
import torch

from jaguar.retrieval.post.qe import database_augmentation, expand, query_expansion

A = [1.0, 0.0]
B = [0.8, 0.6]  # cos(A, B) = 0.8
C = [0.0, 1.0]  # cos(B, C) = 0.6, cos(A, C) = 0


def _unit(x: list[float]) -> torch.Tensor:
    v = torch.tensor(x)
    return v / v.norm()


def test_average_qe_includes_self_and_renormalises():
    result = query_expansion(torch.tensor([A, B, C]), k=2)
    assert torch.allclose(result[0], _unit([1.8, 0.6]), atol=1e-6)  # A + B
    assert torch.allclose(result[2], _unit([0.8, 1.6]), atol=1e-6)  # C + B
    assert torch.allclose(result.norm(dim=1), torch.ones(3))


def test_alpha_qe_weights_by_similarity_power():
    result = query_expansion(torch.tensor([A, B, C]), k=2, alpha=3.0)
    w = 0.8 ** 3
    assert torch.allclose(result[0], _unit([1 + w * 0.8, w * 0.6]), atol=1e-6)
    # Negative similarities get weight 0 rather than pulling the other way.
    opposite = query_expansion(torch.tensor([A, [-1.0, 0.0]]), k=2, alpha=1.0)
    assert torch.allclose(opposite[0], _unit(A), atol=1e-6)


def test_k_one_or_zero_is_the_identity_and_inputs_get_normalised():
    data = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    for k in (0, 1):
        assert torch.allclose(query_expansion(data, k), torch.tensor([A, C]))


def test_query_against_database_uses_k_minus_one_database_rows():
    result = query_expansion(torch.tensor([A]), k=2, database=torch.tensor([B, C]))
    assert torch.allclose(result[0], _unit([1.8, 0.6]), atol=1e-6)
    three = query_expansion(torch.tensor([A]), k=3, database=torch.tensor([B, C]))
    assert torch.allclose(three[0], _unit([1.8, 1.6]), atol=1e-6)


def test_dba_then_qe():
    data = torch.tensor([A, B, C])
    dba = database_augmentation(data, 2)
    assert torch.allclose(dba[1], _unit([0.8 + 1.0, 0.6 + 0.0]), atol=1e-6)  # B's nearest other is A
    assert torch.allclose(expand(data, qe_k=2, dba_k=2), query_expansion(dba, 2), atol=1e-6)
    assert torch.allclose(expand(data), torch.nn.functional.normalize(data, dim=1))


def test_duplicates_still_count_self_once():
    # Two identical rows: each must still be its own first neighbour, and k=2 averages the pair.
    data = torch.tensor([A, A, C])
    result = query_expansion(data, k=2)
    assert torch.allclose(result[:2], torch.tensor([A, A]), atol=1e-6)
    assert not math.isnan(float(result.sum()))
    with pytest.raises(ValueError, match="qe_alpha"):
        query_expansion(data, 2, alpha=-1)
