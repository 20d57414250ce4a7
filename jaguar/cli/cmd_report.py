"""`jaguar report RUN_DIR [--test-labels CSV]`: write RUN/report/index.html and its figures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


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
    _print_summary(Path(args.run_dir))
    print(f"report: {index}")
    return 0


def _print_summary(run_dir: Path) -> None:
    """Identity-balanced mAP per post-processing stage: validation (post.json), test (score_table.json)."""
    columns = {}
    for label, path in (("validation", run_dir / "post.json"), ("test", run_dir / "score_table.json")):
        if path.is_file():
            rows = json.loads(path.read_text()).get("table", [])
            columns[label] = {row["name"]: row["mAP_balanced"] for row in rows if "mAP_balanced" in row}
    if not columns:
        return
    names = list(dict.fromkeys(name for column in columns.values() for name in column))
    print("identity-balanced mAP  " + "  ".join(f"{label:>10}" for label in columns))
    for name in names:
        cells = "  ".join(f"{columns[label][name]:10.4f}" if name in columns[label] else f"{'':>10}"
                          for label in columns)
        print(f"  {name:<20} {cells}")
