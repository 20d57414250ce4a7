"""Images at scale through every command: `jaguar synth` -> `jaguar prep` -> `jaguar extract` (2 CPU
processes, train and val splits) -> `jaguar tune-post` -> `jaguar rank`, each stage timed in its own
process, beside the shard reader's own speed (the bound extraction is compared with). Prints a
Markdown table; not a test.

    python benchmarks/image_scale.py [--count 20000] [--size 64] [--identities N] [--test-images N]
        [--val-fraction 0.1] [--processes 2] [--work DIR] [--keep]

The model is recipes/tiny_cpu.py's resnet10t at its 80 x 160 input, UNTRAINED (random weights,
`jaguar extract --config`, no checkpoint): the point is throughput, and an untrained model costs
exactly what a trained one does. tune-post and rank then work on random-weight features (their
figures of merit mean nothing; their time and memory do). Each stage's stderr goes to a file
(WORK/logs/STAGE.log), i.e. a redirected, non-TTY log: its line count shows the progress output stays
readable. Peak RSS is the largest single process of the stage (wait4's ru_maxrss), CPU the sum
over the stage's processes.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaguar.config import load_config  # noqa: E402
from jaguar.core.blocks import DEFAULT_BLOCK_SIZE, block_grid  # noqa: E402
from jaguar.run import RunDir  # noqa: E402

RECIPE = ROOT / "recipes" / "tiny_cpu.py"
CPU_2PROC = ROOT / "launch" / "cpu_2proc.yaml"


def run_stage(name: str, command: list[str], logs: Path, env: dict) -> dict:
    """Run one stage as a child process; its wall time, CPU time, peak RSS and log size."""
    log_path = logs / f"{name}.log"
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with log_path.open("w") as log, open(logs / f"{name}.out", "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=log, cwd=ROOT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"stage {name} failed (exit {code}): {' '.join(command)}\n{tail}")
    return {"stage": name, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
            "rss_mb": usage.ru_maxrss / 1024, "load": (load, os.getloadavg()[0]),
            "log_lines": len(log_path.read_text().splitlines())}


def run_killed(name: str, command: list[str], logs: Path, env: dict, parts_done, wanted: int) -> dict:
    """Run a stage and kill -9 all its processes once `parts_done()` reaches `wanted`: a preempted
    job. Its wall time until the kill and the blocks it left (CPU and RSS: the launcher's only)."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with (logs / f"{name}.log").open("w") as log, open(logs / f"{name}.out", "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=log, cwd=ROOT, env=env)
        while child.poll() is None and parts_done() < wanted:
            time.sleep(0.2)
        if child.poll() is not None:
            raise SystemExit(f"stage {name} ended before it could be killed; use a larger --count")
        # torchrun starts each worker in a session of its own: kill the whole tree, as Slurm does
        # (psutil comes with accelerate).
        import psutil

        launcher = psutil.Process(child.pid)
        for process in [*launcher.children(recursive=True), launcher]:
            process.kill()
        _, _, usage = os.wait4(child.pid, 0)
    return {"stage": name, "wall": time.perf_counter() - start, "cpu": usage.ru_utime + usage.ru_stime,
            "rss_mb": usage.ru_maxrss / 1024, "load": (load, os.getloadavg()[0]),
            "log_lines": len((logs / f"{name}.log").read_text().splitlines()), "parts": parts_done()}


def reader_rate(shards: Path, size_overrides: list[str], images: int) -> float:
    """Images/s of the evaluation reader alone (read, decode, eval transform, batching) on one core:
    the shards' speed limit for extraction, per process."""
    import torch

    from jaguar.data.loader import build_eval_loader
    from jaguar.data.shards import ShardSplit

    torch.set_num_threads(1)
    cfg = load_config(RECIPE, [f"data.shards={shards}", *size_overrides])
    split = ShardSplit(shards, "train")
    positions = list(range(min(images, len(split))))
    loader = build_eval_loader(cfg, split, positions, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), cfg.data.batch_size)
    start = time.perf_counter()
    count = sum(len(batch) for batch, _ in loader)
    return count / (time.perf_counter() - start)


def model_rate(size_overrides: list[str], seconds: float = 5.0) -> float:
    """Images/s of the model alone (untrained, flip TTA: two forwards an image, batch data.batch_size)
    on one thread: the other bound of extraction, per process."""
    import torch

    from jaguar.models import build_model
    from jaguar.core.embedding import embed_batch

    torch.set_num_threads(1)
    cfg = load_config(RECIPE, list(size_overrides))
    model = build_model(cfg, 1).eval()
    batch = torch.randn(cfg.data.batch_size, 3, *cfg.model.img_size)
    embed_batch(model.embed, batch, torch.device("cpu"), cfg.retrieval.flip_tta)  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        embed_batch(model.embed, batch, torch.device("cpu"), cfg.retrieval.flip_tta)
        count += len(batch)
    return count / (time.perf_counter() - start)


def progress_rate(log: Path) -> float | None:
    """The images/s of the last progress line in a stage's log (rank 0's own images, after start-up)."""
    rates = re.findall(r"([0-9.]+)img/s", log.read_text())
    return float(rates[-1]) if rates else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20000, help="training images (the extracted split)")
    parser.add_argument("--size", type=int, default=64, help="synthetic image side in px")
    parser.add_argument("--identities", type=int, default=None, help="default: count / 50, at least 31")
    parser.add_argument("--test-images", type=int, default=None,
                        help="default: one per identity (synth needs at least that many)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="validation share (tune-post, rank)")
    parser.add_argument("--processes", type=int, default=2, help="extraction processes (accelerate, gloo)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/jaguar-image-scale"))
    parser.add_argument("--keep", action="store_true", help="keep WORK afterwards")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="jaguar extract --block-size")
    parser.add_argument("--no-resume", action="store_true",
                        help="skip the second extraction that is killed half-way and resumed")
    args = parser.parse_args()

    identities = args.identities or max(31, args.count // 50)
    args.test_images = args.test_images or identities
    work = args.work / f"n{args.count}-s{args.size}"
    shutil.rmtree(work, ignore_errors=True)
    logs = work / "logs"
    logs.mkdir(parents=True)
    data, shards, run = work / "data", work / "shards", work / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    jaguar = [sys.executable, "-m", "jaguar.cli.main"]

    def config_for(run_dir: Path) -> list[str]:
        return ["--config", str(RECIPE), f"data.shards={shards}", f"run.dir={run_dir}",
                f"data.val_fraction={args.val_fraction}", "data.num_workers=0", "--block-size", str(args.block_size)]

    config = config_for(run)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
              "--num_processes", str(args.processes), "-m", "jaguar.cli.main"]

    print(f"{platform.machine()}, {os.cpu_count()} cores ({platform.processor() or platform.platform()}), "
          f"Python {platform.python_version()}; load average before: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{args.count} train + {args.test_images} test synthetic images of {identities} identities at "
          f"{args.size} px; untrained resnet10t (recipes/tiny_cpu.py, 80 x 160 input, flip TTA); extraction on "
          f"{args.processes} CPU processes; validation share {args.val_fraction}", flush=True)
    stages = [
        ("synth", [*jaguar, "synth", str(data), "--identities", str(identities), "--train-images", str(args.count),
                   "--test-images", str(args.test_images), "--size", str(args.size), "--workers", "2"]),
        ("prep", [*jaguar, "prep", str(data), str(shards), "--max-side", str(args.size), "--workers", "2"]),
        ("extract train", [*launch, "extract", str(run), *config, "--split", "train"]),
        ("extract val", [*launch, "extract", str(run), *config, "--split", "val"]),
        ("extract train again (up to date)", [*launch, "extract", str(run), *config, "--split", "train"]),
        ("tune-post", [*jaguar, "tune-post", str(run)]),
        ("rank val", [*jaguar, "rank", str(run), "--split", "val", "--top-k", "100"]),
    ]
    if not args.no_resume:
        # The same extraction into a second run folder, killed (kill -9 of every process) once half
        # its blocks are saved, then the same command again: it must finish the rest only and give
        # the same features, bit for bit.
        resumed = work / "resumed"
        again = [*launch, "extract", str(resumed), *config_for(resumed), "--split", "train"]
        stages[3:3] = [("extract train, killed half-way", again), ("extract train, resumed", again)]

    def parts_done() -> int:
        return len([p for p in RunDir(work / "resumed").feature_part_files("train") if not p.name.startswith(".")])

    batch = load_config(RECIPE).data.batch_size
    blocks = len(block_grid(args.count, args.processes, args.block_size, batch))
    results = []
    for name, command in stages:
        if name.endswith("killed half-way"):
            result = run_killed(name.replace(" ", "_").replace(",", ""), command, logs, env, parts_done,
                                max(1, blocks // 2))
            print(f"  {name}: killed after {result['wall']:.1f} s with {result['parts']} of {blocks} blocks saved",
                  flush=True)
        else:
            result = run_stage(name.replace(" ", "_").replace(",", ""), command, logs, env)
            print(f"  {name}: {result['wall']:.1f} s", flush=True)
        result["stage"] = name
        results.append(result)
        if name == "prep":
            bound = reader_rate(shards, [], 2000)
            print(f"  eval reader alone (1 process, 1 thread, num_workers 0): {bound:.0f} images/s", flush=True)
            model_bound = model_rate([])
            print(f"  model alone (1 thread, flip TTA): {model_bound:.0f} images/s", flush=True)

    up_to_date = (logs / "extract_train_again_(up_to_date).log").read_text()
    if "up to date" not in up_to_date:
        raise SystemExit("the re-run of a finished extraction recomputed it:\n" + up_to_date[-2000:])
    resume_note = ""
    if not args.no_resume:
        import torch

        whole, resumed_set = RunDir(run).load_features("train"), RunDir(work / "resumed").load_features("train")
        same = whole.names == resumed_set.names and torch.equal(whole.embeddings, resumed_set.embeddings)
        if not same:
            raise SystemExit("the resumed extraction's features differ from the uninterrupted one's")
        reused = re.findall(r"rank (\d+): (\d+) of its (\d+) images were extracted by an earlier attempt",
                            (logs / "extract_train_resumed.log").read_text())
        resume_note = (f"resumed extraction: identical features (names and embeddings bit for bit) to the "
                       f"uninterrupted run; reused per rank: "
                       f"{', '.join(f'rank {r} {a}/{b}' for r, a, b in reused) or 'none'} images.")
    val = len(RunDir(run).load_features("val"))
    counts = {"synth": args.count + args.test_images, "prep": args.count + args.test_images,
              "extract train": args.count, "extract val": val, "extract train, resumed": None, "tune-post": val, "rank val": val}
    print()
    print("| stage | images | wall | CPU | images/s | peak RSS (largest process) | load before / after | "
          "stderr lines |")
    print("|:--|--:|--:|--:|--:|--:|:--|--:|")
    for r in results:
        n = counts.get(r["stage"])
        images, rate = (f"{n:,}", f"{n / r['wall']:,.0f}") if n is not None else ("-", "-")
        print(f"| {r['stage']} | {images} | {r['wall']:.1f} s | {r['cpu']:.1f} s | {rate} | {r['rss_mb']:,.0f} MB | "
              f"{r['load'][0]:.1f} / {r['load'][1]:.1f} | {r['log_lines']} |")
    total = sum(r["wall"] for r in results)
    extract = next(r for r in results if r["stage"] == "extract train")
    steady = progress_rate(logs / "extract_train.log")
    print(f"\ntotal: {total:.0f} s ({total / 60:.1f} min).")
    print(f"extraction of {args.count:,} images on {args.processes} processes: {args.count / extract['wall']:.0f} "
          f"images/s start to end (incl. launch, imports, merge), {steady or 0:.0f} images/s a process while "
          f"embedding (rank 0's progress line); bounds on one core: eval reader {bound:.0f} images/s, model "
          f"{model_bound:.0f} images/s, both in series {1 / (1 / bound + 1 / model_bound):.0f} images/s.")
    if resume_note:
        print(resume_note)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
