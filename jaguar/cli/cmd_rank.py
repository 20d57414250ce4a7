"""`jaguar rank RUN_DIR --split test|val [--top-k 100] [-o FILE] [--format parquet|csv]`: each
image's top-k other images of the split with final similarity and rank, for galleries too large
for an all-pairs submission."""

from __future__ import annotations

import argparse

from jaguar.run import RANK_FORMATS, RunDir

_RUN = RunDir("RUN")  # the run folder as the help texts name it


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("rank", help="write each image's top-k list (Parquet or CSV), any gallery size")
    parser.add_argument("run_dir", help=f"run folder holding {_RUN.features_path('test')} (and {_RUN.post_path})")
    parser.add_argument("--split", required=True, choices=("test", "val"), help="the images to rank")
    parser.add_argument("--top-k", type=int, default=100, help="gallery images listed per query (default 100)")
    parser.add_argument("-o", "--output", default=None,
                        help=f"output file (default: {_RUN.ranks_path('test')} for --split test, "
                             f"{_RUN.ranks_path('test', 'csv')} with --format csv)")
    parser.add_argument("--format", choices=RANK_FORMATS, default=None,
                        help="parquet (default) or csv; an output name ending in .csv or .parquet sets it")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaguar.retrieval.rank import rank_run

    run_dir = RunDir(args.run_dir)
    with run_dir.writer_lock("jaguar rank"):
        result = rank_run(run_dir, args.split, args.top_k, args.output, args.format)
    if result.post is None:
        print(f"note: {run_dir.post_path} not found; ranking by raw cosine similarity")
    print(f"{result.mode} search of {result.queries} images; order {result.basis}")
    print(f"wrote {result.path} ({result.rows} rows: query, rank, gallery, similarity)")
    return 0
