"""Config-driven image transforms on RGBA input: alpha handling, geometry, colour, erasing.

The alpha channel is the animal mask. `data.alpha_mode` decides what the network sees outside it:
`keep` the photo as is, `black` zeros, `random` a random background (`data.background`: noise,
solid colour, a procedural texture `patch`, or `mixed` = one of the three at random), `blur` a
strongly blurred copy of the photo. Soft alpha blends: out = rgb * a + background * (1 - a), so
pixels with a = 1 are never changed. The eval transform is deterministic: `random` becomes a
fixed grey background equal to the normalisation mean (0 after Normalize, like all padding).

Train transforms take an explicit `numpy.random.Generator`, so (seed, epoch, position) → the
same augmented tensor in any worker, which is what makes a bit-exact resume possible.

Order: crop to the alpha box → resize (aspect kept, or stretched) → alpha composite → colour
jitter → pad to the network size → flip → affine → Normalize → pad + random crop → erasing.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from jaguar.config import Config

BACKGROUNDS = ("noise", "solid", "patch")


def rgba_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as a 4 x H x W float tensor in [0, 1]; images without alpha are fully opaque."""
    if image.mode != "RGBA":
        image = image.convert("RGBA")
    return F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)


def alpha_bbox(alpha: torch.Tensor) -> list[int] | None:
    """[x0, y0, x1, y1) of the pixels with alpha > 0 (exclusive ends, as PIL's getbbox), or None."""
    visible = alpha.reshape(alpha.shape[-2:]) > 0
    cols = torch.nonzero(visible.any(dim=0)).flatten()
    rows = torch.nonzero(visible.any(dim=1)).flatten()
    if len(cols) == 0:
        return None
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def crop_to_alpha(rgba: torch.Tensor, bbox: Sequence[int] | None, margin: float) -> torch.Tensor:
    """Crop a 4 x H x W RGBA tensor (any dtype) to `bbox` (or the alpha box when None) grown by
    `margin` x its size on each side, clipped to the image."""
    height, width = rgba.shape[-2:]
    if bbox is None:
        bbox = alpha_bbox(rgba[3])
        if bbox is None:  # empty mask: nothing to crop to
            return rgba
    x0, y0, x1, y1 = (int(v) for v in bbox)
    grow_x, grow_y = margin * (x1 - x0), margin * (y1 - y0)
    x0, x1 = max(0, math.floor(x0 - grow_x)), min(width, math.ceil(x1 + grow_x))
    y0, y1 = max(0, math.floor(y0 - grow_y)), min(height, math.ceil(y1 + grow_y))
    if x1 <= x0 or y1 <= y0:
        return rgba
    return F.crop(rgba, y0, x0, y1 - y0, x1 - x0)


def fit_size(height: int, width: int, target: Sequence[int]) -> list[int]:
    """The largest [h, w] with the aspect of height x width that fits in target [H, W]."""
    scale = min(target[0] / height, target[1] / width)
    return [max(1, min(target[0], round(height * scale))), max(1, min(target[1], round(width * scale)))]


def pad_to(image: torch.Tensor, target: Sequence[int], fill: Sequence[float]) -> torch.Tensor:
    """Centre `image` on a target [H, W] canvas filled with `fill` (per channel)."""
    height, width = image.shape[-2:]
    top, left = (target[0] - height) // 2, (target[1] - width) // 2
    padding = [left, top, target[1] - width - left, target[0] - height - top]
    if not any(padding):
        return image
    return F.pad(image, padding, fill=[float(v) for v in fill])


def blurred(rgb: torch.Tensor) -> torch.Tensor:
    """A strongly blurred copy: shrink to ~16 px on the long side, smooth, and scale back up."""
    height, width = rgb.shape[-2:]
    small = F.resize(rgb, fit_size(height, width, [16, 16]), antialias=True)
    if min(small.shape[-2:]) >= 3:  # reflect padding of the 5-tap kernel needs 3+ pixels
        small = F.gaussian_blur(small, [5, 5], [1.5, 1.5])
    return F.resize(small, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=False)


def random_background(kind: str, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """A 3 x H x W background in [0, 1]: uniform `noise`, a `solid` colour, or a `patch` texture."""
    if kind == "noise":
        return torch.rand(3, height, width, generator=generator)
    if kind == "solid":
        return torch.rand(3, 1, 1, generator=generator).expand(3, height, width).clone()
    if kind == "patch":
        # Two random colours blended by smooth low-frequency noise plus grain: foliage/rock-like.
        colours = torch.rand(2, 3, 1, 1, generator=generator)
        cells = int(torch.randint(2, 9, (1,), generator=generator))
        field = torch.rand(1, 1, cells, cells, generator=generator)
        field = torch.nn.functional.interpolate(field, size=(height, width), mode="bicubic",
                                                align_corners=False)[0].clamp(0, 1)
        grain = 0.08 * torch.randn(3, height, width, generator=generator)
        return (colours[0] * field + colours[1] * (1 - field) + grain).clamp(0, 1)
    raise ValueError(f"unknown background '{kind}' (config key data.background); choose one of "
                     f"{', '.join(BACKGROUNDS)} or mixed")


def composite(rgba: torch.Tensor, mode: str, background: str = "mixed",
              rng: np.random.Generator | None = None,
              neutral: Sequence[float] = (0.5, 0.5, 0.5)) -> torch.Tensor:
    """Apply `data.alpha_mode` to a 4 x H x W float RGBA tensor; returns 3 x H x W.

    With rng=None (evaluation) `random` uses the `neutral` colour instead of a random background."""
    rgb, alpha = rgba[:3], rgba[3:4]
    if mode == "keep":
        return rgb.clone()
    height, width = rgb.shape[-2:]
    if mode == "black":
        fill = torch.zeros_like(rgb)
    elif mode == "blur":
        fill = blurred(rgb)
    elif mode == "random":
        if rng is None:
            fill = torch.tensor([float(v) for v in neutral]).view(3, 1, 1).expand(3, height, width)
        else:
            kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))] if background == "mixed" else background
            fill = random_background(kind, height, width, torch_generator(rng))
    else:
        raise ValueError(f"unknown alpha mode '{mode}' (config key data.alpha_mode); "
                         f"choose keep, black, random or blur")
    return rgb * alpha + fill * (1 - alpha)


def torch_generator(rng: np.random.Generator) -> torch.Generator:
    """A torch generator seeded from `rng`, for tensor-valued random draws."""
    return torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))


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
            return F.erase(image, top, left, box_h, box_w, torch.zeros(1, 1, 1))
    return image


def pad_random_crop(image: torch.Tensor, pad: int, rng: np.random.Generator) -> torch.Tensor:
    """Pad by `pad` pixels with 0 on every side, then crop a random window of the original size."""
    height, width = image.shape[-2:]
    padded = F.pad(image, [pad, pad, pad, pad], fill=0.0)
    top, left = int(rng.integers(0, 2 * pad + 1)), int(rng.integers(0, 2 * pad + 1))
    return F.crop(padded, top, left, height, width)


class _Transform:
    """Shared deterministic part: crop, resize, composite, pad. Picklable for worker processes."""

    def __init__(self, cfg: Config, mean: Sequence[float], std: Sequence[float]) -> None:
        data = cfg.data
        self.size = [int(v) for v in cfg.model.img_size]
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]
        self.alpha_mode = data.alpha_mode
        self.background = data.background
        self.crop_to_alpha = data.crop_to_alpha
        self.crop_margin = data.crop_margin
        self.resize = data.resize

    def _base(self, image: Image.Image, meta: dict, rng: np.random.Generator | None) -> torch.Tensor:
        # Crop and resize in uint8 (several times faster than float on CPU), then composite the
        # straight RGBA at network size: cheaper than at photo size, and soft edges still blend.
        rgba = F.pil_to_tensor(image if image.mode == "RGBA" else image.convert("RGBA"))
        if self.crop_to_alpha:
            rgba = crop_to_alpha(rgba, (meta or {}).get("alpha_bbox"), self.crop_margin)
        height, width = rgba.shape[-2:]
        size = fit_size(height, width, self.size) if self.resize == "pad" else self.size
        if [height, width] != size:
            rgba = F.resize(rgba, size, antialias=True)
        rgba = F.to_dtype(rgba, torch.float32, scale=True)
        return composite(rgba, self.alpha_mode, self.background, rng, neutral=self.mean)


class EvalTransform(_Transform):
    """Deterministic: crop/resize/composite as in training, pad with the mean, Normalize."""

    def __call__(self, image: Image.Image, meta: dict | None = None) -> torch.Tensor:
        rgb = pad_to(self._base(image, meta or {}, None), self.size, self.mean)
        return F.normalize(rgb, self.mean, self.std)


class TrainTransform(_Transform):
    """Random augmentation driven only by the `rng` passed in."""

    def __init__(self, cfg: Config, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(cfg, mean, std)
        data = cfg.data
        if len(data.scale) != 2 or not 0 < data.scale[0] <= data.scale[1]:
            raise ValueError(f"config key 'data.scale' must be [min, max] with 0 < min <= max, "
                             f"got {data.scale}")
        self.hflip = data.hflip
        self.rotation = data.rotation
        self.scale = [float(v) for v in data.scale]
        self.translate = data.translate
        self.color_jitter = data.color_jitter
        self.random_erasing = data.random_erasing
        self.pad = data.pad

    def _jitter(self, rgb: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        strength = self.color_jitter
        ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
        for op in rng.permutation(len(ops)):  # random order, as torchvision's ColorJitter
            rgb = ops[op](rgb, float(rng.uniform(max(0.0, 1 - strength), 1 + strength)))
        return rgb

    def _affine(self, rgb: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        height, width = rgb.shape[-2:]
        angle = float(rng.uniform(-self.rotation, self.rotation))
        scale = float(rng.uniform(self.scale[0], self.scale[1]))
        shift = [float(rng.uniform(-self.translate, self.translate) * width),
                 float(rng.uniform(-self.translate, self.translate) * height)]
        return F.affine(rgb, angle=angle, translate=shift, scale=scale, shear=[0.0, 0.0],
                        interpolation=InterpolationMode.BILINEAR, fill=self.mean)

    def __call__(self, image: Image.Image, meta: dict | None, rng: np.random.Generator) -> torch.Tensor:
        rgb = self._base(image, meta or {}, rng)
        if self.color_jitter > 0:
            rgb = self._jitter(rgb, rng)
        rgb = pad_to(rgb, self.size, self.mean)
        if rng.random() < self.hflip:
            rgb = F.horizontal_flip(rgb)
        if self.rotation > 0 or self.translate > 0 or self.scale != [1.0, 1.0]:
            rgb = self._affine(rgb, rng)
        rgb = F.normalize(rgb, self.mean, self.std)
        if self.pad > 0:
            rgb = pad_random_crop(rgb, self.pad, rng)
        if rng.random() < self.random_erasing:
            rgb = random_erase(rgb, rng)
        return rgb


def build_train_transform(cfg: Config, mean: Sequence[float], std: Sequence[float]) -> TrainTransform:
    """(RGBA PIL image, meta, numpy Generator) -> normalised 3 x H x W tensor, H x W = model.img_size."""
    return TrainTransform(cfg, mean, std)


def build_eval_transform(cfg: Config, mean: Sequence[float], std: Sequence[float]) -> EvalTransform:
    """(RGBA PIL image, meta) -> normalised 3 x H x W tensor; deterministic (flip TTA is the caller's)."""
    return EvalTransform(cfg, mean, std)
