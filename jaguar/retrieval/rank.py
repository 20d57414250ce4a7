"""Ranked-list output for galleries of any size (`jaguar rank`): every query's top-k gallery images
with their final similarity and rank, written as Parquet (pyarrow) or CSV in chunks of queries,
atomically. The challenge's all-pairs submission stays with `jaguar submit`; this is what a
catalogue of a hundred thousand images needs instead.

A split's images search each other (all-vs-all, the query itself excluded), post-processed with
the run's chosen settings (tune-post; raw cosine without it; fused with the split's local matches,
RUN/local/<split>.safetensors, when tune-post chose a fusion: the similarity column is then the fused
probability), in top-M form above the dense threshold (`retrieval.mode`; jaguar.retrieval.post.search
decides) and from the N x N matrix below it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from jaguar.config import Config, PostConfig
from jaguar.errors import JaguarError
from jaguar.formats import spreadsheet_cell
from jaguar.io import atomic_file
from jaguar.core.evaluator import ranked_basis
from jaguar.retrieval.post.local_evidence import run_fusion
from jaguar.retrieval.post.search import final_ranking
from jaguar.run import RANK_FORMATS as FORMATS, RunDir

COLUMNS = ("query", "rank", "gallery", "similarity")
QUERIES_PER_CHUNK = 4096  # queries a written row group holds: O(chunk * k) memory for the writer


class RankError(JaguarError, ValueError):
    """A ranking that cannot be written (too few images, a bad k or format); the message says why."""


@dataclass
class RankResult:
    path: Path
    queries: int
    rows: int
    top_k: int
    mode: str  # "dense" or "topm"
    post: Optional[PostConfig]  # None: raw cosine, tune-post has not run
    basis: str  # what the order ranks (re-ranked top-M lists or every candidate's score)


def _schema():
    import pyarrow as pa

    return pa.schema([("query", pa.string()), ("rank", pa.int32()), ("gallery", pa.string()),
                      ("similarity", pa.float32())])


def write_ranks(path: str | Path, names: list[str], index: torch.Tensor, distance: torch.Tensor,
                fmt: str = "parquet", queries_per_chunk: Optional[int] = None) -> int:
    """Write rows (query, rank 1..k, gallery, similarity = 1 - final distance) for each query i =
    names[i] and its list index[i] (N x k), in query order then rank order, one chunk of queries at
    a time into a temporary file renamed to `path` when complete (a killed writer's temporary is
    removed by the next one). In a CSV, names starting with a formula character get a `'` in front
    (`jaguar.formats.spreadsheet_cell`). Returns the row count."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    if fmt not in FORMATS:
        raise RankError(f"output format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    queries_per_chunk = max(1, int(queries_per_chunk or QUERIES_PER_CHUNK))
    # a CSV is opened in spreadsheets: names made inert there (jaguar.formats' rule); Parquet keeps them
    name_array = pa.array([spreadsheet_cell(n) for n in names] if fmt == "csv" else names, pa.string())
    n_query, top_k = index.shape
    ranks = pa.array(torch.arange(1, top_k + 1, dtype=torch.int32).numpy())
    with atomic_file(Path(path)) as tmp:
        writer = pq.ParquetWriter(tmp, _schema()) if fmt == "parquet" else pa_csv.CSVWriter(tmp, _schema())
        try:
            for start in range(0, n_query, queries_per_chunk):
                stop = min(start + queries_per_chunk, n_query)
                query_rows = torch.arange(start, stop).repeat_interleave(top_k).numpy()
                table = pa.table({
                    "query": name_array.take(pa.array(query_rows)),
                    "rank": pa.concat_arrays([ranks] * (stop - start)),
                    "gallery": name_array.take(pa.array(index[start:stop].reshape(-1).numpy())),
                    "similarity": pa.array((1 - distance[start:stop].reshape(-1)).numpy()),
                }, schema=_schema())
                writer.write_table(table)
        finally:
            writer.close()
    return n_query * top_k


def rank_run(run: RunDir, split: str, top_k: int = 100, output: str | Path | None = None,
             fmt: Optional[str] = None) -> RankResult:
    """Write the top-k lists of the run's `split` features to `output` (default: run.ranks_path(split,
    fmt)). fmt None takes the format the output's suffix names (.csv, .parquet), else Parquet.
    Raises RankError for k < 1, fewer than two images, or a --format the output's suffix contradicts."""
    run.require()
    named = {f".{name}": name for name in FORMATS}.get(Path(output).suffix.lower()) if output else None
    if fmt and named and fmt != named:
        raise RankError(f"output {output} names the {named} format but --format is {fmt}; give a file name "
                        f"ending in .{fmt}, or leave --format out")
    fmt = fmt or named or "parquet"
    output = Path(output) if output else run.ranks_path(split, fmt)
    features = run.load_features(split)
    if top_k < 1:
        raise RankError(f"--top-k must be >= 1, got {top_k}")
    if len(features) < 2:
        raise RankError(f"{run.features_path(split)} holds {len(features)} image(s); ranking needs two or more")
    config = run.load_config() if run.has_config() else Config()
    result = run.load_post() if run.has_post() else None
    post = result.chosen if result is not None else None
    fusion, local = run_fusion(run, result, split, features.names)
    top_k = min(top_k, len(features) - 1)
    ranking = final_ranking(features, post or PostConfig(), config.retrieval, fusion, local)
    lists = ranking.lists(top_k)
    rows = write_ranks(output, list(features.names), lists.index, lists.distance, fmt)
    basis = ranked_basis(max(top_k, ranking.top_m) if lists.reordered else None)
    if fusion is not None and lists.reordered:
        basis = (f"over fused top-{max(top_k, ranking.top_m)} lists (each image's top-{ranking.top_m} list joined "
                 f"with its shortlist, ordered by the fused score; the rest keep their global order)")
    return RankResult(output, len(features), rows, top_k, ranking.mode, post, basis)


def read_ranks(path: str | Path, names: list[str], batch_rows: int = 1 << 20) -> torch.Tensor:
    """The lists of a Parquet file `write_ranks` wrote, as Q x k indices into `names` (row i: the
    gallery of query names[i], rank order), read a batch of rows at a time: O(Q * k) memory, no
    per-row Python. Raises RankError naming the file when it cannot be read, its queries are not
    exactly `names`, a listed image is not among `names`, or its lists differ in length."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(path)
    if len(names) < 2:
        raise RankError(f"ranked lists need two or more images, got {len(names)}")
    name_array = pa.array(names, pa.string())
    queries, galleries, ranks = [], [], []
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=["query", "rank", "gallery"]):
            for column, out in (("query", queries), ("gallery", galleries)):
                found = pc.index_in(batch.column(column), value_set=name_array)
                if found.null_count:
                    unknown = batch.column(column).filter(pc.is_null(found))[0].as_py()
                    raise RankError(f"{path} lists {unknown!r} ({column}), which is not among the {len(names)} "
                                    f"images ranked; re-run `jaguar rank` on these features")
                out.append(found.to_numpy(zero_copy_only=False).astype(np.int64))
            ranks.append(batch.column("rank").to_numpy(zero_copy_only=False).astype(np.int64))
    except (OSError, pa.ArrowException) as err:
        raise RankError(f"{path} could not be read as `jaguar rank` output ({err}); re-run `jaguar rank`") from err
    query = np.concatenate(queries) if queries else np.zeros(0, np.int64)
    gallery = np.concatenate(galleries) if galleries else np.zeros(0, np.int64)
    rank = np.concatenate(ranks) if ranks else np.zeros(0, np.int64)
    per_query = np.bincount(query, minlength=len(names))
    top_k = int(per_query[0])
    if top_k < 1 or not np.all(per_query == top_k):
        short = int(np.argmin(per_query))
        raise RankError(f"{path} does not hold one list of equal length for each of the {len(names)} images "
                        f"(e.g. {names[short]!r} has {int(per_query[short])} rows, {names[0]!r} {top_k}); "
                        f"re-run `jaguar rank` on these features")
    if np.any(np.diff(query) < 0) or np.any(np.diff(rank.reshape(-1, top_k), axis=1) <= 0):
        order = np.lexsort((rank, query))  # written in (query, rank) order; another writer may not
        query, gallery, rank = query[order], gallery[order], rank[order]
    if not np.array_equal(rank.reshape(-1, top_k), np.broadcast_to(np.arange(1, top_k + 1), (len(names), top_k))):
        raise RankError(f"{path}: each list must hold ranks 1..{top_k} once; re-run `jaguar rank`")
    return torch.from_numpy(gallery.reshape(len(names), top_k))
