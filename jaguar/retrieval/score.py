"""Scoring (`jaguar score`): a submission file scored by the evaluator against a pair list and a label
file (`score_submission`, numpy only: no torch), and a run's score with its stage table re-scored on
the labelled test images (`score_run`), in the space jaguar.retrieval.post.search gives the set."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from jaguar.config import RetrievalConfig
from jaguar.core.evaluator import MetricsError, evaluate
from jaguar.formats import check_rows, examples, read_labels, read_pairs, read_submission
from jaguar.retrieval.submission import SubmissionError, pair_similarity_matrix
from jaguar.run import RunDir, Score, ScoreTable, StageRow

if TYPE_CHECKING:  # the feature and post-processing stages import torch; scoring a file needs none
    from jaguar.core.features import FeatureSet
    from jaguar.retrieval.post.local_evidence import LocalEvidence

logger = logging.getLogger(__name__)


def score_submission(submission: str | Path, test_csv: str | Path, labels_csv: str | Path) -> Score:
    """Score a `row_id,similarity` file with the evaluator: each query ranks only the gallery images
    it is paired with in `test_csv`, truth from `labels_csv` (filename,ground_truth). Malformed files
    raise FormatError, pairs naming unlabelled images or without any true match SubmissionError,
    naming the file and rows."""
    pairs = read_pairs(test_csv)
    labels = read_labels(labels_csv)
    unlabelled = [f"{r} ({q if q not in labels else g})"
                  for r, q, g in zip(pairs.row_ids, pairs.query_images, pairs.gallery_images)
                  if q not in labels or g not in labels]
    if unlabelled:
        raise SubmissionError(f"{test_csv}: {len(unlabelled)} pair row(s) name images missing from "
                              f"{labels_csv}: {examples(unlabelled)}")
    submitted = read_submission(submission)
    check_rows(submitted.row_ids, pairs.row_ids, str(submission))
    by_row = dict(zip(submitted.row_ids, submitted.similarity))
    images, matrix, candidates = pair_similarity_matrix(pairs.query_images, pairs.gallery_images,
                                                        [by_row[r] for r in pairs.row_ids])
    names = sorted({labels[name] for name in images})
    identity_of = {name: i for i, name in enumerate(names)}
    try:
        metrics = evaluate(matrix, [identity_of[labels[name]] for name in images], kind="similarity",
                           candidates=candidates)
    except MetricsError as err:
        raise SubmissionError(f"{test_csv} with labels {labels_csv}: {err}") from None
    return Score(mAP_balanced=metrics.mAP_balanced,
                 per_identity={names[i]: ap for i, ap in metrics.per_identity_ap.items()},
                 num_pairs=len(pairs), num_images=len(images), mAP=metrics.mAP, rank1=metrics.rank1,
                 rank5=metrics.rank5, rank10=metrics.rank10, mINP=metrics.mINP)


def labelled_test_features(run: RunDir, labels_csv: str | Path | None) -> Optional[FeatureSet]:
    """The run's test features labelled from `labels_csv` (or by labels stored with them), only the
    labelled images; None when fewer than two are labelled."""
    features = run.load_features("test")
    if labels_csv:
        identity_by_name = read_labels(labels_csv)
        if not any(name in identity_by_name for name in features.names):
            raise SubmissionError(f"none of the {len(features)} test images in {run.features_path('test')} "
                                  f"is named in {labels_csv}; is it the right labels file?")
        features = features.with_identities(identity_by_name)
    labelled = features.labelled()
    return labelled if len(labelled) >= 2 else None


def stage_table_on(features: FeatureSet, table: list[StageRow], retrieval: Optional[RetrievalConfig] = None,
                   fusion: Optional[dict] = None, local: Optional["LocalEvidence"] = None) -> list[StageRow]:
    """Each row's post-processing re-scored on another labelled set (e.g. the test images), with
    the evaluator's all-vs-all figures; the stage decisions stay with the validation table. The set
    is searched in the space jaguar.retrieval.post.search gives it under `retrieval` (the run's
    settings), as tune-post does: above the threshold each row is scored on its top-M lists
    (O(N * M) memory), never an N x N matrix. A row that fuses (local only, fused, a chosen fusion)
    is scored with post.json's calibrators (`fusion`, FusionModel.to_dict) at its weight and the
    set's `local` evidence (its shortlist matches, lined up with `features`); without them it is
    left out."""
    from jaguar.retrieval.post.fusion import FusionModel
    from jaguar.retrieval.post.search import score_setting, tuning_space
    from jaguar.retrieval.post.tune import stage_figures

    space = tuning_space(features, features.labels, retrieval or RetrievalConfig())
    rows = []
    for row in table:
        model = None
        if row.fusion_weight is not None:
            if fusion is None or local is None:
                continue
            model = dataclasses.replace(FusionModel.from_dict(fusion), weight=row.fusion_weight)
        figures = score_setting(space, row.config, model, local).summary()
        rows.append(StageRow(row.name, row.config, **stage_figures(figures), fusion_weight=row.fusion_weight))
    return rows


def score_run(run: RunDir, test_csv: str | Path, labels_csv: str | Path,
              submission: str | Path | None = None) -> tuple[Score, Optional[ScoreTable]]:
    """Score the run's submission and save the score; when the run has test features and a
    tune-post result, re-score its stage table on the labelled test images and save that table."""
    run.require()
    score = score_submission(submission or run.submission_path, test_csv, labels_csv)
    run.save_score(score)
    table = None
    if run.has_post() and run.has_features("test"):
        labelled = labelled_test_features(run, labels_csv)
        if labelled is not None:
            retrieval = run.load_config().retrieval if run.has_config() else None
            post = run.load_post()
            fusion, local = (post.fusion.model if post.fusion is not None else None), None
            if fusion is not None:
                from jaguar.retrieval.post.local_evidence import load_local_evidence

                local = load_local_evidence(run, "test", run.load_features("test").names)
                if local is None:
                    logger.warning("%s does not exist: the local only and fused rows are left out of the test "
                                   "table; run `jaguar match %s --split test` first", run.local_matches_path("test"),
                                   run.path)
                else:
                    local = local.subset(labelled.names)
            table = ScoreTable(labels=str(labels_csv),
                               table=stage_table_on(labelled, post.table, retrieval, fusion, local))
            run.save_score_table(table)
    return score, table
