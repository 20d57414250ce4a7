"""Training losses of the ReID model: (label-smoothed, mixup-aware) cross-entropy on the head's
margin logits, batch-hard triplet and center loss on the pre-BNNeck features, and distillation of a
teacher's embeddings into the retrieval embedding, combined with the configured weights.

The head's margin (ArcFace, CosFace; `build_margin`) is applied here and only here, to the model's
margin-free `ReIDOutput.similarity`: once per target set under mixup, so margin heads get cos(θ+m)
on each mixed target. Triplet and center terms are skipped for mixed batches (their labels are
ambiguous); the centres then get a zero gradient, so that every trainable parameter has a gradient
after every backward, as DDP expects of the module it wraps (jaguar.train.optim.TrainedModules)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from jaguar.config import Config
from jaguar.models.heads import build_margin
from jaguar.models.reid import ReIDOutput


def pairwise_euclidean(features: torch.Tensor) -> torch.Tensor:
    """B x B Euclidean distances, with a floor inside the sqrt so the zero diagonal has finite gradients."""
    squared = features.pow(2).sum(dim=1)
    dist2 = squared[:, None] + squared[None, :] - 2.0 * features @ features.t()
    return dist2.clamp(min=1e-12).sqrt()


def batch_hard_triplet_loss(features: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over anchors of max(0, d(a, hardest positive) - d(a, hardest negative) + margin);
    soft margin log(1 + exp(d_ap - d_an)) when margin == 0. Anchors without a negative are skipped."""
    features = features.float()
    dist = pairwise_euclidean(features)
    same = labels[:, None] == labels[None, :]
    hardest_positive = dist.masked_fill(~same, float("-inf")).amax(dim=1)
    hardest_negative = dist.masked_fill(same, float("inf")).amin(dim=1)
    valid = torch.isfinite(hardest_negative)
    if not bool(valid.any()):
        return features.sum() * 0.0
    gap = hardest_positive[valid] - hardest_negative[valid]
    if margin > 0:
        return F.relu(gap + margin).mean()
    return F.softplus(gap).mean()


def similarity_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Relational distillation: the mean squared difference between the B x B cosine-similarity
    matrices of the student's and the teacher's embeddings of one batch (B x Ds and B x Dt, any
    widths), over the B(B-1) pairs of distinct images. Zero when the student ranks the batch with
    the teacher's similarities. Similarity-preserving KD (Tung & Mori, ICCV 2019) on cosine
    similarities, as relational KD's (Park et al., CVPR 2019) pairwise term."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student and teacher embeddings of different batches: {student.shape[0]} vs "
                         f"{teacher.shape[0]}")
    batch = student.shape[0]
    if batch < 2:
        return student.float().sum() * 0.0
    s = F.normalize(student.float(), dim=1, eps=1e-6)
    t = F.normalize(teacher.float(), dim=1, eps=1e-6)
    difference = s @ s.t() - t @ t.t()  # the diagonal is 1 - 1 = 0 for non-zero embeddings
    return difference.pow(2).sum() / (batch * (batch - 1))


def cosine_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean over the batch of 1 - cos(student_i, teacher_i); the widths must be equal (B x D each)."""
    if student.shape != teacher.shape:
        raise ValueError(f"cosine distillation needs embeddings of one width: student {tuple(student.shape)}, "
                         f"teacher {tuple(teacher.shape)}")
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=1, eps=1e-6)).mean()


DISTILLATION_LOSSES = {"similarity": similarity_distillation_loss, "cosine": cosine_distillation_loss}


class CenterLoss(nn.Module):
    """mean over the batch of ||x - c_y||^2 with a learnable centre c per identity (Wen et al.)."""

    def __init__(self, num_classes: int, feat_dim: int) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (features.float() - self.centers[labels]).pow(2).sum(dim=1).mean()


class ReIDCriterion(nn.Module):
    """forward(output, labels, mix=None, teacher=None) -> {"loss": weighted total, "ce"/"triplet"/
    "center"/"distill": raw terms}. `teacher`: B x Dt teacher embeddings of the batch's images
    (distill.teacher); the distillation term is skipped for mixed batches (a mixed image has no
    teacher embedding).

    The centres get the gradient of the unweighted center loss (BoT divides their gradient by the
    weight before its SGD step); here that is built into the loss graph, so the trainer only needs
    `center_optimizer.step()` with the other step. Under mixup the centres get a zero gradient (a
    plain SGD step leaves them exactly as they are)."""

    def __init__(self, cfg: Config, num_classes: int, feat_dim: int) -> None:
        super().__init__()
        loss_cfg = cfg.loss
        self.ce_weight = loss_cfg.ce_weight
        self.triplet_weight = loss_cfg.triplet_weight
        self.triplet_margin = loss_cfg.triplet_margin
        self.center_weight = loss_cfg.center_weight
        self.label_smoothing = loss_cfg.label_smoothing
        self.margin = build_margin(cfg.model)
        self.center: Optional[CenterLoss] = (CenterLoss(num_classes, feat_dim)
                                             if self.center_weight > 0 else None)
        self.distill_weight = cfg.distill.weight if cfg.distill.teacher else 0.0
        self.distill_loss = DISTILLATION_LOSSES[cfg.distill.loss]

    def _cross_entropy(self, similarity: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.margin(similarity, labels)
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def forward(self, output: ReIDOutput, labels: torch.Tensor, mix: Optional[tuple[torch.Tensor, float]] = None,
                teacher: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        total = output.features.new_zeros((), dtype=torch.float32)
        if self.ce_weight > 0:
            if mix is None:
                ce = self._cross_entropy(output.similarity, labels)
            else:
                labels_b, lam = mix
                ce = (lam * self._cross_entropy(output.similarity, labels)
                      + (1.0 - lam) * self._cross_entropy(output.similarity, labels_b))
            terms["ce"] = ce
            total = total + self.ce_weight * ce
        if mix is None and self.triplet_weight > 0:
            triplet = batch_hard_triplet_loss(output.features, labels, self.triplet_margin)
            terms["triplet"] = triplet
            total = total + self.triplet_weight * triplet
        if mix is None and self.center is not None:
            # Same value as weight * center; features get the weighted gradient, centres the unweighted one.
            from_features = (output.features.float() - self.center.centers.detach()[labels]).pow(2).sum(1).mean()
            toward_centers = self.center(output.features.detach(), labels)
            terms["center"] = from_features
            total = total + self.center_weight * from_features + (toward_centers - toward_centers.detach())
        elif self.center is not None:
            total = total + 0.0 * self.center.centers.sum()
        if mix is None and teacher is not None and self.distill_weight > 0:
            distill = self.distill_loss(output.embedding, teacher)
            terms["distill"] = distill
            total = total + self.distill_weight * distill
        return {"loss": total, **terms}
