"""An exported embedding model (`jaguar export`) run with onnxruntime: the self-describing ONNX file's
preprocessing metadata and the embedding call that `jaguar extract --model` and `jaguar identify
--model` use in place of the PyTorch model. Needs only onnxruntime (the `export` extra); neither timm
nor a checkpoint is read.

The file's graph takes B x 3 x H x W images, normalised as its metadata says, and returns B x D
L2-normalised float32 embeddings with the run's flip TTA and scales already folded in (the graph
averages the views exactly as `jaguar.core.embedding.embed_batch` does). Its metadata_props hold
what the eval transform needs (`PREPROCESSING_KEYS`: input size, mean/std, alpha handling, crop and
resize), the embedding width, the weights it was exported from and the test-time augmentation it
folds in, each value a JSON string."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jaguar.config import Config, from_dict, to_dict
from jaguar.data.manifest import file_sha256
from jaguar.errors import JaguarError, MissingInputError

FORMAT = "jaguar-embedding/1"  # metadata "format": the contract above; bumped if it changes
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
# config keys the eval transform reads (jaguar.data.transforms._Transform): stored in the file, so it
# preprocesses photos the way it was exported whatever the run's config says now
PREPROCESSING_KEYS = ("model.img_size", "data.alpha_mode", "data.background", "data.crop_to_alpha",
                      "data.crop_margin", "data.resize")


class OnnxModelError(JaguarError, ValueError):
    """An exported model that cannot be used: missing extra, unreadable file, foreign metadata."""


def require_onnxruntime():
    """The onnxruntime module, or OnnxModelError saying how to install it."""
    try:
        import onnxruntime
    except ImportError as err:
        raise OnnxModelError("ONNX models need onnxruntime: `pip install -e \".[export]\"` (or `pip install "
                             "onnxruntime`)") from err
    return onnxruntime


def preprocessing_metadata(cfg: Config, mean: tuple[float, ...], std: tuple[float, ...], embed_dim: int,
                           source: str, precision: str = "fp32", prep: dict | None = None) -> dict[str, str]:
    """The metadata_props an exported file carries (values JSON-encoded): preprocessing, width,
    the weights exported (`source`), the folded test-time augmentation, the precision and `prep`,
    the long-side limit and encoding the run's shards were prepared with (`jaguar prep`'s options,
    which `jaguar identify --model` applies to photos when the shards are not at hand)."""
    flat = to_dict(cfg)
    values: dict[str, Any] = {"format": FORMAT, "mean": list(mean), "std": list(std), "embed_dim": int(embed_dim),
                              "source": source, "precision": precision, "backbone": cfg.model.backbone,
                              "flip_tta": cfg.retrieval.flip_tta, "scales": list(cfg.retrieval.scales),
                              "normalised_output": True,
                              "prep": {k: v for k, v in (prep or {}).items() if k in ("max_side", "encoding")}}
    for key in PREPROCESSING_KEYS:
        group, name = key.split(".")
        values[key] = flat[group][name]
    return {key: json.dumps(value) for key, value in values.items()}


@dataclass
class OnnxEmbedding:
    """A loaded exported model: `embed(images)` -> B x D L2-normalised float32 (CPU tensor) for a
    B x 3 x H x W float batch; `mean`, `std`, `embed_dim`, `source` (the weights it was exported
    from), `precision` ("fp32" or "int8"), `digest` (sha256 of the file) from its metadata."""
    path: Path
    session: Any
    meta: dict[str, Any]
    digest: str

    @classmethod
    def load(cls, path: str | Path, threads: int = 0) -> "OnnxEmbedding":
        """Open `path` with onnxruntime's CPU provider (`threads` intra-op threads, 0 = its default).
        Raises MissingInputError for a missing file, OnnxModelError for one that is not a jaguar export."""
        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"ONNX model {path} does not exist; write it with `jaguar export RUN -o {path}`")
        ort = require_onnxruntime()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own (pybind) types for unreadable graphs
            raise OnnxModelError(f"{path} could not be loaded by onnxruntime ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0][:200]}); re-export it with `jaguar export`") from err
        raw = session.get_modelmeta().custom_metadata_map
        try:
            meta = {key: json.loads(value) for key, value in raw.items()}
        except json.JSONDecodeError as err:
            raise OnnxModelError(f"{path}: metadata is not jaguar's ({err}); re-export it with `jaguar export`") from None
        if meta.get("format") != FORMAT:
            raise OnnxModelError(f"{path} is not a jaguar embedding export (metadata format {meta.get('format')!r}, "
                                 f"expected {FORMAT!r}); export it with `jaguar export RUN -o {path}`")
        missing = [k for k in ("mean", "std", "embed_dim", "source", *PREPROCESSING_KEYS) if k not in meta]
        if missing:
            raise OnnxModelError(f"{path}: metadata lacks {', '.join(missing)}; re-export it with `jaguar export`")
        return cls(path, session, meta, file_sha256(path))

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.meta["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.meta["std"])

    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])

    @property
    def source(self) -> str:
        return str(self.meta["source"])

    @property
    def precision(self) -> str:
        return str(self.meta.get("precision", "fp32"))

    def describe(self) -> str:
        return f"{self.path} (ONNX {self.precision}, exported from {self.source})"

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """B x D L2-normalised float32 embeddings of a preprocessed batch (flip TTA and scales are in
        the graph: do not apply them again)."""
        batch = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        if batch.shape[0] == 0:
            return torch.zeros(0, self.embed_dim)
        (out,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def eval_config(self, cfg: Config) -> Config:
        """A copy of `cfg` whose eval-transform keys are the file's (PREPROCESSING_KEYS; every value
        checked as the config checks it), so images are prepared as they were at export."""
        mapping = to_dict(cfg)
        for key in PREPROCESSING_KEYS:
            group, name = key.split(".")
            mapping[group][name] = self.meta[key]
        return from_dict(mapping, f" (preprocessing of {self.path})")
