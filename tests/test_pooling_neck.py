"""GeM and the other poolings, ViT token pooling (prefix tokens excluded), BNNeck, reduction and dropout."""

import pytest
import torch

from jaguar.config import ConfigError, load_config
from jaguar.models import build_model
from jaguar.models.backbone import BackboneFeatures
from jaguar.models.neck import Neck
from jaguar.models.pooling import GeM, GlobalPool
from jaguar.train.optim import build_optimizer


def grid_features(grid: torch.Tensor) -> BackboneFeatures:
    return BackboneFeatures(grid=grid, cls_token=None)


def test_gem_p1_is_average_and_large_p_approaches_max():
    grid = torch.rand(2, 3, 4, 5) + 0.01
    torch.testing.assert_close(GeM(p=1.0)(grid), grid.mean(dim=(2, 3)))
    near_max = GeM(p=80.0)(grid)
    true_max = grid.amax(dim=(2, 3))
    assert (near_max <= true_max + 1e-6).all()
    assert torch.allclose(near_max, true_max, rtol=0.05)
    p3 = GeM(p=3.0)(grid)
    torch.testing.assert_close(p3, grid.pow(3).mean(dim=(2, 3)).pow(1 / 3))


def test_gem_p_is_learnable_and_never_below_one():
    gem = GeM(p=3.0, learnable=True)
    grid = torch.rand(2, 3, 4, 4)
    gem(grid).sum().backward()
    assert gem.p.grad is not None and gem.p.grad.abs().item() > 0
    with torch.no_grad():
        gem.p.fill_(0.2)
    assert gem.current_p() == 1.0
    torch.testing.assert_close(gem(grid + 0.1), (grid + 0.1).mean(dim=(2, 3)))
    frozen = GeM(p=3.0, learnable=False)
    assert list(frozen.parameters()) == [] and frozen.current_p() == 3.0


def test_avg_max_avgmax_pooling():
    grid = torch.randn(2, 3, 4, 4)
    avg, mx = grid.mean(dim=(2, 3)), grid.amax(dim=(2, 3))
    torch.testing.assert_close(GlobalPool("avg")(grid_features(grid)), avg)
    torch.testing.assert_close(GlobalPool("max")(grid_features(grid)), mx)
    torch.testing.assert_close(GlobalPool("avgmax")(grid_features(grid)), 0.5 * (avg + mx))
    with pytest.raises(ConfigError, match="model.pooling=cls"):
        GlobalPool("cls")(grid_features(grid))


@pytest.fixture(scope="module")
def vit_model():
    cfg = load_config(None, ["model.backbone=test_vit", "model.img_size=[32,48]", "model.pooling=avg"])
    return build_model(cfg, 3).eval()


def test_vit_pooling_excludes_prefix_tokens(vit_model):
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        tokens = vit_model.backbone.net.forward_features(images)
        features = vit_model.backbone(images)
        pooled = vit_model.pooling(features)
    prefix = vit_model.backbone.num_prefix_tokens
    assert prefix >= 1 and tokens.shape[1] == prefix + 2 * 3  # 32x48 with 16-pixel patches
    assert features.grid.shape == (2, tokens.shape[2], 2, 3)
    torch.testing.assert_close(pooled, tokens[:, prefix:].mean(dim=1))
    torch.testing.assert_close(features.cls_token, tokens[:, 0])
    # row-major patch order: grid[:, :, r, c] is token prefix + r * 3 + c
    torch.testing.assert_close(features.grid[:, :, 1, 2], tokens[:, prefix + 5])
    gem = GeM(p=3.0)(features.grid)
    manual = tokens[:, prefix:].clamp(min=1e-6).pow(3).mean(dim=1).pow(1 / 3)
    torch.testing.assert_close(gem, manual)
    vit_model.pooling = GlobalPool("cls")
    try:
        torch.testing.assert_close(vit_model.pooling(features), tokens[:, 0])
    finally:
        vit_model.pooling = GlobalPool("avg")


def test_bnneck_bias_stays_zero_while_weight_trains():
    cfg = load_config(None, ["model.backbone=test_resnet", "optim.weight_decay=0.1", "optim.lr=0.01"])
    model = build_model(cfg, 4)
    bnneck = model.neck.bnneck
    assert not bnneck.bias.requires_grad
    optimizer = build_optimizer(cfg, model)
    weight_before = bnneck.weight.detach().clone()
    out = model(torch.randn(4, 3, 32, 32))
    torch.nn.functional.cross_entropy(30 * out.similarity, torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    assert torch.equal(bnneck.bias, torch.zeros_like(bnneck.bias))
    assert not torch.equal(bnneck.weight, weight_before)


def test_neck_reduction_features_before_bn_and_dropout_only_on_head_input():
    neck = Neck(in_dim=12, reduce_dim=5, bnneck=True, dropout=0.5).train()
    pooled = torch.randn(6, 12)
    features, embedding = neck(pooled)
    assert features.shape == embedding.shape == (6, 5)
    expected = (features - features.mean(0)) / torch.sqrt(features.var(0, unbiased=False) + neck.bnneck.eps)
    torch.testing.assert_close(embedding, expected, rtol=1e-4, atol=1e-4)
    dropped = neck.head_input(embedding)
    assert (dropped == 0).any() and not (embedding == 0).any()


def test_embed_is_post_neck_and_dimension_follows_reduce_dim():
    cfg = load_config(None, ["model.backbone=test_resnet", "model.reduce_dim=16", "model.dropout=0.3"])
    model = build_model(cfg, 3).eval()
    model.neck.bnneck.running_mean.fill_(0.5)
    model.neck.bnneck.running_var.fill_(4.0)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(images)
        embedding = model.embed(images)
    assert model.embed_dim == 16 and embedding.shape == (2, 16)
    torch.testing.assert_close(embedding, out.embedding)
    torch.testing.assert_close(out.embedding, (out.features - 0.5) / (4.0 + 1e-5) ** 0.5)
    assert model.gem_p() == pytest.approx(cfg.model.gem_p)
