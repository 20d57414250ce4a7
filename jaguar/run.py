"""The run directory: every path of a run and the typed load/save of each artifact in it. No other
module spells a run-folder file name; every stage (train, extract, tune-post, submit, score,
report, ensemble, pseudo-label) takes a `RunDir`.

    RUN/config.yaml               resolved config              load_config / save_config
    RUN/config_history/step-N.yaml  the config in force up to  config_history_path
                                  step N, before a resume
                                  changed its schedule
    RUN/split.json                train/val file names and     load_split / save_split (SplitRecord)
                                  the head's class map
    RUN/checkpoints/              step-NNNNNN/, best/          checkpoints (CheckpointFolder: names,
                                                               listing), default_checkpoint,
                                                               extraction_weights (None: zero-shot)
    RUN/tb/                       TensorBoard event files      tb_dir
    RUN/metrics.json              training metrics             load_metrics / save_metrics (TrainingMetrics)
    RUN/features/<split>.safetensors  embeddings per split     load_features / save_features (FeatureSet)
    RUN/features/parts/           finished blocks of an        feature_part_path, feature_part_files,
                                  unfinished extraction        remove_feature_parts
    RUN/post.json                 chosen post-processing and   load_post / save_post (PostResult)
                                  the stage table
    RUN/submission.csv            the challenge submission     submission_path
    RUN/ranks_<split>.parquet     top-k lists (`jaguar rank`)  ranks_path
    RUN/score.json                local test score             load_score / save_score (Score)
    RUN/score_table.json          the stage table on test      load_score_table / save_score_table (ScoreTable)
    RUN/ensemble.json             an ensemble's members        load_ensemble / save_ensemble (EnsembleRecord)
    RUN/gallery/enrolled.safetensors  enrolled individuals'    load_enrolled / save_enrolled (FeatureSet)
                                  embeddings (`jaguar enroll`)
    RUN/gallery/enrolled.local.safetensors  their local    enrolled_local_path (a LocalFeatureSet, rows
                                  features, in step            named by content hash as in enrolled)
    RUN/gallery/thumbnails/       their photos, small          thumbnail_path
    RUN/calibration.json          open-set threshold chosen    load_calibration / save_calibration
                                  on validation                (OpenSetCalibration)
    RUN/diagnose_<split>.json     shortcut diagnostics         load_diagnosis / save_diagnosis (Diagnosis)
                                  (`jaguar diagnose`)
    RUN/report/                   the HTML report              report_dir
    RUN/export/model.onnx         the exported embedding       export_path (`jaguar export`;
    RUN/export/model-int8.onnx    model, fp32 and int8         jaguar.core.onnx_model)
    RUN/pseudo/                   pseudo-label shards          pseudo_dir
    RUN/.lock                     the run's writer lock        writer_lock (jaguar.lock)
    RUN/gallery/.lock             the gallery's writer lock    gallery_lock

Every write is atomic (jaguar.io); one writer at a time holds the run's (or the gallery's) lock,
readers take none. A missing artifact is a `MissingInputError` naming the file and
the command that writes it; a malformed one is a `RunDirError` naming the file and what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from jaguar.config import Config, load_config, save_config
from jaguar.errors import MissingInputError
from jaguar.io import atomic_write_json
from jaguar.lock import NoLock, WriterLock, launch_rank
from jaguar.run_checkpoints import CheckpointFolder
from jaguar.run_features import FEATURE_PARTS, FEATURES, SPLITS, FeatureFiles
# The records are importable from here too: callers take a RunDir and the types it returns together.
from jaguar.run_records import (Diagnosis, EnsembleRecord, FusionRecord, OpenSetCalibration, OpenSetFigures,
                                PostResult, RunDirError, Score, ScoreTable, SplitRecord, StageRow, TrainingMetrics,
                                build_record, record_to_json)

if TYPE_CHECKING:  # torch-backed: imported where features are read, so `jaguar --help` stays light
    from jaguar.core.features import FeatureSet

__all__ = ["SPLITS", "RANK_FORMATS", "RunDir", "RunDirError", "Diagnosis", "EnsembleRecord", "OpenSetCalibration",
           "FusionRecord", "PostResult", "Score", "ScoreTable", "SplitRecord", "StageRow", "TrainingMetrics"]

RANK_FORMATS = ("parquet", "csv")  # `jaguar rank`'s file formats, named by their extension

_CONFIG = "config.yaml"
_CONFIG_HISTORY = "config_history"
_SPLIT = "split.json"
_CHECKPOINTS = "checkpoints"
_TB = "tb"
_METRICS = "metrics.json"
_POST = "post.json"
_SUBMISSION = "submission.csv"
_SCORE = "score.json"
_SCORE_TABLE = "score_table.json"
_ENSEMBLE = "ensemble.json"
_REPORT = "report"
_GALLERY = "gallery"
_ENROLLED = "enrolled.safetensors"
_ENROLLED_LOCAL = "enrolled.local.safetensors"
_THUMBNAILS = "thumbnails"
_CALIBRATION = "calibration.json"
_DIAGNOSIS = "diagnose_{split}.json"
_PSEUDO = "pseudo"
_EXPORT = "export"
_EXPORT_MODEL = "model{suffix}.onnx"
_PREEMPT = "PREEMPT"
_LOCK = ".lock"


class RunDir(FeatureFiles):
    """One run folder (see the module docstring for its layout). Creating a RunDir touches nothing
    on disk; `save_*` create the folder as needed."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_path = self.path / _CONFIG
        self.config_history_dir = self.path / _CONFIG_HISTORY
        self.split_path = self.path / _SPLIT
        self.checkpoints_dir = self.path / _CHECKPOINTS
        self.tb_dir = self.path / _TB
        self.metrics_path = self.path / _METRICS
        self.features_dir = self.path / FEATURES
        # where the processes of a sharded extraction leave their parts until rank 0 merges them
        self.feature_parts_dir = self.features_dir / FEATURE_PARTS
        self.post_path = self.path / _POST
        self.submission_path = self.path / _SUBMISSION
        self.score_path = self.path / _SCORE
        self.score_table_path = self.path / _SCORE_TABLE
        self.ensemble_path = self.path / _ENSEMBLE
        self.report_dir = self.path / _REPORT
        self.gallery_dir = self.path / _GALLERY
        self.enrolled_path = self.gallery_dir / _ENROLLED
        self.enrolled_local_path = self.gallery_dir / _ENROLLED_LOCAL
        self.thumbnails_dir = self.gallery_dir / _THUMBNAILS
        self.calibration_path = self.path / _CALIBRATION
        self.pseudo_dir = self.path / _PSEUDO
        self.export_dir = self.path / _EXPORT
        # touching this file asks a running training to checkpoint and exit (as SIGUSR1 does)
        self.preempt_flag = self.path / _PREEMPT
        self.lock_path = self.path / _LOCK
        self.gallery_lock_path = self.gallery_dir / _LOCK

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def require(self) -> "RunDir":
        """This run, after checking the folder exists."""
        if not self.path.is_dir():
            raise MissingInputError(f"run folder {self.path} does not exist; give a `jaguar train` run.dir")
        return self

    # ------------------------------------------------------------------ writer locks

    def writer_lock(self, command: str, create: bool = False) -> WriterLock | NoLock:
        """The lock a writer of this run holds while it writes (`with run.writer_lock("jaguar rank"):`);
        a second writer gets a LockError naming the holder (jaguar.lock). Taken by the launcher's rank
        0 only; with create=False a run folder that does not exist is left for the command to report."""
        if launch_rank() != 0 or (not create and not self.path.is_dir()):
            return NoLock()
        return WriterLock(self.lock_path, f"run folder {self.path}", command)

    def gallery_lock(self, command: str) -> WriterLock | NoLock:
        """The lock an enrolment holds while it reads, extends and writes the gallery."""
        if launch_rank() != 0 or not self.path.is_dir():
            return NoLock()
        return WriterLock(self.gallery_lock_path, f"gallery {self.gallery_dir}", command)

    # ------------------------------------------------------------------ paths

    def export_path(self, int8: bool = False) -> Path:
        """`jaguar export`'s default output: the embedding model as ONNX, fp32 or int8-quantised."""
        return self.export_dir / _EXPORT_MODEL.format(suffix="-int8" if int8 else "")

    # ------------------------------------------------------------------ config and split

    def has_config(self) -> bool:
        return self.config_path.is_file()

    def load_config(self) -> Config:
        if not self.has_config():
            raise MissingInputError(f"{self.config_path} does not exist: give a run folder made by "
                                    f"`jaguar train` (or `jaguar extract --config RECIPE`)")
        return load_config(self.config_path)

    def save_config(self, cfg: Config) -> None:
        save_config(cfg, self.config_path)

    def config_history_path(self, step: int) -> Path:
        """The config a resumed run was trained with up to optimizer step `step`, kept when a resume
        applied a changed schedule (jaguar.train.resume)."""
        return self.config_history_dir / f"step-{int(step):06d}.yaml"

    def load_split(self) -> SplitRecord:
        raw = self._read_json(self.split_path, "the train/validation split is written by `jaguar train`")
        record = build_record(SplitRecord, raw, str(self.split_path))
        try:
            record.class_of_label = {int(k): int(v) for k, v in record.class_of_label.items()}
        except (AttributeError, TypeError, ValueError):
            raise RunDirError(f"{self.split_path}: class_of_label must map shard labels to classes") from None
        return record

    def save_split(self, record: SplitRecord) -> None:
        atomic_write_json(self.split_path, {"train": list(record.train), "val": list(record.val),
                                            "class_of_label": {str(k): int(v) for k, v in
                                                               record.class_of_label.items()},
                                            "groups": [list(group) for group in record.groups]})

    @property
    def checkpoints(self) -> CheckpointFolder:
        """The checkpoints folder's layout (jaguar.run_checkpoints)."""
        return CheckpointFolder(self.checkpoints_dir)

    def default_checkpoint(self) -> Path:
        """The checkpoint extraction uses by default: best if kept, else the newest complete one."""
        found = self.checkpoints.best_or_latest()
        if found is None:
            raise MissingInputError(f"no complete checkpoint in {self.checkpoints_dir}; train first "
                                    f"(`jaguar train RECIPE run.dir={self.path}`) or pass --checkpoint")
        return found

    def extraction_weights(self) -> Optional[Path]:
        """The weights extraction, calibration and identification use: the default checkpoint of a
        trained run; None for a zero-shot run (made by `jaguar extract --config RECIPE` with
        pretrained weights, never trained: no checkpoints folder), whose model is the pretrained
        backbone as built from its config. Raises MissingInputError for a run with neither."""
        if self.checkpoints_dir.exists() or not self.has_config():
            return self.default_checkpoint()
        model = self.load_config().model
        if not (model.pretrained_file or model.pretrained):
            raise MissingInputError(f"{self.path} has no checkpoint and its config names no pretrained weights "
                                    f"(model.pretrained_file / model.pretrained): its model would be random. "
                                    f"Train it (`jaguar train RECIPE run.dir={self.path}`), or make a zero-shot run "
                                    f"with `jaguar extract --config RECIPE model.pretrained_file=WEIGHTS run.dir=...`")
        return None

    # ------------------------------------------------------------------ metrics

    def has_metrics(self) -> bool:
        return self.metrics_path.is_file()

    def load_metrics(self) -> TrainingMetrics:
        raw = self._read_json(self.metrics_path, f"train first: `jaguar train RECIPE run.dir={self.path}`")
        if isinstance(raw, dict):
            raw.pop("param_checksums", None)  # the ranks' checksums runs trained before 2026-12-08 recorded
        return build_record(TrainingMetrics, raw, str(self.metrics_path))

    def save_metrics(self, metrics: TrainingMetrics) -> None:
        atomic_write_json(self.metrics_path, record_to_json(metrics))

    # ------------------------------------------------------------------ features

    # ------------------------------------------------------------------ post-processing, score

    def has_post(self) -> bool:
        return self.post_path.is_file()

    def load_post(self) -> PostResult:
        raw = self._read_json(self.post_path, f"run `jaguar tune-post {self.path}`")
        return build_record(PostResult, raw, str(self.post_path))

    def save_post(self, post: PostResult) -> None:
        # strict JSON (the fusion's calibrators included): a NaN is an error here, never a bare NaN in the file
        atomic_write_json(self.post_path, record_to_json(post), allow_nan=False)

    def has_score(self) -> bool:
        return self.score_path.is_file()

    def load_score(self) -> Score:
        raw = self._read_json(self.score_path, f"run `jaguar score {self.path} --test-csv ... --labels ...`")
        return build_record(Score, raw, str(self.score_path))

    def save_score(self, score: Score) -> None:
        atomic_write_json(self.score_path, record_to_json(score))

    def has_score_table(self) -> bool:
        return self.score_table_path.is_file()

    def load_score_table(self) -> ScoreTable:
        raw = self._read_json(self.score_table_path,
                              f"run `jaguar score {self.path} --test-csv ... --labels ...`")
        return build_record(ScoreTable, raw, str(self.score_table_path))

    def save_score_table(self, table: ScoreTable) -> None:
        atomic_write_json(self.score_table_path, record_to_json(table))

    # ------------------------------------------------------------------ open-set identification

    def has_enrolled(self) -> bool:
        return self.enrolled_path.is_file()

    def load_enrolled(self) -> FeatureSet:
        """The enrolled individuals' embeddings (labels index label_names, the individuals' names)."""
        if not self.has_enrolled():
            raise MissingInputError(f"{self.enrolled_path} does not exist; enrol with "
                                    f"`jaguar enroll {self.path} --name NAME PHOTO...`")
        from jaguar.core.features import FeatureSet

        return FeatureSet.load(self.enrolled_path, "restore it, or remove it and enrol again")

    def save_enrolled(self, features: FeatureSet) -> None:
        features.save(self.enrolled_path)

    def thumbnail_path(self, key: str) -> Path:
        """The thumbnail of an enrolled photo; `key` is its content hash (hex), never a user's name."""
        if not key or any(c not in "0123456789abcdef" for c in key):
            raise RunDirError(f"thumbnail key {key!r} is not a hex content hash")
        return self.thumbnails_dir / f"{key}.png"

    def has_calibration(self) -> bool:
        return self.calibration_path.is_file()

    def load_calibration(self) -> OpenSetCalibration:
        raw = self._read_json(self.calibration_path, f"run `jaguar calibrate {self.path}`")
        if isinstance(raw, dict) and "figures" not in raw and "threshold" in raw:
            # written before 2026-12-08, the figures at the threshold spelled out flat beside the rest
            names = [f.name for f in dataclasses.fields(OpenSetFigures)]
            raw = {"figures": {name: raw.pop(name) for name in names if name in raw}, **raw}
        return build_record(OpenSetCalibration, raw, str(self.calibration_path))

    def save_calibration(self, calibration: OpenSetCalibration) -> None:
        # strict JSON: a NaN figure is an error here, never a bare NaN in the file
        atomic_write_json(self.calibration_path, record_to_json(calibration), allow_nan=False)

    # ------------------------------------------------------------------ shortcut diagnostics

    def diagnosis_path(self, split: str) -> Path:
        """`jaguar diagnose`'s result for a split (val or test)."""
        self.features_path(split)  # checks the split name
        return self.path / _DIAGNOSIS.format(split=split)

    def has_diagnosis(self, split: str) -> bool:
        return self.diagnosis_path(split).is_file()

    def load_diagnosis(self, split: str) -> Diagnosis:
        path = self.diagnosis_path(split)
        raw = self._read_json(path, f"run `jaguar diagnose {self.path} --split {split}`")
        return build_record(Diagnosis, raw, str(path))

    def save_diagnosis(self, diagnosis: Diagnosis) -> None:
        atomic_write_json(self.diagnosis_path(diagnosis.split), record_to_json(diagnosis))

    # ------------------------------------------------------------------ ensembles

    def is_ensemble(self) -> bool:
        return self.ensemble_path.is_file()

    def load_ensemble(self) -> EnsembleRecord:
        raw = self._read_json(self.ensemble_path, "it is written by `jaguar ensemble`")
        return build_record(EnsembleRecord, raw, str(self.ensemble_path))

    def save_ensemble(self, record: EnsembleRecord) -> None:
        atomic_write_json(self.ensemble_path, record_to_json(record))

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _read_json(path: Path, how_to_make: str) -> Any:
        if not path.is_file():
            raise MissingInputError(f"{path} does not exist; {how_to_make}")
        try:
            return json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunDirError(f"{path} could not be read ({err}); re-run the stage that writes it") from None
