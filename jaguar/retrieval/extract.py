"""Sharded feature extraction: each process embeds one contiguous, disjoint slice of a split (every
image exactly once at any world size), writes its part atomically, and rank 0 merges the parts into
the run's features of that split after checking that together they cover the split exactly.
`extract_split` is the stage (`jaguar extract`); `resolve_source` chooses its config and weights
and `split_positions` the images of a split."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from jaguar.config import Config, ConfigError, load_config
from jaguar.data.loader import build_eval_loader
from jaguar.data.shards import ShardSplit
from jaguar.errors import JaguarError
from jaguar.models import build_model
from jaguar.retrieval.features import FeatureSet
from jaguar.run import RunDir
from jaguar.train import checkpoint as ckpt
from jaguar.train.accel import build_accelerator
from jaguar.train.data import build_run_split, open_train_split

log = logging.getLogger(__name__)


def contiguous_slice(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of `rank`'s share of `count` items: sizes differ by at most one, no padding."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@torch.no_grad()
def embed_batches(embed: Callable[[torch.Tensor], torch.Tensor], loader, device: torch.device,
                  flip_tta: bool = True, scales: Sequence[float] = (1.0,),
                  autocast_dtype: Optional[torch.dtype] = None, progress: bool = False,
                  desc: str = "extract") -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every batch of `loader` (yielding (images, positions)); returns (positions, embeddings)
    with embeddings L2-normalised float32. Flip TTA averages the image and its mirror; several
    scales average the embeddings of resized inputs."""
    all_positions, all_embeddings = [], []
    for images, positions in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        total = None
        for scale in scales:
            scaled = images if scale == 1.0 else F.interpolate(
                images, scale_factor=scale, mode="bilinear", align_corners=False)
            views = [scaled, torch.flip(scaled, dims=[3])] if flip_tta else [scaled]
            for view in views:
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    emb = embed(view).float()
                emb = F.normalize(emb, dim=1)
                total = emb if total is None else total + emb
        all_embeddings.append(F.normalize(total, dim=1).cpu())
        all_positions.append(torch.as_tensor(positions).cpu())
    if not all_embeddings:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)
    return torch.cat(all_positions), torch.cat(all_embeddings)


def fingerprint(obj: dict) -> str:
    """A short stable hash of what determines a part's content (checkpoint, split, settings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def part_path(parts_dir: Path, split: str, start: int, end: int, key: str) -> Path:
    return parts_dir / f"{split}-{start:07d}-{end:07d}-{key}.safetensors"


def merge_parts(part_files: list[Path], expected_names: list[str], label_names: dict[int, str],
                meta: dict) -> FeatureSet:
    """Join parts in order and check the union is exactly the split: no image missing or repeated."""
    parts = [FeatureSet.load(path) for path in part_files]
    names = [name for part in parts for name in part.names]
    if names != list(expected_names):
        missing = sorted(set(expected_names) - set(names))
        extra = sorted(set(names) - set(expected_names))
        raise RuntimeError(f"feature parts do not cover the split exactly: {len(missing)} missing "
                           f"(e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}), "
                           f"{len(names)} rows for {len(expected_names)} images")
    embeddings = torch.cat([part.embeddings for part in parts]) if parts else torch.zeros(0, 0)
    labels = torch.cat([part.labels for part in parts]) if parts else torch.zeros(0, dtype=torch.long)
    return FeatureSet(names, embeddings, labels, dict(label_names), dict(meta))


def resolve_source(run: Optional[RunDir], recipe: str | Path | None = None, overrides: Sequence[str] = (),
                   checkpoint: str | Path | None = None) -> tuple[RunDir, Config, Optional[Path]]:
    """(run, config, weights) of an extraction: a trained run's own config and its checkpoint
    (`checkpoint`, else best, else the newest); or, with `recipe`, that recipe with `overrides`
    and `checkpoint` if given, else the backbone as built (pretrained weights when the recipe asks
    for them). With a recipe the run folder may be None: it is then the config's run.dir."""
    if recipe:
        cfg = load_config(recipe, list(overrides))
        run = run if run is not None else RunDir(cfg.run.dir)
        cfg.run.dir = str(run.path)
        return run, cfg, Path(checkpoint) if checkpoint else None
    if run is None:
        raise JaguarError("give a run folder, or a recipe (--config RECIPE) whose run.dir is the run folder")
    if overrides:
        raise ConfigError(f"key=value overrides ({' '.join(overrides)}) need --config RECIPE; a trained run "
                          f"uses its own {run.config_path}")
    cfg = run.load_config()
    return run, cfg, Path(checkpoint) if checkpoint else run.default_checkpoint()


def split_positions(cfg: Config, run: RunDir, split_name: str) -> tuple[object, list[int]]:
    """(split, positions): the shards split holding `split_name`'s images and their positions in
    it: every test image; the run's validation / training images (its saved split). A run without a
    saved split (a recipe extraction) gets the validation images its config's split would hold out
    for "val", and every training image for "train"."""
    if split_name == "test":
        split = ShardSplit(cfg.data.shards, "test")
        return split, list(range(len(split)))
    split = open_train_split(cfg)
    position = {name: i for i, name in enumerate(split.filenames)}
    if split_name == "val":
        if run.split_path.is_file():
            names = run.load_split().val
        else:
            # No trained run yet (a recipe extraction, e.g. a baseline): the validation images this config's
            # training would hold out, made by the same deterministic split.
            names = [split.filenames[i] for i in build_run_split(cfg, split).val_indices]
    elif split_name == "train":
        names = run.load_split().train if run.split_path.is_file() else list(split.filenames)
    else:
        raise JaguarError(f"split {split_name!r} is not one of test, val, train")
    unknown = [n for n in names if n not in position]
    if unknown:
        raise ConfigError(f"{len(unknown)} images of the run's {split_name} split are not in data.shards="
                          f"{cfg.data.shards} (e.g. {unknown[:3]}); was the data re-prepared?")
    return split, [position[n] for n in names]


@dataclass
class Extraction:
    """What `extract_split` did: the features file, its size and the weights used."""
    path: Path
    images: int
    reused: bool  # the features were up to date; nothing was computed
    source: str = ""


def _mtime(checkpoint: Optional[Path]) -> float:
    if checkpoint is None or not checkpoint.exists():
        return 0.0
    return checkpoint.stat().st_mtime


def extract_split(run: RunDir, split_name: str, cfg: Config, checkpoint: Optional[Path],
                  force: bool = False) -> Extraction:
    """Embed `split_name`'s images into the run's features of that split, each process of the
    launch (accelerate / torchrun / srun, or one process) its contiguous slice; parts finished by an
    earlier attempt are reused and an up-to-date features file is left as it is (unless `force`).
    With `checkpoint` None the model is used as built. The run's config is written if it has none."""
    out = run.features_path(split_name)
    split, positions = split_positions(cfg, run, split_name)
    names = [split.filenames[p] for p in positions]
    settings = {"split": split_name, "names": fingerprint({"n": names}), "flip_tta": cfg.retrieval.flip_tta,
                "scales": cfg.retrieval.scales, "backbone": cfg.model.backbone, "img_size": cfg.model.img_size,
                "checkpoint": str(checkpoint) if checkpoint else "pretrained",
                "weights_mtime": _mtime(checkpoint)}
    key = fingerprint(settings)
    if out.is_file() and not force and FeatureSet.load(out).meta.get("key") == key:
        log.info("%s is up to date; nothing to do (--force recomputes)", out)
        return Extraction(out, len(names), reused=True)

    cfg.train.precision = "fp32"  # extraction chooses its own autocast below
    accelerator = build_accelerator(cfg)
    num_classes = ckpt.read_state(checkpoint)["num_classes"] if checkpoint is not None and checkpoint.is_dir() else 1
    model = build_model(cfg, num_classes)
    source = (str(ckpt.load_weights(model, checkpoint, prefer_ema=cfg.optim.ema)) if checkpoint
              else f"{cfg.model.backbone} (as built)")
    model.to(accelerator.device).eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    start, end = contiguous_slice(len(positions), rank, world)
    mine = part_path(run.feature_parts_dir, split_name, start, end, key)
    if mine.is_file() and not force:
        log.info("rank %d: reusing finished part %s", rank, mine.name)
    else:
        loader = build_eval_loader(cfg, split, positions[start:end], tuple(model.mean), tuple(model.std),
                                   cfg.data.batch_size)
        autocast = torch.bfloat16 if accelerator.device.type == "cuda" and torch.cuda.is_bf16_supported() else None
        _, embeddings = embed_batches(model.embed, loader, accelerator.device, cfg.retrieval.flip_tta,
                                      cfg.retrieval.scales, autocast, progress=accelerator.is_main_process,
                                      desc=f"extract {split_name}")
        labels = torch.as_tensor(split.labels[positions[start:end]], dtype=torch.long)
        if embeddings.numel() == 0:
            embeddings = torch.zeros(0, model.embed_dim)
        FeatureSet(names[start:end], embeddings, labels).save(mine)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        part_files = [part_path(run.feature_parts_dir, split_name, *contiguous_slice(len(positions), r, world), key)
                      for r in range(world)]
        meta = {"split": split_name, "source": source, "key": key, "flip_tta": cfg.retrieval.flip_tta,
                "scales": cfg.retrieval.scales, "world_size": world}
        features = merge_parts(part_files, names, split.label_names, meta)
        run.save_features(split_name, features)
        for part in part_files:
            part.unlink(missing_ok=True)
        if not run.has_config():
            run.save_config(cfg)
        log.info("wrote %s: %d images x %d dims from %s", out, len(features), features.embeddings.shape[1], source)
    accelerator.wait_for_everyone()
    return Extraction(out, len(names), reused=False, source=source)


def extract_run(run: Optional[RunDir], split_name: str, recipe: str | Path | None = None,
                overrides: Sequence[str] = (), checkpoint: str | Path | None = None,
                force: bool = False) -> Extraction:
    """`jaguar extract`: resolve the config and weights (resolve_source; with a recipe the run may
    be None and is then its run.dir), then extract the split (extract_split)."""
    run, cfg, weights = resolve_source(run, recipe, overrides, checkpoint)
    return extract_split(run, split_name, cfg, weights, force=force)
