"""`jaguar train RECIPE_OR_YAML [key=value ...]`: train (one process, or under accelerate/torchrun/srun)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model from a recipe or YAML config",
        description="Train from recipes/*.py or a YAML config. Run it as is for one process, or under "
                    "`accelerate launch -m jaguar.cli.main train ...` for several.")
    parser.add_argument("recipe", help="recipes/*.py or a .yaml config")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.shards=DIR train.epochs=5")
    parser.set_defaults(func=_run, kept=_kept)


def _run(args: argparse.Namespace) -> int:
    from jaguar.config import load_config
    from jaguar.train.entry import run_training

    return run_training(load_config(args.recipe, args.overrides))


def _kept(args: argparse.Namespace) -> str:
    """What an interrupted training leaves for the re-run: its checkpoints (train.resume=auto
    continues from the newest complete one)."""
    from jaguar.config import load_config
    from jaguar.run import RunDir

    run = RunDir(load_config(args.recipe, args.overrides).run.dir)
    complete = run.checkpoints.steps()
    if not complete:
        return f"no complete checkpoint yet in {run.checkpoints_dir} (the same command starts afresh)"
    return (f"{len(complete)} checkpoint(s) in {run.checkpoints_dir}, newest {complete[-1].name} (the same command "
            "continues from it, train.resume=auto)")

