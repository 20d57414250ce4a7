"""`jaguar ensemble RUN_A RUN_B ... -o RUN_E`: combine runs' features into a new run folder, then
tune its post-processing, write its submission (with --test-csv) and its report, as for any run."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ensemble", help="ensemble several runs' features into a new run folder")
    parser.add_argument("runs", nargs="+", help="run folders with features/ (the first one's config is kept)")
    parser.add_argument("-o", "--out", required=True, help="the ensemble's run folder")
    parser.add_argument("--weights", nargs="+", type=float, default=None,
                        help="one weight per run (normalised to sum 1; default equal)")
    parser.add_argument("--mode", default="auto", choices=("auto", "mean", "concat"),
                        help="mean of embeddings (equal widths) or weighted concatenation "
                             "(cosine = weighted mean of cosines); auto picks mean when widths match")
    parser.add_argument("--test-csv", default=None, help="the challenge's test.csv: also write submission.csv")
    parser.add_argument("--test-labels", default=None, help="test labels CSV, passed on to the report")
    parser.add_argument("--features-only", action="store_true",
                        help="only write the combined features (no tune-post, submission or report)")
    parser.set_defaults(func=run)


def _run_stage(argv: list[str]) -> None:
    from jaguar.cli.main import UserError, main

    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse exits when the sub-command is unknown or misused
        code = exit_.code
    if code != 0:
        raise UserError(f"`jaguar {' '.join(argv)}` failed (exit {code}); see the message above, "
                        f"fix it and run that stage (then `jaguar report {argv[1]}`) yourself")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jaguar.cli.main import UserError
    from jaguar.ensemble import EnsembleError, ensemble_runs
    from jaguar.report import build_report

    try:
        splits = ensemble_runs(args.runs, args.out, weights=args.weights, mode=args.mode)
    except (EnsembleError, KeyError) as err:
        raise UserError(str(err)) from None
    print(f"ensemble features ({', '.join(splits)}) written to {Path(args.out) / 'features'}")
    if args.features_only:
        return 0
    if "val" in splits:
        _run_stage(["tune-post", str(args.out)])
    else:
        logger.warning("no validation features in every run: post-processing is not tuned for the ensemble")
    if args.test_csv:
        _run_stage(["submit", str(args.out), "--test-csv", str(args.test_csv)])
        if args.test_labels:
            _run_stage(["score", str(Path(args.out) / "submission.csv"), "--test-csv", str(args.test_csv),
                        "--labels", str(args.test_labels), "--json", str(Path(args.out) / "score.json")])
    try:
        print(build_report(args.out, test_labels=args.test_labels))
    except (ValueError, KeyError) as err:
        raise UserError(str(err)) from None
    return 0
