"""`jaguar tune-post RUN_DIR`: choose QE / re-ranking / blend on the validation features, and the
fusion with local matches when the run has them (RUN/local/val.safetensors, `jaguar match`), and
save the chosen settings and the raw / +QE / +re-ranking / local only / fused / chosen table in the run."""

from __future__ import annotations

import argparse

from jaguar.run import RunDir

_RUN = RunDir("RUN")  # the run folder as the help texts name it


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tune-post", help="tune query expansion and re-ranking on the validation split")
    parser.add_argument("run_dir", help=f"run folder holding {_RUN.features_path('val')} and {_RUN.config_path}")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaguar.retrieval.post.tune import format_stage_table, tune_post_run

    run_dir = RunDir(args.run_dir)
    with run_dir.writer_lock("jaguar tune-post"):
        post = tune_post_run(run_dir)
    how = "searched" if post.searched else "taken from retrieval.post (retrieval.tune is false)"
    print(f"post-processing on {post.val_size} validation images ({how}):")
    print(format_stage_table(post.table))
    print(f"wrote {run_dir.post_path}")
    return 0
