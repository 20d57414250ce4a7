"""`jaguar synth OUT`: write a synthetic jaguar data set in the challenge layout (for tests and dry runs)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("synth", help="generate a synthetic data set in the challenge layout")
    parser.add_argument("out", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--identities", type=int, default=31, help="number of identities (default 31)")
    parser.add_argument("--train-images", type=int, default=1895, help="training images (default 1895)")
    parser.add_argument("--test-images", type=int, default=371, help="test images (default 371)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files (default 0)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--bursts", type=float, default=0.0, metavar="RATE",
                        help="share of images that are frames of near-identical camera-trap bursts (2-5 frames, "
                             "tiny pose/light jitter), listed in bursts.csv; 0.12 resembles the real data "
                             "(default 0: none)")
    parser.add_argument("--unknown-views", type=float, default=0.0, metavar="SHARE",
                        help="share of photos whose viewpoint column says unknown (the photo still shows one "
                             "flank; default 0)")
    parser.add_argument("--sites", type=int, default=0,
                        help="camera sites, each with its own fixed background; identities are seen mostly "
                             "at their home site, a background shortcut (listed in sites.csv; default 0: "
                             "generic backgrounds)")
    parser.add_argument("--site-affinity", type=float, default=0.8, metavar="P",
                        help="with --sites: probability a photo is taken at its identity's home site (default 0.8)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from jaguar.data.synth import make_synthetic
    from jaguar.formats import read_labels

    out = make_synthetic(args.out, identities=args.identities, train_images=args.train_images,
                         test_images=args.test_images, size=args.size, seed=args.seed,
                         workers=args.workers, overwrite=args.overwrite, progress=True,
                         bursts=args.bursts, unknown_views=args.unknown_views, sites=args.sites,
                         site_affinity=args.site_affinity)
    train = read_labels(out / "train.csv")
    test_images = len(read_labels(out / "test_labels.csv"))
    print(f"wrote {len(train)} train + {test_images} test images of "
          f"{len(set(train.values()))} identities ({args.size} px, seed {args.seed}) to {out}; "
          f"test.csv has {test_images * (test_images - 1)} pairs, truth in test_labels.csv")
    if (out / "bursts.csv").is_file():
        frames = (out / "bursts.csv").read_text().splitlines()[1:]
        print(f"{len(frames)} images are frames of {len({line.split(',')[1] for line in frames})} bursts "
              f"(listed in {out / 'bursts.csv'})")
    print("one coat per flank; the viewpoint column of train.csv and test_labels.csv says which side each "
          "photo shows" + (f"; {args.sites} camera sites (sites.csv)" if args.sites else ""))
    return 0
