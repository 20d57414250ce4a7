"""Alpha modes, alpha crop, resize, flip, erasing, pad-crop, determinism, and mixup."""

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from jaguar.config import Config
from jaguar.data.mixup import mixup_batch
from jaguar.data.transforms import (build_eval_transform, build_train_transform, composite,
                                    crop_to_alpha, rgba_array)

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def _rgba(height=24, width=32, box=(8, 4, 20, 16), seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random RGB (never black) with a hard mask on `box` (x0, y0, x1, y1) and a soft ring around it."""
    gen = torch.Generator().manual_seed(seed)
    rgb = 0.2 + 0.8 * torch.rand(3, height, width, generator=gen)
    alpha = torch.zeros(1, height, width)
    x0, y0, x1, y1 = box
    alpha[:, y0 - 1:y1 + 1, x0 - 1:x1 + 1] = 0.5
    alpha[:, y0:y1, x0:x1] = 1.0
    return torch.cat([rgb, alpha]), alpha[0]


def _pil(rgba: torch.Tensor) -> Image.Image:
    return Image.fromarray((rgba.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), "RGBA")


def _cfg(**data) -> Config:
    cfg = Config()
    cfg.model.img_size = [32, 32]
    for key, value in {"hflip": 0.0, **data}.items():
        setattr(cfg.data, key, value)
    return cfg


@pytest.mark.parametrize("mode,background", [("black", "mixed"), ("blur", "mixed"), ("random", "noise"),
                                             ("random", "solid"), ("random", "patch"), ("random", "mixed")])
def test_alpha_modes_change_exactly_the_pixels_outside_the_mask(mode, background):
    rgba, alpha = _rgba()
    out = composite(rgba, mode, background, np.random.default_rng(1))
    rgb = rgba[:3]
    inside, outside, soft = alpha == 1, alpha == 0, (alpha > 0) & (alpha < 1)
    assert torch.equal(out[:, inside], rgb[:, inside])
    assert (out[:, outside] != rgb[:, outside]).any(dim=0).float().mean() > 0.9
    # Soft alpha blends: halfway between the photo and what the mode puts outside.
    fill = 2 * out[:, soft] - rgb[:, soft]
    assert fill.min() >= -1e-5 and fill.max() <= 1 + 1e-5
    if mode == "black":
        assert torch.all(out[:, outside] == 0)
        assert torch.allclose(out[:, soft], 0.5 * rgb[:, soft])


def test_keep_mode_changes_nothing_and_eval_random_is_the_mean_grey():
    rgba, alpha = _rgba()
    assert torch.equal(composite(rgba, "keep"), rgba[:3])
    grey = composite(rgba, "random", "mixed", None, neutral=MEAN)
    assert torch.allclose(grey[:, alpha == 0], torch.tensor(MEAN).view(3, 1))
    cfg = _cfg(alpha_mode="random")
    image = _pil(_rgba(32, 32, (0, 0, 16, 32))[0])
    normalised = build_eval_transform(cfg, MEAN, STD)(image, {})
    assert torch.allclose(normalised[:, :, 20:], torch.zeros(3, 32, 12), atol=1e-6)


def test_crop_to_alpha_uses_the_bounding_box_and_margin():
    rgba, _ = _rgba(40, 50, box=(10, 5, 30, 25))
    rgba[3] = (rgba[3] == 1).float()  # hard mask: box is exactly 20 x 20 at (10, 5)
    array = rgba_array(_pil(rgba))
    cropped = crop_to_alpha(array, None, 0.0)
    assert cropped.shape[:2] == (20, 20)
    assert np.array_equal(cropped, array[5:25, 10:30])
    assert crop_to_alpha(array, [10, 5, 30, 25], 0.25).shape[:2] == (30, 30)  # 5 px each side
    assert crop_to_alpha(array, [0, 0, 50, 40], 0.5).shape[:2] == (40, 50)  # clipped to the image


def test_pad_resize_keeps_aspect_and_stretch_fills():
    rgba = torch.ones(4, 20, 40)  # wide, opaque, white
    image = _pil(rgba)
    padded = build_eval_transform(_cfg(resize="pad"), MEAN, STD)(image, {})
    assert padded.shape == (3, 32, 32)
    white = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    content_rows = torch.isclose(padded[0], white[0].expand(32, 32), atol=1e-4).all(dim=1)
    assert content_rows.sum() == 16 and content_rows[8:24].all()  # 20x40 -> 16x32, centred
    assert torch.allclose(padded[:, :8], torch.zeros(3, 8, 32), atol=1e-6)
    stretched = build_eval_transform(_cfg(resize="stretch"), MEAN, STD)(image, {})
    assert torch.allclose(stretched, white.view(3, 1, 1).expand(3, 32, 32), atol=1e-4)


def test_train_transform_is_a_function_of_its_rng():
    cfg = _cfg(alpha_mode="random", hflip=0.5, rotation=10.0, scale=[0.9, 1.1], translate=0.1,
               color_jitter=0.3, random_erasing=0.5, pad=4, crop_to_alpha=True)
    cfg.model.img_size = [24, 40]
    image = _pil(_rgba()[0])
    transform = build_train_transform(cfg, MEAN, STD)
    first = transform(image, {}, np.random.default_rng(7))
    assert first.shape == (3, 24, 40)
    assert torch.equal(first, transform(image, {}, np.random.default_rng(7)))
    assert not torch.equal(first, transform(image, {}, np.random.default_rng(8)))


def test_flip_erasing_and_pad_crop_do_what_they_say():
    image = _pil(_rgba(32, 32, (4, 4, 28, 28))[0])
    plain = build_train_transform(_cfg(), MEAN, STD)(image, {}, np.random.default_rng(0))
    assert torch.equal(plain, build_eval_transform(_cfg(), MEAN, STD)(image, {}))

    flipped = build_train_transform(_cfg(hflip=1.0), MEAN, STD)(image, {}, np.random.default_rng(0))
    assert torch.equal(flipped, F.horizontal_flip(plain))

    erased = build_train_transform(_cfg(random_erasing=1.0), MEAN, STD)(image, {}, np.random.default_rng(0))
    changed = (erased != plain).any(dim=0)
    rows, cols = changed.any(dim=1).nonzero().flatten(), changed.any(dim=0).nonzero().flatten()
    box = erased[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    assert torch.all(box == 0)  # one rectangle filled with the mean (0 after Normalize)
    assert 0.02 * 1024 * 0.7 <= box[0].numel() <= 0.4 * 1024 * 1.3

    shifted = build_train_transform(_cfg(pad=4), MEAN, STD)(image, {}, np.random.default_rng(3))
    padded = F.pad(plain, [4, 4, 4, 4], fill=0.0)
    matches = [(top, left) for top in range(9) for left in range(9)
               if torch.equal(shifted, padded[:, top:top + 32, left:left + 32])]
    assert len(matches) == 1 and matches[0] != (4, 4)  # seed 3 draws a real shift


def test_rgba_array_treats_rgb_input_as_opaque():
    rgba = rgba_array(Image.new("RGB", (5, 3), (255, 0, 0)))
    assert rgba.shape == (3, 5, 4) and np.all(rgba[..., 3] == 255) and np.all(rgba[..., 0] == 255)
    with pytest.raises(ValueError, match="H x W x 4 uint8"):
        rgba_array(np.zeros((3, 5, 3), dtype=np.uint8))


def test_mixup_blends_with_a_permutation_and_pairs_labels():
    images = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 3, 2, 2).contiguous()
    labels = torch.arange(8) * 10
    result = mixup_batch(images, labels, alpha=0.4, prob=1.0, generator=torch.Generator().manual_seed(0))
    assert result is not None
    mixed, labels_a, labels_b, lam = result
    assert 0.0 <= lam <= 1.0
    assert torch.equal(labels_a, labels)
    partner = labels_b // 10  # image i was mixed with image labels_b[i] / 10
    assert sorted(partner.tolist()) == list(range(8))
    expected = lam * images + (1 - lam) * images[partner]
    assert torch.allclose(mixed, expected)
    again = mixup_batch(images, labels, 0.4, 1.0, torch.Generator().manual_seed(0))
    assert again[3] == lam and torch.equal(again[2], labels_b)
    assert mixup_batch(images, labels, 0.4, 0.0, torch.Generator()) is None
    lams = [mixup_batch(images, labels, 0.2, 1.0, torch.Generator().manual_seed(s))[3] for s in range(200)]
    assert np.mean(np.minimum(lams, 1 - np.array(lams)) < 0.1) > 0.4  # Beta(0.2, 0.2) is U-shaped
    skipped = sum(mixup_batch(images, labels, 1.0, 0.3, torch.Generator().manual_seed(s)) is None
                  for s in range(200))
    assert 110 < skipped < 170


def test_colour_matrix_equals_torchvision_jitter_steps_in_order():
    from jaguar.data.transforms import jitter_matrix
    rgb = 0.35 + 0.3 * torch.rand(3, 20, 24, generator=torch.Generator().manual_seed(0))  # no clamping
    steps = [("contrast", 1.15), ("brightness", 0.9), ("saturation", 1.2)]
    expected = rgb
    ops = {"brightness": F.adjust_brightness, "contrast": F.adjust_contrast, "saturation": F.adjust_saturation}
    for name, factor in steps:
        expected = ops[name](expected, factor)
    matrix, offset = jitter_matrix(steps, rgb.mean(dim=(1, 2)).double().numpy())
    got = torch.einsum("ij,jhw->ihw", torch.from_numpy(matrix).float(), rgb) + torch.from_numpy(offset).float().view(3, 1, 1)
    assert torch.allclose(got, expected, atol=1e-5)


def test_rotation_leaves_padding_at_the_mean_and_keeps_the_centre():
    image = _pil(torch.ones(4, 32, 32))  # opaque white, filling the canvas
    white = (1 - torch.tensor(MEAN)) / torch.tensor(STD)

    def corners(out: torch.Tensor) -> torch.Tensor:
        return out[:, [0, 0, -1, -1], [0, -1, 0, -1]]

    unrotated = build_train_transform(_cfg(), MEAN, STD)(image, {}, np.random.default_rng(0))
    assert torch.allclose(corners(unrotated), white.view(3, 1).expand(3, 4), atol=1e-5)
    rotate = build_train_transform(_cfg(rotation=45.0), MEAN, STD)
    padded = 0
    for seed in range(20):
        out = rotate(image, {}, np.random.default_rng(seed))
        assert torch.allclose(out[:, 12:20, 12:20], white.view(3, 1, 1).expand(3, 8, 8), atol=1e-5)
        padded += bool(torch.all(corners(out) == 0))
    # any angle beyond ~3 degrees turns the corners' sources out of the photo: exactly the mean
    assert padded >= 15


def test_large_photos_are_area_averaged_not_aliased():
    board = (np.indices((256, 256)).sum(axis=0) % 2 * 255).astype(np.uint8)  # 1-pixel checkerboard
    rgba = np.dstack([board, board, board, np.full_like(board, 255)])
    out = build_eval_transform(_cfg(), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(rgba, {})
    assert out.shape == (3, 32, 32)
    assert abs(float(out.mean()) - 0.5) < 0.01 and float(out.std()) < 0.02  # uniform grey, no moire


def test_reduced_jpeg_decode_gives_the_training_view_of_a_full_decode():
    """A photo much larger than the canvas decodes reduced (JPEG scaled IDCT, mask area-averaged);
    the alpha box is mapped onto the reduced pixels, and the augmented tensor stays that of a full
    decode up to resampling differences."""
    import io

    from jaguar.data.shards import decode_rgba

    yy, xx = np.mgrid[0:384, 0:512]
    rgb = np.dstack([xx * 255 // 511, yy * 255 // 383, (xx + yy) * 255 // 894]).astype(np.uint8)  # smooth
    mask = np.zeros((384, 512), dtype=np.uint8)
    mask[100:300, 150:420] = 255
    colour, alpha = io.BytesIO(), io.BytesIO()
    Image.fromarray(rgb).save(colour, format="JPEG", quality=95)
    Image.fromarray(mask).save(alpha, format="PNG")
    sample = {".jpg": colour.getvalue(), ".mask.png": alpha.getvalue()}
    meta = {"size": [512, 384], "alpha_bbox": [150, 100, 420, 300]}
    transform = build_train_transform(_cfg(alpha_mode="black", crop_margin=0.05, scale=[0.9, 1.1],
                                           rotation=10.0, color_jitter=0.0, random_erasing=0.0),
                                      MEAN, STD)
    reduction = transform.decode_reduction(meta)
    assert reduction == 8  # crop 297 x 220 px into 32 px at zoom up to 1.1: 1/8 (37 x 28 px) still suffices
    assert transform.decode_reduction({"alpha_bbox": [150, 100, 420, 300]}) == 1  # no stored size: full
    reduced = decode_rgba(sample, "s", reduction)
    assert reduced.shape == (48, 64, 4)
    full = decode_rgba(sample, "s")
    out_full = transform(full, meta, np.random.default_rng(3))
    out_reduced = transform(reduced, meta, np.random.default_rng(3))
    assert out_reduced.shape == out_full.shape == (3, 32, 32)
    # normalised units: 0.024 measured; another augmentation draw of the same photo differs by 0.14
    assert float((out_reduced - out_full).abs().mean()) < 0.05
