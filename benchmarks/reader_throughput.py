"""Shard reader throughput: training images per second per core through the real training
DataLoader, with the full augmentation of the seed recipes at 448 px. Prints figures; not a test.

    python benchmarks/reader_throughput.py [--cache /tmp/jaguar-bench-shards] [--images 300]
        [--source-size 1024] [--max-side 1024] [--size 448] [--workers 0 2] [--batches 8]
        [--profile-samples 64] [--imagefolder]

Synthetic photos of --source-size px are prepared into shards once and cached under --cache.
The data settings are recipes/resnet152_alpha_mixup.py's (random background, crop to alpha, flip,
affine, colour jitter, random erasing) at model.img_size=[size, size], plus data.pad (BoT pad +
random crop, which that recipe leaves at 0) so that every transform is exercised.

--imagefolder adds torchvision's ImageFolder beside it, interleaved run by run at the same size,
workers, batch size and torch threads: the shards' own JPEG colour members written out unchanged
(one folder an identity, made once under --cache; needs --encoding jpeg), read by its PIL loader
with the BoT training transform (Resize, RandomHorizontalFlip, Pad + RandomCrop, ToTensor,
Normalize, RandomErasing). jaguar's reader does more a sample (the mask, alpha composite on a
random background, affine, colour jitter), so at equal images/s it is ahead per unit of work.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaguar.config import load_config  # noqa: E402
from jaguar.data.loader import build_train_loader, split_train_val  # noqa: E402
from jaguar.data.prep import prepare  # noqa: E402
from jaguar.data.shards import ShardSplit  # noqa: E402
from jaguar.data.synth import make_synthetic  # noqa: E402

GOAL_PER_CORE = 60.0
RECIPE = ROOT / "recipes" / "resnet152_alpha_mixup.py"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # resnet152's timm data config
IMAGENET_STD = (0.229, 0.224, 0.225)

# (label, function names whose cumulative time is reported) for the profile breakdown
STAGES = [
    ("read + decode (ShardSplit.read_rgba)", ("read_rgba@shards.py",)),
    ("  of which image decode (OpenCV)", ("decode_rgba@shards.py",)),
    ("crop to alpha box", ("crop_to_alpha@transforms.py",)),
    ("warp (resize, flip, affine, pad-crop in one)", ("warp@transforms.py",)),
    ("alpha composite (incl. background)", ("composite@transforms.py",)),
    ("  random background", ("random_background@transforms.py",)),
    ("render: composite + colour matrix + Normalize", ("_render@transforms.py",)),
    ("random erasing", ("random_erase@transforms.py",)),
    ("sample RNG (SeedSequence)", ("sample_rng@loader.py",)),
]


def cached_shards(cache: Path, images: int, source_size: int, max_side: int, identities: int,
                  encoding: str) -> Path:
    """Prepared shards of synthetic photos, made once per setting and reused from `cache`; the
    synthetic photos themselves are made once per (size, count) and kept for other settings."""
    name = f"synth{source_size}-max{max_side}-n{images}-ids{identities}" + ("" if encoding == "png" else f"-{encoding}")
    shards = cache / name / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    shards.parent.mkdir(parents=True, exist_ok=True)
    print(f"preparing {images} synthetic {source_size}px photos into {shards} (once; cached)", flush=True)
    started = time.perf_counter()
    source = cache / f"photos{source_size}-n{images}-ids{identities}"
    if not (source / "train.csv").is_file():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            made = make_synthetic(Path(tmp) / "source", identities=identities, train_images=images,
                                  test_images=identities, size=source_size, seed=0, progress=True)
            made.rename(source)
    prepare(source, shards, max_side=max_side, workers=os.cpu_count() or 1, progress=True, encoding=encoding)
    print(f"prepared in {time.perf_counter() - started:.0f} s", flush=True)
    return shards


def build_config(shards: Path, size: int, workers: int, pad: int):
    overrides = [f"data.shards={shards}", f"model.img_size=[{size},{size}]", f"data.num_workers={workers}",
                 f"data.pad={pad}", "data.val_fraction=0"]
    return load_config(RECIPE, overrides)


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (DataLoader workers are joined at the end)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure_loader(shards: Path, size: int, workers: int, pad: int, batches: int) -> dict:
    """Iterate the real training loader for `batches` batches; the first batch (worker start-up,
    prefetch fill) is timed separately."""
    cfg = build_config(shards, size, workers, pad)
    split = ShardSplit(shards, "train")
    train_idx, _ = split_train_val(split.labels, 0.0)
    loader = build_train_loader(cfg, split, train_idx, 0, 1, IMAGENET_MEAN, IMAGENET_STD,
                                batches_per_epoch=batches)
    loader.batch_sampler.set_epoch(0)
    cpu_start, wall_start = cpu_seconds(), time.perf_counter()
    iterator = iter(loader)
    first = next(iterator)
    first_at = time.perf_counter()
    images = 0
    for images_batch, _, _ in iterator:
        images += images_batch.shape[0]
    wall_end = time.perf_counter()
    del iterator  # joins the workers so that their CPU time is counted
    cpu_total = cpu_seconds() - cpu_start
    total_images = images + first[0].shape[0]
    steady = images / (wall_end - first_at)
    return {"workers": workers, "batch": first[0].shape[0], "shape": tuple(first[0].shape[1:]),
            "steady_images_per_s": steady, "total_images_per_s": total_images / (wall_end - wall_start),
            "images_per_cpu_s": total_images / cpu_total, "first_batch_s": first_at - wall_start}


def imagefolder_tree(shards: Path) -> Path:
    """The shards' JPEG colour members as an ImageFolder tree beside them (made once): the same
    bytes jaguar's reader decodes, one folder an identity."""
    root = shards.parent / "imagefolder"
    if (root / ".done").is_file():
        return root
    split = ShardSplit(shards, "train")
    dataset = split._open()
    for i in range(len(split)):
        sample = dataset[i]
        if ".jpg" not in sample:
            raise SystemExit("--imagefolder needs shards prepared with --encoding jpeg")
        folder = root / f"id{int(split.labels[i]):04d}"
        folder.mkdir(parents=True, exist_ok=True)
        data = sample[".jpg"]
        (folder / f"{i:06d}.jpg").write_bytes(data if isinstance(data, bytes) else data.read())
    (root / ".done").write_text("")
    return root


def measure_imagefolder(root: Path, size: int, workers: int, pad: int, batches: int) -> dict:
    """torchvision's ImageFolder with the BoT training transform through a plain DataLoader
    (shuffled batches of 32), timed as `measure_loader` times jaguar's."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.Resize((size, size)), transforms.RandomHorizontalFlip(), transforms.Pad(pad),
        transforms.RandomCrop((size, size)), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD), transforms.RandomErasing(p=0.3)])
    dataset = datasets.ImageFolder(str(root), transform=transform)
    loader = DataLoader(dataset, batch_size=32, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=False)
    cpu_start, wall_start = cpu_seconds(), time.perf_counter()
    iterator = iter(loader)
    first = next(iterator)
    first_at = time.perf_counter()
    images = 0
    for batch_index, (images_batch, _) in enumerate(iterator, start=1):
        images += images_batch.shape[0]
        if batch_index >= batches - 1:
            break
    wall_end = time.perf_counter()
    del iterator
    cpu_total = cpu_seconds() - cpu_start
    total_images = images + first[0].shape[0]
    return {"workers": workers, "steady_images_per_s": images / (wall_end - first_at),
            "images_per_cpu_s": total_images / cpu_total, "first_batch_s": first_at - wall_start}


def profile_transform(shards: Path, size: int, pad: int, samples: int) -> None:
    """cProfile the dataset item (read, decode, every transform) in this process on one thread."""
    cfg = build_config(shards, size, 0, pad)
    split = ShardSplit(shards, "train")
    train_idx, _ = split_train_val(split.labels, 0.0)
    loader = build_train_loader(cfg, split, train_idx, 0, 1, IMAGENET_MEAN, IMAGENET_STD)
    dataset = loader.dataset
    keys = [(i % len(dataset), 0, i // 32, i % 32) for i in range(samples)]
    dataset[keys[0]]  # opens the shards outside the profile
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for key in keys:
        dataset[key]
    profiler.disable()
    elapsed = time.perf_counter() - started
    stats = pstats.Stats(profiler).stats
    cumulative: dict[str, float] = {}
    for (filename, _, function), (_, _, _, cum, _) in stats.items():
        label = f"{function}@{Path(filename).name}"
        cumulative[label] = cumulative.get(label, 0.0) + cum
    print(f"\nprofile: {samples} samples in {elapsed:.2f} s on one thread = {samples / elapsed:.1f} images/s "
          f"(under cProfile, which adds overhead); per sample:")
    per_sample_total = elapsed / samples * 1000
    for label, names in STAGES:
        value = sum(cumulative.get(name, 0.0) for name in names) / samples * 1000
        print(f"  {label:<44s} {value:7.2f} ms  ({100 * value / per_sample_total:4.1f}%)")
    print(f"  {'whole item':<44s} {per_sample_total:7.2f} ms")
    print("\ntop functions by own time:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/jaguar-bench-shards"))
    parser.add_argument("--images", type=int, default=300, help="synthetic training photos to prepare")
    parser.add_argument("--identities", type=int, default=31)
    parser.add_argument("--source-size", type=int, default=1024, help="side of the synthetic photos (px)")
    parser.add_argument("--max-side", type=int, default=1024, help="`jaguar prep --max-side`")
    parser.add_argument("--encoding", choices=("png", "jpeg"), default="png", help="`jaguar prep --encoding`")
    parser.add_argument("--size", type=int, default=448, help="model.img_size (square)")
    parser.add_argument("--pad", type=int, default=10, help="data.pad for pad + random crop (0 disables)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="data.num_workers values")
    parser.add_argument("--repeats", type=int, default=3, help="runs per num_workers setting (median reported)")
    parser.add_argument("--batches", type=int, default=8, help="PK batches (8 x 4 = 32 images) per run")
    parser.add_argument("--profile-samples", type=int, default=64, help="0 skips the cProfile breakdown")
    parser.add_argument("--imagefolder", action="store_true",
                        help="torchvision ImageFolder on the same JPEGs beside it (needs --encoding jpeg)")
    args = parser.parse_args()

    shards = cached_shards(args.cache, args.images, args.source_size, args.max_side, args.identities,
                            args.encoding)
    cores = os.cpu_count() or 1
    print(f"host: {platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__}, "
          f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"shards: {shards}; recipe {RECIPE.name} data settings at {args.size}px, data.pad={args.pad}")
    print(f"{args.repeats} runs per setting of {args.batches} batches each; median (min-max) of the runs")
    print("| num_workers | cores used | images/s (steady) | images/s per core | images per CPU-second "
          "| first batch | load avg (1 min) |")
    print("|--:|--:|--:|--:|--:|--:|--:|")
    folder = imagefolder_tree(shards) if args.imagefolder else None
    for workers in args.workers:
        # One core means one core: torch's intra-op threads would otherwise help the main process.
        torch.set_num_threads(1)
        runs, peer_runs = [], []
        for _ in range(args.repeats):  # interleaved: a drifting machine load falls on both alike
            runs.append(measure_loader(shards, args.size, workers, args.pad, args.batches))
            if folder is not None:
                peer_runs.append(measure_imagefolder(folder, args.size, workers, args.pad, args.batches))
        used = max(1, min(workers, cores))
        for name, measured in (("jaguar", runs), ("ImageFolder", peer_runs)):
            if not measured:
                continue
            steady = sorted(run["steady_images_per_s"] for run in measured)
            per_cpu = sorted(run["images_per_cpu_s"] for run in measured)
            median = steady[len(steady) // 2]
            label = f"{workers}" if folder is None else f"{workers} {name}"
            print(f"| {label} | {used} | {median:.1f} ({steady[0]:.1f}-{steady[-1]:.1f}) | {median / used:.1f} | "
                  f"{per_cpu[len(per_cpu) // 2]:.1f} | {measured[0]['first_batch_s']:.2f} s | "
                  f"{os.getloadavg()[0]:.2f} |", flush=True)
        if peer_runs:
            ratios = sorted(a["steady_images_per_s"] / b["steady_images_per_s"] for a, b in zip(runs, peer_runs))
            print(f"|   jaguar / ImageFolder, run by run: median {ratios[len(ratios) // 2]:.2f} "
                  f"({ratios[0]:.2f}-{ratios[-1]:.2f}) |", flush=True)
    print(f"goal: >= {GOAL_PER_CORE:.0f} images/s per core")
    if args.profile_samples > 0:
        torch.set_num_threads(1)
        profile_transform(shards, args.size, args.pad, args.profile_samples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
