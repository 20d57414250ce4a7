"""`jaguar export`: a run's embedding model as a self-describing ONNX file, checked against PyTorch,
optionally quantised to int8 with onnxruntime.

The exported graph is what `jaguar extract` computes for a batch (`EmbeddingGraph`): backbone,
pooling and neck in evaluation mode, each test-time view (the image, its mirror with
retrieval.flip_tta, each of retrieval.scales) embedded and L2-normalised, the views averaged and
normalised again (`jaguar.core.embedding.embed_batch`). Input B x 3 x H x W (dynamic batch),
output B x D float32, L2-normalised. The preprocessing (input size, mean/std, alpha handling, crop,
resize) is written into the file's metadata_props (`jaguar.core.onnx_model`), so the file alone
says how to prepare an image.

Checks: after export onnxruntime embeds sample images of the run (validation, else test) at batch 1
and as one batch; the export is refused, and nothing written, when an embedding's cosine distance to
PyTorch's exceeds the tolerance (1e-4). `int8`: onnxruntime quantisation, static (QDQ, per-channel
weights, activation ranges calibrated on validation images; the default) or dynamic (weights only);
its cosine agreement with PyTorch and the identity-balanced mAP of both on the check images are
reported and stored in the int8 file's metadata. Uses the legacy TorchScript exporter
(`torch.onnx.export(..., dynamo=False)`), which traces the model as run."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from jaguar.config import Config
from jaguar.data.loader import build_eval_loader
from jaguar.data.shards import load_manifest
from jaguar.errors import JaguarError
from jaguar.io import atomic_file
from jaguar.retrieval.extract import split_positions
from jaguar.core.embedding import embed_batch
from jaguar.core.evaluator import MetricsError, identity_balanced_map
from jaguar.core.onnx_model import (INPUT_NAME, OUTPUT_NAME, OnnxEmbedding, preprocessing_metadata,
                                         require_onnxruntime)
from jaguar.run import RunDir

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4  # max cosine distance between ONNX fp32 and PyTorch embeddings
DEFAULT_CHECK_IMAGES = 256  # images embedded by both to compare (the int8 figures use all of them)
CALIBRATION_IMAGES = 64  # validation images whose activations set the static int8 ranges
OPSET = 17
INT8_MODES = ("static", "dynamic")


class ExportError(JaguarError, ValueError):
    """An export that cannot be made or fails its check; the message says why and what to do."""


class EmbeddingGraph(nn.Module):
    """images (B x 3 x H x W) -> B x D L2-normalised embeddings, exactly as extraction embeds a
    batch (model.embed on every flip/scale view, averaged): the module that is exported."""

    def __init__(self, model: nn.Module, flip_tta: bool, scales: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.flip_tta = bool(flip_tta)
        self.scales = tuple(float(s) for s in scales)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return embed_batch(self.model.embed, images, images.device, self.flip_tta, self.scales, None)


@dataclass
class Agreement:
    """PyTorch vs onnxruntime on the same images: cosine distances (1 - cos) per image and the
    identity-balanced mAP of each embedding (all-vs-all on the labelled check images; None when
    they hold no identity with two images)."""
    images: int
    max_cosine_distance: float
    mean_cosine_distance: float
    map_pytorch: Optional[float] = None
    map_onnx: Optional[float] = None


@dataclass
class ExportResult:
    path: Path
    source: str
    fp32: Agreement
    int8_path: Optional[Path] = None
    int8: Optional[Agreement] = None
    int8_mode: str = ""


def _load_model(run: RunDir, cfg: Config, checkpoint: Optional[Path]):
    """The run's ReIDModel in eval mode on the CPU and the weights' description (a zero-shot run
    without checkpoints: the model as built, seeded as extraction builds it)."""
    from jaguar.core.embedding import load_embedder

    if checkpoint is None:
        checkpoint = run.checkpoints.best_or_latest()
    embedder = load_embedder(cfg, checkpoint, None, torch.device("cpu"))
    return embedder.module, embedder.source


def check_batches(cfg: Config, run: RunDir, mean: Sequence[float], std: Sequence[float], count: int,
                  batch_size: int = 32) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Up to `count` of the run's validation images (the test images when it has none), prepared by
    the eval transform, in batches; and their labels. Raises ExportError when there are none."""
    for split_name in ("val", "test"):
        split, positions = split_positions(cfg, run, split_name)
        if positions:
            break
    else:
        raise ExportError(f"the run has no validation or test images in data.shards={cfg.data.shards} to check "
                          f"the export on; prepare the shards the run was trained on")
    positions = positions[:count]
    loader = build_eval_loader(cfg, split, positions, tuple(mean), tuple(std), batch_size)
    batches = [images for images, _ in loader]
    return batches, torch.as_tensor(split.labels[list(positions)], dtype=torch.long)


def _retrieval_map(embeddings: torch.Tensor, labels: torch.Tensor) -> Optional[float]:
    try:
        return identity_balanced_map(embeddings @ embeddings.T, labels)
    except MetricsError:  # no identity with two check images
        return None


def compare(reference: torch.Tensor, onnx_embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Agreement:
    """Agreement of two N x D L2-normalised embeddings of the same images (rows in the same order)."""
    distance = (1.0 - (reference.double() * onnx_embeddings.double()).sum(dim=1)).clamp(min=0.0)
    figures = Agreement(len(reference), float(distance.max()) if len(distance) else 0.0,
                        float(distance.mean()) if len(distance) else 0.0)
    if labels is not None:
        figures.map_pytorch = _retrieval_map(reference, labels)
        figures.map_onnx = _retrieval_map(onnx_embeddings, labels)
    return figures


def _onnx_embeddings(path: Path, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    """onnxruntime's embeddings of the batches: the first image alone (batch 1), then each batch."""
    model = OnnxEmbedding.load(path)
    first = model.embed(batches[0][:1])
    rest = [model.embed(batches[0][1:])] + [model.embed(batch) for batch in batches[1:]]
    return torch.cat([first] + rest)


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata_props of an ONNX file (raw strings)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _write_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Replace the metadata_props of the ONNX file at `path` with `metadata`."""
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in sorted(metadata.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def export_onnx(graph: EmbeddingGraph, example: torch.Tensor, path: Path, metadata: dict[str, str]) -> None:
    """torch.onnx.export of `graph` traced on `example` into `path` (a dynamic batch dimension,
    input "images", output "embeddings"), then `metadata` as its metadata_props."""
    try:
        import onnx  # noqa: F401  the exporter needs it; say how to install it before tracing
    except ImportError as err:
        raise ExportError("`jaguar export` needs onnx and onnxruntime: `pip install -e \".[export]\"`") from err
    graph.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(graph, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
    _write_metadata(path, metadata)


class _CalibrationReader:
    """onnxruntime's CalibrationDataReader over prepared image batches."""

    def __init__(self, batches: Sequence[torch.Tensor]) -> None:
        self._batches: Iterator[torch.Tensor] = iter(batches)

    def get_next(self) -> Optional[dict]:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch.numpy()}

    def rewind(self) -> None:  # part of the reader protocol; one pass is all quantize_static takes
        pass


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantisation logs a line per tensor on the root logger at INFO: warnings only."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(fp32_path: Path, int8_path: Path, mode: str, calibration: Sequence[torch.Tensor]) -> None:
    """An int8 copy of the fp32 export (metadata kept): static QDQ with per-channel int8 weights and
    uint8 activations calibrated on `calibration` batches (MinMax), or dynamic (weights int8,
    activations quantised at run time)."""
    require_onnxruntime()
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    metadata = read_metadata(fp32_path)
    with tempfile.TemporaryDirectory(prefix=".quantise-", dir=int8_path.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # shape inference and graph optimisation first, as onnxruntime's quantisation guide asks
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        with warnings.catch_warnings(), _quiet_root_logger():
            warnings.simplefilter("ignore")
            if mode == "dynamic":
                quantize_dynamic(str(prepared), str(int8_path), weight_type=QuantType.QInt8, per_channel=True)
            else:
                quantize_static(str(prepared), str(int8_path), _CalibrationReader(calibration),
                                quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8)
    metadata["precision"] = json.dumps("int8")
    metadata["int8_mode"] = json.dumps(mode)
    _write_metadata(int8_path, metadata)


def export_run(run: RunDir, output: str | Path | None = None, int8: bool = False, int8_mode: str = "static",
               checkpoint: str | Path | None = None, tolerance: float = DEFAULT_TOLERANCE,
               check_images: int = DEFAULT_CHECK_IMAGES) -> ExportResult:
    """Export the run's embedding model (module docstring) to `output` (default RunDir.export_path())
    and, with `int8`, its quantised copy beside it (RunDir.export_path(int8=True) by default, else
    `output` with "-int8" before the suffix). Raises ExportError when the fp32 check fails (nothing is
    written), MissingInputError/ConfigError for a run without config or images."""
    if int8_mode not in INT8_MODES:
        raise ExportError(f"--int8-mode {int8_mode!r} is not one of {', '.join(INT8_MODES)}")
    if check_images < 2:
        raise ExportError(f"--check-images must be at least 2, got {check_images}")
    run.require()
    cfg = run.load_config()
    model, source = _load_model(run, cfg, Path(checkpoint) if checkpoint else None)
    graph = EmbeddingGraph(model, cfg.retrieval.flip_tta, cfg.retrieval.scales).eval()
    batches, labels = check_batches(cfg, run, model.mean, model.std, check_images)
    with torch.no_grad():
        reference = torch.cat([graph(batch) for batch in batches])
    path = Path(output) if output else run.export_path()
    if path.suffix != ".onnx":
        raise ExportError(f"output {path} must end in .onnx")
    metadata = preprocessing_metadata(cfg, model.mean, model.std, model.embed_dim, source,
                                      prep=load_manifest(cfg.data.shards).options)
    with atomic_file(path) as tmp:
        export_onnx(graph, batches[0][:2], tmp, metadata)
        fp32 = compare(reference, _onnx_embeddings(tmp, batches))
        if not fp32.max_cosine_distance <= tolerance:
            raise ExportError(f"the ONNX embeddings differ from PyTorch's: max cosine distance "
                              f"{fp32.max_cosine_distance:.3g} on {fp32.images} images exceeds the tolerance "
                              f"{tolerance:g}; nothing written. An operator of {cfg.model.backbone} may not export "
                              f"faithfully (try another opset or backbone), or raise --tolerance knowingly")
    log.info("wrote %s: %d-dim embeddings, max cosine distance to PyTorch %.2e on %d images", path,
             model.embed_dim, fp32.max_cosine_distance, fp32.images)
    result = ExportResult(path, source, fp32)
    if not int8:
        return result
    default = output is None
    int8_path = run.export_path(int8=True) if default else path.with_name(f"{path.stem}-int8{path.suffix}")
    with atomic_file(int8_path) as tmp:
        quantize_int8(path, tmp, int8_mode, batches[:max(1, CALIBRATION_IMAGES // batches[0].shape[0])])
        agreement = compare(reference, _onnx_embeddings(tmp, batches), labels)
        _write_metadata(tmp, {**read_metadata(tmp), "check": json.dumps(asdict(agreement))})
    result.int8_path, result.int8, result.int8_mode = int8_path, agreement, int8_mode
    return result


def describe(result: ExportResult, tolerance: float = DEFAULT_TOLERANCE) -> str:
    """The export's figures in a few lines, for the command line."""
    lines = [f"wrote {result.path} (from {result.source})",
             f"fp32: max cosine distance to PyTorch {result.fp32.max_cosine_distance:.2e} on {result.fp32.images} "
             f"images (tolerance {tolerance:g})"]
    if result.int8 is not None:
        agreement = result.int8
        maps = ""
        if agreement.map_pytorch is not None and agreement.map_onnx is not None:
            maps = (f"; identity-balanced mAP on these images {agreement.map_onnx:.4f} vs PyTorch "
                    f"{agreement.map_pytorch:.4f} ({agreement.map_onnx - agreement.map_pytorch:+.4f})")
        lines += [f"wrote {result.int8_path} (int8, {result.int8_mode})",
                  f"int8: cosine distance to PyTorch max {agreement.max_cosine_distance:.2e}, mean "
                  f"{agreement.mean_cosine_distance:.2e} on {agreement.images} images{maps}"]
    return "\n".join(lines)
