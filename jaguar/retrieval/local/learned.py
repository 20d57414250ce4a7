"""A learned local extractor: DISK (Tyszkiewicz, Fua, Trulls, "DISK: Learning local features with
policy gradient", NeurIPS 2020) through kornia (`kornia.feature.DISK`), on the animal only as RootSIFT
is (background filled from the animal's own colours before the network sees it, keypoints kept
inside the eroded mask), batched on CUDA when there is a GPU.

Weights come only from a local file, `retrieval.local.weights_file` (kornia's DISK checkpoint, a
dict whose "extractor" entry is the state dict, or the state dict itself; .pth or .safetensors);
nothing is ever downloaded. kornia and torch are imported only here, when this extractor is chosen
(kornia: the `local` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import cv2
import numpy as np

from jaguar.config.fields import ConfigError
from jaguar.retrieval.local.keypoints import (FOREGROUND_ALPHA, LocalFeatures, check_rgba, empty_features,
                                              fill_background, prepare)

if TYPE_CHECKING:
    import torch

    from jaguar.config import LocalConfig

_DIVISOR = 16  # DISK's U-Net needs sides divisible by 16


def load_state_dict(path: str | Path, key: str = "retrieval.local.weights_file") -> dict:
    """The state dict in the weights file `path`; raises ConfigError naming `key` and the file when
    it is not set, missing or not readable as weights."""
    import torch

    if not str(path):
        raise ConfigError(f"config key '{key}' is empty: a learned local extractor needs a local weights file "
                          f"(it is never downloaded); give its path, or set retrieval.local.extractor=rootsift")
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config key '{key}' names {path}, which does not exist; give the path of a weights "
                          f"file (.pth / .safetensors), or set retrieval.local.extractor=rootsift")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise many types for a file that is not weights
        raise ConfigError(f"config key '{key}': {path} could not be read as weights ({type(err).__name__}: "
                          f"{err})") from err
    if isinstance(state, dict) and isinstance(state.get("extractor"), dict):
        state = state["extractor"]
    if not isinstance(state, dict):
        raise ConfigError(f"config key '{key}': {path} holds a {type(state).__name__}, not a state dict")
    return state


class DiskExtractor:
    """DISK keypoints and descriptors (D = 128, L2-normalised) inside the eroded alpha mask.

    model: a `kornia.feature.DISK` with its weights loaded; max_keypoints: the highest-scoring kept;
    max_side, mask_erode: as for RootSIFTExtractor; batch_size: images a forward pass; device: where
    the network runs. Keypoint scales are 0 and orientations -1 (DISK gives neither)."""

    name = "disk"
    descriptor_dim = 128

    def __init__(self, model: "torch.nn.Module", max_keypoints: int = 1024, max_side: int = 512,
                 mask_erode: int = 2, device: Optional[str] = None, batch_size: int = 8,
                 weights_name: str = "") -> None:
        import torch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.max_keypoints = int(max_keypoints)
        self.max_side = int(max_side)
        self.mask_erode = int(mask_erode)
        self.batch_size = max(1, int(batch_size))
        self.weights_name = weights_name

    @classmethod
    def from_config(cls, local: "LocalConfig", device: Optional[str] = None) -> "DiskExtractor":
        """The extractor of `retrieval.local` with the weights of `retrieval.local.weights_file`.
        Raises ConfigError naming the key when the file is unset, missing or not DISK's weights."""
        from kornia.feature import DISK

        state = load_state_dict(local.weights_file)
        model = DISK()
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ConfigError(f"config key 'retrieval.local.weights_file': {local.weights_file} does not hold "
                              f"DISK's weights ({str(err).splitlines()[0]})") from err
        return cls(model, local.max_keypoints, local.max_side, local.mask_erode, device,
                   weights_name=Path(local.weights_file).name)

    def settings(self) -> dict:
        return {"extractor": self.name, "weights": self.weights_name, "max_keypoints": self.max_keypoints,
                "max_side": self.max_side, "mask_erode": self.mask_erode}

    def extract(self, rgba: np.ndarray) -> LocalFeatures:
        return self.extract_batch([rgba])[0]

    def extract_batch(self, images: Sequence[np.ndarray]) -> list[LocalFeatures]:
        """Features of H x W x 4 uint8 RGBA images (any sizes), in order; `batch_size` a forward pass,
        padded to the batch's largest size (padding lies outside every mask)."""
        results: list[LocalFeatures] = []
        for begin in range(0, len(images), self.batch_size):
            results.extend(self._batch([check_rgba(image) for image in images[begin:begin + self.batch_size]]))
        return results

    def _batch(self, images: list[np.ndarray]) -> list[LocalFeatures]:
        import torch

        prepared = [self._prepare(image) for image in images]
        height = max(rgb.shape[0] for rgb, _, _ in prepared)
        width = max(rgb.shape[1] for rgb, _, _ in prepared)
        height, width = (-(-side // _DIVISOR) * _DIVISOR for side in (height, width))
        batch = np.zeros((len(images), 3, height, width), dtype=np.float32)
        for i, (rgb, _, _) in enumerate(prepared):
            batch[i, :, :rgb.shape[0], :rgb.shape[1]] = rgb.transpose(2, 0, 1) / 255.0
        with torch.inference_mode():
            outputs = self.model(torch.from_numpy(batch).to(self.device), n=None, score_threshold=0.0)
        results = []
        for image, (rgb, detector_mask, scale), output in zip(images, prepared, outputs):
            points = output.keypoints.float().cpu().numpy()
            descriptors = output.descriptors.float().cpu().numpy()
            scores = output.detection_scores.float().cpu().numpy()
            column, row = np.rint(points[:, 0]).astype(int), np.rint(points[:, 1]).astype(int)
            inside = (row < rgb.shape[0]) & (column < rgb.shape[1])
            inside[inside] = detector_mask[row[inside], column[inside]] > 0
            keep = np.nonzero(inside)[0]
            keep = keep[np.argsort(-scores[keep], kind="stable")[:self.max_keypoints]]
            if keep.size == 0:
                results.append(empty_features(image.shape[:2], self.descriptor_dim))
                continue
            descriptors = descriptors[keep]
            descriptors /= np.maximum(np.linalg.norm(descriptors, axis=1, keepdims=True), 1e-12)
            results.append(LocalFeatures((points[keep] + 0.5) / scale - 0.5, descriptors,
                                         np.zeros(keep.size, np.float32), np.full(keep.size, -1, np.float32),
                                         image.shape[:2]))
        return results

    def _prepare(self, rgba: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(RGB h x w x 3 uint8 with the background filled, detector mask h x w, scale (2,)) at working size."""
        _, detector_mask, foreground, scale = prepare(rgba, self.max_side, self.mask_erode)
        full_foreground = rgba[..., 3] >= FOREGROUND_ALPHA
        channels = []
        for channel in range(3):
            filled = fill_background(np.ascontiguousarray(rgba[..., channel]), full_foreground)
            if filled.shape != foreground.shape:
                filled = cv2.resize(filled, foreground.shape[::-1], interpolation=cv2.INTER_AREA)
            channels.append(fill_background(filled, foreground))
        return np.dstack(channels), detector_mask, scale


class LightGlueMatcher:
    """Tentative correspondences by LightGlue (Lindenberger, Sarlin, Pollefeys, "LightGlue: Local
    Feature Matching at Light Speed", ICCV 2023) through kornia, for 128-wide descriptors (DISK's):
    a `Matcher` for `match_pair` / `match_shortlist`, whose geometric verification follows as for
    nearest neighbours. One pair a forward pass (kornia's LightGlue has no padding mask for pairs
    of unequal keypoint counts), on CUDA when available. Weights from a local file only."""

    def __init__(self, model: "torch.nn.Module", device: Optional[str] = None, weights_name: str = "") -> None:
        import torch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.weights_name = weights_name

    @classmethod
    def build(cls, input_dim: int = 128) -> "torch.nn.Module":
        """kornia's LightGlue architecture for `input_dim`-wide descriptors, weights not loaded."""
        from kornia.feature import LightGlue

        return LightGlue(features=None, input_dim=input_dim)

    @classmethod
    def from_config(cls, local: "LocalConfig", device: Optional[str] = None) -> "LightGlueMatcher":
        """The matcher with the weights of `retrieval.local.matcher_weights_file`; raises ConfigError
        naming the key when the file is unset, missing or not LightGlue's weights for 128-wide input."""
        key = "retrieval.local.matcher_weights_file"
        state = load_state_dict(local.matcher_weights_file, key)
        model = cls.build()
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ConfigError(f"config key '{key}': {local.matcher_weights_file} does not hold LightGlue's weights "
                              f"for 128-wide descriptors ({str(err).splitlines()[0]})") from err
        return cls(model, device, Path(local.matcher_weights_file).name)

    def __call__(self, query: LocalFeatures, gallery: LocalFeatures) -> tuple[np.ndarray, np.ndarray]:
        """(query rows, gallery rows) int64 of LightGlue's matches of two images' features."""
        import torch

        empty = np.zeros(0, dtype=np.int64)
        if len(query) == 0 or len(gallery) == 0:
            return empty, empty

        def side(features: LocalFeatures) -> dict:
            height, width = features.image_size
            return {"keypoints": torch.from_numpy(features.keypoints)[None].to(self.device),
                    "descriptors": torch.from_numpy(features.descriptors)[None].to(self.device),
                    "image_size": torch.tensor([[width, height]], dtype=torch.float32, device=self.device)}

        with torch.inference_mode():
            output = self.model({"image0": side(query), "image1": side(gallery)})
        matches = output["matches"][0].cpu().numpy().astype(np.int64).reshape(-1, 2)
        return matches[:, 0], matches[:, 1]
