"""Checkpoints: complete or absent. Each is written to a hidden temporary folder and renamed into
place by the main process once every rank has finished writing; `trainer_state.json`, written
last, marks a checkpoint complete. `resume=auto` picks the newest complete one."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from jaguar.config import ConfigError
from jaguar.errors import MissingInputError
from jaguar.io import atomic_write_json, replace_directory

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "weights.safetensors"  # consolidated model weights (fp32 masters under DeepSpeed), for extraction
EMA_WEIGHTS_FILE = "weights_ema.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete step checkpoints, oldest first. Temporary and half-written folders are ignored."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for path in checkpoint_dir.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and is_complete(path):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_resume_checkpoint(checkpoint_dir: Path, resume: str) -> Optional[Path]:
    """The checkpoint `train.resume` asks for: auto → newest complete one (or None), none → None."""
    if resume in ("", "none", "no", "false"):
        return None
    if resume == "auto":
        complete = list_checkpoints(checkpoint_dir)
        return complete[-1] if complete else None
    path = Path(resume)
    if not is_complete(path):
        raise MissingInputError(f"train.resume={resume}: no complete checkpoint there (missing {STATE_FILE})")
    return path


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def _state_dict_to_cpu(state: dict) -> dict:
    return {key: value.detach().to("cpu").contiguous() for key, value in state.items()}


def _under_prefix(weights: Optional[dict], prefix: str) -> Optional[dict]:
    if weights is None or not prefix:
        return weights
    return {name[len(prefix):]: value for name, value in weights.items() if name.startswith(prefix)}


def model_weights(accelerator: Accelerator, model, prefix: str = "") -> dict:
    """The trained weights of the (prepared) model, whole on the main process: what extraction,
    train.init_from and ensembles load. Collective: every rank must call it. With `prefix` (the
    model's name in the prepared module, e.g. "model.") only the tensors under it, by their own names.

    Under DeepSpeed with bf16/fp16 the module holds 16-bit copies of the weights; the weights being
    trained are the optimizer's fp32 master copies (partitioned under ZeRO), which
    `deepspeed.utils.safe_get_full_fp32_param` assembles. Those replace the 16-bit parameters, and
    every other floating tensor (frozen parameters, BatchNorm statistics) is stored as fp32 too."""
    weights = accelerator.get_state_dict(model)
    if accelerator.state.deepspeed_plugin is None or accelerator.mixed_precision not in ("bf16", "fp16"):
        return _under_prefix(weights, prefix)
    from deepspeed.utils import safe_get_full_fp32_param  # DeepSpeed runs only; it is slow to import

    for name, param in model.module.named_parameters():
        master = safe_get_full_fp32_param(param)  # all ranks take part, in the same order
        if master is not None and weights is not None:
            weights[name] = master
    if weights is None:
        return weights
    return _under_prefix({name: value.float() if value.is_floating_point() else value
                          for name, value in weights.items()}, prefix)


def save_checkpoint(accelerator: Accelerator, model, ema, checkpoint_dir: Path, name: str,
                    trainer_state: dict, keep_last: int, weights_prefix: str = "") -> Path:
    """Save the full training state under checkpoint_dir/name atomically; prune old step checkpoints.
    The exported weights are the tensors under `weights_prefix` (see `model_weights`)."""
    final = checkpoint_dir / name
    tmp = checkpoint_dir / f".{name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    # Gathering the full weights is collective under ZeRO: every rank calls it.
    weights = model_weights(accelerator, model, weights_prefix)
    if accelerator.is_main_process:
        save_file(_state_dict_to_cpu(weights), str(tmp / WEIGHTS_FILE))
        if ema is not None:
            save_file(_state_dict_to_cpu(ema.module.state_dict()), str(tmp / EMA_WEIGHTS_FILE))
        atomic_write_json(tmp / STATE_FILE, trainer_state)
        replace_directory(tmp, final)
        if _STEP_DIR.match(name) and keep_last > 0:
            for stale in list_checkpoints(checkpoint_dir)[:-keep_last]:
                shutil.rmtree(stale, ignore_errors=True)
        log.debug("checkpoint saved: %s", final)  # one a epoch: the epoch and closing lines say enough
    accelerator.wait_for_everyone()
    return final


def best_or_latest(checkpoint_dir: Path) -> Optional[Path]:
    """The checkpoint extraction should use by default: best if kept, else the newest."""
    best = checkpoint_dir / "best"
    if is_complete(best):
        return best
    complete = list_checkpoints(checkpoint_dir)
    return complete[-1] if complete else None


def load_weights(model: torch.nn.Module, checkpoint: Path, prefer_ema: bool = False, partial: bool = False) -> Path:
    """Load a checkpoint folder's consolidated weights (its EMA weights when `prefer_ema` and it has
    them) or a weights file (.safetensors) into `model`; return the file read.

    partial=False (extraction): every tensor but the classifier head's must match the model, else
    a ConfigError naming the file. partial=True (`train.init_from`): tensors whose name and shape
    match are loaded and the rest keep their initialisation, e.g. a head for another number of
    identities."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        ema_file = checkpoint / EMA_WEIGHTS_FILE
        weights = ema_file if prefer_ema and ema_file.is_file() else checkpoint / WEIGHTS_FILE
    else:
        weights = checkpoint
    if not weights.is_file():
        raise MissingInputError(f"checkpoint weights {weights} do not exist: give a checkpoint folder "
                                f"(holding {WEIGHTS_FILE}) or a weights file")
    state = load_file(str(weights))
    if partial:
        own = model.state_dict()
        compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(compatible, strict=False)
        log.info("initialised %d/%d tensors from %s", len(compatible), len(own), weights)
        return weights
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("head.")]:
        backbone = getattr(getattr(model, "backbone", None), "name", "?")
        raise ConfigError(f"{weights} does not match model.backbone={backbone}: "
                          f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return weights
