"""`jaguar extract RUN_DIR [--split test|val|train] [--checkpoint PATH] [--config RECIPE k=v ...]`:
sharded feature extraction into RUN/features/<split>.safetensors (also under accelerate/torchrun/srun)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from jaguar.config import Config, ConfigError, load_config, save_config

log = logging.getLogger("jaguar.extract")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "extract", help="embed a split's images with a trained (or pretrained) model",
        description="Each process embeds a contiguous slice of the split; rank 0 merges the parts into "
                    "RUN/features/<split>.safetensors. Run under `accelerate launch -m jaguar.cli.main extract` "
                    "or torchrun for several processes. Finished parts are reused when re-run.")
    parser.add_argument("run_dir", help="the run directory (holds config.yaml and checkpoints/)")
    parser.add_argument("--split", default="test", choices=("test", "val", "train"),
                        help="test: the test shards; val/train: the run's validation/training images")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint folder or weights file (default: best, else the newest in RUN/checkpoints)")
    parser.add_argument("--config", default=None,
                        help="extract with this recipe/YAML and no trained checkpoint (a pretrained backbone as is)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for --config")
    parser.add_argument("--force", action="store_true", help="recompute even if the features exist")
    parser.set_defaults(func=_run)


def _resolve(args: argparse.Namespace) -> tuple[Config, Path | None, int]:
    from jaguar.train import checkpoint as ckpt

    run_dir = Path(args.run_dir)
    if args.config:
        cfg = load_config(args.config, args.overrides)
        cfg.run.dir = str(run_dir)
        checkpoint = Path(args.checkpoint) if args.checkpoint else None
    else:
        if args.overrides:
            raise ConfigError("key=value overrides need --config RECIPE (a trained run uses its own config.yaml)")
        config_file = run_dir / "config.yaml"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} does not exist: give a run directory made by `jaguar train`, "
                                    f"or --config RECIPE to extract with a pretrained backbone")
        cfg = load_config(config_file)
        checkpoint = Path(args.checkpoint) if args.checkpoint else ckpt.best_or_latest(run_dir / "checkpoints")
        if checkpoint is None:
            raise FileNotFoundError(f"no complete checkpoint in {run_dir / 'checkpoints'}; train first or pass "
                                    f"--checkpoint")
    num_classes = 1
    if checkpoint is not None and checkpoint.is_dir():
        num_classes = ckpt.read_state(checkpoint)["num_classes"]
    return cfg, checkpoint, num_classes


def load_weights(model: torch.nn.Module, checkpoint: Path, prefer_ema: bool) -> str:
    from safetensors.torch import load_file

    from jaguar.train import checkpoint as ckpt

    if checkpoint.is_dir():
        ema_file = checkpoint / ckpt.EMA_WEIGHTS_FILE
        weights = ema_file if prefer_ema and ema_file.is_file() else checkpoint / ckpt.WEIGHTS_FILE
    else:
        weights = checkpoint
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint weights {weights} do not exist")
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if unexpected or [k for k in missing if not k.startswith("head.")]:
        raise ConfigError(f"{weights} does not match model.backbone={getattr(model, 'backbone_name', '?')}: "
                          f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return str(weights)


def _split_positions(cfg: Config, run_dir: Path, split_name: str):
    from jaguar.data.shards import ShardSplit
    from jaguar.train.data import load_val_names, open_train_split

    if split_name == "test":
        split = ShardSplit(cfg.data.shards, "test")
        return split, list(range(len(split)))
    split = open_train_split(cfg)
    position = {name: i for i, name in enumerate(split.filenames)}
    if split_name == "val":
        names = load_val_names(run_dir)
    else:
        split_file = run_dir / "split.json"
        names = (json.loads(split_file.read_text())["train"] if split_file.is_file()
                 else list(split.filenames))
    unknown = [n for n in names if n not in position]
    if unknown:
        raise ConfigError(f"{len(unknown)} images of the run's {split_name} split are not in data.shards="
                          f"{cfg.data.shards} (e.g. {unknown[:3]}); was the data re-prepared?")
    return split, [position[n] for n in names]


def _run(args: argparse.Namespace) -> int:
    from jaguar.data.loader import build_eval_loader
    from jaguar.models import build_model
    from jaguar.retrieval.extract import contiguous_slice, embed_batches, fingerprint, merge_parts, part_path
    from jaguar.retrieval.features import FeatureSet
    from jaguar.train.accel import build_accelerator
    from jaguar.train.entry import setup_logging

    setup_logging()
    cfg, checkpoint, num_classes = _resolve(args)
    run_dir = Path(args.run_dir)
    out = run_dir / "features" / f"{args.split}.safetensors"
    split, positions = _split_positions(cfg, run_dir, args.split)
    names = [split.filenames[p] for p in positions]
    settings = {"split": args.split, "names": fingerprint({"n": names}), "flip_tta": cfg.retrieval.flip_tta,
                "scales": cfg.retrieval.scales, "backbone": cfg.model.backbone, "img_size": cfg.model.img_size,
                "checkpoint": str(checkpoint) if checkpoint else "pretrained",
                "weights_mtime": _mtime(checkpoint)}
    key = fingerprint(settings)
    if out.is_file() and not args.force and FeatureSet.load(out).meta.get("key") == key:
        log.info("%s is up to date; nothing to do (--force recomputes)", out)
        return 0

    cfg.train.precision = "fp32"  # extraction chooses its own autocast below
    accelerator = build_accelerator(cfg)
    model = build_model(cfg, num_classes)
    source = load_weights(model, checkpoint, cfg.optim.ema) if checkpoint else f"{cfg.model.backbone} (as built)"
    model.to(accelerator.device).eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    start, end = contiguous_slice(len(positions), rank, world)
    parts_dir = run_dir / "features" / "parts"
    mine = part_path(parts_dir, args.split, start, end, key)
    if mine.is_file() and not args.force:
        log.info("rank %d: reusing finished part %s", rank, mine.name)
    else:
        loader = build_eval_loader(cfg, split, positions[start:end], tuple(model.mean), tuple(model.std),
                                   cfg.data.batch_size)
        autocast = torch.bfloat16 if accelerator.device.type == "cuda" and torch.cuda.is_bf16_supported() else None
        _, embeddings = embed_batches(model.embed, loader, accelerator.device, cfg.retrieval.flip_tta,
                                      cfg.retrieval.scales, autocast, progress=accelerator.is_main_process,
                                      desc=f"extract {args.split}")
        labels = torch.as_tensor(split.labels[positions[start:end]], dtype=torch.long)
        if embeddings.numel() == 0:
            embeddings = torch.zeros(0, model.embed_dim)
        FeatureSet(names[start:end], embeddings, labels).save(mine)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        part_files = [part_path(parts_dir, args.split, *contiguous_slice(len(positions), r, world), key)
                      for r in range(world)]
        meta = {"split": args.split, "source": source, "key": key, "flip_tta": cfg.retrieval.flip_tta,
                "scales": cfg.retrieval.scales, "world_size": world}
        features = merge_parts(part_files, names, split.label_names, meta)
        features.save(out)
        for part in part_files:
            part.unlink(missing_ok=True)
        if args.config and not (run_dir / "config.yaml").exists():
            save_config(cfg, run_dir / "config.yaml")
        log.info("wrote %s: %d images x %d dims from %s", out, len(features), features.embeddings.shape[1], source)
    accelerator.wait_for_everyone()
    return 0


def _mtime(checkpoint: Path | None) -> float:
    if checkpoint is None or not checkpoint.exists():
        return 0.0
    return checkpoint.stat().st_mtime
