"""Ensembles of runs: combine several runs' features, image by image (matched by name), into a new
run folder that the usual post-processing, submission and report stages then treat as any run.

Two ways to combine L2-normalised embeddings e_i with weights w_i (summing to 1 after scaling):

- mean: e = normalise(sum_i w_i e_i). Needs equal widths; it is what "average the embeddings"
  means when the runs share one embedding space (e.g. checkpoints or seeds of one recipe).
- concat: e = normalise([sqrt(w_1) e_1, ..., sqrt(w_n) e_n]). Any widths; since every block is
  unit-length, cos(e, e') = sum_i w_i cos(e_i, e'_i): exactly the weighted mean of the runs'
  cosine similarities, which is the meaningful combination for unrelated backbones.

mode "auto" takes mean when all widths are equal and concat otherwise. Either way an ensemble of
a run with itself reproduces that run's embeddings, so its similarities and rankings too.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import torch

from jaguar.errors import JaguarError
from jaguar.io import atomic_write_bytes, atomic_write_json
from jaguar.retrieval.features import FeatureSet

logger = logging.getLogger(__name__)

MODES = ("auto", "mean", "concat")
SPLITS = ("train", "val", "test")


class EnsembleError(JaguarError, ValueError):
    """An ensemble that cannot be built as asked; the message says which run or value is at fault."""


def _check_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise EnsembleError(f"{len(weights)} weight(s) given for {count} run(s); give one weight per run")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise EnsembleError(f"weights must be finite, non-negative and not all zero, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def resolve_mode(widths: Sequence[int], mode: str) -> str:
    if mode not in MODES:
        raise EnsembleError(f"ensemble mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "auto":
        return "mean" if len(set(widths)) == 1 else "concat"
    if mode == "mean" and len(set(widths)) != 1:
        raise EnsembleError(f"mode 'mean' needs equal embedding widths, got {list(widths)}; "
                            f"use mode 'concat' (or 'auto')")
    return mode


def combine_features(feature_sets: Sequence[FeatureSet], weights: Sequence[float] | None = None,
                     mode: str = "auto") -> FeatureSet:
    """One feature set from several (see the module docstring), over the images they all hold, in
    the first set's order; labels and label names come from the first set."""
    if not feature_sets:
        raise EnsembleError("an ensemble needs at least one feature set")
    normalised_weights = _check_weights(weights, len(feature_sets))
    first = feature_sets[0]
    shared = set(first.names)
    for other in feature_sets[1:]:
        shared &= set(other.names)
    names = [n for n in first.names if n in shared]
    if not names:
        raise EnsembleError("the runs' feature sets have no image name in common; were they extracted "
                            "from the same shards?")
    dropped = len(first) - len(names)
    if dropped:
        logger.warning("%d image(s) of the first run are missing from another run and are left out", dropped)
    aligned = [fs.select(names).normalized() for fs in feature_sets]
    for fs in aligned[1:]:
        known = (fs.labels >= 0) & (aligned[0].labels >= 0)
        if not torch.equal(fs.labels[known], aligned[0].labels[known]):
            raise EnsembleError("the runs disagree on the labels of some images; ensemble runs trained on "
                                "the same shards (the same label space)")
    chosen = resolve_mode([fs.embeddings.shape[1] for fs in aligned], mode)
    if chosen == "mean":
        embedding = sum(w * fs.embeddings for w, fs in zip(normalised_weights, aligned))
    else:
        embedding = torch.cat([math.sqrt(w) * fs.embeddings for w, fs in zip(normalised_weights, aligned)], dim=1)
    embedding = torch.nn.functional.normalize(embedding, dim=1)
    meta = {"ensemble": {"mode": chosen, "weights": normalised_weights,
                         "members": [fs.meta for fs in feature_sets]},
            "split": first.meta.get("split")}
    return FeatureSet(names, embedding, aligned[0].labels.clone(), dict(first.label_names), meta)


def ensemble_runs(run_dirs: Sequence[str | Path], out_dir: str | Path,
                  weights: Sequence[float] | None = None, mode: str = "auto") -> list[str]:
    """Write OUT/features/<split>.safetensors for every split all runs have, OUT/config.yaml (the
    first run's) and OUT/ensemble.json; return the splits written."""
    run_dirs = [Path(r) for r in run_dirs]
    out_dir = Path(out_dir)
    if not run_dirs:
        raise EnsembleError("give at least one run folder to ensemble")
    for run in run_dirs:
        if not (run / "features").is_dir():
            raise FileNotFoundError(f"run {run} has no features/ folder; run `jaguar extract {run}` first")
        if run.resolve() == out_dir.resolve():
            raise EnsembleError(f"the output folder {out_dir} is also a member run; choose another -o")
    normalised_weights = _check_weights(weights, len(run_dirs))
    splits = [s for s in SPLITS if all((r / "features" / f"{s}.safetensors").is_file() for r in run_dirs)]
    if not splits:
        raise FileNotFoundError(f"no split ({', '.join(SPLITS)}) has features in every run "
                                f"({', '.join(map(str, run_dirs))}); run `jaguar extract` on each")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in splits:
        sets = [FeatureSet.load(r / "features" / f"{split}.safetensors") for r in run_dirs]
        combined = combine_features(sets, normalised_weights, mode)
        combined.save(out_dir / "features" / f"{split}.safetensors")
        written[split] = {"images": len(combined), "dim": int(combined.embeddings.shape[1]),
                          "mode": combined.meta["ensemble"]["mode"]}
    config = run_dirs[0] / "config.yaml"
    if config.is_file():
        # the ensemble's post-processing and report read data.shards and retrieval settings from here
        atomic_write_bytes(out_dir / "config.yaml", config.read_bytes())
    atomic_write_json(out_dir / "ensemble.json", {
        "members": [str(r.resolve()) for r in run_dirs],
        "weights": normalised_weights,
        "mode": mode,
        "splits": written,
        "config_from": str(config.resolve()) if config.is_file() else None,
    })
    logger.info("ensemble of %d runs written to %s (%s)", len(run_dirs), out_dir, ", ".join(splits))
    return splits
