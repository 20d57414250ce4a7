"""What the integrity checks cost: loading a features file with and without its content sha256
check (FeatureSet.load checks it every time), and recording / checking a checkpoint file's sha256
(jaguar.checksums: at save, at resume, and on extraction only when the file's mtime moved). Prints
figures; not a test.

    python benchmarks/checksum_cost.py [--rows 100000] [--dims 512] [--weights-mb 300] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaguar import checksums  # noqa: E402
from jaguar.core.features import FeatureSet, _content_sha256  # noqa: E402


def best_of(repeat: int, function) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dims", type=int, default=512)
    parser.add_argument("--weights-mb", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"best of {args.repeat}")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "test.safetensors"
        names = [f"img_{i:07d}.png" for i in range(args.rows)]
        embeddings = torch.nn.functional.normalize(torch.randn(args.rows, args.dims), dim=1)
        FeatureSet(names, embeddings, torch.zeros(args.rows, dtype=torch.long)).save(path)
        size_mb = path.stat().st_size / 1e6
        checked = best_of(args.repeat, lambda: FeatureSet.load(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        metadata.pop("sha256")
        tensors = {name: tensor.clone() for name, tensor in load_file(str(path)).items()}
        hashing = best_of(args.repeat, lambda: _content_sha256({k: t.numpy() for k, t in tensors.items()}, metadata))
        finite = best_of(args.repeat, lambda: torch.isfinite(tensors["embeddings"].sum()))
        print(f"features {args.rows:,} x {args.dims} ({size_mb:.0f} MB): FeatureSet.load {checked:.2f} s, of "
              f"which the content sha256 {hashing:.2f} s and the finite-rows check {finite:.3f} s")

        weights = Path(folder) / "weights.safetensors"
        weights.write_bytes(os.urandom(args.weights_mb * 1_000_000))
        record = checksums.file_record(weights)
        recorded = best_of(args.repeat, lambda: checksums.file_record(weights))
        stat_only = best_of(args.repeat, lambda: checksums.check_file(weights, record))
        full = best_of(args.repeat, lambda: checksums.check_file(weights, record, full=True))
        print(f"weights file {args.weights_mb} MB: record (sha256) {recorded:.2f} s; check, mtime unchanged "
              f"(size only) {stat_only * 1e3:.2f} ms; full check {full:.2f} s")


if __name__ == "__main__":
    main()
