"""The retrieval stages of a run after extraction, each reading its inputs from a `RunDir` and
writing its artifact there: tune-post (the chosen post-processing and its stage table), submit
(the challenge submission) and score (the submission's score, and the score table: the stage table
re-scored on the labelled test images). Scoring a bare submission file against a pair list and a
label file is `score_submission`."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from jaguar.config import Config, PostConfig, RetrievalConfig
from jaguar.errors import JaguarError
from jaguar.formats import (check_rows, count_pair_rows, examples, read_labels, read_pairs, read_submission,
                            write_submission)
from jaguar.core.evaluator import MetricsError, RetrievalMetrics, evaluate
from jaguar.retrieval.submission import SubmissionError, pair_similarities, pair_similarity_matrix
from jaguar.run import PostResult, RunDir, Score, ScoreTable, StageRow

if TYPE_CHECKING:  # the feature and post-processing stages import torch; scoring a file needs none
    from jaguar.core.features import FeatureSet

logger = logging.getLogger(__name__)

_ROW_FIELDS = frozenset(f.name for f in dataclasses.fields(StageRow))


def _scores(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k in _ROW_FIELDS and k not in ("name", "config")}


def stage_row(row: dict[str, Any]) -> StageRow:
    """A `tune_post` table row as a StageRow (its config, scores and stage decision)."""
    return StageRow(row["name"], PostConfig.from_dict(row.get("config", {})), **_scores(row))


def tune_post_run(run: RunDir) -> PostResult:
    """Choose the post-processing on the run's validation features (see postprocess.tune_post) with
    the run's retrieval settings (defaults when it has no config) and write it to the run."""
    from jaguar.retrieval.post.dense import tune_post
    from jaguar.retrieval.post.topm import tune_post_topm, use_topm

    run.require()
    if run.has_config():
        config = run.load_config()
    else:
        logger.warning("%s not found; using the default retrieval settings", run.config_path)
        config = Config()
    features = run.load_features("val")
    try:
        tune = tune_post_topm if use_topm(config.retrieval, len(features)) else tune_post
        chosen, table = tune(features, config.retrieval, search=config.retrieval.tune)
    except ValueError as err:
        raise JaguarError(f"{run.features_path('val')}: {err}") from None
    result = PostResult(chosen, [stage_row(row) for row in table], val_size=len(features),
                        searched=config.retrieval.tune)
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


def chosen_post(run: RunDir) -> Optional[PostConfig]:
    """The run's chosen post-processing, or None when tune-post has not run (raw cosine)."""
    return run.load_post().chosen if run.has_post() else None


@dataclass
class SubmitResult:
    path: Path
    rows: int
    post: Optional[PostConfig]  # None: raw cosine, tune-post has not run
    repeated: list[int] = dataclasses.field(default_factory=list)  # pair-list lines repeating a row exactly (read once)


MAX_SUBMISSION_ROWS = 10**8  # an all-pairs file past this (~10,000 images) is the wrong tool: `jaguar rank`


def submit_run(run: RunDir, test_csv: str | Path, output: str | Path | None = None,
               max_rows: int = MAX_SUBMISSION_ROWS) -> SubmitResult:
    """Score every pair of `test_csv` with the run's test features and chosen post-processing (raw
    cosine when tune-post has not run) and write a validated submission (default: the run's).
    A pair list of more than `max_rows` rows is refused (SubmissionError) before it is read: the
    all-pairs file is for the challenge; large galleries take `jaguar rank`'s top-k lists."""
    output = Path(output) if output else run.submission_path
    rows = count_pair_rows(test_csv)
    if rows > max_rows:
        raise SubmissionError(f"{test_csv} has {rows:,} pair rows, more than an all-pairs submission should hold "
                              f"({max_rows:,}); write each image's top-k list instead: "
                              f"`jaguar rank {run.path} --split test --top-k 100`")
    features = run.load_features("test")
    post = chosen_post(run)
    pairs = read_pairs(test_csv)
    similarity = pair_similarities(features, pairs.row_ids, pairs.query_images, pairs.gallery_images,
                                   post or PostConfig())
    write_submission(output, pairs.row_ids, similarity, expected_row_ids=pairs.row_ids)
    return SubmitResult(output, len(pairs), post, list(pairs.repeated))


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


def stage_table_on(features: FeatureSet, table: list[StageRow],
                   retrieval: Optional[RetrievalConfig] = None) -> list[StageRow]:
    """Each row's post-processing re-scored on another labelled set (e.g. the test images), with
    the evaluator's all-vs-all figures; the stage decisions stay with the validation table. With
    `retrieval` (the run's settings) calling for the top-M form, as tune-post does, each row is
    scored on its top-M lists (TopMSpace, O(N * M) memory), never an N x N matrix."""
    from jaguar.retrieval.post.dense import final_distance
    from jaguar.retrieval.post.topm import TopMSpace, use_topm

    retrieval = retrieval or RetrievalConfig()
    if use_topm(retrieval, len(features)):
        space = TopMSpace(features, features.labels, int(retrieval.top_m))

        def figures(post: PostConfig) -> RetrievalMetrics:
            return space.metrics(space.final(post))
    else:
        def figures(post: PostConfig) -> RetrievalMetrics:
            return evaluate(final_distance(features, post), features.labels, kind="distance")
    return [StageRow(row.name, row.config, **_scores(figures(row.config).summary())) for row in table]


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
            table = ScoreTable(labels=str(labels_csv),
                               table=stage_table_on(labelled, run.load_post().table, retrieval))
            run.save_score_table(table)
    return score, table
