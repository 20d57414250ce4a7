"""`jaguar diagnose`: does a trained model recognise the coat, or the background, the silhouette,
the mirror image? After Rueda-Toicen et al. 2026, "Are We Recognizing the Jaguar or Its Background?
A Diagnostic Framework for Jaguar Re-Identification" (arXiv 2604.09690), on two axes:

- context: identity-balanced mAP of the split searched against itself on foreground-only,
  background-only and silhouette-only images (jaguar.data.variants), each beside its chance level
  (the expected score of a random ranking), and the context ratio background / foreground;
- laterality: mirror self-similarity (the cosine between an image's embedding and its mirror
  image's, both without flip TTA), and, where the data set has a viewpoint column, retrieval
  restricted to same-flank and to cross-flank candidates.

Everything goes through the one extraction path (the run's eval loader and transforms, the variants
made before them; `embed_batches` with the run's flip TTA and scales), the one evaluator
(jaguar.core.evaluator) and the run's own features of the split for the original images (which
must be up to date: nothing is extracted twice). Figures are raw cosine retrieval, without QE or
re-ranking. The result is a `Diagnosis`, written through RunDir."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from jaguar.data.loader import build_eval_loader
from jaguar.data.variants import VariantSplit, variant_maker
from jaguar.errors import JaguarError
from jaguar.formats import UNKNOWN_VIEWPOINT
from jaguar.core.embedding import load_embedder
from jaguar.retrieval.extract import extraction_key, split_positions
from jaguar.core.embedding import autocast_for, embed_batches
from jaguar.core.evaluator import MetricsError, chance_map_balanced, evaluate
from jaguar.run import Diagnosis, RunDir
from jaguar.run_records import DiagnosisRow, MirrorSimilarity

log = logging.getLogger(__name__)

CONTEXT_VARIANTS = (("foreground", "foreground only"), ("background", "background only"),
                    ("silhouette", "silhouette only"))
HISTOGRAM_EDGES = [round(-1.0 + 0.05 * i, 2) for i in range(41)]  # cosine bins of the mirror histogram
SCALE_SAMPLE = 2000  # images the same/other-identity cosine means are taken over (an N x N pass)


class DiagnoseError(JaguarError, ValueError):
    """A run or split that cannot be diagnosed; the message names what is missing and the command."""


def retrieval_row(name: str, embeddings: torch.Tensor, labels: torch.Tensor,
                  candidates: Optional[np.ndarray] = None) -> DiagnosisRow:
    """Identity-balanced mAP of N L2-normalised embeddings (N x D) searched against themselves by
    cosine (the evaluator's `evaluate`, restricted to `candidates`, N x N bool, when given) and its
    chance level (`chance_map_balanced`). No query with a match: the figures are None, with why."""
    scores = embeddings @ embeddings.T
    try:
        figures = evaluate(scores, labels, kind="similarity", candidates=candidates)
    except MetricsError as err:
        return DiagnosisRow(name, None, None, 0, str(err))
    return DiagnosisRow(name, figures.mAP_balanced, chance_map_balanced(labels, candidates), figures.num_queries)


def flank_rows(embeddings: torch.Tensor, labels: torch.Tensor, viewpoints: Sequence[str]) -> list[DiagnosisRow]:
    """Same-flank and cross-flank retrieval: each query with a known flank (left or right) searches
    only the images of the same flank, then only those of the other flank; images of unknown flank
    are neither queries nor candidates."""
    views = np.asarray(viewpoints)
    known = views != UNKNOWN_VIEWPOINT
    both = known[:, None] & known[None, :]
    same = both & (views[:, None] == views[None, :])
    return [retrieval_row("same flank", embeddings, labels, same),
            retrieval_row("cross flank", embeddings, labels, both & ~same)]


def mirror_similarity(plain: torch.Tensor, mirror: torch.Tensor, labels: torch.Tensor) -> MirrorSimilarity:
    """Figures of the cosines between each image's embedding (`plain`, N x D, L2-normalised) and its
    mirror image's (`mirror`), with the mean cosine of an image to the other images of its identity
    and to other identities for scale."""
    cosine = (plain * mirror).sum(dim=1).double().numpy()
    if len(labels) > SCALE_SAMPLE:  # the scale figures from a fixed sample: no N x N at gallery scale
        keep = torch.from_numpy(np.sort(np.random.default_rng(0).choice(len(labels), SCALE_SAMPLE, replace=False)))
        plain, labels = plain[keep], labels[keep]
    pairs = (plain @ plain.T).double().numpy()
    same = (labels[:, None] == labels[None, :]).numpy() & ~np.eye(len(labels), dtype=bool)
    other = (labels[:, None] != labels[None, :]).numpy()
    counts, _ = np.histogram(np.clip(cosine, -1.0, 1.0), bins=HISTOGRAM_EDGES)
    return MirrorSimilarity(
        mean=float(cosine.mean()), median=float(np.median(cosine)), p10=float(np.quantile(cosine, 0.1)),
        p90=float(np.quantile(cosine, 0.9)), histogram_edges=list(HISTOGRAM_EDGES),
        histogram_counts=[int(c) for c in counts],
        same_identity_mean=float(pairs[same].mean()) if same.any() else float("nan"),
        other_identity_mean=float(pairs[other].mean()) if other.any() else float("nan"))


def context_ratios(rows: list[DiagnosisRow]) -> tuple[Optional[float], Optional[float]]:
    """(background / foreground mAP, the same with chance subtracted from each) of the context rows;
    None where the foreground figure is missing or not above chance."""
    by_name = {row.name: row for row in rows}
    fore, back = by_name["foreground only"], by_name["background only"]
    if fore.mAP_balanced is None or back.mAP_balanced is None or fore.mAP_balanced <= 0:
        return None, None
    ratio = back.mAP_balanced / fore.mAP_balanced
    margin = fore.mAP_balanced - fore.chance
    return ratio, ((back.mAP_balanced - back.chance) / margin if margin > 0 else None)


def diagnose_run(run: RunDir, split_name: str = "val", checkpoint: str | Path | None = None,
                 progress: bool = False, force: bool = False) -> Diagnosis:
    """Diagnose `split_name` (val or test) of a trained run with its checkpoint (`checkpoint`, else
    best, else the newest), write the Diagnosis into the run (RunDir.save_diagnosis) and return it.
    A diagnosis of the same features (same extraction key) is returned as it is, unless `force`.
    Raises DiagnoseError when the split's features are missing or stale (extracted with other
    weights or settings) or its images have no identities; MissingInputError for a missing run,
    config or checkpoint."""
    if split_name not in ("val", "test"):
        raise DiagnoseError(f"split {split_name!r} cannot be diagnosed; choose val or test")
    run.require()
    cfg = run.load_config()
    weights = Path(checkpoint) if checkpoint else run.default_checkpoint()
    split, positions = split_positions(cfg, run, split_name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = autocast_for(device)
    key = extraction_key(cfg, split_name, split, positions, weights, autocast)
    features = run.load_features(split_name)
    if features.meta.get("key") != key:
        raise DiagnoseError(f"{run.features_path(split_name)} was extracted with other weights, images or settings "
                            f"than {weights} and {run.config_path.name}; run `jaguar extract {run} --split "
                            f"{split_name}` (with the same --checkpoint) first")
    if not force and run.has_diagnosis(split_name):
        done = run.load_diagnosis(split_name)
        if done.key == key:
            log.info("%s is up to date; nothing to do (--force recomputes)", run.diagnosis_path(split_name))
            return done
    labels = features.labels
    if bool((labels < 0).any()):
        raise DiagnoseError(f"{int((labels < 0).sum())} {split_name} image(s) have no identity (label -1): "
                            f"diagnose needs labelled images (the test split is labelled when prep read "
                            f"a test_labels.csv); use --split val")
    model = load_embedder(cfg, weights, None, device)
    source = model.source
    fill = tuple(int(round(255 * float(v))) for v in model.mean)  # the fill Normalize maps to zero
    retrieval = cfg.retrieval

    def embed(source_split, flip_tta: bool, desc: str) -> torch.Tensor:
        loader = build_eval_loader(cfg, source_split, positions, tuple(model.mean), tuple(model.std))
        return embed_batches(model.embed, loader, device, flip_tta, retrieval.scales, autocast, progress, desc)[1]

    context = [retrieval_row("original", features.embeddings, labels)]
    for variant, name in CONTEXT_VARIANTS:
        variant_split = VariantSplit(split, variant_maker(variant, fill))
        context.append(retrieval_row(name, embed(variant_split, retrieval.flip_tta, f"diagnose {variant}"), labels))
    plain = embed(split, False, "diagnose plain") if retrieval.flip_tta else features.embeddings
    mirror = embed(VariantSplit(split, variant_maker("mirrored", fill)), False, "diagnose mirrored")
    ratio, above_chance = context_ratios(context)
    viewpoints = features.viewpoints
    diagnosis = Diagnosis(
        split=split_name, images=len(features), identities=len(set(labels.tolist())), features=source,
        flip_tta=retrieval.flip_tta, context=context, context_ratio=ratio, context_ratio_above_chance=above_chance,
        mirror=mirror_similarity(plain, mirror, labels),
        flanks=flank_rows(features.embeddings, labels, viewpoints) if viewpoints is not None else [],
        viewpoint_counts=dict(sorted(Counter(viewpoints).items())) if viewpoints is not None else {}, key=key)
    run.save_diagnosis(diagnosis)
    log.info("wrote %s", run.diagnosis_path(split_name))
    return diagnosis


def _figure(value: Optional[float]) -> str:
    return "  n/a" if value is None else f"{value:.3f}"


def summary_lines(diagnosis: Diagnosis) -> list[str]:
    """The figures of a Diagnosis as printed lines (what `jaguar diagnose` prints)."""
    lines = [f"{diagnosis.split}: {diagnosis.images} images of {diagnosis.identities} identities, weights "
             f"{diagnosis.features}, flip TTA {'on' if diagnosis.flip_tta else 'off'}",
             "context: identity-balanced mAP (cosine, no QE/re-ranking)      mAP   chance  queries"]
    for row in diagnosis.context:
        lines.append(f"  {row.name:<58} {_figure(row.mAP_balanced)}  {_figure(row.chance)}  {row.num_queries:>6}")
    lines.append(f"  context ratio background / foreground: {_figure(diagnosis.context_ratio)} "
                 f"(above chance: {_figure(diagnosis.context_ratio_above_chance)})")
    mirror = diagnosis.mirror
    lines.append(f"laterality: mirror self-similarity (cosine of an image and its mirror, no flip TTA): median "
                 f"{mirror.median:.3f}, 10-90% {mirror.p10:.3f}-{mirror.p90:.3f}; for scale, same identity "
                 f"{mirror.same_identity_mean:.3f}, other identities {mirror.other_identity_mean:.3f}")
    if diagnosis.flanks:
        counts = ", ".join(f"{view} {count}" for view, count in diagnosis.viewpoint_counts.items())
        lines.append(f"  flank retrieval ({counts}):                               mAP   chance  queries")
        for row in diagnosis.flanks:
            lines.append(f"    {row.name:<56} {_figure(row.mAP_balanced)}  {_figure(row.chance)}  "
                         f"{row.num_queries:>6}" + (f"  ({row.note})" if row.note else ""))
    else:
        lines.append("  no viewpoint column in the data: same- vs cross-flank retrieval not measured")
    return lines
