"""Exact top-M cosine neighbours: faiss and the torch kernel agree with a dense stable sort,
ties (duplicate images) broken by index."""

from __future__ import annotations

import pytest
import torch

from jaguar.core.knn import knn


def clustered(n_identities: int = 40, per_identity: int = 6, dim: int = 16, duplicates: int = 30,
              seed: int = 0, noise: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered unit features with exact duplicate rows (ties) and their labels."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_identities, dim, generator=generator)
    labels = torch.arange(n_identities).repeat_interleave(per_identity)
    features = centres[labels] + noise * torch.randn(len(labels), dim, generator=generator)
    copy_from = torch.randint(0, len(labels), (duplicates,), generator=generator)
    copy_to = torch.randint(0, len(labels), (duplicates,), generator=generator)
    features[copy_to] = features[copy_from]
    labels[copy_to] = labels[copy_from]
    return torch.nn.functional.normalize(features, dim=1), labels


def dense_top(features: torch.Tensor, k: int, exclude_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scores = features @ features.T
    if exclude_self:
        scores.fill_diagonal_(float("-inf"))
    values, index = scores.sort(dim=1, descending=True, stable=True)
    return values[:, :k], index[:, :k]


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_equals_dense_stable_sort_including_ties(backend, exclude_self):
    features, _ = clustered()
    for k in (1, 5, 37):
        found = knn(features, k=k, exclude_self=exclude_self, backend=backend, chunk=50)
        values, index = dense_top(features, k, exclude_self)
        assert torch.equal(found.index, index), (backend, k)
        assert torch.allclose(found.similarity, values, atol=1e-5)


def test_knn_tie_groups_longer_than_the_search_margin_keep_index_order():
    # 30 copies of one vector: every query's top 10 is a tie resolved by the lowest indices.
    base = torch.nn.functional.normalize(torch.randn(1, 8), dim=1)
    features = torch.cat([base.repeat(30, 1), torch.nn.functional.normalize(torch.randn(20, 8), dim=1)])
    for backend in ("faiss", "torch"):
        found = knn(features[:30], features, k=10, backend=backend)
        assert torch.equal(found.index, torch.arange(10).expand(30, 10))


def test_knn_query_gallery_and_faiss_torch_agree():
    features, _ = clustered(seed=3)
    queries, gallery = features[:50], features[50:]
    a = knn(queries, gallery, k=20, backend="faiss")
    b = knn(queries, gallery, k=20, backend="torch")
    assert torch.equal(a.index, b.index)
    assert torch.allclose(a.similarity, b.similarity, atol=1e-5)


def test_knn_caps_k_and_rejects_bad_input():
    features, _ = clustered(n_identities=2, per_identity=3, duplicates=0)
    assert knn(features, k=100, exclude_self=True).index.shape == (6, 5)
    with pytest.raises(ValueError, match="queries"):
        knn(torch.full((3, 4), float("nan")), k=1)
    with pytest.raises(ValueError, match="dimensions"):
        knn(features, torch.randn(4, 3), k=1)
