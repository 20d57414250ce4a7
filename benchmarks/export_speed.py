"""PyTorch fp32 vs ONNX fp32 vs ONNX int8 (onnxruntime, static QDQ) on this CPU: images per second
at batch 1 and 32, cosine agreement with PyTorch, and the test identity-balanced mAP of each on a
labelled test set, for a trained run's model (e.g. the demo's tiny recipe) and for a ResNet-50 at
224 px with random weights (no hub: its mAP is near chance; its speed and agreement are the point).

    python benchmarks/export_speed.py --run demo/run --test-labels demo/raw/test_labels.csv

Each model is exported with `jaguar.retrieval.export` (the exact graph `jaguar export` writes, flip
TTA included when the run's config has it; the ResNet-50 without) into a temporary folder. Throughput: the median over
--reps timed calls after one warm-up, --threads intra-op threads for both runtimes, random inputs
of the model's size (one image = one call at batch 1; both views of flip TTA count as one image)."""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from jaguar.config import Config
from jaguar.data.loader import build_eval_loader
from jaguar.formats import read_labels
from jaguar.core.embedding import load_embedder
from jaguar.retrieval.export import EmbeddingGraph, check_batches, compare, export_onnx, quantize_int8
from jaguar.retrieval.extract import split_positions
from jaguar.core.evaluator import identity_balanced_map
from jaguar.core.onnx_model import OnnxEmbedding, preprocessing_metadata
from jaguar.run import RunDir


def images_per_second(embed, batch: torch.Tensor, reps: int) -> float:
    embed(batch)  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        embed(batch)
        times.append(time.perf_counter() - start)
    return batch.shape[0] / statistics.median(times)


def test_embeddings(embed, cfg: Config, run: RunDir, mean, std, identity_by_name: dict[str, str]):
    split, positions = split_positions(cfg, run, "test")
    loader = build_eval_loader(cfg, split, positions, tuple(mean), tuple(std), 32)
    embeddings = torch.cat([embed(images) for images, _ in loader])
    names = [split.filenames[p] for p in positions]
    identities = sorted(set(identity_by_name.values()))
    labels = torch.tensor([identities.index(identity_by_name[n]) if n in identity_by_name else -1 for n in names])
    return embeddings, labels


def measure(name: str, cfg: Config, run: RunDir, checkpoint, identity_by_name, reps: int, threads: int,
            workdir: Path) -> list[str]:
    torch.manual_seed(cfg.run.seed)
    embedder = load_embedder(cfg, checkpoint, None, torch.device("cpu"))
    graph = EmbeddingGraph(embedder.module, embedder.flip_tta, embedder.scales).eval()
    calibration, _ = check_batches(cfg, run, embedder.mean, embedder.std, 64, batch_size=32)
    fp32_path, int8_path = workdir / f"{name}.onnx", workdir / f"{name}-int8.onnx"
    export_onnx(graph, calibration[0][:2], fp32_path,
                preprocessing_metadata(cfg, embedder.mean, embedder.std, embedder.embed_dim, embedder.source))
    quantize_int8(fp32_path, int8_path, "static", calibration)
    fp32, int8 = OnnxEmbedding.load(fp32_path, threads), OnnxEmbedding.load(int8_path, threads)

    def pytorch(images):
        with torch.no_grad():
            return graph(images)

    runtimes = {"PyTorch fp32": pytorch, "ONNX fp32": fp32.embed, "ONNX int8": int8.embed}
    height, width = cfg.model.img_size
    inputs = {size: torch.randn(size, 3, height, width, generator=torch.Generator().manual_seed(0)) for size in (1, 32)}
    reference, labels = test_embeddings(pytorch, cfg, run, embedder.mean, embedder.std, identity_by_name)
    keep = labels >= 0
    rows = []
    for label, embed in runtimes.items():
        speed = {size: images_per_second(embed, batch, reps) for size, batch in inputs.items()}
        embeddings, _ = test_embeddings(embed, cfg, run, embedder.mean, embedder.std, identity_by_name)
        agreement = compare(reference, embeddings)
        test_map = identity_balanced_map(embeddings[keep] @ embeddings[keep].T, labels[keep])
        rows.append(f"| {name} | {label} | {speed[1]:.1f} | {speed[32]:.1f} | {agreement.max_cosine_distance:.1e} | "
                    f"{agreement.mean_cosine_distance:.1e} | {test_map:.4f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a trained run (its shards hold a test split)")
    parser.add_argument("--test-labels", required=True, help="test_labels.csv of the run's test images")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["run", "resnet50"], choices=("run", "resnet50"),
                        help="the run's model and/or the random-init ResNet-50 (measured without flip TTA)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = RunDir(args.run)
    cfg = run.load_config()
    identity_by_name = read_labels(args.test_labels)
    header = ["| model | runtime | img/s batch 1 | img/s batch 32 | max cos dist | mean cos dist "
              "| test mAP (id-bal.) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    print("\n".join(header), flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        if "run" in args.models:
            label = f"{cfg.model.backbone} {cfg.model.img_size[0]}x{cfg.model.img_size[1]}" + (
                " flip TTA" if cfg.retrieval.flip_tta else "")
            measure(label, cfg, run, run.checkpoints.best_or_latest(), identity_by_name, args.reps, args.threads,
                    Path(scratch))
        if "resnet50" in args.models:
            big = Config()
            big.data, big.retrieval = copy.deepcopy(cfg.data), copy.deepcopy(cfg.retrieval)
            big.retrieval.flip_tta = False  # one view: the plain network's speed
            big.model.backbone, big.model.pretrained, big.model.img_size = "resnet50", False, [224, 224]
            big.run.seed = cfg.run.seed
            measure("resnet50 224x224 (random init)", big, run, None, identity_by_name, args.reps, args.threads,
                    Path(scratch))


if __name__ == "__main__":
    main()
