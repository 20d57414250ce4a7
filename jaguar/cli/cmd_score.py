"""`jaguar score SUBMISSION|RUN_DIR --test-csv PATH --labels PATH`: identity-balanced mAP of a
submission against a pair list and a `filename,ground_truth` label file. Given a run folder, it
scores the run's submission, saves the score, and re-scores tune-post's stages on the labelled
test images into the run's score table."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from jaguar.run import RunDir

_RUN = RunDir("RUN")  # the run folder as the help texts name it


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("score", help="identity-balanced mAP of a submission file")
    parser.add_argument("submission", help=f"row_id,similarity file, or a run folder (scores {_RUN.submission_path}, "
                                            f"writes {_RUN.score_path} and {_RUN.score_table_path})")
    parser.add_argument("--test-csv", required=True, help="pair list with header row_id,query_image,gallery_image")
    parser.add_argument("--labels", required=True, help="labels with header filename,ground_truth")
    parser.add_argument("--verbose", dest="per_identity", action="store_true", help="also print per-identity AP")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the scores to this JSON file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaguar.io import atomic_write_json
    from jaguar.retrieval.score import score_run, score_submission

    table = None
    if Path(args.submission).is_dir():
        with RunDir(args.submission).writer_lock("jaguar score"):
            score, table = score_run(RunDir(args.submission), args.test_csv, args.labels)
    else:
        score = score_submission(args.submission, args.test_csv, args.labels)
    print(f"identity-balanced mAP: {score.mAP_balanced:.6f} "
          f"({score.num_pairs} pairs, {score.num_images} images, {len(score.per_identity)} identities with a "
          f"true match among them)")
    if score.mAP is not None:
        print(f"mAP {score.mAP:.6f}, rank-1 {score.rank1:.6f}, rank-5 {score.rank5:.6f}, mINP {score.mINP:.6f}")
    if args.per_identity:
        for name, ap in sorted(score.per_identity.items()):
            print(f"  {name}: {ap:.6f}")
    if table is not None:
        print(f"post-processing stages on {args.labels}: " + ", ".join(
            f"{row.label()} {row.mAP_balanced:.4f}" for row in table.table))
    if args.json_out:
        atomic_write_json(Path(args.json_out), dataclasses.asdict(score))
    return 0
