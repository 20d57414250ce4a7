"""ReID models: a timm backbone, global pooling, BNNeck and a margin head, plus the training losses."""

from jaguar.models.losses import ReIDCriterion
from jaguar.models.reid import ReIDModel, ReIDOutput, build_model

__all__ = ["ReIDCriterion", "ReIDModel", "ReIDOutput", "build_model"]
