"""`jaguar` command: one sub-command a pipeline stage; each lives in its own jaguar/cli module,
parses its arguments, calls one library function and prints. A user error (any JaguarError) is
reported here, once, the same way for every command: one line naming the file, key or value at
fault, exit status 2, no traceback."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from jaguar.errors import JaguarError

# In pipeline order, as --help lists them. Each module defines `register(subparsers)`, which adds
# its parser and sets `func(args) -> int`.
COMMAND_MODULES = (
    "jaguar.cli.cmd_synth",
    "jaguar.cli.cmd_prep",
    "jaguar.cli.cmd_verify",
    "jaguar.cli.cmd_dedup",
    "jaguar.cli.cmd_config",
    "jaguar.cli.cmd_train",
    "jaguar.cli.cmd_extract",
    "jaguar.cli.cmd_export",
    "jaguar.cli.cmd_tune_post",
    "jaguar.cli.cmd_submit",
    "jaguar.cli.cmd_rank",
    "jaguar.cli.cmd_score",
    "jaguar.cli.cmd_calibrate",
    "jaguar.cli.cmd_identify",
    "jaguar.cli.cmd_enroll",
    "jaguar.cli.cmd_gallery",
    "jaguar.cli.cmd_report",
    "jaguar.cli.cmd_ensemble",
    "jaguar.cli.cmd_pseudo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaguar",
        description="Train and evaluate individual-animal re-identification models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (JaguarError, FileNotFoundError, FileExistsError) as err:
        # JaguarError: every user-facing failure; the OS errors: a file or folder the user named
        # is absent or already there. Either way the message names it: no traceback.
        print(f"jaguar {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
