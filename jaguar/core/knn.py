"""Exact nearest neighbours by cosine similarity in O(N * M) memory: the one kNN of retrieval at
gallery scale (query expansion, DBA, top-M post-processing, the ranked lists of `jaguar rank` and
the evaluator's top-M mode).

Rows are L2-normalised, so cosine similarity is the inner product; the search is exact (faiss
`IndexFlatIP`, the GPU index when CUDA and faiss's GPU build are present), queries in chunks so
only chunk x M results and faiss's own fixed-size blocks are held. Ties are broken by index, the
lower gallery index first, exactly as the dense path's stable sorts do (jaguar.core.evaluator):
faiss's heap does not promise an order among equal scores, so each row is re-sorted by (score,
index), and a row whose tie group may run past what was searched is recomputed with the torch
kernel below (`backend="torch"`, also the reference the tests hold faiss to)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]
BACKENDS = ("faiss", "torch")
_MARGIN = 8  # extra neighbours searched so a tie at the M-th place is seen whole in most rows


@dataclass(frozen=True)
class Neighbours:
    """Each query's top-M gallery rows, most similar first (equal scores: lower index first)."""

    index: torch.Tensor  # (Q, M) int64 gallery row
    similarity: torch.Tensor  # (Q, M) float32 cosine similarity

    def __len__(self) -> int:
        return self.index.shape[0]


def normalise(name: str, features: ArrayLike) -> torch.Tensor:
    """features as an L2-normalised, contiguous float32 CPU tensor (N x D); ValueError naming
    `name` when not 2-D or not finite."""
    tensor = torch.as_tensor(features).detach().cpu().float()
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be N x D, got shape {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} has NaN or infinite values (row {int((~torch.isfinite(tensor)).any(1).nonzero()[0])})")
    return torch.nn.functional.normalize(tensor, dim=1).contiguous()


def _by_score_then_index(scores: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    index, order = index.sort(dim=1)
    scores = scores.gather(1, order)
    scores, order = scores.sort(dim=1, descending=True, stable=True)
    return scores, index.gather(1, order)


def stable_top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each row of a B x N block, ties by column: top-(k + margin) by
    torch.topk (unordered among ties), re-sorted; rows whose tie at the k-th place may reach past
    that are sorted whole (stable)."""
    n = scores.shape[1]
    width = min(k + _MARGIN, n)
    values, index = _by_score_then_index(*torch.topk(scores, width, dim=1))
    if width < n:
        unsure = (values[:, k - 1] == values[:, -1]).nonzero().flatten()
        if unsure.numel():
            whole_values, whole_index = scores[unsure].sort(dim=1, descending=True, stable=True)
            values[unsure], index[unsure] = whole_values[:, :width], whole_index[:, :width]
    return values[:, :k], index[:, :k]


def _faiss_index(gallery: torch.Tensor):
    import faiss  # imported here: the dense path and the CLI's start-up do not need it

    index = faiss.IndexFlatIP(gallery.shape[1])
    if torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(gallery.numpy())
    return index


def knn(queries: ArrayLike, gallery: Optional[ArrayLike] = None, k: int = 100, *, exclude_self: bool = False,
        backend: str = "faiss", chunk: int = 4096) -> Neighbours:
    """Top-k gallery rows of each query by cosine similarity, exactly.

    queries: Q x D; gallery: G x D (None: the queries searched against themselves, N x N never
    built). Both are L2-normalised here. exclude_self (all-vs-all only) drops each query's own row
    wherever it falls (a duplicate may precede it). k is capped at the candidates there are.
    Returns Neighbours of shape (Q, k). Raises ValueError on bad shapes, values or arguments."""
    if backend not in BACKENDS:
        raise ValueError(f"kNN backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    query = normalise("queries", queries)
    if exclude_self and gallery is not None:
        raise ValueError("exclude_self applies to a set searched against itself (gallery=None)")
    base = query if gallery is None else normalise("gallery", gallery)
    if base.shape[1] != query.shape[1]:
        raise ValueError(f"queries have {query.shape[1]} dimensions, the gallery {base.shape[1]}")
    k = min(int(k), base.shape[0] - int(exclude_self))
    if k < 1:
        raise ValueError(f"k must be >= 1 and the gallery must have candidates (k={k}, gallery {base.shape[0]})")
    searched = min(k + int(exclude_self), base.shape[0])
    width = min(searched + _MARGIN, base.shape[0])
    index_out = torch.empty((query.shape[0], k), dtype=torch.long)
    sim_out = torch.empty((query.shape[0], k), dtype=torch.float32)
    faiss_index = _faiss_index(base) if backend == "faiss" else None
    for start in range(0, query.shape[0], max(1, int(chunk))):
        block = query[start:start + chunk]
        if faiss_index is None:
            values, index = stable_top(block @ base.T, searched)
        else:
            found_values, found_index = faiss_index.search(block.numpy(), width)
            values, index = _by_score_then_index(torch.from_numpy(found_values), torch.from_numpy(found_index))
            if width < base.shape[0]:
                unsure = (values[:, searched - 1] == values[:, -1]).nonzero().flatten()
                if unsure.numel():
                    exact_values, exact_index = stable_top(block[unsure] @ base.T, width)
                    values[unsure], index[unsure] = exact_values, exact_index
            values, index = values[:, :searched], index[:, :searched]
        if exclude_self:
            own = torch.arange(start, start + block.shape[0])[:, None]
            keep = index != own
            # Rows that did not find themselves in the top `searched` drop their last entry.
            keep[keep.all(dim=1), -1] = False
            values, index = values[keep].view(-1, k), index[keep].view(-1, k)
        index_out[start:start + block.shape[0]] = index[:, :k]
        sim_out[start:start + block.shape[0]] = values[:, :k]
    return Neighbours(index_out, sim_out)
