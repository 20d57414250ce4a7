"""Batch embedding: what a feature extraction embeds with (`Embedder`: the run's PyTorch ReID model with
its flip TTA and scales, or an exported ONNX model (jaguar.core.onnx_model) whose graph holds them) and
the batched forward with flip / multi-scale averaging (`embed_batch`, `embed_batches`). Used by
`jaguar extract` (jaguar.retrieval.extract), validation during training (jaguar.train.validation),
export, diagnostics and the photo embedder of `jaguar identify`/`enroll`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from jaguar.config import Config
from jaguar.progress import progress_bar

if TYPE_CHECKING:  # onnxruntime is an optional extra: imported only when an exported model is used
    from jaguar.core.onnx_model import OnnxEmbedding


@dataclass
class Embedder:
    """What extraction embeds with: a PyTorch ReIDModel's `embed` with the run's flip TTA and
    scales, or an exported model's (the augmentation folded into its graph, so none here)."""
    embed: Callable[[torch.Tensor], torch.Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    embed_dim: int
    flip_tta: bool
    scales: tuple[float, ...]
    source: str
    module: Optional[torch.nn.Module] = None  # the PyTorch ReIDModel (None for an exported model)
    size_multiple: int = 1  # a TTA scale's sides are rounded to this (a ViT's patch size; Backbone.size_multiple)


def load_embedder(cfg: Config, checkpoint: Optional[Path], onnx_model: Optional[OnnxEmbedding],
                  device: torch.device) -> Embedder:
    """The Embedder of an extraction: the exported model when given, else the run's model built
    from its config with `checkpoint`'s weights (as built, seeded by run.seed, when None)."""
    if onnx_model is not None:
        return Embedder(onnx_model.embed, onnx_model.mean, onnx_model.std, onnx_model.embed_dim, False, (1.0,),
                        onnx_model.source)
    from jaguar.config import ConfigError
    from jaguar.core.weights import load_weights, read_state
    from jaguar.models import build_model

    num_classes = read_state(checkpoint)["num_classes"] if checkpoint is not None and checkpoint.is_dir() else 1
    with torch.random.fork_rng(devices=[]):
        # Without a checkpoint the randomly initialised layers ARE the model: every process and every
        # re-run must draw the same ones (run.seed), or the processes' parts would not match. With one,
        # the pretrained file is not read (the checkpoint holds the weights; the file may be gone).
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg, num_classes, load_pretrained=checkpoint is None)
    if list(cfg.retrieval.scales) != [1.0] and not model.backbone.any_size:
        raise ConfigError(f"retrieval.scales={cfg.retrieval.scales}: model.backbone={cfg.model.backbone} takes only "
                          f"its model.img_size inputs (relative position embeddings cannot be resized); "
                          f"set retrieval.scales=[1.0]")
    if checkpoint is not None:
        source = str(load_weights(model, checkpoint, prefer_ema=cfg.optim.ema))
    else:
        weights = f", {Path(cfg.model.pretrained_file).name}" if cfg.model.pretrained_file else ""
        source = f"{cfg.model.backbone} (as built{weights})"
    model.to(device).eval()
    return Embedder(model.embed, tuple(model.mean), tuple(model.std), model.embed_dim, cfg.retrieval.flip_tta,
                    tuple(cfg.retrieval.scales), source, model, model.backbone.size_multiple)


def scaled_size(height: int, width: int, scale: float, multiple: int = 1) -> tuple[int, int]:
    """The input size of a TTA scale: each side times `scale`, rounded to the nearest multiple of
    `multiple` (a ViT's patch size; at least one multiple), so a token model sees whole patches
    (timm#1863)."""
    def side(length: int) -> int:
        return max(multiple, int(round(length * scale / multiple)) * multiple)
    return side(height), side(width)


@torch.no_grad()
def embed_batch(embed: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, device: torch.device,
                flip_tta: bool = True, scales: Sequence[float] = (1.0,),
                autocast_dtype: Optional[torch.dtype] = None, size_multiple: int = 1) -> torch.Tensor:
    """B x D L2-normalised float32 embeddings (on the CPU) of a B x 3 x H x W batch. Flip TTA
    averages the image and its mirror; several scales average the embeddings of inputs resized to
    `scaled_size` (sides rounded to `size_multiple`, the backbone's Backbone.size_multiple)."""
    images = images.to(device, non_blocking=True)
    total = None
    for scale in scales:
        # scale 1 leaves the input as it is (its size may be symbolic while an export traces it)
        size = None if scale == 1.0 else scaled_size(int(images.shape[-2]), int(images.shape[-1]), scale, size_multiple)
        scaled = images if size is None else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        views = [scaled, torch.flip(scaled, dims=[3])] if flip_tta else [scaled]
        for view in views:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                emb = embed(view).float()
            emb = F.normalize(emb, dim=1)
            total = emb if total is None else total + emb
    return F.normalize(total, dim=1).cpu()


@torch.no_grad()
def embed_batches(embed: Callable[[torch.Tensor], torch.Tensor], loader, device: torch.device,
                  flip_tta: bool = True, scales: Sequence[float] = (1.0,),
                  autocast_dtype: Optional[torch.dtype] = None, progress: bool = False,
                  desc: str = "extract", size_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every batch of `loader` (yielding (images, positions)) with `embed_batch`; returns
    (positions, embeddings) with embeddings L2-normalised float32."""
    all_positions, all_embeddings = [], []
    for images, positions in progress_bar(loader, desc=desc, unit="batch", enabled=progress):
        all_embeddings.append(embed_batch(embed, images, device, flip_tta, scales, autocast_dtype, size_multiple))
        all_positions.append(torch.as_tensor(positions).cpu())
    if not all_embeddings:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)
    return torch.cat(all_positions), torch.cat(all_embeddings)


def autocast_for(device: torch.device) -> Optional[torch.dtype]:
    """The autocast type extraction uses on `device`: bf16 on a GPU that has it, else none."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
