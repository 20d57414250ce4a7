"""`jaguar match RUN_DIR --split test|val|train [--force] [--block-size N] [k=v ...]`: local pattern
evidence of a split (keypoints on the coat, each image matched against its global shortlist with
geometric verification), sharded and resumable like `jaguar extract` (also under accelerate/torchrun/srun)."""

from __future__ import annotations

import argparse

from jaguar.core.blocks import DEFAULT_BLOCK_SIZE
from jaguar.lock import launch_rank
from jaguar.progress import LOG_INTERVAL_S
from jaguar.run import RunDir

_RUN = RunDir("RUN")  # the run folder as the help texts name it


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "match", help="match each image's coat against its global shortlist (local pattern evidence)",
        description="Extracts the split's local features (keypoints on the animal, retrieval.local.extractor) "
                    f"into {_RUN.local_features_path('val').parent}/<split>.local.safetensors, then matches each "
                    "image against its top-B other images of the split by the global features' cosine similarity "
                    "(B = retrieval.local.shortlist) with a ratio test, mutual nearest neighbours and a geometric "
                    f"verification that never mirrors; the verified inlier counts go to {_RUN.local_dir}/<split>"
                    ".safetensors. Cost N x B pair matches. Each process works through a contiguous run of blocks "
                    f"and saves each block when done under {_RUN.local_dir}/parts/; rank 0 merges them. Run under "
                    "`accelerate launch -m jaguar.cli.main match` or torchrun for several processes. Resumable: the "
                    "same command after a kill reuses the finished blocks; re-running a finished split is a no-op. "
                    "Global features missing are extracted first (`jaguar extract`, announced). On a terminal a "
                    f"progress bar; in a redirected log one progress line every {LOG_INTERVAL_S:.0f} s.")
    parser.add_argument("run_dir", help=f"the run folder (holds {_RUN.config_path.name} and the split's features, "
                                        f"e.g. {_RUN.features_path('val')})")
    parser.add_argument("--split", required=True, choices=("test", "val", "train"),
                        help="the images matched among themselves: test, or the run's validation/training images")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides of the run's search settings, e.g. retrieval.local.shortlist=100")
    parser.add_argument("--force", action="store_true",
                        help="recompute the local features and matches even if up to date (blocks an interrupted "
                             "--force run finished are reused)")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                        help=f"images a saved features block holds and queries a saved matches block holds (default "
                             f"{DEFAULT_BLOCK_SIZE}): at most this much work is lost to an interruption")
    parser.set_defaults(func=_run, kept=_kept)


def _run(args: argparse.Namespace) -> int:
    from jaguar.retrieval.local.stage import match_run

    result = match_run(RunDir(args.run_dir), args.split, args.overrides, force=args.force, block_size=args.block_size)
    state = "up to date" if result.reused else "wrote"
    if launch_rank() == 0:  # one line for all the processes of a launch
        print(f"{state} {result.path}: {result.queries} images x B={result.shortlist} candidates")
    return 0


def _kept(args: argparse.Namespace) -> str:
    """What an interrupted `jaguar match` leaves for the re-run: the finished blocks of the split."""
    run = RunDir(args.run_dir)
    counts = {kind: sum(not path.name.startswith(".") for path in run.local_part_files(kind, args.split))
              for kind in ("features", "matches")}
    if not any(counts.values()):
        return f"no finished block of {args.split} yet (earlier results, if any, are as they were)"
    return (f"{counts['features']} local-feature and {counts['matches']} match block(s) of {args.split} in "
            f"{run.local_dir / 'parts'} (the same command reuses them and computes the rest)")
