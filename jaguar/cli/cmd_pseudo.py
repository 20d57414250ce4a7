"""`jaguar pseudo-label RUN_DIR --threshold T`: confidently predicted test images become extra
training shards (RUN/pseudo/), and the command to fine-tune on them is printed."""

from __future__ import annotations

import argparse

from jaguar.run import RunDir

_RUN = RunDir("RUN")  # the run folder as the help texts name it


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pseudo-label", help="turn confident test predictions into training shards")
    parser.add_argument("run_dir", help=f"a run folder with {_RUN.features_dir}/{{train,val,test}}.safetensors")
    parser.add_argument("--threshold", type=float, required=True,
                        help="minimum confidence (centroid cosine, or margin with --confidence margin)")
    parser.add_argument("--out", default=None, help="output shards folder (default RUN/pseudo)")
    parser.add_argument("--k", type=int, default=5, help="nearest labelled neighbours whose majority must agree")
    parser.add_argument("--confidence", default="cosine", choices=("cosine", "margin"),
                        help="cosine to the predicted centroid, or its margin over the second-nearest centroid")
    parser.add_argument("--test-labels", default=None,
                        help="CSV filename,ground_truth: report the precision of the selection")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaguar.pseudo import fine_tune_command, pseudo_label_run

    with RunDir(args.run_dir).writer_lock("jaguar pseudo-label"):  # its shards go to RUN/pseudo by default
        summary = pseudo_label_run(args.run_dir, args.threshold, out_dir=args.out, k=args.k,
                                   confidence=args.confidence, test_labels=args.test_labels,
                                   overwrite=args.overwrite)
    print(f"selected {summary['selected_count']} of {summary['candidates']} test images "
          f"({summary['agreed']} agreed; confidence {args.confidence} >= {args.threshold})")
    precision = (summary.get("precision") or {}).get("selected") or {}
    if precision.get("precision") is not None:
        print(f"precision of the selection: {precision['correct']}/{precision['judged']} = "
              f"{precision['precision']:.3f}")
    print(f"shards and pseudo.json written to {summary['out_dir']}")
    if summary["selected_count"]:
        print("fine-tune on train + pseudo-labelled images with:")
        print("  " + fine_tune_command(args.run_dir, summary["out_dir"]))
    else:
        print("nothing selected: lower --threshold (or --k) and run again with --overwrite")
    return 0
