"""The one typed configuration of a jaguar run: dataclasses grouped by stage (`schema`), loaded from a
recipe (`recipes/*.py` with a module-level `config`) or a YAML file, overridden with dotted `key=value`.

Every value is checked when the config is loaded, whichever way it came: its type, its choices (a
`Literal`, with a did-you-mean), its range (`fields.ranged`) and the rules that tie keys together
(`validate`). So `jaguar config show` and `jaguar train` accept and refuse the same configs, before any
model is built or downloaded. A resolved config written by `save_config` loads back to the same config."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from jaguar.config.fields import ConfigError, apply_mapping, field_of, leaf_keys, set_value
from jaguar.config.schema import (Config, DataConfig, DistillConfig, LocalConfig, LossConfig, ModelConfig,
                                  OptimConfig, PostConfig, RetrievalConfig, RunConfig, TrainConfig)
from jaguar.io import atomic_write_text

__all__ = ["Config", "ConfigError", "DataConfig", "DistillConfig", "LocalConfig", "LossConfig", "ModelConfig", "OptimConfig",
           "PostConfig", "RetrievalConfig", "RunConfig", "TrainConfig", "all_keys", "apply_overrides",
           "apply_run_overrides", "deepspeed_zero_stage", "from_dict", "refuse_ema_under_zero3",
           "get_value", "load_config", "save_config", "set_value", "to_dict", "to_yaml", "validate"]


def all_keys() -> list[str]:
    """Every dotted key of a config, e.g. `retrieval.post.k1`."""
    return leaf_keys(Config)


def get_value(cfg: Config, dotted: str) -> Any:
    found = field_of(cfg, dotted)
    if found is None:
        raise ConfigError(f"unknown config key '{dotted}'")
    group, fld, _ = found
    return getattr(group, fld.name)


def _verbatim(dotted: str) -> bool:
    """Strings (and string choices) are taken from the command line as typed: paths and names may
    contain ':' or '#', and YAML would read `neck=off` as false."""
    found = field_of(Config(), dotted)
    if found is None:
        return False
    ftype = found[2]
    if typing.get_origin(ftype) is Literal:
        return all(isinstance(choice, str) for choice in typing.get_args(ftype))
    return ftype is str


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `key=value` items (values in YAML syntax: `[448, 448]`, `true`, `2e-5`), each checked."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.epochs=5)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if _verbatim(key):
            value: Any = raw
        else:
            try:
                value = yaml.safe_load(raw) if raw != "" else ""
            except yaml.YAMLError:
                value = raw
        set_value(cfg, key, value, " (command line)")
    return cfg


# What a trained (or zero-shot) run's own config may be overridden with: settings of the search and
# of the reader, not of the model its weights belong to or the data they were trained on.
RUN_OVERRIDABLE = ("retrieval.", "data.batch_size", "data.num_workers")


def apply_run_overrides(cfg: Config, overrides: list[str] | tuple[str, ...], where: str) -> Config:
    """Apply `key=value` overrides to a run's own config (`where`: its config.yaml), each checked as
    the config checks it; a key outside RUN_OVERRIDABLE would contradict the run's weights or shards
    and is refused by name."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not any(key == allowed or (allowed.endswith(".") and key.startswith(allowed))
                   for allowed in RUN_OVERRIDABLE):
            raise ConfigError(f"override {item!r}: {key} is fixed by the run's weights and data ({where}); "
                              f"a run takes only retrieval.*, data.batch_size and data.num_workers overrides. "
                              f"For another model or data, extract with --config RECIPE into another run.dir")
    apply_overrides(cfg, list(overrides))
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- loading and saving


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(mapping: dict, where: str = "") -> Config:
    """A config from a mapping of groups (YAML, a recipe's dict), every value checked."""
    cfg = Config()
    apply_mapping(cfg, mapping, where)
    return cfg


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically); `load_config(path)` reads it back unchanged."""
    atomic_write_text(Path(path), to_yaml(cfg))


def _load_recipe(path: Path) -> Config:
    spec = importlib.util.spec_from_file_location(f"jaguar_recipe_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import recipe {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ConfigError as err:  # a recipe assigning a key that does not exist
        raise ConfigError(f"recipe {path}: {err}") from None
    cfg = getattr(module, "config", None)
    if isinstance(cfg, dict):
        return from_dict(cfg, f" in {path}")
    if not isinstance(cfg, Config):
        raise ConfigError(f"recipe {path} must define a module-level `config` "
                          f"(a jaguar.config.Config or a dict of groups)")
    return cfg  # each assignment in the recipe was checked as it was made


def load_config(path: Optional[str | Path], overrides: Optional[list[str]] = None) -> Config:
    """Load a recipe (.py) or YAML file (or the defaults when path is None), apply overrides and
    validate; raises ConfigError naming the file, key and value at fault."""
    if path is None or str(path) == "":
        cfg = Config()
    else:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (give a recipes/*.py or a .yaml file)")
        if path.suffix == ".py":
            cfg = _load_recipe(path)
        elif path.suffix in (".yaml", ".yml"):
            try:
                mapping = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
            cfg = from_dict(mapping, f" in {path}")
        else:
            raise ConfigError(f"config file {path} must be a recipe (.py) or YAML (.yaml/.yml)")
    apply_overrides(cfg, list(overrides or []))
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- rules between keys


def validate(cfg: Config) -> None:
    """Check every value (types, choices, ranges; also list items changed in place) and the rules
    that tie keys together; raises ConfigError naming the keys."""
    from_dict(to_dict(cfg))
    _check_data(cfg.data)
    _check_model(cfg.model)
    _check_loss(cfg)
    _check_optim(cfg.optim)
    _check_deepspeed(cfg)
    if not cfg.retrieval.scales:
        raise ConfigError("config key 'retrieval.scales' is empty; give at least one scale, e.g. [1.0]")


def _check_data(data: DataConfig) -> None:
    micro_batch = data.p_identities * data.k_images if data.sampler == "pk" else data.batch_size
    if micro_batch < 2:
        keys = "data.p_identities x data.k_images" if data.sampler == "pk" else "data.batch_size"
        raise ConfigError(f"the training micro-batch ({keys}) is {micro_batch}; BatchNorm layers need at "
                          f"least 2 images per process and step")
    if data.scale[0] > data.scale[1]:
        raise ConfigError(f"config key 'data.scale' is [min, max]; got {data.scale} (min > max)")


def _check_model(model: ModelConfig) -> None:
    if model.head in ("arcface", "subcenter_arcface") and model.head_margin >= math.pi / 2:
        raise ConfigError(f"config key 'model.head_margin' must be < pi/2 for model.head={model.head}, got "
                          f"{model.head_margin} (cos(theta + m) of the true class would never be positive)")


def _check_loss(cfg: Config) -> None:
    loss, distill = cfg.loss, cfg.distill
    distilling = bool(distill.teacher) and distill.weight > 0
    if loss.ce_weight == loss.triplet_weight == loss.center_weight == 0 and not distilling:
        raise ConfigError("loss.ce_weight, loss.triplet_weight and loss.center_weight are all 0; "
                          "enable at least one term (or distill from a teacher: distill.teacher=RUN)")
    if distill.teacher and distill.weight == 0:
        raise ConfigError(f"distill.teacher={distill.teacher} is set but distill.weight is 0, so nothing would be "
                          f"distilled; set distill.weight > 0 or distill.teacher=''")
    if loss.ce_weight == 0 and cfg.data.mixup_prob > 0 and cfg.data.mixup_alpha > 0:
        raise ConfigError("mixup (data.mixup_prob > 0) trains only the cross-entropy term, but "
                          "loss.ce_weight is 0; set loss.ce_weight > 0 or data.mixup_prob=0")


def deepspeed_zero_stage(config_file: str | Path) -> Optional[int]:
    """The ZeRO stage a DeepSpeed JSON asks for (zero_optimization.stage); None when the file is
    missing, unreadable or leaves the stage to DeepSpeed ("auto")."""
    import json

    try:
        stage = json.loads(Path(config_file).read_text()).get("zero_optimization", {}).get("stage")
    except (OSError, ValueError, AttributeError):
        return None
    return stage if isinstance(stage, int) else None


def refuse_ema_under_zero3(cfg: Config, stage: Optional[int], where: str) -> None:
    """optim.ema under ZeRO-3 cannot work: the EMA copy would be made of the partitioned parameters,
    each rank holding a zero-size piece (DeepSpeed#6987), and averaging full weights on every step
    would gather the whole model each update, which ZeRO-3 exists to avoid."""
    if cfg.optim.ema and stage == 3:
        raise ConfigError(f"optim.ema=true cannot be used with DeepSpeed ZeRO-3 ({where}): ZeRO-3 partitions "
                          f"the parameters, so an EMA copy would hold each rank's empty piece; set "
                          f"optim.ema=false, or use ZeRO-2 (launch/deepspeed/zero2.json) or DDP")


def _check_deepspeed(cfg: Config) -> None:
    if cfg.train.deepspeed_config:
        stage = deepspeed_zero_stage(cfg.train.deepspeed_config)
        refuse_ema_under_zero3(cfg, stage, f"train.deepspeed_config={cfg.train.deepspeed_config}")


def _check_optim(optim: OptimConfig) -> None:
    if optim.scheduler == "multistep" and not optim.milestones:
        raise ConfigError("optim.scheduler=multistep needs optim.milestones (epochs), e.g. [35, 60]")
    if sorted(optim.milestones) != list(optim.milestones):
        raise ConfigError(f"config key 'optim.milestones' must be increasing, got {optim.milestones}")
    if optim.min_lr > optim.lr:
        raise ConfigError(f"config key 'optim.min_lr' ({optim.min_lr}) is above optim.lr ({optim.lr}); "
                          f"the cosine schedule would raise the LR")
