"""`jaguar prep` reads every form of image a user's folder may hold with its true tones and its true mask.

One generated file per form (bit depths 1-16, grey and colour, alpha as a channel, a palette entry or a
transparency colour key, LA, CMYK, EXIF orientation, every file type the decoder reads), prepared once in
the folder-per-identity layout and read back through the shard reader (`decode_rgba`), so the whole path is
checked. 16-bit tones keep their high byte (v >> 8): the expected values below pin that choice."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import png
import pytest
from PIL import Image, PngImagePlugin, features

from jaguar.data.image_forms import IMAGE_SUFFIXES
from jaguar.data.prep import PrepError, prepare
from jaguar.data.shards import ShardSplit

H, W = 32, 24  # a portrait frame: EXIF rotations swap the sides, so a wrong rotation cannot match
Y, X = np.mgrid[0:H, 0:W]
COLOUR = np.dstack([X * 10, Y * 7, 250 - X * 3 - Y * 4]).astype(np.uint8)
SMOOTH = np.dstack([40 + X * 6, 30 + Y * 4, 200 - X * 2 - Y * 2]).astype(np.uint8)  # for lossy codecs
GREY = ((X * 7 + Y * 3) % 200).astype(np.uint8)  # never 200, the grey key below
ALPHA = np.where(X < 6, 0, np.where(X < 12, 128, 255)).astype(np.uint8)  # transparent, half, opaque bands
KEYED = X < 6  # where a transparency key sits
NEAR_KEY = (X >= 6) & (X < 9)  # pixels one step from the key: must stay opaque
LOW = ((X * 37 + Y * 11) % 256).astype(np.uint16)  # low bytes of 16-bit samples: dropped by v >> 8
RAMP16 = np.round(np.linspace(0, 65535, H * W)).astype(np.uint16).reshape(H, W)


def wide(values: np.ndarray) -> np.ndarray:
    """16-bit samples whose high byte is `values` (and whose low byte is not zero, so that v >> 8 and
    rounding v / 257 would differ)."""
    return values.astype(np.uint16) * 256 + LOW.reshape(LOW.shape + (1,) * (values.ndim - 2))


def grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2).astype(np.uint8)


def key_mask() -> np.ndarray:
    return np.where(KEYED, 0, 255).astype(np.uint8)


def write_png(path: Path, rows: np.ndarray, orientation: int | None = None, **writer) -> None:
    """A PNG of exactly the given form (pypng writes every bit depth, colour type and tRNS key), with an
    eXIf orientation chunk when asked."""
    buffer = io.BytesIO()
    height = rows.shape[0]
    width = writer.pop("width")
    png.Writer(width, height, **writer).write(buffer, rows.reshape(height, -1).tolist())
    chunks = list(png.Reader(bytes=buffer.getvalue()).chunks())
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        chunks.insert(1, (b"eXIf", exif.tobytes()[6:]))  # the TIFF bytes, without the JPEG "Exif\0\0" prefix
    with path.open("wb") as handle:
        png.write_chunks(handle, chunks)


def save_pil(array: np.ndarray, mode: str, **options) -> Callable[[Path], None]:
    return lambda path: Image.fromarray(array, mode).save(path, **options)


def exif(orientation: int) -> bytes:
    data = Image.Exif()
    data[0x0112] = orientation
    return data.tobytes()


def xmp(orientation: int) -> PngImagePlugin.PngInfo:
    """A PNG text chunk with the orientation as XMP (no EXIF), as some editors write it."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/'
                  '1999/02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
                  f'tiff:Orientation="{orientation}"/></rdf:RDF></x:xmpmeta>')
    return info


def stored_for(upright: np.ndarray, orientation: int) -> np.ndarray:
    """What a camera stores so that `orientation` shows `upright` (EXIF 3: turned 180 degrees; 6: the
    viewer turns it 90 degrees clockwise; 8: 90 degrees counter-clockwise)."""
    return {3: np.rot90(upright, 2), 6: np.rot90(upright, 1), 8: np.rot90(upright, -1)}[orientation].copy()


@dataclass
class Form:
    name: str  # also the identity folder's name
    suffix: str
    write: Callable[[Path], None]
    rgb: np.ndarray  # the tones prep must give, H x W x 3
    alpha: np.ndarray | None  # the mask prep must give; None: the file has none (an opaque mask + warning)
    tolerance: int = 0  # lossy codecs: largest mean absolute difference allowed


def _palette_form(name: str, bitdepth: int, with_alpha: bool) -> Form:
    entries = 2 ** bitdepth if bitdepth < 8 else 16
    colours = [((i * 53) % 256, (255 - i * 29) % 256, (i * 91) % 256) for i in range(entries)]
    opacity = [0, 128] + [255] * (entries - 2)  # pypng writes tRNS for the leading translucent entries
    index = np.where(X < 6, 0, np.where(X < 12, 1, 2 + (X + Y) % (entries - 2))).astype(np.uint8)
    palette = [c + (a,) for c, a in zip(colours, opacity)] if with_alpha else colours
    rgb = np.array(colours, dtype=np.uint8)[index]
    alpha = np.array(opacity, dtype=np.uint8)[index] if with_alpha else None
    return Form(name, ".png", lambda p: write_png(p, index, width=W, palette=palette, bitdepth=bitdepth), rgb, alpha)


def _key16_grey() -> tuple[np.ndarray, int]:
    key = 0x8012
    values = np.where(KEYED, key, np.where(NEAR_KEY, key + 1, RAMP16)).astype(np.uint16)
    values[(values == key) & ~KEYED] = key - 256  # a ramp value equal to the key is moved off it
    return values, key


def _key16_colour() -> tuple[np.ndarray, tuple[int, int, int]]:
    key = (0x0A12, 0xC834, 0x1E56)
    near = (0x0A12, 0xC834, 0x1E57)  # the same high bytes: only the low byte tells it from the key
    values = np.where(KEYED[:, :, None], key, np.where(NEAR_KEY[:, :, None], near, wide(COLOUR)))
    return values.astype(np.uint16), key


def _low_bit_grey(bits: int, orientation: int | None = None) -> Form:
    top = 2 ** bits - 1  # the key is white: the value Pillow leaves unscaled for 2- and 4-bit grey
    values = np.where(KEYED, top, (X + 2 * Y) % top).astype(np.uint8)
    tones = grey3(values * (255 // top))
    mask = key_mask()
    stored = values if orientation is None else stored_for(values, orientation)

    def write(path: Path) -> None:
        write_png(path, stored, orientation, width=stored.shape[1], greyscale=True, bitdepth=bits, transparent=top)

    suffix = f"-exif{orientation}" if orientation else ""
    return Form(f"png-grey{bits}-key{suffix}", ".png", write, tones, mask)


def _forms() -> list[Form]:
    grey_keyed = np.where(KEYED, 200, GREY).astype(np.uint8)
    colour_key = (10, 201, 31)
    colour_keyed = np.where(KEYED[:, :, None], colour_key,
                            np.where(NEAR_KEY[:, :, None], (10, 201, 32), COLOUR)).astype(np.uint8)
    grey16, grey_key16 = _key16_grey()
    colour16, colour_key16 = _key16_colour()
    rgba = np.dstack([COLOUR, ALPHA])
    rgba16 = np.dstack([wide(COLOUR), wide(ALPHA)])
    smooth_rgba = np.dstack([SMOOTH, ALPHA])
    cmyk = np.dstack([255 - SMOOTH, np.zeros((H, W), np.uint8)])  # K = 0: RGB = 255 - CMY exactly
    cmyk_exact = np.dstack([255 - COLOUR, np.zeros((H, W), np.uint8)])
    forms = [
        # PNG, every colour type and depth, alpha as channel / palette entry / colour key
        Form("png-grey1", ".png", lambda p: write_png(p, (X + Y) % 2, width=W, greyscale=True, bitdepth=1),
             grey3(((X + Y) % 2) * 255), None),
        _low_bit_grey(1), _low_bit_grey(2), _low_bit_grey(4),
        Form("png-grey8", ".png", lambda p: write_png(p, GREY, width=W, greyscale=True, bitdepth=8), grey3(GREY), None),
        Form("png-grey8-key", ".png", lambda p: write_png(p, grey_keyed, width=W, greyscale=True, bitdepth=8,
                                                          transparent=200), grey3(grey_keyed), key_mask()),
        Form("png-grey16-ramp", ".png", lambda p: write_png(p, RAMP16, width=W, greyscale=True, bitdepth=16),
             grey3(RAMP16 >> 8), None),
        Form("png-grey16-key", ".png", lambda p: write_png(p, grey16, width=W, greyscale=True, bitdepth=16,
                                                           transparent=grey_key16), grey3(grey16 >> 8), key_mask()),
        Form("png-la8", ".png", lambda p: write_png(p, np.dstack([GREY, ALPHA]), width=W, greyscale=True, alpha=True,
                                                    bitdepth=8), grey3(GREY), ALPHA),
        Form("png-la16", ".png", lambda p: write_png(p, np.dstack([wide(GREY), wide(ALPHA)]), width=W,
                                                     greyscale=True, alpha=True, bitdepth=16), grey3(GREY), ALPHA),
        Form("png-rgb8", ".png", lambda p: write_png(p, COLOUR, width=W, greyscale=False, bitdepth=8), COLOUR, None),
        Form("png-rgb8-key", ".png", lambda p: write_png(p, colour_keyed, width=W, greyscale=False, bitdepth=8,
                                                         transparent=colour_key), colour_keyed, key_mask()),
        Form("png-rgb16", ".png", lambda p: write_png(p, wide(COLOUR), width=W, greyscale=False, bitdepth=16),
             COLOUR, None),
        Form("png-rgb16-key", ".png", lambda p: write_png(p, colour16, width=W, greyscale=False, bitdepth=16,
                                                          transparent=colour_key16), (colour16 >> 8).astype(np.uint8),
             key_mask()),
        Form("png-rgba8", ".png", lambda p: write_png(p, rgba, width=W, greyscale=False, alpha=True, bitdepth=8),
             COLOUR, ALPHA),
        Form("png-rgba16", ".png", lambda p: write_png(p, rgba16, width=W, greyscale=False, alpha=True, bitdepth=16),
             COLOUR, ALPHA),
        _palette_form("png-palette8", 8, with_alpha=False),
        _palette_form("png-palette8-trns", 8, with_alpha=True),
        _palette_form("png-palette4-trns", 4, with_alpha=True),
        _palette_form("png-palette2-trns", 2, with_alpha=True),
        # EXIF orientation, with the mask turned with the tones
        Form("png-rgba8-exif8", ".png", lambda p: Image.fromarray(stored_for(rgba, 8), "RGBA").save(p, exif=exif(8)),
             COLOUR, ALPHA),
        Form("png-rgb16-key-exif6", ".png",
             lambda p: write_png(p, stored_for(colour16, 6), 6, width=H, greyscale=False, bitdepth=16,
                                 transparent=colour_key16), (colour16 >> 8).astype(np.uint8), key_mask()),
        _low_bit_grey(2, orientation=3),
        Form("png-rgba8-xmp6", ".png", lambda p: Image.fromarray(stored_for(rgba, 6), "RGBA").save(p, pnginfo=xmp(6)),
             COLOUR, ALPHA),
        Form("jpeg-rgb-exif6", ".jpg", lambda p: Image.fromarray(stored_for(SMOOTH, 6)).save(
            p, quality=95, subsampling=0, exif=exif(6)), SMOOTH, None, tolerance=3),
        # JPEG: colour, grey, CMYK
        Form("jpeg-rgb", ".jpg", save_pil(SMOOTH, "RGB", quality=95, subsampling=0), SMOOTH, None, tolerance=3),
        Form("jpeg-grey", ".jpeg", save_pil(SMOOTH[:, :, 0], "L", quality=95), grey3(SMOOTH[:, :, 0]), None,
             tolerance=3),
        Form("jpeg-cmyk", ".jpg", save_pil(cmyk, "CMYK", quality=95), SMOOTH, None, tolerance=3),
        # TIFF: 1, 8 and 16 bits, alpha, CMYK
        Form("tiff-bilevel", ".tif", lambda p: Image.fromarray(((X + Y) % 2).astype(bool)).save(p),
             grey3(((X + Y) % 2) * 255), None),
        Form("tiff-rgb8", ".tif", save_pil(COLOUR, "RGB"), COLOUR, None),
        Form("tiff-rgba8", ".tiff", save_pil(rgba, "RGBA"), COLOUR, ALPHA),
        Form("tiff-grey16", ".tif", lambda p: Image.fromarray(wide(GREY)).save(p), grey3(GREY), None),
        Form("tiff-rgb16", ".tif", lambda p: cv2.imwrite(str(p), wide(COLOUR)[:, :, ::-1]), COLOUR, None),
        Form("tiff-rgba16", ".tif", lambda p: cv2.imwrite(str(p), rgba16[:, :, [2, 1, 0, 3]]), COLOUR, ALPHA),
        Form("tiff-cmyk", ".tif", save_pil(cmyk_exact, "CMYK"), COLOUR, None),
        # BMP, GIF, the netpbm family
        Form("bmp-rgb", ".bmp", save_pil(COLOUR, "RGB"), COLOUR, None),
        Form("bmp-bilevel", ".bmp", lambda p: Image.fromarray(((X + Y) % 2).astype(bool)).save(p),
             grey3(((X + Y) % 2) * 255), None),
        Form("gif-transparent", ".gif", lambda p: Image.fromarray(grey_keyed, "L").save(p, transparency=200),
             grey3(grey_keyed), key_mask()),
        Form("pbm-bilevel", ".pbm", lambda p: Image.fromarray(((X + Y) % 2).astype(bool)).save(p),
             grey3(((X + Y) % 2) * 255), None),
        Form("pgm-grey16", ".pgm", lambda p: Image.fromarray(wide(GREY)).save(p), grey3(GREY), None),
        Form("ppm-rgb", ".ppm", save_pil(COLOUR, "RGB"), COLOUR, None),
    ]
    if features.check("webp"):
        forms.append(Form("webp-rgba-lossless", ".webp", save_pil(rgba, "RGBA", lossless=True, exact=True),
                          COLOUR, ALPHA))
    if features.check("jpg_2000"):
        forms.append(Form("jpeg2000-rgba", ".jp2", save_pil(rgba, "RGBA"), COLOUR, ALPHA))
    if features.check("avif"):
        forms.append(Form("avif-rgba", ".avif", save_pil(smooth_rgba, "RGBA", quality=95), SMOOTH, ALPHA,
                          tolerance=3))
    return forms


FORMS = _forms()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[dict, dict[str, np.ndarray]]:
    """All forms prepared once (folder layout): (manifest, {form name: RGBA array read from the shards})."""
    root = tmp_path_factory.mktemp("forms")
    for form in FORMS:
        (root / "src" / form.name).mkdir(parents=True)
        form.write(root / "src" / form.name / f"image{form.suffix}")
    # --skip-bad: a form that cannot be read fails its own test, with the reason prep gave
    manifest = prepare(root / "src", root / "out", workers=1, skip_bad=True)
    split = ShardSplit(root / "out", "train")
    read = {}
    for i in range(len(split)):
        rgba, meta = split.read_rgba(i)
        read[meta["identity"]] = rgba
    return manifest, read


@pytest.mark.parametrize("form", FORMS, ids=[f.name for f in FORMS])
def test_form_keeps_its_tones_and_mask(prepared, form: Form) -> None:
    manifest, read = prepared
    assert form.name in read, [s for s in manifest.skipped if form.name in s["file"]]
    rgba = read[form.name]
    assert rgba.shape == (H, W, 4), "wrong size or orientation"
    expected_alpha = form.alpha if form.alpha is not None else np.full((H, W), 255, np.uint8)
    tones_error = np.abs(rgba[:, :, :3].astype(int) - form.rgb.astype(int))
    mask_error = np.abs(rgba[:, :, 3].astype(int) - expected_alpha.astype(int))
    if form.tolerance:
        assert tones_error.mean() <= form.tolerance and mask_error.mean() <= form.tolerance
    else:
        np.testing.assert_array_equal(rgba[:, :, 3], expected_alpha, err_msg="mask")
        np.testing.assert_array_equal(rgba[:, :, :3], form.rgb, err_msg="tones")


def test_sixteen_bit_grey_ramp_keeps_its_mid_grey(prepared) -> None:
    # the reported case: a 0..65535 ramp came out near white (mean 254.3)
    _, read = prepared
    assert abs(read["png-grey16-ramp"][:, :, :3].mean() - 127.5) < 0.6


def test_only_forms_without_alpha_are_warned_about(prepared) -> None:
    manifest, _ = prepared
    [warning] = [w for w in manifest.warnings if "no alpha channel" in w]
    opaque = {form.name for form in FORMS if form.alpha is None}
    listed = {name.split("/")[0] for name in warning.split(": ", 1)[1].split(", ") if name != "..."}
    assert int(warning.split(" ", 1)[0]) == len(opaque) and listed <= opaque  # the list stops at 20 names


def test_every_listed_suffix_has_a_form() -> None:
    assert {form.suffix for form in FORMS} >= set(IMAGE_SUFFIXES) - {".avif", ".jp2", ".webp"}


def test_challenge_layout_takes_a_transparency_key_as_the_mask(tmp_path: Path) -> None:
    keyed = [form for form in FORMS if form.suffix == ".png" and ("key" in form.name or "trns" in form.name)]
    (tmp_path / "src" / "train").mkdir(parents=True)
    rows = []
    for form in keyed:
        form.write(tmp_path / "src" / "train" / f"{form.name}.png")
        rows.append((f"{form.name}.png", form.name))
    with (tmp_path / "src" / "train.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("filename", "ground_truth"), *rows])
    manifest = prepare(tmp_path / "src", tmp_path / "out", workers=1)
    assert manifest.skipped == [] and not [w for w in manifest.warnings if "alpha" in w]
    split = ShardSplit(tmp_path / "out", "train")
    for i in range(len(split)):
        rgba, meta = split.read_rgba(i)
        form = next(f for f in keyed if f.name == meta["identity"])
        np.testing.assert_array_equal(rgba[:, :, 3], form.alpha, err_msg=form.name)


@pytest.mark.parametrize("mode, values, reason", [
    ("F", (GREY / 255.0).astype(np.float32), "floating-point"),
    ("I", GREY.astype(np.int32) * 70000, "beyond 16 bits"),
], ids=["float", "int32-beyond-16-bits"])
def test_forms_without_defined_tones_are_refused_by_name(tmp_path: Path, mode: str, values: np.ndarray,
                                                         reason: str) -> None:
    (tmp_path / "src" / "someone").mkdir(parents=True)
    Image.fromarray(values, mode).save(tmp_path / "src" / "someone" / "odd.tif")
    Image.fromarray(COLOUR).save(tmp_path / "src" / "someone" / "fine.png")
    with pytest.raises(PrepError, match=rf"odd\.tif: unsupported image form: .*{reason}"):
        prepare(tmp_path / "src", tmp_path / "out", workers=1)
    manifest = prepare(tmp_path / "src", tmp_path / "out", workers=1, skip_bad=True)
    assert [Path(s["file"]).name for s in manifest.skipped] == ["odd.tif"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["train"]["num_samples"] == 1
