"""`jaguar ensemble RUN_A RUN_B ... -o RUN_E`: combine runs' features into a new run folder, then
tune its post-processing, write its submission (with --test-csv), score it (with --test-labels)
and write its report, as for any run."""

from __future__ import annotations

import argparse

from jaguar.run import RunDir

_RUN = RunDir("RUN")  # the run folder as the help texts name it


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ensemble", help="ensemble several runs' features into a new run folder")
    parser.add_argument("runs", nargs="+",
                        help=f"run folders with {_RUN.features_dir}/ (the first one's config is kept)")
    parser.add_argument("-o", "--out", required=True, help="the ensemble's run folder")
    parser.add_argument("--weights", nargs="+", type=float, default=None,
                        help="one weight per run (normalised to sum 1; default equal)")
    parser.add_argument("--mode", default="auto", choices=("auto", "mean", "concat"),
                        help="mean of embeddings (equal widths) or weighted concatenation "
                             "(cosine = weighted mean of cosines); auto picks mean when widths match")
    parser.add_argument("--test-csv", default=None, help=f"the challenge's test.csv: also write {_RUN.submission_path}")
    parser.add_argument("--test-labels", default=None,
                        help="test labels CSV: also score the submission, and passed on to the report")
    parser.add_argument("--features-only", action="store_true",
                        help="only write the combined features (no tune-post, submission or report)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaguar.ensemble import ensemble_run
    from jaguar.retrieval.post.tune import format_stage_table

    out = RunDir(args.out)
    with out.writer_lock("jaguar ensemble"):
        outcome = ensemble_run(args.runs, out, weights=args.weights, mode=args.mode, test_csv=args.test_csv,
                               test_labels=args.test_labels, features_only=args.features_only)
    print(f"ensemble features ({', '.join(outcome.splits)}) written to {out.features_dir}")
    if outcome.post is not None:
        print(format_stage_table(outcome.post.table))
        print(f"wrote {out.post_path}")
    if outcome.submission is not None:
        print(f"wrote {outcome.submission.path} ({outcome.submission.rows} rows)")
    if outcome.score is not None:
        print(f"identity-balanced mAP: {outcome.score.mAP_balanced:.6f}")
    if outcome.report is not None:
        print(f"report: {outcome.report}")
    return 0
