"""Training-loop overhead: jaguar's Trainer._optimizer_step against a bare torch loop (same jaguar
model from build_model, same criterion, plain torch AdamW: forward, loss, backward, step, zero_grad)
on the same in-memory batches. Prints figures; not a test. Goal: overhead <= 5%.

    python benchmarks/train_overhead.py [--backbone resnet18] [--size 128] [--batch 32]
        [--steps 10] [--repeats 5] [--warmup 3] [--grad-accum 1] [--precision fp32]

The Trainer is built for real (Accelerator, optimizer param groups, scheduler, criterion, loader)
on a small synthetic shard folder in a temporary directory; only its data loader is bypassed, so
the figure is the cost of the loop itself (accumulate context, finite-loss guard, grad-norm clip,
scheduler, loss bookkeeping), not of augmentation. Trainer and bare steps alternate, so drifting
machine load affects both alike; medians over steps and repetitions are reported, for wall
and process CPU time.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaguar.config import Config, load_config  # noqa: E402
from jaguar.data.prep import prepare  # noqa: E402
from jaguar.data.synth import make_synthetic  # noqa: E402
from jaguar.models import build_model  # noqa: E402
from jaguar.models.losses import ReIDCriterion  # noqa: E402
from jaguar.train.trainer import Trainer  # noqa: E402

GOAL_PERCENT = 5.0


def make_config(shards: Path, run_dir: Path, args: argparse.Namespace) -> Config:
    overrides = [f"data.shards={shards}", f"run.dir={run_dir}", f"model.backbone={args.backbone}",
                 "model.pretrained=false", f"model.img_size=[{args.size},{args.size}]",
                 f"train.grad_accum={args.grad_accum}", f"train.precision={args.precision}",
                 "data.num_workers=0", "optim.name=adamw", "optim.weight_decay=1e-4", "optim.lr=1e-4",
                 "train.eval_every=0", "optim.ema=false"]
    return load_config(ROOT / "recipes" / "tiny_cpu.py", overrides)


def make_batches(count: int, batch: int, size: int, num_classes: int) -> list[tuple]:
    """PK-like batches (4 images per identity) of random images: (images, labels, positions)."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for index in range(count):
        images = torch.randn(batch, 3, size, size, generator=generator)
        labels = (torch.arange(batch) // 4 + index) % num_classes
        batches.append((images, labels, torch.arange(batch)))
    return batches


class BareLoop:
    """What a hand-written loop does: forward, loss, backward, step, zero_grad."""

    def __init__(self, cfg: Config, num_classes: int, precision: str) -> None:
        torch.manual_seed(0)
        self.model = build_model(cfg, num_classes)
        self.criterion = ReIDCriterion(cfg, num_classes, self.model.embed_dim)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr,
                                           weight_decay=cfg.optim.weight_decay)
        self.bf16 = precision == "bf16"

    def step(self, batches) -> None:
        self.model.train()
        images, labels, _ = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            output = self.model(images)
            loss = self.criterion(output, labels)["loss"]
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def time_interleaved(trainer_step, bare_step, batches: list, grad_accum: int, warmup: int,
                     steps: int) -> dict[str, list[float]]:
    """Alternate one trainer step and one bare step, `steps` times after `warmup` untimed pairs:
    per-step wall and process-CPU seconds of each side. Alternating step by step means a burst of
    load from other jobs hits both sides alike."""
    repeat = (warmup + steps) * grad_accum // len(batches) + 1
    trainer_batches, bare_batches = iter(batches * repeat), iter(batches * repeat)
    for _ in range(warmup):
        trainer_step(trainer_batches)
        bare_step(bare_batches)
    times: dict[str, list[float]] = {"trainer_wall": [], "trainer_cpu": [], "bare_wall": [], "bare_cpu": []}
    for _ in range(steps):
        for side, step, source in (("trainer", trainer_step, trainer_batches), ("bare", bare_step, bare_batches)):
            wall, cpu = time.perf_counter(), time.process_time()
            step(source)
            times[f"{side}_wall"].append(time.perf_counter() - wall)
            times[f"{side}_cpu"].append(time.process_time() - cpu)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=128, help="input side (px)")
    parser.add_argument("--batch", type=int, default=32, help="micro-batch (multiple of 4: PK labels)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per repetition")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each repetition")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0 = torch's default); 1 is steadier on a shared machine")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="jaguar-overhead-") as tmp:
        tmp = Path(tmp)
        source = make_synthetic(tmp / "source", identities=8, train_images=64, test_images=8, size=64,
                                workers=1)
        shards = tmp / "shards"
        prepare(source, shards, workers=1)
        cfg = make_config(shards, tmp / "run", args)
        trainer = Trainer(cfg)
        num_classes = trainer.num_classes
        bare = BareLoop(cfg, num_classes, args.precision)
        batches = make_batches(8, args.batch, args.size, num_classes)

        def trainer_step(iterator) -> None:
            trainer._optimizer_step(iterator)
            trainer.step += 1

        print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__} ({torch.get_num_threads()} threads); "
              f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        print(f"model: {args.backbone} at {args.size}px, micro-batch {args.batch} x grad_accum "
              f"{args.grad_accum}, {args.precision}, {num_classes} classes; trainer optimizer "
              f"{type(trainer.optimizer.optimizer).__name__} "
              f"(param groups: {len(trainer.optimizer.param_groups)}), bare optimizer torch AdamW")
        print("| repetition | trainer s/step (wall) | bare s/step (wall) | overhead (wall) "
              "| trainer CPU s/step | bare CPU s/step | overhead (CPU) | load avg (1 min) |")
        print("|--:|--:|--:|--:|--:|--:|--:|--:|")
        medians: dict[str, list[float]] = {}
        for repeat in range(args.repeats):
            times = time_interleaved(trainer_step, lambda it: [bare.step(it) for _ in range(args.grad_accum)],
                                     batches, args.grad_accum, args.warmup, args.steps)
            for key, values in times.items():
                medians.setdefault(key, []).append(statistics.median(values))
            row = {key: values[-1] for key, values in medians.items()}
            print(f"| {repeat + 1} | {row['trainer_wall']:.4f} | {row['bare_wall']:.4f} | "
                  f"{100 * (row['trainer_wall'] / row['bare_wall'] - 1):+.1f}% | {row['trainer_cpu']:.4f} | "
                  f"{row['bare_cpu']:.4f} | {100 * (row['trainer_cpu'] / row['bare_cpu'] - 1):+.1f}% | "
                  f"{os.getloadavg()[0]:.2f} |", flush=True)
        final = {key: statistics.median(values) for key, values in medians.items()}
        images = args.batch * args.grad_accum
        print()
        for side in ("trainer", "bare"):
            print(f"{side + ':':<8s} {final[side + '_wall']:.4f} s/step wall ({images / final[side + '_wall']:.1f} "
                  f"images/s), {final[side + '_cpu']:.4f} CPU s/step")
        for clock in ("wall", "cpu"):
            overhead = 100 * (final[f"trainer_{clock}"] / final[f"bare_{clock}"] - 1)
            extra_ms = 1000 * (final[f"trainer_{clock}"] - final[f"bare_{clock}"])
            print(f"overhead ({clock}): {overhead:+.1f}% ({extra_ms:+.1f} ms/step; median over {args.repeats} "
                  f"repetitions of the per-repetition medians); goal <= {GOAL_PERCENT:.0f}%: "
                  f"{'met' if overhead <= GOAL_PERCENT else 'NOT met'}")
        print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
