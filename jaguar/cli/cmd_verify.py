"""`jaguar verify SHARDS|RUN`: check a shards folder against its manifest (every split's wids index
and sample counts, every shard's presence, byte size and sha256), or a run folder's checkpoints,
features and gallery against the checksums recorded when they were written. Reads every file."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from jaguar.data.manifest import Manifest, ShardsError
from jaguar.errors import JaguarError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("verify", help="check a shards folder (manifest sha256) or a run folder "
                                                  "(checkpoints, features, gallery) for corruption")
    # not named "shards": the CLI's folder check (jaguar.folders) would refuse a run folder here
    parser.add_argument("folder", metavar="SHARDS|RUN",
                        help="a `jaguar prep` (or pseudo-label) output folder, or a run folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaguar.folders import RUN, SHARDS, WrongFolderError, folder_kind, wrong_folder_message
    from jaguar.formats import capped_listing

    if folder_kind(args.folder) == RUN:
        return _verify_run(args.folder)
    message = wrong_folder_message(args.folder, SHARDS, "verify")  # a raw data set, say
    if message:
        raise WrongFolderError(message)
    manifest = Manifest.load(args.folder)
    problems = manifest.verify(args.folder)
    if problems:
        raise ShardsError(f"{len(problems)} problem(s) in {args.folder}:\n  " + capped_listing(problems)
                          + "\nre-run `jaguar prep` (or copy the folder again)")
    shards = sum(len(entry.shards) for entry in manifest.splits.values())
    samples = sum(entry.num_samples for entry in manifest.splits.values())
    print(f"{args.folder}: ok ({shards} shard(s), {samples} samples in split(s) "
          f"{', '.join(manifest.splits)}; sizes and sha256 match {Manifest.path(args.folder).name})")
    return 0


def _verify_run(folder: str) -> int:
    from jaguar.folders import run_shards
    from jaguar.formats import capped_listing
    from jaguar.run import RunDir
    from jaguar.verify import verify_run

    shards = run_shards(Path(folder))
    also = f"; its shards: `jaguar verify {shlex.quote(shards)}`" if shards else ""
    found = verify_run(RunDir(folder))
    if found.problems:
        raise JaguarError(f"{len(found.problems)} problem(s) in run {folder}:\n  " + capped_listing(found.problems)
                          + "\nre-make what is named: `jaguar extract RUN --split S --force` for features, "
                            "another checkpoint (or train again) for a checkpoint" + also)
    if not found.checked:
        raise JaguarError(f"{folder} holds neither a manifest.json nor a run's checkpoints, features or "
                          f"gallery: nothing to verify{also}")
    print(f"{folder}: ok ({'; '.join(found.checked)}: every file matches its recorded checksum){also}")
    return 0
