"""The picture of a verified match, for a person to check: the query photo and a candidate side by
side at one height, a line between each pair of matched keypoints, and the inlier count, as
HotSpotter's review screen shows the matched regions (Crall et al., WACV 2013). A biologist confirms
a match by seeing that the lines join the same rosettes."""

from __future__ import annotations

import colorsys
from typing import Optional

import cv2
import numpy as np

from jaguar.retrieval.local.keypoints import FOREGROUND_ALPHA, check_rgba

_GAP = 8  # pixels between the two photos
_CAPTION = 22  # pixels of the caption band under them
_BACKGROUND_DIM = 0.45  # the background's brightness beside the animal's (the coat stands out)


def _as_rgb(rgba: np.ndarray) -> np.ndarray:
    """RGB of an RGBA photo with the background (alpha < 128) dimmed, so the coat stands out."""
    rgb = rgba[..., :3].astype(np.float32)
    background = rgba[..., 3] < FOREGROUND_ALPHA
    rgb[background] *= _BACKGROUND_DIM
    return rgb.astype(np.uint8)


def _colours(count: int) -> list[tuple[int, int, int]]:
    """`count` distinct bright RGB colours (hues around the circle)."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((0.61803 * i) % 1.0, 0.85, 1.0)) for i in range(count)]


def draw_match(query_rgba: np.ndarray, gallery_rgba: np.ndarray, query_xy: np.ndarray, gallery_xy: np.ndarray,
               height: int = 256, caption: Optional[str] = None, max_lines: int = 100) -> np.ndarray:
    """An RGB uint8 picture (height + caption band) x (both widths + gap) x 3: the query photo left,
    the gallery photo right, each scaled to `height` pixels, a line for each correspondence
    query_xy[i] -> gallery_xy[i] ((K, 2) pixels of each photo, as `PairMatch` / `ShortlistMatches`
    give them; at most `max_lines` drawn, evenly spread), and the caption (default "K inliers").
    Raises LocalFeatureError when a photo is not H x W x 4 uint8, ValueError when the point arrays
    differ in length."""
    query_rgba, gallery_rgba = check_rgba(query_rgba), check_rgba(gallery_rgba)
    query_xy = np.asarray(query_xy, dtype=np.float64).reshape(-1, 2)
    gallery_xy = np.asarray(gallery_xy, dtype=np.float64).reshape(-1, 2)
    if len(query_xy) != len(gallery_xy):
        raise ValueError(f"{len(query_xy)} query points but {len(gallery_xy)} gallery points")
    panels, scales = [], []
    for rgba in (query_rgba, gallery_rgba):
        scale = height / rgba.shape[0]
        width = max(1, round(rgba.shape[1] * scale))
        panels.append(cv2.resize(_as_rgb(rgba), (width, height), interpolation=cv2.INTER_AREA))
        scales.append(np.array([width / rgba.shape[1], scale]))
    offset = panels[0].shape[1] + _GAP
    canvas = np.full((height + _CAPTION, offset + panels[1].shape[1], 3), 24, dtype=np.uint8)
    canvas[:height, :panels[0].shape[1]] = panels[0]
    canvas[:height, offset:] = panels[1]
    shown = np.arange(len(query_xy))
    if len(shown) > max_lines:
        shown = np.linspace(0, len(query_xy) - 1, max_lines).round().astype(int)
    # pixel centres: a point x in a photo lands at (x + 0.5) * scale - 0.5 in its panel
    starts = (query_xy[shown] + 0.5) * scales[0] - 0.5
    ends = (gallery_xy[shown] + 0.5) * scales[1] - 0.5 + np.array([offset, 0])
    for (start, end), colour in zip(zip(starts, ends), _colours(len(shown))):
        a, b = tuple(int(round(v)) for v in start), tuple(int(round(v)) for v in end)
        cv2.line(canvas, a, b, colour, 1, cv2.LINE_AA)
        cv2.circle(canvas, a, 3, colour, 1, cv2.LINE_AA)
        cv2.circle(canvas, b, 3, colour, 1, cv2.LINE_AA)
    text = caption if caption is not None else f"{len(query_xy)} inliers"
    cv2.putText(canvas, text, (6, height + _CAPTION - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (235, 235, 235), 1,
                cv2.LINE_AA)
    return canvas
