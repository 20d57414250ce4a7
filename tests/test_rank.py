"""`jaguar rank`: each image's top-k list as Parquet or CSV (schema, order, values), atomic on
failure; `jaguar submit` refuses an all-pairs list above its size limit, pointing to `jaguar rank`."""

from __future__ import annotations

import csv

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from jaguar.cli.main import main
from jaguar.config import PostConfig
from jaguar.errors import MissingInputError
from jaguar.retrieval import rank as rank_module
from jaguar.core.features import FeatureSet
from jaguar.retrieval.post.dense import final_distance
from jaguar.retrieval.submission import submit_run
from jaguar.retrieval.submission import SubmissionError
from jaguar.run import RunDir
from tests.test_knn import clustered


def _run(tmp_path, n_identities=12, config=None) -> tuple[RunDir, FeatureSet]:
    embeddings, labels = clustered(n_identities=n_identities, per_identity=5, dim=8, duplicates=6, seed=1)
    features = FeatureSet([f"test_{i:04d}.png" for i in range(len(labels))], embeddings, labels)
    run = RunDir(tmp_path / "run")
    run.save_features("test", features)
    if config is not None:
        (run.path / "config.yaml").write_text(yaml.safe_dump(config))
    return run, features


def _expected(features, post, top_k):
    distance = final_distance(features, post).clone()
    distance.fill_diagonal_(float("inf"))
    values, index = distance.sort(dim=1, stable=True)
    return index[:, :top_k], values[:, :top_k]


@pytest.mark.parametrize("mode", ["dense", "topm"])
def test_rank_parquet_schema_order_and_values(tmp_path, capsys, mode):
    run, features = _run(tmp_path, config={"retrieval": {"mode": mode, "top_m": 20}})
    assert main(["rank", str(run.path), "--split", "test", "--top-k", "7"]) == 0
    assert mode in capsys.readouterr().out
    table = pq.read_table(run.ranks_path("test"))
    assert table.column_names == ["query", "rank", "gallery", "similarity"]
    assert [str(t) for t in table.schema.types] == ["string", "int32", "string", "float"]
    assert table.num_rows == len(features) * 7
    index, values = _expected(features, PostConfig(), 7)
    names = features.names
    assert table.column("query").to_pylist() == [names[i] for i in range(len(names)) for _ in range(7)]
    assert table.column("rank").to_pylist() == list(range(1, 8)) * len(names)
    assert table.column("gallery").to_pylist() == [names[j] for j in index.reshape(-1).tolist()]
    assert torch.allclose(torch.tensor(table.column("similarity").to_pylist()), 1 - values.reshape(-1), atol=1e-5)


def test_rank_csv_uses_the_chosen_post_processing(tmp_path):
    run, features = _run(tmp_path)
    out = tmp_path / "ranks.csv"
    (run.path / "post.json").write_text("")  # malformed post.json: a named error, nothing written
    assert main(["rank", str(run.path), "--split", "test", "-o", str(out)]) == 2
    assert not out.exists()
    (run.path / "post.json").unlink()
    assert main(["rank", str(run.path), "--split", "test", "--top-k", "1000", "-o", str(out)]) == 0
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(features) * (len(features) - 1)  # k capped at the other images
    first = [row["gallery"] for row in rows[:len(features) - 1]]
    assert first == [features.names[j] for j in _expected(features, PostConfig(), len(features) - 1)[0][0]]


def test_rank_format_picks_the_default_name_and_never_contradicts_the_output_name(tmp_path, capsys):
    run, features = _run(tmp_path)
    assert main(["rank", str(run.path), "--split", "test", "--top-k", "3"]) == 0
    parquet = run.ranks_path("test").read_bytes()
    # --format csv alone writes ranks_test.csv beside the Parquet file, which stays as it was
    assert main(["rank", str(run.path), "--split", "test", "--top-k", "3", "--format", "csv"]) == 0
    assert run.ranks_path("test", "csv").name == "ranks_test.csv"
    with open(run.ranks_path("test", "csv"), newline="") as handle:
        assert len(list(csv.DictReader(handle))) == len(features) * 3
    assert run.ranks_path("test").read_bytes() == parquet
    # an output name that says one format and --format the other: refused, nothing written
    capsys.readouterr()
    wrong = tmp_path / "lists.parquet"
    assert main(["rank", str(run.path), "--split", "test", "-o", str(wrong), "--format", "csv"]) == 2
    err = capsys.readouterr().err
    assert str(wrong) in err and "--format is csv" in err
    assert not wrong.exists()
    assert main(["rank", str(run.path), "--split", "test", "-o", str(tmp_path / "lists.PARQUET")]) == 0
    assert pq.read_table(tmp_path / "lists.PARQUET").num_rows == len(features) * min(100, len(features) - 1)


def test_a_truncated_feature_file_is_named_with_the_command_that_remakes_it(tmp_path, capsys):
    run, _ = _run(tmp_path)
    path = run.features_path("test")
    path.write_bytes(path.read_bytes()[:100])
    assert main(["rank", str(run.path), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and f"jaguar extract {run.path} --split test --force" in err
    assert not run.ranks_path("test").exists()


def test_rank_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    run, features = _run(tmp_path)
    old = b"previous ranks"
    run.ranks_path("test").write_bytes(old)
    calls = []

    def failing_table(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(*args, **kwargs)

    import pyarrow as pa
    original = pa.table
    monkeypatch.setattr(pa, "table", failing_table)
    monkeypatch.setattr(rank_module, "QUERIES_PER_CHUNK", 7)  # the second chunk fails, after one was written
    with pytest.raises(OSError, match="disk full"):
        rank_module.rank_run(run, "test", top_k=3)
    monkeypatch.undo()
    assert run.ranks_path("test").read_bytes() == old
    assert [p.name for p in run.path.iterdir() if p.name.startswith(".")] == []


def test_rank_streams_in_chunks(tmp_path):
    run, features = _run(tmp_path)
    index, values = _expected(features, PostConfig(), 4)
    path = tmp_path / "r.parquet"
    assert rank_module.write_ranks(path, features.names, index, values, queries_per_chunk=7) == len(features) * 4
    assert pq.ParquetFile(path).num_row_groups == -(-len(features) // 7)
    assert pq.read_table(path).column("rank").to_pylist() == [1, 2, 3, 4] * len(features)


def test_submit_refuses_a_pair_list_above_the_limit(tmp_path):
    run, features = _run(tmp_path, n_identities=2)
    names = features.names
    rows = [f"p{q}_{g},{names[q]},{names[g]}" for q in range(len(names)) for g in range(len(names)) if q != g]
    (tmp_path / "test.csv").write_text("\n".join(["row_id,query_image,gallery_image"] + rows))  # no final newline
    with pytest.raises(SubmissionError, match=r"90 pair rows.*jaguar rank"):
        submit_run(run, tmp_path / "test.csv", max_rows=89)
    assert not run.submission_path.exists()
    assert submit_run(run, tmp_path / "test.csv", max_rows=90).rows == 90
    # the size check reads the file first: a missing pair list is named as the reader names it
    with pytest.raises(MissingInputError, match=r"pair list .*nope\.csv does not exist .*row_id,query_image"):
        submit_run(run, tmp_path / "nope.csv")
