"""Distillation on synthetic data: a student trained alone vs the same student distilled from a larger
teacher run (distill.teacher), with the test identity-balanced mAP of the teacher and both students.

    python -m jaguar.cli.main synth DIR/raw --identities 16 --train-images 400 --test-images 60 --size 192
    python -m jaguar.cli.main prep DIR/raw DIR/shards --max-side 256
    python benchmarks/distill.py --work DIR

Teacher: recipes/tiny_cpu.py at 64 x 128 px for 24 epochs. Students: the same recipe at 48 x 96 px
(0.56x the teacher's pixels) for 12 epochs, alone and with similarity-matrix distillation of the
teacher's extracted training embeddings (--weight). Finished runs and features are reused (re-running
prints the table again); each run is one process, seeded (run.seed=0)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from jaguar.formats import read_labels
from jaguar.core.evaluator import identity_balanced_map
from jaguar.run import RunDir

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny_cpu.py")
TEACHER = ["train.epochs=24", "model.img_size=[64,128]", "train.eval_every=8"]
STUDENT = ["train.epochs=12", "model.img_size=[48,96]", "train.eval_every=4"]


def jaguar(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "jaguar.cli.main", *args], check=True, cwd=ROOT)


def test_map(run: RunDir, labels_csv: Path) -> float:
    if not run.has_features("test"):
        jaguar("extract", str(run.path), "--split", "test")
    features = run.load_features("test").with_identities(read_labels(labels_csv)).labelled()
    return identity_balanced_map(features.embeddings @ features.embeddings.T, features.labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="holds raw/ (synth) and shards/ (prep)")
    parser.add_argument("--weight", type=float, default=10.0, help="distill.weight (default 10)")
    args = parser.parse_args()
    shards, labels = args.work / "shards", args.work / "raw" / "test_labels.csv"
    teacher = RunDir(args.work / "teacher")
    alone = RunDir(args.work / "student_alone")
    distilled = RunDir(args.work / "student_distilled")
    common = [f"data.shards={shards}"]
    jaguar("train", TINY, *common, f"run.dir={teacher.path}", *TEACHER)
    for split in ("train", "val"):
        if not teacher.has_features(split):
            jaguar("extract", str(teacher.path), "--split", split)
    jaguar("train", TINY, *common, f"run.dir={alone.path}", *STUDENT)
    jaguar("train", TINY, *common, f"run.dir={distilled.path}", *STUDENT, f"distill.teacher={teacher.path}",
           f"distill.weight={args.weight:g}")
    print("| run | input | epochs | val mAP (best) | test mAP (id-bal.) |\n|---|---|---:|---:|---:|")
    for name, run, settings in (("teacher", teacher, TEACHER), ("student alone", alone, STUDENT),
                                (f"student distilled (weight {args.weight:g})", distilled, STUDENT)):
        size = settings[1].split("=")[1].strip("[]").replace(",", "x")
        epochs = settings[0].split("=")[1]
        best = run.load_metrics().best.get("mAP_balanced", float("nan"))
        print(f"| {name} | {size} | {epochs} | {best:.4f} | {test_map(run, labels):.4f} |")


if __name__ == "__main__":
    main()
