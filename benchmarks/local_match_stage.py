"""`jaguar match`'s matching step at scale, through the stage's own block machinery
(jaguar.retrieval.local.stage.match_features: shortlist by jaguar.core.knn, query blocks, one part a
block, rank 0's merge into the SplitMatches file) on several processes under `accelerate launch`
(launch/cpu_2proc.yaml, gloo). Prints figures; not a test.

    python benchmarks/local_match_stage.py [--queries 20000] [--shortlist 50] [--processes 2]
        [--size 128] [--photos 160] [--identities 16] [--dims 64] [--block-size 1024] [--seed 0]

The set: --photos synthetic test photos (`jaguar synth`, flank-true coats) of --identities jaguars at
--size px, their RootSIFT features (`retrieval.local` as shipped) reused in turn under --queries
distinct names, so the local features of a --queries-image split cost --photos extractions; random
unit global features (--dims) give each image a shortlist of --shortlist others drawn without regard
to identity (mostly other jaguars, as most of a real shortlist is). Every process runs one thread
(OpenCV, BLAS), so pairs/s per process is per core. The local feature extraction itself is not timed
here (see benchmarks/local_matching.py: 9-30 ms a photo)."""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # per-core figures: before numpy loads its BLAS

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = ROOT / "recipes" / "tiny_cpu.py"


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_run(folder: Path, args: argparse.Namespace) -> None:
    """A run folder holding the config, the random global features and the reused local features of
    a --queries-image test split."""
    import cv2
    import numpy as np
    import torch

    from jaguar.config import load_config
    from jaguar.core.features import FeatureSet
    from jaguar.data.synth import make_synthetic
    from jaguar.retrieval.local.configured import make_extractor
    from jaguar.retrieval.local.store import LocalFeatureSet
    from jaguar.run import RunDir

    data = make_synthetic(folder / "data", identities=args.identities, train_images=2 * args.identities,
                          test_images=args.photos, size=args.size, seed=args.seed, workers=1)
    with (data / "test_labels.csv").open(newline="", encoding="utf-8") as handle:
        files = [row["filename"] for row in csv.DictReader(handle)]
    cfg = load_config(str(TINY), [f"run.dir={folder / 'run'}", f"retrieval.local.shortlist={args.shortlist}"])
    extractor = make_extractor(cfg.retrieval.local)
    pool = [extractor.extract(cv2.cvtColor(cv2.imread(str(data / "test" / name), cv2.IMREAD_UNCHANGED),
                                           cv2.COLOR_BGRA2RGBA)) for name in files]
    names = [f"q{i:06d}.png" for i in range(args.queries)]
    run = RunDir(folder / "run")
    run.path.mkdir(parents=True)
    run.save_config(cfg)
    local = LocalFeatureSet.pack(names, [pool[i % len(pool)] for i in range(args.queries)],
                                 {"key": "benchmark"}, extractor.descriptor_dim)
    local.save(run.local_features_path("test"))
    generator = torch.Generator().manual_seed(args.seed)
    embeddings = torch.nn.functional.normalize(torch.randn(args.queries, args.dims, generator=generator), dim=1)
    run.save_features("test", FeatureSet(names, embeddings, torch.zeros(args.queries, dtype=torch.long)))
    print(f"set: {args.photos} photos at {args.size} px, keypoints a photo median "
          f"{int(np.median([len(f) for f in pool]))} (min {min(len(f) for f in pool)}, max "
          f"{max(len(f) for f in pool)}); {args.queries} images, local features "
          f"{local.descriptors.nbytes / 2**20:.0f} MB of descriptors")


def worker(run_path: Path, block_size: int) -> None:
    """One process of the launch: load the features, run the stage's matching step, record time and memory."""
    from jaguar.core.accelerator import build_accelerator
    from jaguar.retrieval.local.stage import global_features_sha256, match_features
    from jaguar.retrieval.local.store import LocalFeatureSet
    from jaguar.run import RunDir

    run = RunDir(run_path)
    cfg = run.load_config()
    cfg.train.precision = "fp32"
    accelerator = build_accelerator(cfg)
    started = time.perf_counter()
    global_features = run.load_features("test")
    local = LocalFeatureSet.load(run.local_features_path("test"))
    loaded = time.perf_counter()
    accelerator.wait_for_everyone()
    begun = time.perf_counter()
    match_features(run, "test", global_features, global_features_sha256(run.features_path("test")), local, cfg,
                   accelerator, force=True, block_size=block_size)
    finished = time.perf_counter()
    record = {"rank": accelerator.process_index, "load_s": loaded - started, "stage_s": finished - begun,
              "peak_rss_mb": max_rss_mb()}
    (run.path / f"benchmark-rank{accelerator.process_index}.json").write_text(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--shortlist", type=int, default=50)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--photos", type=int, default=160)
    parser.add_argument("--identities", type=int, default=16)
    parser.add_argument("--dims", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.block_size)
        return

    with tempfile.TemporaryDirectory(prefix="local_match_stage-") as tmp:
        folder = Path(tmp)
        build_run(folder, args)
        run_path = folder / "run"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(run_path),
                   "--block-size", str(args.block_size)]
        if args.processes > 1:
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       str(ROOT / "launch" / "cpu_2proc.yaml"), "--num_processes", str(args.processes), *command[1:]]
        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        subprocess.run(command, check=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - started
        records = [json.loads(path.read_text()) for path in sorted(run_path.glob("benchmark-rank*.json"))]
        import numpy as np

        from jaguar.retrieval.local.store import SplitMatches

        result = SplitMatches.load(run_path / "local" / "test.safetensors")
        pairs = int((result.shortlist >= 0).sum())
        stage = max(record["stage_s"] for record in records)
        print(f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.platform()}, python "
              f"{platform.python_version()}; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
        print(f"{len(result.names)} queries x B = {result.shortlist.shape[1]} = {pairs} pairs on {args.processes} "
              f"process(es), blocks of {args.block_size} queries")
        print(f"matching stage (shortlist, blocks, parts, merge): {stage:.1f} s = {pairs / stage:.0f} pairs/s in all, "
              f"{pairs / stage / args.processes:.0f} pairs/s per process (core); launch wall {wall:.1f} s")
        for record in records:
            print(f"  rank {record['rank']}: features loaded in {record['load_s']:.1f} s, "
                  f"stage {record['stage_s']:.1f} s, peak RSS {record['peak_rss_mb']:.0f} MB")
        scores = result.matches.scores
        print(f"verified inliers a candidate: median {float(np.median(scores)):.0f}, max {float(scores.max()):.0f}")


if __name__ == "__main__":
    main()
