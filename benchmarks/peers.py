"""jaguar against the tools its users would pick instead, on the same inputs, side by side: each
measurement is a fresh child process of this one (interleaved rounds, the order of the tools
rotated every round), timed and its peak memory read from the kernel. Prints figures; not a test.

    python benchmarks/peers.py --peers /tmp/peers-site [--eval-sizes 2000 10000 20000 30000]
        [--id-sizes 10000 50000 100000] [--queries 2000] [--rounds 3] [--peer-cap-gb 8]

Inputs: clustered synthetic features, D = 256, ~10 images an identity (seeded, the same in every
process). Tasks:
- evaluation, all-vs-all with the query itself excluded: torchreid's `evaluate_rank` (Python
  evaluator; its Cython one when `torchreid.reid.metrics.rank_cylib.rank_cy` imports) on the
  cosine-distance matrix, with each image its own camera so that only the query itself is
  removed; jaguar's `evaluate` on the same matrix, and `evaluate_embeddings` on the features
  (never holding N x N).
- identification, Q queries against a gallery of G images: wildlife-tools' `CosineSimilarity` +
  `KnnClassifier(k=1)`; jaguar's `rank_individuals` (aggregate "max", top-1 individual).
Answers are compared: mAP and rank-1 (evaluation), every query's top-1 individual (identification).

Peers are not jaguar's dependencies: install them without dependencies into a folder of their
own (`pip install --no-deps --target /tmp/peers-site torchreid wildlife-tools pandas
python-dateutil pytz tzdata six`), never into jaguar's environment; their modules are loaded from
that folder by path, without their packages' heavy `__init__` imports. A peer that is missing is
named and jaguar's figures are printed alone. A peer whose estimated peak memory passes
--peer-cap-gb at a size is skipped there, and the table says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIM = 256
PER_IDENTITY = 10


def features(n: int, seed: int):
    """n clustered unit features (float32, N x DIM) and their identities (int64), ~10 a identity."""
    import numpy as np

    rng = np.random.default_rng(seed)
    identities = max(n // PER_IDENTITY, 2)
    labels = rng.integers(0, identities, n)
    centres = rng.standard_normal((identities, DIM), dtype=np.float32)
    x = centres[labels] + 2.0 * rng.standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels.astype(np.int64)


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _load(path: Path, name: str, root: Path):
    """A peer's module from its file, its parent packages as empty stubs (their __init__ imports
    pull in what the peer's other features need)."""
    parts = name.split(".")
    for depth in range(1, len(parts)):
        package = ".".join(parts[:depth])
        if package not in sys.modules:
            stub = types.ModuleType(package)
            stub.__path__ = [str(root.joinpath(*parts[:depth]))]
            sys.modules[package] = stub
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_peer(peers: Path, tool: str):
    if tool.startswith("torchreid"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rank = _load(peers / "torchreid/reid/metrics/rank.py", "torchreid.reid.metrics.rank", peers)
        if tool == "torchreid-cython" and not rank.IS_CYTHON_AVAI:
            raise ImportError("torchreid's Cython evaluator (rank_cylib.rank_cy) is not built")
        return rank
    if str(peers) not in sys.path:
        sys.path.append(str(peers))  # after jaguar's environment: the peers' own dependencies (pandas)
    cosine = _load(peers / "wildlife_tools/similarity/cosine.py", "wildlife_tools.similarity.cosine", peers)
    sys.modules["wildlife_tools.similarity"].CosineSimilarity = cosine.CosineSimilarity
    classifier = _load(peers / "wildlife_tools/inference/classifier.py", "wildlife_tools.inference.classifier",
                       peers)
    return cosine.CosineSimilarity, classifier.KnnClassifier


def worker(tool: str, task: str, size: int, queries: int, peers: Path) -> dict:
    """One measurement in this (fresh) process: inputs built first, then the tool timed."""
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    peer = load_peer(peers, tool) if not tool.startswith("jaguar") else None
    # jaguar's modules imported before the clock starts, as the peers' are
    from jaguar.retrieval.openset.identify import Gallery, rank_individuals
    from jaguar.core.evaluator import evaluate, evaluate_embeddings
    from jaguar.run import OpenSetCalibration, OpenSetFigures
    if task == "evaluation":
        x, labels = features(size, seed=size)
        distance = None
        if tool != "jaguar-embeddings":
            distance = torch.from_numpy(x) @ torch.from_numpy(x).T
            distance = np.subtract(1.0, distance.numpy(), out=distance.numpy())
        baseline = rss_mb()
        started = time.perf_counter()
        if tool == "jaguar-embeddings":
            result = evaluate_embeddings(x, labels)
            answer = {"mAP": result.mAP, "rank1": result.rank1}
        elif tool == "jaguar":
            result = evaluate(distance, labels, kind="distance")
            answer = {"mAP": result.mAP, "rank1": result.rank1}
        else:
            cams = np.arange(size)
            cmc, mean_ap = peer.evaluate_rank(distance, labels, labels, cams, cams, max_rank=10,
                                              use_cython=(tool == "torchreid-cython"))
            answer = {"mAP": float(mean_ap), "rank1": float(cmc[0])}
    else:
        gallery_x, gallery_labels = features(size, seed=size)
        query_x, _ = features(queries, seed=size + 1)
        query_x = gallery_x[np.random.default_rng(0).integers(0, size, queries)] + 0.05 * query_x
        query_x /= np.linalg.norm(query_x, axis=1, keepdims=True)
        baseline = rss_mb()
        started = time.perf_counter()
        if tool == "jaguar":
            names = [str(i) for i in range(int(gallery_labels.max()) + 1)]
            gallery = Gallery(torch.from_numpy(gallery_x), torch.from_numpy(gallery_labels), names, [""] * size)
            calibration = OpenSetCalibration(OpenSetFigures(0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1, 1), "max", 2, [1.0, 1.0],
                                             {}, {}, "")
            ranked = rank_individuals(torch.from_numpy(query_x), gallery, calibration, top_k=1)
            top1 = [int(candidates[0][0]) for candidates, _ in ranked]
        else:
            similarity_class, classifier_class = peer
            similarity = similarity_class()(query_x, gallery_x)["cosine"]
            top1 = [int(v) for v in classifier_class(k=1, database_labels=gallery_labels)(similarity)]
        answer = {"top1": hash(tuple(top1))}
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_above_inputs_mb": max(peak - baseline, 0.0), "answer": answer}


def peer_estimate_gb(tool: str, task: str, size: int, queries: int) -> float:
    """Peak bytes a peer needs at a size, from its algorithm (GB)."""
    if task == "evaluation":  # the matrix, argsort int64, gathered ids int64, matches int32/int64
        return size * size * (4 + 8 + 8 + 8) / 1e9
    return queries * size * (4 + 8 + 4) / 1e9  # float32 similarity, float64 copy, torch.tensor


def measure(tool: str, task: str, size: int, args) -> dict:
    command = [sys.executable, __file__, "--worker", tool, task, str(size), "--queries", str(args.queries),
               "--peers", str(args.peers)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=Path, default=Path("/tmp/peers-site"))
    parser.add_argument("--eval-sizes", type=int, nargs="*", default=[2000, 10000, 20000, 30000])
    parser.add_argument("--id-sizes", type=int, nargs="*", default=[10000, 50000, 100000])
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peer-cap-gb", type=float, default=8.0)
    parser.add_argument("--tools", nargs="*", help="only these tools (default: all)")
    parser.add_argument("--worker", nargs=3, metavar=("TOOL", "TASK", "SIZE"))
    args = parser.parse_args()
    if args.worker:
        tool, task, size = args.worker
        print(json.dumps(worker(tool, task, int(size), args.queries, args.peers)))
        return
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
          f"python {platform.python_version()}; medians of {args.rounds} interleaved rounds", flush=True)
    available = {}
    for tool in ("torchreid-python", "torchreid-cython", "wildlife-tools"):
        try:
            load_peer(args.peers, tool)
            available[tool] = ""
        except (ImportError, OSError, FileNotFoundError) as err:
            available[tool] = f"{type(err).__name__}: {err}"
            print(f"peer {tool} unavailable from {args.peers}: {err}; jaguar's figures alone for it", flush=True)
    plan = [("evaluation", size, ["jaguar", "jaguar-embeddings", "torchreid-python", "torchreid-cython"])
            for size in args.eval_sizes]
    plan += [("identification", size, ["jaguar", "wildlife-tools"]) for size in args.id_sizes]
    for task, size, tools in plan:
        runnable = []
        for tool in tools:
            if (tool in available and available[tool]) or (args.tools and tool not in args.tools):
                continue
            if tool not in ("jaguar", "jaguar-embeddings") and peer_estimate_gb(tool, task, size, args.queries) > args.peer_cap_gb:
                print(f"  {task} {size:>7,}: {tool} skipped (needs ~{peer_estimate_gb(tool, task, size, args.queries):.1f} GB "
                      f"> {args.peer_cap_gb} GB on a shared machine)", flush=True)
                continue
            if tool == "jaguar" and task == "evaluation" and size * size * 4 / 1e9 > 2.0:
                continue  # the input matrix alone passes 2 GB: jaguar-embeddings stands for jaguar there
            runnable.append(tool)
        results: dict[str, list[dict]] = {tool: [] for tool in runnable}
        for round_ in range(args.rounds):
            for tool in runnable[round_ % len(runnable):] + runnable[:round_ % len(runnable)]:
                results[tool].append(measure(tool, task, size, args))
        reference = None
        for tool in runnable:
            runs = [r for r in results[tool] if "error" not in r]
            if not runs:
                print(f"  {task} {size:>7,}: {tool:<18} failed: {results[tool][0]['error']}", flush=True)
                continue
            seconds = statistics.median(r["seconds"] for r in runs)
            memory = statistics.median(r["peak_above_inputs_mb"] for r in runs)
            answer = runs[0]["answer"]
            if reference is None:
                reference = (tool, seconds, memory, answer)
            same = all(abs(answer[k] - reference[3][k]) <= 1e-6 for k in answer) if answer.keys() == reference[3].keys() else False
            spread = f"{min(r['seconds'] for r in runs):.2f}-{max(r['seconds'] for r in runs):.2f}"
            print(f"  {task} {size:>7,}: {tool:<18} {seconds:8.2f} s ({spread}) {memory:8.0f} MB above inputs  "
                  f"time x{seconds / reference[1]:.2f} of {reference[0]}  answer {answer} "
                  f"{'same' if same else 'DIFFERS'}", flush=True)


if __name__ == "__main__":
    main()
