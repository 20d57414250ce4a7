"""`jaguar gallery RUN_DIR`: the individuals `jaguar identify` searches, with their image counts
(training identities and enrolled individuals)."""

from __future__ import annotations

import argparse

from jaguar.run import RunDir


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("gallery", help="list the gallery's individuals and image counts")
    parser.add_argument("run_dir", help="trained run folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaguar.retrieval.openset.gallery import gallery_listing

    rows = gallery_listing(RunDir(args.run_dir))
    width = max(len("individual"), *(len(name) for name, _, _ in rows))
    print(f"{'individual':<{width}}  images  source")
    for name, count, source in rows:
        print(f"{name!s:<{width}}  {count:>6}  {source}")
    print(f"{len(rows)} individuals, {sum(count for _, count, _ in rows)} images")
    return 0
