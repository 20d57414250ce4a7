"""Reading a checkpoint for inference: its trainer_state.json, the checksums it recorded, and its
consolidated weights loaded into a model (extraction, export, calibration, identification,
`train.init_from`). The checkpoint folder's layout is jaguar.run_checkpoints'; writing and resuming
the training state is jaguar.train.checkpoint's."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from jaguar import checksums
from jaguar.config import ConfigError
from jaguar.errors import JaguarError, MissingInputError
from jaguar.run_checkpoints import EMA_WEIGHTS_FILE, STATE_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)


class CheckpointError(JaguarError, ValueError):
    """A checkpoint that cannot be trusted or read; the message names the file and what to do."""


def read_state(path: Path) -> dict:
    state_file = Path(path) / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{state_file} could not be read ({err}); use another checkpoint") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_file} does not hold a JSON object; use another checkpoint")
    return state


def verify_checkpoint(path: Path, full: bool = True) -> list[str]:
    """Every problem of a checkpoint folder against the checksums its trainer_state.json recorded
    (empty = ok): files missing, truncated, changed (sha256 read when `full`) or added since."""
    records = read_state(path).get("files")
    if not isinstance(records, dict):
        return [f"{Path(path) / STATE_FILE}: no checksums recorded (written by an earlier jaguar); its "
                f"weights can still start a new run with train.init_from={path}"]
    return checksums.check_folder(Path(path), records, full=full, exempt=(STATE_FILE,))



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
    if checkpoint.is_dir():  # its size always, its sha256 when its mtime moved since the checkpoint was written
        record = read_state(checkpoint).get("files", {}).get(weights.name)
        problem = checksums.check_file(weights, record) if isinstance(record, dict) else None
        if problem:
            raise CheckpointError(f"{problem}; use another checkpoint (`jaguar verify RUN` checks them all)")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"weights file {weights} could not be read ({type(err).__name__}: {err}): it is "
                              f"truncated or not a safetensors file; use another checkpoint") from None
    if partial:
        own = model.state_dict()
        compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(compatible, strict=False)
        log.info("initialised %d/%d tensors from %s", len(compatible), len(own), weights)
        return weights
    dropped = tuple(model.dropped_weight_prefixes()) if hasattr(model, "dropped_weight_prefixes") else ()
    state = {name: value for name, value in state.items() if not name.startswith(dropped)} if dropped else state
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("head.")]:
        backbone = getattr(getattr(model, "backbone", None), "name", "?")
        raise ConfigError(f"{weights} does not match model.backbone={backbone}: "
                          f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return weights
