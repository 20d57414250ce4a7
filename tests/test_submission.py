"""Pair lists, the similarity map, submission writing/validation and the `jaguar score` CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from jaguar.cli.main import main
from jaguar.core.features import FeatureSet
from jaguar.config import PostConfig
from jaguar.formats import FormatError, read_pairs, read_submission, write_submission
from jaguar.retrieval.submission import SubmissionError, pair_similarities, similarity_from_distance

# Hand case of tests/test_metrics.py: identity-balanced mAP 5/12.
HAND_SIM = [[0.0, 0.9, 0.8, 0.1, 0.95], [0.2, 0.0, 0.9, 0.5, 0.0], [0.7, 0.1, 0.0, 0.6, 0.0],
            [0.3, 0.3, 0.3, 0.0, 0.0], [0.5, 0.4, 0.3, 0.2, 0.0]]
HAND_IDS = ["ana", "ana", "bo", "bo", "cy"]
NAMES = [f"test_{i:04d}.png" for i in range(5)]


def _write(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header] + rows) + "\n")
    return path


def _pair_list(tmp_path: Path, names: list[str] = NAMES) -> Path:
    rows = [f"r{q}_{g},{names[q]},{names[g]}" for q in range(len(names)) for g in range(len(names)) if q != g]
    return _write(tmp_path / "test.csv", "row_id,query_image,gallery_image", rows)


def _labels(tmp_path: Path) -> Path:
    return _write(tmp_path / "labels.csv", "filename,ground_truth", [f"{n},{i}" for n, i in zip(NAMES, HAND_IDS)])


def _hand_submission(tmp_path: Path, edit=None) -> Path:
    rows = [f"r{q}_{g},{HAND_SIM[q][g]}" for q in range(5) for g in range(5) if q != g]
    if edit:
        rows = edit(rows)
    return _write(tmp_path / "sub.csv", "row_id,similarity", rows)


def test_read_pairs(tmp_path):
    pairs = read_pairs(_pair_list(tmp_path))
    assert len(pairs) == 20 and pairs.row_ids[0] == "r0_1"
    assert (pairs.query_images[0], pairs.gallery_images[0]) == (NAMES[0], NAMES[1])
    assert pairs.images() == NAMES


def test_similarity_map_is_monotone_tie_free_and_in_range():
    rng = np.random.default_rng(0)
    dist = np.concatenate([rng.uniform(-0.3, 2.0, 5000), [1.0, np.nextafter(np.float32(1.0), np.float32(2.0))]])
    dist = dist.astype(np.float32)
    sim = similarity_from_distance(dist)
    assert sim.min() == 0.0 and sim.max() == 1.0
    order = np.argsort(dist, kind="stable")
    assert np.all(np.diff(sim[order]) <= 0)
    assert len(np.unique(sim)) == len(np.unique(dist))  # adjacent float32 values stay apart
    assert similarity_from_distance(torch.tensor([0.3, 0.3])).tolist() == [0.5, 0.5]
    with pytest.raises(SubmissionError, match="NaN"):
        similarity_from_distance(np.array([0.1, np.nan]))


def test_pair_similarities_cover_every_pair_in_order(tmp_path):
    pairs = read_pairs(_pair_list(tmp_path))
    row_ids, queries, galleries = pairs.row_ids, pairs.query_images, pairs.gallery_images
    torch.manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    # An extra image in the feature file that the pair list does not name is simply not used.
    features = FeatureSet(NAMES[::-1] + ["extra.png"], embeddings, torch.full((6,), -1))
    sim = pair_similarities(features, row_ids, queries, galleries, PostConfig())
    assert sim.shape == (5 * 4,) and sim.min() >= 0 and sim.max() <= 1
    by_name = dict(zip(features.names, embeddings))
    cosine = np.array([float(by_name[q] @ by_name[g]) for q, g in zip(queries, galleries)])
    assert np.all(np.argsort(-cosine, kind="stable") == np.argsort(-sim, kind="stable"))
    with pytest.raises(SubmissionError, match="r0_1 .*no features|no features.*r0_1"):
        pair_similarities(features.select(NAMES[1:]), row_ids, queries, galleries, PostConfig())


def test_write_submission_validates_before_writing(tmp_path):
    out = tmp_path / "submission.csv"
    write_submission(out, ["b", "a"], [0.25, 1.0], expected_row_ids=["a", "b"])
    assert out.read_text().splitlines() == ["row_id,similarity", "b,0.25", "a,1.0"]
    assert read_submission(out).row_ids == ["b", "a"]
    cases = [(["a", "a"], [0.1, 0.2], "duplicate row_id a"),
             (["a"], [0.1], "missing: b"),
             (["a", "b", "c"], [0.1, 0.2, 0.3], "not in the pair list: c"),
             (["a", "b"], [0.1, float("nan")], "NaN or infinite similarity at row_id b"),
             (["a", "b"], [1.5, -0.1], r"outside \[0, 1\] at row_id a=1.5, b=-0.1")]
    for row_ids, values, message in cases:
        target = tmp_path / "never.csv"
        with pytest.raises(FormatError, match=message):
            write_submission(target, row_ids, values, expected_row_ids=["a", "b"])
        assert not target.exists()


def test_score_cli_hand_value_and_json(tmp_path, capsys):
    json_out = tmp_path / "score.json"
    code = main(["score", str(_hand_submission(tmp_path)), "--test-csv", str(_pair_list(tmp_path)),
                 "--labels", str(_labels(tmp_path)), "--verbose", "--json", str(json_out)])
    assert code == 0
    result = json.loads(json_out.read_text())
    assert result["mAP_balanced"] == pytest.approx(5 / 12)
    assert result["per_identity"] == {"ana": pytest.approx(5 / 12), "bo": pytest.approx(5 / 12)}
    printed = capsys.readouterr().out
    assert "0.416667" in printed and "ana: 0.416667" in printed


@pytest.mark.parametrize("edit,message", [
    (lambda rows: rows[:-1], "missing: r4_3"),
    (lambda rows: rows + ["r0_1,0.123"], "line 22 gives row_id 'r0_1' other values than line 2"),
    (lambda rows: rows + ["zz,0.5"], "not in the pair list: zz"),
    (lambda rows: rows[:4] + ["r1_0,nan"] + rows[5:], "NaN or infinite similarity at row_id r1_0"),
    (lambda rows: rows[:4] + ["r1_0,1.2"] + rows[5:], r"outside \[0, 1\] at row_id r1_0=1.2"),
    (lambda rows: rows[:4] + ["r1_0,high"] + rows[5:], "not a number at row_id r1_0 \\(line 6"),
])
def test_score_cli_rejects_bad_submissions(tmp_path, capsys, edit, message):
    code = main(["score", str(_hand_submission(tmp_path, edit)), "--test-csv", str(_pair_list(tmp_path)),
                 "--labels", str(_labels(tmp_path))])
    assert code == 2
    assert len(re.findall(message, capsys.readouterr().err)) == 1


def test_score_cli_rejects_bad_header_and_unknown_images(tmp_path, capsys):
    pairs, labels = _pair_list(tmp_path), _labels(tmp_path)
    header = _write(tmp_path / "h.csv", "id,score", ["r0_1,0.5"])
    assert main(["score", str(header), "--test-csv", str(pairs), "--labels", str(labels)]) == 2
    assert "wrong header 'id,score': expected 'row_id,similarity'" in capsys.readouterr().err
    short_labels = _write(tmp_path / "l2.csv", "filename,ground_truth", [f"{n},x" for n in NAMES[:4]])
    assert main(["score", str(_hand_submission(tmp_path)), "--test-csv", str(pairs),
                 "--labels", str(short_labels)]) == 2
    err = capsys.readouterr().err
    assert "missing from" in err and "r0_4 (test_0004.png)" in err
