"""The typed contents of a run's artifacts: one dataclass per JSON record that `jaguar.run.RunDir`
loads and saves (where each lives in the run folder is RunDir's business alone), and the strict
JSON-to-dataclass conversion that names the file and key at fault (`RunDirError`)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

from jaguar.config import PostConfig
from jaguar.errors import JaguarError


class RunDirError(JaguarError, ValueError):
    """A run-folder file exists but does not hold what its stage writes; the message names it."""


@dataclass
class SplitRecord:
    """The run's split (RunDir.load_split / save_split): the training and validation images by file name, and the classifier head's
    class for each shard label (shard label -> contiguous class index)."""
    train: list[str]
    val: list[str]
    class_of_label: dict[int, int]
    groups: list[list[str]] = field(default_factory=list)  # near-duplicate groups the split kept whole


@dataclass
class TrainingMetrics:
    """Training metrics (RunDir.load_metrics / save_metrics): the best validation entry, one entry per validation ({"epoch", "step", and
    the evaluator's figures, e.g. "mAP_balanced", "rank1"}), and the run's totals."""
    best: dict[str, Any]
    history: list[dict[str, Any]]
    steps: int
    skipped_steps: int
    num_classes: int
    world_size: int


@dataclass
class StageRow:
    """One row of a post-processing stage table: the settings and their scores on one labelled
    split; a validation row of `jaguar tune-post` also says whether the stage was adopted, with its
    identity-balanced mAP gain over the previous stage and that gain's standard error."""
    name: str  # "raw", "+QE", "+re-ranking", "local only", "fused" or "blend (chosen)"
    config: PostConfig  # the global post-processing (a fused row fuses its similarity with local evidence)
    mAP_balanced: float
    mAP: Optional[float] = None
    rank1: Optional[float] = None
    rank5: Optional[float] = None
    rank10: Optional[float] = None
    mINP: Optional[float] = None
    gain: Optional[float] = None
    gain_se: Optional[float] = None
    adopted: Optional[bool] = None
    # the weight of the calibrated global probability when the row fuses it with the calibrated local
    # score (PostResult.fusion's calibrators): 0 for "local only"; None for a global-only row
    fusion_weight: Optional[float] = None

    @property
    def is_chosen(self) -> bool:
        return "chosen" in self.name

    def label(self) -> str:
        """The row named by what it does: "raw (cosine)", "QE", "DBA" or "QE+DBA" for the
        expansion stage (by its settings; "QE/DBA: none better" when the search kept none),
        "re-ranking" (after the expansion it builds on), "chosen: <settings>"."""
        if self.name == "raw":
            return "raw (cosine)"
        if self.is_chosen:
            return f"chosen: {self.config.describe()}{self.fusion_text()}"
        if self.name == "local only":
            return "local only (inliers; global order after)"
        if self.name == "fused":
            return f"fused with local (w = {self.fusion_weight:g})"
        active = self.config.active()
        expansion = "+".join(name for name, key in (("QE", "qe_k"), ("DBA", "dba_k")) if key in active)
        if self.config.rerank:
            return f"{expansion} + re-ranking" if expansion else "re-ranking"
        if self.name == "+re-ranking":  # tune-post could not re-rank (too few validation images)
            return "re-ranking: not run"
        return expansion or ("QE/DBA: none better" if self.name == "+QE" else self.name)

    def fusion_text(self) -> str:
        """" + fused with local (w = 0.7)" for a row that fuses, w the global probability's weight; ""."""
        if self.fusion_weight is None or self.name == "local only":
            return ""
        return f" + fused with local (w = {self.fusion_weight:g})"

    def decision_text(self) -> str:
        """The stage decision, e.g. "no, +0.0188 +- 0.0451"; "" for rows without one."""
        if self.adopted is None:
            return ""
        text = "yes" if self.adopted else "no"
        if self.gain is not None:
            text += f", {self.gain:+.4f} +- {self.gain_se or 0.0:.4f}"
        return text


@dataclass
class FusionRecord:
    """The calibrated fusion of the global similarity with local pattern evidence that tune-post fitted
    on the validation split's shortlist matches (jaguar.retrieval.post.fusion, WildFusion's route).

    model: FusionModel.to_dict() (the chosen weight of the global probability and both isotonic
    calibrators; the global one maps the chosen global setting's similarity, 1 - its final distance);
    shortlist: B, the shortlist width the local scores were matched at; adopted: whether the chosen
    setting fuses (the 1-SE rule against the chosen global setting); folds: 2 when the weight's
    validation figures were cross-fitted over identities, 1 when not; by_weight: identity-balanced mAP
    on validation at each weight tried ({"weight", "mAP_balanced"})."""
    model: dict[str, Any]
    shortlist: int
    adopted: bool
    folds: int = 1
    by_weight: list[dict[str, float]] = field(default_factory=list)


@dataclass
class PostResult:
    """The post-processing chosen (RunDir.load_post / save_post) on validation and the stage table behind it.
    fusion: the fitted fusion with local evidence (None: no local matches of the validation split when
    tune-post ran, or a post.json written before fusion existed); the chosen setting fuses when
    `fusion.adopted`."""
    chosen: PostConfig
    table: list[StageRow]
    val_size: int
    searched: bool
    fusion: Optional[FusionRecord] = None

    @property
    def fuses(self) -> bool:
        return self.fusion is not None and self.fusion.adopted


@dataclass
class Score:
    """The local score (RunDir.load_score / save_score): identity-balanced mAP of the run's submission against known test labels."""
    mAP_balanced: float
    per_identity: dict[str, float]
    num_pairs: int
    num_images: int
    mAP: Optional[float] = None  # the evaluator's other figures (absent in older score files)
    rank1: Optional[float] = None
    rank5: Optional[float] = None
    rank10: Optional[float] = None
    mINP: Optional[float] = None


@dataclass
class ScoreTable:
    """The test-side stage table (RunDir.load_score_table): each row of the post-processing table re-scored on the labelled test images."""
    labels: str  # the labels file the rows were scored with
    table: list[StageRow]


@dataclass
class EnsembleRecord:
    """An ensemble run's record (RunDir.load_ensemble): the member runs and weights of an ensemble run and what was written per split."""
    members: list[str]
    weights: list[float]
    mode: str
    splits: dict[str, dict[str, Any]]
    config_from: Optional[str] = None


DEFAULT_CALIBRATION_FOLDS = 5  # identity hold-out folds of `jaguar calibrate` (OpenSetCalibration.folds)


@dataclass(frozen=True)
class OpenSetFigures:
    """Open-set identification at one threshold (AnimalCLEF 2025): each query is decided "known"
    (its best individual's score >= threshold, then named as that individual) or "new individual".

    known_accuracy: share of queries of gallery individuals that are decided known AND named right
    (BAKS); unknown_accuracy: share of queries of individuals absent from the gallery decided new
    (BAUS); balanced_accuracy: their mean; geometric_mean: sqrt(known * unknown), the AnimalCLEF
    headline; known_rank1: share of known queries whose best individual is right, whatever the
    threshold. NaN where a side has no queries."""

    threshold: float
    known_accuracy: float
    unknown_accuracy: float
    balanced_accuracy: float
    geometric_mean: float
    known_rank1: float
    num_known: int
    num_unknown: int


@dataclass
class OpenSetCalibration:
    """The open-set calibration (RunDir.load_calibration): the new-individual decision chosen on validation (`jaguar calibrate`).

    A photo is "known" when its best individual's score (`aggregate` of its image similarities to
    that individual's gallery images: "max" or "mean_top<n>") is >= `figures.threshold`. The figures are
    pooled over `folds` hold-outs of whole identities (group-aware) from the training gallery,
    validation images as queries; `fold_balanced` is each fold's balanced accuracy (its spread is
    the uncertainty); `curve` holds the sweep ({"threshold", "known_accuracy", "unknown_accuracy",
    "balanced_accuracy"} lists) and `aggregates` the figures of every aggregate tried.

    With local pattern evidence (`local_evidence`), the score is instead the aggregate of the fused
    image probabilities P(same individual) (`fusion`: jaguar.retrieval.post.fusion.FusionModel.to_dict,
    the isotonic calibrators of the raw cosine and of the verified inlier count and the weight),
    matched against each photo's top `local_shortlist` gallery images by cosine; `fusion_weights`
    holds the cross-fitted balanced accuracy of every weight tried. Calibrations written before
    local evidence existed load with these fields at their defaults (global only)."""
    figures: OpenSetFigures  # at the chosen threshold, pooled over the folds
    aggregate: str
    folds: int
    fold_balanced: list[float]
    curve: dict[str, list[float]]
    aggregates: dict[str, dict[str, float]]
    held_out_groups: str  # how the hold-outs respected near-duplicate groups, in words
    features: str = ""  # the features' provenance (checkpoint) the threshold belongs to
    local_evidence: bool = False  # the threshold is on the fused probability (cosine + verified inliers)
    fusion: Optional[dict] = None  # FusionModel.to_dict() when local_evidence, else None
    local_shortlist: int = 0  # gallery images matched locally per photo (retrieval.local.shortlist)
    fusion_weights: dict[str, float] = field(default_factory=dict)  # weight -> balanced accuracy


@dataclass
class DiagnosisRow:
    """One retrieval figure of `jaguar diagnose`: identity-balanced mAP (the evaluator's) of one
    image variant or candidate restriction, beside what a random ranking scores in expectation."""
    name: str  # "original", "foreground only", "background only", "silhouette only", "same flank", ...
    mAP_balanced: Optional[float]  # None where no query has a match (e.g. no cross-flank pairs)
    chance: Optional[float]
    num_queries: int  # queries with a true match: the ones averaged
    note: str = ""


@dataclass
class MirrorSimilarity:
    """Mirror self-similarity: the cosine between each image's embedding and its mirror image's,
    both without flip TTA: its quantiles, mean and histogram, beside the mean cosine of an image to
    the other images of its identity and to other identities (for scale)."""
    mean: float
    median: float
    p10: float
    p90: float
    histogram_edges: list[float]
    histogram_counts: list[int]
    same_identity_mean: float
    other_identity_mean: float


@dataclass
class Diagnosis:
    """`jaguar diagnose`'s result for one split (RunDir.load_diagnosis / save_diagnosis): does the
    model see the coat? Context rows (original, foreground only, background only, silhouette only),
    the context ratio background / foreground (and the same above chance), mirror
    self-similarity, and same- vs cross-flank retrieval where the data has viewpoints."""
    split: str
    images: int
    identities: int
    features: str  # the weights the figures belong to
    flip_tta: bool  # the run's extraction setting, used for the context and flank rows
    context: list[DiagnosisRow]
    context_ratio: Optional[float]
    context_ratio_above_chance: Optional[float]
    mirror: MirrorSimilarity
    flanks: list[DiagnosisRow] = field(default_factory=list)  # empty without a viewpoint column
    viewpoint_counts: dict[str, int] = field(default_factory=dict)
    key: str = ""  # the extraction key of the features diagnosed: a re-run with the same key is a no-op


T = TypeVar("T")


def build_record(cls: type[T], mapping: Any, where: str) -> T:
    """A dataclass from its JSON mapping: required fields present, no unknown keys, nested
    PostConfig / StageRow values built too."""
    if not isinstance(mapping, dict):
        raise RunDirError(f"{where}: expected a JSON object for {cls.__name__}, got {type(mapping).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise RunDirError(f"{where}: unknown key(s) {unknown}; expected {sorted(fields)}")
    missing = [name for name, f in fields.items() if name not in mapping
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RunDirError(f"{where}: missing key(s) {missing}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in mapping.items():
        hint = hints[name]
        if typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint):
            if value is None:
                values[name] = None
                continue
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))  # Optional[X]: X
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list and typing.get_args(hint) else None
        if hint is PostConfig:
            try:
                value = PostConfig.from_dict(value, f" in {where}")
            except (TypeError, ValueError) as err:
                raise RunDirError(f"{where}: {name}: {err}") from None
        elif dataclasses.is_dataclass(item):
            if not isinstance(value, list):
                raise RunDirError(f"{where}: {name} must be a list of rows")
            value = [build_record(item, row, f"{where} {name}[{i}]") for i, row in enumerate(value)]
        elif dataclasses.is_dataclass(hint):
            value = build_record(hint, value, f"{where} {name}")
        values[name] = value
    return cls(**values)


def record_to_json(obj: Any) -> Any:
    return dataclasses.asdict(obj)
