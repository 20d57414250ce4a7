"""`jaguar verify RUN`: every file of a run checked against the checksum recorded when it was written:
each checkpoint's files (trainer_state.json's records, every sha256 read), each split's features and
the gallery (their content sha256, finite rows). Reads everything; changes nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

from jaguar.core.features import FeatureFileError, FeatureSet
from jaguar.run import SPLITS, RunDir


@dataclass
class RunVerification:
    checked: list[str] = field(default_factory=list)  # what was found intact, in words
    problems: list[str] = field(default_factory=list)  # each names the file and what is wrong


def verify_run(run: RunDir) -> RunVerification:
    """Check every checkpoint, features file and the gallery of `run` (see the module docstring)."""
    from jaguar.core.weights import CheckpointError, verify_checkpoint  # imports torch: only when a run is verified

    run.require()
    result = RunVerification()
    for folder in run.checkpoints.complete():
        try:
            problems = verify_checkpoint(folder, full=True)
        except CheckpointError as err:
            problems = [str(err)]
        result.problems += problems
        if not problems:
            result.checked.append(f"checkpoint {folder.name}")
    files = [(run.features_path(split), f"features of {split}") for split in SPLITS if run.has_features(split)]
    if run.has_enrolled():
        files.append((run.enrolled_path, "gallery"))
    for path, what in files:
        try:
            features = FeatureSet.load(path)
        except FeatureFileError as err:
            result.problems.append(str(err))
            continue
        result.checked.append(f"{what} ({len(features)} rows)")
    return result
