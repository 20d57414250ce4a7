"""Entry points that start training: a recipe run as a script (`accelerate launch recipes/x.py k=v`)
and `jaguar train RECIPE_OR_YAML k=v`; both end in the same trainer."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from jaguar.config import Config, load_config
from jaguar.errors import JaguarError


def _launch_rank() -> int:
    """This process's rank as the launcher (torchrun, accelerate, srun via torchrun) set it; 0 alone."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def setup_logging() -> None:
    rank = _launch_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # accelerate logs every file of every checkpoint at INFO; its warnings still show.
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def run_training(cfg: Config) -> int:
    from jaguar.train.trainer import TrainingStopped, train

    try:
        train(cfg)
    except TrainingStopped as err:
        logging.getLogger("jaguar.train").error("%s", err)
        return 3
    if _launch_rank() == 0:
        run = cfg.run.dir
        logging.getLogger("jaguar.train").info(
            "training finished in %s; next: `jaguar extract %s --split val` and `--split test`, "
            "`jaguar tune-post %s`, `jaguar report %s`", run, run, run, run)
    return 0


def run_recipe(recipe_file: str, argv: list[str] | None = None) -> None:
    """`python recipes/x.py key=value ...` / `accelerate launch recipes/x.py key=value ...`."""
    setup_logging()
    args = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in args):
        print(f"usage: accelerate launch {recipe_file} [key=value ...]\n"
              f"Trains with this recipe; `jaguar config show {recipe_file}` lists every key.")
        sys.exit(0)
    try:
        code = run_training(load_config(Path(recipe_file), args))
    except (JaguarError, FileNotFoundError) as err:  # reported as `jaguar train` reports it
        print(f"{recipe_file}: error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)
