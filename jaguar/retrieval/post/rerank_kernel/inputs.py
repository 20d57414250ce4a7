"""Checks and conversions at the kernel's edge: numpy or torch in, the same kind out; distance
matrices 2-D and finite; k1, k2 and lambda in range; row chunks sized to a memory budget."""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor
BYTES_PER_DENSE_CELL = 16  # B x N working rows: float32 scatter target, Jaccard, blend, mask


def as_tensor(name: str, value: ArrayLike, device: torch.device | None = None) -> torch.Tensor:
    """value as a 2-D floating tensor (integers become float64), on `device` when given."""
    tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(value).__name__}")
    if device is not None:
        tensor = tensor.to(device)
    if not torch.is_floating_point(tensor):
        tensor = tensor.double()
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be a 2-D distance matrix, got shape {tuple(tensor.shape)}")
    return tensor


def like(result: torch.Tensor, reference: ArrayLike) -> ArrayLike:
    """result as numpy when the input was numpy, else as the tensor it is."""
    return result.cpu().numpy() if isinstance(reference, np.ndarray) else result


def check_finite(name: str, *reductions: torch.Tensor) -> None:
    """Raise ValueError naming `name` unless every reduction is finite. Column maxima and minima
    propagate NaN and show every +-inf, so no separate N x N pass is needed."""
    if not all(bool(torch.isfinite(r).all()) for r in reductions):
        raise ValueError(f"{name} contains NaN or infinite distances; fix the features before re-ranking")


def check_params(k1: int, k2: int, lambda_value: float) -> None:
    if int(k1) < 1 or int(k2) < 1:
        raise ValueError(f"re-ranking needs k1 >= 1 and k2 >= 1, got k1={k1}, k2={k2}")
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise ValueError(f"re-ranking lambda_value must be in [0, 1], got {lambda_value}")


def chunk_rows(n_rows: int, n_cols: int, budget_mb: float, bytes_per_cell: int = BYTES_PER_DENSE_CELL) -> int:
    """How many rows of n_cols cells of bytes_per_cell fit the budget (at least one, at most n_rows)."""
    budget = max(float(budget_mb), 1e-3) * 2**20
    return int(max(1, min(n_rows, budget // max(1, n_cols * bytes_per_cell))))
