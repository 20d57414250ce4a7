"""`jaguar prep SRC OUT`: convert a challenge-layout or folder-per-identity data set into WebDataset shards
(for the latter, optionally holding out a labelled test split: --test-fraction, --seed)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("prep", help="convert images into WebDataset shards + manifest.json")
    parser.add_argument("src", help="challenge layout (train.csv, train/, test.csv, test/) or SRC/<identity>/*.png")
    parser.add_argument("out", help="output folder (built aside and renamed at the end)")
    parser.add_argument("--max-side", type=int, default=1024, help="cap on the long side in pixels (default 1024)")
    parser.add_argument("--encoding", choices=("png", "jpeg"), default="png",
                        help="png: lossless RGBA (default); jpeg: RGB at quality 95 plus a PNG alpha mask, "
                             "decodes several times faster (for fast training readers)")
    parser.add_argument("--shard-size", type=int, default=500, help="samples per tar shard (default 500)")
    parser.add_argument("--workers", type=int, default=2, help="decode/resize/encode processes (default 2)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave bad files out (listed in manifest.json) instead of failing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--test-fraction", type=float, default=0.0, metavar="F",
                        help="folder-per-identity layout: hold out about F of each identity's images (whole "
                             "near-duplicate groups, two or more per identity, at least one left to train) as a "
                             "labelled test split, with OUT/test.csv and OUT/test_labels.csv for submit and score "
                             "(default 0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --test-fraction draw (default 0)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from jaguar.data.prep import prepare, summary

    manifest = prepare(args.src, args.out, max_side=args.max_side, shard_size=args.shard_size,
                       workers=args.workers, skip_bad=args.skip_bad, overwrite=args.overwrite,
                       progress=True, encoding=args.encoding, test_fraction=args.test_fraction, seed=args.seed)
    print(summary(manifest, args.out))
    return 0
