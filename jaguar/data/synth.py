"""Synthetic jaguars in the challenge's exact layout: identity lives only in a per-animal rosette coat,
one coat per flank (a photo shows one flank, written in the label files' `viewpoint` column); pose,
lighting, blur, noise, occlusion and a cluttered background vary per photo. With camera sites, each
site has its own fixed background and each identity is seen mostly at its home site: a background
shortcut a model can learn instead of the coat (what `jaguar diagnose` measures)."""

from __future__ import annotations

import csv
import io
import logging
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np

from jaguar.data.synth_render import FLANKS, render_png
from jaguar.errors import JaguarError
from jaguar.formats import UNKNOWN_VIEWPOINT, all_pairs, write_labels, write_pairs
from jaguar.io import atomic_directory

log = logging.getLogger(__name__)


def _read_identity_counts() -> dict[str, int]:
    """Images per identity in the real training set (jaguar_train_labels.csv), shipped as package data."""
    text = resources.files("jaguar.data").joinpath("real_identity_counts.csv").read_text(encoding="utf-8")
    return {row["identity"]: int(row["images"]) for row in csv.DictReader(io.StringIO(text))}


# The synthetic set copies the shape of the real identity-size distribution, scaled to the requested size.
REAL_IDENTITY_COUNTS: dict[str, int] = _read_identity_counts()

BURST_FRAMES = (2, 5)  # frames in a burst, uniform
BURST_MEAN = sum(BURST_FRAMES) / 2


class SynthError(JaguarError, ValueError):
    """A synthetic data set that cannot be made as asked; the message names the value at fault."""


# ---------------------------------------------------------------- who is in the data set


def choose_identities(count: int) -> dict[str, int]:
    """`count` identity names with their real image counts (the weights for apportioning images).

    Fewer than 31: names spread evenly over the real size ranking, so small subsets keep both common and
    rare animals. More than 31: extra names `Synth032`, ... reuse the real counts cyclically."""
    if count < 1:
        raise SynthError(f"identities must be >= 1, got {count}")
    ranked = sorted(REAL_IDENTITY_COUNTS, key=lambda name: (-REAL_IDENTITY_COUNTS[name], name))
    if count <= len(ranked):
        picks = sorted({round(i * (len(ranked) - 1) / max(count - 1, 1)) for i in range(count)})
        names = [ranked[i] for i in picks]
    else:
        names = list(ranked) + [f"Synth{i + 1:03d}" for i in range(len(ranked), count)]
    weights = {name: REAL_IDENTITY_COUNTS.get(name, REAL_IDENTITY_COUNTS[ranked[i % len(ranked)]])
               for i, name in enumerate(names)}
    return dict(sorted(weights.items()))


def apportion(total: int, weights: list[float], minimum: int) -> list[int]:
    """Split `total` into integers proportional to `weights`, each at least `minimum` (largest remainder)."""
    if total < minimum * len(weights):
        raise SynthError(f"cannot give {len(weights)} identities at least {minimum} image(s) each "
                         f"from {total} images; ask for at least {minimum * len(weights)}")
    quota = np.asarray(weights, dtype=np.float64) * total / float(np.sum(weights))
    counts = np.maximum(minimum, np.floor(quota + 1e-9)).astype(np.int64)
    while counts.sum() < total:
        counts[int(np.argmax(quota - counts))] += 1
    while counts.sum() > total:
        excess = np.where(counts > minimum, counts - quota, -np.inf)
        counts[int(np.argmax(excess))] -= 1
    return counts.tolist()


# ---------------------------------------------------------------- the data set on disk


def _assign(counts: dict[str, int], rng: np.random.Generator | None) -> list[str]:
    """One identity per image; grouped by name like the real train.csv, or shuffled when rng is given."""
    names = [name for name, count in counts.items() for _ in range(count)]
    if rng is not None:
        names = [names[i] for i in rng.permutation(len(names))]
    return names


def plan_bursts(names: list[str], rate: float, rng: np.random.Generator) -> list[int]:
    """The scene of each image: its own index, or the index of its burst's first frame.

    Each identity's images (in list order) are cut into single photos and bursts of 2-5 frames so that
    about `rate` of all images belong to a burst. 0.12 resembles the real training set (317
    near-duplicate pairs at cosine 0.99 among 1,895 images: ~63 bursts of 3.5 frames, 5 pairs each)."""
    if not 0.0 <= rate < 1.0:
        raise SynthError(f"burst rate must be in [0, 1), got {rate}")
    scenes = list(range(len(names)))
    # a new event is a burst with probability p; the expected share of images in bursts is then
    # p * 3.5 / (p * 3.5 + 1 - p) = rate
    p_burst = rate / (BURST_MEAN - (BURST_MEAN - 1) * rate)
    for name in sorted(set(names)):
        members = [i for i, n in enumerate(names) if n == name]
        start = 0
        while start < len(members):
            length = 1
            if len(members) - start >= 2 and rng.random() < p_burst:
                length = min(int(rng.integers(BURST_FRAMES[0], BURST_FRAMES[1] + 1)), len(members) - start)
            for i in members[start:start + length]:
                scenes[i] = members[start]
            start += length
    return scenes


def plan_views(scenes: list[int], unknown: float, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """(flank shown, viewpoint recorded) of each image: left or right at even odds, one draw per
    scene (a burst's frames show the same side); the recorded viewpoint is the flank, or `unknown`
    for about `unknown` of the scenes (a side nobody noted, as in real catalogues)."""
    if not 0.0 <= unknown <= 1.0:
        raise SynthError(f"the unknown-viewpoint share must be in [0, 1], got {unknown}")
    draws = {scene: (FLANKS[int(rng.integers(2))], bool(rng.random() < unknown)) for scene in sorted(set(scenes))}
    flanks = [draws[scene][0] for scene in scenes]
    recorded = [UNKNOWN_VIEWPOINT if draws[scene][1] else draws[scene][0] for scene in scenes]
    return flanks, recorded


def plan_sites(names: list[str], scenes: list[int], sites: int, affinity: float,
               rng: np.random.Generator) -> list[int | None]:
    """The camera site of each image (None for every image when `sites` is 0). Identity number i (in
    name order) lives at site i mod `sites`: a scene is shot there with probability `affinity`, else at
    one of the other sites at random; a burst's frames share their scene's site."""
    if sites < 0:
        raise SynthError(f"sites must be >= 0, got {sites}")
    if not 0.0 <= affinity <= 1.0:
        raise SynthError(f"site affinity must be in [0, 1], got {affinity}")
    if sites == 0:
        return [None] * len(names)
    home = {name: i % sites for i, name in enumerate(sorted(set(names)))}
    chosen: dict[int, int] = {}
    for scene in sorted(set(scenes)):
        site = home[names[scene]]
        if sites > 1 and rng.random() >= affinity:
            site = (site + 1 + int(rng.integers(sites - 1))) % sites
        chosen[scene] = site
    return [chosen[scene] for scene in scenes]


def make_synthetic(out: str | Path, identities: int = 31, train_images: int = 1895, test_images: int = 371,
                   size: int = 256, seed: int = 0, workers: int | None = None, overwrite: bool = False,
                   progress: bool = False, bursts: float = 0.0, unknown_views: float = 0.0, sites: int = 0,
                   site_affinity: float = 0.8) -> Path:
    """Write a synthetic data set in the challenge layout to `out` (atomically) and return its path.

    train.csv and test_labels.csv carry a `viewpoint` column (left, right, or unknown for about
    `unknown_views` of the photos: see `plan_views`). `bursts` > 0: about that share of each split's
    images are frames of near-identical bursts (see `plan_bursts`); bursts.csv lists them (filename,
    burst = the file name of its first frame). `sites` > 0: photos are taken at that many camera
    sites, each identity at its home site with probability `site_affinity` (see `plan_sites`);
    sites.csv lists each image's site."""
    if size < 32:
        raise SynthError(f"image size must be >= 32 px, got {size}")
    if not 0.0 <= bursts < 1.0:
        raise SynthError(f"bursts (the share of images in bursts) must be in [0, 1), got {bursts}")
    if test_images < 2:
        raise SynthError(f"test_images must be >= 2 to form pairs, got {test_images}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; remove it, choose another output or pass --overwrite")
    weights = choose_identities(identities)
    train_counts = dict(zip(weights, apportion(train_images, list(weights.values()), 2)))
    test_counts = dict(zip(weights, apportion(test_images, list(weights.values()), 1)))
    train_names = _assign(train_counts, None)
    test_names = _assign(test_counts, np.random.default_rng([seed, 3]))
    train_files = [f"train_{i + 1:04d}.png" for i in range(len(train_names))]
    test_files = [f"test_{i + 1:04d}.png" for i in range(len(test_names))]
    train_scenes = plan_bursts(train_names, bursts, np.random.default_rng([seed, 4]))
    test_scenes = plan_bursts(test_names, bursts, np.random.default_rng([seed, 5]))
    train_flanks, train_views = plan_views(train_scenes, unknown_views, np.random.default_rng([seed, 6, 1]))
    test_flanks, test_views = plan_views(test_scenes, unknown_views, np.random.default_rng([seed, 6, 2]))
    train_sites = plan_sites(train_names, train_scenes, sites, site_affinity, np.random.default_rng([seed, 7, 1]))
    test_sites = plan_sites(test_names, test_scenes, sites, site_affinity, np.random.default_rng([seed, 7, 2]))
    jobs = [(seed, name, "train", i, size, train_scenes[i], train_flanks[i], train_sites[i])
            for i, name in enumerate(train_names)]
    jobs += [(seed, name, "test", i, size, test_scenes[i], test_flanks[i], test_sites[i])
             for i, name in enumerate(test_names)]
    burst_rows = []
    for files, scenes in ((train_files, train_scenes), (test_files, test_scenes)):
        frames = Counter(scenes)
        burst_rows += [(files[i], files[scene]) for i, scene in enumerate(scenes) if frames[scene] > 1]
    paths = [Path("train") / f for f in train_files] + [Path("test") / f for f in test_files]
    workers = (os.cpu_count() or 1) if workers is None else max(1, workers)

    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / "train").mkdir()
        (tmp / "test").mkdir()
        write_labels(tmp / "train.csv", zip(train_files, train_names, train_views))
        write_labels(tmp / "test_labels.csv", zip(test_files, test_names, test_views))
        write_pairs(tmp / "test.csv", all_pairs(test_files))
        if bursts > 0:
            with (tmp / "bursts.csv").open("w", newline="", encoding="utf-8") as handle:
                csv.writer(handle, lineterminator="\n").writerows([("filename", "burst"), *burst_rows])
        if sites > 0:
            with (tmp / "sites.csv").open("w", newline="", encoding="utf-8") as handle:
                csv.writer(handle, lineterminator="\n").writerows(
                    [("filename", "site"), *zip(train_files + test_files, train_sites + test_sites)])
        from jaguar.progress import progress_bar

        if workers == 1:
            results = map(render_png, jobs)
            pool = None
        else:
            pool = ProcessPoolExecutor(max_workers=workers)
            results = pool.map(render_png, jobs, chunksize=16)
        try:
            for path, png in progress_bar(zip(paths, results), total=len(jobs), enabled=progress,
                                          desc="synth", unit="img"):
                (tmp / path).write_bytes(png)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    log.debug("wrote %d train + %d test synthetic images of %d identities to %s",
             len(train_files), len(test_files), len(weights), out)
    return out
