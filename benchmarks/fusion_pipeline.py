"""The fusion of the global similarity with local pattern evidence through the pipeline (issue 23,
phase 2): on a copy of a trained run, each split's shortlist matches (RUN/local/<split>.safetensors),
then tune-post (its local only and fused rows, chosen on validation), submit and score, and the test
identity-balanced mAP of the global pipeline beside local only and fused. Prints figures; not a test.

    python benchmarks/fusion_pipeline.py --run RUN --test-csv RAW/test.csv --test-labels RAW/test_labels.csv \
        [--shortlist 50] [--work DIR]

RUN: a trained run with features/val.safetensors and features/test.safetensors (`jaguar extract`)
whose config names its shards (data.shards). The run is copied to --work (default: a temporary
folder; checkpoints, TensorBoard and report left out) and nothing in RUN changes. A split whose copy
already has RUN/local/<split>.safetensors (`jaguar match RUN --split SPLIT`) keeps it; otherwise its
matches are made here as `jaguar match` makes them: local features of the shards' images with the
run's retrieval.local settings (RootSIFT by default), each image's top --shortlist other images by
raw cosine (jaguar.core.knn, self excluded), matched and verified (match_shortlist), one process."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaguar.config import RetrievalConfig  # noqa: E402
from jaguar.core.knn import knn  # noqa: E402
from jaguar.report.grids import ImageLookup  # noqa: E402
from jaguar.retrieval.local.configured import make_extractor, make_matcher  # noqa: E402
from jaguar.retrieval.local.matching import MatchSettings, match_shortlist  # noqa: E402
from jaguar.retrieval.local.store import SplitMatches  # noqa: E402
from jaguar.retrieval.post.search import score_setting, tuning_space  # noqa: E402
from jaguar.retrieval.post.tune import format_stage_table, tune_post_run  # noqa: E402
from jaguar.retrieval.score import labelled_test_features, score_run  # noqa: E402
from jaguar.retrieval.submission import submit_run  # noqa: E402
from jaguar.run import RunDir  # noqa: E402


def make_matches(run: RunDir, split: str, width: int) -> None:
    """RUN/local/<split>.safetensors from the shards' images, timed."""
    config = run.load_config()
    features = run.load_features(split)
    images = ImageLookup(Path(config.data.shards))
    extractor, matcher = make_extractor(config.retrieval.local, "cpu"), make_matcher(config.retrieval.local, "cpu")
    start = time.perf_counter()
    local = [extractor.extract(np.asarray(images.get(name).convert("RGBA"))) for name in features.names]
    extract = time.perf_counter() - start
    width = min(width, len(features) - 1)
    shortlist = knn(features.embeddings, k=width, exclude_self=True).index.numpy().astype(np.int64)
    start = time.perf_counter()
    matches = match_shortlist(local, local, shortlist, MatchSettings.from_config(config.retrieval.local),
                              matcher=matcher)
    match = time.perf_counter() - start
    SplitMatches(list(features.names), shortlist, matches, {"B": width, "made_by": "benchmarks/fusion_pipeline.py"}
                 ).save(run.local_matches_path(split))
    keypoints = np.mean([len(f) for f in local])
    print(f"{split}: {len(features)} images, {keypoints:.0f} keypoints an image, B = {width}: extraction "
          f"{extract / len(features) * 1000:.1f} ms an image, matching {match / shortlist.size * 1000:.2f} ms a pair "
          f"({shortlist.size} pairs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--test-csv", type=Path, required=True)
    parser.add_argument("--test-labels", type=Path, required=True)
    parser.add_argument("--shortlist", type=int, default=50)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    import cv2

    cv2.setNumThreads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="fusion_pipeline_"))
    run = RunDir(work / "run")
    if not run.path.exists():
        shutil.copytree(args.run, run.path, ignore=shutil.ignore_patterns("checkpoints", "tb", "report", "local"))
    print(f"run {args.run} copied to {run.path}; load average {os.getloadavg()[0]:.2f}")
    for split in ("val", "test"):
        if not run.local_matches_path(split).is_file():
            run.local_dir.mkdir(exist_ok=True)
            make_matches(run, split, args.shortlist)
    start = time.perf_counter()
    post = tune_post_run(run)
    print(f"tune-post with fusion: {time.perf_counter() - start:.1f} s; validation ({post.val_size} images):")
    print(format_stage_table(post.table))
    fusion = post.fusion
    if fusion is not None:
        print(f"fusion: weight of the global probability {fusion.model['weight']:g}, B = {fusion.shortlist}, "
              f"{fusion.folds} fold(s), adopted: {fusion.adopted}; validation by weight: "
              + ", ".join(f"{row['weight']:g}: {row['mAP_balanced']:.3f}" for row in fusion.by_weight))
    submit_run(run, args.test_csv)
    score, table = score_run(run, args.test_csv, args.test_labels)
    test = labelled_test_features(run, args.test_labels)
    config = run.load_config().retrieval if run.has_config() else RetrievalConfig()
    global_chosen = score_setting(tuning_space(test, test.labels, config), post.chosen)
    print(f"test ({len(test)} labelled images), identity-balanced mAP:")
    for row in table.table:
        print(f"  {row.label():<60} {row.mAP_balanced:.4f}")
    print(f"  {'global pipeline (chosen global setting: ' + post.chosen.describe() + ')':<60} "
          f"{global_chosen.mAP_balanced:.4f}")
    print(f"  {'submission (the chosen setting' + (', fused' if post.fuses else '') + ')':<60} "
          f"{score.mAP_balanced:.4f}")


if __name__ == "__main__":
    main()
