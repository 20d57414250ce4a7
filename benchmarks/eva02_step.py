"""One EVA-02-L/448 training step on CPU through the real trainer and recipes/eva02_large.py's
config (random init: model.pretrained=false), batch 2: wall time and peak memory, bf16 autocast
as the recipe says and fp32 for comparison, with and without gradient checkpointing.
Prints figures; not a test.

    python benchmarks/eva02_step.py [--size 448] [--batch 2] [--steps 2]
        [--variants bf16:on bf16:off fp32:on]

Each variant runs in its own process (peak RSS is per process: ru_maxrss). A step is
Trainer._optimizer_step with train.grad_accum=1: forward, ArcFace loss, backward, clip to 1.0,
AdamW update (the first step also allocates AdamW's state). The micro-batch comes from memory,
not from the loader. Batch 2 is the smallest that trains: the recipe's BNNeck (BatchNorm1d)
cannot compute batch statistics from one image; per-image figures are step time / batch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "eva02_large.py"


def _rss_gb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024 ** 2
    return float("nan")


def run_one(precision: str, checkpointing: bool, size: int, batch: int, steps: int) -> dict:
    """Build the trainer for the recipe and time `steps` optimizer steps; runs in a child process."""
    import torch

    from jaguar.config import load_config
    from jaguar.data.prep import prepare
    from jaguar.data.synth import make_synthetic
    from jaguar.train.trainer import Trainer

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="jaguar-eva02-") as tmp:
        tmp = Path(tmp)
        # The trainer needs a shard folder to start; its images are never read here.
        source = make_synthetic(tmp / "source", identities=4, train_images=16, test_images=4, size=64, workers=1)
        prepare(source, tmp / "shards", workers=1)
        overrides = [f"data.shards={tmp / 'shards'}", f"run.dir={tmp / 'run'}", "model.pretrained=false",
                     f"model.img_size=[{size},{size}]", f"train.precision={precision}",
                     f"model.grad_checkpointing={str(checkpointing).lower()}", "train.grad_accum=1",
                     "data.p_identities=1", f"data.k_images={batch}", "data.num_workers=0",
                     "data.val_fraction=0", "train.eval_every=0"]
        cfg = load_config(RECIPE, overrides)
        started = time.perf_counter()
        trainer = Trainer(cfg)
        build_s = time.perf_counter() - started
        rss_built = _rss_gb()
        params = sum(p.numel() for p in trainer.model.parameters())
        generator = torch.Generator().manual_seed(0)
        batches = [(torch.randn(batch, 3, size, size, generator=generator),
                    torch.arange(batch) % trainer.num_classes, torch.arange(batch)) for _ in range(steps)]
        iterator = iter(batches)
        step_s, losses = [], []
        for _ in range(steps):
            started = time.perf_counter()
            terms, grad_norm, _ = trainer._optimizer_step(iterator)
            step_s.append(time.perf_counter() - started)
            trainer.step += 1
            losses.append(terms["loss"])
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux
    return {"precision": precision, "checkpointing": checkpointing, "size": size, "batch": batch,
            "params_m": params / 1e6, "build_s": build_s, "step_s": step_s, "losses": losses,
            "grad_norm": grad_norm, "rss_after_build_gb": rss_built, "peak_rss_gb": peak_gb,
            "threads": torch.get_num_threads(), "skipped_steps": trainer.guard.skipped}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--batch", type=int, default=2, help=">= 2: the BNNeck needs batch statistics")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per variant (the first is cold)")
    parser.add_argument("--variants", nargs="+", default=["bf16:on", "bf16:off", "fp32:on"],
                        help="precision:checkpointing pairs, e.g. bf16:on fp32:off")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = parser.parse_args()

    if args.batch < 2:
        parser.error(f"--batch {args.batch}: the recipe's BNNeck (BatchNorm1d) needs at least 2 images per "
                     f"training batch; use --batch 2 and divide by 2 for per-image figures")
    if args.one:
        precision, checkpointing = args.one.split(":")
        result = run_one(precision, checkpointing == "on", args.size, args.batch, args.steps)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; recipe {RECIPE.name}, "
          f"{args.size}px, batch {args.batch}, {args.steps} steps per variant")
    print("| precision | grad checkpointing | first step | next step(s) | best s/image | peak RSS | RSS after build "
          "| loss | load avg (1 min) |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|")
    failures = 0
    for variant in args.variants:
        if variant.split(":")[0] not in ("bf16", "fp32") or variant.split(":")[-1] not in ("on", "off"):
            parser.error(f"--variants entry {variant!r} must be bf16|fp32 : on|off, e.g. bf16:on")
        load_before = os.getloadavg()[0]
        child = subprocess.run([sys.executable, __file__, "--one", variant, "--size", str(args.size),
                                "--batch", str(args.batch), "--steps", str(args.steps)],
                               capture_output=True, text=True)
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode != 0 or not lines:
            failures += 1
            print(f"| {variant} failed (exit {child.returncode}): {child.stderr.strip().splitlines()[-1:]} |")
            continue
        result = json.loads(lines[-1][len("RESULT "):])
        later = result["step_s"][1:]
        later_text = ", ".join(f"{s:.1f} s" for s in later) if later else "-"
        print(f"| {result['precision']} | {'on' if result['checkpointing'] else 'off'} | "
              f"{result['step_s'][0]:.1f} s | {later_text} | {min(result['step_s']) / result['batch']:.1f} s | "
              f"{result['peak_rss_gb']:.2f} GB | "
              f"{result['rss_after_build_gb']:.2f} GB | {result['losses'][-1]:.3f} | "
              f"{load_before:.2f}->{os.getloadavg()[0]:.2f} |", flush=True)
        print(f"  ({result['params_m']:.1f} M parameters, trainer built in {result['build_s']:.1f} s, "
              f"{result['threads']} torch threads, grad norm {result['grad_norm']}, "
              f"skipped steps {result['skipped_steps']})", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
