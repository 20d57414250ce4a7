"""The feature files of a run folder, part of RunDir (jaguar.run; see its module docstring for the
whole layout): each split's embeddings, the parts a sharded extraction leaves until they are merged,
`jaguar rank`'s lists, and the local pattern evidence of `jaguar match` (each split's keypoints and
its shortlist matches, with their parts). A mixin so that RunDir stays one class and one owner of
every name.

    RUN/features/<split>.local.safetensors  keypoints + descriptors   local_features_path (LocalFeatureSet)
    RUN/local/<split>.safetensors           each image's shortlist     local_matches_path (SplitMatches)
                                            matched, verified inliers
    RUN/local/parts/                        finished blocks of an      local_part_path, local_part_files,
                                            unfinished `jaguar match`  remove_local_parts
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from jaguar.errors import MissingInputError
from jaguar.run_records import RunDirError

if TYPE_CHECKING:  # torch-backed: imported where features are read, so `jaguar --help` stays light
    from jaguar.core.features import FeatureSet

SPLITS = ("train", "val", "test")
FEATURES = "features"
FEATURE_PARTS = "parts"
_FEATURE_PART = "{split}-{start:07d}-{end:07d}-{key}"  # + _FEATURE_SUFFIX: rows [start, end) of a split
_FEATURE_SUFFIX = ".safetensors"
_RANKS = "ranks_{split}.{fmt}"
_LOCAL_FEATURES = "{split}.local.safetensors"
_LOCAL = "local"
_LOCAL_PART = "{kind}-{split}-{start:07d}-{end:07d}-{key}.safetensors"  # rows [start, end) of a split
LOCAL_PART_KINDS = ("features", "matches")


class FeatureFiles:
    """RunDir's feature files (RUN/features/, RUN/ranks_<split>.<fmt>)."""

    path: Path
    features_dir: Path
    feature_parts_dir: Path

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise RunDirError(f"split {split!r} is not one of {', '.join(SPLITS)}")

    def features_path(self, split: str) -> Path:
        if split not in SPLITS:
            raise RunDirError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        return self.features_dir / f"{split}{_FEATURE_SUFFIX}"

    def ranks_path(self, split: str, fmt: str = "parquet") -> Path:
        """`jaguar rank`'s default output for a split: each query's top-k list, in that file format
        ("parquet", the one the report reads, or "csv")."""
        if split not in SPLITS:
            raise RunDirError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        return self.path / _RANKS.format(split=split, fmt=fmt)

    def has_features(self, split: str) -> bool:
        return self.features_path(split).is_file()

    def feature_splits(self) -> list[str]:
        """The splits whose features exist, in SPLITS order."""
        return [split for split in SPLITS if self.has_features(split)]

    def load_features(self, split: str) -> FeatureSet:
        path = self.features_path(split)
        if not path.is_file():
            raise MissingInputError(f"feature file {path} does not exist; run `jaguar extract {self.path} "
                                    f"--split {split}` first")
        from jaguar.core.features import FeatureSet

        return FeatureSet.load(path, f"run `jaguar extract {self.path} --split {split} --force`")

    def save_features(self, split: str, features: FeatureSet) -> None:
        features.save(self.features_path(split))

    def feature_part_path(self, split: str, start: int, end: int, key: str) -> Path:
        """A finished block of an extraction: rows [start, end) of the split's image list, computed
        with the settings whose fingerprint is `key` (hex)."""
        self.features_path(split)  # checks the split name
        if not key or any(c not in "0123456789abcdef" for c in key):
            raise RunDirError(f"feature part key {key!r} is not a hex fingerprint")
        name = _FEATURE_PART.format(split=split, start=start, end=end, key=key)
        return self.feature_parts_dir / f"{name}{_FEATURE_SUFFIX}"

    def feature_part_files(self, split: str) -> list[Path]:
        """Every part of `split` in the parts folder, finished or half-written (a killed process's
        temporary file), whatever its settings."""
        self.features_path(split)
        if not self.feature_parts_dir.is_dir():
            return []
        return sorted(p for p in self.feature_parts_dir.iterdir()
                      if p.name.startswith(f"{split}-") or p.name.startswith(f".{split}-"))

    def remove_feature_parts(self, split: str) -> None:
        """Remove `split`'s parts (once its features file is complete), and the folder when empty."""
        for path in self.feature_part_files(split):
            path.unlink(missing_ok=True)
        try:
            self.feature_parts_dir.rmdir()
        except OSError:  # absent, or another split's parts are still there
            pass

    # ------------------------------------------------------------------ local pattern evidence

    @property
    def local_dir(self) -> Path:
        return self.path / _LOCAL

    def local_features_path(self, split: str) -> Path:
        """`jaguar match`'s keypoints and descriptors of a split (a LocalFeatureSet)."""
        self._check_split(split)
        return self.features_dir / _LOCAL_FEATURES.format(split=split)

    def local_matches_path(self, split: str) -> Path:
        """`jaguar match`'s result for a split searched against itself: each image's shortlist and
        its verified inlier counts (a SplitMatches)."""
        self._check_split(split)
        return self.local_dir / f"{split}{_FEATURE_SUFFIX}"

    def local_part_path(self, kind: str, split: str, start: int, end: int, key: str) -> Path:
        """A finished block of `jaguar match`: `kind` "features" (images [start, end) of the split) or
        "matches" (queries [start, end)), computed with the settings whose fingerprint is `key` (hex)."""
        self._check_split(split)
        if kind not in LOCAL_PART_KINDS:
            raise RunDirError(f"local part kind {kind!r} is not one of {', '.join(LOCAL_PART_KINDS)}")
        if not key or any(c not in "0123456789abcdef" for c in key):
            raise RunDirError(f"local part key {key!r} is not a hex fingerprint")
        return self.local_dir / FEATURE_PARTS / _LOCAL_PART.format(kind=kind, split=split, start=start, end=end,
                                                                   key=key)

    def local_part_files(self, kind: str, split: str) -> list[Path]:
        """Every part of `kind` and `split`, finished or half-written (a killed process's temporary)."""
        folder = self.local_dir / FEATURE_PARTS
        if not folder.is_dir():
            return []
        prefix = f"{kind}-{split}-"
        return sorted(p for p in folder.iterdir() if p.name.startswith(prefix) or p.name.startswith(f".{prefix}"))

    def remove_local_parts(self, kind: str, split: str) -> None:
        """Remove the parts of `kind` and `split` (once merged), and the parts folder when empty."""
        for path in self.local_part_files(kind, split):
            path.unlink(missing_ok=True)
        try:
            (self.local_dir / FEATURE_PARTS).rmdir()
        except OSError:
            pass

