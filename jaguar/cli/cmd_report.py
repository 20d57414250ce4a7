"""`jaguar report RUN_DIR [--test-labels CSV]`: write RUN/report/index.html and its figures."""

from __future__ import annotations

import argparse

from jaguar.run import RunDir

_RUN = RunDir("RUN")  # the run folder as the help texts name it


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help=f"write an offline HTML report ({_RUN.report_dir}/index.html)")
    parser.add_argument("run_dir", help=f"a run folder ({_RUN.config_path.name}, {_RUN.tb_dir.name}/, "
                                           f"{_RUN.features_dir.name}/, {_RUN.post_path.name}, ...)")
    parser.add_argument("--test-labels", default=None,
                        help="CSV filename,ground_truth for the test images: adds test-side figures")
    parser.add_argument("--out", default=None, help="output folder (default RUN/report)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaguar.report import build_report

    run_dir = RunDir(args.run_dir)
    with run_dir.writer_lock("jaguar report"):
        index = build_report(run_dir, test_labels=args.test_labels, out_dir=args.out)
    print_stage_summary(run_dir)
    print(f"report: {index}")
    return 0


def print_stage_summary(run_dir: RunDir) -> None:
    """Identity-balanced mAP per post-processing stage: validation (tune-post), test (score table)."""
    columns, labels = {}, {}
    for column, has, load in (("validation", run_dir.has_post, run_dir.load_post),
                              ("test", run_dir.has_score_table, run_dir.load_score_table)):
        if has():
            rows = load().table
            columns[column] = {row.name: row.mAP_balanced for row in rows}
            labels.update({row.name: row.label() for row in rows if row.name not in labels})
    if not columns:
        return
    width = max(24, *(len(label) for label in labels.values()))
    print("identity-balanced mAP (extracted features, per post-processing stage)")
    print(f"  {'':<{width}} " + "  ".join(f"{column:>10}" for column in columns))
    for name, label in labels.items():
        cells = "  ".join(f"{columns[column][name]:10.4f}" if name in columns[column] else f"{'':>10}"
                          for column in columns)
        print(f"  {label:<{width}} {cells}")
