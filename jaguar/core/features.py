"""A feature set: L2-normalised embeddings that carry their image names and labels (and, where the
data set has a viewpoint column, the flank each image shows) with them, so nothing downstream is
matched by position by accident. Stored as safetensors, with the sha256 of its content (tensors,
names, labels' names, viewpoints, provenance) in its metadata: loading checks it and refuses
non-finite embeddings, so a bit flip or an edited file is named instead of used."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file

if TYPE_CHECKING:  # torch is imported where a FeatureSet is made: reading a file's labels needs none
    import torch

from jaguar.io import atomic_write_bytes
from jaguar.checksums import arrays_sha256
from jaguar.errors import JaguarError, MissingInputError
from jaguar.formats import UNKNOWN_VIEWPOINT, VIEWPOINTS


class FeatureFileError(JaguarError, ValueError):
    """A feature file that exists but cannot be read as one; the message names it and what to do."""


@dataclass
class FeatureSet:
    names: list[str]  # image file names, e.g. "test_0001.png"
    embeddings: torch.Tensor  # N x D float32, rows L2-normalised
    labels: torch.Tensor  # N int64; -1 where the identity is unknown
    label_names: dict[int, str] = field(default_factory=dict)  # label -> identity name
    meta: dict = field(default_factory=dict)  # free-form provenance (split, checkpoint, tta, ...)
    # the flank each image shows (left | right | unknown), where the data set has a viewpoint column
    viewpoints: Optional[list[str]] = None

    def __post_init__(self) -> None:
        import torch

        self.embeddings = torch.as_tensor(self.embeddings, dtype=torch.float32)
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64)
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != len(self.names):
            raise ValueError(f"feature set has {len(self.names)} names but embeddings of shape "
                             f"{tuple(self.embeddings.shape)}")
        if self.labels.shape != (len(self.names),):
            raise ValueError(f"feature set has {len(self.names)} names but {self.labels.shape[0]} labels")
        if len(set(self.names)) != len(self.names):
            raise ValueError("feature set has duplicate image names")
        if self.viewpoints is not None:
            self.viewpoints = [UNKNOWN_VIEWPOINT if v is None else str(v) for v in self.viewpoints]
            if len(self.viewpoints) != len(self.names):
                raise ValueError(f"feature set has {len(self.names)} names but {len(self.viewpoints)} viewpoints")
            bad = sorted(set(self.viewpoints) - set(VIEWPOINTS))
            if bad:
                raise ValueError(f"feature set has viewpoints {bad}; expected {', '.join(VIEWPOINTS)}")

    def __len__(self) -> int:
        return len(self.names)

    def normalized(self) -> "FeatureSet":
        import torch

        emb = torch.nn.functional.normalize(self.embeddings, dim=1)
        return FeatureSet(list(self.names), emb, self.labels.clone(), dict(self.label_names), dict(self.meta),
                          self._views(range(len(self))))

    def _views(self, rows) -> Optional[list[str]]:
        return None if self.viewpoints is None else [self.viewpoints[i] for i in rows]

    def select(self, names: list[str]) -> "FeatureSet":
        """The rows for `names`, in that order; unknown names are an error naming them."""
        position = {name: i for i, name in enumerate(self.names)}
        missing = [n for n in names if n not in position]
        if missing:
            raise KeyError(f"{len(missing)} image(s) have no features, e.g. {missing[:5]}")
        rows = [position[n] for n in names]
        index = np.array(rows, dtype=np.int64)
        return FeatureSet(list(names), self.embeddings[index], self.labels[index],
                          dict(self.label_names), dict(self.meta), self._views(rows))

    def with_identities(self, identity_by_name: dict[str, str]) -> "FeatureSet":
        """A copy labelled from {file name: identity} (e.g. a test label file) in this set's own
        label space; identities it has no label for get new labels after the known ones. Images
        the mapping does not name keep their label."""
        label_of = {name: label for label, name in self.label_names.items()}
        label_names = dict(self.label_names)
        labels = self.labels.clone()
        for i, name in enumerate(self.names):
            identity = identity_by_name.get(name)
            if identity is None:
                continue
            if identity not in label_of:
                label_of[identity] = max(label_names, default=-1) + 1
                label_names[label_of[identity]] = identity
            labels[i] = label_of[identity]
        return FeatureSet(list(self.names), self.embeddings, labels, label_names, dict(self.meta),
                          self._views(range(len(self))))

    def labelled(self) -> "FeatureSet":
        """The rows whose identity is known (label >= 0), in order."""
        return self.select([n for n, label in zip(self.names, self.labels.tolist()) if label >= 0])

    def save(self, path: str | Path) -> None:
        metadata = {
            "names": json.dumps(self.names),
            "label_names": json.dumps({str(k): v for k, v in self.label_names.items()}),
            "meta": json.dumps(self.meta),
        }
        if self.viewpoints is not None:
            metadata["viewpoints"] = json.dumps(self.viewpoints)
        from safetensors.torch import save as save_bytes

        tensors = {"embeddings": self.embeddings.contiguous(), "labels": self.labels.contiguous()}
        metadata["sha256"] = _content_sha256({name: t.numpy() for name, t in tensors.items()}, metadata)
        atomic_write_bytes(Path(path), save_bytes(tensors, metadata=metadata))

    @classmethod
    def load(cls, path: str | Path, how_to_make: str = "re-run the command that wrote it") -> "FeatureSet":
        """The feature set saved at `path` by `save`. Raises MissingInputError when there is no file,
        FeatureFileError (naming it and `how_to_make` it again) when it is truncated or not a jaguar
        feature file."""
        arrays, metadata = _read(path, how_to_make)
        try:
            return cls(
                names=json.loads(metadata["names"]),
                embeddings=arrays["embeddings"],
                labels=arrays["labels"],
                label_names=_label_names(metadata),
                meta=json.loads(metadata.get("meta", "{}")),
                viewpoints=json.loads(metadata["viewpoints"]) if "viewpoints" in metadata else None,
            )
        except (KeyError, ValueError, TypeError) as err:
            raise _unreadable(path, err, how_to_make) from err

    def numpy(self) -> np.ndarray:
        return self.embeddings.numpy()


def load_identities(path: str | Path, how_to_make: str = "re-run the command that wrote it"
                    ) -> tuple[np.ndarray, dict[int, str]]:
    """(labels, label_names) of the feature file at `path` (N int64, -1 where unknown; label ->
    identity name), read and checked as `FeatureSet.load` reads it, with the same errors, but
    without torch: what `jaguar gallery` lists."""
    arrays, metadata = _read(path, how_to_make)
    try:
        return arrays["labels"].astype(np.int64, copy=False).reshape(-1), _label_names(metadata)
    except (KeyError, ValueError, TypeError) as err:
        raise _unreadable(path, err, how_to_make) from err


def _label_names(metadata: dict[str, str]) -> dict[int, str]:
    return {int(k): v for k, v in json.loads(metadata.get("label_names", "{}")).items()}


def _unreadable(path: str | Path, err: Exception, how_to_make: str) -> FeatureFileError:
    return FeatureFileError(f"feature file {path} could not be read ({type(err).__name__}: {err}); it is "
                            f"truncated or not written by jaguar: {how_to_make}")


def _read(path: str | Path, how_to_make: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays and metadata (less its sha256) of a feature file, checked against the recorded
    checksum and for non-finite embeddings; the errors of `FeatureSet.load`."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"feature file {path} does not exist; run `jaguar extract` first")
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
        arrays = load_file(str(path))
        recorded = metadata.pop("sha256", None)  # absent in files of earlier versions
        if recorded is not None and _content_sha256(arrays, metadata) != recorded:
            raise FeatureFileError(f"feature file {path} does not match the checksum recorded when it was "
                                   f"written (corrupt or changed since): {how_to_make}")
        embeddings = arrays["embeddings"]
        # one reduction first: a NaN or an infinity anywhere makes the sum non-finite (rows looked at only then)
        bad_rows = ([] if bool(np.isfinite(embeddings.sum())) else
                    np.nonzero(~np.isfinite(embeddings).all(axis=1))[0].tolist())
        if bad_rows:
            names = json.loads(metadata["names"])
            raise FeatureFileError(f"feature file {path} has non-finite embeddings in {len(bad_rows)} row(s), "
                                   f"e.g. {[names[i] for i in bad_rows[:5]]}: {how_to_make}")
    except FeatureFileError:
        raise
    # safetensors raises its own error type (a truncated or foreign file), json and the keys the rest
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as err:
        raise _unreadable(path, err, how_to_make) from err
    return arrays, metadata


# The dtype names in the checksums of the files written so far (torch's names of these dtypes).
_DTYPE_NAMES = {np.dtype(np.float32): "torch.float32", np.dtype(np.int64): "torch.int64"}


def _content_sha256(arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
    """sha256 of a feature file's content (jaguar.checksums.arrays_sha256), dtypes named as torch names them."""
    return arrays_sha256(arrays, metadata, lambda dtype: str(_DTYPE_NAMES.get(dtype, dtype)))
