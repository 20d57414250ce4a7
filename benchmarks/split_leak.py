"""Does the validation score predict the test score? A naive train/validation split (random by image
within identity) against a grouped one (near-duplicate pHash groups kept whole), on a synthetic set
with camera-trap bursts, several seeds, recipes/tiny_cpu.py on the CPU.

For each seed and split: train (the split's seed = run.seed), then score the final model on the
validation split and on the test split the same way (identity-balanced mAP, every image queries the
others of its split). No checkpoint is chosen on validation (train.eval_every=0), so the gap is the
split's doing. Prints one row per run and the mean gap val - test per split.

    python benchmarks/split_leak.py --seeds 0 1 2     # RESULTS.md's set B
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from jaguar.config import load_config  # noqa: E402
from jaguar.data.prep import prepare, summary  # noqa: E402
from jaguar.data.shards import ShardSplit  # noqa: E402
from jaguar.data.synth import make_synthetic  # noqa: E402
from jaguar.core.evaluator import identity_balanced_map  # noqa: E402


def _dataset(args: argparse.Namespace) -> tuple[Path, Path]:
    tag = f"i{args.identities}-n{args.train_images}-t{args.test_images}-s{args.size}-b{args.bursts}-d{args.data_seed}"
    raw, shards = args.cache / f"raw-{tag}", args.cache / f"shards-{tag}"
    if not (raw / "test_labels.csv").is_file():
        make_synthetic(raw, identities=args.identities, train_images=args.train_images, test_images=args.test_images,
                       size=args.size, seed=args.data_seed, workers=2, overwrite=True, bursts=args.bursts)
    if not (shards / "manifest.json").is_file():
        start = time.perf_counter()
        manifest = prepare(raw, shards, max_side=256, workers=2, overwrite=True)
        print(summary(manifest, shards))
        print(f"prep: {time.perf_counter() - start:.1f} s")
    return raw, shards


def _burst_of(raw: Path) -> dict[str, str]:
    with (raw / "bursts.csv").open(newline="") as handle:
        return {row["filename"]: row["burst"] for row in csv.DictReader(handle)}


def _score(trainer, split, positions) -> float:
    from jaguar.train.validation import embed_positions

    model = trainer.accelerator.unwrap_model(trainer.model)
    embeddings = embed_positions(model, split, list(positions), trainer.cfg, trainer.accelerator, trainer.mean,
                                 trainer.std, flip_tta=True)
    labels = torch.as_tensor(split.labels[list(positions)])
    return identity_balanced_map(embeddings @ embeddings.T, labels)


def _run(args: argparse.Namespace, shards: Path, burst_of: dict[str, str], seed: int, groups: str) -> dict:
    from jaguar.train.trainer import Trainer

    run_dir = args.cache / f"run-{shards.name}-{groups}-seed{seed}-e{args.epochs}"
    cfg = load_config(ROOT / "recipes" / "tiny_cpu.py", [
        f"data.shards={shards}", f"run.dir={run_dir}", f"run.seed={seed}", f"data.split_groups={groups}",
        f"train.epochs={args.epochs}", "train.eval_every=0", "train.resume=none", "train.keep_last=1",
        "data.num_workers=0"])
    start = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.train()
    names = trainer.split.filenames
    trained_bursts = {burst_of[names[i]] for i in trainer.run_split.train_indices if names[i] in burst_of}
    val = trainer.run_split.val_indices
    leaked = sum(burst_of.get(names[i]) in trained_bursts for i in val)  # val frames of a burst trained on
    test = ShardSplit(shards, "test")
    test_positions = np.flatnonzero(test.labels >= 0)
    return {"seed": seed, "split": "naive" if groups == "none" else "grouped", "val_images": len(val),
            "val_leaked": leaked, "val_map": _score(trainer, trainer.split, val),
            "test_map": _score(trainer, test, test_positions), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=12)
    parser.add_argument("--train-images", type=int, default=240)
    parser.add_argument("--test-images", type=int, default=48, help="default: the validation split's size")
    parser.add_argument("--size", type=int, default=160, help="synthetic image side in px")
    parser.add_argument("--bursts", type=float, default=0.12, help="share of images in bursts (real data ~0.12)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run.seed: split and training")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/jaguar-bench-split-leak"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.cache.mkdir(parents=True, exist_ok=True)
    raw, shards = _dataset(args)
    burst_of = _burst_of(raw)
    print(f"load average {os.getloadavg()[0]:.2f}; {len(burst_of)} planted burst frames; tiny_cpu, "
          f"{args.epochs} epochs, final model (no checkpoint chosen on validation)")
    print(f"{'seed':>4} {'split':>8} {'val imgs':>8} {'leaked':>6} {'val mAP':>8} {'test mAP':>8} {'val-test':>8} "
          f"{'s':>5}")
    rows = []
    for seed in args.seeds:
        for groups in ("none", "phash"):
            row = _run(args, shards, burst_of, seed, groups)
            rows.append(row)
            print(f"{row['seed']:>4} {row['split']:>8} {row['val_images']:>8} {row['val_leaked']:>6} "
                  f"{row['val_map']:>8.3f} {row['test_map']:>8.3f} {row['val_map'] - row['test_map']:>+8.3f} "
                  f"{row['seconds']:>5.0f}", flush=True)
    for split in ("naive", "grouped"):
        gaps = np.array([r["val_map"] - r["test_map"] for r in rows if r["split"] == split])
        print(f"{split}: mean val-test {gaps.mean():+.3f} (sd {gaps.std(ddof=1) if len(gaps) > 1 else 0:.3f}), "
              f"mean |val-test| {np.abs(gaps).mean():.3f} over {len(gaps)} seed(s)")


if __name__ == "__main__":
    main()
