"""The GPU check's local-matching section (benchmarks/gpu_check.py `--child local`): the learned local
extractor and matcher (jaguar.retrieval.local.learned: DISK, LightGlue through kornia) on the GPU
against the CPU defaults (RootSIFT, nearest neighbours + ratio test), on synthetic jaguars
(`jaguar synth`, 448 px, the winning recipe's input size).

Weights are random (saved to a local file and read back through the config, as a trained file
would be: there is no hub here), so the figures are speeds, not matching quality: DISK extraction
images/s (batched), LightGlue pairs/s (one pair a forward pass, as jaguar runs it) with geometric
verification after it, and the CPU paths' images/s and pairs/s on one process for scale."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def _photos(folder: Path, count: int, size: int) -> list:
    import cv2

    from jaguar.data.synth import make_synthetic

    data = make_synthetic(folder / "synth", identities=8, train_images=max(count, 16), test_images=8, size=size, seed=0)
    paths = sorted((data / "train").iterdir())[:count]
    return [cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA) for path in paths]


def local_gpu(images: int = 64, size: int = 448, pairs: int = 128, device: str = "cuda") -> dict:
    """Speeds of DISK and LightGlue on `device` (CUDA; "cpu" runs the same code for a dry run) beside
    RootSIFT and nearest-neighbour matching on the CPU."""
    import torch
    from kornia.feature import DISK, LightGlue

    from jaguar.config import Config
    from jaguar.retrieval.local.configured import make_extractor, make_matcher
    from jaguar.retrieval.local.matching import MatchSettings, match_pair

    cuda = device == "cuda"

    def timed(function, *args):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        value = function(*args)
        if cuda:
            torch.cuda.synchronize()
        return value, time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix="jaguar-gpu-local-") as tmp:
        folder = Path(tmp)
        photos = _photos(folder, images, size)
        torch.manual_seed(0)
        torch.save({"extractor": DISK().state_dict()}, folder / "disk.pth")
        # random weights match nothing above LightGlue's default filter; 0 lets every pair through
        torch.save(LightGlue(features=None, input_dim=128, filter_threshold=0.0).state_dict(), folder / "lg.pth")
        cfg = Config()
        local = cfg.retrieval.local
        local.extractor, local.weights_file = "disk", str(folder / "disk.pth")
        local.matcher, local.matcher_weights_file = "lightglue", str(folder / "lg.pth")
        disk = make_extractor(local, device=device)
        matcher = make_matcher(local, device=device)
        matcher.model.conf.filter_threshold = 0.0  # random weights: let matches through, as a trained model would
        disk.extract_batch(photos[:disk.batch_size])  # warm-up: cuDNN autotuning, allocations
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        disk_features, disk_s = timed(disk.extract_batch, photos)
        settings = MatchSettings.from_config(local)
        chosen = [(i % len(photos), (i * 7 + 1) % len(photos)) for i in range(pairs)]
        match_pair(disk_features[0], disk_features[1], settings, matcher)  # warm-up
        _, lightglue_s = timed(lambda: [match_pair(disk_features[a], disk_features[b], settings, matcher)
                                        for a, b in chosen])
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0.0

        cfg_cpu = Config()
        sift = make_extractor(cfg_cpu.retrieval.local)
        started = time.perf_counter()
        sift_features = sift.extract_batch(photos)
        sift_s = time.perf_counter() - started
        cpu_settings = MatchSettings.from_config(cfg_cpu.retrieval.local)
        started = time.perf_counter()
        for a, b in chosen:
            match_pair(sift_features[a], sift_features[b], cpu_settings)
        nearest_s = time.perf_counter() - started
    return {"device": device, "images": len(photos), "size": size, "pairs": pairs, "disk_batch": disk.batch_size,
            "disk_images_per_s": len(photos) / disk_s, "lightglue_pairs_per_s": pairs / lightglue_s,
            "rootsift_cpu_images_per_s": len(photos) / sift_s, "nearest_cpu_pairs_per_s": pairs / nearest_s,
            "keypoints_disk": sum(len(f) for f in disk_features) / len(photos),
            "keypoints_rootsift": sum(len(f) for f in sift_features) / len(photos),
            "peak_allocated_gib": peak, "cpu_threads": torch.get_num_threads()}


def table_lines(result: dict) -> list[str]:
    """The section's lines of the GPU check's table."""
    if "error" in result:
        return ["", f"local matching failed: {result['error']}"]
    r = result
    return ["", f"local matching, {r['images']} synthetic photos at {r['size']} px, {r['pairs']} pairs "
                f"(random weights: speed only)",
            "| path | device | images/s | pairs/s | keypoints/img |", "|---|---|--:|--:|--:|",
            f"| DISK (batch {r['disk_batch']}) + LightGlue + verification | {r['device']} | {r['disk_images_per_s']:.1f} | "
            f"{r['lightglue_pairs_per_s']:.1f} | {r['keypoints_disk']:.0f} |",
            f"| RootSIFT + nearest/ratio + verification | CPU ({r['cpu_threads']} threads) | "
            f"{r['rootsift_cpu_images_per_s']:.1f} | {r['nearest_cpu_pairs_per_s']:.1f} | {r['keypoints_rootsift']:.0f} |",
            f"peak GPU memory {r['peak_allocated_gib']:.2f} GiB"]
