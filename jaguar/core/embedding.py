"""What a feature extraction embeds with (`Embedder`): the run's PyTorch ReID model with its flip TTA
and scales, or an exported ONNX model (jaguar.core.onnx_model) whose graph holds them. Used by
`jaguar extract` (jaguar.retrieval.extract) and by the photo embedder of `jaguar identify`/`enroll`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch

from jaguar.config import Config
from jaguar.train import checkpoint as ckpt

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
    from jaguar.models import build_model

    num_classes = ckpt.read_state(checkpoint)["num_classes"] if checkpoint is not None and checkpoint.is_dir() else 1
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
        source = str(ckpt.load_weights(model, checkpoint, prefer_ema=cfg.optim.ema))
    else:
        weights = f", {Path(cfg.model.pretrained_file).name}" if cfg.model.pretrained_file else ""
        source = f"{cfg.model.backbone} (as built{weights})"
    model.to(device).eval()
    return Embedder(model.embed, tuple(model.mean), tuple(model.std), model.embed_dim, cfg.retrieval.flip_tta,
                    tuple(cfg.retrieval.scales), source, model, model.backbone.size_multiple)
