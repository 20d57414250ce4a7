"""`jaguar score SUBMISSION --test-csv PATH --labels PATH`: identity-balanced mAP of any
submission file against a pair list and a `filename,ground_truth` label file."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("score", help="identity-balanced mAP of a submission file")
    parser.add_argument("submission", help="row_id,similarity file")
    parser.add_argument("--test-csv", required=True, help="pair list with header row_id,query_image,gallery_image")
    parser.add_argument("--labels", required=True, help="labels with header filename,ground_truth")
    parser.add_argument("--verbose", dest="per_identity", action="store_true", help="also print per-identity AP")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the scores to this JSON file")
    parser.set_defaults(func=run)


def score_submission(submission: str | Path, test_csv: str | Path, labels_csv: str | Path) -> dict:
    """{"mAP_balanced", "per_identity": {identity: AP}, "num_pairs", "num_images"}; bad files raise
    SubmissionError naming the rows."""
    from jaguar.retrieval.metrics import per_identity_ap
    from jaguar.retrieval.submission import (SubmissionError, _examples, check_rows, pair_similarity_matrix,
                                             read_labels, read_pairs, read_submission)

    row_ids, queries, galleries = read_pairs(test_csv)
    labels = read_labels(labels_csv)
    unlabelled = [f"{r} ({q if q not in labels else g})" for r, q, g in zip(row_ids, queries, galleries)
                  if q not in labels or g not in labels]
    if unlabelled:
        raise SubmissionError(f"{test_csv}: {len(unlabelled)} pair row(s) name images missing from "
                              f"{labels_csv}: {_examples(unlabelled)}")
    submitted = read_submission(submission)
    check_rows(submitted.row_ids, row_ids, str(submission))
    by_row = dict(zip(submitted.row_ids, submitted.similarity))
    images, matrix, candidates = pair_similarity_matrix(queries, galleries, [by_row[r] for r in row_ids])
    names = sorted({labels[name] for name in images})
    identity_of = {name: i for i, name in enumerate(names)}
    image_labels = [identity_of[labels[name]] for name in images]
    per_identity = per_identity_ap(matrix, image_labels, candidates)
    if not per_identity:
        raise SubmissionError(f"{labels_csv}: no query image has a true match among its pairs; mAP is undefined")
    per_name = {names[i]: ap for i, ap in per_identity.items()}
    return {"mAP_balanced": sum(per_name.values()) / len(per_name), "per_identity": per_name,
            "num_pairs": len(row_ids), "num_images": len(images)}


def run(args: argparse.Namespace) -> int:
    from jaguar.cli.main import UserError
    from jaguar.io import atomic_write_json

    try:
        result = score_submission(args.submission, args.test_csv, args.labels)
    except ValueError as err:
        raise UserError(str(err)) from None
    print(f"identity-balanced mAP: {result['mAP_balanced']:.6f} "
          f"({result['num_pairs']} pairs, {result['num_images']} images, {len(result['per_identity'])} identities)")
    if args.per_identity:
        for name, ap in sorted(result["per_identity"].items()):
            print(f"  {name}: {ap:.6f}")
    if args.json_out:
        atomic_write_json(Path(args.json_out), result)
    return 0
