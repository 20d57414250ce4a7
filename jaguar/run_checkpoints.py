"""The layout of a run's checkpoints folder, owned by RunDir (`RunDir.checkpoints`): the step and
best folder names, the files inside a checkpoint, which checkpoints are complete, and which one
resume, extraction and export take. Reading and writing a checkpoint's contents is elsewhere
(jaguar.core.weights for inference, jaguar.train.checkpoint for the training state); the names are
spelled only here.

    RUN/checkpoints/step-NNNNNN/    a step checkpoint (the newest `train.keep_last` are kept)
    RUN/checkpoints/best/           the best validation checkpoint (`train.keep_best`)
    RUN/checkpoints/.NAME.partial/  a checkpoint being written (renamed into place when complete)
      trainer_state.json            written last: marks the checkpoint complete, records checksums
      weights.safetensors           consolidated model weights (fp32 masters under DeepSpeed)
      weights_ema.safetensors       the EMA model's weights (optim.ema)
      jaguar_state.pt               jaguar's own objects' state dicts: tensors and plain data only
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from jaguar.errors import MissingInputError

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "weights.safetensors"
EMA_WEIGHTS_FILE = "weights_ema.safetensors"
EXTRA_STATE_FILE = "jaguar_state.pt"
BEST = "best"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_NO_RESUME = ("", "none", "no", "false")


def is_complete(path: Path) -> bool:
    """Whether a checkpoint folder is complete (its trainer_state.json, written last, exists)."""
    return (Path(path) / STATE_FILE).is_file()


class CheckpointFolder:
    """RUN/checkpoints: names and listing of its checkpoints. Nothing here reads their contents."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"CheckpointFolder({str(self.path)!r})"

    @staticmethod
    def step_name(step: int) -> str:
        return f"step-{int(step):06d}"

    @staticmethod
    def is_step_name(name: str) -> bool:
        return _STEP_DIR.match(name) is not None

    def step_dir(self, step: int) -> Path:
        return self.path / self.step_name(step)

    @property
    def best(self) -> Path:
        return self.path / BEST

    def partial_dir(self, name: str) -> Path:
        """Where checkpoint `name` is written before it is renamed into place."""
        return self.path / f".{name}.partial"

    def partial_leftovers(self) -> list[Path]:
        """Hidden partial folders of killed saves."""
        return sorted(self.path.glob(".*.partial")) if self.path.is_dir() else []

    def steps(self) -> list[Path]:
        """Complete step checkpoints, oldest first. Temporary and half-written folders are ignored."""
        if not self.path.is_dir():
            return []
        found = []
        for path in self.path.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and path.is_dir() and is_complete(path):
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found)]

    def complete(self) -> list[Path]:
        """Every complete checkpoint: the step ones oldest first, then best when kept."""
        return self.steps() + ([self.best] if is_complete(self.best) else [])

    def latest(self) -> Optional[Path]:
        steps = self.steps()
        return steps[-1] if steps else None

    def best_or_latest(self) -> Optional[Path]:
        """The checkpoint extraction and export use by default: best if kept, else the newest step."""
        return self.best if is_complete(self.best) else self.latest()

    def resume_from(self, resume: str) -> Optional[Path]:
        """The checkpoint `train.resume` asks for: auto -> the newest complete step one (or None), none
        -> None, a path -> that checkpoint (MissingInputError naming the key when it is not complete)."""
        if resume in _NO_RESUME:
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not is_complete(path):
            raise MissingInputError(f"train.resume={resume}: no complete checkpoint there (missing {STATE_FILE})")
        return path
