"""Shortcut diagnostics of recipes/tiny_cpu.py on flank-true synthetic jaguars (`jaguar diagnose`).

--experiment alpha (RESULTS.md's "shortcuts"): a set shot at camera sites, each with its own fixed
background, each identity mostly at its home site (a background shortcut to be found); trained (a)
with the background kept (data.alpha_mode=keep) and (b) removed (data.alpha_mode=black, the recipe's
own); the diagnostics of both side by side: background-only mAP should stand clearly above chance in
(a) and near it in (b).

--experiment flip (RESULTS.md's "flip"): the demo's flank-true set without sites, trained with and
without horizontal-flip augmentation (data.hflip 0.5 / 0), each extracted with and without flip TTA
(retrieval.flip_tta): test identity-balanced mAP and the laterality figures.

Every run goes through the CLI as a user runs it: `jaguar synth`, `jaguar prep`, training on 2 CPU
processes (launch/cpu_2proc.yaml, as the demo), `jaguar extract`, `jaguar diagnose --split test`.

    python benchmarks/shortcuts.py --experiment alpha
    python benchmarks/shortcuts.py --experiment flip
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaguar.config import load_config, save_config  # noqa: E402
from jaguar.run import RunDir  # noqa: E402

RECIPE = ROOT / "recipes" / "tiny_cpu.py"


def _jaguar(*args: str, launch: bool = False) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    prefix = ([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / "cpu_2proc.yaml")]
              if launch else [sys.executable])
    command = prefix + (list(args) if launch and args[0].endswith(".py") else ["-m", "jaguar.cli.main", *args])
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def _dataset(args: argparse.Namespace, sites: int) -> Path:
    raw, shards = args.cache / f"raw-sites{sites}", args.cache / f"shards-sites{sites}"
    if not (raw / "test_labels.csv").is_file():
        _jaguar("synth", str(raw), "--identities", "16", "--train-images", "400", "--test-images", "60", "--size",
                "192", "--seed", "0", "--sites", str(sites), "--workers", "2", "--overwrite")
    if not (shards / "manifest.json").is_file():
        _jaguar("prep", str(raw), str(shards), "--max-side", "256", "--workers", "2", "--overwrite")
    return shards


def _train(args: argparse.Namespace, shards: Path, name: str, overrides: list[str]) -> tuple[RunDir, float]:
    run = RunDir(args.cache / name)
    start = time.perf_counter()
    _jaguar(str(RECIPE), f"data.shards={shards}", f"run.dir={run}", "train.resume=auto", *overrides, launch=True)
    return run, time.perf_counter() - start


def _diagnose(run: RunDir) -> None:
    for split in ("val", "test"):
        _jaguar("extract", str(run), "--split", split)
    _jaguar("diagnose", str(run), "--split", "test", "--force")


def _row(label: str, run: RunDir, seconds: float) -> str:
    diagnosis = run.load_diagnosis("test")
    context = {row.name: row for row in diagnosis.context}
    flanks = {row.name: row for row in diagnosis.flanks}

    def cell(row) -> str:
        return "   n/a" if row is None or row.mAP_balanced is None else f"{row.mAP_balanced:6.3f}"

    mirror = diagnosis.mirror
    return (f"{label:<28} {cell(context['original'])} {cell(context['foreground only'])} "
            f"{cell(context['background only'])} {cell(context['silhouette only'])} "
            f"{context['original'].chance:6.3f} {diagnosis.context_ratio or float('nan'):6.3f} "
            f"{mirror.median:6.3f} {cell(flanks.get('same flank'))} {cell(flanks.get('cross flank'))} {seconds:6.0f}")


HEADER = (f"{'test split (60 images)':<28} {'orig':>6} {'fg':>6} {'bg':>6} {'silh':>6} {'chance':>6} {'bg/fg':>6} "
          f"{'mirror':>6} {'same':>6} {'cross':>6} {'train s':>6}")


def alpha_experiment(args: argparse.Namespace) -> None:
    shards = _dataset(args, sites=4)
    print(HEADER)
    for label, alpha in (("(a) alpha=keep (background)", "keep"), ("(b) alpha=black (removed)", "black")):
        run, seconds = _train(args, shards, f"run-sites4-{alpha}", [f"data.alpha_mode={alpha}", *args.overrides])
        _diagnose(run)
        print(_row(label, run, seconds), flush=True)


def flip_experiment(args: argparse.Namespace) -> None:
    shards = _dataset(args, sites=0)
    print(HEADER)
    for hflip in ("0.5", "0"):
        # trained (and validated) as with flip TTA; the copy below extracts the same weights without
        run, seconds = _train(args, shards, f"run-hflip{hflip}",
                              [f"data.hflip={hflip}", "retrieval.flip_tta=true", *args.overrides])
        for tta in (True, False):
            target = run if tta else RunDir(f"{run.path}-notta")
            if not tta and not target.path.is_dir():  # the same weights, extracted without flip TTA
                shutil.copytree(run.path, target.path, ignore=shutil.ignore_patterns("features", "diagnose_*"))
                cfg = load_config(target.config_path)
                cfg.retrieval.flip_tta = False
                save_config(cfg, target.config_path)
            _diagnose(target)
            print(_row(f"hflip={hflip}, flip TTA {'on' if tta else 'off'}", target, seconds), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", choices=("alpha", "flip"), required=True)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/jaguar-bench-shortcuts"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every training (e.g. train.epochs=10)")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    print(f"load average {os.getloadavg()[0]:.2f}; recipes/tiny_cpu.py on 2 CPU processes; diagnose --split test "
          f"(identity-balanced mAP, raw cosine)")
    (alpha_experiment if args.experiment == "alpha" else flip_experiment)(args)


if __name__ == "__main__":
    main()
