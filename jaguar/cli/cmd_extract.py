"""`jaguar extract [RUN_DIR] [--split test|val|train] [--checkpoint PATH] [--config RECIPE k=v ...]`:
sharded feature extraction into the run's features of a split (also under accelerate/torchrun/srun). With
--config the run folder may be left out: it is then the config's run.dir."""

from __future__ import annotations

import argparse

from jaguar.errors import JaguarError
from jaguar.progress import LOG_INTERVAL_S
from jaguar.core.blocks import DEFAULT_BLOCK_SIZE
from jaguar.run import RunDir

_RUN = RunDir("RUN")  # the run folder as the help texts name it


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "extract", help="embed a split's images with a trained (or pretrained) model",
        description="Each process embeds a contiguous run of fixed-size blocks of the split and saves each "
                    f"block when done under {_RUN.feature_parts_dir}/; rank 0 merges them into "
                    f"{_RUN.features_dir}/<split>.safetensors (atomically) and removes the parts. Run under "
                    "`accelerate launch -m jaguar.cli.main extract` or torchrun for several processes. Resumable: "
                    "re-running the same command after a kill or preemption reuses the blocks finished with the "
                    "same images, weights and settings and computes the rest. On a terminal a progress bar; "
                    f"in a redirected log one progress line every {LOG_INTERVAL_S:.0f} s.")
    parser.add_argument("run_dir", nargs="?", default=None,
                        help=f"the run directory (holds {_RUN.config_path.name} and {_RUN.checkpoints_dir.name}/); "
                             "with --config it may be left out and is then run.dir")
    parser.add_argument("--split", default="test", choices=("test", "val", "train"),
                        help="test: the test shards; val/train: the run's validation/training images")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint folder or weights file (default: best, else the newest in "
                             f"{_RUN.checkpoints_dir})")
    parser.add_argument("--config", default=None,
                        help="extract with this recipe/YAML and no trained checkpoint (a pretrained backbone as is)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides: any key with --config; for a run folder "
                             "its search settings only (retrieval.*, data.batch_size, data.num_workers)")
    parser.add_argument("--model", default=None, metavar="MODEL.onnx",
                        help="embed with this exported model (`jaguar export`; needs onnxruntime) instead of "
                             "the run's checkpoint")
    parser.add_argument("--force", action="store_true",
                        help="recompute even if the features are up to date (blocks an interrupted --force run "
                             "finished are reused)")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                        help="images a saved block holds, rounded up to whole batches (default "
                             f"{DEFAULT_BLOCK_SIZE}): at most this much work is lost to an interruption")
    parser.set_defaults(func=_run, kept=_kept)


def run_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(run folder or None, overrides). argparse hands the first key=value to the optional run
    folder when none is given (`extract --config R k=v ...`): with --config it is an override;
    without, a run folder that looks like key=value is an error."""
    run_dir, overrides = args.run_dir, list(args.overrides)
    if run_dir is not None and "=" in run_dir:
        if not args.config:
            raise JaguarError(f"run folder {run_dir!r} looks like a key=value override: overrides need "
                              f"--config RECIPE (the run folder is then run.dir), e.g. `jaguar extract "
                              f"--config recipes/tiny_cpu.py {run_dir} --split test`")
        overrides.insert(0, run_dir)
        run_dir = None
    if run_dir is None and not args.config:
        raise JaguarError("give a run folder (`jaguar extract RUN_DIR`), or --config RECIPE to extract "
                          "into its run.dir")
    return run_dir, overrides


def _run(args: argparse.Namespace) -> int:
    from jaguar.retrieval.extract import extract_run

    run_dir, overrides = run_and_overrides(args)
    extract_run(RunDir(run_dir) if run_dir else None, args.split, args.config, overrides, args.checkpoint,
                force=args.force, block_size=args.block_size, onnx_path=args.model)
    return 0


def _kept(args: argparse.Namespace) -> str:
    """What an interrupted extraction leaves for the re-run: the finished blocks of the split."""
    try:
        run_dir, _ = run_and_overrides(args)
    except JaguarError:
        run_dir = None
    if run_dir is None:
        return "the finished blocks under run.dir's features/parts/ (the same command reuses them)"
    run = RunDir(run_dir)
    blocks = sum(not path.name.startswith(".") for path in run.feature_part_files(args.split))
    if not blocks:
        return f"no finished block of {args.split} yet (the earlier features, if any, are as they were)"
    return (f"{blocks} finished block(s) of {args.split} in {run.feature_parts_dir} "
            "(the same command reuses them and computes the rest)")

