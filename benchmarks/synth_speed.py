"""Synthetic data set speed: wall and CPU time of `jaguar synth` for a given size. Prints figures;
not a test. Goal: 2,000 images at 256 px in well under a minute on 2 cores.

    python benchmarks/synth_speed.py [--train-images 2000] [--test-images 31] [--size 256]
                                     [--workers N] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaguar.data.synth import make_synthetic  # noqa: E402

GOAL_SECONDS = 60.0


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--test-images", type=int, default=31, help="at least one per identity")
    parser.add_argument("--identities", type=int, default=31)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    total = args.train_images + args.test_images
    print(f"{os.cpu_count()} cores, load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"jaguar synth: {args.train_images} train + {args.test_images} test images of {args.identities} "
          f"identities at {args.size} px, workers={args.workers or os.cpu_count()}")
    print("| run | wall | CPU (all processes) | images/s | ms CPU per image | MB on disk |")
    print("|--:|--:|--:|--:|--:|--:|")
    for run in range(1, args.repeats + 1):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "synth"
            cpu_start, wall_start = cpu_seconds(), time.perf_counter()
            make_synthetic(out, identities=args.identities, train_images=args.train_images,
                           test_images=args.test_images, size=args.size, seed=run, workers=args.workers)
            wall, cpu = time.perf_counter() - wall_start, cpu_seconds() - cpu_start
            size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
            shutil.rmtree(out)
        print(f"| {run} | {wall:.1f} s | {cpu:.1f} s | {total / wall:.1f} | {1000 * cpu / total:.1f} | "
              f"{size_mb:.0f} |", flush=True)
    print(f"goal: {args.train_images} images at {args.size} px well under {GOAL_SECONDS:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
