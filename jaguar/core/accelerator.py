"""Build the Accelerator for a run: the same call on 1 CPU process, 2 CPU processes (gloo), N GPUs,
DDP or DeepSpeed ZeRO. The CPU traps (gloo backend, DeepSpeed on CPU) are handled here."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

from jaguar.config import Config, ConfigError, deepspeed_zero_stage, refuse_ema_under_zero3

log = logging.getLogger(__name__)

_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def launched_with_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def launcher_zero_stage() -> Optional[int]:
    """The ZeRO stage `accelerate launch` asks for through its environment (a DeepSpeed config file,
    or the stage of an accelerate config without one); None when not launched with DeepSpeed."""
    if not launched_with_deepspeed():
        return None
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if config_file and config_file != "none":
        return deepspeed_zero_stage(config_file)
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
    return int(stage) if stage.isdigit() else None


def refuse_settings_deepspeed_cannot_train(cfg: Config) -> None:
    """Raise ConfigError for settings the DeepSpeed launch of this process cannot train (EMA under
    ZeRO-3); the train.deepspeed_config route is refused when the config is loaded."""
    refuse_ema_under_zero3(cfg, launcher_zero_stage(), "the DeepSpeed config of `accelerate launch`")


def follow_grad_clip(deepspeed_config: dict, grad_clip: float) -> None:
    """Make DeepSpeed clip as optim.grad_clip says (0 disables): an "auto" value would otherwise be
    filled with 1.0 by Accelerate, and a number in the JSON would silently win over the run's config
    (accelerate#2791)."""
    stated = deepspeed_config.get("gradient_clipping", "auto")
    if stated not in ("auto", None) and float(stated) != float(grad_clip):
        log.warning("the DeepSpeed config's gradient_clipping=%s is replaced by optim.grad_clip=%s",
                    stated, grad_clip)
    deepspeed_config["gradient_clipping"] = float(grad_clip)


def build_accelerator(cfg: Config) -> Accelerator:
    """An Accelerator configured from the run config and the launcher's environment."""
    on_gpu = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "false").lower() != "true"
    kwargs_handlers = []
    if not on_gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Without GPUs NCCL is unavailable; accelerate would otherwise pick it for DeepSpeed.
        kwargs_handlers.append(InitProcessGroupKwargs(backend="gloo"))
    deepspeed_plugin = None
    if cfg.train.deepspeed_config and not launched_with_deepspeed():
        path = Path(cfg.train.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"train.deepspeed_config={path} does not exist (see launch/deepspeed/*.json)")
        deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=str(path))
    if deepspeed_plugin is not None or launched_with_deepspeed():
        try:
            import transformers  # noqa: F401  (accelerate's DeepSpeed integration imports it)
        except ImportError as err:
            raise ConfigError("DeepSpeed through accelerate needs `transformers`: pip install transformers") from err
    precision = _PRECISION[cfg.train.precision]
    if precision == "fp16" and not on_gpu:
        raise ConfigError("train.precision=fp16 needs a GPU; use train.precision=bf16 or fp32 on CPU")
    deepspeed_run = deepspeed_plugin is not None or launched_with_deepspeed()
    accelerator = Accelerator(
        # Accelerate drops a yaml's use_cpu on the way to the workers, so ask for CPU here; but
        # cpu=True silently disables DeepSpeed, which picks its own CPU accelerator anyway.
        cpu=not on_gpu and not deepspeed_run,
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        deepspeed_plugin=deepspeed_plugin,
        kwargs_handlers=kwargs_handlers,
        step_scheduler_with_optimizer=False,
    )
    if deepspeed_run:
        follow_grad_clip(accelerator.state.deepspeed_plugin.deepspeed_config, cfg.optim.grad_clip)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes != world:
        raise RuntimeError(f"launched as {world} processes (WORLD_SIZE) but Accelerate set up "
                           f"{accelerator.num_processes} ({accelerator.distributed_type}); on CPU use "
                           f"`accelerate launch --config_file launch/cpu_2proc.yaml` or torchrun")
    return accelerator


def end_process_group() -> None:
    """Destroy the default process group, if this process has one, once its work is done: a gloo
    process that exits without it can abort at interpreter exit ("terminate called without an
    active exception": gloo's worker threads outlive Python, pytorch#190489), failing a finished
    command. Called on success only: ranks that failed may be stuck in a collective."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def set_deepspeed_micro_batch(accelerator: Accelerator, micro_batch: int) -> None:
    """DeepSpeed's "auto" micro-batch is filled from a prepared DataLoader; ours is rank-aware and
    is not prepared, so state it."""
    if uses_deepspeed(accelerator):
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def prepare_model_for_deepspeed(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """DeepSpeed bf16 casts parameters but not buffers; EVA-02's rope/k_bias buffers stay fp32 and break
    attention ('Float and BFloat16'). Casting the whole module first keeps every tensor in one dtype.

    ZeRO-3 gathers a module's parameters when its forward runs; the parameters the backbone reads
    of a module whose forward does not run (Backbone.external_params) are registered with the module
    that reads them, or they would stay partitioned (zero-size) there."""
    if uses_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3:
        from deepspeed.runtime.zero import register_external_parameter

        backbone = model.backbone
        for runner, name in backbone.external_params:
            register_external_parameter(backbone.get_submodule(runner) if runner else backbone,
                                        backbone.get_parameter(name))
    if uses_deepspeed(accelerator) and accelerator.mixed_precision == "bf16":
        return model.to(torch.bfloat16)
    return model
