"""`jaguar report RUN_DIR [--test-labels CSV]`: write RUN/report/index.html and its figures."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="write an offline HTML report (RUN/report/index.html)")
    parser.add_argument("run_dir", help="a run folder (config.yaml, tb/, features/, post.json, ...)")
    parser.add_argument("--test-labels", default=None,
                        help="CSV filename,ground_truth for the test images: adds test-side scores and figures")
    parser.add_argument("--out", default=None, help="output folder (default RUN/report)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaguar.cli.main import UserError
    from jaguar.report import build_report

    try:
        index = build_report(args.run_dir, test_labels=args.test_labels, out_dir=args.out)
    except (ValueError, KeyError) as err:
        raise UserError(str(err)) from None
    print(index)
    return 0
