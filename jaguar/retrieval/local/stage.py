"""`jaguar match`: local pattern evidence for one split, searched against itself. Three steps, each
resumable with the same command:
1. the split's local features (jaguar.retrieval.local.split_features; extracted in blocks);
2. each image's shortlist: its top-B other images of the split by the raw cosine similarity of the
   split's global features (jaguar.core.knn, itself excluded, ties by index; B =
   retrieval.local.shortlist clipped to N - 1);
3. matching (match_shortlist: ratio test, mutual nearest neighbours, verification that never
   mirrors) in blocks of queries, each process its contiguous run of blocks, each finished block a
   part (RunDir.local_part_path("matches", ...)); rank 0 merges them into
   RunDir.local_matches_path(split), a SplitMatches whose meta records B, the fingerprint and the
   global features' checksum, so re-extracted global features invalidate the matches.
Cost: N x B pair matches, never N^2. A finished, up-to-date split is a no-op; `force` recomputes."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from safetensors import SafetensorError, safe_open

from jaguar.config import Config, apply_run_overrides
from jaguar.core.blocks import DEFAULT_BLOCK_SIZE, fingerprint
from jaguar.core.features import FeatureSet
from jaguar.core.knn import knn
from jaguar.errors import JaguarError
from jaguar.retrieval.blockwork import finished_part, plan_blocks, reads_back
from jaguar.retrieval.extract import require_features
from jaguar.retrieval.local.configured import make_matcher
from jaguar.retrieval.local.matching import MatchSettings, match_shortlist
from jaguar.retrieval.local.split_features import extract_local_split, stored_meta
from jaguar.retrieval.local.store import LocalFeatureSet, SplitMatches, concatenate_matches, load_matches, save_matches
from jaguar.run import RunDir

log = logging.getLogger(__name__)


@dataclass
class MatchResult:
    """What `match_split` did: the matches file, its queries, the shortlist width B and whether an
    up-to-date file was kept as it was (nothing computed)."""
    path: Path
    queries: int
    shortlist: int
    reused: bool


def global_features_sha256(path: Path) -> str:
    """The content sha256 a FeatureSet file records in its metadata (read without its tensors); ""
    when it has none."""
    try:
        with safe_open(str(path), framework="np") as handle:
            return (handle.metadata() or {}).get("sha256", "")
    except (OSError, SafetensorError):
        return ""


def split_shortlist(features: FeatureSet, width: int) -> np.ndarray:
    """(N, B) int64: each image's B = min(width, N - 1) most similar other images of `features` by
    raw cosine similarity of its embeddings (N x D), best first, ties by lower index (jaguar.core.knn,
    exact, N x B memory). A split of one image gets (1, 0)."""
    count = len(features.names)
    width = min(int(width), count - 1)
    if width < 1:
        return np.zeros((count, 0), dtype=np.int64)
    return knn(features.embeddings, k=width, exclude_self=True).index.numpy().astype(np.int64)


def matching_key(split_name: str, local_key: str, global_sha: str, width: int, cfg: Config) -> str:
    """The fingerprint (16 hex) of a split's matches: its local features' key, the global features'
    checksum (through the shortlist), B, keep_best, the match settings and the tentative matcher
    (with its weights file). Parts and matches made under another key are stale."""
    local = cfg.retrieval.local
    return fingerprint({"format": 1, "split": split_name, "local_features": local_key, "global": global_sha,
                        "shortlist": width, "keep_best": local.keep_best,
                        "settings": asdict(MatchSettings.from_config(local)), "matcher": local.matcher,
                        "matcher_weights": local.matcher_weights_file if local.matcher != "nearest" else ""})


def _finished_part(path: Path, start: int, end: int, key: str, newer_than: Optional[int]):
    """The matches of queries [start, end) at `path` when complete and made under `key` (after
    `newer_than` ns, if given); None otherwise."""
    part = finished_part(path, load_matches, lambda loaded: (loaded[0].start, loaded[0].stop) == (start, end)
                         and loaded[1].get("key") == key, "match part", newer_than)
    return None if part is None else part[0]


def _up_to_date(path: Path, key: str) -> bool:
    """Whether the split's matches at `path` were made under `key` and read back whole."""
    return stored_meta(path).get("fingerprint") == key and reads_back(path, SplitMatches.load)


def match_split(run: RunDir, split_name: str, cfg: Config, force: bool = False,
                block_size: int = DEFAULT_BLOCK_SIZE) -> MatchResult:
    """Local features, shortlist and matches of `split_name` (see the module docstring), each process
    of the launch (accelerate / torchrun / srun, or one process) its blocks. The split's global
    features are extracted first when missing (require_features, announced) and must hold the
    same images as the split. `block_size`: images a features part holds and queries a matches part holds.
    `force` recomputes the local features and the matches (blocks an interrupted forced run finished
    are reused). Raises JaguarError: MissingInputError without a checkpoint, ConfigError for a bad
    config or block size, JaguarError when the global features are not of the split's images."""
    from jaguar.core.accelerator import build_accelerator

    if block_size < 1:
        raise JaguarError(f"the block size must be >= 1, got {block_size}")
    cfg.train.precision = "fp32"
    accelerator = build_accelerator(cfg)
    global_features = require_features(run, split_name, "jaguar match")
    global_sha = global_features_sha256(run.features_path(split_name))
    local_features = extract_local_split(run, split_name, cfg, accelerator, force=force, block_size=block_size)
    if local_features.names != global_features.names:
        raise JaguarError(f"{run.features_path(split_name)} does not hold the {split_name} images of the run in "
                          f"their order ({len(global_features.names)} against {len(local_features.names)}); "
                          f"re-extract them: `jaguar extract {run.path} --split {split_name} --force`")
    return match_features(run, split_name, global_features, global_sha, local_features, cfg, accelerator,
                          force=force, block_size=block_size)


def match_features(run: RunDir, split_name: str, global_features: FeatureSet, global_sha: str,
                   local_features: LocalFeatureSet, cfg: Config, accelerator, force: bool = False,
                   block_size: int = DEFAULT_BLOCK_SIZE) -> MatchResult:
    """Steps 2 and 3 of `jaguar match` on features in hand: the shortlist (split_shortlist of
    `global_features`, N x D, B = retrieval.local.shortlist clipped to N - 1) and the matching of
    `local_features` (the same N images in the same order; `local_features.meta["key"]` their
    fingerprint) in blocks of `block_size` queries, each process of `accelerator` its contiguous run,
    merged by rank 0 into run.local_matches_path(split_name). `global_sha`: the global features'
    checksum, recorded so that re-extracted features invalidate the matches. Collective: every
    process calls it."""
    rank, world = accelerator.process_index, accelerator.num_processes
    local = cfg.retrieval.local
    out = run.local_matches_path(split_name)
    shortlist = split_shortlist(global_features, local.shortlist)
    width = shortlist.shape[1]
    key = matching_key(split_name, local_features.meta["key"], global_sha, width, cfg)
    current = not force and _up_to_date(out, key)
    accelerator.wait_for_everyone()
    if current:
        if accelerator.is_main_process:
            log.info("%s is up to date; nothing to match (--force recomputes)", out)
            run.remove_local_parts("matches", split_name)
        return MatchResult(out, len(shortlist), width, reused=True)

    settings = MatchSettings.from_config(local)
    matcher = make_matcher(local)
    replaced = out.stat().st_mtime_ns if force and out.is_file() else None
    part_path = (lambda start, end: run.local_part_path("matches", split_name, start, end, key))
    plan = plan_blocks(len(shortlist), rank, world, block_size, 1,
                       lambda start, end: _finished_part(part_path(start, end), start, end, key, replaced) is not None,
                       what="queries were matched")
    with plan.progress(f"match {split_name} (B={width})", "query", rank, world) as bar:
        for start, end in plan.todo:
            matches = match_shortlist(local_features, local_features, shortlist, settings, start, end,
                                      keep_best=local.keep_best, progress=bar.update, matcher=matcher)
            save_matches(part_path(start, end), matches, {"key": key})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _merge(run, split_name, plan.blocks, part_path, key, local_features, shortlist,
               {"split": split_name, "shortlist": width, "fingerprint": key, "features_sha256": global_sha,
                "local_features_key": local_features.meta["key"], "keep_best": local.keep_best,
                "settings": asdict(settings), "matcher": local.matcher, "world_size": world})
    accelerator.wait_for_everyone()
    return MatchResult(out, len(shortlist), width, reused=False)


def _merge(run: RunDir, split_name: str, blocks: list[tuple[int, int]], part_path, key: str,
           local_features: LocalFeatureSet, shortlist: np.ndarray, meta: dict) -> None:
    """Rank 0: join the parts of `blocks` in order into the split's SplitMatches (atomically) and
    remove the parts. Raises RuntimeError when a block's part is missing (it never is after every
    process finished: a bug, not a user error)."""
    parts = [_finished_part(part_path(start, end), start, end, key, None) for start, end in blocks]
    missing = [block for block, part in zip(blocks, parts) if part is None]
    if missing:
        raise RuntimeError(f"match parts of blocks {missing[:3]} are missing after every process finished")
    if parts:
        matches = concatenate_matches(parts)
    else:  # an empty split
        matches = match_shortlist([], [], shortlist, keep_best=meta["keep_best"])
    result = SplitMatches(list(local_features.names), shortlist, matches, meta)
    out = run.local_matches_path(split_name)
    result.save(out)  # atomic: the old file or the new one
    run.remove_local_parts("matches", split_name)
    scored = matches.scores[shortlist >= 0]
    log.info("wrote %s: %d queries x B=%d, median %.0f verified inliers a candidate",
             out, len(result.names), shortlist.shape[1], float(np.median(scored)) if scored.size else 0.0)


def match_run(run: RunDir, split_name: str, overrides: Sequence[str] = (), force: bool = False,
              block_size: int = DEFAULT_BLOCK_SIZE) -> MatchResult:
    """`jaguar match`: the run's config (with `overrides` of its search settings, e.g.
    retrieval.local.shortlist=100; apply_run_overrides), then match_split holding the run's writer
    lock. Raises JaguarError for a run without config or features, or a bad override."""
    cfg = run.load_config()
    apply_run_overrides(cfg, list(overrides), str(run.config_path))
    with run.writer_lock("jaguar match"):  # the launcher's rank 0 holds it for every process
        return match_split(run, split_name, cfg, force=force, block_size=block_size)
