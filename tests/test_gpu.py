"""The CUDA paths give the numbers the CPU gives: margin heads (incl. bf16 autocast), GeM pooling,
k-reciprocal re-ranking (its torch-only path on the GPU, dense and top-M), and extraction
(embed_batches with flip TTA, fp32 and the bf16 autocast `jaguar extract` uses on a GPU).
Marked `gpu` and skipped without CUDA; the GPU check script's no-GPU answer is tested here too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from jaguar.config import load_config
from jaguar.models import build_model
from jaguar.models.heads import build_head, build_margin
from jaguar.models.pooling import GeM
from jaguar.core.embedding import embed_batches
from jaguar.retrieval.post.rerank import euclidean_distance, k_reciprocal_rerank, k_reciprocal_rerank_single
from jaguar.retrieval.post.rerank_bounded import k_reciprocal_rerank_topm

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


def cuda_test(function):
    """Marked `gpu` (select with -m gpu) and skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")(function))


def _features(n: int, dim: int = 64, seed: int = 0) -> torch.Tensor:
    """L2-normalised features around n/8 centres, like a gallery of identities."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(1, n // 8), dim, generator=generator)
    owner = torch.randint(0, centres.shape[0], (n,), generator=generator)
    return F.normalize(centres[owner] + 0.6 * torch.randn(n, dim, generator=generator), dim=1)


@cuda_test
@pytest.mark.parametrize("head_name", ["arcface", "subcenter_arcface", "cosface", "softmax"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_heads_match_the_cpu(head_name, autocast):
    torch.manual_seed(0)
    model_cfg = load_config(None, [f"model.head={head_name}"]).model
    head, margin = build_head(model_cfg, 64, 10), build_margin(model_cfg)
    features = torch.randn(16, 64)
    labels = torch.randint(0, 10, (16,))
    expected = margin(head(features), labels)
    on_gpu = head.to(CUDA)
    with torch.autocast(CUDA.type, dtype=torch.bfloat16, enabled=autocast):
        logits = margin(on_gpu(features.to(CUDA)), labels.to(CUDA))
    tolerance = 0.15 if autocast else 1e-4  # logits are scaled by s=30: bf16 inputs cost ~3 significant digits
    torch.testing.assert_close(logits.float().cpu(), expected, rtol=0, atol=tolerance)



@cuda_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gem_pooling_matches_the_cpu(dtype):
    grid = torch.rand(4, 32, 7, 7) * 3
    gem = GeM(3.0)
    expected = gem(grid)
    result = gem.to(CUDA)(grid.to(CUDA, dtype))
    assert result.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(result.float().cpu(), expected, rtol=tolerance, atol=tolerance)



@cuda_test
@pytest.mark.parametrize("n", [40, 371, 1500])
def test_reranking_torch_path_on_the_gpu_matches_the_cpu(n):
    dist = euclidean_distance(_features(n))
    expected = k_reciprocal_rerank_single(dist, 20, 6, 0.3)
    result = k_reciprocal_rerank_single(dist.to(CUDA), 20, 6, 0.3)
    assert result.device.type == "cuda"
    torch.testing.assert_close(result.cpu(), expected, rtol=0, atol=1e-5)
    # The query/gallery form too (10 queries against the rest).
    q, g = 10, n - 10
    qg, qq, gg = dist[:q, q:], dist[:q, :q], dist[q:, q:]
    expected = k_reciprocal_rerank(qg, qq, gg, 20, 6, 0.3)
    result = k_reciprocal_rerank(qg.to(CUDA), qq.to(CUDA), gg.to(CUDA), 20, 6, 0.3)
    assert result.shape == (q, g)
    torch.testing.assert_close(result.cpu(), expected, rtol=0, atol=1e-5)



@cuda_test
def test_topm_reranking_on_the_gpu_matches_the_cpu():
    features = _features(600)
    cpu_index, cpu_dist = k_reciprocal_rerank_topm(features, top_m=50, chunk=128)
    gpu_index, gpu_dist = k_reciprocal_rerank_topm(features.to(CUDA), top_m=50, chunk=128)
    torch.testing.assert_close(gpu_dist.cpu(), cpu_dist, rtol=0, atol=1e-5)
    # Neighbours may only swap where their re-ranked distances tie within rounding.
    differs = gpu_index.cpu() != cpu_index
    assert differs.float().mean() < 0.01



@cuda_test
def test_extraction_on_the_gpu_matches_the_cpu(tmp_path):
    """embed_batches (the `jaguar extract` loop, flip TTA) of one model on both devices: fp32 equal to
    rounding; bf16 autocast (what extract uses on a GPU) gives the same neighbours."""
    torch.manual_seed(0)
    cfg = load_config(None, ["model.backbone=resnet18", "model.pretrained=false", "model.img_size=[64,64]"])
    model = build_model(cfg, 5).eval()
    images = torch.randn(24, 3, 64, 64)
    batches = [(images[i:i + 8], list(range(i, i + 8))) for i in range(0, 24, 8)]
    with torch.no_grad():
        positions, expected = embed_batches(model.embed, batches, torch.device("cpu"), flip_tta=True)
        model.to(CUDA)
        gpu_positions, fp32 = embed_batches(model.embed, batches, CUDA, flip_tta=True)
        _, bf16 = embed_batches(model.embed, batches, CUDA, flip_tta=True, autocast_dtype=torch.bfloat16)
    assert gpu_positions.tolist() == positions.tolist() == list(range(24))
    assert fp32.device.type == "cpu" and fp32.dtype == torch.float32
    torch.testing.assert_close(fp32, expected, rtol=1e-4, atol=1e-4)
    cosine = (bf16 * expected).sum(1)
    assert cosine.min() > 0.99, cosine
    assert ((bf16 @ bf16.T).argsort(1)[:, -3:] == (expected @ expected.T).argsort(1)[:, -3:]).float().mean() > 0.9



# ------------------------------------------------------------------ the GPU check without a GPU
def _gpu_listed() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return listing.returncode == 0 and any(line.startswith("GPU") for line in listing.stdout.splitlines())


@pytest.mark.skipif(_gpu_listed(), reason="this machine has a GPU: the check would run")
def test_gpu_check_script_says_no_gpu_and_exits_at_once(tmp_path):
    started = time.monotonic()
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 10
    assert "no GPU" in result.stdout
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["cuda"] is False


def test_gpu_check_python_without_cuda_writes_its_answer(tmp_path):
    """With the GPUs hidden (or none), the Python part says so and writes {"cuda": false}."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "no GPU" in result.stdout
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["cuda"] is False and "sees no CUDA device" in report["reason"]
