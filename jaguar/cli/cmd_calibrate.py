"""`jaguar calibrate RUN_DIR`: choose the new-individual threshold of `jaguar identify` on
validation, holding out whole identities (group-aware) as unseen in several folds, and save it
with the open-set figures in the run."""

from __future__ import annotations

import argparse

from jaguar.run import RunDir
from jaguar.run_records import DEFAULT_CALIBRATION_FOLDS as DEFAULT_FOLDS

_RUN = RunDir("RUN")  # the run folder as the help texts name it


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("calibrate", help="calibrate the known / new-individual decision on validation")
    parser.add_argument("run_dir", help=f"trained run folder; writes {_RUN.calibration_path}")
    parser.add_argument("--folds", type=int, default=DEFAULT_FOLDS,
                        help=f"identity hold-out folds (default {DEFAULT_FOLDS}; fewer when there are fewer identities)")
    evidence = parser.add_mutually_exclusive_group()
    evidence.add_argument("--local", dest="local", action="store_true", default=None,
                          help="decide on the fused probability of the cosine and verified keypoint inliers "
                               "(default: when `jaguar match RUN --split val` made the validation split's local "
                               "features); missing local features are extracted first, announced")
    evidence.add_argument("--no-local", dest="local", action="store_false",
                          help="decide on the cosine alone, even when local features exist")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaguar.retrieval.openset.calibrate import calibrate_run, describe

    run_dir = RunDir(args.run_dir)
    with run_dir.writer_lock("jaguar calibrate"):
        calibration = calibrate_run(run_dir, args.folds, args.local)
    print(describe(calibration))
    print(f"wrote {run_dir.calibration_path}")
    return 0
