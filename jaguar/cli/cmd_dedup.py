"""`jaguar dedup RUN_DIR [--min-cosine C]`: near-duplicate groups from a run's features (the embedding
pass), written into its shards' manifest for `data.split_groups=embedding`."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dedup", help="near-duplicate groups from a run's features, into the shards' manifest",
        description="Groups the run's extracted train/val/test features whose cosine similarity is at least "
                    "--min-cosine (connected components) and stores them as the 'embedding' groups of the "
                    "manifest of the run's data.shards; later runs split by them with data.split_groups=embedding. "
                    "Run `jaguar extract RUN --split train` (and val, test) first.")
    parser.add_argument("run_dir", help="a run folder with extracted features and its config")
    parser.add_argument("--min-cosine", type=float, default=None,
                        help="cosine at or above which two images are near-duplicates (default 0.99)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from jaguar.data.dedup import EMBEDDING_MIN_COSINE, summary_lines
    from jaguar.retrieval.near_duplicates import dedup_run

    min_cosine = EMBEDDING_MIN_COSINE if args.min_cosine is None else args.min_cosine
    found = dedup_run(args.run_dir, min_cosine)
    print("\n".join(summary_lines({"embedding": found.to_json()})))
    print("written to the manifest of the run's data.shards; train with data.split_groups=embedding to use them")
    return 0
