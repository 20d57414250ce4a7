"""`jaguar` command: one sub-command a pipeline stage; each lives in its own jaguar/cli module,
parses its arguments, calls one library function and prints. A user error (any JaguarError) is
reported here, once, the same way for every command: one line naming the file, key or value at
fault, exit status 2, no traceback. An interruption (Ctrl-C, SIGTERM) is reported here too, in one
line: what was stopped, what was kept, the command that resumes; exit 130 / 143.

Building the parser imports only the command modules, and they import only argparse and light
jaguar modules (no torch, numpy, timm): `jaguar --help` and `jaguar CMD --help` answer at once. A
command module imports what its command needs inside the function that runs it."""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import signal
import sys
import traceback

from jaguar import __version__
from jaguar.errors import Interrupted, JaguarError
from jaguar.logs import configure_logging
from jaguar.folders import check_folder_arguments

# In pipeline order, as --help lists them. Each module defines `register(subparsers)`, which adds
# its parser and sets `func(args) -> int` and, optionally, `kept(args) -> str`: what an interrupted
# run of the command leaves behind for the re-run (e.g. finished blocks, checkpoints). The module's
# top-level imports stay light (argparse, jaguar.run, jaguar.errors): tests/test_cli.py checks it.
COMMAND_MODULES = (
    "jaguar.cli.cmd_synth",
    "jaguar.cli.cmd_prep",
    "jaguar.cli.cmd_verify",
    "jaguar.cli.cmd_dedup",
    "jaguar.cli.cmd_config",
    "jaguar.cli.cmd_train",
    "jaguar.cli.cmd_extract",
    "jaguar.cli.cmd_export",
    "jaguar.cli.cmd_match",
    "jaguar.cli.cmd_tune_post",
    "jaguar.cli.cmd_submit",
    "jaguar.cli.cmd_rank",
    "jaguar.cli.cmd_score",
    "jaguar.cli.cmd_calibrate",
    "jaguar.cli.cmd_identify",
    "jaguar.cli.cmd_enroll",
    "jaguar.cli.cmd_gallery",
    "jaguar.cli.cmd_diagnose",
    "jaguar.cli.cmd_report",
    "jaguar.cli.cmd_ensemble",
    "jaguar.cli.cmd_pseudo",
)

DEBUG_ENV = "JAGUAR_DEBUG"  # JAGUAR_DEBUG=1: tracebacks for interruptions too, as --debug


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaguar",
        description="Train and evaluate individual-animal re-identification models.",
    )
    parser.add_argument("--version", action="version", version=f"jaguar {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help=f"print the traceback when interrupted (Ctrl-C, SIGTERM); also {DEBUG_ENV}=1")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line; key=value overrides may come after options
    (`extract RUN --config R --split val k=v`) and are added to the command's overrides."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if isinstance(getattr(args, "overrides", None), list) and all(
                "=" in item and not item.startswith("-") for item in extra):
            args.overrides.extend(extra)
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


def _set_handler(signum: int, handler) -> None:
    try:
        signal.signal(signum, handler)
    except ValueError:  # main() called from another thread (an embedding program): signals stay as they are
        pass


def interruption_line(args: argparse.Namespace, argv: list[str], err: KeyboardInterrupt) -> str:
    """The one line an interrupted command prints: the signal, what was kept, the resume command."""
    signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
    how = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name
    kept = err.kept if isinstance(err, Interrupted) and err.kept else None
    if kept is None and getattr(args, "kept", None):
        try:
            kept = args.kept(args)
        except Exception:  # noqa: BLE001 - the line must come out whatever the folder holds
            kept = None
    if kept is None:
        return (f"jaguar {args.command}: interrupted by {how}; kept: nothing half-written (its outputs are "
                f"written whole or not at all); run it again with: jaguar {shlex.join(argv)}")
    return f"jaguar {args.command}: interrupted by {how}; kept: {kept}; resume with: jaguar {shlex.join(argv)}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parse_args(parser, argv)
    configure_logging(args.verbose)  # the one logging set-up: rank-aware (jaguar.logs)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    if previous[signal.SIGTERM] is signal.SIG_DFL:  # a command may install its own (training)
        _set_handler(signal.SIGTERM, _raise_interrupted)
    try:
        check_folder_arguments(args)
        code = int(args.func(args) or 0)
        if "torch.distributed" in sys.modules:  # a launched command's processes leave their group cleanly
            from jaguar.core.accelerator import end_process_group

            end_process_group()
        return code
    except (JaguarError, FileNotFoundError, FileExistsError) as err:
        # JaguarError: every user-facing failure; the OS errors: a file or folder the user named
        # is absent or already there. Either way the message names it: no traceback.
        print(f"jaguar {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        for signum in previous:  # a second Ctrl-C must not cut the line short
            _set_handler(signum, signal.SIG_IGN)
        if args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exc()
        if int(os.environ.get("RANK", "0")) == 0:  # under a launcher, one line for all processes
            print(interruption_line(args, argv, err), file=sys.stderr)
        return 128 + int(err.signum if isinstance(err, Interrupted) else signal.SIGINT)
    finally:
        for signum, handler in previous.items():
            if handler is not None:
                _set_handler(signum, handler)

if __name__ == "__main__":
    sys.exit(main())
