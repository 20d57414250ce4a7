"""`jaguar identify RUN_DIR PHOTO_OR_FOLDER... [--top-k 5] [-o identify.csv]`: which known
individual each photo shows, or a new one, at the threshold `jaguar calibrate` chose; writes the
CSV (photo, rank, individual, score, decision; with local evidence also inliers, probability) and a
review page beside it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaguar.run import RunDir


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("identify", help="known individual or new one, for each photo")
    parser.add_argument("run_dir", help="trained, calibrated run folder (`jaguar calibrate RUN` first)")
    parser.add_argument("photos", nargs="+", help="photos (RGBA with a mask, or RGB/JPEG crops) or folders of them")
    parser.add_argument("--top-k", type=int, default=5, help="candidate individuals listed per photo (default 5)")
    parser.add_argument("-o", "--output", default="identify.csv", help="CSV to write (default identify.csv)")
    parser.add_argument("--html", default=None,
                        help="review page folder (default: the CSV's name with _review, beside it)")
    parser.add_argument("--checkpoint", default=None, help="weights to use (default: the run's best, else newest)")
    parser.add_argument("--model", default=None, metavar="MODEL.onnx",
                        help="embed the photos with this exported model (`jaguar export`; needs onnxruntime) "
                             "instead of the run's checkpoint")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaguar.formats import write_identify
    from jaguar.retrieval.openset.calibrate import uninformative
    from jaguar.retrieval.openset.identify import identify_photos
    from jaguar.report.review import write_review_page

    run_dir = RunDir(args.run_dir)
    found = identify_photos(run_dir, args.photos, args.top_k, args.checkpoint, args.model)
    output = Path(args.output)
    local = found.calibration.local_evidence
    write_identify(output, [(r.photo, rank, name, score, r.decision)
                            + ((r.inliers[rank - 1], r.probabilities[rank - 1]) if local else ())
                            for r in found.results for rank, (name, score) in enumerate(r.candidates, start=1)])
    page = write_review_page(run_dir, found, args.html or output.with_name(f"{output.stem}_review"))
    for result in found.results:
        evidence = (f", {result.inliers[0]} inliers, P(same) {result.probabilities[0]:.4f}"
                    if result.probabilities else "")
        print(f"{result.photo}: {result.decision} (best {result.candidates[0][0]} {result.candidates[0][1]:.4f}"
              f"{evidence})")
    new = sum(not r.known for r in found.results)
    on = "fused probability" if local else "score"
    print(f"{len(found.results)} photo(s): {len(found.results) - new} known, {new} new individual(s); "
          f"threshold {found.calibration.figures.threshold:.4f} on the {on}; wrote {output} and {page}")
    warning = uninformative(found.calibration)
    if warning:
        print(f"jaguar identify: {warning} (from `jaguar calibrate`)", file=sys.stderr)
    for problem in found.problems:
        print(f"jaguar identify: error: {problem.path}: {problem.reason}", file=sys.stderr)
    return 1 if found.problems else 0
