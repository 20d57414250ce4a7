"""`jaguar submit RUN_DIR --test-csv PATH [-o FILE]`: score every pair of the test list with the
run's test features and chosen post-processing (tune-post) and write a validated submission."""

from __future__ import annotations

import argparse

from jaguar.run import RunDir

_RUN = RunDir("RUN")  # the run folder as the help texts name it


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("submit",
                                   help=f"write {_RUN.submission_path.name} (row_id,similarity) for a pair list")
    parser.add_argument("run_dir", help=f"run folder holding {_RUN.features_path('test')} (and {_RUN.post_path})")
    parser.add_argument("--test-csv", required=True, help="pair list with header row_id,query_image,gallery_image")
    parser.add_argument("-o", "--output", default=None, help=f"output file (default: {_RUN.submission_path})")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaguar.formats import examples
    from jaguar.retrieval.submission import submit_run

    run_dir = RunDir(args.run_dir)
    with run_dir.writer_lock("jaguar submit"):
        result = submit_run(run_dir, args.test_csv, args.output)
    if result.post is None:
        print(f"note: {run_dir.post_path} not found; using raw cosine similarity (run `jaguar tune-post` to tune)")
    else:
        fused = f", fused with local matches ({run_dir.local_matches_path('test')})" if result.fused else ""
        print(f"post-processing from {run_dir.post_path}: {result.post.describe()}{fused}")
    if result.repeated:
        print(f"note: {len(result.repeated)} row(s) of {args.test_csv} repeat an earlier row exactly and were read "
              f"once: line(s) {examples(result.repeated)}")
    print(f"wrote {result.path} ({result.rows} rows)")
    return 0
