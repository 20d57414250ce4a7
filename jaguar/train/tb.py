"""TensorBoard logging on the main process, and the retrieval-grid picture (query + top-5)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.utils.tensorboard import SummaryWriter


class TensorBoardLogger:
    """Writes scalars and images to RUN/tb on the main process; a no-op elsewhere."""

    def __init__(self, log_dir: Path, enabled: bool) -> None:
        self.writer: Optional[SummaryWriter] = SummaryWriter(str(log_dir)) if enabled else None

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)

    def image(self, tag: str, image_chw: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image_chw, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def retrieval_grid(images: torch.Tensor, similarity: torch.Tensor, labels: torch.Tensor,
                   mean: tuple, std: tuple, num_queries: int = 4, top: int = 5) -> torch.Tensor:
    """A C×H×W picture: each row a query then its top-`top` matches (self excluded), framed green
    when the identity matches and red when it does not. `images` are normalised network inputs."""
    count = images.shape[0]
    num_queries = min(num_queries, count)
    top = min(top, count - 1)
    pixels = images.float() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    pixels = pixels.clamp(0, 1)
    scores = similarity.clone().float()
    scores.fill_diagonal_(float("-inf"))
    ranked = scores.topk(top, dim=1).indices
    border = 3
    tiles = []
    for query in range(num_queries):
        row = [_framed(pixels[query], (0.2, 0.4, 1.0), border)]
        for match in ranked[query].tolist():
            colour = (0.1, 0.8, 0.1) if labels[match] == labels[query] else (0.9, 0.1, 0.1)
            row.append(_framed(pixels[match], colour, border))
        tiles.append(torch.cat(row, dim=2))
    return torch.cat(tiles, dim=1)


def _framed(image: torch.Tensor, colour: tuple, border: int) -> torch.Tensor:
    framed = torch.tensor(colour).view(3, 1, 1).expand(3, image.shape[1] + 2 * border,
                                                       image.shape[2] + 2 * border).clone()
    framed[:, border:-border, border:-border] = image
    return framed
