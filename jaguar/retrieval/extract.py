"""Sharded, resumable feature extraction. A split's image list is cut into fixed-size blocks (the
same at any world size); each process embeds one contiguous run of blocks and writes every block,
as soon as it is complete, as a part file under the run folder (atomically, named by RunDir with a
fingerprint of the images, weights and settings). A re-run after a kill or a preemption skips the
blocks whose part matches and computes the rest; rank 0 then checks that the parts cover the split
exactly, writes the features file in one rename and removes the parts. Batches never straddle a
block, so a resumed extraction gives the same bytes as an uninterrupted one.
`extract_split` is the stage (`jaguar extract`); `resolve_source` chooses its config and weights
and `split_positions` the images of a split."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open

from jaguar.config import Config, ConfigError, apply_run_overrides, load_config
from jaguar.data.loader import build_eval_loader
from jaguar.data.manifest import file_sha256
from jaguar.data.shards import ShardSplit
from jaguar.errors import JaguarError
from jaguar.core.blocks import DEFAULT_BLOCK_SIZE, fingerprint
from jaguar.core.features import FeatureSet
from jaguar.run import RunDir
from jaguar.run_checkpoints import EMA_WEIGHTS_FILE, WEIGHTS_FILE
from jaguar.core.accelerator import build_accelerator
from jaguar.core.run_split import build_run_split, open_train_split

from jaguar.core.embedding import Embedder, autocast_for, embed_batch, load_embedder
from jaguar.retrieval.blockwork import finished_part, images_fingerprint, plan_blocks, reads_back, split_viewpoints

if TYPE_CHECKING:  # onnxruntime is an optional extra: imported only when an exported model is used
    from jaguar.core.onnx_model import OnnxEmbedding

log = logging.getLogger(__name__)


def merge_parts(part_files: list[Path], expected_names: list[str], label_names: dict[int, str],
                meta: dict, viewpoints: Optional[list[str]] = None) -> FeatureSet:
    """Join parts in order and check the union is exactly the split: no image missing or repeated.
    `viewpoints` (one per expected name, or None) is carried into the features."""
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
    return FeatureSet(names, embeddings, labels, dict(label_names), dict(meta), viewpoints)


def resolve_source(run: Optional[RunDir], recipe: str | Path | None = None, overrides: Sequence[str] = (),
                   checkpoint: str | Path | None = None) -> tuple[RunDir, Config, Optional[Path]]:
    """(run, config, weights) of an extraction: a run's own config (with `overrides` of its search
    settings, apply_run_overrides) and its checkpoint (`checkpoint`, else best, else the newest;
    None for a zero-shot run, RunDir.extraction_weights); or, with `recipe`, that recipe with `overrides`
    and `checkpoint` if given, else the backbone as built (pretrained weights when the recipe asks
    for them). With a recipe the run folder may be None: it is then the config's run.dir."""
    if recipe:
        cfg = load_config(recipe, list(overrides))
        run = run if run is not None else RunDir(cfg.run.dir)
        cfg.run.dir = str(run.path)
        return run, cfg, Path(checkpoint) if checkpoint else None
    run, cfg = _run_config(run, overrides)
    return run, cfg, Path(checkpoint) if checkpoint else run.extraction_weights()


def _run_config(run: Optional[RunDir], overrides: Sequence[str]) -> tuple[RunDir, Config]:
    """A trained (or zero-shot) run's own config, with `overrides` of its search settings (apply_run_overrides)."""
    if run is None:
        raise JaguarError("give a run folder, or a recipe (--config RECIPE) whose run.dir is the run folder")
    cfg = run.load_config()
    apply_run_overrides(cfg, overrides, str(run.config_path))
    return run, cfg


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


# Data settings only the training loader reads: changing them leaves an extracted embedding as it was.
_TRAINING_ONLY_DATA = ("sampler", "p_identities", "k_images", "num_workers", "hflip", "rotation", "scale",
                       "translate", "color_jitter", "random_erasing", "pad", "mixup_alpha", "mixup_prob")


def weights_digest(checkpoint: Optional[Path], cfg: Config) -> str:
    """sha256 of the weights an extraction loads (a checkpoint folder's weights and EMA weights, a
    weights file, or model.pretrained_file and run.seed, which draws the random layers, when there is
    no checkpoint): a checkpoint re-written at the same path is another checkpoint."""
    if checkpoint is None:
        file = Path(cfg.model.pretrained_file) if cfg.model.pretrained_file else None
        return (f"as built with seed {cfg.run.seed}, "
                f"{file_sha256(file) if file and file.is_file() else 'no weights file'}")
    files = [checkpoint / WEIGHTS_FILE, checkpoint / EMA_WEIGHTS_FILE] if checkpoint.is_dir() else [checkpoint]
    return ",".join(f"{f.name}:{file_sha256(f)}" for f in files if f.is_file()) or f"{checkpoint} (missing)"


def extraction_key(cfg: Config, split_name: str, split, positions: Sequence[int], checkpoint: Optional[Path],
                   autocast: Optional[torch.dtype], onnx_model: Optional[OnnxEmbedding] = None) -> str:
    """The fingerprint of everything an extracted embedding depends on: the images in order (names
    and content), the weights (content; an exported model's file), the model and eval-transform
    settings, flip TTA and scales, the batch size and the autocast type. A part or features file
    made under another key is stale."""
    images = images_fingerprint(split, positions)
    data = {k: v for k, v in asdict(cfg.data).items() if k not in _TRAINING_ONLY_DATA}
    weights = f"onnx:{onnx_model.digest}" if onnx_model is not None else weights_digest(checkpoint, cfg)
    return fingerprint({"format": 2, "split": split_name, "images": images, "weights": weights,
                        "prefer_ema": cfg.optim.ema, "model": asdict(cfg.model), "data": data,
                        "flip_tta": cfg.retrieval.flip_tta, "scales": list(cfg.retrieval.scales),
                        "autocast": str(autocast)})


def _stored_key(path: Path) -> Optional[str]:
    """The key in a features file's metadata (without reading its tensors); None if unreadable."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {}).get("meta", "{}")).get("key")
    except (OSError, ValueError, json.JSONDecodeError, SafetensorError):
        return None


def _finished_part(path: Path, names: list[str], key: str, newer_than: Optional[int] = None) -> bool:
    """Whether `path` is a complete part of these images made under `key`, written after `newer_than`."""
    return finished_part(path, FeatureSet.load, lambda part: part.names == names and part.meta.get("key") == key,
                         "feature part", newer_than) is not None


def _embed_blocks(run: RunDir, split_name: str, key: str, model: Embedder, split, positions: Sequence[int],
                  names: list[str], blocks: list[tuple[int, int]], cfg: Config, device: torch.device,
                  autocast: Optional[torch.dtype], bar) -> None:
    """Embed `blocks` (one loader over their images; batches never straddle a block, see
    block_grid) with `model` and save each block as its part file as soon as it is complete."""
    flat = [p for start, end in blocks for p in positions[start:end]]
    loader = build_eval_loader(cfg, split, flat, tuple(model.mean), tuple(model.std), cfg.data.batch_size)
    pending = iter(blocks)
    start, end = next(pending)
    pieces: list[torch.Tensor] = []
    filled = 0
    for images, _ in loader:
        pieces.append(embed_batch(model.embed, images, device, model.flip_tta, model.scales, autocast,
                                  model.size_multiple))
        filled += len(images)
        bar.update(len(images))
        if filled > end - start:
            raise RuntimeError(f"a batch of {len(images)} straddles the block [{start}, {end}); the block "
                               f"size must be whole batches of data.batch_size={cfg.data.batch_size}")
        if filled == end - start:
            labels = torch.as_tensor(split.labels[list(positions[start:end])], dtype=torch.long)
            FeatureSet(names[start:end], torch.cat(pieces), labels, meta={"key": key}).save(
                run.feature_part_path(split_name, start, end, key))
            pieces, filled = [], 0
            start, end = next(pending, (0, 0))


def extract_split(run: RunDir, split_name: str, cfg: Config, checkpoint: Optional[Path],
                  force: bool = False, block_size: int = DEFAULT_BLOCK_SIZE,
                  onnx_model: Optional[OnnxEmbedding] = None) -> Extraction:
    """Embed `split_name`'s images into the run's features of that split, each process of the
    launch (accelerate / torchrun / srun, or one process) its contiguous run of `block_size`-image
    blocks (block_grid), each block saved as a part when done. Parts finished by an earlier,
    interrupted attempt with the same images, weights and settings are reused; an up-to-date
    features file is left as it is (unless `force`, which recomputes every block older than that
    file, so a forced run that was interrupted resumes with the same command). With
    `checkpoint` None the model is used as built. With `onnx_model` (an exported model, see
    jaguar.core.onnx_model) that model embeds the images, prepared as its metadata says, and
    `checkpoint` is not read; the features record it as "model" and its source weights as "source".
    The run's config is written if it has none. Raises JaguarError (ConfigError, MissingInputError)
    for a bad split, config or checkpoint."""
    if block_size < 1:
        raise ConfigError(f"the extraction block size must be >= 1 image, got {block_size}")
    out = run.features_path(split_name)
    if onnx_model is not None:
        cfg = onnx_model.eval_config(cfg)
    split, positions = split_positions(cfg, run, split_name)
    names = [split.filenames[p] for p in positions]
    record_split = split_name == "val" and not run.split_path.is_file()
    cfg.train.precision = "fp32"  # extraction chooses its own autocast below
    accelerator = build_accelerator(cfg)
    autocast = autocast_for(accelerator.device)
    key = extraction_key(cfg, split_name, split, positions, checkpoint, autocast, onnx_model)
    if out.is_file() and not force and _stored_key(out) == key and reads_back(out, FeatureSet.load):
        if accelerator.is_main_process:
            log.info("%s is up to date; nothing to do (--force recomputes)", out)
            run.remove_feature_parts(split_name)  # left by a run killed between its merge and clean-up
        return Extraction(out, len(names), reused=True)

    model = load_embedder(cfg, checkpoint, onnx_model, accelerator.device)
    source = model.source
    rank, world = accelerator.process_index, accelerator.num_processes
    # --force replaces the features file: blocks older than it are recomputed, those written after it
    # (by a forced attempt that was interrupted) are this recomputation's own and are reused.
    replaced = out.stat().st_mtime_ns if force and out.is_file() else None
    plan = plan_blocks(len(positions), rank, world, block_size, cfg.data.batch_size,
                       lambda start, end: _finished_part(run.feature_part_path(split_name, start, end, key),
                                                         names[start:end], key, newer_than=replaced))
    blocks = plan.blocks
    with plan.progress(f"extract {split_name}", "img", rank, world) as bar:
        if plan.todo:
            _embed_blocks(run, split_name, key, model, split, positions, names, plan.todo, cfg,
                          accelerator.device, autocast, bar)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = {"split": split_name, "source": source, "key": key, "flip_tta": cfg.retrieval.flip_tta,
                "scales": cfg.retrieval.scales, "world_size": world, "block_size": blocks[0][1] if blocks else 0}
        if onnx_model is not None:
            meta.update(model=str(onnx_model.path), precision=onnx_model.precision,
                        flip_tta=onnx_model.meta.get("flip_tta"), scales=onnx_model.meta.get("scales"))
        part_files = [run.feature_part_path(split_name, start, end, key) for start, end in blocks]
        features = merge_parts(part_files, names, split.label_names, meta, split_viewpoints(split, positions))
        if len(features) == 0:
            features.embeddings = torch.zeros(0, model.embed_dim)
        run.save_features(split_name, features)  # atomic: the old file or the new one, never half of one
        run.remove_feature_parts(split_name)
        if not run.has_config():
            run.save_config(cfg)
        if record_split:
            # A run never trained (zero-shot) now holds these validation images: its training
            # images (the gallery of calibrate and identify) are from here on the rest, never them.
            run.save_split(build_run_split(cfg, split).to_record(split))
        log.info("wrote %s: %d images x %d dims from %s", out, len(features), features.embeddings.shape[1],
                 onnx_model.describe() if onnx_model is not None else source)
    accelerator.wait_for_everyone()
    return Extraction(out, len(names), reused=False, source=source)


def resolve_extraction(run: Optional[RunDir], recipe: str | Path | None = None, overrides: Sequence[str] = (),
                       checkpoint: str | Path | None = None, onnx_path: str | Path | None = None
                       ) -> tuple[RunDir, Config, Optional[Path], Optional[OnnxEmbedding]]:
    """(run, config, weights, exported model) of an extraction: resolve_source's, or with
    `onnx_path` the run's config (or the recipe's) and that exported model, with no checkpoint
    looked for (a run copied to a laptop with its config and the ONNX file extracts too)."""
    if onnx_path is None:
        return (*resolve_source(run, recipe, overrides, checkpoint), None)
    if checkpoint:
        raise JaguarError("--checkpoint and --model both name the weights; give one of them")
    from jaguar.core.onnx_model import OnnxEmbedding

    if recipe:
        run, cfg, _ = resolve_source(run, recipe, overrides, None)
    else:
        run, cfg = _run_config(run, overrides)
    return run, cfg, None, OnnxEmbedding.load(onnx_path)


def extract_run(run: Optional[RunDir], split_name: str, recipe: str | Path | None = None,
                overrides: Sequence[str] = (), checkpoint: str | Path | None = None,
                force: bool = False, block_size: int = DEFAULT_BLOCK_SIZE,
                onnx_path: str | Path | None = None) -> Extraction:
    """`jaguar extract`: resolve the config and weights (resolve_extraction; with a recipe the run
    may be None and is then its run.dir; with `onnx_path` an exported model embeds), then extract
    the split (extract_split) holding the run's writer lock."""
    run, cfg, weights, onnx_model = resolve_extraction(run, recipe, overrides, checkpoint, onnx_path)
    with run.writer_lock("jaguar extract"):  # the launcher's rank 0 holds it for every process
        return extract_split(run, split_name, cfg, weights, force=force, block_size=block_size,
                             onnx_model=onnx_model)


def require_features(run: RunDir, split_name: str, needed_by: str,
                     onnx_path: str | Path | None = None) -> FeatureSet:
    """The run's `split_name` features for the stage `needed_by` (e.g. "jaguar calibrate"). When they
    are missing they are extracted first, through the same entry point as `jaguar extract RUN --split
    SPLIT` (resolve_extraction, extract_split; the caller holds the run's writer lock), and a warning
    names that command, so the stage never extracts unannounced."""
    if not run.has_features(split_name):
        command = f"jaguar extract {run.path} --split {split_name}" + (f" --model {onnx_path}" if onnx_path else "")
        log.warning("%s needs %s, which does not exist yet: running `%s` first", needed_by,
                    run.features_path(split_name), command)
        run, cfg, weights, onnx_model = resolve_extraction(run, onnx_path=onnx_path)
        extract_split(run, split_name, cfg, weights, onnx_model=onnx_model)
    return run.load_features(split_name)
