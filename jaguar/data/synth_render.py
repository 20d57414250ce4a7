"""Rendering one synthetic jaguar photo: a rosette coat on a body silhouette, warped into a pose, lit,
blurred, noised and set on a cluttered background (jaguar.data.synth lays out whole data sets).

Flank-true, as real jaguars are: each identity has two coats, one per flank (independent rosette
layouts drawn in one body style), and a photo shows one flank. The body canvas is drawn facing right;
a left-flank photo shows it so (head to the right), a right-flank photo shows the right coat mirrored
into place (head to the left), so no photo of one side is the mirror image of a photo of the other.
Backgrounds are generic forest floor, or a camera site's own fixed scene (`site`) with per-photo
clutter on top.

Byte-identical output for the same arguments: every random draw comes from a generator seeded by
(seed, identity, flank) for coats, (seed, site) for site scenes and (seed, split, scene, index) for
photos, and the PNG encoder's settings are fixed."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

cv2.setNumThreads(1)  # one image per call; the pool's processes are the parallelism

PNG_COMPRESS_LEVEL = 1  # fixed so the same seed always gives byte-identical files
# Huffman-only deflate: the sensor noise leaves little for string matching; this is about twice as
# fast as PIL's level 1 here and the files come out ~13% smaller
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESS_LEVEL, cv2.IMWRITE_PNG_STRATEGY,
              cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
_SPLIT_CODE = {"train": 1, "test": 2}
FLANKS = ("left", "right")
_FLANK_CODE = {"left": 1, "right": 2}
_SITE_STREAM = 7  # the generator stream of camera-site scenes


# ---------------------------------------------------------------- the animal in body coordinates


@dataclass(frozen=True)
class CoatPattern:
    """One identity's coat, in normalised body-canvas coordinates (x, y in [0, 1])."""

    centres: list[list[tuple[float, float]]]  # rosette centre polygons (slightly darker)
    blotches: list[list[tuple[float, float]]]  # dark blotches: rosette rings and solid spots
    centre_shade: int = 70  # darkness of the rosette centres (0-255), part of the animal's style


def _blob(rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float, angle: float,
          vertices: int = 9) -> list[tuple[float, float]]:
    """An irregular, rotated elliptical polygon (a blotch is never a perfect ellipse)."""
    theta = np.linspace(0, 2 * np.pi, vertices, endpoint=False) + rng.uniform(0, 0.5)
    radius = rng.uniform(0.7, 1.15, vertices)
    px, py = rx * radius * np.cos(theta), ry * radius * np.sin(theta)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + ca * a - sa * b, cy + sa * a + ca * b) for a, b in zip(px, py)]


@lru_cache(maxsize=4)
def _silhouette(width: int) -> Image.Image:
    """The body shape (shared by every identity): ellipse body, neck, head, ears, legs and tail."""
    height = width // 2
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> None:
        draw.ellipse([(cx - rx) * width, (cy - ry) * height, (cx + rx) * width, (cy + ry) * height], fill=255)

    ellipse(0.50, 0.50, 0.30, 0.22)
    ellipse(0.76, 0.44, 0.09, 0.16)
    ellipse(0.86, 0.36, 0.075, 0.13)
    ellipse(0.84, 0.22, 0.018, 0.05)
    ellipse(0.89, 0.23, 0.018, 0.05)
    for leg_x in (0.30, 0.37, 0.64, 0.71):
        draw.line([(leg_x * width, 0.6 * height), ((leg_x + 0.01) * width, 0.95 * height)],
                  fill=255, width=max(2, int(0.045 * width)))
    draw.line([(0.22 * width, 0.45 * height), (0.10 * width, 0.55 * height), (0.04 * width, 0.80 * height)],
              fill=255, width=max(2, int(0.03 * width)), joint="curve")
    return canvas


def make_pattern(seed: int, name: str, flank: str = "left") -> CoatPattern:
    """The coat of one flank (`left` or `right`) of identity `name` for data set `seed`: rosettes
    dart-thrown over the body, spots elsewhere. Both flanks share the animal's style (rosette count
    and sizes, ring shapes, shades: drawn from the identity's own generator); the layout of each
    flank comes from a generator of its own, so the two are unrelated, as on a real jaguar."""
    if flank not in _FLANK_CODE:
        raise ValueError(f"flank must be one of {', '.join(FLANKS)}, got {flank!r}")
    identity = zlib.crc32(name.encode("utf-8"))
    rng = np.random.default_rng([seed, 0, identity])
    mask = np.asarray(_silhouette(256)) > 0  # where a pattern element may sit (normalised via 256 x 128)
    aspect = 2.0  # canvas width / height: a circle of radius r (height units) is r/aspect wide
    placed: list[tuple[float, float, float]] = []
    centres, blotches = [], []
    # Each animal has its own style (how many rosettes, how big, how many spots), as real jaguars do:
    # coarse enough for a small network to start from, while the exact layout is what tells
    # similar-styled animals apart.
    max_rosettes = int(rng.integers(10, 60))
    small = rng.uniform(0.045, 0.1)
    large = small + rng.uniform(0.02, 0.09)
    ring_low = int(rng.integers(3, 7))
    ring_high = ring_low + int(rng.integers(1, 4))
    blotch_low = rng.uniform(0.22, 0.4)
    blotch_high = blotch_low + rng.uniform(0.05, 0.2)
    centre_shade = int(rng.integers(35, 130))
    spots = int(rng.integers(15, 100))
    spot_low = rng.uniform(0.01, 0.025)
    rng = np.random.default_rng([seed, 0, identity, _FLANK_CODE[flank]])  # the flank's own layout
    for _ in range(900):
        if len(placed) >= max_rosettes:
            break
        x, y = rng.uniform(0.15, 0.8), rng.uniform(0.25, 0.72)
        radius = rng.uniform(small, large)
        if not mask[int(y * 128), int(x * 256)]:
            continue
        if any(math.hypot((x - px) * aspect, y - py) < 1.15 * (radius + pr) for px, py, pr in placed):
            continue
        placed.append((x, y, radius))
        centres.append(_blob(rng, x, y, 0.8 * radius / aspect, 0.8 * radius, rng.uniform(0, np.pi)))
        ring = int(rng.integers(ring_low, ring_high))
        start = rng.uniform(0, 2 * np.pi)
        for j in range(ring):
            angle = start + 2 * np.pi * j / ring + rng.normal(0, 0.25)
            size = radius * rng.uniform(blotch_low, blotch_high)
            blotches.append(_blob(rng, x + math.cos(angle) * radius / aspect, y + math.sin(angle) * radius,
                                  size / aspect, size * rng.uniform(0.45, 0.8), angle + np.pi / 2))
    for _ in range(spots):  # solid spots on the head, neck, legs and tail
        x, y = rng.uniform(0.0, 0.95), rng.uniform(0.1, 0.95)
        if mask[int(y * 128), int(x * 256)]:
            size = rng.uniform(spot_low, spot_low + 0.015)
            blotches.append(_blob(rng, x, y, size / aspect, size, rng.uniform(0, np.pi), vertices=7))
    return CoatPattern(centres, blotches, centre_shade)


@lru_cache(maxsize=64)
def body_canvas(seed: int, name: str, width: int, flank: str = "left") -> np.ndarray:
    """H x W x 3 uint8 canvas (H = W / 2, head to the right): (silhouette, pattern darkness, belly
    shading) of one flank of one identity."""
    height = width // 2
    pattern = make_pattern(seed, name, flank)
    dark = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(dark)
    for polygon in pattern.centres:
        draw.polygon([(x * width, y * height) for x, y in polygon], fill=pattern.centre_shade)
    for polygon in pattern.blotches:
        draw.polygon([(x * width, y * height) for x, y in polygon], fill=255)
    dark = dark.filter(ImageFilter.GaussianBlur(width / 500))
    belly = np.clip((np.linspace(0, 1, height) - 0.55) * 3.0, 0, 1)[:, None] * np.ones((1, width))
    return np.dstack([np.asarray(_silhouette(width)), np.asarray(dark), (belly * 255).astype(np.uint8)])


# ---------------------------------------------------------------- one photo


def _homography(rng: np.random.Generator, size: int, canvas_w: int, canvas_h: int, mirror: bool) -> np.ndarray:
    """Body canvas -> image: perspective tilt, the mirror of a right flank, anisotropic scale,
    rotation, translation."""
    centre = np.array([[1, 0, -canvas_w / 2], [0, 1, -canvas_h / 2], [0, 0, 1]], dtype=np.float64)
    tilt = np.eye(3)
    tilt[2, :2] = rng.uniform(-0.15, 0.15, 2) / canvas_w
    flip = np.diag([-1.0 if mirror else 1.0, 1.0, 1.0])
    scale = size * rng.uniform(0.75, 1.2) / canvas_w
    stretch = np.diag([scale, scale * rng.uniform(0.85, 1.15), 1.0])
    angle = math.radians(rng.uniform(-15, 15))
    rotate = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    reach = 0.3 if rng.random() < 0.15 else 0.12  # sometimes the animal is cut by the image border
    shift = size / 2 + rng.uniform(-reach, reach, 2) * size
    move = np.array([[1, 0, shift[0]], [0, 1, shift[1]], [0, 0, 1]])
    return move @ rotate @ stretch @ flip @ tilt @ centre


FOREST_PALETTE = np.array([[60, 80, 40], [95, 110, 55], [120, 100, 70], [70, 60, 45], [140, 130, 95],
                           [40, 55, 35], [160, 150, 120]], dtype=np.float64)


def _clutter(rng: np.random.Generator, field: Image.Image, palette: np.ndarray, count: int) -> None:
    """Draw `count` leaves and branches in colours of `palette` onto `field` (in place)."""
    size = field.size[0]
    draw = ImageDraw.Draw(field)
    for _ in range(count):
        colour = tuple(int(c) for c in np.clip(palette[rng.integers(len(palette))] * rng.uniform(0.4, 1.3), 0, 255))
        x, y = rng.uniform(-0.1, 1.1, 2) * size
        if rng.random() < 0.3:
            dx, dy = rng.normal(0, 0.4, 2) * size
            draw.line([(x, y), (x + dx, y + dy)], fill=colour, width=max(1, int(rng.uniform(0.005, 0.03) * size)))
        else:
            rx, ry = rng.uniform(0.01, 0.08, 2) * size
            draw.polygon(_blob(rng, x, y, rx, ry, rng.uniform(0, np.pi)), fill=colour)


def _colour_field(rng: np.random.Generator, palette: np.ndarray, size: int, cells: int) -> Image.Image:
    coarse = palette[rng.integers(0, len(palette), (cells, cells))] * rng.uniform(0.7, 1.2, (cells, cells, 1))
    return Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)


@lru_cache(maxsize=16)
def site_scene(seed: int, site: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(scene, palette) of camera site `site`: the fixed view of its camera (a colour field, rocks,
    trunks and leaves in the site's own palette: its tint, brightness and texture scale) as an
    H x W x 3 uint8 array, and the palette its per-photo clutter is drawn from."""
    rng = np.random.default_rng([seed, _SITE_STREAM, site])
    tint = rng.uniform(0.55, 1.45, 3)  # each site its own colour cast of the forest palette
    palette = np.clip(FOREST_PALETTE * tint * rng.uniform(0.7, 1.3), 10, 245)
    field = _colour_field(rng, palette, size, int(rng.integers(3, 9)))
    _clutter(rng, field, palette, int(rng.integers(10, 30)))
    draw = ImageDraw.Draw(field)
    for _ in range(int(rng.integers(1, 4))):  # trunks: the landmarks a fixed camera always sees
        x = rng.uniform(0, 1) * size
        colour = tuple(int(c) for c in np.clip(palette[rng.integers(len(palette))] * 0.5, 0, 255))
        draw.line([(x, 0), (x + rng.normal(0, 0.1) * size, size)], fill=colour,
                  width=max(2, int(rng.uniform(0.04, 0.12) * size)))
    return np.asarray(field), palette


def _background(rng: np.random.Generator, size: int, seed: int = 0, site: int | None = None) -> np.ndarray:
    """Cluttered forest floor: smooth colour field, leaves, branches, shadows, independent of identity;
    or, at a camera site, the site's fixed scene with a little per-photo clutter of its palette."""
    if site is None:
        field = _colour_field(rng, FOREST_PALETTE, size, 6)
        _clutter(rng, field, FOREST_PALETTE, int(rng.integers(8, 25)))
    else:
        scene, palette = site_scene(seed, site, size)
        field = Image.fromarray(scene.copy())
        _clutter(rng, field, palette, int(rng.integers(2, 6)))
    return cv2.GaussianBlur(np.asarray(field, dtype=np.float32), (0, 0), size / 300)


def _burst_jitter(rng: np.random.Generator, size: int) -> np.ndarray:
    """The small camera-trap burst motion between frames: about 1 degree, 1% shift and scale."""
    angle = math.radians(rng.uniform(-1.5, 1.5))
    scale = rng.uniform(0.98, 1.02)
    shift = rng.uniform(-0.015, 0.015, 2) * size
    centre = np.array([[1, 0, -size / 2], [0, 1, -size / 2], [0, 0, 1]], dtype=np.float64)
    turn = np.array([[scale * math.cos(angle), -scale * math.sin(angle), size / 2 + shift[0]],
                     [scale * math.sin(angle), scale * math.cos(angle), size / 2 + shift[1]], [0, 0, 1]])
    return turn @ centre


def _warp(canvas: np.ndarray, to_image: np.ndarray, size: int) -> Image.Image:
    to_canvas = np.linalg.inv(to_image)
    to_canvas /= to_canvas[2, 2]
    return Image.fromarray(canvas).transform((size, size), Image.PERSPECTIVE, tuple(to_canvas.ravel()[:8]),
                                             resample=Image.BILINEAR)


def render_image(seed: int, name: str, split: str, index: int, size: int, scene: int | None = None,
                 flank: str = "left", site: int | None = None) -> Image.Image:
    """Photo number `index` of split `split` showing the `flank` (left or right) of identity `name`,
    as an RGBA image (alpha = mask).

    `scene` (default `index`): a burst frame repeats photo `scene`'s pose, background and light with a
    tiny pose/exposure jitter and fresh sensor noise, as consecutive camera-trap frames do.
    `site`: the camera site whose fixed scene is the background (None: generic forest floor)."""
    if flank not in _FLANK_CODE:
        raise ValueError(f"flank must be one of {', '.join(FLANKS)}, got {flank!r}")
    scene = index if scene is None else scene
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], scene])
    # frames after a burst's first draw their jitter and noise from their own stream
    frame_rng = np.random.default_rng([seed, _SPLIT_CODE[split], scene, index]) if scene != index else None
    canvas_w = max(192, int(round(1.25 * size / 32)) * 32)
    canvas = body_canvas(seed, name, canvas_w, flank)
    to_image = _homography(rng, size, canvas_w, canvas_w // 2, mirror=flank == "right")
    if frame_rng is not None:
        scene_mask = np.asarray(_warp(canvas, to_image, size), dtype=np.float32)[..., 0] / 255.0
        to_image = _burst_jitter(frame_rng, size) @ to_image
    mask, dark, belly = (np.asarray(_warp(canvas, to_image, size), dtype=np.float32)[..., c] / 255.0
                         for c in range(3))

    # coat colour is jittered per photo so that identity cannot be read from colour
    base = np.array([rng.uniform(165, 225), rng.uniform(110, 160), rng.uniform(45, 95)], dtype=np.float32)
    cream = np.array([235, 222, 195], dtype=np.float32) * rng.uniform(0.85, 1.0)
    ink = np.array([30, 24, 18], dtype=np.float32) * rng.uniform(0.6, 1.4)
    coat = base * (1 - belly[..., None] * 0.8) + cream * (belly[..., None] * 0.8)
    strength = dark[..., None] * rng.uniform(0.75, 0.95)
    coat = coat * (1 - strength) + ink * strength
    alpha = mask[..., None]
    rgb = _background(rng, size, seed, site) * (1 - alpha) + coat * alpha

    if rng.random() < 0.35:  # foliage in front of the animal: it hides the coat and is cut from the mask
        # a burst frame's foliage stays where it was in the scene's first frame while the animal moves
        ys, xs = np.nonzero((mask if frame_rng is None else scene_mask) > 0.5)
        if len(xs):
            pick = int(rng.integers(len(xs)))
            leaves = Image.new("L", (size, size), 0)
            draw = ImageDraw.Draw(leaves)
            for _ in range(int(rng.integers(3, 9))):
                x, y = xs[pick] + rng.normal(0, 0.07 * size), ys[pick] + rng.normal(0, 0.07 * size)
                draw.polygon(_blob(rng, x, y, *(rng.uniform(0.03, 0.09, 2) * size), rng.uniform(0, np.pi)), fill=255)
            cover = np.asarray(leaves, dtype=np.float32)[..., None] / 255.0
            green = np.array([rng.uniform(30, 80), rng.uniform(80, 140), rng.uniform(20, 60)], dtype=np.float32)
            rgb = rgb * (1 - cover) + green * cover
            alpha = alpha * (1 - cover)

    # camera: exposure, contrast, colour cast, blur, sensor noise (on the whole photo)
    rgb = rgb * rng.uniform(0.65, 1.3) * rng.uniform(0.85, 1.15, 3).astype(np.float32)
    if frame_rng is not None:
        rgb = rgb * frame_rng.uniform(0.95, 1.05)
    # contrast about a fixed grey, not the photo's mean, which would leak the coat into the background
    rgb = (rgb - 110.0) * rng.uniform(0.7, 1.3) + 110.0
    photo = np.clip(rgb, 0, 255).astype(np.uint8)
    if rng.random() < 0.4:
        photo = cv2.GaussianBlur(photo, (0, 0), rng.uniform(0.3, 1.5) * size / 256)
    noise = (rng if frame_rng is None else frame_rng).standard_normal((size, size, 3), dtype=np.float32)
    noisy = photo.astype(np.float32) + noise * rng.uniform(0, 8)
    alpha8 = np.round(alpha[..., 0] * 255).astype(np.uint8)
    alpha8[alpha8 < 8] = 0  # a clean 0 outside the animal
    rgba = np.dstack([np.clip(noisy, 0, 255).astype(np.uint8), alpha8])
    return Image.fromarray(rgba, "RGBA")


def render_png(job: tuple[int, str, str, int, int, int, str, int | None]) -> bytes:
    """The PNG bytes of `render_image(*job)`."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(np.asarray(render_image(*job)), cv2.COLOR_RGBA2BGRA), PNG_PARAMS)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode synthetic image {job}")
    return encoded.tobytes()
