"""Validation during training: embed the validation images (each rank its own contiguous slice),
score them all-vs-all with the retrieval evaluator (identity-balanced mAP, mAP, rank-1/5, mINP) and log
a retrieval grid to TensorBoard."""

from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate import Accelerator

from jaguar.config import Config, ConfigError
from jaguar.data.loader import build_eval_loader
from jaguar.core.blocks import contiguous_slice
from jaguar.core.embedding import embed_batches
from jaguar.core.evaluator import MetricsError, evaluate
from jaguar.train.tb import TensorBoardLogger, retrieval_grid


def embed_positions(model, split, positions, cfg: Config, accelerator: Accelerator, mean, std,
                    flip_tta: bool) -> torch.Tensor:
    """L2-normalised embeddings of split[positions], in that order, on every rank.

    Every rank embeds the same number of images in the same number of batches: a share shorter
    than the longest (uneven splits, or fewer images than ranks) is padded by repeating an image
    and the padded rows are dropped. Under ZeRO-3 each forward gathers the partitioned parameters
    from every rank, so a rank with one batch fewer would leave the others waiting in a collective
    of another size (DeepSpeed#860)."""
    world = accelerator.num_processes
    start, end = contiguous_slice(len(positions), accelerator.process_index, world)
    mine = list(positions[start:end])
    longest = -(-len(positions) // world)
    padded = mine + [mine[-1] if mine else positions[0]] * (longest - len(mine))
    loader = build_eval_loader(cfg, split, padded, mean, std, cfg.data.batch_size)
    was_training = model.training
    model.eval()
    _, embeddings = embed_batches(model.embed, loader, accelerator.device, flip_tta=flip_tta)
    model.train(was_training)
    embeddings = embeddings[:len(mine)]
    if world == 1:
        return embeddings
    gathered = [None] * world
    dist.all_gather_object(gathered, embeddings)
    return torch.cat([part for part in gathered if part.numel() > 0])


def validate(model, split, val_indices, cfg: Config, accelerator: Accelerator, mean, std,
             tb: TensorBoardLogger, step: int) -> dict:
    embeddings = embed_positions(model, split, val_indices, cfg, accelerator, mean, std,
                                 cfg.retrieval.flip_tta)
    labels = torch.as_tensor(split.labels[val_indices])
    bad = ~torch.isfinite(embeddings).all(dim=1)
    if bool(bad.any()):
        # the model, not the validation split, is at fault: say so rather than "cannot be scored"
        raise FloatingPointError(f"validation at step {step}: the model gives non-finite embeddings for "
                                 f"{int(bad.sum())} of {len(bad)} images (its weights or activations overflowed); "
                                 f"resume from an earlier checkpoint with a lower optim.lr")
    similarity = embeddings @ embeddings.T
    try:
        scored = evaluate(similarity, labels, kind="similarity")
    except MetricsError as err:  # every validation identity has a single image
        raise ConfigError(f"validation cannot be scored: {err}; raise data.val_fraction or set "
                          f"train.eval_every=0") from None
    result = {name: scored.summary()[name] for name in ("mAP_balanced", "mAP", "rank1", "rank5", "mINP")}
    tb.scalars({f"val/{name}": value for name, value in result.items()}, step)
    if accelerator.is_main_process and len(val_indices) > 1:
        _log_grid(split, val_indices, similarity, labels, cfg, mean, std, tb, step)
    return result


def _log_grid(split, val_indices, similarity, labels, cfg, mean, std, tb, step, num_queries: int = 4) -> None:
    # Only the queries shown and their top-5 are decoded again; `shown` is sorted, so the queries
    # (positions 0..num_queries-1) come first and keep their global top-5 inside the subset.
    scores = similarity.clone()
    scores.fill_diagonal_(float("-inf"))
    top = min(5, len(val_indices) - 1)
    queries = list(range(min(num_queries, len(val_indices))))
    shown = sorted({q for q in queries} | {int(m) for q in queries for m in scores[q].topk(top).indices})
    loader = build_eval_loader(cfg, split, [val_indices[i] for i in shown], mean, std, len(shown))
    images = torch.cat([batch for batch, _ in loader])
    grid = retrieval_grid(images, similarity[shown][:, shown], labels[shown], mean, std,
                          num_queries=len(queries), top=top)
    tb.image("val/retrieval_grid", grid, step)
