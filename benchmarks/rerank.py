"""Re-ranking speed and memory: the batched kernel against the plain-loop reference (dense, N x N)
and the bounded-memory top-M mode at large N. Prints figures; not a test.

    python benchmarks/rerank.py [--sizes 371 2000 5000] [--skip-loop-above 2000]
                                [--bounded 10000 70000] [--dim 256] [--stages 2000]

--stages N also prints where the dense kernel's time goes at N (its stages, each timed alone, on
one thread and on the kernel's threads) next to two torch primitives on one thread: selecting
the k1 + 1 nearest of every row (torch.topk) and scatter-adding as many random Jaccard visits
into the N x N output as the kernel makes.
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from rerank_reference import re_ranking_single

from jaguar.retrieval.post.rerank import (
    Workers,
    euclidean_distance,
    k_reciprocal_rerank_single,
    k_reciprocal_rerank_topm,
)
from jaguar.retrieval.post.rerank_kernel.encode import encode
from jaguar.retrieval.post.rerank_kernel.overlaps import mirror_upper, pair_overlaps
from jaguar.retrieval.post.rerank_kernel.ranking import dense_rank, normalised_gather


def clustered_features(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Random L2-normalised features around n/8 centres, like a gallery of identities."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(1, n // 8), dim, generator=generator)
    owner = torch.randint(0, centres.shape[0], (n,), generator=generator)
    features = centres[owner] + 0.6 * torch.randn(n, dim, generator=generator)
    return torch.nn.functional.normalize(features, dim=1)


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRss:
    """Peak resident memory above the starting point, sampled every 20 ms (torch allocations
    are invisible to tracemalloc)."""

    def __enter__(self) -> PeakRss:
        self.base = _rss_mb()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())
        self.delta_mb = self.peak - self.base


def bench_dense(n: int, dim: int, skip_loop_above: int, loop_times: dict[int, float]) -> str:
    features = clustered_features(n, dim)
    dist = euclidean_distance(features)
    # Memory from one run under the RSS sampler; time from three runs without it (the sampler
    # thread competes for the GIL), best of three since other work may share the machine.
    with PeakRss() as memory:
        kernel = k_reciprocal_rerank_single(dist, 20, 6, 0.3)
    memory_mb = memory.delta_mb
    kernel_time, kernel_cpu = float("inf"), 0.0
    for _ in range(3):
        start, cpu_start = time.perf_counter(), time.process_time()
        kernel = k_reciprocal_rerank_single(dist, 20, 6, 0.3)
        if time.perf_counter() - start < kernel_time:
            kernel_time, kernel_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if n <= skip_loop_above:
        # One run (it is slow) under the RSS sampler, which costs a GIL-bound loop next to nothing.
        with PeakRss() as loop_memory:
            start, cpu_start = time.perf_counter(), time.process_time()
            reference = re_ranking_single(dist.numpy(), 20, 6, 0.3)
            loop_time, loop_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        loop_peak = loop_memory.delta_mb
        loop_times[n] = loop_time
        delta = float(np.abs(reference - kernel.numpy()).max())
        loop_text = f"{loop_time:8.2f} s wall, {loop_cpu:6.2f} s CPU (RSS delta {loop_peak:5.0f} MB)"
    else:
        # The loop cost grows roughly as N^2 (its N x N passes) times the per-row Python work:
        # extrapolated from the largest measured size, clearly not measured.
        base = max(loop_times) if loop_times else None
        loop_time = loop_times[base] * (n / base) ** 2 if base else float("nan")
        delta = float("nan")
        loop_text = f"~{loop_time:7.1f} s EXTRAPOLATED from N={base} as N^2"
    # On a shared machine wall time follows the neighbours' load; CPU time is the steadier ratio.
    cpu_ratio = f"{loop_cpu / kernel_cpu:7.1f}x" if n <= skip_loop_above else "n/a"
    return (f"| {n:>6} | {kernel_time:6.3f} s wall, {kernel_cpu:6.3f} s CPU | {memory_mb:5.0f} MB | {loop_text} | "
            f"{loop_time / kernel_time:7.1f}x | {cpu_ratio} | {delta:.2e} |")


def _best_ms(run, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def bench_stages(n: int, dim: int) -> list[str]:
    """The dense single-set kernel's stages at N, each timed alone (best of 5) on one thread and
    on the kernel's threads (torch's thread count), and two torch primitives for scale."""
    k1, k2 = 20, 6
    cpu = torch.device("cpu")
    dist = euclidean_distance(clustered_features(n, dim)).contiguous()
    budget = 1024.0
    with Workers(1) as inline:
        rank, scale = dense_rank(dist, k1 + 1, budget, "dist", inline)
        pair_dist = normalised_gather(dist, scale)
        v_index, v_value = encode(rank, pair_dist, k1, k2, budget, inline)
    row_offset = torch.full((n + 1,), n * n, dtype=torch.long)
    row_offset[:n] = torch.arange(n) * n
    col_offset = torch.full((n + 1,), n * n, dtype=torch.long)
    col_offset[:n] = torch.arange(n)

    def jaccard(workers: Workers) -> None:
        storage = torch.zeros(n * n + 1)
        pair_overlaps(v_index, v_value, n, row_offset, col_offset, storage, budget, workers, upper=True)
        mirror_upper(storage[:n * n].view(n, n), workers)

    length = torch.bincount(v_index[v_index < n], minlength=n).double()
    visits = int((length * (length + 1) / 2).sum())
    # Each stage runs as the kernel runs it: through Workers.run, on threads with one intra-op
    # thread each (the whole call does that itself).
    stages = [("ranking (k1 + 1 nearest per row, column scale)",
               lambda workers: dense_rank(dist, k1 + 1, budget, "dist", workers)),
              ("k-reciprocal sets, expansion, weights, local QE",
               lambda workers: encode(rank, pair_dist, k1, k2, budget, workers)),
              (f"Jaccard sums ({visits:,} visits, a <= b) + mirror", jaccard)]
    names = ["whole call", *(name for name, _ in stages)]
    threads = torch.get_num_threads()
    columns = []
    for count in sorted({1, threads}):
        torch.set_num_threads(count)  # this script's own thread: the Workers below take its count
        with Workers() as workers:
            columns.append([_best_ms(lambda: k_reciprocal_rerank_single(dist, k1, k2, 0.3, workers=workers)),
                            *(_best_ms(lambda run=run: workers.run(cpu, run, workers)) for _, run in stages)])
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, n * n, (visits,), generator=generator)
    values = torch.rand(visits, generator=generator)
    output = torch.zeros(n * n)
    with Workers() as workers:  # one intra-op thread
        primitives = [(f"torch.topk(D, {k1 + 1}) over the N x N matrix",
                       _best_ms(lambda: workers.run(cpu, torch.topk, dist, k1 + 1, dim=1, largest=False))),
                      (f"scatter_add_ of {visits:,} random targets into N x N",
                       _best_ms(lambda: workers.run(cpu, output.scatter_add_, 0, targets, values)))]
    heads = " | ".join(f"ms, {count} thread{'s' if count > 1 else ''}" for count in sorted({1, threads}))
    lines = [f"\n## stages of the dense kernel at N = {n} (best of 5, each stage timed alone)",
             f"| part | {heads} |", "|:--|" + "--:|" * len(columns)]
    for row, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(f"{column[row]:.1f}" for column in columns) + " |")
    lines.append("| rest (blend, checks) | " + " | ".join(f"{column[0] - sum(column[1:]):.1f}" for column in columns)
                 + " |")
    lines += [f"| for scale, one thread: {name} | {ms:.1f} |" + " |" * (len(columns) - 1) for name, ms in primitives]
    return lines


def bench_bounded(n: int, dim: int, top_m: int) -> str:
    features = clustered_features(n, dim, seed=1)
    with PeakRss() as memory:
        start = time.perf_counter()
        index, _ = k_reciprocal_rerank_topm(features, 20, 6, 0.3, top_m=top_m, chunk=1024,
                                            memory_budget_mb=1024)
        elapsed = time.perf_counter() - start
    return f"| {n:>6} | {features.shape[1]} | {top_m} | {elapsed:8.1f} s | {memory.delta_mb:7.0f} MB | {tuple(index.shape)} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[371, 2000, 5000])
    parser.add_argument("--skip-loop-above", type=int, default=10**9,
                        help="do not run the loop reference above this N; extrapolate it (labelled)")
    parser.add_argument("--bounded", type=int, nargs="*", default=[10000, 70000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--top-m", type=int, default=100)
    parser.add_argument("--stages", type=int, nargs="*", default=[],
                        help="also print the dense kernel's stage times (and two torch primitives) at these N")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); the dense kernel runs its row chunks "
                             "on this many Python threads, each op on one")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"k1=20 k2=6 lambda=0.3, clustered random features D={args.dim}")
    print("\n## dense: batched kernel vs plain-loop reference (single set, N x N)")
    print("|      N | kernel (best of 3) | kernel mem | loop reference | speed-up (wall) | speed-up (CPU) | max abs diff |")
    print("|-------:|:-------------------|-----------:|:---------------|----------------:|---------------:|-------------:|")
    loop_times: dict[int, float] = {}
    k_reciprocal_rerank_single(euclidean_distance(clustered_features(64, args.dim)), 20, 6, 0.3)  # warm-up
    for n in args.sizes:
        print(bench_dense(n, args.dim, args.skip_loop_above, loop_times), flush=True)
    for n in args.stages:
        print("\n".join(bench_stages(n, args.dim)), flush=True)
    print("\n## bounded top-M mode (never holds N x N)")
    print("|      N |   D |   M | time       | peak RSS delta | output |")
    print("|-------:|----:|----:|-----------:|---------------:|:-------|")
    for n in args.bounded:
        print(bench_bounded(n, args.dim, args.top_m), flush=True)
    print(f"\nmax RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
