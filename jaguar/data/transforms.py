"""Config-driven image transforms on RGBA input: alpha handling, geometry, colour, erasing.

The alpha channel is the animal mask. `data.alpha_mode` decides what the network sees outside it:
`keep` the photo as is, `black` zeros, `random` a random background (`data.background`: noise,
solid colour, a procedural texture `patch`, or `mixed` = one of the three at random), `blur` a
strongly blurred copy of the photo. Soft alpha blends: out = rgb * a + background * (1 - a), so
pixels with a = 1 are never changed. The eval transform is deterministic: `random` becomes a
fixed grey background equal to the normalisation mean.

Train transforms take an explicit `numpy.random.Generator`, so (seed, epoch, position) → the
same augmented tensor in any worker, which is what makes a bit-exact resume possible.

Pipeline (the reader's budget is ~15 ms a sample on one core at 448 px, see
benchmarks/reader_throughput.py):

0. (training loader) a JPEG photo several times larger than the canvas needs is decoded at
   1/2, 1/4 or 1/8 of its size (`decode_reduction`, libjpeg's scaled decode): never below what
   the warp samples at the largest zoom; the stored alpha box is mapped onto the reduced pixels;
1. crop to the alpha box (a view of the uint8 array, no copy);
2. one bilinear warp (OpenCV) to the network size that does the resize (aspect kept and
   centred, or stretched), the horizontal flip, the affine jitter (rotation, scale,
   translation) and the BoT pad + random crop shift at once; when the photo is more than 2x
   the network size it is first shrunk with area averaging (antialiasing). Canvas pixels whose
   source lies outside the photo are "padding": they end up at the normalisation mean (0
   after Normalize), as BoT's zero padding, whatever the alpha mode;
3. alpha composite at network size (float);
4. colour jitter (brightness, contrast, saturation in random order) as one 3 x 3 colour matrix:
   the same maps as torchvision's, clamped to [0, 1] once at the end instead of after each
   step; Normalize folded into the same matrix;
5. random erasing (a rectangle set to the mean).
"""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from jaguar.config import Config

cv2.setNumThreads(1)  # one sample per call; parallelism comes from DataLoader workers

BACKGROUNDS = ("noise", "solid", "patch")
GRAY = (0.2989, 0.587, 0.114)  # luma weights of torchvision's rgb_to_grayscale
ANTIALIAS_ABOVE = 2.0  # shrink factors beyond this are area-averaged before the warp


def rgba_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGBA image as an H x W x 4 uint8 array; images without alpha are fully opaque."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 4:
            raise ValueError(f"expected an H x W x 4 uint8 RGBA array, got {image.dtype} {image.shape}")
        return image
    if image.mode != "RGBA":
        image = image.convert("RGBA")
    return np.asarray(image)


def alpha_bbox(alpha: np.ndarray) -> list[int] | None:
    """[x0, y0, x1, y1) of the pixels with alpha > 0 (exclusive ends, as PIL's getbbox), or None."""
    visible = np.asarray(alpha) > 0
    cols, rows = np.flatnonzero(visible.any(axis=0)), np.flatnonzero(visible.any(axis=1))
    if len(cols) == 0:
        return None
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def crop_to_alpha(rgba: np.ndarray, bbox: Sequence[int] | None, margin: float) -> np.ndarray:
    """The H x W x 4 array cropped to `bbox` (or the alpha box when None) grown by `margin` x its
    size on each side, clipped to the image: a view, not a copy."""
    height, width = rgba.shape[:2]
    if bbox is None:
        bbox = alpha_bbox(rgba[:, :, 3])
        if bbox is None:  # empty mask: nothing to crop to
            return rgba
    box = crop_box(bbox, margin, height, width)
    if box is None:
        return rgba
    x0, y0, x1, y1 = box
    return rgba[y0:y1, x0:x1]


def crop_box(bbox: Sequence[int], margin: float, height: int, width: int) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of `crop_to_alpha`: `bbox` grown by `margin` x its size on each side,
    clipped to a height x width image; None when nothing is left."""
    x0, y0, x1, y1 = (int(v) for v in bbox)
    grow_x, grow_y = margin * (x1 - x0), margin * (y1 - y0)
    x0, x1 = max(0, math.floor(x0 - grow_x)), min(width, math.ceil(x1 + grow_x))
    y0, y1 = max(0, math.floor(y0 - grow_y)), min(height, math.ceil(y1 + grow_y))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def _reduction_of(rgba: np.ndarray, meta: dict | None) -> int:
    """r when `rgba` is the reduced decode (ceil(W / r) x ceil(H / r)) of the stored "size" [W, H], else 1."""
    size = (meta or {}).get("size")
    if size and (rgba.shape[1], rgba.shape[0]) != (int(size[0]), int(size[1])):
        for reduction in (2, 4, 8):
            if (rgba.shape[1], rgba.shape[0]) == (-(-int(size[0]) // reduction), -(-int(size[1]) // reduction)):
                return reduction
    return 1


def fit_size(height: int, width: int, target: Sequence[int]) -> list[int]:
    """The largest [h, w] with the aspect of height x width that fits in target [H, W]."""
    scale = min(target[0] / height, target[1] / width)
    return [max(1, min(target[0], round(height * scale))), max(1, min(target[1], round(width * scale)))]


def _translation(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def placement(height: int, width: int, target: Sequence[int], mode: str) -> np.ndarray:
    """3 x 3 map of pixel centres from a height x width photo to its place on the target canvas:
    scaled to fit and centred (`pad`), or stretched to fill it (`stretch`)."""
    size = fit_size(height, width, target) if mode == "pad" else [int(target[0]), int(target[1])]
    sx, sy = size[1] / width, size[0] / height
    top, left = (target[0] - size[0]) // 2, (target[1] - size[1]) // 2
    # pixel centre x + 0.5 scales to (x + 0.5) * sx; a resize's convention
    return _translation(left + 0.5 * sx - 0.5, top + 0.5 * sy - 0.5) @ np.diag([sx, sy, 1.0])


def warp(rgba: np.ndarray, matrix: np.ndarray, target: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(warped RGBA, valid) on the target canvas: bilinear, edges replicated; `valid` is 1 where
    the source pixel (nearest) lies inside the photo, 0 on padding (float32 0/1, H x W)."""
    height, width = int(target[0]), int(target[1])
    src_h, src_w = rgba.shape[:2]
    # How far one source pixel step moves on the canvas, per axis; below 1/ANTIALIAS_ABOVE the
    # photo is area-averaged to the warp's scale first and the warp then only moves and turns.
    step_x, step_y = np.linalg.norm(matrix[:2, 0]), np.linalg.norm(matrix[:2, 1])
    small = (max(1, min(src_w, round(src_w * step_x))) if step_x * ANTIALIAS_ABOVE < 1 else src_w,
             max(1, min(src_h, round(src_h * step_y))) if step_y * ANTIALIAS_ABOVE < 1 else src_h)
    if small != (src_w, src_h):
        rgba = cv2.resize(rgba, small, interpolation=cv2.INTER_AREA)
        # small pixel u covers source pixels around (u + 0.5) * ratio - 0.5
        matrix = matrix @ _translation(-0.5, -0.5) @ np.diag([src_w / small[0], src_h / small[1], 1.0]) \
            @ _translation(0.5, 0.5)
    forward = np.ascontiguousarray(matrix[:2], dtype=np.float64)
    out = cv2.warpAffine(rgba, forward, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    inside = np.ones(rgba.shape[:2], dtype=np.float32)
    valid = cv2.warpAffine(inside, forward, (width, height), flags=cv2.INTER_NEAREST,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out, valid


def blurred(rgb: torch.Tensor) -> torch.Tensor:
    """A strongly blurred copy: shrink to ~16 px on the long side, smooth, and scale back up."""
    height, width = rgb.shape[-2:]
    small = F.resize(rgb, fit_size(height, width, [16, 16]), antialias=True)
    if min(small.shape[-2:]) >= 3:  # reflect padding of the 5-tap kernel needs 3+ pixels
        small = F.gaussian_blur(small, [5, 5], [1.5, 1.5])
    return F.resize(small, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=False)


def _uniform_bytes(rng: np.random.Generator, *shape: int) -> torch.Tensor:
    """Uniform float32 values k / 255, k in 0..255 (random bytes: several times cheaper than
    torch.rand on CPU)."""
    return torch.frombuffer(bytearray(rng.bytes(math.prod(shape))), dtype=torch.uint8).view(*shape).float().mul_(1 / 255)


def random_background(kind: str, height: int, width: int, rng: np.random.Generator) -> torch.Tensor:
    """A 3 x H x W background in [0, 1]: uniform `noise`, a `solid` colour, or a `patch` texture."""
    if kind == "noise":
        return _uniform_bytes(rng, 3, height, width)
    if kind == "solid":
        return torch.from_numpy(rng.random(3, dtype=np.float32)).view(3, 1, 1).expand(3, height, width).clone()
    if kind == "patch":
        # Two random colours blended by smooth low-frequency noise plus grain: foliage/rock-like.
        colours = torch.from_numpy(rng.random((2, 3, 1, 1), dtype=np.float32))
        cells = int(rng.integers(2, 9))
        field = cv2.resize(rng.random((cells, cells), dtype=np.float32), (width, height),
                           interpolation=cv2.INTER_LINEAR)
        grain = _uniform_bytes(rng, 1, height, width).sub_(0.5).mul_(0.16)  # luminance grain
        return torch.lerp(colours[1], colours[0], torch.from_numpy(field)).add_(grain).clamp_(0, 1)
    raise ValueError(f"unknown background '{kind}' (config key data.background); choose one of "
                     f"{', '.join(BACKGROUNDS)} or mixed")


def composite(rgba: torch.Tensor, mode: str, background: str = "mixed",
              rng: np.random.Generator | None = None,
              neutral: Sequence[float] = (0.5, 0.5, 0.5)) -> torch.Tensor:
    """Apply `data.alpha_mode` to a 4 x H x W float RGBA tensor in [0, 1]; returns 3 x H x W.

    With rng=None (evaluation) `random` uses the `neutral` colour instead of a random background."""
    rgb, alpha = rgba[:3], rgba[3:4]
    if mode == "keep":
        return rgb.clone()
    height, width = rgb.shape[-2:]
    if mode == "black":
        return rgb * alpha
    if mode == "blur":
        fill = blurred(rgb)
    elif mode == "random":
        if rng is None:
            fill = torch.tensor([float(v) for v in neutral]).view(3, 1, 1).expand(3, height, width)
        else:
            kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))] if background == "mixed" else background
            fill = random_background(kind, height, width, rng)
    else:
        raise ValueError(f"unknown alpha mode '{mode}' (config key data.alpha_mode); "
                         f"choose keep, black, random or blur")
    return torch.lerp(fill, rgb, alpha)


def jitter_matrix(factors: Sequence[tuple[str, float]], mean_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M, t) with jittered = M @ rgb + t for torchvision's brightness, contrast and saturation
    maps applied in the given order (without their intermediate clamps). `mean_rgb` is the image's
    mean colour: contrast blends towards the mean grey of the image it is applied to."""
    gray = np.array(GRAY)
    matrix, offset = np.eye(3), np.zeros(3)
    for name, factor in factors:
        if name == "brightness":
            step, shift = factor * np.eye(3), np.zeros(3)
        elif name == "saturation":
            step, shift = factor * np.eye(3) + (1 - factor) * np.outer(np.ones(3), gray), np.zeros(3)
        elif name == "contrast":
            current_mean = matrix @ mean_rgb + offset
            step, shift = factor * np.eye(3), np.full(3, (1 - factor) * float(gray @ current_mean))
        else:
            raise ValueError(f"unknown colour jitter {name!r}")
        matrix, offset = step @ matrix, step @ offset + shift
    return matrix, offset


def random_erase(image: torch.Tensor, rng: np.random.Generator, area: tuple[float, float] = (0.02, 0.4),
                 min_aspect: float = 0.3, attempts: int = 100) -> torch.Tensor:
    """Zero one random rectangle (BoT random erasing; 0 = the mean after Normalize)."""
    height, width = image.shape[-2:]
    for _ in range(attempts):
        target_area = rng.uniform(*area) * height * width
        aspect = rng.uniform(min_aspect, 1 / min_aspect)
        box_h = int(round(math.sqrt(target_area * aspect)))
        box_w = int(round(math.sqrt(target_area / aspect)))
        if 0 < box_h < height and 0 < box_w < width:
            top = int(rng.integers(0, height - box_h + 1))
            left = int(rng.integers(0, width - box_w + 1))
            image[:, top:top + box_h, left:left + box_w] = 0.0
            return image
    return image


class _Transform:
    """Shared part of train and eval: crop, warp, composite, colour matrix + Normalize.
    Picklable for worker processes."""

    def __init__(self, cfg: Config, mean: Sequence[float], std: Sequence[float]) -> None:
        data = cfg.data
        self.size = [int(v) for v in cfg.model.img_size]
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]
        # Normalize as a colour map, out = D (rgb - mean) with D = 1 / std, and the range [0, 1]
        # of a colour channel after it (the clamp of jittered colours)
        self._inv_std = np.diag([1.0 / v for v in self.std])
        self._mean = np.array(self.mean)
        self._bounds = [(-m / d, (1 - m) / d) for m, d in zip(self.mean, self.std)]
        self.alpha_mode = data.alpha_mode
        self.background = data.background
        self.crop_to_alpha = data.crop_to_alpha
        self.crop_margin = data.crop_margin
        self.resize = data.resize
        self._max_zoom = 1.0

    def _source(self, image: Image.Image | np.ndarray, meta: dict | None) -> np.ndarray:
        rgba = rgba_array(image)
        if self.crop_to_alpha:
            bbox = (meta or {}).get("alpha_bbox")
            reduction = _reduction_of(rgba, meta)
            if bbox is not None and reduction > 1:  # a reduced decode: the stored box on its pixels
                bbox = [bbox[0] // reduction, bbox[1] // reduction, -(-bbox[2] // reduction), -(-bbox[3] // reduction)]
            rgba = crop_to_alpha(rgba, bbox, self.crop_margin)
        return rgba

    def decode_reduction(self, meta: dict) -> int:
        """The largest JPEG decode reduction (1, 2, 4 or 8; see jaguar.data.shards.decode_rgba) at
        which the photo's crop is still at least as large as the canvas samples it at the largest
        zoom (train: data.scale's upper end), from the sample json's "size" [W, H] and "alpha_bbox";
        1 when either is missing. What is left of the shrink is done by `warp` as before."""
        size = meta.get("size")
        if not size:
            return 1
        width, height = int(size[0]), int(size[1])
        if self.crop_to_alpha:
            bbox = meta.get("alpha_bbox")
            box = crop_box(bbox, self.crop_margin, height, width) if bbox is not None else None
            if box is None:  # the reader would find the box (or none) from the decoded mask
                return 1
            width, height = box[2] - box[0], box[3] - box[1]
        placed = placement(height, width, self.size, self.resize)
        step = max(placed[0, 0], placed[1, 1]) * self._max_zoom  # canvas pixels per photo pixel
        reduction = 1
        while reduction < 8 and step * reduction * 2 <= 1:
            reduction *= 2
        return reduction

    def _render(self, rgba: np.ndarray, matrix: np.ndarray, rng: np.random.Generator | None,
                jitter: Sequence[tuple[str, float]] = ()) -> torch.Tensor:
        warped, valid = warp(rgba, matrix, self.size)
        # channels first in uint8 (a quarter of the bytes of a float copy), then to [0, 1]
        pixels = torch.from_numpy(np.ascontiguousarray(warped.transpose(2, 0, 1))).float().mul_(1 / 255)
        rgb = composite(pixels, self.alpha_mode, self.background, rng, neutral=self.mean)
        # Colour jitter and Normalize as one colour map, out = D (M rgb + t) - D mean, where D =
        # 1 / std; the [0, 1] clamp of the jittered colours becomes a per-channel clamp of out.
        mean_rgb = rgb.mean(dim=(1, 2)).double().numpy() if any(n == "contrast" for n, _ in jitter) else None
        colour, offset = jitter_matrix(jitter, mean_rgb)
        weights = torch.from_numpy(self._inv_std @ colour).float()
        bias = torch.from_numpy(self._inv_std @ (offset - self._mean)).float().view(3, 1)
        out = torch.addmm(bias, weights, rgb.view(3, -1)).view(3, *self.size)
        if jitter:
            for channel, (low, high) in enumerate(self._bounds):
                out[channel].clamp_(low, high)
        if not valid.all():
            out.mul_(torch.from_numpy(valid))
        return out


class EvalTransform(_Transform):
    """Deterministic: crop, resize into the canvas, composite (`random` → the mean grey), Normalize."""

    def __call__(self, image: Image.Image | np.ndarray, meta: dict | None = None) -> torch.Tensor:
        rgba = self._source(image, meta)
        return self._render(rgba, placement(*rgba.shape[:2], self.size, self.resize), None)


class TrainTransform(_Transform):
    """Random augmentation driven only by the `rng` passed in."""

    def __init__(self, cfg: Config, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(cfg, mean, std)
        data = cfg.data
        self.hflip = data.hflip
        self.rotation = data.rotation
        self.scale = [float(v) for v in data.scale]
        self._max_zoom = max(1.0, self.scale[1])
        self.translate = data.translate
        self.color_jitter = data.color_jitter
        self.random_erasing = data.random_erasing
        self.pad = data.pad

    def _jitter(self, rng: np.random.Generator) -> list[tuple[str, float]]:
        if self.color_jitter <= 0:
            return []
        names = ("brightness", "contrast", "saturation")
        low, high = max(0.0, 1 - self.color_jitter), 1 + self.color_jitter
        return [(names[i], float(rng.uniform(low, high))) for i in rng.permutation(len(names))]

    def _augment(self, rng: np.random.Generator) -> np.ndarray:
        """Canvas-to-canvas map: flip, then rotation/scale/translation about the centre, then
        the pad + random crop shift."""
        height, width = self.size
        matrix = np.eye(3)
        if rng.random() < self.hflip:
            matrix = np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        if self.rotation > 0 or self.translate > 0 or self.scale != [1.0, 1.0]:
            angle = math.radians(float(rng.uniform(-self.rotation, self.rotation)))
            scale = float(rng.uniform(self.scale[0], self.scale[1]))
            shift_x = float(rng.uniform(-self.translate, self.translate) * width)
            shift_y = float(rng.uniform(-self.translate, self.translate) * height)
            cx, cy = (width - 1) / 2, (height - 1) / 2
            cos, sin = scale * math.cos(angle), scale * math.sin(angle)
            turn = np.array([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]])  # counter-clockwise
            matrix = _translation(cx + shift_x, cy + shift_y) @ turn @ _translation(-cx, -cy) @ matrix
        if self.pad > 0:
            top, left = int(rng.integers(0, 2 * self.pad + 1)), int(rng.integers(0, 2 * self.pad + 1))
            matrix = _translation(self.pad - left, self.pad - top) @ matrix
        return matrix

    def __call__(self, image: Image.Image | np.ndarray, meta: dict | None, rng: np.random.Generator) -> torch.Tensor:
        rgba = self._source(image, meta)
        jitter = self._jitter(rng)
        matrix = self._augment(rng) @ placement(*rgba.shape[:2], self.size, self.resize)
        rgb = self._render(rgba, matrix, rng, jitter)
        if rng.random() < self.random_erasing:
            rgb = random_erase(rgb, rng)
        return rgb


def build_train_transform(cfg: Config, mean: Sequence[float], std: Sequence[float]) -> TrainTransform:
    """(RGBA PIL image or H x W x 4 uint8 array, meta, numpy Generator) -> normalised 3 x H x W
    tensor, H x W = model.img_size."""
    return TrainTransform(cfg, mean, std)


def build_eval_transform(cfg: Config, mean: Sequence[float], std: Sequence[float]) -> EvalTransform:
    """(RGBA PIL image or array, meta) -> normalised 3 x H x W tensor; deterministic (flip TTA is
    the caller's)."""
    return EvalTransform(cfg, mean, std)
