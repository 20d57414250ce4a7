"""Finite outputs and finite gradients for every layer and loss over the settings the config accepts,
in fp32, bf16 and fp16, including the degenerate inputs a real network produces: all-zero channels
after a ReLU, a zero-length embedding, an embedding exactly on (cos = 1) or opposite (cos = -1) a
class centre, a batch of identical features."""

import itertools
import math

import pytest
import torch

from jaguar.config import load_config
from jaguar.models.heads import build_head
from jaguar.models.losses import ReIDCriterion, batch_hard_triplet_loss
from jaguar.models.neck import Neck
from jaguar.models.pooling import GeM, GlobalPool
from jaguar.models.backbone import BackboneFeatures
from jaguar.models.reid import ReIDOutput

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor.float()).all())


def _relu_grid(dtype: torch.dtype, peak: float) -> torch.Tensor:
    """B x C x h x w activations after a ReLU: channel 1 all zero, channel 2 one large response."""
    grid = torch.relu(torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0)))
    grid[:, 1] = 0.0
    grid[:, 2, 0, 0] = peak
    return grid.to(dtype).requires_grad_(True)


@pytest.mark.parametrize("dtype", DTYPES)
# 1..8 is what model.gem_p accepts; a learnable p can drift past it during training (20, 60).
@pytest.mark.parametrize("p", [1.0, 3.0, 6.5, 7.5, 8.0, 20.0, 60.0])
def test_gem_output_and_gradients_finite_with_an_all_zero_channel(dtype, p):
    gem = GeM(p=p, learnable=True)
    peak = 6e4 if dtype == torch.float16 else 1e3  # x^p overflows fp32 for these at large p
    grid = _relu_grid(dtype, peak)
    pooled = gem(grid)
    assert pooled.dtype == dtype and _finite(pooled)
    pooled.float().sum().backward()
    assert _finite(grid.grad) and _finite(gem.p.grad)
    # The all-zero channel pools to eps (every position equal), whatever p is.
    torch.testing.assert_close(pooled[:, 1].float(), torch.full((3,), 1e-6), rtol=2e-2, atol=0)
    # The exact value still, against a float64 reference (itself rescaled: 1e-6^60 underflows float64).
    reference = grid.detach().double().clamp(min=1e-6)
    peak = reference.amax(dim=(-2, -1), keepdim=True)
    expected = (reference / peak).pow(p).mean(dim=(-2, -1)).pow(1.0 / p) * peak[..., 0, 0]
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(pooled.double(), expected, rtol=tolerance, atol=1e-6)


def test_gem_direct_form_unchanged_where_it_is_in_range():
    # Ordinary activations take the plain (mean x^p)^(1/p), bit for bit, so trained models reproduce.
    grid = torch.rand(2, 3, 4, 5) + 0.01
    gem = GeM(p=3.0)
    plain = grid.clamp(min=1e-6).pow(gem.p).mean(dim=(-2, -1)).pow(1.0 / gem.p)
    assert torch.equal(gem(grid), plain)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["avg", "max", "avgmax"])
def test_other_poolings_finite_on_zero_channels(dtype, method):
    grid = _relu_grid(dtype, 10.0)
    pooled = GlobalPool(method)(BackboneFeatures(grid=grid, cls_token=None))
    pooled.float().sum().backward()
    assert _finite(pooled) and _finite(grid.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce_dim", [0, 4])
def test_neck_finite_on_identical_and_zero_features(dtype, reduce_dim):
    neck = Neck(in_dim=6, reduce_dim=reduce_dim, bnneck=True, dropout=0.5).train()
    for pooled in (torch.zeros(4, 6), torch.ones(4, 6) * 3.0):  # zero variance over the batch
        pooled = pooled.to(dtype).requires_grad_(True)
        features, embedding = neck.to(dtype)(pooled)
        (features.float().sum() + neck.head_input(embedding).float().pow(2).sum()).backward()
        assert _finite(features) and _finite(embedding) and _finite(pooled.grad)


def _degenerate_embeddings(head: torch.nn.Module, dim: int) -> torch.Tensor:
    weight = head.weight.detach()
    return torch.stack([
        torch.zeros(dim),  # a zero-length embedding
        weight[0] * 5.0,  # exactly on a class centre: cos = 1
        -weight[1],  # exactly opposite one: cos = -1
        weight[2] * 1e-6,  # a direction, but far shorter than any real embedding
        torch.randn(dim, generator=torch.Generator().manual_seed(1)),
    ])


HEAD_SETTINGS = (
    [f"model.head=arcface,model.head_scale={scale},model.head_margin={margin},model.easy_margin={easy}"
     for scale, margin, easy in itertools.product([1.0, 64.0], [0.0, 0.5, 1.5], [False, True])]
    + ["model.head=subcenter_arcface,model.head_scale=64,model.head_margin=1.5"]
    + [f"model.head=cosface,model.head_scale={scale},model.head_margin={margin}"
       for scale, margin in itertools.product([1.0, 64.0], [0.0, 0.35, 2.0])]
    + ["model.head=softmax"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("settings", HEAD_SETTINGS)
def test_heads_and_cross_entropy_finite_on_degenerate_embeddings(dtype, settings):
    cfg = load_config(None, [*settings.split(","), "loss.label_smoothing=0.1"])
    dim, classes = 8, 4
    head = build_head(cfg.model, dim, classes)
    embedding = _degenerate_embeddings(head, dim).to(dtype).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 2, 3])
    # as in training: mixed precision runs under autocast (the head keeps fp32 weights)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        similarity = head(embedding)
    criterion = ReIDCriterion(cfg, classes, dim)
    terms = criterion(ReIDOutput(features=embedding, embedding=embedding, similarity=similarity), labels)
    terms["loss"].backward()
    assert _finite(similarity) and _finite(terms["loss"])
    assert _finite(embedding.grad), embedding.grad
    assert _finite(head.weight.grad)
    # bounded, not merely finite: the zero-length embedding's gradient stays far from fp16's 65504.
    assert embedding.grad.float().abs().max() < 2e4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin", [0.0, 0.3, 1.0])
def test_triplet_and_center_finite_on_identical_and_zero_features(dtype, margin):
    cfg = load_config(None, ["model.head=softmax", "loss.triplet_weight=1", f"loss.triplet_margin={margin}",
                             "loss.center_weight=0.5", "loss.label_smoothing=0.99"])
    criterion = ReIDCriterion(cfg, 3, 4)
    cases = [torch.zeros(6, 4), torch.ones(6, 4), torch.randn(6, 4).repeat(2, 1)[:6]]
    for features in cases:
        features = features.to(dtype).requires_grad_(True)
        similarity = features.float() @ torch.ones(4, 3)
        labels = torch.tensor([0, 0, 1, 1, 2, 2])
        terms = criterion(ReIDOutput(features=features, embedding=features, similarity=similarity), labels)
        terms["loss"].backward()
        assert all(_finite(value) for value in terms.values())
        assert _finite(features.grad) and _finite(criterion.center.centers.grad)
        criterion.zero_grad()
        loss = batch_hard_triplet_loss(features.detach().requires_grad_(True), labels, margin)
        assert math.isfinite(loss.item())
