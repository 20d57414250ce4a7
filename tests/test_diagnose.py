"""Shortcut diagnostics: the image variants (no animal pixel left in a background-only image), and
diagnose's figures equal the evaluator's on hand-made features."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from jaguar.data.variants import background_only, foreground_only, hole_margin, mirrored, silhouette_only
from jaguar.retrieval.diagnose import context_ratios, flank_rows, mirror_similarity, retrieval_row
from jaguar.core.evaluator import chance_map_balanced, evaluate


def _photo(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """(RGBA photo, animal mask): a pure red animal with a soft rim whose colour bleeds a pixel
    beyond the mask (as a blurred photo's does) on a green/blue textured background without red."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    inside = ((xx - 50) / 30.0) ** 2 + ((yy - 45) / 18.0) ** 2
    alpha = np.clip((1.15 - inside) / 0.3, 0, 1)  # soft edge
    rgb = np.zeros((size, size, 3), dtype=np.float64)
    rgb[..., 1] = 60 + 120 * rng.random((size, size))
    rgb[..., 2] = 40 + 100 * (xx / size)
    bleed = np.clip((1.3 - inside) / 0.3, 0, 1)  # the coat's colour reaches a little past the mask
    rgb = rgb * (1 - bleed[..., None]) + np.array([230.0, 10.0, 10.0]) * bleed[..., None]
    alpha8 = np.round(alpha * 255).astype(np.uint8)
    return np.dstack([rgb.astype(np.uint8), alpha8]), alpha8 > 0


def _reddish(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int32)
    return rgb[..., 0] > rgb[..., 1] + 30


def test_background_only_images_contain_no_animal_pixel():
    rgba, animal = _photo()
    assert _reddish(rgba[..., :3]).sum() > animal.sum()  # the rim bleeds past the mask
    out, meta = background_only(rgba, {"alpha_bbox": [1, 2, 3, 4]}, fill=(124, 116, 104))
    assert out.shape == rgba.shape and out.dtype == np.uint8
    assert (out[..., 3] == 0).all()  # an empty mask: no animal, and no hole outlines the silhouette
    assert not _reddish(out[..., :3]).any()  # no animal pixel, not even of its blurred rim
    far = ~cv2.dilate(animal.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
    assert np.array_equal(out[far, :3], rgba[far, :3])  # the background itself is untouched
    assert meta == {"alpha_bbox": [1, 2, 3, 4]}
    assert hole_margin(96, 96) == 2 and hole_margin(1000, 400) == 10
    everything = rgba.copy()
    everything[..., 3] = 255  # all animal: no background to inpaint from, a flat fill
    assert (background_only(everything, {}, fill=(1, 2, 3))[0][..., :3] == (1, 2, 3)).all()


def test_foreground_silhouette_and_mirror_variants():
    rgba, animal = _photo()
    solid = rgba[..., 3] == 255
    fore, _ = foreground_only(rgba, {}, fill=(124, 116, 104))
    assert (fore[~animal, :3] == (124, 116, 104)).all() and np.array_equal(fore[solid], rgba[solid])
    shape, _ = silhouette_only(rgba, {}, fill=(124, 116, 104))
    assert (shape[solid, :3] == 235).all() and (shape[~animal, :3] == (124, 116, 104)).all()
    assert np.array_equal(shape[..., 3], rgba[..., 3])
    flipped, meta = mirrored(rgba, {"alpha_bbox": [10, 5, 30, 20]})
    assert np.array_equal(flipped, rgba[:, ::-1]) and meta["alpha_bbox"] == [66, 5, 86, 20]


def _hand_made() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    generator = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    embeddings = torch.nn.functional.normalize(torch.randn(10, 6, generator=generator) + 2 * torch.nn.functional.one_hot(
        labels, 6).float(), dim=1)
    views = ["left", "right", "left", "right", "right", "unknown", "left", "right", "left", "left"]
    return embeddings, labels, views


def test_diagnose_figures_equal_the_evaluators_on_hand_made_features():
    embeddings, labels, views = _hand_made()
    scores = (embeddings @ embeddings.T).numpy()
    row = retrieval_row("original", embeddings, labels)
    reference = evaluate(scores, labels.numpy(), kind="similarity")
    assert row.mAP_balanced == reference.mAP_balanced and row.num_queries == reference.num_queries == 10
    assert row.chance == chance_map_balanced(labels.numpy())
    same, cross = flank_rows(embeddings, labels, views)
    known = [v != "unknown" for v in views]
    same_mask = np.array([[known[i] and known[j] and views[i] == views[j] for j in range(10)] for i in range(10)])
    cross_mask = np.array([[known[i] and known[j] and views[i] != views[j] for j in range(10)] for i in range(10)])
    for got, mask in ((same, same_mask), (cross, cross_mask)):
        expected = evaluate(scores, labels.numpy(), kind="similarity", candidates=mask)
        assert got.mAP_balanced == expected.mAP_balanced and got.num_queries == expected.num_queries
        assert got.chance == chance_map_balanced(labels.numpy(), mask)
    # identity 3 has both images on the left: no cross-flank match, so fewer queries there
    assert cross.num_queries < 10 and same.num_queries < 10
    none = flank_rows(embeddings, labels, ["left"] * 10)[1]
    assert none.mAP_balanced is None and "no query has a true match" in none.note


def test_mirror_similarity_and_context_ratio_on_hand_made_features():
    embeddings, labels, _ = _hand_made()
    mirror = torch.nn.functional.normalize(embeddings + 0.3 * torch.flip(embeddings, dims=[1]), dim=1)
    figures = mirror_similarity(embeddings, mirror, labels)
    cosine = (embeddings * mirror).sum(dim=1).double().numpy()
    assert figures.median == pytest.approx(float(np.median(cosine)))
    assert figures.p10 == pytest.approx(float(np.quantile(cosine, 0.1)))
    assert sum(figures.histogram_counts) == 10 and len(figures.histogram_edges) == 41
    pairs = (embeddings @ embeddings.T).numpy()
    same = [pairs[i, j] for i in range(10) for j in range(10) if i != j and labels[i] == labels[j]]
    assert figures.same_identity_mean == pytest.approx(float(np.mean(same)))
    rows = [retrieval_row("foreground only", embeddings, labels), retrieval_row("background only", mirror, labels)]
    ratio, above = context_ratios(rows)
    assert ratio == pytest.approx(rows[1].mAP_balanced / rows[0].mAP_balanced)
    assert above == pytest.approx((rows[1].mAP_balanced - rows[1].chance) / (rows[0].mAP_balanced - rows[0].chance))
