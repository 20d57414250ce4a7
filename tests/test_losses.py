"""Cross-entropy (label smoothing, mixup with margins), batch-hard triplet and center loss, and weighting."""

import math

import numpy as np
import pytest
import torch

from jaguar.config import ConfigError, load_config
from jaguar.models.losses import ReIDCriterion, batch_hard_triplet_loss
from jaguar.models.reid import ReIDOutput
from jaguar.train.optim import build_center_optimizer


def make_output(features: torch.Tensor, similarity: torch.Tensor) -> ReIDOutput:
    return ReIDOutput(features=features, embedding=features, similarity=similarity)


# 1-D points on a line: labels 0, 0, 1, 1 at 0, 1, 3, 7.
POINTS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [7.0, 0.0]])
LABELS = torch.tensor([0, 0, 1, 1])
# hardest positive / negative per anchor, by hand: (1, 3), (1, 2), (4, 2), (4, 6)
GAPS = [1 - 3, 1 - 2, 4 - 2, 4 - 6]


def test_batch_hard_triplet_with_margin_matches_hand_computation():
    loss = batch_hard_triplet_loss(POINTS, LABELS, margin=0.3)
    expected = sum(max(0.0, gap + 0.3) for gap in GAPS) / 4  # only anchor 2 violates: 2.3 / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.575)


def test_batch_hard_triplet_soft_margin_matches_hand_computation():
    loss = batch_hard_triplet_loss(POINTS, LABELS, margin=0.0)
    expected = sum(math.log1p(math.exp(gap)) for gap in GAPS) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_triplet_gradients_finite_and_anchors_without_negatives_skipped():
    features = POINTS.clone().requires_grad_(True)
    batch_hard_triplet_loss(features, LABELS, margin=0.3).backward()
    assert torch.isfinite(features.grad).all()
    # only anchor 2 (at 3: positive 7, negative 1) is active: d(3,7) - d(3,1) + m, divided by 4 anchors;
    # descent moves 3 toward 7 and away from 1, and pulls 7 and 1 the other way.
    torch.testing.assert_close(features.grad[:, 0], torch.tensor([0.0, 0.25, -0.5, 0.25]))
    one_identity = batch_hard_triplet_loss(POINTS, torch.zeros(4, dtype=torch.long), margin=0.3)
    assert one_identity.item() == 0.0


def criterion_for(overrides: list[str], num_classes: int = 3, feat_dim: int = 2) -> ReIDCriterion:
    return ReIDCriterion(load_config(None, overrides), num_classes, feat_dim)


def test_label_smoothing_value():
    criterion = criterion_for(["model.head=softmax", "loss.label_smoothing=0.2"])
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    labels = torch.tensor([0, 1])
    losses = criterion(make_output(torch.zeros(2, 2), logits), labels)
    log_p = logits.numpy() - np.log(np.exp(logits.numpy()).sum(1, keepdims=True))
    expected = np.mean([0.8 * -log_p[i, y] + 0.2 * -log_p[i].mean() for i, y in enumerate([0, 1])])
    assert losses["ce"].item() == pytest.approx(expected, rel=1e-5)
    assert set(losses) == {"loss", "ce"} and losses["loss"].item() == pytest.approx(expected, rel=1e-5)


def arcface_logits(cosine: np.ndarray, labels: list[int], s: float = 30.0, m: float = 0.5) -> np.ndarray:
    logits = s * cosine.copy()
    for row, label in enumerate(labels):
        theta = math.acos(cosine[row, label])
        logits[row, label] = s * math.cos(theta + m)
    return logits


def cross_entropy(logits: np.ndarray, labels: list[int]) -> float:
    log_p = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    return float(np.mean([-log_p[i, y] for i, y in enumerate(labels)]))


def test_mixup_recomputes_the_margin_for_each_target_and_skips_metric_losses():
    criterion = criterion_for(["model.head=arcface", "loss.triplet_weight=1", "loss.center_weight=0.01"])
    cosine = torch.tensor([[0.6, 0.1, -0.2], [0.3, 0.5, 0.2]])
    labels_a, labels_b, lam = [0, 1], [2, 0], 0.7
    losses = criterion(make_output(torch.randn(2, 2), cosine), torch.tensor(labels_a),
                       mix=(torch.tensor(labels_b), lam))
    expected = (lam * cross_entropy(arcface_logits(cosine.numpy(), labels_a), labels_a)
                + (1 - lam) * cross_entropy(arcface_logits(cosine.numpy(), labels_b), labels_b))
    assert losses["ce"].item() == pytest.approx(expected, rel=1e-5)
    assert set(losses) == {"loss", "ce"}
    # the centres get a zero gradient, not none: DDP expects one for every parameter it wraps
    losses["loss"].backward()
    assert torch.equal(criterion.center.centers.grad, torch.zeros_like(criterion.center.centers))
    unmixed = criterion(make_output(POINTS[:2], cosine), torch.tensor(labels_a))
    assert unmixed["ce"].item() == pytest.approx(cross_entropy(arcface_logits(cosine.numpy(), labels_a),
                                                               labels_a), rel=1e-5)


def test_weighted_total_of_all_terms():
    criterion = criterion_for(["model.head=cosface", "model.head_margin=0.2", "loss.ce_weight=0.5",
                               "loss.triplet_weight=2", "loss.triplet_margin=0.3", "loss.center_weight=0.1"],
                              num_classes=2)
    cosine = torch.tensor([[0.5, 0.1], [0.2, 0.4], [0.0, 0.3], [0.9, -0.1]])
    losses = criterion(make_output(POINTS, cosine), LABELS)
    assert set(losses) == {"loss", "ce", "triplet", "center"}
    total = 0.5 * losses["ce"] + 2 * losses["triplet"] + 0.1 * losses["center"]
    assert losses["loss"].item() == pytest.approx(total.item(), rel=1e-5)
    assert losses["triplet"].item() == pytest.approx(0.575, rel=1e-5)


def test_center_loss_value_and_bot_gradient_scaling():
    weight = 0.05
    cfg = load_config(None, ["loss.ce_weight=0", f"loss.center_weight={weight}", "loss.center_lr=0.5"])
    criterion = ReIDCriterion(cfg, 2, 2)
    with torch.no_grad():
        criterion.center.centers.copy_(torch.tensor([[0.0, 0.0], [5.0, 1.0]]))
    features = POINTS.clone().requires_grad_(True)
    losses = criterion(make_output(features, torch.zeros(4, 2)), LABELS)
    # squared distances to own centre: 0, 1, 4+1, 4+1 -> mean 2.75
    assert losses["center"].item() == pytest.approx(2.75)
    assert losses["loss"].item() == pytest.approx(weight * 2.75)
    losses["loss"].backward()
    centers = criterion.center.centers
    diff = POINTS - centers.detach()[LABELS]
    # features see the weighted gradient; the centres the unweighted one (BoT's grad / weight).
    torch.testing.assert_close(features.grad, weight * 2 * diff / 4)
    torch.testing.assert_close(centers.grad[1], -(2 * diff[2:] / 4).sum(0))
    optimizer = build_center_optimizer(cfg, criterion)
    assert optimizer is not None and optimizer.param_groups[0]["lr"] == 0.5
    optimizer.step()
    # centre 1 moves toward the mean of its features (5, 0): (5, 1) + 0.5 * 2 * 2 * (0, -1) / 4
    torch.testing.assert_close(centers.detach()[1], torch.tensor([5.0, 0.5]))


def test_invalid_loss_settings_name_the_key():
    with pytest.raises(ConfigError, match="loss.ce_weight"):
        criterion_for(["loss.ce_weight=0"])
    with pytest.raises(ConfigError, match="loss.label_smoothing"):
        criterion_for(["loss.label_smoothing=-0.1"])
