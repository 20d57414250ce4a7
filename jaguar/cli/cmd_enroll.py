"""`jaguar enroll RUN_DIR --name NAME PHOTO...`: add a new individual to the run's gallery from its
photos, without retraining; `jaguar identify` recognises it afterwards."""

from __future__ import annotations

import argparse

from jaguar.run import RunDir

_RUN = RunDir("RUN")  # the run folder as the help texts name it


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("enroll", help="add a new individual to the gallery (no retraining)")
    parser.add_argument("run_dir", help=f"trained run folder; appends to {_RUN.enrolled_path}")
    parser.add_argument("--name", required=True, help="the new individual's name (unique in the gallery)")
    parser.add_argument("photos", nargs="+", help="its photos or folders of them")
    parser.add_argument("--checkpoint", default=None, help="weights to use (default: the run's best, else newest)")
    parser.add_argument("--model", default=None, metavar="MODEL.onnx",
                        help="embed the photos with this exported model (`jaguar export`; needs onnxruntime) "
                             "instead of the run's checkpoint")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaguar.retrieval.openset.identify import enroll

    run_dir = RunDir(args.run_dir)
    with run_dir.gallery_lock("jaguar enroll"):
        done = enroll(run_dir, args.name, args.photos, args.checkpoint, args.model)
    print(f"enrolled {done.name!r} from {len(done.photos)} photo(s) into {run_dir.enrolled_path}")
    return 0
