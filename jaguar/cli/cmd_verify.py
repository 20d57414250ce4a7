"""`jaguar verify SHARDS`: check a shards folder against its manifest: every split's wids index and
sample counts, every shard's presence, byte size and sha256 (reads every shard)."""

from __future__ import annotations

import argparse

from jaguar.data.manifest import Manifest, ShardsError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("verify", help="check a shards folder's files against the sha256 in its manifest")
    parser.add_argument("shards", help="a `jaguar prep` (or pseudo-label) output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    manifest = Manifest.load(args.shards)
    problems = manifest.verify(args.shards)
    if problems:
        raise ShardsError(f"{len(problems)} problem(s) in {args.shards}:\n  " + "\n  ".join(problems)
                          + "\nre-run `jaguar prep` (or copy the folder again)")
    shards = sum(len(entry.shards) for entry in manifest.splits.values())
    samples = sum(entry.num_samples for entry in manifest.splits.values())
    print(f"{args.shards}: ok ({shards} shard(s), {samples} samples in split(s) "
          f"{', '.join(manifest.splits)}; sizes and sha256 match {Manifest.path(args.shards).name})")
    return 0
