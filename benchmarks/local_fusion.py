"""Global similarity, local evidence and their fusion on a trained run's validation and test splits,
before the pipeline does it (issue 23, phase 1): test identity-balanced mAP of the global cosine
similarity, of the local inlier count alone and of the fused probability, and time per stage.
Prints figures; not a test.

    python benchmarks/local_fusion.py --run RUN --raw RAW [--shortlist 50] [--size-note TEXT]

RUN: a run folder with features/val.safetensors and features/test.safetensors (`jaguar extract RUN
--split val` / `--split test`); RAW: the photos it was made from in the challenge layout
(train/, test/, test_labels.csv; e.g. from `jaguar synth`). Global scores are the raw cosine
similarities (no QE / re-ranking); each image's shortlist is its top --shortlist by them, self
excluded. Local features: RootSIFT on the RAW photos (the shards hold the same pixels when prep
did not shrink them). Calibrators and the fusion weight are fitted on validation
(`jaguar.retrieval.post.fusion.fit_fusion`, cross-fitted over 2 folds of identities) and applied
to test unchanged."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaguar.retrieval.local.keypoints import RootSIFTExtractor  # noqa: E402
from jaguar.retrieval.local.matching import MatchSettings, match_shortlist  # noqa: E402
from jaguar.core.evaluator import evaluate  # noqa: E402
from jaguar.retrieval.post.fusion import FusionModel, fit_fusion  # noqa: E402


def read_features(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, dict[int, str]]:
    """(names, L2-normalised embeddings, labels, label names) of a jaguar feature file."""
    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata()
        embeddings = handle.get_tensor("embeddings").astype(np.float64)
        labels = handle.get_tensor("labels").astype(np.int64)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    label_names = {int(k): v for k, v in json.loads(metadata.get("label_names", "{}")).items()}
    return json.loads(metadata["names"]), embeddings, labels, label_names


def shortlist_of(similarity: np.ndarray, width: int) -> np.ndarray:
    masked = similarity.copy()
    np.fill_diagonal(masked, -np.inf)
    return np.argsort(-masked, axis=1, kind="stable")[:, :width]


def local_scores(folder: Path, names: list[str], shortlist: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(local scores (N, B), seconds of extraction a photo, seconds of matching a pair)."""
    extractor = RootSIFTExtractor()
    start = time.perf_counter()
    features = [extractor.extract(cv2.cvtColor(cv2.imread(str(folder / name), cv2.IMREAD_UNCHANGED),
                                               cv2.COLOR_BGRA2RGBA)) for name in names]
    extract = (time.perf_counter() - start) / len(names)
    start = time.perf_counter()
    matches = match_shortlist(features, features, shortlist, MatchSettings())
    return matches.scores.astype(np.float64), extract, (time.perf_counter() - start) / shortlist.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--raw", type=Path, required=True)
    parser.add_argument("--shortlist", type=int, default=50)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    print(f"run {args.run}, photos {args.raw}; load average {os.getloadavg()[0]:.2f}, one thread")
    val_names, val_embeddings, val_labels, _ = read_features(args.run / "features" / "val.safetensors")
    test_names, test_embeddings, _, _ = read_features(args.run / "features" / "test.safetensors")
    with (args.raw / "test_labels.csv").open(newline="", encoding="utf-8") as handle:
        identity_of = {row["filename"]: row["ground_truth"] for row in csv.DictReader(handle)}
    test_labels = np.unique([identity_of[name] for name in test_names], return_inverse=True)[1]

    results = {}
    for split, names, embeddings, folder in (("val", val_names, val_embeddings, args.raw / "train"),
                                             ("test", test_names, test_embeddings, args.raw / "test")):
        similarity = embeddings @ embeddings.T
        shortlist = shortlist_of(similarity, min(args.shortlist, len(names) - 1))
        scores, extract, per_pair = local_scores(folder, names, shortlist)
        results[split] = (similarity, shortlist, scores)
        print(f"{split}: {len(names)} photos, B = {shortlist.shape[1]}; extraction {extract * 1000:.1f} ms a photo, "
              f"matching {per_pair * 1000:.2f} ms a pair")

    start = time.perf_counter()
    search = fit_fusion(results["val"][0], val_labels, results["val"][1], results["val"][2])
    print(f"fit_fusion on validation ({search.folds} fold(s)): {time.perf_counter() - start:.2f} s; "
          f"chosen weight of the global probability {search.model.weight:g}")
    print("validation, by weight: "
          + ", ".join(f"{row['weight']:g}: {row['mAP_balanced']:.3f}" for row in search.table()))
    similarity, shortlist, scores = results["test"]
    model = search.model
    local_only = FusionModel(model.global_calibrator, model.local_calibrator, 0.0)
    rows = [("global (cosine)", similarity),
            ("local only (val calibration, w = 0)", local_only.fuse_dense(similarity, shortlist, scores)),
            (f"fused (w = {model.weight:g})", model.fuse_dense(similarity, shortlist, scores))]
    print("test (all-vs-all, self excluded), identity-balanced mAP / rank-1:")
    for label, matrix in rows:
        figures = evaluate(matrix, test_labels, kind="similarity")
        print(f"  {label:<40} {figures.mAP_balanced:.4f} / {figures.rank1:.3f}")


if __name__ == "__main__":
    main()
