"""Reading one source image, whatever its form, as 8-bit RGBA with its true tones and its true mask.

Forms: grey or colour at 1, 2, 4, 8 or 16 bits a sample; alpha as a channel (LA, RGBA; premultiplied
RGBa is un-premultiplied), as palette entries (PNG tRNS on a palette, GIF transparency) or as a
transparency colour key (PNG tRNS on grey or RGB, 16-bit keys included); CMYK; EXIF/XMP orientation;
every file type in `IMAGE_SUFFIXES` that this Pillow build reads. Tones wider than 8 bits keep their high
byte (v >> 8), the same as Pillow does for 16-bit colour PNGs, so every 16-bit form maps one way
(65535 -> 255, 32768 -> 128). Own code rather than Pillow's `convert("RGBA")` alone: that clips 16-bit grey to white,
ignores 16-bit colour keys and compares 2- and 4-bit grey keys unscaled (Pillow 13).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import ExifTags, Image

_CANDIDATE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif", ".jp2", ".avif",
                       ".pbm", ".pgm", ".ppm")
_GREY_16 = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# EXIF orientation -> the transpose that shows the picture upright (as ImageOps.exif_transpose applies it;
# applied here to the decoded RGBA, since a 16-bit colour key is decoded outside Pillow)
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _readable_suffixes() -> tuple[str, ...]:
    Image.init()
    registered = Image.registered_extensions()
    return tuple(s for s in _CANDIDATE_SUFFIXES if registered.get(s) in Image.OPEN)


IMAGE_SUFFIXES = _readable_suffixes()  # photo file types this Pillow build decodes


class ImageFormError(ValueError):
    """A decodable image whose tones have no defined 8-bit meaning (e.g. floating point)."""


@dataclass
class DecodedImage:
    rgba: Image.Image  # 8-bit RGBA, upright
    has_alpha: bool  # an alpha channel, a transparent palette entry or a transparency colour key
    mode: str  # Pillow's mode of the file, for messages


def read_rgba(path: str | Path) -> DecodedImage:
    """Decode `path` (any form above) to upright 8-bit RGBA; pixels without alpha information are opaque.

    Raises what Pillow raises for unreadable files (OSError, SyntaxError, ValueError,
    Image.DecompressionBombError) and ImageFormError for forms with no defined tones."""
    with Image.open(path) as opened:
        opened.load()
        orientation = opened.getexif().get(ExifTags.Base.Orientation, 1)
        rgba, has_alpha = _to_rgba(opened, Path(path))
        mode = opened.mode
    method = _ORIENTATION.get(orientation)
    return DecodedImage(rgba.transpose(method) if method is not None else rgba, has_alpha, mode)


def _png_header(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR chunk; None for other files."""
    with path.open("rb") as handle:
        head = handle.read(26)
    return (head[24], head[25]) if len(head) == 26 and head.startswith(_PNG_SIGNATURE) else None


def _key_mask(values: np.ndarray, key) -> np.ndarray:
    """Alpha 0 where a pixel equals the colour key exactly (all channels), 255 elsewhere."""
    hit = values == np.asarray(key, dtype=values.dtype)
    if hit.ndim == 3:
        hit = hit.all(axis=2)
    return np.where(hit, 0, 255).astype(np.uint8)


def _from_arrays(rgb: np.ndarray, alpha: np.ndarray | None) -> Image.Image:
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    if alpha is None:
        alpha = np.full(rgb.shape[:2], 255, dtype=np.uint8)
    return Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), "RGBA")


def _to_rgba(image: Image.Image, path: Path) -> tuple[Image.Image, bool]:
    key = image.info.get("transparency")
    if image.mode in _GREY_16:
        values = np.asarray(image).astype(np.int32)  # I;16 (unsigned) or I (int32): one signed type
        if values.size and (values.min() < 0 or values.max() > 0xFFFF):
            raise ImageFormError(f"{image.mode} image with values {values.min()}..{values.max()}, beyond 16 bits: "
                                 f"its tone range is not defined; save it as an 8- or 16-bit image")
        alpha = _key_mask(values, key) if isinstance(key, int) else None
        return _from_arrays((values >> 8).astype(np.uint8), alpha), alpha is not None
    if image.mode in ("1", "L"):
        grey = np.asarray(image.convert("L"))
        if not isinstance(key, int):
            return _from_arrays(grey, None), False
        header = _png_header(path) if image.format == "PNG" else None
        if header is not None and header[0] < 8 and key < 2 ** header[0]:
            # Pillow widens 2- and 4-bit grey to 0..255 but leaves the tRNS key at the file's depth
            key *= 255 // (2 ** header[0] - 1)
        return _from_arrays(grey, _key_mask(grey, key)), True
    if image.mode == "RGB" and isinstance(key, tuple):
        header = _png_header(path) if image.format == "PNG" else None
        if header is not None and header[0] == 16:
            # Pillow keeps only the high byte of 16-bit colour, so the 16-bit key is matched on OpenCV's
            # full-depth decode (its channels are BGR, with an alpha it may add from the key: ignored)
            full = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
            if full is None or full.dtype != np.uint16 or full.shape[:2] != (image.height, image.width):
                raise ImageFormError("16-bit RGB PNG with a transparency key that OpenCV cannot decode at full "
                                     "depth; save it with an alpha channel instead")
            return _from_arrays(np.asarray(image), _key_mask(full[:, :, 2::-1], key)), True
        rgb = np.asarray(image)
        return _from_arrays(rgb, _key_mask(rgb, key)), True
    if image.mode in _WITH_ALPHA or (image.mode == "P" and key is not None):
        return image.convert("RGBA"), True
    if image.mode == "F":
        raise ImageFormError("floating-point image (mode F): its tone range is not defined; save it as an "
                             "8- or 16-bit image")
    try:
        return image.convert("RGB").convert("RGBA"), False
    except ValueError as err:
        raise ImageFormError(f"image mode {image.mode} cannot be converted to RGB ({err}); save it as "
                             f"RGB, RGBA or grey") from None
