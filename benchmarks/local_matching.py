"""Local pattern evidence on synthetic jaguars: extraction time a photo, matching throughput (pairs
per second on one core), peak memory, and how well the verified inlier count separates photos of
one jaguar's flank from other jaguars and from its other flank. Prints figures; not a test.

    python benchmarks/local_matching.py [--size 192] [--identities 16] [--images 160] [--shortlist 50]
        [--geometry affine] [--ratio 0.9] [--max-side 512] [--seed 0]

A synthetic set (`jaguar synth`: flank-true coats, one per flank; pose, light, blur, noise,
occlusion and background vary a photo) of --images test photos of --identities jaguars is written
to a temporary folder at --size px (the demo uses 192, the fast demo 128). Every pair of photos is
matched once (all ordered pairs' scores are symmetric enough for the AUC; each unordered pair once):
- separation: ROC AUC of the inlier count, same jaguar and flank against other jaguars, and against
  the same jaguar's other flank (a left and a right flank carry different coats);
- retrieval: identity-balanced mAP of the inlier count alone over all pairs, with identities as
  labels (the challenge's) and with (identity, flank) as labels;
- throughput: `match_shortlist` of every photo against the --shortlist photos after it (mostly
  other jaguars, as most of a real shortlist is), one thread, --repeat runs;
- with --processes P: --queries queries (the photos' features reused in turn, each against B photos
  drawn at random) split into P contiguous slices, each matched by its own process (fork; the
  slicing `match_shortlist` offers for sharded runs): wall time and pairs/s in all.
Single-threaded throughout (OpenCV, BLAS), so figures are per core."""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # per-core figures: before numpy loads its BLAS

import argparse  # noqa: E402
import csv  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaguar.data.synth import make_synthetic  # noqa: E402
from jaguar.retrieval.local.keypoints import RootSIFTExtractor  # noqa: E402
from jaguar.retrieval.local.matching import MatchSettings, match_pair, match_shortlist  # noqa: E402
from jaguar.retrieval.local.store import LocalFeatureSet  # noqa: E402
from jaguar.core.evaluator import evaluate  # noqa: E402


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_set(folder: Path) -> tuple[list[str], list[np.ndarray], list[str], list[str]]:
    """(names, RGBA images, identities, flanks) of the synthetic test split."""
    with (folder / "test_labels.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    images = [cv2.cvtColor(cv2.imread(str(folder / "test" / row["filename"]), cv2.IMREAD_UNCHANGED),
                           cv2.COLOR_BGRA2RGBA) for row in rows]
    return ([row["filename"] for row in rows], images, [row["ground_truth"] for row in rows],
            [row["viewpoint"] for row in rows])


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half (the Mann-Whitney form of ROC AUC)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.ones(len(positive)), np.zeros(len(negative))], np.r_[positive, negative]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--identities", type=int, default=16)
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--shortlist", type=int, default=50)
    parser.add_argument("--geometry", default="affine", choices=["similarity", "affine", "homography"])
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of match_shortlist (min and median printed)")
    parser.add_argument("--processes", type=int, default=0,
                        help="also time --queries queries x B on this many processes, one contiguous slice each")
    parser.add_argument("--queries", type=int, default=2000,
                        help="queries of the multi-process run (the photos' features reused in turn)")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}; OpenCV {cv2.__version__}, numpy {np.__version__}, 1 thread")
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_synthetic(Path(tmp) / "synth", identities=args.identities, train_images=2 * args.identities,
                                test_images=args.images, size=args.size, seed=args.seed, workers=1)
        names, images, identities, flanks = read_set(folder)
    rss_before = max_rss_mb()
    extractor = RootSIFTExtractor(max_side=args.max_side)
    start = time.perf_counter()
    features = [extractor.extract(image) for image in images]
    extract_seconds = (time.perf_counter() - start) / len(images)
    packed = LocalFeatureSet.pack(names, features, meta=extractor.settings())
    counts = np.diff(packed.offsets)
    print(f"{len(images)} test photos of {args.identities} jaguars at {args.size} px; RootSIFT: "
          f"{extract_seconds * 1000:.1f} ms a photo, keypoints a photo median {np.median(counts):.0f} "
          f"(min {counts.min()}, max {counts.max()}); packed {packed.descriptors.nbytes / 1e6:.2f} MB of descriptors")

    settings = MatchSettings(ratio=args.ratio, geometry=args.geometry)
    n = len(images)
    scores = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            scores[i, j] = scores[j, i] = match_pair(packed[i], packed[j], settings).inliers
    upper = np.triu_indices(n, 1)
    identity = np.array(identities)
    flank = np.array(flanks)
    same_identity = (identity[:, None] == identity[None, :])[upper]
    same_flank = (flank[:, None] == flank[None, :])[upper]
    values = scores[upper]
    same, other_flank, strangers = (values[same_identity & same_flank], values[same_identity & ~same_flank],
                                    values[~same_identity])
    print(f"geometry {args.geometry}, ratio {args.ratio}: inliers median (mean) - same jaguar same flank "
          f"{np.median(same):.0f} ({same.mean():.1f}, n={same.size}); same jaguar other flank "
          f"{np.median(other_flank):.0f} ({other_flank.mean():.1f}, n={other_flank.size}); other jaguars "
          f"{np.median(strangers):.0f} ({strangers.mean():.1f}, 99th pct {np.percentile(strangers, 99):.0f}, "
          f"n={strangers.size})")
    print(f"ROC AUC of the inlier count: same flank vs other jaguars {auc(same, strangers):.4f}; "
          f"same flank vs the same jaguar's other flank {auc(same, other_flank):.4f}")
    labels = np.unique(identity, return_inverse=True)[1]
    flank_labels = np.unique(np.char.add(identity, flank), return_inverse=True)[1]
    print(f"local score alone, all-vs-all identity-balanced mAP: identities as labels "
          f"{evaluate(scores, labels, kind='similarity').mAP_balanced:.4f}; (identity, flank) as labels "
          f"{evaluate(scores, flank_labels, kind='similarity').mAP_balanced:.4f}")

    width = min(args.shortlist, n - 1)
    shortlist = np.array([[(i + 1 + k) % n for k in range(width)] for i in range(n)])
    runs = []
    for _ in range(max(1, args.repeat)):
        start = time.perf_counter()
        match_shortlist(packed, packed, shortlist, settings)
        runs.append(time.perf_counter() - start)
    best, median = min(runs), float(np.median(runs))
    print(f"match_shortlist: {n} queries x B = {width}, {len(runs)} runs: best {best:.2f} s = {n * width / best:.0f} "
          f"pairs/s on one core ({best / (n * width) * 1000:.2f} ms a pair), median {n * width / median:.0f} pairs/s; "
          f"peak RSS {max_rss_mb():.0f} MB (after reading the photos {rss_before:.0f} MB)")
    if args.processes > 0:
        time_processes(packed, settings, args.processes, args.queries, width, args.seed)


_SHARED: dict = {}  # what forked workers read: features, shortlist, settings


def _match_slice(bounds: tuple[int, int]) -> np.ndarray:
    cv2.setNumThreads(1)
    queries, gallery, shortlist, settings = (_SHARED[k] for k in ("queries", "gallery", "shortlist", "settings"))
    return match_shortlist(queries, gallery, shortlist, settings, start=bounds[0], stop=bounds[1]).scores


def time_processes(packed: LocalFeatureSet, settings: MatchSettings, processes: int, queries: int, width: int,
                   seed: int) -> None:
    import multiprocessing

    rng = np.random.default_rng(seed)
    _SHARED.update(queries=[packed[i % len(packed)] for i in range(queries)], gallery=packed, settings=settings,
                   shortlist=np.stack([rng.choice(len(packed), width, replace=False) for _ in range(queries)]))
    edges = np.linspace(0, queries, processes + 1).round().astype(int)
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        parts = pool.map(_match_slice, list(zip(edges[:-1], edges[1:])))
    seconds = time.perf_counter() - start
    pairs = sum(part.size for part in parts)
    print(f"{processes} processes: {queries} queries x B = {width} ({pairs} pairs) in {seconds:.1f} s wall = "
          f"{pairs / seconds:.0f} pairs/s in all; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
