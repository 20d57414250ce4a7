"""The local extractor and tentative matcher the config group `retrieval.local` names: RootSIFT
(jaguar.retrieval.local.keypoints) or a learned one (jaguar.retrieval.local.learned, kornia imported
only then), nearest-neighbour matching or LightGlue."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from jaguar.retrieval.local.keypoints import LocalExtractor, RootSIFTExtractor

if TYPE_CHECKING:
    from jaguar.config import LocalConfig
    from jaguar.retrieval.local.learned import LightGlueMatcher


def make_extractor(local: "LocalConfig", device: str | None = None) -> LocalExtractor:
    """The extractor the config `retrieval.local` names: RootSIFT, or a learned one (DISK) with its
    weights from `retrieval.local.weights_file` on `device` (default: CUDA when available). Raises
    ConfigError naming the key when a learned extractor has no weights file or it does not exist."""
    if local.extractor == "rootsift":
        return RootSIFTExtractor(local.max_keypoints, local.max_side, local.mask_erode, local.contrast_threshold)
    from jaguar.retrieval.local.learned import DiskExtractor  # kornia: only when chosen

    return DiskExtractor.from_config(local, device)


def make_matcher(local: "LocalConfig", device: Optional[str] = None) -> Optional["LightGlueMatcher"]:
    """The tentative matcher `retrieval.local.matcher` names: None for nearest neighbours (the
    default of `match_pair`), or LightGlue from its local weights file."""
    if local.matcher == "nearest":
        return None
    from jaguar.retrieval.local.learned import LightGlueMatcher  # kornia: only when chosen

    return LightGlueMatcher.from_config(local, device)
