"""The teacher's side of knowledge distillation (distill.teacher): the teacher run's embeddings of
the student's training images, precomputed by `jaguar extract TEACHER --split train` (and `--split
val` for images the teacher held out), looked up by the images' positions in the training split,
which the training loader yields with each batch. The loss is jaguar.models.losses' distillation
term. The embeddings are the teacher's extraction (eval transform, flip TTA), so they are targets
for the student's augmented views of the same images (offline distillation)."""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from jaguar.config import Config, ConfigError
from jaguar.errors import MissingInputError
from jaguar.core.features import FeatureSet
from jaguar.run import RunDir

log = logging.getLogger(__name__)


class TeacherEmbeddings:
    """Teacher embeddings (M x Dt, L2-normalised, float32) of the training images, by position in
    the training split: `lookup(positions)` -> B x Dt."""

    def __init__(self, embeddings: torch.Tensor, row_of_position: torch.Tensor, source: str = "") -> None:
        self.embeddings = embeddings
        self.row_of_position = row_of_position  # len(split) int64; -1 where the image is not trained on
        self.source = source

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def lookup(self, positions: torch.Tensor | Sequence[int]) -> torch.Tensor:
        rows = self.row_of_position[torch.as_tensor(positions, dtype=torch.long).cpu()]
        if bool((rows < 0).any()):
            raise ValueError("a training image has no teacher embedding (positions outside the training images)")
        return self.embeddings[rows]

    @classmethod
    def from_features(cls, features: FeatureSet, filenames: Sequence[str], train_positions: Sequence[int],
                      where: str) -> "TeacherEmbeddings":
        """The rows of `features` for the training images (`filenames[p]` for p in train_positions).
        Raises ConfigError naming the images the features lack and the command that adds them."""
        row_of_name = {name: row for row, name in enumerate(features.names)}
        missing = [filenames[p] for p in train_positions if filenames[p] not in row_of_name]
        if missing:
            raise ConfigError(f"the teacher's features ({where}) lack {len(missing)} of the {len(train_positions)} "
                              f"training images (e.g. {missing[:3]}): extract them with the teacher, `jaguar extract "
                              f"TEACHER --split train` and `--split val`, on the same data.shards")
        row_of_position = torch.full((len(filenames),), -1, dtype=torch.long)
        rows = torch.tensor([row_of_name[filenames[p]] for p in train_positions], dtype=torch.long)
        row_of_position[torch.as_tensor(list(train_positions), dtype=torch.long)] = torch.arange(len(rows))
        return cls(features.embeddings[rows].float().contiguous(), row_of_position,
                   str(features.meta.get("source", "")))


def load_teacher(cfg: Config, filenames: Sequence[str], train_positions: Sequence[int],
                 student_dim: int) -> TeacherEmbeddings:
    """The teacher embeddings of the training images from the run `distill.teacher` (its train
    features, with its val features when it has them). Raises MissingInputError when the teacher
    has no train features, ConfigError when images are missing or distill.loss=cosine meets
    another width than the student's."""
    teacher = RunDir(cfg.distill.teacher)
    if not teacher.path.is_dir():
        raise ConfigError(f"distill.teacher={cfg.distill.teacher} is not a folder; give the teacher's run folder")
    if not teacher.has_features("train"):
        raise MissingInputError(f"distill.teacher: {teacher.features_path('train')} does not exist; extract the "
                                f"teacher's embeddings of the training images first: `jaguar extract {teacher.path} "
                                f"--split train` (and `--split val`)")
    features = teacher.load_features("train")
    where = str(teacher.features_path("train"))
    if teacher.has_features("val"):
        val = teacher.load_features("val")
        known = set(features.names)
        extra = [name for name in val.names if name not in known]
        if extra:
            val = val.select(extra)
            features = FeatureSet(features.names + val.names, torch.cat([features.embeddings, val.embeddings]),
                                  torch.cat([features.labels, val.labels]), meta=features.meta)
            where += f" + {teacher.features_path('val')}"
    table = TeacherEmbeddings.from_features(features, filenames, train_positions, where)
    if cfg.distill.loss == "cosine" and table.dim != student_dim:
        raise ConfigError(f"distill.loss=cosine compares embeddings of one width, but the teacher's are {table.dim}-dim "
                          f"and the student's {student_dim}-dim: set model.reduce_dim={table.dim}, or use "
                          f"distill.loss=similarity (any widths)")
    log.info("distilling from %s: %d-dim teacher embeddings of %d training images (%s, weight %g)", teacher.path,
             table.dim, len(train_positions), cfg.distill.loss, cfg.distill.weight)
    return table
