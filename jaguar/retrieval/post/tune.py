"""tune-post: the post-processing of a run chosen on its validation features by identity-balanced mAP
(QE/DBA, then k-reciprocal re-ranking and its blend with the raw distance, then, when the split has
local matches, the calibrated fusion with local pattern evidence), each stage adopted only when its
gain clears `retrieval.tune_min_gain_se` standard errors, in whichever space
jaguar.retrieval.post.search gives the set (N x N or top-M lists); and the stage table it writes to
the run (post.json) and prints."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from jaguar.config import Config, PostConfig, RetrievalConfig
from jaguar.core.evaluator import RetrievalMetrics
from jaguar.core.features import FeatureSet
from jaguar.errors import JaguarError
from jaguar.retrieval.post.fusion import FusionError, FusionModel
from jaguar.retrieval.post.local_evidence import LocalEvidence, load_local_evidence
from jaguar.retrieval.post.search import fit_setting_fusion, score_setting, tuning_space
from jaguar.retrieval.post.space import BLENDS, DBA_KS, K1S, K2S, LAMBDAS, QE_ALPHAS, QE_KS, SearchSpace
from jaguar.run import FusionRecord, PostResult, RunDir, StageRow

logger = logging.getLogger(__name__)


@dataclass
class Gain:
    """A candidate's identity-balanced mAP gain over the incumbent and its standard error: the
    mean and the standard error of the paired per-identity AP differences."""
    gain: float
    se: float
    identities: int

    def clears(self, min_se: float) -> bool:
        """Adopt the candidate: it gains, by more than min_se standard errors."""
        return self.gain > 0 and self.gain > min_se * self.se

    def describe(self) -> str:
        return f"{_gain_text(self.gain, self.se)} (SE over {self.identities} identities)"


def _gain_text(gain: float, se: float) -> str:
    return f"{gain:+.4f} +- {se:.4f}"


def identity_gain(new: dict[int, float], old: dict[int, float]) -> Gain:
    """Gain of per-identity APs `new` over `old` (the same identities): mean and standard error
    of the paired differences; with one identity the standard error is taken as 0."""
    diff = np.array([new[k] - old[k] for k in sorted(old)])
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return Gain(float(diff.mean()), se, len(diff))


def _decide(stage: str, gain: Gain, min_se: float, row: dict[str, Any]) -> bool:
    adopted = gain.clears(min_se)
    row.update(gain=gain.gain, gain_se=gain.se, adopted=adopted)
    if not adopted:
        logger.info("%s: validation gain %s is not above %.1f standard error(s); not adopted",
                    stage, gain.describe(), min_se)
    return adopted


def tune_post(val_features: FeatureSet, base: RetrievalConfig,
              search: bool = True) -> tuple[PostConfig, list[dict[str, Any]]]:
    """Choose QE, re-ranking and blend on the validation split (labelled features N x D) by
    identity-balanced mAP: `search_post` in the set's tuning space (N x N, or top-M lists with
    M = base.top_m, as jaguar.retrieval.post.search decides). Returns the chosen setting and the
    stage table (dicts: name, figures, config, gain, gain_se, adopted). ValueError when a label is
    unknown (-1)."""
    space = tuning_space(val_features, _labelled(val_features), base)
    return space.run(search_post, base, search)


def _labelled(val_features: FeatureSet) -> torch.Tensor:
    if bool((val_features.labels < 0).any()):
        raise ValueError("validation features have unknown labels (-1); tuning needs labelled images")
    return val_features.labels


def _row(name: str, metrics: RetrievalMetrics, post: PostConfig) -> dict[str, Any]:
    return {"name": name, **metrics.summary(), "config": post.to_dict()}


def search_post(space: SearchSpace, base: RetrievalConfig,
                search: bool = True) -> tuple[PostConfig, list[dict[str, Any]]]:
    """The tune-post search, whatever the space. Stages, each built on what the previous one
    adopted: QE/DBA grid -> re-ranking (k1, k2, lambda at blend 1, then the blend weight w).
    Within a stage a candidate must beat the best so far strictly, so on equal scores the simpler
    setting (earlier in the grid) wins. A stage's best is then adopted only when its gain over the
    setting before it exceeds `base.tune_min_gain_se` standard errors of the paired per-identity
    AP differences: a search over dozens of settings on a few hundred images finds gains that are
    noise, and a validation set of a dozen identities cannot tell a 0.05 gain from chance (0
    adopts any gain). With search=False the settings of `base` are evaluated and returned as they
    are. The table holds raw, +QE, +re-ranking (each stage's best) and the chosen setting side by
    side, with each stage's gain, its standard error and whether it was adopted."""
    n = space.embeddings.shape[0]
    raw_post = PostConfig(rerank=False)
    raw_metrics = space.metrics(space.expanded(0, 0.0, 0)[1])
    table = [_row("raw", raw_metrics, raw_post)]
    if not search:
        chosen = dataclasses.replace(base.post)
        qe_post = dataclasses.replace(raw_post, qe_k=chosen.qe_k, qe_alpha=chosen.qe_alpha, dba_k=chosen.dba_k)
        for name, post in (("+QE", qe_post), ("+re-ranking", dataclasses.replace(chosen, rerank=True, blend=1.0)),
                           ("blend (chosen)", chosen)):
            table.append(_row(name, space.metrics(space.final(post)), post))
        return chosen, table

    min_se = float(base.tune_min_gain_se)
    best_qe, best_qe_metrics, best_expanded = raw_post, raw_metrics, space.embeddings
    for qe_k, alpha, dba_k in itertools.product(QE_KS, QE_ALPHAS, DBA_KS):
        if (qe_k == 0 and dba_k == 0) or (alpha and max(qe_k, dba_k) == 0):
            continue
        if dba_k == 0 and qe_k in DBA_KS:
            continue  # all-vs-all, QE of k is DBA of k: the same expansion, scored earlier in the grid
        expanded, candidate = space.expanded(qe_k, alpha, dba_k)
        metrics = space.metrics(candidate)
        if metrics.mAP_balanced > best_qe_metrics.mAP_balanced:
            best_qe, best_qe_metrics, best_expanded = PostConfig(qe_k=qe_k, qe_alpha=alpha, dba_k=dba_k), metrics, expanded
    table.append(_row("+QE", best_qe_metrics, best_qe))
    # The incumbent: what the stages so far adopted.
    chosen, chosen_metrics, chosen_row, base_embeddings = raw_post, raw_metrics, table[0], space.embeddings
    if _decide("+QE", identity_gain(best_qe_metrics.per_identity_ap, raw_metrics.per_identity_ap), min_se,
               table[-1]):
        chosen, chosen_metrics, chosen_row, base_embeddings = best_qe, best_qe_metrics, table[-1], best_expanded

    best_rr, best_rr_metrics, best_terms = None, None, None
    for k1, k2 in itertools.product(K1S, K2S):
        if k1 >= n or k2 >= n:
            continue
        terms = space.terms(base_embeddings, k1, k2)
        for lam in LAMBDAS:
            metrics = space.metrics(terms.final(lam))
            if best_rr_metrics is None or metrics.mAP_balanced > best_rr_metrics.mAP_balanced:
                best_rr = dataclasses.replace(chosen, rerank=True, k1=k1, k2=k2, lambda_value=lam, blend=1.0)
                best_rr_metrics, best_terms = metrics, terms
    if best_rr is None:
        logger.info("validation set of %d images is too small to re-rank; keeping %s", n, chosen)
        table.append({**_as_chosen(chosen_row), "name": "+re-ranking", "adopted": False})
        table.append(_as_chosen(chosen_row))
        return chosen, table
    best_blend, best_blend_metrics = best_rr, None
    for weight in BLENDS[1:]:
        metrics = space.metrics(best_terms.final(best_rr.lambda_value, weight))
        if best_blend_metrics is None or metrics.mAP_balanced > best_blend_metrics.mAP_balanced:
            best_blend, best_blend_metrics = dataclasses.replace(best_rr, blend=weight), metrics
    # The stage's figures and decision on its exact candidate (the grid may have scored a cheaper form).
    best_blend_metrics = space.metrics(space.exact(base_embeddings, best_blend, best_terms))
    table.append(_row("+re-ranking", best_blend_metrics, best_blend))
    if _decide("+re-ranking", identity_gain(best_blend_metrics.per_identity_ap, chosen_metrics.per_identity_ap),
               min_se, table[-1]):
        chosen, chosen_row = best_blend, table[-1]
    table.append(_as_chosen(chosen_row))
    return chosen, table


def _as_chosen(row: dict[str, Any]) -> dict[str, Any]:
    """The table's last row: the scores and config of the stage row that was adopted last."""
    return {**{k: v for k, v in row.items() if k not in ("adopted", "gain", "gain_se")}, "name": "blend (chosen)"}


_ROW_FIELDS = frozenset(f.name for f in dataclasses.fields(StageRow))


def stage_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures of an evaluator summary (RetrievalMetrics.summary) that a StageRow holds."""
    return {k: v for k, v in summary.items() if k in _ROW_FIELDS and k not in ("name", "config")}


def stage_row(row: dict[str, Any]) -> StageRow:
    """A `tune_post` table row as a StageRow (its config, scores and stage decision)."""
    return StageRow(row["name"], PostConfig.from_dict(row.get("config", {})), **stage_figures(row))


def fusion_stage(features: FeatureSet, chosen: PostConfig, table: list[dict[str, Any]], local: LocalEvidence,
                 base: RetrievalConfig, search: bool = True) -> tuple[list[dict[str, Any]], Optional[FusionRecord]]:
    """The fusion stage after the global ones (WildFusion's route, jaguar.retrieval.post.fusion): both
    scores calibrated on the validation split's shortlisted pairs and the weight of the global
    probability chosen by identity-balanced mAP (`fit_fusion`'s search, cross-fitted over identities), over
    the chosen global setting's similarity. Adds the rows "local only" (weight 0: the calibrated local
    probability ranks; pairs it cannot tell apart, those outside the shortlist among them, keep the
    global order below) and "fused" (the chosen weight), and adopts the fusion only when its gain over
    the chosen global setting clears `base.tune_min_gain_se` standard errors of the paired per-identity
    AP differences (never with search=False: retrieval.tune is off). In the set's tuning space (N x N
    or top-M lists, jaguar.retrieval.post.search.fit_setting_fusion). Returns the table (the chosen
    row last) and the record for post.json; (table, None) when the shortlists hold pairs of one kind
    only, with a warning."""
    labels, space = features.labels.numpy(), tuning_space(features, features.labels, base)
    try:
        found, global_metrics = fit_setting_fusion(space, chosen, labels, local)
    except FusionError as err:
        logger.warning("fusion with local matches not tuned: %s", err)
        return table, None
    weights, model = found.weights, found.model
    if 0.0 in weights:
        local_metrics = found.metrics[weights.index(0.0)]
    else:
        local_model = FusionModel(model.global_calibrator, model.local_calibrator, 0.0)
        local_metrics = score_setting(space, chosen, local_model, local)
    local_row = {**_row("local only", local_metrics, chosen), "fusion_weight": 0.0}
    fused_metrics = found.metrics[weights.index(model.weight)]
    fused_row = {**_row("fused", fused_metrics, chosen), "fusion_weight": model.weight}
    gain = identity_gain(fused_metrics.per_identity_ap, global_metrics.per_identity_ap)
    if search:
        adopted = _decide("fused", gain, float(base.tune_min_gain_se), fused_row)
    else:  # retrieval.tune is off: the settings as configured, which name no fusion
        adopted = False
        fused_row.update(gain=gain.gain, gain_se=gain.se, adopted=False)
    chosen_row = _as_chosen(fused_row) if adopted else table[-1]
    record = FusionRecord(model.to_dict(), local.width, adopted, found.folds,
                          [{"weight": w, "mAP_balanced": m.mAP_balanced} for w, m in zip(weights, found.metrics)])
    return table[:-1] + [local_row, fused_row, chosen_row], record


def tune_post_run(run: RunDir) -> PostResult:
    """Choose the post-processing on the run's validation features (`tune_post`) with the run's
    retrieval settings (defaults when it has no config), then the fusion with local evidence when the
    run has the validation split's local matches (RUN/local/val.safetensors, `jaguar match RUN --split
    val`; `fusion_stage`), and write it to the run."""
    run.require()
    if run.has_config():
        config = run.load_config()
    else:
        logger.warning("%s not found; using the default retrieval settings", run.config_path)
        config = Config()
    features = run.load_features("val")
    local = load_local_evidence(run, "val", features.names)
    try:
        chosen, table = tune_post(features, config.retrieval, search=config.retrieval.tune)
    except ValueError as err:
        raise JaguarError(f"{run.features_path('val')}: {err}") from None
    fusion = None
    if local is not None:
        table, fusion = fusion_stage(features.normalized(), chosen, table, local, config.retrieval,
                                     search=config.retrieval.tune)
    result = PostResult(chosen, [stage_row(row) for row in table], val_size=len(features),
                        searched=config.retrieval.tune, fusion=fusion)
    run.save_post(result)
    return result


def format_stage_table(table: list[StageRow]) -> str:
    """The stage table as aligned text: each row named by what it does, its scores, the stage
    decision and the settings that act."""
    width = max(24, *(len(row.label()) for row in table))
    lines = [f"{'stage':<{width}} {'mAP_balanced':>12} {'mAP':>8} {'rank1':>8} {'rank5':>8} {'mINP':>8}  "
             f"{'adopted, gain +- SE':<22}  settings"]
    for row in table:
        lines.append(f"{row.label():<{width}} {row.mAP_balanced:>12.4f} {row.mAP or 0.0:>8.4f} "
                     f"{row.rank1 or 0.0:>8.4f} {row.rank5 or 0.0:>8.4f} {row.mINP or 0.0:>8.4f}  "
                     f"{row.decision_text():<22}  {row.config.describe()}")
    return "\n".join(lines)

