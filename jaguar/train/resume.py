"""Resuming a run whose config has changed since its checkpoint (composer#3154, detectron2#429).

A resumed run continues weights, optimizer, scheduler and sampler state made under the run's recorded
config.yaml. Each changed key is one of three kinds:
- free: it does not change what is trained (logging, checkpoint cadence, reader workers, the search
  settings of `retrieval.*`): taken as given;
- schedule: the LR schedule and the run's length (`train.epochs`, `train.max_steps`, `optim.lr`, ...) and
  `optim.grad_clip`: applied knowingly from the resumed step on, the scheduler rebuilt from the new
  values; the config in force until then is kept as RUN/config_history/step-NNNNNN.yaml and the
  change is logged;
- fixed: anything else (model, data, losses, optimizer kind, precision, seed, accumulation): the
  checkpoint cannot continue under it, so the resume is refused with every such key, its recorded
  and its new value."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

from jaguar.config import Config, ConfigError, to_dict
from jaguar.run import RunDir
from jaguar.core.weights import read_state

log = logging.getLogger("jaguar.train")

FREE_KEYS = ("retrieval.", "train.resume", "train.log_every", "train.checkpoint_every", "train.keep_last",
             "train.max_bad_steps", "train.eval_every", "train.init_from", "data.num_workers", "run.name",
             "run.dir")
SCHEDULE_KEYS = ("train.epochs", "train.max_steps", "optim.lr", "optim.min_lr", "optim.warmup_epochs",
                 "optim.warmup_lr", "optim.scheduler", "optim.milestones", "optim.gamma", "optim.grad_clip")


def _flat(mapping: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _matches(key: str, names: tuple[str, ...]) -> bool:
    return any(key == name or (name.endswith(".") and key.startswith(name)) for name in names)


@dataclasses.dataclass
class ConfigChanges:
    """The keys whose value differs between the recorded and the new config: (key, recorded, new)."""
    schedule: list[tuple[str, Any, Any]]
    fixed: list[tuple[str, Any, Any]]
    free: list[tuple[str, Any, Any]]

    @staticmethod
    def describe(changes: list[tuple[str, Any, Any]]) -> str:
        return ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)


def config_changes(recorded: Config, new: Config) -> ConfigChanges:
    """Compare a run's recorded config with the config it is resumed with, key by key."""
    old_values, new_values = _flat(to_dict(recorded)), _flat(to_dict(new))
    changed = [(key, old_values[key], new_values[key]) for key in new_values if old_values.get(key) != new_values[key]]
    return ConfigChanges(schedule=[c for c in changed if _matches(c[0], SCHEDULE_KEYS)],
                         fixed=[c for c in changed if not _matches(c[0], SCHEDULE_KEYS + FREE_KEYS)],
                         free=[c for c in changed if _matches(c[0], FREE_KEYS)])


def refuse_fixed_changes(changes: ConfigChanges, checkpoint: object, config_path: object) -> None:
    """Raise ConfigError naming every fixed key that changed, with both values."""
    if changes.fixed:
        raise ConfigError(f"cannot resume from {checkpoint}: the config differs from the run's {config_path} in "
                          f"{ConfigChanges.describe(changes.fixed)}; the checkpoint was trained with the recorded "
                          f"values. Resume with them, or start a new run.dir (train.init_from={checkpoint} starts "
                          f"from its weights)")


def record_config(run: RunDir, cfg: Config, accelerator, resume_from: Optional[Path]) -> list[tuple[str, Any, Any]]:
    """Write the run's config.yaml (main process). When resuming, compare it first with the recorded
    one: refuse changed fixed keys (nothing written); before a changed schedule replaces the record,
    keep it as the run's config history at the checkpoint's step. Returns the schedule changes."""
    changes = None
    if resume_from is not None and run.has_config():
        changes = config_changes(run.load_config(), cfg)
        refuse_fixed_changes(changes, resume_from, run.config_path)
    if accelerator.is_main_process:
        run.path.mkdir(parents=True, exist_ok=True)
        if changes is not None and changes.schedule:
            step = read_state(resume_from).get("step", 0)
            kept = run.config_history_path(step)
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run.config_path, kept)
            log.warning("resuming at step %d with a changed schedule (%s): applied from here on; the config "
                        "until then is kept in %s", step, ConfigChanges.describe(changes.schedule), kept)
        run.save_config(cfg)
    accelerator.wait_for_everyone()
    return changes.schedule if changes is not None else []


def apply_new_schedule(scheduler, optimizer, fresh_state: dict, lr: float, step: int) -> None:
    """After loading a checkpoint made under another schedule: continue at `step` on the schedule of
    the new config, whose scheduler state (made before the checkpoint was loaded) is `fresh_state`."""
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
    scheduler.load_state_dict(fresh_state)
    scheduler.step_update(step)
