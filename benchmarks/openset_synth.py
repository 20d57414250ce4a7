"""Open-set identification on a synthetic set: train on some identities, then identify photos of
known and unseen ones. Prints the calibration (validation, identity hold-outs) and the figures on
held-out photos: known rank-1, known / unknown accuracy, balanced accuracy and geometric mean at the
calibrated threshold, first on the cosine alone (`jaguar calibrate --no-local`), then, unless
--no-local, with local pattern evidence (`jaguar match RUN --split val`, then `jaguar calibrate`:
the decision on the fused probability of the cosine and the verified keypoint inliers); then enrols
one unseen identity from two photos and prints how many of its other photos are identified as it.

    python benchmarks/openset_synth.py --identities 8 --train-images 240 --size 128 --epochs 40

Known photos: the synthetic test images of the trained identities (never trained on). Unseen
photos: every image of the identities left out of training."""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaguar.data.prep import prepare  # noqa: E402
from jaguar.data.synth import make_synthetic  # noqa: E402
from jaguar.core.evaluator import open_set_figures  # noqa: E402
from jaguar.run import RunDir  # noqa: E402


def build_split(raw: Path, out: Path, unseen_count: int) -> tuple[list[str], dict[str, list[Path]]]:
    """Folder-per-identity copies: out/known/<identity>/ (trained on) and out/unseen/<identity>/;
    the unseen identities are the `unseen_count` next in size after the two largest (the largest
    stay known; enrolment still has photos to spare). Returns (known identities, {identity: photos} of the test images and unseen images)."""
    rows = list(csv.DictReader(open(raw / "train.csv", newline="")))
    sizes: dict[str, int] = {}
    for row in rows:
        sizes[row["ground_truth"]] = sizes.get(row["ground_truth"], 0) + 1
    unseen = sorted(sizes, key=lambda name: (-sizes[name], name))[2:2 + unseen_count]
    photos: dict[str, list[Path]] = {}
    for row in rows:
        side = "unseen" if row["ground_truth"] in unseen else "known"
        dest = out / side / row["ground_truth"]
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(raw / "train" / row["filename"], dest / row["filename"])
        if side == "unseen":
            photos.setdefault(row["ground_truth"], []).append(dest / row["filename"])
    for row in csv.DictReader(open(raw / "test_labels.csv", newline="")):
        if row["ground_truth"] not in unseen:
            photos.setdefault(row["ground_truth"], []).append(raw / "test" / row["filename"])
    return sorted(set(sizes) - set(unseen)), photos


def jaguar(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "jaguar.cli.main", *args], capture_output=True, text=True,
                            cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if result.returncode not in (0, 1):
        raise SystemExit(f"jaguar {args[0]} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def decisions(csv_path: Path) -> dict[str, tuple[str, float, str]]:
    """photo -> (best individual, score the decision is taken on, decision) from an identify CSV:
    the fused probability where the CSV has it, else the cosine score."""
    best = {}
    for row in csv.DictReader(open(csv_path, newline="")):
        if row["rank"] == "1":
            best[row["photo"]] = (row["individual"], float(row.get("probability") or row["score"]), row["decision"])
    return best


def held_out_figures(run: RunDir, queries: list[Path], truth: dict[str, str], known: list[str], out: Path,
                     label: str) -> None:
    """Identify `queries` with the run's current calibration and print the open-set figures."""
    jaguar("identify", str(run.path), *map(str, queries), "-o", str(out))
    best = decisions(out)
    calibration = run.load_calibration()
    scores = [best[str(p)][1] for p in queries]
    right = [best[str(p)][0] == truth[str(p)] and truth[str(p)] in known for p in queries]
    is_known = [truth[str(p)] in known for p in queries]
    figures = open_set_figures(scores, right, is_known, calibration.figures.threshold)
    print(f"{label}: held-out photos: {figures.num_known} of known identities, {figures.num_unknown} of unseen ones")
    print(f"{label}: known rank-1 {figures.known_rank1:.3f}; at the calibrated threshold {figures.threshold:.4f}: known "
          f"accuracy {figures.known_accuracy:.3f}, unknown accuracy {figures.unknown_accuracy:.3f}, balanced "
          f"{figures.balanced_accuracy:.3f}, geometric mean {figures.geometric_mean:.3f} (chance: balanced 0.5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--identities", type=int, default=8)
    parser.add_argument("--train-images", type=int, default=240)
    parser.add_argument("--test-images", type=int, default=40)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--unseen", type=int, default=2, help="identities left out of training")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--img-size", default="[80,160]")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--no-local", action="store_true", help="the cosine decision only (no `jaguar match`)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="jaguar-openset-"))
    started = time.time()
    raw = make_synthetic(work / "raw", identities=args.identities, train_images=args.train_images,
                         test_images=args.test_images, size=args.size, workers=1, overwrite=True)
    known, photos = build_split(raw, work, args.unseen)
    prepare(work / "known", work / "shards", workers=1, overwrite=True)
    run = RunDir(work / "run")
    jaguar("train", str(ROOT / "recipes" / "tiny_cpu.py"), f"data.shards={work / 'shards'}", f"run.dir={run.path}",
           f"train.epochs={args.epochs}", f"model.img_size={args.img_size}", "data.val_fraction=0.25")
    print("global only: " + jaguar("calibrate", str(run.path), "--no-local").strip())
    unseen = sorted(set(photos) - set(known))
    enrol_name, enrol_photos = unseen[0], photos[unseen[0]][:2]
    queries = [p for name in sorted(photos) for p in photos[name] if p not in enrol_photos]
    truth = {str(p): name for name in photos for p in photos[name]}
    held_out_figures(run, queries, truth, known, work / "before.csv", "global only")
    if not args.no_local:
        print(jaguar("match", str(run.path), "--split", "val").strip())
        print("fused: " + jaguar("calibrate", str(run.path)).strip())
        held_out_figures(run, queries, truth, known, work / "before_fused.csv", "fused")
    jaguar("enroll", str(run.path), "--name", enrol_name, *map(str, enrol_photos))
    others = [p for p in photos[enrol_name] if p not in enrol_photos]
    jaguar("identify", str(run.path), *map(str, others), "-o", str(work / "after.csv"))
    after = decisions(work / "after.csv")
    named = sum(after[str(p)][0] == enrol_name for p in others)
    accepted = sum(after[str(p)][2] == f"known: {enrol_name}" for p in others)
    print(f"enrolled {enrol_name} from 2 photos: {named} of its {len(others)} other photos rank it first, "
          f"{accepted} are decided 'known: {enrol_name}'")
    print(f"{time.time() - started:.0f} s; load average {os.getloadavg()[0]:.1f}; work folder {work}")


if __name__ == "__main__":
    main()
