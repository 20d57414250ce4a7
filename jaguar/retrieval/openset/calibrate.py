"""Calibrating the new-individual decision on validation (`jaguar calibrate`).

Field photos include individuals the model never saw; a threshold on the best individual's score
tells them apart, and it is chosen here rather than guessed. Whole identities of the training
gallery are held out as "unseen" in several folds: each fold searches the validation images
(queries) against the training images of the identities kept, so validation images of held-out
identities are unknown queries and the rest known ones (validation identities absent from
training, as with data.val_split=identity, are unknown in every fold). Decisions are pooled over
the folds and the threshold and the per-individual aggregate ("max" or "mean_top<n>") maximising
the balanced accuracy of known and unknown queries are kept; AnimalCLEF 2025's figures (known and
unknown accuracy, their geometric mean) are reported with each fold's balanced accuracy as the
spread.

With local pattern evidence (`calibrate_run(local=...)`: the run's validation local features, made by
`jaguar match RUN --split val`), the score is the aggregate of fused image probabilities instead of
cosines, and the fusion weight is chosen with the aggregate and threshold on cross-fitted decisions
(jaguar.retrieval.openset.fused); without it everything here is as it was.

Group-aware: identities are held out in connected blocks, two identities joined when a
near-duplicate group of the run's split (the split record's "groups", written by a group-aware split)
holds images of both, so no held-out image has a near-duplicate left in the gallery. Without
recorded groups each identity is its own block (a group of one identity's images always moves
with that identity)."""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np

from jaguar.errors import JaguarError
from jaguar.core.features import FeatureSet
from jaguar.retrieval.openset.identify import AGGREGATES, gallery_from_features, individual_scores, training_features
from jaguar.core.evaluator import OpenSetFigures, open_set_figures, open_set_sweep
from jaguar.run import OpenSetCalibration, RunDir
from jaguar.run_records import DEFAULT_CALIBRATION_FOLDS as DEFAULT_FOLDS

log = logging.getLogger(__name__)

CURVE_POINTS = 200


class CalibrationError(JaguarError, ValueError):
    """Validation data that cannot calibrate an open-set decision; the message says what is lacking."""


def identity_blocks(train: FeatureSet, groups: Sequence[Sequence[str]], names_of: dict[str, str]) -> list[list[str]]:
    """The training identities in blocks that must be held out together: identities joined by a
    near-duplicate group (file names; `names_of` maps every file name to its identity) holding
    images of both. Blocks and their members are sorted."""
    identities = sorted({train.label_names.get(label, str(label)) for label in train.labelled().labels.tolist()})
    parent = {identity: identity for identity in identities}

    def root(identity: str) -> str:
        while parent[identity] != identity:
            parent[identity] = parent[parent[identity]]
            identity = parent[identity]
        return identity

    for group in groups:
        members = sorted({names_of[name] for name in group if names_of.get(name) in parent})
        for other in members[1:]:
            parent[root(other)] = root(members[0])
    blocks: dict[str, list[str]] = {}
    for identity in identities:
        blocks.setdefault(root(identity), []).append(identity)
    return sorted(blocks.values())


def assign_folds(blocks: list[list[str]], folds: int, seed: int) -> list[set[str]]:
    """`folds` disjoint sets of held-out identities: the blocks in a seeded random order dealt round
    robin (fold sizes differ by at most one block). Needs at least 2 blocks, so that every fold
    keeps an identity."""
    if len(blocks) < 2:
        raise CalibrationError(f"calibration holds out identities as unseen and needs at least 2 training "
                               f"identities (in separate near-duplicate blocks); found {len(blocks)}")
    folds = max(2, min(folds, len(blocks)))
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 0x0BE5])).permutation(len(blocks))
    held: list[set[str]] = [set() for _ in range(folds)]
    for position, block in enumerate(order.tolist()):
        held[position % folds].update(blocks[block])
    return held


def fold_decisions(train: FeatureSet, queries: FeatureSet, held_out: set[str],
                   aggregate: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(best score, best is right, is known) of each labelled query against the training
    features of the identities not `held_out`."""
    train = train.labelled()
    keep = [n for n, label in zip(train.names, train.labels.tolist())
            if train.label_names.get(label, str(label)) not in held_out]
    gallery = gallery_from_features(train.select(keep))
    scores = individual_scores(queries.embeddings, gallery, aggregate)
    best_score, best = scores.max(dim=1)
    truth = [queries.label_names.get(label, str(label)) for label in queries.labels.tolist()]
    known = np.array([name in gallery.individuals for name in truth], dtype=bool)
    right = np.array([gallery.individuals[b] == name for b, name in zip(best.tolist(), truth)], dtype=bool)
    return best_score.numpy().astype(np.float64), right, known


def choose_threshold(sweep: list[OpenSetFigures], scores: np.ndarray) -> float:
    """The threshold of the sweep's best balanced accuracy (the lowest such on ties), moved to the
    middle of the gap below it: every threshold in (previous score, chosen score] decides the
    validation queries alike, and the middle of that gap is the one least tied to them."""
    best = max(range(len(sweep)), key=lambda i: (round(sweep[i].balanced_accuracy, 12), -i))
    threshold = sweep[best].threshold
    below = scores[scores < threshold]
    if not below.size:
        return threshold
    middle = float((below.max() + threshold) / 2)
    # adjacent floats (the "everything new" threshold just above the top score) have no middle
    return middle if below.max() < middle <= threshold else threshold


def calibrate_features(train: FeatureSet, val: FeatureSet, groups: Sequence[Sequence[str]] = (),
                       folds: int = DEFAULT_FOLDS, seed: int = 0,
                       aggregates: Sequence[str] = AGGREGATES, local: Optional[tuple] = None) -> OpenSetCalibration:
    """Choose aggregate and threshold (module docstring) from labelled training and validation
    features. local: None for the global decision (the cosine), or (training LocalFeatureSet,
    validation LocalFeatureSet, jaguar.retrieval.openset.evidence.LocalEvidence) for the decision on
    the fused probability (jaguar.retrieval.openset.fused; the fusion weight chosen with the
    aggregate, see `_fused_choice`). Raises CalibrationError when validation has no labelled images
    or too few identities."""
    queries = val.labelled()
    if len(queries) == 0:
        raise CalibrationError("the validation features hold no labelled image; train with data.val_fraction > 0 "
                               "and extract the val split")
    shared = sorted(set(queries.names) & set(train.labelled().names))
    if shared:
        # each such query would find itself in the gallery: a known individual at similarity 1
        raise CalibrationError(f"{len(shared)} validation images are also in the training features "
                               f"(e.g. {', '.join(shared[:3])}), so they would match themselves; extract the train "
                               f"split with the run's split (`jaguar extract RUN --split train --force`, which "
                               f"leaves out the validation images of the run's split)")
    names_of = {n: train.label_names.get(label, str(label)) for n, label in zip(train.names, train.labels.tolist())}
    names_of.update({n: val.label_names.get(label, str(label)) for n, label in zip(val.names, val.labels.tolist())})
    blocks = identity_blocks(train, groups, names_of)
    held = assign_folds(blocks, folds, seed)
    joined = sum(len(block) > 1 for block in blocks)
    how = (f"{len(blocks)} blocks of identities, {joined} joined by shared near-duplicate groups" if groups
           else "whole identities (no near-duplicate groups recorded in the run's split)")
    decide = (lambda aggregate: [fold_decisions(train, queries, held_out, aggregate) for held_out in held])
    extra: dict = {}
    if local is None:
        tried = _sweep_aggregates(aggregates, decide)
    else:
        tried, extra = _fused_choice(train, queries, held, local, aggregates)
    chosen = max(aggregates, key=lambda a: (round(tried[a]["figures"].balanced_accuracy, 12),
                                            -list(aggregates).index(a)))
    figures, sweep = tried[chosen]["figures"], tried[chosen]["sweep"]
    step = max(1, len(sweep) // CURVE_POINTS)
    points = sweep[::step] + ([sweep[-1]] if (len(sweep) - 1) % step else [])
    curve = {key: [float(getattr(p, key)) for p in points]
             for key in ("threshold", "known_accuracy", "unknown_accuracy", "balanced_accuracy")}
    table = {a: {"threshold": v["figures"].threshold, "balanced_accuracy": v["figures"].balanced_accuracy,
                 "geometric_mean": v["figures"].geometric_mean, "known_rank1": v["figures"].known_rank1}
             for a, v in tried.items()}
    return OpenSetCalibration(
        figures=figures, aggregate=chosen, folds=len(held), fold_balanced=tried[chosen]["fold_balanced"],
        curve=curve, aggregates=table, held_out_groups=how, features=str(train.meta.get("source", "")), **extra)


def _sweep_aggregates(aggregates: Sequence[str], decide) -> dict[str, dict]:
    """For each aggregate: the pooled figures, sweep and fold balanced accuracies at the threshold
    `choose_threshold` picks from the folds' decisions `decide(aggregate)`."""
    tried: dict[str, dict] = {}
    for aggregate in aggregates:
        per_fold = decide(aggregate)
        scores, right, known = (np.concatenate([fold[i] for fold in per_fold]) for i in range(3))
        if not known.any() or known.all():
            raise CalibrationError(f"the validation images give {int(known.sum())} known and {int((~known).sum())} "
                                   f"unknown queries over the folds; both are needed (are the validation identities "
                                   f"also in training?)")
        sweep = open_set_sweep(scores, right, known)
        threshold = choose_threshold(sweep, scores)
        figures = open_set_figures(scores, right, known, threshold)
        # a fold without known or without unknown queries has no balanced accuracy (it would be NaN)
        fold_balanced = [open_set_figures(*fold, threshold).balanced_accuracy for fold in per_fold
                         if fold[2].any() and not fold[2].all()]
        tried[aggregate] = {"figures": figures, "sweep": sweep, "fold_balanced": fold_balanced}
        log.info("aggregate %s: threshold %.4f, balanced accuracy %.4f", aggregate, threshold, figures.balanced_accuracy)
    return tried


def _fused_choice(train: FeatureSet, queries: FeatureSet, held: list[set[str]], local: tuple,
                  aggregates: Sequence[str]) -> tuple[dict[str, dict], dict]:
    """The fused decision (jaguar.retrieval.openset.fused): every weight of DEFAULT_WEIGHTS with
    every aggregate on the cross-fitted validation decisions; the weight whose best aggregate has
    the highest pooled balanced accuracy is kept (ties: the larger global weight, the more
    conservative). Returns that weight's aggregates' results and the record's local fields."""
    from jaguar.retrieval.openset.fused import FusedFolds, fusion_model, local_inputs
    from jaguar.retrieval.post.fusion import DEFAULT_WEIGHTS

    train_local, val_local, evidence = local
    gallery_local, query_local = local_inputs(train_local, val_local, train.labelled(), queries)
    evidence.gallery = gallery_local
    folds = FusedFolds(train.labelled(), queries, held, query_local, evidence)
    log.info("local evidence: %d pairs matched (shortlist %d), calibrators %s", folds.matched_pairs,
             evidence.shortlist, "cross-fitted over the folds" if folds.cross_fitted else "fitted on every query")
    by_weight = {weight: _sweep_aggregates(aggregates, lambda a, w=weight: folds.decisions(w, a))
                 for weight in DEFAULT_WEIGHTS}
    balanced = {weight: max(v["figures"].balanced_accuracy for v in tried.values()) for weight, tried in by_weight.items()}
    weight = max(DEFAULT_WEIGHTS, key=lambda w: (round(balanced[w], 12), w))
    log.info("fusion weight %.1f (balanced accuracy %.4f; weight 1.0, global only: %.4f)", weight, balanced[weight],
             balanced[1.0])
    return by_weight[weight], {"local_evidence": True, "fusion": fusion_model(folds, weight).to_dict(),
                               "local_shortlist": evidence.shortlist,
                               "fusion_weights": {f"{w:.1f}": float(b) for w, b in balanced.items()}}


def calibrate_run(run: RunDir, folds: int = DEFAULT_FOLDS, local: Optional[bool] = None) -> OpenSetCalibration:
    """`jaguar calibrate`: calibrate on the run's training and validation features (each extracted
    first when missing, announced: extract.require_features) and the near-duplicate groups of its
    split; saves and returns the calibration.

    local: whether the decision uses local pattern evidence (the fused probability); None: when the
    run has the validation split's local features (`jaguar match RUN --split val` made them). With
    it, the validation and training local features are read (each extracted first when missing,
    announced: jaguar.retrieval.local.split_features.local_features)."""
    from jaguar.retrieval.openset.gallery import require_trained_run

    from jaguar.retrieval.extract import require_features

    require_trained_run(run)
    cfg = run.load_config()
    # val first: a zero-shot run records its split here, so the training features leave these images out
    val = require_features(run, "val", "jaguar calibrate")
    train = training_features(run, needed_by="jaguar calibrate")
    groups = run.load_split().groups if run.split_path.is_file() else []
    if local is None:
        local = run.local_features_path("val").is_file()
    evidence = None
    if local:
        from jaguar.retrieval.local.split_features import local_features
        from jaguar.retrieval.openset.evidence import LocalEvidence

        evidence = (local_features(run, "train", "jaguar calibrate"), local_features(run, "val", "jaguar calibrate"),
                    LocalEvidence.from_config(cfg, []))
    calibration = calibrate_features(train, val, groups, folds, cfg.run.seed, local=evidence)
    run.save_calibration(calibration)
    return calibration


def uninformative(calibration: OpenSetCalibration) -> str:
    """Why the calibrated decision does not tell known from new individuals ("" when it does): one
    side is never right (every photo gets the same decision), or the balanced accuracy is within one
    fold standard deviation of chance (0.5). A weak or collapsed model gives such a threshold."""
    spread = float(np.std(calibration.fold_balanced)) if calibration.fold_balanced else 0.0
    if min(calibration.figures.known_accuracy, calibration.figures.unknown_accuracy) == 0.0:
        side = "new individual" if calibration.figures.known_accuracy == 0.0 else "known"
        return (f"warning: this threshold calls every validation photo '{side}' (balanced accuracy "
                f"{calibration.figures.balanced_accuracy:.4f}, chance is 0.5): the model's scores do not separate known "
                f"from new individuals; train longer or on more identities before trusting `jaguar identify`")
    if calibration.figures.balanced_accuracy <= 0.5 + spread:
        return (f"warning: balanced accuracy {calibration.figures.balanced_accuracy:.4f} is within its fold spread "
                f"(+- {spread:.4f}) of chance (0.5): known / new decisions are not reliable with this model")
    return ""


def describe(calibration: OpenSetCalibration) -> str:
    """The calibration in a few lines, for the command line (with `uninformative`'s warning, if any)."""
    spread = float(np.std(calibration.fold_balanced)) if calibration.fold_balanced else float("nan")
    warning = uninformative(calibration)
    score = (f"fused probability (cosine and verified inliers against the top {calibration.local_shortlist}, "
             f"global weight {calibration.fusion['weight']:.1f})" if calibration.local_evidence and calibration.fusion
             else "score")
    return (f"new-individual threshold {calibration.figures.threshold:.4f} on the {calibration.aggregate} {score} "
            f"({calibration.folds} folds; {calibration.held_out_groups})\n"
            f"known accuracy {calibration.figures.known_accuracy:.4f} ({calibration.figures.num_known} known queries), "
            f"unknown accuracy {calibration.figures.unknown_accuracy:.4f} ({calibration.figures.num_unknown} unknown queries)\n"
            f"balanced accuracy {calibration.figures.balanced_accuracy:.4f} (fold spread +- {spread:.4f}), "
            f"geometric mean {calibration.figures.geometric_mean:.4f}, known rank-1 {calibration.figures.known_rank1:.4f}"
            + (f"\n{warning}" if warning else ""))

