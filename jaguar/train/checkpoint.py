"""Checkpoints: complete or absent. Each is written to a hidden temporary folder and renamed into
place by the main process once every rank has finished writing; `trainer_state.json`, written
last, marks a checkpoint complete. `resume=auto` picks the newest complete one.

Nothing in a checkpoint is unpickled with code: the state of jaguar's own objects (scheduler, EMA,
centre optimizer) is `jaguar_state.pt`, read with `torch.load(weights_only=True)`, not accelerate's
custom-object pickles (which accelerate reads with `weights_only=False`); accelerate reads the rest
with `weights_only=True`. `trainer_state.json` records the size and sha256 of every file (jaguar.
checksums): resume refuses a checkpoint with a file changed, truncated or added since (a
`custom_checkpoint_0.pkl` put there, say), naming it, and under DeepSpeed (whose loader unpickles)
one not signed with this account's key."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from jaguar import checksums
from jaguar.config import ConfigError
from jaguar.errors import JaguarError, MissingInputError
from jaguar.io import atomic_write_json, replace_directory, write_failed

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "weights.safetensors"  # consolidated model weights (fp32 masters under DeepSpeed), for extraction
EMA_WEIGHTS_FILE = "weights_ema.safetensors"
EXTRA_STATE_FILE = "jaguar_state.pt"  # jaguar's own objects' state dicts: tensors and plain data only
# With train.checkpoint_every=0, an epoch's end saves a step checkpoint only this many updates after the
# last one: a few steps per epoch would otherwise write the whole training state every few steps.
EPOCH_MIN_STEPS = 100
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


def check_resumable(path: Path, deepspeed: bool) -> None:
    """Refuse (CheckpointError naming the file) to resume from a checkpoint jaguar did not write as
    it is: every file must match its recorded sha256, no file may have been added, and under
    DeepSpeed the records must carry this account's signature."""
    problems = verify_checkpoint(path, full=True)
    if problems:
        raise CheckpointError(f"checkpoint {path} is refused for resuming, it is not as jaguar wrote it:\n  "
                              + "\n  ".join(problems[:10])
                              + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
                              + f"\nresume from another checkpoint, or start a new run.dir with "
                                f"train.init_from={Path(path) / WEIGHTS_FILE} (weights only, read safely)")
    if deepspeed:
        state = read_state(path)
        if not checksums.signed_here(state["files"], state.get("signature", "")):
            raise CheckpointError(f"checkpoint {path} was not written by jaguar under this account (its "
                                  f"signature does not match {checksums.key_path()}); DeepSpeed unpickles its "
                                  f"files, so it is not resumed: start a new run.dir with "
                                  f"train.init_from={Path(path) / WEIGHTS_FILE}")


def load_extra_state(path: Path, objects: dict) -> None:
    """Load each of `objects` (name -> object with load_state_dict) from the checkpoint's
    EXTRA_STATE_FILE, read as tensors and plain data only (weights_only=True)."""
    state_file = Path(path) / EXTRA_STATE_FILE
    if not objects:
        return
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} does not exist: the checkpoint was written by an earlier jaguar "
                              f"(its scheduler and EMA state are pickles, not read); start a new run.dir with "
                              f"train.init_from={Path(path) / WEIGHTS_FILE}")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as err:  # an unpickling refusal, a truncated zip: torch raises several types
        raise CheckpointError(f"{state_file} could not be read as tensors and plain data "
                              f"({type(err).__name__}: {str(err)[:200]}); use another checkpoint") from None
    missing = [name for name in objects if name not in state]
    if missing:
        raise CheckpointError(f"{state_file} has no state for {', '.join(missing)} (the run's settings changed: "
                              f"optim.ema or loss.center_weight); resume with the same settings")
    for name, obj in objects.items():
        obj.load_state_dict(state[name])


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
                    trainer_state: dict, keep_last: int, weights_prefix: str = "",
                    extra_state: Optional[dict] = None) -> Path:
    """Save the full training state under checkpoint_dir/name atomically; prune old step checkpoints.
    The exported weights are the tensors under `weights_prefix` (see `model_weights`); `extra_state`
    (name -> object with state_dict) goes to EXTRA_STATE_FILE. trainer_state.json, written last,
    records every file's checksum and this account's signature of them. A full disk or a refused
    write is a JaguarError naming the folder; the earlier checkpoints are kept."""
    final = checkpoint_dir / name
    tmp = checkpoint_dir / f".{name}.partial"
    if accelerator.is_main_process:
        # this process holds the run's writer lock: any hidden .partial here is a killed save's leftover
        for leftover in checkpoint_dir.glob(".*.partial") if checkpoint_dir.is_dir() else []:
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
    except Exception as err:  # a full disk comes as torch's RuntimeError or safetensors' own error type
        write_failed(final, err, "its partial folder was removed, the earlier checkpoints are kept", remove=tmp)
    # Gathering the full weights is collective under ZeRO: every rank calls it.
    weights = model_weights(accelerator, model, weights_prefix)
    if accelerator.is_main_process:
        try:
            save_file(_state_dict_to_cpu(weights), str(tmp / WEIGHTS_FILE))
            if ema is not None:
                save_file(_state_dict_to_cpu(ema.module.state_dict()), str(tmp / EMA_WEIGHTS_FILE))
            if extra_state:
                torch.save({key: obj.state_dict() for key, obj in extra_state.items()}, tmp / EXTRA_STATE_FILE)
            # every rank's files are there (save_state ends with a barrier): record them all
            records = checksums.folder_records(tmp)
            atomic_write_json(tmp / STATE_FILE, {**trainer_state, "files": records,
                                                 "signature": checksums.sign(records)})
        except Exception as err:  # write_failed re-raises what is not a full disk or a refused write
            write_failed(final, err, "its partial folder was removed, the earlier checkpoints are kept", remove=tmp)
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
