"""Ensembles of runs: combine several runs' features, image by image (matched by name), into a new
run folder that the usual post-processing, submission, score and report stages then treat as any
run (`ensemble_run` runs them in turn).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from jaguar.errors import JaguarError, MissingInputError
from jaguar.report import build_report
from jaguar.core.features import FeatureSet
from jaguar.retrieval.post.tune import tune_post_run
from jaguar.retrieval.score import score_run
from jaguar.retrieval.submission import SubmitResult, submit_run
from jaguar.run import SPLITS, EnsembleRecord, PostResult, RunDir, Score

logger = logging.getLogger(__name__)

MODES = ("auto", "mean", "concat")


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
    return FeatureSet(names, embedding, aligned[0].labels.clone(), dict(first.label_names), meta,
                      aligned[0].viewpoints)


def ensemble_runs(run_dirs: Sequence[str | Path | RunDir], out_dir: str | Path | RunDir,
                  weights: Sequence[float] | None = None, mode: str = "auto") -> list[str]:
    """Write the ensemble run's features for every split all runs have, its config (the first
    run's: the ensemble's post-processing and report read data.shards and the retrieval settings
    from it) and its ensemble record; return the splits written."""
    runs = [r if isinstance(r, RunDir) else RunDir(r) for r in run_dirs]
    out = out_dir if isinstance(out_dir, RunDir) else RunDir(out_dir)
    if not runs:
        raise EnsembleError("give at least one run folder to ensemble")
    for run in runs:
        if not run.feature_splits():
            raise MissingInputError(f"run {run} has no features in {run.features_dir}; "
                                    f"run `jaguar extract {run}` first")
        if run.path.resolve() == out.path.resolve():
            raise EnsembleError(f"the output folder {out} is also a member run; choose another -o")
    normalised_weights = _check_weights(weights, len(runs))
    splits = [s for s in SPLITS if all(r.has_features(s) for r in runs)]
    if not splits:
        raise MissingInputError(f"no split ({', '.join(SPLITS)}) has features in every run "
                                f"({', '.join(map(str, runs))}); run `jaguar extract` on each")
    written = {}
    for split in splits:
        combined = combine_features([r.load_features(split) for r in runs], normalised_weights, mode)
        out.save_features(split, combined)
        written[split] = {"images": len(combined), "dim": int(combined.embeddings.shape[1]),
                          "mode": combined.meta["ensemble"]["mode"]}
    config_from = runs[0] if runs[0].has_config() else None
    if config_from is not None:
        out.save_config(config_from.load_config())
    out.save_ensemble(EnsembleRecord(
        members=[str(r.path.resolve()) for r in runs], weights=normalised_weights, mode=mode, splits=written,
        config_from=str(config_from.config_path.resolve()) if config_from is not None else None))
    logger.info("ensemble of %d runs written to %s (%s)", len(runs), out, ", ".join(splits))
    return splits


@dataclass
class EnsembleOutcome:
    """What `ensemble_run` wrote: the splits combined and each later stage's result (None when
    the stage did not run)."""
    splits: list[str]
    post: Optional[PostResult] = None
    submission: Optional[SubmitResult] = None
    score: Optional[Score] = None
    report: Optional[Path] = None


def ensemble_run(run_dirs: Sequence[str | Path | RunDir], out_dir: str | Path | RunDir,
                 weights: Sequence[float] | None = None, mode: str = "auto",
                 test_csv: str | Path | None = None, test_labels: str | Path | None = None,
                 features_only: bool = False) -> EnsembleOutcome:
    """Combine the runs (ensemble_runs), then treat the ensemble as any run: tune its
    post-processing when every run has validation features, write its submission (with
    `test_csv`), score it (with `test_labels` too) and write its report."""
    out = out_dir if isinstance(out_dir, RunDir) else RunDir(out_dir)
    outcome = EnsembleOutcome(ensemble_runs(run_dirs, out, weights=weights, mode=mode))
    if features_only:
        return outcome
    if "val" in outcome.splits:
        outcome.post = tune_post_run(out)
    else:
        logger.warning("no validation features in every run: post-processing is not tuned for the ensemble")
    if test_csv:
        outcome.submission = submit_run(out, test_csv)
        if test_labels:
            outcome.score, _ = score_run(out, test_csv, test_labels)
    outcome.report = build_report(out, test_labels=test_labels)
    return outcome
