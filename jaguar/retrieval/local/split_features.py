"""The local features (keypoints and descriptors on the animal) of a whole split, extracted by the
machinery of `jaguar extract` (jaguar.retrieval.blockwork): the split's images are those of its
global features, in the same order (jaguar.retrieval.extract.split_positions), cut into fixed-size
blocks; each process extracts its contiguous run of blocks and saves each finished block as a part
(RunDir.local_part_path("features", ...)); a re-run reuses the parts made under the same
fingerprint (the images' names and sha256s, the extractor's settings, the image decoding) and rank 0
merges the parts into RunDir.local_features_path(split), one LocalFeatureSet, in one rename.
`extract_local_split` is that stage; `local_features` the entry point of a later stage that needs
them (extracting first when missing, and saying so)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from safetensors import SafetensorError, safe_open

from jaguar.config import Config
from jaguar.core.blocks import DEFAULT_BLOCK_SIZE, fingerprint
from jaguar.errors import JaguarError
from jaguar.retrieval.blockwork import finished_part, images_fingerprint, plan_blocks
from jaguar.retrieval.extract import split_positions
from jaguar.retrieval.local.configured import make_extractor
from jaguar.retrieval.local.store import LocalFeatureSet
from jaguar.run import RunDir

log = logging.getLogger(__name__)

# How an image reaches the extractor: the shard sample decoded whole (jaguar.data.shards.decode_rgba,
# no reduced JPEG decode) as H x W x 4 uint8 RGBA. Part of the fingerprint: another decoding is other input.
IMAGE_DECODING = "shard rgba, full size"


def local_features_key(split_name: str, split, positions: list[int], extractor_settings: dict) -> str:
    """The fingerprint (16 hex) of everything a split's local features depend on: the images in order
    (names, content sha256, viewpoints), the extractor's settings() and the image decoding. A part or
    features file made under another key is stale."""
    return fingerprint({"format": 1, "split": split_name, "images": images_fingerprint(split, positions),
                        "extractor": extractor_settings, "decoding": IMAGE_DECODING})


def stored_meta(path: Path) -> dict:
    """The "meta" entry of a jaguar safetensors file's metadata (without reading its arrays); {} when
    the file is absent or unreadable."""
    try:
        with safe_open(str(path), framework="np") as handle:
            return json.loads((handle.metadata() or {}).get("meta", "{}"))
    except (OSError, ValueError, json.JSONDecodeError, SafetensorError):
        return {}


def _load_part(path: Path, names: list[str], key: str, newer_than: Optional[int]) -> Optional[LocalFeatureSet]:
    """The part at `path` when complete, holding `names`, made under `key` (after `newer_than`, if given)."""
    return finished_part(path, LocalFeatureSet.load, lambda part: part.names == names and part.meta.get("key") == key,
                         "local feature part", newer_than)


def _up_to_date(path: Path, key: str, names: list[str]) -> Optional[LocalFeatureSet]:
    """The local features at `path` when they were made under `key` for `names` and read back whole."""
    if not path.is_file() or stored_meta(path).get("key") != key:
        return None
    try:
        features = LocalFeatureSet.load(path)
    except JaguarError as err:
        log.warning("%s fails its check (%s); recomputing it", path, err)
        return None
    return features if features.names == names else None


def extract_local_split(run: RunDir, split_name: str, cfg: Config, accelerator, force: bool = False,
                        block_size: int = DEFAULT_BLOCK_SIZE) -> LocalFeatureSet:
    """Extract the local features of `split_name`'s images (those of its global features, in their
    order) with the extractor `cfg.retrieval.local` names (make_extractor), each process of
    `accelerator` its contiguous run of `block_size`-image blocks, each finished block saved as a part;
    rank 0 merges them into run.local_features_path(split_name) and removes the parts. Parts of an
    interrupted attempt under the same fingerprint are reused; an up-to-date file is left as it is
    (unless `force`: blocks older than that file are then recomputed). Every process returns the
    merged set: N images, keypoints (T, 2) in each image's pixels. Raises JaguarError (ConfigError)
    for a bad split, config or block size; LocalFeatureError for an image the extractor cannot use."""
    if block_size < 1:
        raise JaguarError(f"the block size must be >= 1 image, got {block_size}")
    out = run.local_features_path(split_name)
    split, positions = split_positions(cfg, run, split_name)
    names = [split.filenames[p] for p in positions]
    extractor = make_extractor(cfg.retrieval.local)
    key = local_features_key(split_name, split, positions, extractor.settings())
    current = None if force else _up_to_date(out, key, names)
    accelerator.wait_for_everyone()  # no process may see the file rank 0 is about to replace
    if current is not None:
        if accelerator.is_main_process:
            log.info("%s is up to date; nothing to extract (--force recomputes)", out)
            run.remove_local_parts("features", split_name)
        return current

    rank, world = accelerator.process_index, accelerator.num_processes
    replaced = out.stat().st_mtime_ns if force and out.is_file() else None
    part_path = (lambda start, end: run.local_part_path("features", split_name, start, end, key))
    plan = plan_blocks(len(positions), rank, world, block_size, 1,
                       lambda start, end: _load_part(part_path(start, end), names[start:end], key,
                                                     replaced) is not None,
                       what="images' local features were extracted")
    with plan.progress(f"local features {split_name}", "img", rank, world) as bar:
        for start, end in plan.todo:
            records = []
            for position in positions[start:end]:
                rgba, _ = split.read_rgba(position)
                records.extend(extractor.extract_batch([rgba]))
                bar.update(1)
            LocalFeatureSet.pack(names[start:end], records, {"key": key}, extractor.descriptor_dim).save(
                part_path(start, end))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        parts = [_load_part(part_path(start, end), names[start:end], key, None) for start, end in plan.blocks]
        missing = [block for block, part in zip(plan.blocks, parts) if part is None]
        if missing:
            raise RuntimeError(f"local feature parts of blocks {missing[:3]} are missing after every process finished")
        meta = {"split": split_name, "key": key, "extractor": extractor.settings(), "decoding": IMAGE_DECODING,
                "world_size": world}
        merged = (LocalFeatureSet.concatenate(parts) if parts
                  else LocalFeatureSet.pack([], [], descriptor_dim=extractor.descriptor_dim))
        merged.meta = meta
        merged.save(out)  # atomic: the old file or the new one
        run.remove_local_parts("features", split_name)
        log.info("wrote %s: %d images, %d keypoints (%s)", out, len(merged), len(merged.keypoints), extractor.name)
    accelerator.wait_for_everyone()
    return LocalFeatureSet.load(out)


def local_features(run: RunDir, split_name: str, needed_by: str) -> LocalFeatureSet:
    """The run's local features of `split_name` for the stage `needed_by` (e.g. "jaguar identify").
    When missing they are extracted first (extract_local_split with the run's config, one process;
    the caller holds the run's writer lock) and a warning names the command that makes them, so
    nothing is extracted unannounced. Raises JaguarError (MissingInputError) when the run has no
    config, LocalFeatureFileError when the file exists but is corrupt."""
    path = run.local_features_path(split_name)
    if not path.is_file():
        from jaguar.core.accelerator import build_accelerator

        log.warning("%s needs %s, which does not exist yet: extracting it as `jaguar match %s --split %s` "
                    "does first", needed_by, path, run.path, split_name)
        cfg = run.load_config()
        cfg.train.precision = "fp32"
        return extract_local_split(run, split_name, cfg, build_accelerator(cfg))
    return LocalFeatureSet.load(path, f"run `jaguar match {run.path} --split {split_name} --force`")
