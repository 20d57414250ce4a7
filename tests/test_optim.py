"""Optimizer parameter groups (no-decay, layer decay, head LR), LR schedules (BoT, cosine, warmup,
resume) and weight EMA."""

import math

import pytest
import torch

from jaguar.config import load_config
from jaguar.models import build_model
from jaguar.models.losses import ReIDCriterion
from jaguar.train.optim import build_center_optimizer, build_ema, build_optimizer, build_scheduler, total_updates


@pytest.fixture(scope="module")
def vit_model():
    cfg = load_config(None, ["model.backbone=test_vit", "model.img_size=[32,32]"])
    return build_model(cfg, 4)


def group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def test_no_weight_decay_on_norms_biases_tokens_and_gem_p(vit_model):
    cfg = load_config(None, ["optim.weight_decay=0.05"])
    optimizer = build_optimizer(cfg, vit_model)
    groups = group_of(optimizer)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(groups)  # each param once
    trainable = [(n, p) for n, p in vit_model.named_parameters() if p.requires_grad]
    assert len(groups) == len(trainable)
    assert id(vit_model.neck.bnneck.bias) not in groups
    for name, param in trainable:
        no_decay = param.ndim <= 1 or name.endswith(("pos_embed", "cls_token"))
        assert groups[id(param)]["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert groups[id(vit_model.pooling.gem.p)]["weight_decay"] == 0.0
    assert all(g["name"] for g in optimizer.param_groups)


def test_layer_decay_increases_towards_the_head_and_head_lr_mult(vit_model):
    cfg = load_config(None, ["optim.layer_decay=0.5", "optim.head_lr_mult=10", "optim.lr=0.001"])
    optimizer = build_optimizer(cfg, vit_model)
    backbone_groups = sorted((g for g in optimizer.param_groups if g["name"].startswith("backbone")),
                             key=lambda g: g["name"])
    scales = sorted({g["lr_scale"] for g in backbone_groups})
    depth = len(vit_model.backbone.net.blocks)
    assert len(scales) >= depth + 1  # embeddings, then at least one group per block
    assert scales == pytest.approx([0.5 ** (len(scales) - 1 - i) for i in range(len(scales))])
    groups = group_of(optimizer)
    net = vit_model.backbone.net
    assert groups[id(net.patch_embed.proj.weight)]["lr_scale"] == pytest.approx(scales[0])
    first, last = groups[id(net.blocks[0].attn.qkv.weight)], groups[id(net.blocks[-1].attn.qkv.weight)]
    assert first["lr_scale"] < last["lr_scale"] <= groups[id(net.norm.weight)]["lr_scale"] == 1.0
    head_group = groups[id(vit_model.head.weight)]
    assert head_group["name"].startswith("head") and head_group["lr_scale"] == 10.0
    assert head_group["lr"] == pytest.approx(0.01) and last["lr"] == pytest.approx(0.001 * last["lr_scale"])
    # the scheduler keeps the multipliers
    constant = load_config(None, ["optim.scheduler=constant", "optim.lr=0.001"])
    scheduler = build_scheduler(constant, optimizer, 5, total_updates(constant, 5))
    scheduler.step_update(3)
    assert head_group["lr"] == pytest.approx(0.01) and first["lr"] == pytest.approx(0.001 * first["lr_scale"])


def test_optimizer_kinds(vit_model):
    sgd = build_optimizer(load_config(None, ["optim.name=sgd", "optim.momentum=0.8"]), vit_model)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.8 and sgd.param_groups[0]["nesterov"] is False
    adamw = build_optimizer(load_config(None, ["optim.betas=[0.8, 0.95]"]), vit_model)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.8, 0.95)
    assert isinstance(build_optimizer(load_config(None, ["optim.name=adam"]), vit_model), torch.optim.Adam)


def lr_at(scheduler, optimizer, update: int, group: int = 0) -> float:
    scheduler.step_update(update)
    return optimizer.param_groups[group]["lr"]


def test_bot_warmup_and_multistep_values(vit_model):
    cfg = load_config(None, ["optim.name=adam", "optim.lr=3.5e-4", "optim.warmup_lr=3.5e-6",
                             "optim.warmup_epochs=10", "optim.scheduler=multistep", "optim.milestones=[35, 60]",
                             "optim.gamma=0.1", "train.epochs=120", "optim.weight_decay=0.0005"])
    steps = 7
    optimizer = build_optimizer(cfg, vit_model)
    scheduler = build_scheduler(cfg, optimizer, steps, total_updates(cfg, steps))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3.5e-6)  # before the first update
    expected = {0: 3.5e-6, 5 * steps: (3.5e-6 + 3.5e-4) / 2, 10 * steps: 3.5e-4, 35 * steps - 1: 3.5e-4,
                35 * steps: 3.5e-5, 60 * steps - 1: 3.5e-5, 60 * steps: 3.5e-6, 120 * steps - 1: 3.5e-6}
    for update, lr in expected.items():
        assert lr_at(scheduler, optimizer, update) == pytest.approx(lr, rel=1e-9), update


def test_cosine_warmup_endpoints_and_exact_resume(vit_model):
    cfg = load_config(None, ["optim.lr=1e-3", "optim.warmup_lr=1e-5", "optim.warmup_epochs=1",
                             "optim.min_lr=1e-6", "train.epochs=5"])
    optimizer = build_optimizer(cfg, vit_model)
    scheduler = build_scheduler(cfg, optimizer, 4, total_updates(cfg, 4))
    assert lr_at(scheduler, optimizer, 0) == pytest.approx(1e-5)
    assert lr_at(scheduler, optimizer, 2) == pytest.approx((1e-5 + 1e-3) / 2)
    assert lr_at(scheduler, optimizer, 4) == pytest.approx(1e-3)
    assert lr_at(scheduler, optimizer, 12) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
    assert lr_at(scheduler, optimizer, 20) == pytest.approx(1e-6)
    scheduler.step_update(9)
    state = scheduler.state_dict()
    expected = lr_at(scheduler, optimizer, 10)
    fresh_optimizer = build_optimizer(load_config(None, ["optim.lr=5e-2"]), vit_model)
    fresh_cfg = load_config(None, ["optim.lr=5e-2", "train.epochs=50"])
    fresh = build_scheduler(fresh_cfg, fresh_optimizer, 4, total_updates(fresh_cfg, 4))
    fresh.load_state_dict(state)
    assert lr_at(fresh, fresh_optimizer, 10) == pytest.approx(expected)
    assert 1e-6 < expected < 1e-3


def test_max_steps_shortens_the_cosine(vit_model):
    cfg = load_config(None, ["optim.lr=1e-3", "train.epochs=10", "train.max_steps=8"])
    optimizer = build_optimizer(cfg, vit_model)
    scheduler = build_scheduler(cfg, optimizer, 4, total_updates(cfg, 4))
    assert lr_at(scheduler, optimizer, 4) == pytest.approx(0.5e-3)
    assert lr_at(scheduler, optimizer, 8) == pytest.approx(0.0)


def test_ema_update_is_a_moving_average():
    cfg = load_config(None, ["model.backbone=test_resnet", "optim.ema=true", "optim.ema_decay=0.75"])
    model = build_model(cfg, 3)
    ema = build_ema(cfg, model)
    start = model.head.weight.detach().clone()
    with torch.no_grad():
        model.head.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.head.weight, 0.75 * start + 0.25 * (start + 1.0))
    assert build_ema(load_config(None, []), model) is None


def test_center_optimizer_only_with_center_loss():
    cfg = load_config(None, [])
    assert build_center_optimizer(cfg, ReIDCriterion(cfg, 3, 4)) is None
    cfg = load_config(None, ["loss.center_weight=0.0005", "loss.center_lr=0.5"])
    optimizer = build_center_optimizer(cfg, ReIDCriterion(cfg, 3, 4))
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.5
    assert math.prod(optimizer.param_groups[0]["params"][0].shape) == 12
