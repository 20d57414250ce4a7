"""`jaguar diagnose RUN [--split val|test]`: does the model see the coat? Retrieval on foreground-only,
background-only and silhouette-only images beside chance, the context ratio, mirror self-similarity
and same- vs cross-flank retrieval; written to the run and shown by `jaguar report`."""

from __future__ import annotations

import argparse

from jaguar.run import RunDir

_RUN = RunDir("RUN")  # the run folder as the help texts name it


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "diagnose", help="does the model see the coat, or the background, the silhouette, the mirror image?",
        description="Identity-balanced mAP (with chance beside it) on foreground-only images (background "
                    "flat-filled), background-only images (the animal inpainted away) and silhouette-only images "
                    "(the mask filled flat), the context ratio background / foreground; mirror self-similarity "
                    "(cosine of each image's embedding and its mirror image's) and, where the data has a "
                    "viewpoint column, same-flank vs cross-flank retrieval. Uses the run's transforms, its "
                    f"extracted features of the split and its checkpoint; writes {_RUN.path.name}/"
                    f"{_RUN.diagnosis_path('val').name} (or _test), which `jaguar report` shows.")
    parser.add_argument("run_dir", help="a trained run folder with the split's features (`jaguar extract RUN "
                                        "--split SPLIT`)")
    parser.add_argument("--split", default="val", choices=("val", "test"),
                        help="val (default) or test (needs test labels in the shards)")
    parser.add_argument("--checkpoint", default=None,
                        help="the checkpoint the split's features were extracted with (default: best, else newest)")
    parser.add_argument("--force", action="store_true", help="recompute even if the diagnosis is up to date")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from jaguar.retrieval.diagnose import diagnose_run, summary_lines

    run = RunDir(args.run_dir)
    with run.writer_lock("jaguar diagnose"):
        diagnosis = diagnose_run(run, args.split, args.checkpoint, progress=True, force=args.force)
    print("\n".join(summary_lines(diagnosis)))
    print(f"wrote {run.diagnosis_path(args.split)}; `jaguar report {run}` shows it")
    return 0
