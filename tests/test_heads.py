"""ArcFace / sub-center ArcFace / CosFace / softmax heads against their closed forms, incl. half precision."""

import math

import numpy as np
import pytest
import torch

from jaguar.config import load_config
from jaguar.models.heads import (ArcFaceMargin, CosFaceMargin, CosineClassifier, LinearClassifier, NoMargin,
                                 build_head, build_margin)

S, M = 30.0, 0.5


def arcface_target(c: float, s: float = S, m: float = M, easy: bool = False) -> float:
    """Closed form, written from the paper: s*cos(theta+m) where theta+m stays <= pi, else s*(c - m*sin m);
    cos is first kept 1e-6 inside [-1, 1] (the documented clamp that keeps gradients finite)."""
    c = min(max(c, -1.0 + 1e-6), 1.0 - 1e-6)
    theta = math.acos(c)
    if easy:
        return s * math.cos(theta + m) if c > 0 else s * c
    if theta + m <= math.pi:
        return s * math.cos(theta + m)
    return s * (c - m * math.sin(m))


def test_arcface_margin_closed_form_across_angles():
    # theta near 0, generic angles, the fallback region (theta + m > pi) and theta near pi.
    cos_values = [0.99999999, 0.7, 0.1, -0.6, -0.95, -0.99999999]
    cosine = torch.tensor([[c, 0.25, -0.3] for c in cos_values], dtype=torch.float64)
    labels = torch.zeros(len(cos_values), dtype=torch.long)
    logits = ArcFaceMargin(S, M)(cosine, labels).numpy()
    for row, c in enumerate(cos_values):
        assert logits[row, 0] == pytest.approx(arcface_target(c), abs=5e-4)
        np.testing.assert_allclose(logits[row, 1:], [S * 0.25, S * -0.3], rtol=1e-6)
    # cos(theta + m) < cos(theta): the margin makes the target harder, never easier.
    assert (logits[:, 0] < S * np.array(cos_values) + 1e-6).all()


def test_arcface_easy_margin_only_for_positive_cosine():
    cosine = torch.tensor([[0.6, 0.0], [-0.4, 0.0]])
    logits = ArcFaceMargin(S, M, easy_margin=True)(cosine, torch.tensor([0, 0]))
    assert logits[0, 0].item() == pytest.approx(arcface_target(0.6, easy=True), rel=1e-5)
    assert logits[1, 0].item() == pytest.approx(S * -0.4, rel=1e-5)


def test_arcface_head_cosine_and_inference_without_margin():
    torch.manual_seed(0)
    head, margin = CosineClassifier(8, 5), ArcFaceMargin(S, M)
    features = torch.randn(4, 8)
    weight = head.weight.detach().numpy()
    x = features.numpy()
    cosine = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (weight / np.linalg.norm(weight, axis=1, keepdims=True)).T
    np.testing.assert_allclose(margin(head(features)).detach().numpy(), S * cosine, rtol=1e-5, atol=1e-5)
    labels = torch.tensor([1, 0, 4, 2])
    with_margin = margin(head(features), labels).detach().numpy()
    for row, label in enumerate(labels.tolist()):
        assert with_margin[row, label] == pytest.approx(arcface_target(float(cosine[row, label])), abs=1e-4)


def test_cosface_closed_form():
    cosine = torch.tensor([[0.9, 0.2, -0.5], [0.1, -0.99, 0.4]])
    logits = CosFaceMargin(S, 0.35)(cosine, torch.tensor([0, 2]))
    expected = S * cosine.numpy().copy()
    expected[0, 0] = S * (0.9 - 0.35)
    expected[1, 2] = S * (0.4 - 0.35)
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-6)
    assert CosFaceMargin(S, 0.35)(CosineClassifier(4, 3)(torch.randn(2, 4)), torch.tensor([0, 1])).shape == (2, 3)


def test_subcenter_takes_the_best_centre_then_the_margin():
    head = CosineClassifier(2, num_classes=2, subcenters=3)
    angles = [0.0, 1.0, 2.5, 3.0, 0.3, 1.7]  # class 0: centres at 0, 1, 2.5 rad; class 1: 3.0, 0.3, 1.7
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[math.cos(a), math.sin(a)] for a in angles]))
    feature_angle = 0.8
    features = torch.tensor([[math.cos(feature_angle), math.sin(feature_angle)]])
    best_cos = [max(math.cos(feature_angle - a) for a in angles[k * 3:(k + 1) * 3]) for k in range(2)]
    np.testing.assert_allclose(head(features).detach().numpy()[0], best_cos, rtol=1e-5)
    logits = ArcFaceMargin(S, M)(head(features), torch.tensor([1])).detach().numpy()[0]
    assert logits[0] == pytest.approx(S * best_cos[0], rel=1e-5)
    assert logits[1] == pytest.approx(arcface_target(best_cos[1]), abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_name", ["arcface", "subcenter_arcface", "cosface"])
def test_margin_heads_are_finite_in_half_precision_at_cos_plus_minus_one(dtype, head_name):
    cfg = load_config(None, [f"model.head={head_name}"])
    head, margin = build_head(cfg.model, 4, 3), build_margin(cfg.model)
    weight = head.weight.detach()
    # features exactly on (cos = 1) and exactly opposite (cos = -1) a class centre, the acos danger zone.
    features = torch.stack([weight[0], -weight[0], weight[1] * 3, torch.randn(4)]).to(dtype).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 2])
    logits = margin(head(features), labels)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, labels).backward()
    assert torch.isfinite(features.grad.float()).all()
    assert torch.isfinite(head.weight.grad).all()
    assert features.grad.abs().sum() > 0


def test_softmax_head_is_a_bias_free_linear_classifier_without_margin():
    cfg = load_config(None, ["model.head=softmax"])
    head, margin = build_head(cfg.model, 6, 4), build_margin(cfg.model)
    assert isinstance(head, LinearClassifier) and isinstance(margin, NoMargin)
    assert [name for name, _ in head.named_parameters()] == ["weight"]
    features = torch.randn(3, 6)
    expected = features @ head.weight.detach().t()
    torch.testing.assert_close(margin(head(features), torch.tensor([0, 1, 2])).detach(), expected)
    torch.testing.assert_close(head(features).detach(), expected)


def test_build_head_follows_config():
    cfg = load_config(None, ["model.head=subcenter_arcface", "model.subcenters=4", "model.head_scale=16",
                             "model.head_margin=0.3", "model.easy_margin=true"])
    head, margin = build_head(cfg.model, 8, 5), build_margin(cfg.model)
    assert isinstance(head, CosineClassifier) and isinstance(margin, ArcFaceMargin)
    assert head.weight.shape == (20, 8)
    assert (margin.scale, margin.margin, margin.easy_margin) == (16.0, 0.3, True)
