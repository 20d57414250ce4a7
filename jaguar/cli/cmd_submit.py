"""`jaguar submit RUN_DIR --test-csv PATH [-o FILE]`: score every pair of the test list with the
run's test features and post-processing (RUN_DIR/post.json) and write a validated submission."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("submit", help="write submission.csv (row_id,similarity) for a pair list")
    parser.add_argument("run_dir", help="run folder holding features/test.safetensors (and post.json)")
    parser.add_argument("--test-csv", required=True, help="pair list with header row_id,query_image,gallery_image")
    parser.add_argument("-o", "--output", default=None, help="output file (default: RUN_DIR/submission.csv)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaguar.cli.main import UserError
    from jaguar.retrieval.features import FeatureSet
    from jaguar.retrieval.postprocess import PostConfig
    from jaguar.retrieval.submission import pair_similarities, read_pairs, write_submission

    run_dir = Path(args.run_dir)
    output = Path(args.output) if args.output else run_dir / "submission.csv"
    features = FeatureSet.load(run_dir / "features" / "test.safetensors")
    post_path = run_dir / "post.json"
    try:
        if post_path.is_file():
            try:
                post = PostConfig.from_dict(json.loads(post_path.read_text())["chosen"], f" in {post_path}")
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise UserError(f"{post_path} is not a `jaguar tune-post` output ({err}); "
                                f"re-run tune-post or delete it to use raw cosine") from None
            print(f"post-processing from {post_path}: {post.to_dict()}")
        else:
            post = PostConfig()
            print(f"note: {post_path} not found; using raw cosine similarity (run `jaguar tune-post` to tune)")
        row_ids, queries, galleries = read_pairs(args.test_csv)
        similarity = pair_similarities(features, row_ids, queries, galleries, post)
        write_submission(output, row_ids, similarity, expected_row_ids=row_ids)
    except ValueError as err:
        raise UserError(str(err)) from None
    print(f"wrote {output} ({len(row_ids)} rows)")
    return 0
