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

import logging
import shutil
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from jaguar import checksums
from jaguar.core.weights import CheckpointError, read_state, verify_checkpoint
from jaguar.io import atomic_write_json, replace_directory, write_failed
from jaguar.run_checkpoints import EMA_WEIGHTS_FILE, EXTRA_STATE_FILE, STATE_FILE, WEIGHTS_FILE, CheckpointFolder

log = logging.getLogger(__name__)

# With train.checkpoint_every=0, an epoch's end saves a step checkpoint only this many updates after the
# last one: a few steps per epoch would otherwise write the whole training state every few steps.
EPOCH_MIN_STEPS = 100


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


def save_checkpoint(accelerator: Accelerator, model, ema, folder: CheckpointFolder, name: str,
                    trainer_state: dict, keep_last: int, weights_prefix: str = "",
                    extra_state: Optional[dict] = None) -> Path:
    """Save the full training state as checkpoint `name` of `folder` (RunDir.checkpoints) atomically;
    prune old step checkpoints.
    The exported weights are the tensors under `weights_prefix` (see `model_weights`); `extra_state`
    (name -> object with state_dict) goes to EXTRA_STATE_FILE. trainer_state.json, written last,
    records every file's checksum and this account's signature of them. A full disk or a refused
    write is a JaguarError naming the folder; the earlier checkpoints are kept."""
    final = folder.path / name
    tmp = folder.partial_dir(name)
    if accelerator.is_main_process:
        # this process holds the run's writer lock: any hidden .partial here is a killed save's leftover
        for leftover in folder.partial_leftovers():
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
    except Exception as err:  # a full disk comes as torch's RuntimeError or safetensors' own error type
        write_failed(final, err, "its partial folder was removed, the earlier checkpoints are kept", remove=tmp)
    # accelerate's save_state has no barrier at its end (1.16: each rank writes its random_states_<rank>.pkl
    # and returns): without one, rank 0 could record the folder before another rank's file is there,
    # and resuming would refuse that file as not written by jaguar (seen on a loaded 2-core machine).
    accelerator.wait_for_everyone()
    # Gathering the full weights is collective under ZeRO: every rank calls it.
    weights = model_weights(accelerator, model, weights_prefix)
    if accelerator.is_main_process:
        try:
            save_file(_state_dict_to_cpu(weights), str(tmp / WEIGHTS_FILE))
            if ema is not None:
                save_file(_state_dict_to_cpu(ema.module.state_dict()), str(tmp / EMA_WEIGHTS_FILE))
            if extra_state:
                torch.save({key: obj.state_dict() for key, obj in extra_state.items()}, tmp / EXTRA_STATE_FILE)
            # every rank's files are there (the barrier after save_state): record them all
            records = checksums.folder_records(tmp)
            atomic_write_json(tmp / STATE_FILE, {**trainer_state, "files": records,
                                                 "signature": checksums.sign(records)})
        except Exception as err:  # write_failed re-raises what is not a full disk or a refused write
            write_failed(final, err, "its partial folder was removed, the earlier checkpoints are kept", remove=tmp)
        replace_directory(tmp, final)
        if folder.is_step_name(name) and keep_last > 0:
            for stale in folder.steps()[:-keep_last]:
                shutil.rmtree(stale, ignore_errors=True)
        log.debug("checkpoint saved: %s", final)  # one a epoch: the epoch and closing lines say enough
    accelerator.wait_for_everyone()
    return final
