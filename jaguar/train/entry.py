"""Entry points that start training: a recipe run as a script (`accelerate launch recipes/x.py k=v`)
and `jaguar train RECIPE_OR_YAML k=v`; both end in the same trainer."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from jaguar.config import Config, load_config
from jaguar.errors import JaguarError
from jaguar.lock import launch_rank
from jaguar.logs import configure_logging


def run_training(cfg: Config) -> int:
    """Train; 0 when training finished or was preempted through the run's PREEMPT file or SIGUSR1
    (Slurm requeues the job, which resumes), 3 when it stopped on a non-finite guard. Stopped by
    SIGTERM it raises `Interrupted` (reported by the CLI, exit 143) after the checkpoint is saved."""
    import signal

    from jaguar.errors import Interrupted
    from jaguar.train.trainer import TrainingStopped, train

    log = logging.getLogger("jaguar.train")
    try:
        result = train(cfg)
    except TrainingStopped as err:
        log.error("%s", err)
        return 3
    run = cfg.run.dir
    if result.get("preempted"):
        from jaguar.run import RunDir

        saved = RunDir(run).checkpoints.latest()
        kept = f"the checkpoint of step {result['step']}, {saved}"
        if result.get("signal") == signal.SIGTERM:
            raise Interrupted(signal.SIGTERM, kept=kept)
        if launch_rank() == 0:
            log.warning("preempted at step %d: kept %s; the same command resumes from it "
                        "(train.resume=auto)", result["step"], kept)
        return 0
    if launch_rank() == 0:
        log.info("training finished in %s; next: `jaguar extract %s --split val` and `--split test`, "
                 "`jaguar tune-post %s`, `jaguar report %s`", run, run, run, run)
    return 0


def run_recipe(recipe_file: str, argv: list[str] | None = None) -> None:
    """`python recipes/x.py key=value ...` / `accelerate launch recipes/x.py key=value ...`."""
    configure_logging()  # a recipe run as a script (under the CLI, already done)
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
    except KeyboardInterrupt as err:  # as `jaguar train` reports it (jaguar.cli.main), without its parser
        signum = getattr(err, "signum", 2)
        if launch_rank() == 0:
            kept = getattr(err, "kept", None) or "the checkpoints already saved in the run folder"
            print(f"{recipe_file}: interrupted by signal {signum}; kept: {kept}; resume with the same "
                  f"command (train.resume=auto)", file=sys.stderr)
        sys.exit(128 + signum)
    from jaguar.core.accelerator import end_process_group

    end_process_group()  # the processes of a launch leave their group cleanly
    sys.exit(code)
