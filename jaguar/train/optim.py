"""Optimisation of a ReID model: what is trained (`TrainedModules`: the model and the center loss's
centres, prepared together so one mechanism synchronises their gradients), timm optimizers with
no-decay and layer-decay parameter groups, a head LR multiplier, BoT's separate SGD for the centres,
per-update LR schedules (warmup + cosine / multistep / constant) and weight EMA of the model."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn

from jaguar.config import Config, ConfigError
from jaguar.core.accelerator import launched_with_deepspeed

logger = logging.getLogger(__name__)

# timm names: "momentum" is SGD with momentum and nesterov off ("sgd" in timm turns nesterov on).
_TIMM_OPTIMIZERS = {"adamw": "adamw", "adam": "adam", "sgd": "momentum"}


class TrainedModules(nn.Module):
    """The module Accelerate prepares: `model` (the ReID model) and `criterion` (a ReIDCriterion, whose
    trainable part is the center loss's centres). As parameters of the module DDP wraps, the centres'
    gradients are averaged in DDP's buckets with the model's, at the same accumulation boundaries
    (DDP's hooks fire on every parameter's gradient, wherever in the backward it arises), and fp16
    unscaling is the scaler's. forward(images) is the model's; the trainer applies the criterion.
    Checkpoints hold both (`model.*`, `criterion.*`); the exported weights hold the model's only."""

    MODEL_PREFIX = "model."

    def __init__(self, model: nn.Module, criterion: nn.Module) -> None:
        super().__init__()
        self.model = model  # registered first: parameters() lists the model's before the centres
        self.criterion = criterion

    def forward(self, images: torch.Tensor):
        return self.model(images)


def parameters_without_gradient(module: nn.Module) -> list[str]:
    """Names of the trainable parameters of `module` that the last backward gave no gradient. DDP
    (without find_unused_parameters) fails at the next step over any such parameter; build_model
    leaves none for the configurations the config accepts."""
    return [name for name, param in module.named_parameters() if param.requires_grad and param.grad is None]


def check_every_parameter_trained(module: nn.Module, num_processes: int, cfg: Config) -> None:
    """After the first backward: a trainable parameter without a gradient is dead weight on one
    process (a warning) and, under DDP, an error at the next step ("Expected to have finished
    reduction in the prior iteration"; raised here instead, naming the parameters)."""
    unused = parameters_without_gradient(module)
    if not unused:
        return
    message = (f"{len(unused)} trainable parameters got no gradient from the loss (e.g. {', '.join(unused[:5])}): "
               f"model.backbone={cfg.model.backbone} with loss.ce_weight={cfg.loss.ce_weight}, "
               f"loss.triplet_weight={cfg.loss.triplet_weight} leaves them unused")
    if num_processes > 1:
        raise RuntimeError(message + "; DDP cannot average them. Please report this configuration")
    logger.warning("%s; they stay as initialised", message)


def _no_weight_decay_names(net: nn.Module) -> set[str]:
    names = net.no_weight_decay() if hasattr(net, "no_weight_decay") else set()
    return set(names)


def _decay_suffix(group: dict) -> str:
    return "decay" if group["weight_decay"] > 0 else "no_decay"


def param_groups(cfg: Config, model: nn.Module) -> list[dict]:
    """Parameter groups for `model` (a ReIDModel): backbone groups (layer-decayed for ViTs when
    optim.layer_decay > 0) and head groups (pooling, neck, head) at optim.head_lr_mult.

    Each group has a readable "name", an "lr_scale" that timm schedulers multiply into the scheduled LR,
    "lr" = optim.lr * lr_scale (right before the first scheduler step too) and "initial_lr" = optim.lr."""
    optim_cfg = cfg.optim
    net = model.backbone.net
    no_decay = _no_weight_decay_names(net)
    groups: list[dict] = []
    if optim_cfg.layer_decay > 0:
        backbone_groups = param_groups_layer_decay(net, weight_decay=optim_cfg.weight_decay,
                                                   no_weight_decay_list=no_decay,
                                                   layer_decay=optim_cfg.layer_decay)
        # timm gives no layer ids back; order the groups by scale so names read from the stem up.
        scales = sorted({g["lr_scale"] for g in backbone_groups})
        for group in backbone_groups:
            layer = scales.index(group["lr_scale"])
            group["name"] = f"backbone.layer{layer:02d}.{_decay_suffix(group)}"
    else:
        backbone_groups = param_groups_weight_decay(net, weight_decay=optim_cfg.weight_decay,
                                                    no_weight_decay_list=no_decay)
        for group in backbone_groups:
            group["lr_scale"] = 1.0
            group["name"] = f"backbone.{_decay_suffix(group)}"
    groups.extend(backbone_groups)
    for group in param_groups_weight_decay(model.head_modules(), weight_decay=optim_cfg.weight_decay):
        group["lr_scale"] = optim_cfg.head_lr_mult
        group["name"] = f"head.{_decay_suffix(group)}"
        groups.append(group)
    for group in groups:
        group["initial_lr"] = optim_cfg.lr
        group["lr"] = optim_cfg.lr * group["lr_scale"]
    return groups


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """optim.name over `param_groups(cfg, model)`: no weight decay on norms, biases, position/class
    tokens and GeM p; layer-wise LR decay; head LR multiplier."""
    optim_cfg = cfg.optim
    extra: dict = {}
    if optim_cfg.name in ("adam", "adamw"):
        extra["betas"] = tuple(optim_cfg.betas)
    optimizer = create_optimizer_v2(param_groups(cfg, model), opt=_TIMM_OPTIMIZERS[optim_cfg.name],
                                    lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay,
                                    momentum=optim_cfg.momentum, **extra)
    return optimizer


def build_center_optimizer(cfg: Config, criterion: nn.Module) -> Optional[torch.optim.Optimizer]:
    """BoT's separate SGD for the center-loss centres (loss.center_lr), or None without center loss."""
    center = getattr(criterion, "center", None)
    if cfg.loss.center_weight <= 0 or center is None:
        return None
    return torch.optim.SGD(center.parameters(), lr=cfg.loss.center_lr)


def refuse_centres_under_deepspeed(cfg: Config) -> None:
    """Raise ConfigError when a run would train center loss under DeepSpeed. The centres have their own
    SGD (loss.center_lr, BoT) while DeepSpeed drives a single optimizer whose step runs inside
    backward(), so the centres would never move from their random start. Call it before building
    anything: it reads the same settings as `jaguar.core.accelerator.build_accelerator`."""
    if cfg.loss.center_weight > 0 and (cfg.train.deepspeed_config or launched_with_deepspeed()):
        raise ConfigError(f"loss.center_weight={cfg.loss.center_weight} cannot be trained under DeepSpeed: "
                          f"the centres need their own SGD optimizer (loss.center_lr) and DeepSpeed drives "
                          f"one; set loss.center_weight=0, or train with DDP (no train.deepspeed_config, "
                          f"not launched with DeepSpeed)")


def total_updates(cfg: Config, steps_per_epoch: int) -> int:
    """Optimizer updates of the whole run: train.epochs * steps_per_epoch, capped by train.max_steps."""
    total = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps > 0:
        total = min(total, cfg.train.max_steps)
    return total


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int, total: int) -> Scheduler:
    """A timm scheduler stepped per optimizer update: call `scheduler.step_update(num_updates)` after
    each update (num_updates = updates done so far). `state_dict()`/`load_state_dict()` resume it.
    `total` is the run's number of updates, `total_updates(cfg, steps_per_epoch)`.

    Warmup goes linearly from optim.warmup_lr to optim.lr over optim.warmup_epochs; then cosine to
    optim.min_lr at the last update, or x optim.gamma at each of optim.milestones (epochs counted from
    the start of training, warmup included, as in BoT), or constant."""
    optim_cfg = cfg.optim
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch} (is the training set empty?)")
    warmup = int(round(optim_cfg.warmup_epochs * steps_per_epoch))
    common = dict(warmup_t=warmup, warmup_lr_init=optim_cfg.warmup_lr, t_in_epochs=False)
    if optim_cfg.scheduler == "cosine":
        if warmup >= total:
            # A short smoke run (train.max_steps) keeps the recipe's shape: warm up, then one decay update.
            logging.getLogger(__name__).warning(
                "optim.warmup_epochs=%s covers the whole run (%d updates); warming up for %d instead",
                optim_cfg.warmup_epochs, total, max(0, total - 1))
            warmup = max(0, total - 1)
            common["warmup_t"] = warmup
        return CosineLRScheduler(optimizer, t_initial=total - warmup, lr_min=optim_cfg.min_lr,
                                 warmup_prefix=True, cycle_limit=1, **common)
    if optim_cfg.scheduler == "multistep":
        # timm applies a milestone d at update index d - 1; +1 makes epoch m start its first update decayed.
        decay_updates = [int(round(m * steps_per_epoch)) + 1 for m in optim_cfg.milestones]
        return MultiStepLRScheduler(optimizer, decay_t=decay_updates, decay_rate=optim_cfg.gamma,
                                    warmup_prefix=False, **common)
    return MultiStepLRScheduler(optimizer, decay_t=[], decay_rate=1.0, warmup_prefix=False, **common)  # constant


def build_ema(cfg: Config, model: nn.Module) -> Optional[ModelEmaV3]:
    """An EMA copy of `model` (optim.ema, decay optim.ema_decay); call `ema.update(model, step)` after
    each optimizer update and evaluate `ema.module`."""
    if not cfg.optim.ema:
        return None
    return ModelEmaV3(model, decay=cfg.optim.ema_decay)
