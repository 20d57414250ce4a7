"""Local features of a whole split, packed: every image's keypoints and descriptors concatenated, with
per-image offsets and the image names, so a split is one safetensors file (stored as the global
`FeatureSet` is: atomic write, the sha256 of the content in the metadata, checked when loaded).
The matching results of a shortlist (`ShortlistMatches`, a slice of queries) and of a whole split
(`SplitMatches`, what `jaguar match` leaves in the run) are stored the same way."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save as save_bytes

from jaguar.checksums import arrays_sha256
from jaguar.errors import JaguarError, MissingInputError
from jaguar.io import atomic_write_bytes
from jaguar.retrieval.local.keypoints import LocalFeatures
from jaguar.retrieval.local.matching import ShortlistMatches


class LocalFeatureFileError(JaguarError, ValueError):
    """A local-feature or local-match file that exists but cannot be read as one; the message names it
    and what to do."""


@dataclass
class LocalFeatureSet:
    """The local features of N images, packed (T keypoints in all, descriptors of width D).

    names: N image file names; keypoints (T, 2), descriptors (T, D), scales (T,), orientations (T,)
    float32 (as in `LocalFeatures`); offsets (N + 1,) int64, image i's rows offsets[i]:offsets[i + 1];
    image_sizes (N, 2) int64 (height, width); meta: provenance (the extractor's settings, split, ...).
    Indexing by position gives one image's `LocalFeatures` (views, no copy)."""

    names: list[str]
    keypoints: np.ndarray
    descriptors: np.ndarray
    scales: np.ndarray
    orientations: np.ndarray
    offsets: np.ndarray
    image_sizes: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, dtype=np.int64).reshape(-1)
        self.image_sizes = np.asarray(self.image_sizes, dtype=np.int64).reshape(-1, 2)
        self.keypoints = np.asarray(self.keypoints, dtype=np.float32).reshape(-1, 2)
        self.descriptors = np.asarray(self.descriptors, dtype=np.float32)
        self.scales = np.asarray(self.scales, dtype=np.float32).reshape(-1)
        self.orientations = np.asarray(self.orientations, dtype=np.float32).reshape(-1)
        count, total = len(self.names), self.keypoints.shape[0]
        if self.offsets.shape != (count + 1,) or self.image_sizes.shape != (count, 2):
            raise ValueError(f"local feature set has {count} names but offsets of shape {self.offsets.shape} "
                             f"and image sizes of shape {self.image_sizes.shape}")
        if self.offsets[0] != 0 or self.offsets[-1] != total or np.any(np.diff(self.offsets) < 0):
            raise ValueError(f"local feature set offsets must rise from 0 to the {total} keypoints")
        per_keypoint = (self.descriptors, self.scales, self.orientations)
        if self.descriptors.ndim != 2 or any(len(array) != total for array in per_keypoint):
            raise ValueError(f"local feature set has {total} keypoints but descriptors {self.descriptors.shape}, "
                             f"{self.scales.size} scales, {self.orientations.size} orientations")
        if len(set(self.names)) != count:
            raise ValueError("local feature set has duplicate image names")

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> LocalFeatures:
        begin, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return LocalFeatures(self.keypoints[begin:end], self.descriptors[begin:end], self.scales[begin:end],
                             self.orientations[begin:end], tuple(self.image_sizes[index]))

    def __iter__(self) -> Iterator[LocalFeatures]:
        return (self[i] for i in range(len(self)))

    @classmethod
    def pack(cls, names: Sequence[str], features: Sequence[LocalFeatures], meta: dict | None = None,
             descriptor_dim: int = 128) -> "LocalFeatureSet":
        """One packed set of the images `names` with their `features`, in order (descriptor_dim: the
        width when no image has a keypoint). Raises ValueError when the counts or widths differ."""
        if len(names) != len(features):
            raise ValueError(f"{len(names)} names but {len(features)} feature records")
        widths = {f.descriptor_dim for f in features if len(f)}
        if len(widths) > 1:
            raise ValueError(f"descriptors of different widths {sorted(widths)} cannot share a set")
        width = widths.pop() if widths else descriptor_dim
        counts = np.array([len(f) for f in features], dtype=np.int64)
        join = (lambda parts, shape: np.concatenate(parts) if parts else np.zeros(shape, np.float32))
        return cls(list(names), join([f.keypoints for f in features], (0, 2)),
                   join([f.descriptors.reshape(-1, width) for f in features], (0, width)),
                   join([f.scales for f in features], (0,)), join([f.orientations for f in features], (0,)),
                   np.concatenate([[0], np.cumsum(counts)]), np.array([f.image_size for f in features]).reshape(-1, 2),
                   dict(meta or {}))

    @classmethod
    def concatenate(cls, parts: Sequence["LocalFeatureSet"]) -> "LocalFeatureSet":
        """The sets `parts` (e.g. the shards of a sharded extraction) as one, in order; the first part's
        meta. Raises ValueError on names found twice or descriptors of different widths."""
        if not parts:
            raise ValueError("no local feature sets to concatenate")
        names = [name for part in parts for name in part.names]
        records = [record for part in parts for record in part]
        return cls.pack(names, records, dict(parts[0].meta), parts[0].descriptors.shape[1])

    def select(self, names: Sequence[str]) -> "LocalFeatureSet":
        """The images `names`, in that order; raises KeyError naming those it does not hold."""
        position = {name: i for i, name in enumerate(self.names)}
        missing = [name for name in names if name not in position]
        if missing:
            raise KeyError(f"{len(missing)} image(s) have no local features, e.g. {missing[:5]}")
        return self.pack(list(names), [self[position[name]] for name in names], dict(self.meta),
                         self.descriptors.shape[1])

    def save(self, path: str | Path) -> None:
        """Write the set to `path` (safetensors, atomically, with its content's sha256)."""
        arrays = {"keypoints": self.keypoints, "descriptors": self.descriptors, "scales": self.scales,
                  "orientations": self.orientations, "offsets": self.offsets, "image_sizes": self.image_sizes}
        _save(path, arrays, {"names": json.dumps(self.names), "meta": json.dumps(self.meta)})

    @classmethod
    def load(cls, path: str | Path, how_to_make: str = "re-run the command that wrote it") -> "LocalFeatureSet":
        """The set saved at `path`. Raises MissingInputError when there is no file, LocalFeatureFileError
        (naming it and `how_to_make` it again) when it is truncated, changed or not such a file."""
        arrays, metadata = _load(path, how_to_make, ("keypoints", "descriptors"))
        try:
            return cls(json.loads(metadata["names"]), arrays["keypoints"], arrays["descriptors"], arrays["scales"],
                       arrays["orientations"], arrays["offsets"], arrays["image_sizes"],
                       json.loads(metadata.get("meta", "{}")))
        except (KeyError, ValueError, TypeError) as err:
            raise _unreadable(path, err, how_to_make) from err


def concatenate_matches(parts: Sequence[ShortlistMatches]) -> ShortlistMatches:
    """The results of consecutive query slices (e.g. one per process, in slice order) as one; raises
    ValueError when the slices do not follow one another or their shortlists differ in width."""
    if not parts:
        raise ValueError("no matching results to concatenate")
    for before, after in zip(parts, parts[1:]):
        if after.start != before.stop or after.scores.shape[1] != before.scores.shape[1] \
                or after.best.shape[1] != before.best.shape[1]:
            raise ValueError(f"matching slices [{before.start}, {before.stop}) and [{after.start}, {after.stop}) "
                             f"do not follow one another with the same shortlist width")
    shifts = np.cumsum([0] + [len(part.query_xy) for part in parts[:-1]])
    return ShortlistMatches(parts[0].start, parts[-1].stop, np.concatenate([part.scores for part in parts]),
                            np.concatenate([part.best for part in parts]),
                            np.concatenate([part.query_xy for part in parts]).reshape(-1, 2),
                            np.concatenate([part.gallery_xy for part in parts]).reshape(-1, 2),
                            np.concatenate([part.offsets + shift for part, shift in zip(parts, shifts)]))


def save_matches(path: str | Path, matches: ShortlistMatches, meta: dict | None = None) -> None:
    """Write a shortlist's matching results (one slice of queries) to `path`, atomically."""
    arrays = {"scores": matches.scores, "best": matches.best, "query_xy": matches.query_xy,
              "gallery_xy": matches.gallery_xy, "offsets": matches.offsets}
    _save(path, arrays, {"start": str(matches.start), "stop": str(matches.stop), "meta": json.dumps(meta or {})})


def load_matches(path: str | Path, how_to_make: str = "re-run the command that wrote it"
                 ) -> tuple[ShortlistMatches, dict]:
    """(matches, meta) saved at `path` by `save_matches`; the errors of `LocalFeatureSet.load`."""
    arrays, metadata = _load(path, how_to_make, ("scores", "query_xy", "gallery_xy"))
    try:
        matches = ShortlistMatches(int(metadata["start"]), int(metadata["stop"]), arrays["scores"], arrays["best"],
                                   arrays["query_xy"], arrays["gallery_xy"], arrays["offsets"])
        return matches, json.loads(metadata.get("meta", "{}"))
    except (KeyError, ValueError, TypeError) as err:
        raise _unreadable(path, err, how_to_make) from err


@dataclass
class SplitMatches:
    """`jaguar match`'s result for one split searched against itself (RunDir.local_matches_path):
    each image's top-B shortlist by the global similarity and its local match scores.

    names: N image file names (the split's feature order); shortlist: (N, B) int64 positions into
    names of each image's B best other images by global (cosine) similarity, best first, -1 where the
    split has fewer; matches: the ShortlistMatches of all N queries (start 0, stop N; scores (N, B)
    verified inliers aligned with shortlist); meta: provenance (B, the local settings' fingerprint,
    the global features' checksum)."""

    names: list[str]
    shortlist: np.ndarray
    matches: ShortlistMatches
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shortlist = np.asarray(self.shortlist, dtype=np.int64)
        n = len(self.names)
        if self.shortlist.ndim != 2 or self.shortlist.shape[0] != n:
            raise ValueError(f"a split's shortlist must be ({n}, B), got shape {self.shortlist.shape}")
        if (self.matches.start, self.matches.stop) != (0, n) or self.matches.scores.shape != self.shortlist.shape:
            raise ValueError(f"a split's matches must cover queries [0, {n}) with scores shaped like the shortlist "
                             f"{self.shortlist.shape}, got [{self.matches.start}, {self.matches.stop}) and "
                             f"{self.matches.scores.shape}")

    def save(self, path: str | Path) -> None:
        """Write it to `path` atomically (safetensors, content sha256 in the metadata)."""
        m = self.matches
        arrays = {"shortlist": self.shortlist, "scores": m.scores, "best": m.best, "query_xy": m.query_xy,
                  "gallery_xy": m.gallery_xy, "offsets": m.offsets}
        _save(path, arrays, {"names": json.dumps(list(self.names)), "meta": json.dumps(self.meta)})

    @classmethod
    def load(cls, path: str | Path, how_to_make: str = "re-run `jaguar match`") -> "SplitMatches":
        """The SplitMatches saved at `path`; MissingInputError when absent, LocalFeatureFileError when
        it does not match its checksum or cannot be read as one (both naming `how_to_make`)."""
        arrays, metadata = _load(path, how_to_make, ("scores", "query_xy", "gallery_xy"))
        try:
            names = json.loads(metadata["names"])
            matches = ShortlistMatches(0, len(names), arrays["scores"], arrays["best"], arrays["query_xy"],
                                       arrays["gallery_xy"], arrays["offsets"])
            return cls(names, arrays["shortlist"], matches, json.loads(metadata.get("meta", "{}")))
        except (KeyError, ValueError, TypeError) as err:
            raise _unreadable(path, err, how_to_make) from err


def _save(path: str | Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    arrays = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
    metadata = dict(metadata, sha256=arrays_sha256(arrays, metadata))
    atomic_write_bytes(Path(path), save_bytes(arrays, metadata=metadata))


def _load(path: str | Path, how_to_make: str, finite: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays and metadata (less its sha256) at `path`, checked against the recorded checksum
    and for non-finite values in the arrays `finite`."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"local feature file {path} does not exist: {how_to_make}")
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = dict(handle.metadata() or {})
        arrays = load_file(str(path))
        recorded = metadata.pop("sha256", None)
        if recorded is None or arrays_sha256(arrays, metadata) != recorded:
            raise LocalFeatureFileError(f"local feature file {path} does not match the checksum recorded when it "
                                        f"was written (corrupt, changed since, or not written by jaguar): "
                                        f"{how_to_make}")
        for name in finite:
            if not bool(np.isfinite(arrays[name].sum())):
                raise LocalFeatureFileError(f"local feature file {path} has non-finite values in {name}: {how_to_make}")
    except LocalFeatureFileError:
        raise
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as err:
        raise _unreadable(path, err, how_to_make) from err
    return arrays, metadata


def _unreadable(path: str | Path, err: Exception, how_to_make: str) -> LocalFeatureFileError:
    return LocalFeatureFileError(f"local feature file {path} could not be read ({type(err).__name__}: {err}); it "
                                 f"is truncated or not written by jaguar: {how_to_make}")
