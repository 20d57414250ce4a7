"""The training loop: one code path for 1 CPU process, N processes (gloo/NCCL), DDP or DeepSpeed.
Gradient accumulation without sync on non-final micro-steps, mixed precision, clipping, a guard
against non-finite gradients (jaguar.train.guard), periodic validation, atomic checkpoints and exact resume.

What Accelerate prepares is a `TrainedModules`: the ReID model and the criterion, so that the
center loss's centres are parameters of the module DDP wraps and their gradients are averaged in
its buckets with the model's (no all-reduce of our own). They keep BoT's own SGD at loss.center_lr."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import set_seed
from torch import nn

from jaguar.config import Config, ConfigError
from jaguar.data.loader import build_train_loader
from jaguar.data.mixup import mixup_batch
from jaguar.models import build_model
from jaguar.models.losses import ReIDCriterion
from jaguar.progress import progress_bar
from jaguar.core.weights import CheckpointError, load_weights, read_state
from jaguar.run_checkpoints import BEST, is_complete
from jaguar.train import checkpoint as ckpt
from jaguar.core.accelerator import (build_accelerator, prepare_model_for_deepspeed, refuse_settings_deepspeed_cannot_train,
                                set_deepspeed_micro_batch, uses_deepspeed)
from jaguar.run import RunDir, TrainingMetrics
from jaguar.core.run_split import RunSplit, build_run_split, open_train_split
from jaguar.train.distill import load_teacher
from jaguar.train.validation import validate
from jaguar.train.guard import NonFiniteGuard, TrainingStopped, all_ranks_finite, total_grad_norm
from jaguar.train.optim import (TrainedModules, build_center_optimizer, build_ema, build_optimizer, build_scheduler,
                                check_every_parameter_trained, refuse_centres_under_deepspeed, total_updates)
from jaguar.train.preempt import PreemptFlag
from jaguar.train.resume import apply_new_schedule, record_config
from jaguar.train.seeding import seed_rank_streams
from jaguar.train.tb import TensorBoardLogger

log = logging.getLogger("jaguar.train")


# Checkpoints hold the TrainedModules (model and centres); earlier ones held the model alone.
_STATE_LAYOUT = "model+criterion"


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        refuse_centres_under_deepspeed(cfg)
        refuse_settings_deepspeed_cannot_train(cfg)
        self.accelerator = build_accelerator(cfg)
        acc = self.accelerator
        set_seed(cfg.run.seed)
        self.run = RunDir(cfg.run.dir)
        self.run_dir = self.run.path
        # The shards are opened (and checked) before the run folder is made: bad input leaves no folder behind.
        self.split = open_train_split(cfg)
        self.lock = self.run.writer_lock("jaguar train", create=True).acquire()  # rank 0's, until train() ends
        self.resume_from = self.run.checkpoints.resume_from(cfg.train.resume)
        self.schedule_changes = record_config(self.run, cfg, acc, self.resume_from)
        self.run_split = self._training_data()
        self.num_classes = self.run_split.num_classes

        # a resumed run's weights are in its checkpoint: the original pretrained file need not exist
        model = build_model(cfg, self.num_classes, load_pretrained=self.resume_from is None)
        if cfg.train.init_from and self.resume_from is None:
            load_weights(model, Path(cfg.train.init_from), partial=True)
        self.mean, self.std = tuple(model.mean), tuple(model.std)
        self.criterion = ReIDCriterion(cfg, self.num_classes, model.embed_dim)
        self.teacher = (load_teacher(cfg, self.split.filenames, self.run_split.train_indices, model.embed_dim)
                        if cfg.distill.teacher else None)
        optimizer = build_optimizer(cfg, model)
        # Not prepared: a prepared optimizer's step() runs the fp16 scaler's step and update(); a second
        # one would then unscale its gradients again and update the scale twice a step (accelerate
        # issue #439; torch's AMP notes: update() once, after every optimizer). Its gradients are
        # unscaled with the model's, and the one update() comes with the model's step (_apply_update).
        self.center_optimizer = build_center_optimizer(cfg, self.criterion)
        seed_rank_streams(cfg.run.seed, acc.process_index)  # built alike above; own dropout per rank from here

        self.loader = build_train_loader(cfg, self.split, self.run_split.train_indices, acc.process_index,
                                         acc.num_processes, self.mean, self.std,
                                         label_map=self.run_split.class_of_label)
        # The sampler's epoch is whole optimizer steps, so that checkpoints fall on step boundaries.
        self.steps_per_epoch = len(self.loader.batch_sampler) // cfg.train.grad_accum
        self.total_steps = total_updates(cfg, self.steps_per_epoch)
        self.scheduler = build_scheduler(cfg, optimizer, self.steps_per_epoch, self.total_steps)

        model = prepare_model_for_deepspeed(model, acc)
        set_deepspeed_micro_batch(acc, self.loader.batch_sampler.batch_size)
        self.model, self.optimizer = acc.prepare(TrainedModules(model, self.criterion), optimizer)
        self.input_dtype = next(self.model.parameters()).dtype
        self.ema = build_ema(cfg, self.reid_model)
        # saved to jaguar_state.pt (weights_only=True), not as accelerate's custom pickles (weights_only=False)
        self.extra_state = {"scheduler": self.scheduler}
        if self.center_optimizer is not None:
            self.extra_state["center_optimizer"] = self.center_optimizer
        if self.ema is not None:
            self.extra_state["ema"] = self.ema

        self.tb = TensorBoardLogger(self.run.tb_dir, enabled=acc.is_main_process)
        self.step = 0  # optimizer-step slots consumed (data position); skipped steps count too
        self.guard = NonFiniteGuard(cfg.train.max_bad_steps, cfg.train.precision, uses_deepspeed(acc))
        self.best: dict = {}
        self.last_step_save = 0  # the step of the newest step checkpoint (of this process's run)
        self.history: list[dict] = []
        self.preempt = PreemptFlag()

    @property
    def reid_model(self) -> nn.Module:
        """The ReID model being trained (unwrapped): what validation, the EMA and extraction see."""
        return self.accelerator.unwrap_model(self.model).model

    # ------------------------------------------------------------------ set-up helpers

    def _trainer_state(self) -> dict:
        return {
            "layout": _STATE_LAYOUT,
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            **self.guard.state_dict(),
            "best": self.best,
            "history": self.history,
            "num_classes": self.num_classes,
            "world_size": self.accelerator.num_processes,
        }

    def _training_data(self) -> RunSplit:
        """The run's split: read back from the run's split record when resuming (the checkpoint was trained on
        it), else built from the config and saved there."""
        run = self.run
        if self.resume_from is not None and run.split_path.is_file():
            return RunSplit.from_record(run.load_split(), self.split, str(run.split_path))
        run_split = build_run_split(self.cfg, self.split)
        if self.accelerator.is_main_process:
            run.save_split(run_split.to_record(self.split))
        return run_split

    def _resume(self) -> None:
        source = self.resume_from
        if source is None:
            return
        state = read_state(source)
        if state.get("layout") != _STATE_LAYOUT:
            raise ConfigError(f"checkpoint {source} was saved by an earlier jaguar (the model without the "
                              f"criterion) and cannot be resumed; start a new run.dir, with "
                              f"train.init_from={source} to start from its weights")
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise ConfigError(f"checkpoint {source} was made with {state['steps_per_epoch']} steps per epoch, "
                              f"this run has {self.steps_per_epoch} (batch size, world size or data changed); "
                              f"resume with the same settings or start a new run.dir")
        ckpt.check_resumable(source, uses_deepspeed(self.accelerator))
        fresh_schedule = self.scheduler.state_dict()  # built from this config
        try:
            self.accelerator.load_state(str(source))
        except Exception as err:  # a file torch or DeepSpeed cannot read: each raises its own types
            raise CheckpointError(f"checkpoint {source} could not be loaded ({type(err).__name__}: "
                                       f"{str(err)[:300]}); resume from another checkpoint") from err
        ckpt.load_extra_state(source, self.extra_state)
        self.step = self.last_step_save = state["step"]
        if self.schedule_changes:  # the checkpoint's scheduler follows the recorded schedule
            apply_new_schedule(self.scheduler, self.optimizer, fresh_schedule, self.cfg.optim.lr, self.step)
        self.guard.load_state_dict(state)
        self.best, self.history = state["best"], state["history"]
        self.accelerator.step = self.step * self.cfg.train.grad_accum
        log.info("resumed from %s at step %d (epoch %d)", source, self.step, state["epoch"])

    def _log_start(self) -> None:
        acc, cfg = self.accelerator, self.cfg
        per_step = self.loader.batch_sampler.batch_size if hasattr(self.loader.batch_sampler, "batch_size") else None
        log.info("world size %d (%s, %s), precision %s, DeepSpeed %s", acc.num_processes, acc.device,
                 acc.distributed_type, cfg.train.precision, uses_deepspeed(acc))
        log.info("data: %d training images of %d identities, %d validation images; %s",
                 len(self.run_split.train_indices), self.num_classes, len(self.run_split.val_indices),
                 cfg.data.shards)
        log.info("micro-batch %s per process x %d processes x %d accumulation = effective batch %s; "
                 "%d steps/epoch, %d steps in all", per_step, acc.num_processes, cfg.train.grad_accum,
                 per_step * acc.num_processes * cfg.train.grad_accum if per_step else "?",
                 self.steps_per_epoch, self.total_steps)

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        try:
            return self._train()
        finally:
            self.lock.release()

    def _train(self) -> dict:
        self._resume()
        self._log_start()
        acc, cfg = self.accelerator, self.cfg
        if self.step >= self.total_steps:
            log.info("training already finished at step %d; nothing to do", self.step)
            return self._write_metrics()
        bar = progress_bar(total=self.total_steps, initial=self.step, enabled=acc.is_main_process, desc="train",
                           unit="step")
        sums: dict[str, float] = {}
        window_steps, images_seen, window_start = 0, 0, time.perf_counter()
        while self.step < self.total_steps:
            epoch, position = divmod(self.step, self.steps_per_epoch)
            self.loader.batch_sampler.set_position(epoch, position * cfg.train.grad_accum)
            batches = iter(self.loader)
            epoch_start = time.perf_counter()
            while position < self.steps_per_epoch and self.step < self.total_steps:
                terms, grad_norm, count = self._optimizer_step(batches)
                self.step += 1
                position += 1
                images_seen += count
                window_steps += 1
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + value
                bar.update(1)
                if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    self._log_scalars(sums, window_steps, grad_norm,
                                      images_seen * acc.num_processes / max(elapsed, 1e-9))
                    bar.set_postfix(loss=f"{sums.get('loss', 0.0) / window_steps:.3f}", refresh=False)
                    sums, window_steps, images_seen, window_start = {}, 0, 0, time.perf_counter()
                if self._preempt_requested():
                    self._save("step")
                    if acc.is_main_process:
                        self.run.preempt_flag.unlink(missing_ok=True)
                    log.warning("preempted at step %d: checkpoint saved, exiting", self.step)
                    bar.close()
                    return {"preempted": True, "step": self.step, "signal": self.preempt.signum}
                if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                    self._save("step")
            if position == self.steps_per_epoch:
                self._end_of_epoch(epoch, time.perf_counter() - epoch_start)
        bar.close()
        if not is_complete(self.run.checkpoints.step_dir(self.step)):
            self._save("step")
        return self._write_metrics()

    def _optimizer_step(self, batches) -> tuple[dict[str, float], Optional[float], int]:
        """Run `grad_accum` micro-batches and one optimizer update; returns loss terms, grad norm, images."""
        acc, cfg = self.accelerator, self.cfg
        self.model.train()
        totals: dict[str, float] = {}
        loss_finite = True
        count = 0
        grad_norm, applied = None, False
        # A skipped update must leave the model as it was: BatchNorm statistics included (the forward
        # of a bad batch may have written NaN into them).
        buffers = [(buffer, buffer.detach().clone()) for buffer in self.model.buffers()]
        for micro in range(cfg.train.grad_accum):
            images, labels, positions = next(batches)
            # Under DeepSpeed bf16 the weights themselves are bf16, and so must the inputs be.
            images, labels = images.to(acc.device, self.input_dtype), labels.to(acc.device)
            count += images.shape[0]
            mix = None
            if cfg.data.mixup_prob > 0 and cfg.data.mixup_alpha > 0:
                generator = torch.Generator().manual_seed(
                    hash((cfg.run.seed, self.step, micro, acc.process_index)) & 0x7FFFFFFF)
                mixed = mixup_batch(images, labels, cfg.data.mixup_alpha, cfg.data.mixup_prob, generator)
                if mixed is not None:
                    images, labels_a, labels_b, lam = mixed
                    mix = (labels_b, lam)
            teacher = self.teacher.lookup(positions).to(acc.device) if self.teacher is not None else None
            with acc.accumulate(self.model):
                terms = self.criterion(self.model(images), labels, mix=mix, teacher=teacher)
                loss_finite = loss_finite and bool(torch.isfinite(terms["loss"].detach()))
                skipped_before = getattr(self.model, "skipped_steps", 0)
                acc.backward(terms["loss"])
                if acc.sync_gradients:
                    grad_norm, applied = self._apply_update(skipped_before)
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach()) / cfg.train.grad_accum
        if not applied:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
        scale = acc.scaler.get_scale() if acc.scaler is not None else None
        try:
            self.guard.update_done(applied, self.step, loss_finite, grad_norm, scale)
        finally:
            if not applied:
                self.tb.scalars({"train/skipped_steps": self.guard.skipped}, self.step + 1)
                self.tb.flush()
        if applied:
            self.scheduler.step_update(self.step + 1)
            if self.ema is not None:
                self.ema.update(self.reid_model, step=self.step + 1)
        return totals, grad_norm if applied else None, count

    def _apply_update(self, deepspeed_skipped_before: int) -> tuple[Optional[float], bool]:
        """After the last micro-batch's backward: clip and step unless the gradient norm is non-finite
        on some rank; returns (gradient norm, whether the update was applied)."""
        acc, cfg = self.accelerator, self.cfg
        if uses_deepspeed(acc):
            # DeepSpeed stepped inside backward(); its overflow check (fp16, and bf16 by default) has
            # already skipped a non-finite update, which its skipped_steps counter records.
            norm = self.model.get_global_grad_norm()
            return (float(norm) if norm is not None else None,
                    self.model.skipped_steps == deepspeed_skipped_before)
        # DDP has averaged every gradient, the centres' included. fp16: the scaler divides the gradients
        # of both optimizers and notes any inf of each.
        optimizers = [self.optimizer] + ([self.center_optimizer] if self.center_optimizer is not None else [])
        acc.unscale_gradients(optimizers)
        if self.step == 0:
            check_every_parameter_trained(acc.unwrap_model(self.model), acc.num_processes, cfg)
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        norm = total_grad_norm(parameters)
        applied = all_ranks_finite(acc, norm)
        if applied:
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(parameters, cfg.optim.grad_clip, norm)
            # fp16: the scaler's step, then its update() from both optimizers' inf checks (once a step).
            self.optimizer.step()
            if self.center_optimizer is not None:
                # Gradients unscaled above and finite on every rank (the guard's norm covers them).
                self.center_optimizer.step()
        elif acc.scaler is not None:
            # fp16: no step; the scaler's update lowers its scale for the inf its unscale_ recorded.
            acc.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.center_optimizer is not None:
            self.center_optimizer.zero_grad(set_to_none=True)
        return float(norm), applied

    def _preempt_requested(self) -> bool:
        local = self.preempt.raised or self.run.preempt_flag.exists()
        if self.accelerator.num_processes == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    # ------------------------------------------------------------------ periodic work

    def _log_scalars(self, sums: dict[str, float], steps: int, grad_norm: Optional[float],
                     images_per_sec: float) -> None:
        values = {("train/loss" if key == "loss" else f"train/loss_{key}"): value / steps
                  for key, value in sums.items()}
        for index, group in enumerate(self.optimizer.param_groups):
            values[f"train/lr/{group.get('name', index)}"] = group["lr"]
        values["train/grad_norm"] = grad_norm
        values["train/images_per_sec"] = images_per_sec
        values["train/skipped_steps"] = self.guard.skipped
        gem_p = self.reid_model.gem_p()
        values["model/gem_p"] = gem_p
        self.tb.scalars(values, self.step)

    def _end_of_epoch(self, epoch: int, seconds: float) -> None:
        cfg = self.cfg
        self.tb.scalars({"train/epoch_time_s": seconds}, self.step)
        last = self.step >= self.total_steps
        evaluate = cfg.train.eval_every > 0 and len(self.run_split.val_indices) > 0 and (
            (epoch + 1) % cfg.train.eval_every == 0 or last)
        if evaluate:
            model = self.ema.module if self.ema is not None else self.reid_model
            result = validate(model, self.split, self.run_split.val_indices, cfg, self.accelerator,
                              self.mean, self.std, self.tb, self.step)
            entry = {"epoch": epoch + 1, "step": self.step, **result}
            self.history.append(entry)
            improved = not self.best or result["mAP_balanced"] > self.best["mAP_balanced"]
            log.info("epoch %d: validation identity-balanced mAP %.4f, rank-1 %.4f%s", epoch + 1, result["mAP_balanced"],
                     result["rank1"], " (best so far: kept as the best checkpoint)" if improved else "")
            if improved:
                self.best = entry
                self._save("best")
        if not cfg.train.checkpoint_every and not last and self.step - self.last_step_save >= ckpt.EPOCH_MIN_STEPS:
            self._save("step")
        self.tb.flush()

    def _save(self, kind: str) -> None:
        name = BEST if kind == "best" else self.run.checkpoints.step_name(self.step)
        if kind == "step":
            self.last_step_save = self.step
        ckpt.save_checkpoint(self.accelerator, self.model, self.ema, self.run.checkpoints, name,
                             self._trainer_state(), self.cfg.train.keep_last, TrainedModules.MODEL_PREFIX,
                             self.extra_state)

    def _write_metrics(self) -> dict:
        metrics = {"best": self.best, "history": self.history, "steps": self.step,
                   "skipped_steps": self.guard.skipped, "num_classes": self.num_classes,
                   "world_size": self.accelerator.num_processes}
        if self.accelerator.is_main_process:
            self.run.save_metrics(TrainingMetrics(**metrics))
        self.tb.close()
        self.accelerator.wait_for_everyone()
        return metrics


def train(cfg: Config) -> dict:
    """Train a model as the config says; returns the run's metrics."""
    return Trainer(cfg).train()
