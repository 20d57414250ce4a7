"""Keypoints and descriptors on the animal only: the `LocalFeatures` of one image, the extractor
interface, and the default extractor, RootSIFT through OpenCV (no weights, any CPU).

The alpha mask bounds everything: the detector runs inside the mask eroded by a few pixels (so the
silhouette's own edge does not fire), and before any descriptor is computed the background pixels
(alpha < 128) are replaced by a smooth extension of the animal's own intensities (normalised
convolution), so a descriptor never sees the background: two photos that differ only in their
background give identical features. Keypoints are returned in the pixel coordinates of the image
given (x right, y down; OpenCV's convention, pixel centres at integers), whatever size the extractor
worked at.

Source: Lowe, "Distinctive Image Features from Scale-Invariant Keypoints" (IJCV 2004), OpenCV's
`cv2.SIFT`; RootSIFT: Arandjelović & Zisserman, "Three things everyone should know to improve object
retrieval" (CVPR 2012): L1-normalise the SIFT vector, take the element-wise square root (the
Euclidean distance of the results is the Hellinger kernel of the originals). HotSpotter (Crall et
al., WACV 2013) restricts keypoints to the animal the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import cv2
import numpy as np

from jaguar.errors import JaguarError

FOREGROUND_ALPHA = 128  # alpha at or above which a pixel belongs to the animal
_FILL_SIGMA = 6.0  # pixels (at working size) of the smooth background fill's Gaussian


class LocalFeatureError(JaguarError, ValueError):
    """An image or setting the local extractor cannot use; the message names it and what to do."""


@dataclass
class LocalFeatures:
    """The keypoints of one image. K keypoints (possibly 0), descriptors of width D.

    keypoints: (K, 2) float32, (x, y) in pixels of the image given to the extractor.
    descriptors: (K, D) float32, rows L2-normalised (RootSIFT: D = 128).
    scales: (K,) float32, the keypoint's support diameter in pixels of that image (OpenCV's size; 0
    where the extractor has none).
    orientations: (K,) float32, degrees in [0, 360) (OpenCV's angle; -1 where the extractor has none).
    image_size: (height, width) of the image given, in pixels."""

    keypoints: np.ndarray
    descriptors: np.ndarray
    scales: np.ndarray
    orientations: np.ndarray
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        self.keypoints = np.ascontiguousarray(self.keypoints, dtype=np.float32).reshape(-1, 2)
        count = self.keypoints.shape[0]
        self.descriptors = np.ascontiguousarray(self.descriptors, dtype=np.float32)
        if self.descriptors.ndim != 2 or self.descriptors.shape[0] != count:
            raise ValueError(f"{count} keypoints but descriptors of shape {self.descriptors.shape}")
        self.scales = np.ascontiguousarray(self.scales, dtype=np.float32).reshape(-1)
        self.orientations = np.ascontiguousarray(self.orientations, dtype=np.float32).reshape(-1)
        if self.scales.shape != (count,) or self.orientations.shape != (count,):
            raise ValueError(f"{count} keypoints but {self.scales.size} scales and "
                             f"{self.orientations.size} orientations")
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))

    def __len__(self) -> int:
        return self.keypoints.shape[0]

    @property
    def descriptor_dim(self) -> int:
        return self.descriptors.shape[1]


@runtime_checkable
class LocalExtractor(Protocol):
    """What every local extractor offers. `name` is recorded with the stored features (features of
    two extractors are never matched against each other); `settings` are the values that change its
    output (part of the extraction's fingerprint)."""

    name: str
    descriptor_dim: int

    def settings(self) -> dict: ...

    def extract(self, rgba: np.ndarray) -> LocalFeatures:
        """Features of one H x W x 4 uint8 RGBA image (alpha = the animal's mask)."""
        ...

    def extract_batch(self, images: Sequence[np.ndarray]) -> list[LocalFeatures]:
        """Features of several images (any sizes), in order; learned extractors batch them on the device."""
        ...


def check_rgba(rgba: np.ndarray) -> np.ndarray:
    """`rgba` as an H x W x 4 uint8 array; raises LocalFeatureError for any other shape or dtype."""
    array = np.asarray(rgba)
    if array.ndim != 3 or array.shape[2] != 4 or array.dtype != np.uint8:
        raise LocalFeatureError(f"local features need an H x W x 4 uint8 RGBA image (alpha = the animal's mask), "
                                f"got shape {array.shape} dtype {array.dtype}")
    return array


def working_scale(height: int, width: int, max_side: int) -> float:
    """The factor (<= 1) that brings the longest side to at most `max_side` pixels (0: no limit)."""
    longest = max(height, width)
    return 1.0 if max_side <= 0 or longest <= max_side else max_side / longest


def prepare(rgba: np.ndarray, max_side: int, erode: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(gray, detector mask, foreground mask, scale) of an RGBA image at working size.

    gray: h x w uint8, the background (alpha < 128) replaced by a smooth extension of the animal's
    intensities, so no background pixel reaches a descriptor; detector mask: h x w uint8 (255 where a
    keypoint may lie: the foreground eroded by `erode` pixels); foreground: h x w bool; scale: (2,)
    float32, working size / given size along x and y."""
    rgba = check_rgba(rgba)
    height, width = rgba.shape[:2]
    scale = working_scale(height, width, max_side)
    foreground = rgba[..., 3] >= FOREGROUND_ALPHA
    gray = cv2.cvtColor(np.ascontiguousarray(rgba[..., :3]), cv2.COLOR_RGB2GRAY)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        # the background is filled before shrinking, so area averaging mixes no background in
        gray = fill_background(gray, foreground)
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        foreground = cv2.resize(foreground.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    gray = fill_background(gray, foreground)
    scale_xy = np.array([gray.shape[1] / width, gray.shape[0] / height], dtype=np.float32)
    detector_mask = foreground.astype(np.uint8) * 255
    if erode > 0 and detector_mask.any():
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * erode + 1, 2 * erode + 1))
        detector_mask = cv2.erode(detector_mask, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return gray, detector_mask, foreground, scale_xy


def fill_background(gray: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """`gray` with its background pixels set to the Gaussian-weighted mean of nearby foreground
    pixels (normalised convolution), the animal's mean where none is near; foreground unchanged.
    A constant fill would draw a sharp silhouette edge into every descriptor near it."""
    if foreground.all():
        return gray
    if not foreground.any():
        return np.zeros_like(gray)
    weight = foreground.astype(np.float32)
    values = gray.astype(np.float32) * weight
    blurred_values = cv2.GaussianBlur(values, (0, 0), _FILL_SIGMA)
    blurred_weight = cv2.GaussianBlur(weight, (0, 0), _FILL_SIGMA)
    mean = float(values.sum() / weight.sum())
    near = blurred_weight > 1e-3
    extension = np.where(near, blurred_values / np.maximum(blurred_weight, 1e-6), mean)
    filled = np.where(foreground, gray.astype(np.float32), extension)
    return np.clip(np.rint(filled), 0, 255).astype(np.uint8)


def root_sift(descriptors: np.ndarray) -> np.ndarray:
    """RootSIFT of (K, 128) SIFT vectors: L1-normalise, element-wise square root; (K, 128) float32 with
    unit L2 norm (Arandjelović & Zisserman 2012)."""
    descriptors = np.asarray(descriptors, dtype=np.float32)
    l1 = np.abs(descriptors).sum(axis=1, keepdims=True)
    return np.sqrt(descriptors / np.maximum(l1, 1e-12))


def empty_features(image_size: tuple[int, int], descriptor_dim: int) -> LocalFeatures:
    """The features of an image with no keypoint (an empty mask, a featureless coat)."""
    return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, descriptor_dim), np.float32),
                         np.zeros(0, np.float32), np.zeros(0, np.float32), image_size)


class RootSIFTExtractor:
    """SIFT keypoints inside the (eroded) alpha mask with RootSIFT descriptors, through OpenCV.

    max_keypoints: the strongest kept (by detector response); max_side: longest side (pixels) the
    detector works at, larger images shrunk and coordinates mapped back (0: no limit); mask_erode:
    pixels (at working size) the mask is eroded by; contrast_threshold: SIFT's contrastThreshold
    (lower finds more keypoints on a low-contrast coat; OpenCV's default is 0.04)."""

    name = "rootsift"
    descriptor_dim = 128

    def __init__(self, max_keypoints: int = 1024, max_side: int = 512, mask_erode: int = 2,
                 contrast_threshold: float = 0.02) -> None:
        if max_keypoints < 1:
            raise LocalFeatureError(f"max_keypoints must be >= 1, got {max_keypoints}")
        self.max_keypoints = int(max_keypoints)
        self.max_side = int(max_side)
        self.mask_erode = int(mask_erode)
        self.contrast_threshold = float(contrast_threshold)
        # no nfeatures cap in OpenCV: it would keep the strongest before the mask drops some
        self._sift = cv2.SIFT_create(contrastThreshold=self.contrast_threshold)

    def settings(self) -> dict:
        return {"extractor": self.name, "max_keypoints": self.max_keypoints, "max_side": self.max_side,
                "mask_erode": self.mask_erode, "contrast_threshold": self.contrast_threshold}

    def extract(self, rgba: np.ndarray) -> LocalFeatures:
        """RootSIFT features of one H x W x 4 uint8 RGBA image; at most max_keypoints, all inside the
        mask. Raises LocalFeatureError for another shape or dtype."""
        rgba = check_rgba(rgba)
        image_size = rgba.shape[:2]
        gray, detector_mask, _, scale = prepare(rgba, self.max_side, self.mask_erode)
        if not detector_mask.any():
            return empty_features(image_size, self.descriptor_dim)
        keypoints, descriptors = self._sift.detectAndCompute(gray, detector_mask)
        if not keypoints:
            return empty_features(image_size, self.descriptor_dim)
        order = np.argsort([-kp.response for kp in keypoints], kind="stable")[:self.max_keypoints]
        points = np.array([keypoints[i].pt for i in order], dtype=np.float32)
        sizes = np.array([keypoints[i].size for i in order], dtype=np.float32)
        angles = np.array([keypoints[i].angle for i in order], dtype=np.float32)
        # pixel centres: x_given + 0.5 = (x_working + 0.5) / scale
        points = (points + 0.5) / scale - 0.5
        return LocalFeatures(points, root_sift(descriptors[order]), sizes / float(scale.mean()), angles, image_size)

    def extract_batch(self, images: Sequence[np.ndarray]) -> list[LocalFeatures]:
        return [self.extract(image) for image in images]
