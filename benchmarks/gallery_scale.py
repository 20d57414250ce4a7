"""Gallery scale: time and peak memory of the top-M retrieval path (kNN, tune-post's search,
re-ranking, the evaluator, `jaguar rank`, `jaguar report`) on clustered synthetic features, with
the dense path beside it where it fits. Prints figures (a Markdown table); not a test.

    python benchmarks/gallery_scale.py [--sizes 10000 50000 100000] [--tune-sizes 20000]
                                       [--dense-sizes 5000 10000] [--dim 256] [--stages ...]
    python benchmarks/gallery_scale.py --sizes 10000 100000 --stages report report_search \
                                       --tune-sizes --dense-sizes --end-to-end   # the report alone

report: `jaguar report` (build_report, what the CLI calls) on a run whose val and test features
both hold N labelled images, post.json set to raw cosine and `jaguar rank`'s lists of both splits
made before the clock starts (their time is in the note); features only, no shards (the grids
show captions). report_search: the same run without the ranked lists (the report searches them).

Each (stage, N) runs in a fresh process, so its peak RSS (ru_maxrss of the child) is its own; the
features (D = 256, ~10 images an identity, L2-normalised) are made in that process before the
clock starts. The machine's load average is printed with each row: it is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("knn_faiss", "knn_torch", "rerank_topm", "metrics_topm", "rank", "tune_post_topm", "end_to_end",
          "dense_metrics", "dense_tune_post", "report", "report_search")


def clustered(n: int, dim: int, seed: int = 0):
    """n L2-normalised features around n/10 identity centres and their labels; per-dimension noise
    2 times the centres' spread (within-identity cosine ~0.2, between ~0 +- 1/sqrt(D)), so
    retrieval is neither trivial nor hopeless."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) // 10
    centres = torch.randn(int(labels.max()) + 1, dim, generator=generator)
    features = centres[labels] + 2.0 * torch.randn(n, dim, generator=generator)
    return torch.nn.functional.normalize(features, dim=1), labels


def _feature_set(n: int, dim: int, seed: int = 0):
    from jaguar.core.features import FeatureSet

    embeddings, labels = clustered(n, dim, seed)
    return FeatureSet([f"img_{seed}_{i:07d}.png" for i in range(n)], embeddings, labels)


def _report_run(path: Path, n: int, dim: int, top_m: int, ranked: bool) -> None:
    """The run `jaguar report` is timed on: val and test features of n labelled images each,
    post.json set to raw cosine (nothing searched), and `jaguar rank`'s lists of both when ranked."""
    from jaguar.config import Config, PostConfig
    from jaguar.retrieval.rank import rank_run
    from jaguar.run import PostResult, RunDir

    run = RunDir(path)
    run.save_features("val", _feature_set(n, dim))
    run.save_features("test", _feature_set(n, dim, seed=1))  # labels stored with them: test-side figures too
    config = Config()
    config.retrieval.top_m = top_m
    run.save_config(config)
    run.save_post(PostResult(PostConfig(), [], val_size=n, searched=False))
    if ranked:
        for split in ("val", "test"):
            rank_run(run, split, top_k=top_m)


def run_stage(stage: str, n: int, dim: int, top_m: int) -> dict:
    """One stage at one size, in this process: {"seconds", "note"}."""
    from jaguar.config import Config, PostConfig, RetrievalConfig
    from jaguar.core.knn import knn
    from jaguar.core.evaluator import evaluate
    from jaguar.core.evaluator_ranked import RankedEvaluator
    from jaguar.retrieval.post.tune import tune_post
    from jaguar.retrieval.rank import rank_run
    from jaguar.retrieval.post.topm import final_topm
    from jaguar.run import RunDir

    features = _feature_set(n, dim)
    note = ""
    start = time.perf_counter()
    if stage in ("knn_faiss", "knn_torch"):
        knn(features.embeddings, k=top_m, exclude_self=True, backend=stage[4:])
    elif stage == "rerank_topm":
        final_topm(features, PostConfig(rerank=True, k1=20, k2=6, lambda_value=0.3), top_m)
    elif stage == "metrics_topm":
        lists = knn(features.embeddings, k=top_m, exclude_self=True).index
        start = time.perf_counter()
        metrics = RankedEvaluator(lists, features.embeddings, features.labels).evaluate(lists)
        note = f"mAP_balanced {metrics.mAP_balanced:.4f}, rank-1 {metrics.rank1:.4f}"
    elif stage == "tune_post_topm":
        chosen, _ = tune_post(features, RetrievalConfig(mode="topm", top_m=top_m))
        note = f"chosen {chosen.to_dict()}"
    elif stage in ("rank", "end_to_end"):
        with tempfile.TemporaryDirectory() as tmp:
            run = RunDir(Path(tmp) / "run")
            run.save_features("test", features)
            config = Config()
            config.retrieval.top_m = top_m
            if stage == "end_to_end":  # post-processing tuned on a separate 20,000-image validation set
                validation = _feature_set(min(n, 20000), dim, seed=1)
                run.save_features("val", validation)
                run.save_config(config)
                from jaguar.retrieval.post.tune import tune_post_run

                start = time.perf_counter()
                post = tune_post_run(run)
                note = f"tune-post {time.perf_counter() - start:.0f} s, chosen {post.chosen.to_dict()}; "
            else:
                run.save_config(config)
                start = time.perf_counter()
            if stage == "rank":
                result = rank_run(run, "test", top_k=100)
                note += f"rank {result.rows:,} rows ({result.mode})"
            else:  # what `jaguar rank` does (lists, then the file), and exact metrics from the same lists
                from jaguar.retrieval.rank import write_ranks
                from jaguar.retrieval.post.topm import final_topm

                clock = time.perf_counter()
                lists = final_topm(features, post.chosen, max(100, top_m))
                lists_s, clock = time.perf_counter() - clock, time.perf_counter()
                rows = write_ranks(Path(tmp) / "ranks.parquet", list(features.names), lists.index[:, :100],
                                   lists.distance[:, :100])
                write_s, clock = time.perf_counter() - clock, time.perf_counter()
                metrics = RankedEvaluator(lists.index, lists.base, features.labels).evaluate(lists.index,
                                                                                             lists.reordered)
                note += (f"top-100 lists {lists_s:.0f} s, {rows:,} rows written {write_s:.0f} s, exact metrics "
                         f"{time.perf_counter() - clock:.0f} s: test mAP_balanced {metrics.mAP_balanced:.4f} "
                         f"{metrics.describe_basis()}")
    elif stage == "dense_metrics":
        metrics = evaluate(features.embeddings @ features.embeddings.T, features.labels, kind="similarity")
        note = f"mAP_balanced {metrics.mAP_balanced:.4f}"
    elif stage == "dense_tune_post":
        chosen, _ = tune_post(features, RetrievalConfig(mode="dense"))
        note = f"chosen {chosen.to_dict()}"
    elif stage in ("report", "report_search"):
        import multiprocessing

        from jaguar.report import build_report

        with tempfile.TemporaryDirectory() as tmp:
            # made in a child process, so that `jaguar rank`'s peak memory is not counted as the report's
            setup = multiprocessing.get_context("spawn").Process(
                target=_report_run, args=(Path(tmp) / "run", n, dim, top_m, stage == "report"))
            setup.start()
            setup.join()
            if setup.exitcode:
                raise SystemExit(f"making the run for {stage} failed (exit code {setup.exitcode})")
            note = f"run made in {time.perf_counter() - start:.0f} s before the clock; " if stage == "report" else ""
            start = time.perf_counter()
            index = build_report(RunDir(Path(tmp) / "run"))
            seconds = time.perf_counter() - start
            figures = sorted(p.name for p in index.parent.glob("*.png"))
            lists_read = index.read_text().count("lists of ranks_")
            note += f"{len(figures)} figures; lists read from `jaguar rank`'s files for {lists_read} of 2 splits"
            return {"seconds": seconds, "note": note}
    else:
        raise SystemExit(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "note": note}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000, 100000])
    parser.add_argument("--tune-sizes", type=int, nargs="*", default=[20000])
    parser.add_argument("--dense-sizes", type=int, nargs="*", default=[5000, 10000])
    parser.add_argument("--stages", nargs="+", default=["knn_faiss", "knn_torch", "rerank_topm", "metrics_topm",
                                                        "rank"])
    parser.add_argument("--end-to-end", type=int, nargs="*", default=[100000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--top-m", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--one", nargs=2, metavar=("STAGE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = run_stage(args.one[0], int(args.one[1]), args.dim, args.top_m)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    # The smallest size and the tune-post figures first: on a shared machine the big ones may not finish.
    jobs = [(stage, n) for n in args.sizes[:1] for stage in args.stages]
    jobs += [("dense_metrics", n) for n in args.dense_sizes] + [("dense_tune_post", n) for n in args.dense_sizes[:1]]
    jobs += [("tune_post_topm", n) for n in args.tune_sizes]
    jobs += [(stage, n) for n in args.sizes[1:] for stage in args.stages] + [("end_to_end", n) for n in args.end_to_end]
    print(f"{os.cpu_count()} CPUs, D = {args.dim}, M = {args.top_m}")
    print("| stage | N | wall | peak RSS | load (1 min) before / after | note |")
    print("|:--|--:|--:|--:|:--|:--|")
    for stage, n in jobs:
        load = os.getloadavg()[0]
        command = [sys.executable, __file__, "--one", stage, str(n), "--dim", str(args.dim), "--top-m", str(args.top_m)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            result = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
        except subprocess.TimeoutExpired:
            done, result = None, None
        if result is None:
            why = "timed out" if done is None else (done.stderr.strip().splitlines() or ["failed"])[-1]
            print(f"| {stage} | {n:,} | - | - | {load:.1f} | {why} |", flush=True)
            continue
        print(f"| {stage} | {n:,} | {result['seconds']:.1f} s | {result['peak_rss_mb']:,.0f} MB | "
              f"{load:.1f} / {os.getloadavg()[0]:.1f} | {result['note']} |", flush=True)


if __name__ == "__main__":
    main()
