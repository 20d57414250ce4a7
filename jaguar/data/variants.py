"""Diagnostic variants of an RGBA photo (alpha = the animal's mask), made before any transform so a
run's own eval transform sees them as it sees its photos (`jaguar diagnose`):

- foreground only: the background replaced by a flat fill (what the animal alone tells);
- background only: the animal removed by its mask, the hole (grown by a few pixels, so the blurred
  rim of the coat goes too) filled by OpenCV's inpainting (Telea, "An Image Inpainting Technique
  Based on the Fast Marching Method", 2004), and an empty mask: a photo of the scene with no animal
  in it, which the run's alpha handling treats as it would treat one (`keep` shows the scene, `black`
  or `random` hide all of it, `blur` shows it blurred), so the figure measures the background the
  run's pipeline lets through;
- silhouette only: the animal flat-filled on a flat background (what the outline alone tells);
- mirrored: the photo flipped left-right (for mirror self-similarity).

After Rueda-Toicen et al. 2026, "Are We Recognizing the Jaguar or Its Background? A Diagnostic
Framework for Jaguar Re-Identification" (arXiv 2604.09690). Each function takes and returns an
H x W x 4 uint8 array and the sample's json (whose `alpha_bbox` is kept in step)."""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import cv2
import numpy as np

VARIANTS = ("foreground", "background", "silhouette", "mirrored")
SILHOUETTE_FILL = (235, 235, 235)  # the flat animal of a silhouette: light, unlike any coat or background
INPAINT_RADIUS = 3  # pixels around each hole pixel the inpainting reads
Meta = dict


def hole_margin(height: int, width: int) -> int:
    """Pixels the animal's hole is grown by: 1% of the long side, at least 2 (the soft, blurred rim of
    the animal lies outside its mask's nonzero pixels by a pixel or two)."""
    return max(2, round(0.01 * max(height, width)))


def _blend(rgba: np.ndarray, inside: np.ndarray | Sequence[int], outside: Sequence[int]) -> np.ndarray:
    alpha = rgba[:, :, 3:4].astype(np.float32) / 255.0
    outside = np.asarray(outside, dtype=np.float32).reshape(1, 1, 3)
    inside = np.asarray(inside, dtype=np.float32)
    rgb = np.rint(inside * alpha + outside * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return np.dstack([np.broadcast_to(rgb, rgba.shape[:2] + (3,)), rgba[:, :, 3]])


def foreground_only(rgba: np.ndarray, meta: Meta, fill: Sequence[int]) -> tuple[np.ndarray, Meta]:
    """The animal on a flat `fill` (RGB 0-255); the mask kept."""
    return _blend(rgba, rgba[:, :, :3], fill), meta


def silhouette_only(rgba: np.ndarray, meta: Meta, fill: Sequence[int]) -> tuple[np.ndarray, Meta]:
    """The mask filled flat (SILHOUETTE_FILL) on a flat `fill`; the mask kept."""
    return _blend(rgba, SILHOUETTE_FILL, fill), meta


def background_only(rgba: np.ndarray, meta: Meta, fill: Sequence[int]) -> tuple[np.ndarray, Meta]:
    """The photo with the animal inpainted away and an empty mask (no animal). A photo that is all
    animal (no background to inpaint from) becomes flat `fill`. The sample's `alpha_bbox` is kept,
    so a run that crops to the mask's box frames the scene where the animal was."""
    height, width = rgba.shape[:2]
    hole = (rgba[:, :, 3] > 0).astype(np.uint8)
    if hole.any():
        size = 2 * hole_margin(height, width) + 1
        hole = cv2.dilate(hole, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    if hole.all():
        rgb = np.empty((height, width, 3), dtype=np.uint8)
        rgb[:] = np.asarray(fill, dtype=np.uint8)
    else:
        rgb = cv2.inpaint(np.ascontiguousarray(rgba[:, :, :3]), hole, INPAINT_RADIUS, cv2.INPAINT_TELEA)
    return np.dstack([rgb, np.zeros((height, width), dtype=np.uint8)]), meta


def mirrored(rgba: np.ndarray, meta: Meta, fill: Sequence[int] = ()) -> tuple[np.ndarray, Meta]:
    """The photo flipped left-right, its mask box with it."""
    flipped = np.ascontiguousarray(rgba[:, ::-1])
    box = meta.get("alpha_bbox")
    if box:
        width = rgba.shape[1]
        meta = {**meta, "alpha_bbox": [width - box[2], box[1], width - box[0], box[3]]}
    return flipped, meta


_MAKERS = {"foreground": foreground_only, "background": background_only, "silhouette": silhouette_only,
           "mirrored": mirrored}


def variant_maker(name: str, fill: Sequence[int]) -> Callable[[np.ndarray, Meta], tuple[np.ndarray, Meta]]:
    """The (rgba, meta) -> (rgba, meta) function of variant `name` (one of VARIANTS), picklable."""
    if name not in _MAKERS:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return partial(_MAKERS[name], fill=tuple(int(v) for v in fill))


class VariantSplit:
    """A shard split read through a variant: item i is `make(split.read_rgba(i))`. It has what the
    eval loader reads (read_rgba, len, filenames, labels), so a variant goes through the run's own
    loader and transforms; picklable for loader workers."""

    def __init__(self, split, make: Callable[[np.ndarray, Meta], tuple[np.ndarray, Meta]]) -> None:
        self.split = split
        self.make = make
        self.filenames = split.filenames
        self.labels = split.labels

    def __len__(self) -> int:
        return len(self.split)

    def read_rgba(self, i: int) -> tuple[np.ndarray, Meta]:
        rgba, meta = self.split.read_rgba(i)
        return self.make(rgba, dict(meta))
