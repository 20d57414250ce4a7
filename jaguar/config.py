"""The one typed configuration of a jaguar run: dataclasses grouped by stage, loaded from a recipe
(`recipes/*.py` with a module-level `config`) or a YAML file, overridden with dotted `key=value`."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from jaguar.errors import JaguarError


class ConfigError(JaguarError, ValueError):
    """A configuration problem; the message names the key or file at fault and what to do."""


@dataclass
class DataConfig:
    shards: str = ""  # a `jaguar prep` output folder
    val_fraction: float = 0.1
    val_split: str = "stratified"  # stratified | identity
    alpha_mode: str = "keep"  # keep | black | random | blur
    background: str = "mixed"  # for alpha_mode=random: noise | solid | patch | mixed
    crop_to_alpha: bool = False  # crop to the mask's bounding box before resizing
    crop_margin: float = 0.05  # fraction of the bounding box added on each side
    resize: str = "pad"  # pad (keep aspect, pad) | stretch
    sampler: str = "pk"  # pk | shuffle
    p_identities: int = 8  # P in a PK batch (per process)
    k_images: int = 4  # K in a PK batch
    batch_size: int = 32  # micro-batch per process for sampler=shuffle and for extraction
    num_workers: int = 2
    hflip: float = 0.5
    rotation: float = 0.0  # degrees, uniform in [-r, r]
    scale: list[float] = field(default_factory=lambda: [1.0, 1.0])
    translate: float = 0.0  # fraction of the size
    color_jitter: float = 0.0  # brightness/contrast/saturation strength
    random_erasing: float = 0.0  # probability
    pad: int = 0  # pixels of padding before a random crop back to size (BoT)
    mixup_alpha: float = 0.0  # Beta(a, a); 0 disables mixup
    mixup_prob: float = 0.0
    extra_shards: list[str] = field(default_factory=list)  # e.g. pseudo-labelled shards


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    pretrained: bool = False
    pretrained_file: str = ""  # local weights file; works offline
    img_size: list[int] = field(default_factory=lambda: [224, 224])  # network input [H, W]
    pooling: str = "gem"  # gem | avg | max | avgmax | cls
    gem_p: float = 3.0
    gem_learnable: bool = True
    neck: str = "bnneck"  # bnneck | none
    reduce_dim: int = 0  # linear reduction before the neck; 0 keeps the backbone width
    dropout: float = 0.0
    last_stride: int = 2  # 1 for the BoT ResNet
    grad_checkpointing: bool = False
    head: str = "arcface"  # arcface | subcenter_arcface | cosface | softmax
    head_scale: float = 30.0
    head_margin: float = 0.5
    subcenters: int = 3
    easy_margin: bool = False


@dataclass
class LossConfig:
    ce_weight: float = 1.0
    label_smoothing: float = 0.0
    triplet_weight: float = 0.0
    triplet_margin: float = 0.3  # 0 = soft margin
    center_weight: float = 0.0
    center_lr: float = 0.5


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 3e-4
    weight_decay: float = 0.05
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    layer_decay: float = 0.0  # 0 disables layer-wise LR decay (ViTs)
    head_lr_mult: float = 1.0
    scheduler: str = "cosine"  # cosine | multistep | constant
    warmup_epochs: float = 0.0
    warmup_lr: float = 0.0  # LR at the start of warmup
    min_lr: float = 0.0
    milestones: list[float] = field(default_factory=list)  # epochs, for multistep
    gamma: float = 0.1
    grad_clip: float = 0.0  # 0 disables clipping
    ema: bool = False
    ema_decay: float = 0.999


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int = 0  # optimizer steps; 0 = no cap
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | bf16 | fp16
    eval_every: int = 1  # epochs; 0 disables validation
    checkpoint_every: int = 0  # optimizer steps; 0 = only at epoch ends and the end
    keep_last: int = 2
    resume: str = "auto"  # auto | none | a checkpoint folder
    max_bad_steps: int = 20  # stop after this many skipped non-finite steps
    log_every: int = 10  # optimizer steps
    deepspeed_config: str = ""  # DeepSpeed JSON, when not given by `accelerate launch`
    init_from: str = ""  # weights to start from (a checkpoint folder), e.g. to fine-tune on pseudo-labels


@dataclass
class RetrievalConfig:
    flip_tta: bool = True
    scales: list[float] = field(default_factory=lambda: [1.0])
    qe_k: int = 0  # top-k query expansion; 0 disables
    qe_alpha: float = 0.0  # alpha-weighted QE exponent; 0 = plain average
    dba_k: int = 0  # database-side augmentation; 0 disables
    rerank: bool = False
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    blend: float = 1.0  # weight of the re-ranked distance in the final score
    tune: bool = True  # choose the post-processing on the validation split
    # tune-post adopts a stage (QE, re-ranking) only when its validation gain exceeds this many
    # standard errors of the paired per-identity AP differences; 0 adopts any gain
    tune_min_gain_se: float = 1.0


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0
    name: str = ""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------- keys and values


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def all_keys(cfg_cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for name, f in _fields(cfg_cls).items():
        ftype = typing.get_type_hints(cfg_cls)[name]
        if dataclasses.is_dataclass(ftype):
            keys.extend(all_keys(ftype, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in all_keys() if k.rsplit(".", 1)[-1] == leaf][:1]
    return f" (did you mean {close[0]}?)" if close else ""


def _unknown(key: str, where: str) -> ConfigError:
    return ConfigError(f"unknown config key '{key}'{where}{_suggest(key)}; "
                       f"`jaguar config show RECIPE` lists every key")


def _coerce(key: str, value: Any, ftype: Any) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or fail naming the key."""
    origin = typing.get_origin(ftype)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ftype) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        (item_type,) = typing.get_args(ftype)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(key, v, item_type) for v in value]
    bad = ConfigError(f"config key '{key}' expects {getattr(ftype, '__name__', ftype)}, "
                      f"got {value!r} ({type(value).__name__})")
    if ftype is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad
    if ftype is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if ftype is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if ftype is str:
        if isinstance(value, (dict, list)):
            raise bad
        return "" if value is None else str(value)
    return value


def _apply_mapping(cfg: Config, mapping: dict, where: str) -> None:
    if not isinstance(mapping, dict):
        raise ConfigError(f"config{where} must be a mapping of groups ({', '.join(_fields(Config))})")
    for group, values in mapping.items():
        if group not in _fields(Config):
            raise _unknown(str(group), where)
        if not isinstance(values, dict):
            raise ConfigError(f"config group '{group}'{where} must be a mapping of keys, got {values!r}")
        for key, value in values.items():
            set_value(cfg, f"{group}.{key}", value, where)


def set_value(cfg: Config, dotted: str, value: Any, where: str = "") -> None:
    """Set `group.key` to `value` (a parsed YAML value), checking the key and the type."""
    parts = dotted.split(".")
    if len(parts) != 2:
        raise _unknown(dotted, where)
    group_name, key = parts
    if group_name not in _fields(Config):
        raise _unknown(dotted, where)
    group = getattr(cfg, group_name)
    hints = typing.get_type_hints(type(group))
    if key not in hints:
        raise _unknown(dotted, where)
    setattr(group, key, _coerce(dotted, value, hints[key]))


def _field_type(dotted: str) -> Any:
    parts = dotted.split(".")
    if len(parts) != 2 or parts[0] not in _fields(Config):
        return None
    group_cls = typing.get_type_hints(Config)[parts[0]]
    return typing.get_type_hints(group_cls).get(parts[1])


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.epochs=5)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if _field_type(key) is str:
            value = raw  # strings are taken verbatim: paths and names may contain ':' or '#'
        else:
            try:
                value = yaml.safe_load(raw) if raw != "" else ""
            except yaml.YAMLError:
                value = raw
        set_value(cfg, key, value, " (command line)")
    return cfg


# ---------------------------------------------------------------- loading and saving


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(mapping: dict, where: str = "") -> Config:
    cfg = Config()
    _apply_mapping(cfg, mapping, where)
    return cfg


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    from jaguar.io import atomic_write_text

    atomic_write_text(Path(path), to_yaml(cfg))


def _load_recipe(path: Path) -> Config:
    spec = importlib.util.spec_from_file_location(f"jaguar_recipe_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import recipe {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = getattr(module, "config", None)
    if isinstance(cfg, dict):
        return from_dict(cfg, f" in {path}")
    if not isinstance(cfg, Config):
        raise ConfigError(f"recipe {path} must define a module-level `config` "
                          f"(a jaguar.config.Config or a dict of groups)")
    return dataclasses.replace(cfg)


def load_config(path: Optional[str | Path], overrides: Optional[list[str]] = None) -> Config:
    """Load a recipe (.py) or YAML file (or the defaults when path is None) and apply overrides."""
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
    validate(cfg)
    apply_overrides(cfg, list(overrides or []))
    validate(cfg)
    return cfg


_CHOICES = {
    "data.val_split": ("stratified", "identity"),
    "data.alpha_mode": ("keep", "black", "random", "blur"),
    "data.background": ("noise", "solid", "patch", "mixed"),
    "data.resize": ("pad", "stretch"),
    "data.sampler": ("pk", "shuffle"),
    "model.pooling": ("gem", "avg", "max", "avgmax", "cls"),
    "model.neck": ("bnneck", "none"),
    "model.head": ("arcface", "subcenter_arcface", "cosface", "softmax"),
    "optim.name": ("adamw", "adam", "sgd"),
    "optim.scheduler": ("cosine", "multistep", "constant"),
    "train.precision": ("fp32", "bf16", "fp16"),
}


def get_value(cfg: Config, dotted: str) -> Any:
    group, key = dotted.split(".")
    return getattr(getattr(cfg, group), key)


def validate(cfg: Config) -> None:
    for key, choices in _CHOICES.items():
        value = get_value(cfg, key)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"config key '{key}' is {value!r}; choose one of {', '.join(choices)}{hint}")
    if len(cfg.model.img_size) != 2:
        raise ConfigError(f"config key 'model.img_size' must be [height, width], got {cfg.model.img_size}")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"config key 'data.val_fraction' must be in [0, 1), got {cfg.data.val_fraction}")
    micro_batch = cfg.data.p_identities * cfg.data.k_images if cfg.data.sampler == "pk" else cfg.data.batch_size
    if micro_batch < 2:
        keys = "data.p_identities x data.k_images" if cfg.data.sampler == "pk" else "data.batch_size"
        raise ConfigError(f"the training micro-batch ({keys}) is {micro_batch}; BatchNorm layers need at "
                          f"least 2 images per process and step")
    if cfg.train.grad_accum < 1:
        raise ConfigError(f"config key 'train.grad_accum' must be >= 1, got {cfg.train.grad_accum}")
