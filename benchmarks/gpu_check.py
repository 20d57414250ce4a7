"""The GPU check: what jaguar's GPU code paths do on the GPU at hand. Prints a table, writes
OUT/gpu_check.json. Prints figures; not a test. Run it through `bash benchmarks/gpu_check.sh OUT`.

    python benchmarks/gpu_check.py OUT [--steps 8] [--batches 8 16] [--extract-images 1024]
        [--rerank-sizes 371 5000 20000] [--topm-size 100000] [--peak-tflops T] [--skip ...]

1. versions: torch, CUDA, cuDNN, NCCL, accelerate, DeepSpeed, timm; the device and its memory.
2. recipes/eva02_large.py (EVA-02-L/448) through the real Trainer, random init (model.pretrained=false,
   no hub), bf16, gradient checkpointing on and off, micro-batch 8 and 16: s/step, images/s, peak GPU
   memory (torch.cuda.max_memory_allocated / reserved), MFU. A step is Trainer._optimizer_step with
   train.grad_accum=1 (forward, ArcFace loss, backward, clipping, AdamW) on in-memory batches, after
   2 warm-up steps; each variant in its own process.
   MFU = 3 x forward FLOPs x images/s / the device's dense bf16 peak. The forward FLOPs are counted by
   torch.utils.flop_counter.FlopCounterMode on the model's training forward (2 FLOPs a multiply-add;
   EVA-02-L/448 is ~362 GMAC = ~724 GFLOP an image). The backward is counted as 2 x the forward
   (gradients of activations and of weights), the usual convention; the forward recomputed under
   gradient checkpointing is NOT counted (so checkpointing lowers MFU; counting it gives HFU).
3. One DeepSpeed ZeRO-2 run of the same (checkpointing on, micro-batch 8) through
   `accelerate launch --config_file launch/zero2.yaml --num_processes 1`.
4. `jaguar extract`'s path at 448 px with flip TTA: build_eval_loader + embed_batches with bf16 autocast
   on synthetic test shards (decode and transforms included, data.num_workers = cores - 1); images/s
   over a second pass (the first warms cuDNN and the loader).
5. k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3): k_reciprocal_rerank_single on the CPU and its
   torch-only path on the GPU at each N (time, max |diff|), and the bounded top-M mode
   (k_reciprocal_rerank_topm, M=100) on the GPU at --topm-size, checked against the CPU at 5,000.
6. Local pattern matching (benchmarks/gpu_check_local.py): the learned extractor and matcher (DISK
   batched, LightGlue, random weights from a local file) on the GPU beside RootSIFT and
   nearest-neighbour matching on the CPU: images/s, pairs/s, peak memory.

Without CUDA it says so, writes {"cuda": false, ...} and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPE = ROOT / "recipes" / "eva02_large.py"
SECTIONS = ("train", "deepspeed", "extract", "rerank", "local")
FORWARD_GMAC_EVA02_L_448 = 362.0  # published figure, printed beside the counted one

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets; the first
# name found in the device name wins. Pass --peak-tflops for a device not listed.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0),
                    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
                    ("L4", 121.0), ("A6000", 155.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0)]


def _result(payload: dict) -> None:
    print("RESULT " + json.dumps(payload), flush=True)


def _child(args: list[str], launcher: list[str] | None = None, timeout: float = 900) -> dict:
    """Run this script with `args` (in a fresh process: its own CUDA context and peak memory) and
    return its RESULT line, or {"error": ...}."""
    command = [*(launcher or [sys.executable]), __file__, *args]
    try:
        child = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    if child.returncode != 0 or not lines:
        tail = [line for line in child.stderr.strip().splitlines() if line.strip()][-3:]
        return {"error": f"exit {child.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1][len("RESULT "):])


def versions() -> dict:
    import accelerate
    import timm
    import torch

    props = torch.cuda.get_device_properties(0)
    nccl = torch.cuda.nccl.version() if hasattr(torch.cuda, "nccl") else None
    try:
        import deepspeed
        deepspeed_version = deepspeed.__version__
    except Exception as err:  # an optional engine: report why it is missing
        deepspeed_version = f"unavailable ({type(err).__name__}: {err})"
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
            "accelerate": accelerate.__version__, "deepspeed": deepspeed_version, "timm": timm.__version__,
            "device": props.name, "device_count": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}", "memory_gib": props.total_memory / 2 ** 30,
            "bf16": torch.cuda.is_bf16_supported()}


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    for name, tflops in PEAK_BF16_TFLOPS:
        if name in device_name:
            return tflops
    return None


def make_data(folder: Path, test_images: int) -> Path:
    """Synthetic shards: 8 identities (the trainer's head), `test_images` 512 px test images (extraction)."""
    from jaguar.data.prep import prepare
    from jaguar.data.synth import make_synthetic

    workers = max(1, os.cpu_count() or 1)
    source = make_synthetic(folder / "source", identities=8, train_images=128, test_images=test_images, size=512,
                            seed=0, workers=workers)
    prepare(source, folder / "shards", workers=workers)
    return folder / "shards"


# ------------------------------------------------------------------ 2 and 3: the Trainer
def train_variant(shards: Path, checkpointing: bool, batch: int, steps: int) -> dict:
    """Build the Trainer for recipes/eva02_large.py and time `steps` optimizer steps after 2 warm-up steps."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from jaguar.config import load_config
    from jaguar.core.accelerator import uses_deepspeed
    from jaguar.train.trainer import Trainer

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="jaguar-gpu-check-") as tmp:
        overrides = [f"data.shards={shards}", f"run.dir={Path(tmp) / 'run'}", "model.pretrained=false",
                     "model.img_size=[448,448]", "train.precision=bf16",
                     f"model.grad_checkpointing={str(checkpointing).lower()}", "train.grad_accum=1",
                     "data.p_identities=2", f"data.k_images={batch // 2}", "data.num_workers=0",
                     "data.val_fraction=0", "train.eval_every=0"]
        cfg = load_config(RECIPE, overrides)
        started = time.perf_counter()
        trainer = Trainer(cfg)
        build_s = time.perf_counter() - started
        device = trainer.accelerator.device
        generator = torch.Generator().manual_seed(0)
        batches = [(torch.randn(batch, 3, 448, 448, generator=generator),
                    torch.arange(batch) % trainer.num_classes, torch.arange(batch)) for _ in range(steps + 2)]
        iterator = iter(batches)
        torch.cuda.reset_peak_memory_stats(device)
        step_s, losses = [], []
        for index in range(steps + 2):
            torch.cuda.synchronize(device)
            started = time.perf_counter()
            terms, _, _ = trainer._optimizer_step(iterator)
            torch.cuda.synchronize(device)
            if index >= 2:
                step_s.append(time.perf_counter() - started)
            trainer.step += 1
            losses.append(terms["loss"])
        peak_allocated = torch.cuda.max_memory_allocated(device) / 2 ** 30
        peak_reserved = torch.cuda.max_memory_reserved(device) / 2 ** 30
        # The training forward of 2 images (the BNNeck needs a batch), counted once, without autograd.
        images = torch.randn(2, 3, 448, 448, device=device, dtype=trainer.input_dtype)
        labels = torch.zeros(2, dtype=torch.long, device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            trainer.model(images)
        forward_flops = counter.get_total_flops() / 2
        deepspeed = uses_deepspeed(trainer.accelerator)
        params = sum(p.numel() for p in trainer.model.parameters())
    mean_s = sum(step_s) / len(step_s)
    return {"checkpointing": checkpointing, "batch": batch, "deepspeed": deepspeed, "params_m": params / 1e6,
            "build_s": build_s, "step_s": step_s, "s_per_step": mean_s, "images_per_s": batch / mean_s,
            "peak_allocated_gib": peak_allocated, "peak_reserved_gib": peak_reserved,
            "forward_gflops_per_image": forward_flops / 1e9,
            "model_tflops_per_s": 3 * forward_flops * batch / mean_s / 1e12,
            "losses": losses, "skipped_steps": trainer.guard.skipped}


# ------------------------------------------------------------------ 4: extraction
def extract_throughput(shards: Path) -> dict:
    """`jaguar extract`'s embedding loop at 448 px, flip TTA, bf16 autocast, over the test split."""
    import torch

    from jaguar.config import load_config
    from jaguar.data.loader import build_eval_loader
    from jaguar.data.shards import ShardSplit
    from jaguar.models import build_model
    from jaguar.core.embedding import embed_batches

    cfg = load_config(RECIPE, [f"data.shards={shards}", "model.pretrained=false", "model.img_size=[448,448]",
                               f"data.num_workers={max(1, (os.cpu_count() or 2) - 1)}", "data.batch_size=64"])
    device = torch.device("cuda")
    model = build_model(cfg, 1).to(device).eval()
    split = ShardSplit(Path(cfg.data.shards), "test")
    positions = list(range(len(split.filenames)))
    loader = build_eval_loader(cfg, split, positions, tuple(model.mean), tuple(model.std), cfg.data.batch_size)
    passes = []
    with torch.no_grad():
        for _ in range(2):
            torch.cuda.synchronize()
            started = time.perf_counter()
            _, embeddings = embed_batches(model.embed, loader, device, flip_tta=True, scales=(1.0,),
                                          autocast_dtype=torch.bfloat16)
            torch.cuda.synchronize()
            passes.append(time.perf_counter() - started)
    # The same images without the loader: the model's share of the time.
    batch = torch.randn(cfg.data.batch_size, 3, 448, 448, device=device)
    with torch.no_grad():
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(3):
            embed_batches(model.embed, [(batch, list(range(len(batch))))], device, flip_tta=True, scales=(1.0,),
                          autocast_dtype=torch.bfloat16)
        torch.cuda.synchronize()
        model_only = 3 * len(batch) / (time.perf_counter() - started)
    return {"images": len(positions), "batch_size": cfg.data.batch_size, "num_workers": cfg.data.num_workers,
            "pass_s": passes, "images_per_s": len(positions) / passes[-1], "model_only_images_per_s": model_only,
            "embed_dim": int(embeddings.shape[1]), "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2 ** 30}


# ------------------------------------------------------------------ 5: re-ranking
def rerank_compare(sizes: list[int], topm_size: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "tests"))
    from rerank import clustered_features

    from jaguar.retrieval.post.rerank import euclidean_distance, k_reciprocal_rerank_single
    from jaguar.retrieval.post.rerank_bounded import k_reciprocal_rerank_topm

    def timed(function, *args, **kwargs):
        torch.cuda.synchronize()
        started = time.perf_counter()
        value = function(*args, **kwargs)
        torch.cuda.synchronize()
        return value, time.perf_counter() - started

    cuda = torch.device("cuda")
    k_reciprocal_rerank_single(euclidean_distance(clustered_features(64, 256)).to(cuda))  # CUDA warm-up
    dense = []
    for n in sizes:
        dist = euclidean_distance(clustered_features(n, 256))
        on_cpu, cpu_s = timed(k_reciprocal_rerank_single, dist)
        on_gpu, gpu_s = timed(k_reciprocal_rerank_single, dist.to(cuda))
        dense.append({"n": n, "cpu_s": cpu_s, "gpu_s": gpu_s, "speedup": cpu_s / gpu_s,
                      "max_abs_diff": float((on_gpu.cpu() - on_cpu).abs().max())})
        del dist, on_cpu, on_gpu
        torch.cuda.empty_cache()
    bounded: dict = {}
    try:
        check = clustered_features(5000, 256)
        (cpu_index, cpu_dist), _ = timed(k_reciprocal_rerank_topm, check, top_m=100)
        (gpu_index, gpu_dist), _ = timed(k_reciprocal_rerank_topm, check.to(cuda), top_m=100)
        bounded["check_n"] = 5000
        bounded["check_same_indices"] = bool(torch.equal(cpu_index, gpu_index.cpu()))
        bounded["check_max_abs_diff"] = float((gpu_dist.cpu() - cpu_dist).abs().max())
        if topm_size:
            features = clustered_features(topm_size, 256).to(cuda)
            torch.cuda.reset_peak_memory_stats()
            _, seconds = timed(k_reciprocal_rerank_topm, features, top_m=100)
            bounded.update(n=topm_size, gpu_s=seconds, peak_allocated_gib=torch.cuda.max_memory_allocated() / 2 ** 30)
    except Exception as err:  # report, do not lose the dense figures
        bounded["error"] = f"{type(err).__name__}: {err}"
    return {"dense": dense, "topm": bounded, "cpu_threads": torch.get_num_threads()}


# ------------------------------------------------------------------ the report
def _table(results: dict) -> str:
    lines = []
    v = results["versions"]
    lines.append(f"device: {v['device']} x{v['device_count']} (sm {v['capability']}, {v['memory_gib']:.0f} GiB); "
                 f"torch {v['torch']}, CUDA {v['cuda']}, cuDNN {v['cudnn']}, NCCL {v['nccl']}, accelerate "
                 f"{v['accelerate']}, DeepSpeed {v['deepspeed']}, timm {v['timm']}")
    peak = results.get("peak_bf16_tflops")
    runs = results.get("train", []) + ([results["deepspeed"]] if "deepspeed" in results else [])
    if runs:
        lines += ["", f"EVA-02-L/448 training step, bf16, random init (MFU against {peak or '?'} TFLOP/s dense bf16)",
                  "| engine | grad ckpt | micro-batch | s/step | images/s | peak alloc / reserved GiB "
                  "| fwd GFLOP/img | MFU |",
                  "|---|---|--:|--:|--:|--:|--:|--:|"]
        for run in runs:
            if "error" in run:
                lines.append(f"| {run.get('label', '?')} failed: {run['error']} |")
                continue
            mfu = f"{100 * run['model_tflops_per_s'] / peak:.1f}%" if peak else "-"
            lines.append(f"| {'ZeRO-2' if run['deepspeed'] else 'plain'} | {'on' if run['checkpointing'] else 'off'} | "
                         f"{run['batch']} | {run['s_per_step']:.3f} | {run['images_per_s']:.1f} | "
                         f"{run['peak_allocated_gib']:.1f} / {run['peak_reserved_gib']:.1f} | "
                         f"{run['forward_gflops_per_image']:.0f} | {mfu} |")
    if "extract" in results:
        e = results["extract"]
        lines += [""] + ([f"extract failed: {e['error']}"] if "error" in e else [
            f"jaguar extract, 448 px, flip TTA, bf16: {e['images_per_s']:.0f} images/s through the loader "
            f"({e['images']} images, batch {e['batch_size']}, {e['num_workers']} workers); model alone "
            f"{e['model_only_images_per_s']:.0f} images/s"])
    if "rerank" in results:
        r = results["rerank"]
        if "error" in r:
            lines += ["", f"re-ranking failed: {r['error']}"]
        else:
            lines += ["", f"k-reciprocal re-ranking, CPU ({r['cpu_threads']} threads) vs GPU (torch path)",
                      "| N | CPU s | GPU s | speed-up | max abs diff |", "|--:|--:|--:|--:|--:|"]
            lines += [f"| {d['n']:,} | {d['cpu_s']:.3f} | {d['gpu_s']:.3f} | {d['speedup']:.1f}x | "
                      f"{d['max_abs_diff']:.1e} |" for d in r["dense"]]
            t = r["topm"]
            if "error" in t:
                lines.append(f"top-M mode: failed: {t['error']}")
            else:
                lines.append(f"top-M mode (M=100): GPU vs CPU at N={t['check_n']:,}: same neighbours "
                             f"{t['check_same_indices']}, max abs diff {t['check_max_abs_diff']:.1e}"
                             + (f"; N={t['n']:,} on the GPU in {t['gpu_s']:.2f} s, "
                                f"peak {t['peak_allocated_gib']:.1f} GiB" if "n" in t else ""))
    if "local" in results:
        from gpu_check_local import table_lines

        lines += table_lines(results["local"])
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for gpu_check.json (created)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per variant (after 2 warm-up)")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16], help="micro-batches (even: 2 identities)")
    parser.add_argument("--extract-images", type=int, default=1024)
    parser.add_argument("--rerank-sizes", type=int, nargs="+", default=[371, 5000, 20000])
    parser.add_argument("--topm-size", type=int, default=100000, help="0 skips the large top-M run")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    parser.add_argument("--child", choices=("train", "extract", "rerank", "local"), help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", choices=("on", "off"), default="on", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    if args.child == "train":
        _result(train_variant(args.shards, args.checkpointing == "on", args.batch, args.steps))
        return 0
    if args.child == "extract":
        _result(extract_throughput(args.shards))
        return 0
    if args.child == "rerank":
        _result(rerank_compare(args.rerank_sizes, args.topm_size))
        return 0
    if args.child == "local":
        from gpu_check_local import local_gpu

        _result(local_gpu())
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / "gpu_check.json"
    if not torch.cuda.is_available():
        reason = f"torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA device"
        print(f"gpu_check: no GPU: {reason}; nothing measured")
        report.write_text(json.dumps({"cuda": False, "reason": reason}, indent=1) + "\n")
        return 0
    if any(batch < 2 or batch % 2 for batch in args.batches):
        parser.error(f"--batches {args.batches}: each must be even (2 identities x k images)")

    started = time.perf_counter()
    results: dict = {"cuda": True, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "host": platform.node(), "versions": versions()}
    results["peak_bf16_tflops"] = peak_tflops(results["versions"]["device"], args.peak_tflops)
    results["forward_gmac_published"] = FORWARD_GMAC_EVA02_L_448

    def save() -> None:
        results["wall_s"] = time.perf_counter() - started
        report.write_text(json.dumps(results, indent=1) + "\n")

    with tempfile.TemporaryDirectory(prefix="jaguar-gpu-check-") as tmp:
        print(f"gpu_check: {results['versions']['device']}; preparing synthetic shards", flush=True)
        shards = make_data(Path(tmp), args.extract_images)
        common = ["--shards", str(shards), "--steps", str(args.steps)]
        if "train" not in args.skip:
            results["train"] = []
            for batch in args.batches:
                for checkpointing in ("on", "off"):
                    print(f"gpu_check: training step, grad checkpointing {checkpointing}, micro-batch {batch}",
                          flush=True)
                    run = _child(["--child", "train", "--checkpointing", checkpointing, "--batch", str(batch), *common])
                    run.setdefault("label", f"plain ckpt {checkpointing} batch {batch}")
                    results["train"].append(run)
                    save()
        if "deepspeed" not in args.skip:
            print("gpu_check: DeepSpeed ZeRO-2 step through accelerate launch", flush=True)
            launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                        str(ROOT / "launch" / "zero2.yaml"), "--num_processes", "1"]
            run = _child(["--child", "train", "--checkpointing", "on", "--batch", "8", *common], launcher=launcher)
            run.setdefault("label", "ZeRO-2 ckpt on batch 8")
            results["deepspeed"] = run
            save()
        if "extract" not in args.skip:
            print("gpu_check: extraction throughput", flush=True)
            results["extract"] = _child(["--child", "extract", *common])
            save()
        if "rerank" not in args.skip:
            print("gpu_check: re-ranking CPU vs GPU", flush=True)
            results["rerank"] = _child(["--child", "rerank", "--rerank-sizes", *map(str, args.rerank_sizes),
                                        "--topm-size", str(args.topm_size)])
            save()
        if "local" not in args.skip:
            print("gpu_check: local matching (DISK, LightGlue) on the GPU vs RootSIFT on the CPU", flush=True)
            results["local"] = _child(["--child", "local"])
            save()
    save()
    print()
    print(_table(results))
    print(f"\n{report} written in {results['wall_s']:.0f} s")
    failed = [name for name in SECTIONS if isinstance(results.get(name), dict) and "error" in results[name]]
    failed += [run["label"] for run in results.get("train", []) if "error" in run]
    if failed:
        print(f"gpu_check: FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
