"""How often `jaguar prep`'s pHash near-duplicate rule (jaguar.data.dedup) flags pairs that are not
duplicates, and how many planted camera-trap bursts it finds, on synthetic sets (`jaguar synth`)
with and without bursts, at several thresholds.

    python benchmarks/dedup_false_positives.py --seeds 0 1 --bursts 0 0.12

For each set: every image's two pHashes of the masked animal (dedup.animal_hash), the Hamming
distances of every pair, and per threshold (64-bit, 256-bit max distance): pairs flagged; of them
those inside a planted burst (true) and the others (false: two separate renders), the false ones
between train and test (what prep's warning counts) and between two identities; and the share of
planted burst pairs flagged (recall). A burst-free set has no true pair: everything flagged is false.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaguar.data.dedup import PHASH_MAX_DISTANCES, animal_hash  # noqa: E402
from jaguar.data.synth import make_synthetic  # noqa: E402
from jaguar.formats import read_labels  # noqa: E402

THRESHOLDS = [PHASH_MAX_DISTANCES, (8, 40), (6, 32), (4, 24), (2, 16)]


def measure(root: Path, seed: int, bursts: float, args: argparse.Namespace) -> None:
    out = make_synthetic(root / f"synth-{seed}-{bursts}", identities=args.identities, train_images=args.train_images,
                         test_images=args.test_images, size=args.size, seed=seed, workers=2, bursts=bursts)
    identity = {**read_labels(out / "train.csv"), **read_labels(out / "test_labels.csv")}
    names = sorted(identity)
    split = {name: ("train" if (out / "train" / name).is_file() else "test") for name in names}
    hashes = np.stack([animal_hash(np.asarray(Image.open(out / split[name] / name).convert("RGBA")))
                       for name in names]).astype(np.int16)
    burst_of = {}
    if (out / "bursts.csv").is_file():
        with (out / "bursts.csv").open(newline="") as handle:
            burst_of = {row["filename"]: row["burst"] for row in csv.DictReader(handle)}
    small = hashes[:, :64]
    large = hashes[:, 64:]
    # Hamming distance of every pair: |a - b| summed over bits, in blocks of rows
    d64 = np.concatenate([np.abs(small[i:i + 256, None, :] - small[None]).sum(-1) for i in range(0, len(names), 256)])
    d256 = np.concatenate([np.abs(large[i:i + 256, None, :] - large[None]).sum(-1) for i in range(0, len(names), 256)])
    upper = np.triu(np.ones((len(names), len(names)), dtype=bool), 1)
    same_burst = np.array([[burst_of.get(a) is not None and burst_of.get(a) == burst_of.get(b) for b in names]
                           for a in names])
    cross = np.array([[split[a] != split[b] for b in names] for a in names])
    other_identity = np.array([[identity[a] != identity[b] for b in names] for a in names])
    planted = int((same_burst & upper).sum())
    print(f"\nseed {seed}, bursts {bursts}: {len(names)} images ({args.identities} identities, {args.size} px), "
          f"{int(upper.sum()):,} pairs, {int((cross & upper).sum()):,} train/test pairs, {planted} planted burst pairs")
    print(f"  {'max distances':<14} {'flagged':>8} {'in a burst':>11} {'false':>6} {'false train/test':>17} "
          f"{'false 2 ids':>12} {'burst recall':>13}")
    for limit64, limit256 in THRESHOLDS:
        flagged = (d64 <= limit64) & (d256 <= limit256) & upper
        true = flagged & same_burst
        false = flagged & ~same_burst
        recall = f"{true.sum() / planted:.2f}" if planted else "-"
        print(f"  {f'{limit64}/{limit256}':<14} {int(flagged.sum()):>8} {int(true.sum()):>11} {int(false.sum()):>6} "
              f"{int((false & cross).sum()):>17} {int((false & other_identity).sum()):>12} {recall:>13}")
    print(f"  distances of false pairs at {PHASH_MAX_DISTANCES}: 64-bit "
          f"{sorted(d64[(d64 <= PHASH_MAX_DISTANCES[0]) & (d256 <= PHASH_MAX_DISTANCES[1]) & upper & ~same_burst].tolist())[:12]}")
    if planted:
        print(f"  planted burst pairs: 64-bit distance median {np.median(d64[same_burst & upper]):.0f}, "
              f"max {d64[same_burst & upper].max()}; 256-bit median {np.median(d256[same_burst & upper]):.0f}, "
              f"max {d256[same_burst & upper].max()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--bursts", type=float, nargs="+", default=[0.0, 0.12])
    parser.add_argument("--identities", type=int, default=16)
    parser.add_argument("--train-images", type=int, default=400)
    parser.add_argument("--test-images", type=int, default=60)
    parser.add_argument("--size", type=int, default=192)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}; prep's rule: both pHash distances <= {PHASH_MAX_DISTANCES}")
    with tempfile.TemporaryDirectory() as tmp:
        for bursts in args.bursts:
            for seed in args.seeds:
                measure(Path(tmp), seed, bursts, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
