"""Open-set identification: per-individual scores, the open-set figures, calibration by identity
hold-outs (group-aware) and enrolment, on constructed features whose answers are known exactly;
then the commands on a tiny trained synthetic run (tests/test_identify_run.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jaguar.formats import IDENTIFY_COLUMNS, write_identify
from jaguar.retrieval.openset.calibrate import CalibrationError, assign_folds, calibrate_features, identity_blocks
from jaguar.core.features import FeatureSet
from jaguar.retrieval.openset.identify import (Gallery, IdentifyError, check_individual_name, gallery_from_features,
                                       individual_scores, rank_individuals)
from jaguar.core.evaluator import MetricsError, open_set_figures, open_set_sweep
from jaguar.run import OpenSetCalibration, OpenSetFigures, RunDir, RunDirError

DIM = 16


def _unit(*pairs: tuple[int, float]) -> torch.Tensor:
    vector = torch.zeros(DIM)
    for axis, value in pairs:
        vector[axis] = value
    return torch.nn.functional.normalize(vector, dim=0)


def _features(rows: list[tuple[str, str, torch.Tensor]], meta: dict | None = None) -> FeatureSet:
    """FeatureSet of (image name, identity, embedding) rows; labels in order of first appearance."""
    label_of: dict[str, int] = {}
    for _, identity, _ in rows:
        label_of.setdefault(identity, len(label_of))
    return FeatureSet([r[0] for r in rows], torch.stack([r[2] for r in rows]),
                      torch.tensor([label_of[r[1]] for r in rows]), {v: k for k, v in label_of.items()}, meta or {})


def _calibration(threshold: float, aggregate: str = "max") -> OpenSetCalibration:
    return OpenSetCalibration(OpenSetFigures(threshold, 1.0, 1.0, 1.0, 1.0, 1.0, 1, 1), aggregate, 2, [1.0, 1.0], {},
                              {}, "test")


# ---------------------------------------------------------------- per-individual scores


def test_individual_scores_max_and_mean_of_top_n_exactly():
    gallery = Gallery(torch.eye(4)[:3], torch.tensor([0, 0, 1]), ["A", "B"], ["a1", "a2", "b1"])
    query = torch.tensor([[0.6, 0.8, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert individual_scores(query, gallery, "max").flatten().tolist() == pytest.approx([0.8, 0.0, 0.0, 1.0, 0.0, 0.0])
    # mean of the 2 best of A; B has one image: its mean is that image's similarity
    assert individual_scores(query, gallery, "mean_top2").flatten().tolist() == pytest.approx([0.7, 0.0, 0.0, 1.0, 0.0, 0.0])
    with pytest.raises(IdentifyError, match="aggregate 'median'"):
        individual_scores(query, gallery, "median")


def _loop_scores(queries, gallery, top_n):
    """The per-individual loop the vectorised scores replace: the reference."""
    similarity = queries.float() @ gallery.embeddings.float().T
    scores = torch.full((queries.shape[0], len(gallery.individuals)), float("-inf"))
    for index in range(len(gallery.individuals)):
        columns = torch.nonzero(gallery.individual == index).flatten()
        if columns.numel():
            scores[:, index] = similarity[:, columns].topk(min(top_n, columns.numel()), dim=1).values.mean(dim=1)
    return scores


@pytest.mark.parametrize("aggregate,top_n", [("max", 1), ("mean_top2", 2), ("mean_top3", 3), ("mean_top5", 5)])
def test_vectorised_individual_scores_equal_the_per_individual_loop_with_ties(aggregate, top_n, monkeypatch):
    import jaguar.retrieval.openset.identify as identify

    monkeypatch.setattr(identify, "_CHUNK_BYTES", 8 * 90 * 7)  # 7 queries a chunk: several chunks
    generator = torch.Generator().manual_seed(top_n)
    # Coarse features: many exact ties, within an individual and across individuals.
    embeddings = torch.randint(0, 3, (90, 4), generator=generator).float()
    individual = torch.randint(0, 12, (90,), generator=generator)  # individual 12 of 13 has no image
    individual[individual == 5] = 6
    gallery = Gallery(embeddings, individual, [f"id{i}" for i in range(13)], [f"r{i}" for i in range(90)])
    queries = torch.randint(0, 3, (40, 4), generator=generator).float()
    expected = _loop_scores(queries, gallery, top_n)
    scores = individual_scores(queries, gallery, aggregate)
    assert torch.isneginf(scores[:, 5]).all() and torch.isneginf(scores[:, 12]).all()
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)
    calibration = _calibration(float(expected.max(dim=1).values.median()), aggregate)
    monkeypatch.setattr(identify, "individual_scores", lambda q, g, a: _loop_scores(q, g, top_n))
    reference = rank_individuals(queries, gallery, calibration, top_k=4)
    monkeypatch.undo()
    monkeypatch.setattr(identify, "_CHUNK_BYTES", 8 * 90 * 7)
    decided = rank_individuals(queries, gallery, calibration, top_k=4)
    assert [[name for name, _ in c] for c, _ in decided] == [[name for name, _ in c] for c, _ in reference]
    assert [known for _, known in decided] == [known for _, known in reference]
    stable_order = torch.argsort(-expected, dim=1, stable=True)[:, :4]  # ties: the gallery's order
    assert [[name for name, _ in c] for c, _ in decided] == [[f"id{i}" for i in row] for row in stable_order.tolist()]


def test_rank_individuals_orders_candidates_and_decides_by_the_threshold():
    gallery = Gallery(torch.eye(3), torch.tensor([0, 1, 2]), ["A", "B", "C"], ["a", "b", "c"])
    # unit queries in 4-D; the gallery's 3 images are the first three axes (4th axis: nobody)
    queries = torch.nn.functional.normalize(torch.tensor([[0.9, 0.3, 0.0, 0.0], [0.0, 0.4, 0.5, 0.77]]), dim=1)
    gallery.embeddings = torch.eye(4)[:3]
    ranked = rank_individuals(queries, gallery, _calibration(0.7), top_k=2)
    (first, first_known), (second, second_known) = ranked
    assert [name for name, _ in first] == ["A", "B"] and first_known
    assert first[0][1] == pytest.approx(0.9 / math.hypot(0.9, 0.3))
    assert second[0][1] == pytest.approx(0.5 / math.sqrt(0.4 ** 2 + 0.5 ** 2 + 0.77 ** 2))
    assert [name for name, _ in second] == ["C", "B"] and not second_known  # 0.5 / |v| < 0.7


# ---------------------------------------------------------------- open-set figures


def test_open_set_figures_by_hand():
    # 4 known queries (3 named right, scores .9 .8 .4 .7 with the 4th wrong) and 2 unknown (.6 .3)
    scores = [0.9, 0.8, 0.4, 0.7, 0.6, 0.3]
    right = [True, True, True, False, False, False]
    known = [True, True, True, True, False, False]
    figures = open_set_figures(scores, right, known, threshold=0.65)
    assert figures.known_accuracy == pytest.approx(2 / 4)  # .9 and .8 accepted and right; .7 accepted but wrong
    assert figures.unknown_accuracy == pytest.approx(2 / 2)
    assert figures.balanced_accuracy == pytest.approx(0.75)
    assert figures.geometric_mean == pytest.approx(math.sqrt(0.5))
    assert figures.known_rank1 == pytest.approx(3 / 4)
    sweep = open_set_sweep(scores, right, known)
    assert [f.threshold for f in sweep][:-1] == sorted(set(scores))
    assert sweep[-1].unknown_accuracy == 1.0 and sweep[-1].known_accuracy == 0.0  # above the top: all new
    assert sweep[0].unknown_accuracy == 0.0 and sweep[0].known_accuracy == pytest.approx(0.75)
    with pytest.raises(MetricsError, match="absent from the gallery"):
        open_set_figures([0.5], [True], [False], 0.1)


# ---------------------------------------------------------------- calibration


def _four_identities(with_confused: bool) -> tuple[FeatureSet, FeatureSet]:
    """Identities A-D along axes 0-3; training images with small distinct offsets (axes 4-11),
    two validation images each (axes 12-15). With `with_confused`, A's second validation image
    looks like B (0.9 B + 0.1 A)."""
    names = "ABCD"
    train, val = [], []
    for i, identity in enumerate(names):
        for j in range(2):
            train.append((f"t_{identity}{j}", identity, _unit((i, 1.0), (4 + 2 * i + j, 0.1))))
        for j in range(2):
            val.append((f"v_{identity}{j}", identity, _unit((i, 1.0), (12 + j, 0.05 * (i + 1)))))
    if with_confused:
        val[1] = ("v_A1", "A", _unit((1, 0.9), (0, 0.1)))
    return _features(train, {"source": "weights.safetensors"}), _features(val)


def test_calibration_separates_known_and_unseen_perfectly_when_the_features_do():
    train, val = _four_identities(with_confused=False)
    calibration = calibrate_features(train, val, folds=4, seed=0)
    assert calibration.folds == 4
    assert (calibration.figures.num_known, calibration.figures.num_unknown) == (24, 8)  # 8 queries x 4 folds, 1 of 4 held out
    assert calibration.figures.known_accuracy == 1.0 and calibration.figures.unknown_accuracy == 1.0
    assert calibration.figures.balanced_accuracy == 1.0 and calibration.figures.geometric_mean == 1.0
    assert calibration.figures.known_rank1 == 1.0
    # the threshold sits in the gap between the unknown queries' best scores (0) and the known ones' (> 0.99)
    assert 0.0 < calibration.figures.threshold < 0.99
    assert calibration.aggregate == "max"  # every aggregate is perfect: the first is kept
    assert calibration.fold_balanced == [1.0] * 4
    assert set(calibration.curve) == {"threshold", "known_accuracy", "unknown_accuracy", "balanced_accuracy"}


def test_calibration_figures_with_one_confusing_image_are_exact():
    """A's second validation image looks like B (0.9 B + 0.1 A). As a known query (3 folds keep A)
    it is named B in the 2 folds that keep B (wrong); in the fold holding out B its best is A at
    0.1099, above every other unknown's best score (0, the axes are orthogonal): right. As an
    unknown (the fold holding out A) it is accepted as B at 0.99: wrong. So 22 of 24 known and
    7 of 8 unknown right, the threshold halfway between 0 and A's 0.1099."""
    train, val = _four_identities(with_confused=True)
    calibration = calibrate_features(train, val, folds=4, seed=0, aggregates=("max",))
    assert calibration.figures.known_accuracy == 22 / 24
    assert calibration.figures.unknown_accuracy == 7 / 8
    assert calibration.figures.balanced_accuracy == pytest.approx(43 / 48, abs=1e-12)
    assert calibration.figures.geometric_mean == pytest.approx(math.sqrt(22 / 24 * 7 / 8), abs=1e-12)
    assert calibration.figures.known_rank1 == 22 / 24
    score_a = float(_unit((1, 0.9), (0, 0.1)) @ _unit((0, 1.0), (4, 0.1)))
    assert calibration.figures.threshold == pytest.approx(score_a / 2, abs=1e-6)
    assert sorted(calibration.fold_balanced) == pytest.approx(sorted([0.5 * (6 / 6 + 1), 0.5 * (5 / 6 + 1),
                                                                       0.5 * (5 / 6 + 1), 0.5 * (6 / 6 + 1 / 2)]))


def test_a_calibration_that_cannot_tell_known_from_new_says_so():
    from jaguar.retrieval.openset.calibrate import describe, uninformative

    # Every validation photo of every identity is the same vector: no threshold separates the sides.
    train, val = _four_identities(with_confused=False)
    val.embeddings[:] = val.embeddings[0]
    collapsed = calibrate_features(train, val, folds=4, seed=0)
    assert (collapsed.figures.known_accuracy, collapsed.figures.unknown_accuracy, collapsed.figures.balanced_accuracy) == (0.0, 1.0, 0.5)
    assert "every validation photo 'new individual'" in uninformative(collapsed)
    assert uninformative(collapsed) in describe(collapsed)
    # A calibration that separates them carries no warning.
    good = calibrate_features(*_four_identities(with_confused=False), folds=4, seed=0)
    assert uninformative(good) == "" and "warning" not in describe(good)


def test_folds_hold_out_identities_joined_by_a_near_duplicate_group_together():
    train, val = _four_identities(with_confused=False)
    names_of = {n: train.label_names[label] for n, label in zip(train.names, train.labels.tolist())}
    names_of.update({n: val.label_names[label] for n, label in zip(val.names, val.labels.tolist())})
    blocks = identity_blocks(train, [["t_A0", "v_C1"], ["t_B0", "t_B1"]], names_of)
    assert blocks == [["A", "C"], ["B"], ["D"]]
    for seed in range(5):
        folds = assign_folds(blocks, folds=5, seed=seed)
        assert len(folds) == 3
        assert sorted(sorted(f) for f in folds) == [["A", "C"], ["B"], ["D"]]
    calibration = calibrate_features(train, val, [["t_A0", "v_C1"]], folds=5)
    assert calibration.folds == 3 and "1 joined" in calibration.held_out_groups


def test_calibration_needs_two_identities_and_labelled_validation():
    train, val = _four_identities(with_confused=False)
    only_a = train.select(["t_A0", "t_A1"])
    with pytest.raises(CalibrationError, match="at least 2 training identities"):
        calibrate_features(only_a, val)
    unlabelled = FeatureSet(val.names, val.embeddings, torch.full((len(val),), -1))
    with pytest.raises(CalibrationError, match="no labelled image"):
        calibrate_features(train, unlabelled)


def test_calibration_round_trips_through_the_run(tmp_path):
    train, val = _four_identities(with_confused=True)
    run = RunDir(tmp_path / "run")
    calibration = calibrate_features(train, val, folds=4)
    run.save_calibration(calibration)
    assert run.load_calibration() == calibration
    run.calibration_path.write_text('{"threshold": 0.5}')
    with pytest.raises(RunDirError, match="missing key"):
        run.load_calibration()


# ---------------------------------------------------------------- gallery and enrolment


def test_enrolled_individual_is_identified_from_its_other_photos():
    train, _ = _four_identities(with_confused=False)
    # E: a new individual along axis 14, enrolled from two photos; its other photos are near them
    enrolled = FeatureSet(["h1", "h2"], torch.stack([_unit((14, 1.0), (15, 0.1)), _unit((14, 1.0), (13, 0.1))]),
                          torch.tensor([0, 0]), {0: "E"}, {"thumbnails": {"h1": "h1", "h2": "h2"}})
    others = torch.stack([_unit((14, 1.0), (12, 0.2)), _unit((14, 1.0), (5, 0.15))])
    calibration = _calibration(0.5)
    before = rank_individuals(others, gallery_from_features(train), calibration, top_k=3)
    assert all(not known for _, known in before)  # no gallery individual is near: new individuals
    gallery = gallery_from_features(train, enrolled)
    after = rank_individuals(others, gallery, calibration, top_k=3)
    assert [(candidates[0][0], known) for candidates, known in after] == [("E", True), ("E", True)]
    assert gallery.counts() == {"A": 2, "B": 2, "C": 2, "D": 2, "E": 2}
    assert gallery.enrolled == {"E"} and gallery.examples(4) == ["thumb:h1", "thumb:h2"]
    assert gallery.examples(0) == ["shard:t_A0", "shard:t_A1"]


@pytest.mark.parametrize("name,problem", [("", "empty"), ("  ", "empty"), ("A", "already a training identity"),
                                          ("a", "already a training identity"), ("x\ny", "control character"),
                                          ("E", "already an enrolled individual")])
def test_enrolment_names_must_be_new_and_plain(name, problem):
    train, _ = _four_identities(with_confused=False)
    enrolled = FeatureSet(["h1"], torch.ones(1, DIM) / 4, torch.tensor([0]), {0: "E"})
    with pytest.raises(IdentifyError, match=problem):
        check_individual_name(name, gallery_from_features(train, enrolled))


def test_enrolment_names_are_kept_as_text_not_paths():
    train, _ = _four_identities(with_confused=False)
    assert check_individual_name(" ../../etc/<b>Jag</b> ", gallery_from_features(train)) == "../../etc/<b>Jag</b>"


def test_identify_csv_columns_and_rows(tmp_path):
    out = tmp_path / "identify.csv"
    write_identify(out, [("p/1.jpg", 1, "A", 0.91234567, "known: A"), ("p/1.jpg", 2, "B, the second", 0.5, "known: A")])
    lines = out.read_text().splitlines()
    assert lines[0] == ",".join(IDENTIFY_COLUMNS) == "photo,rank,individual,score,decision"
    assert lines[1:] == ["p/1.jpg,1,A,0.912346,known: A", 'p/1.jpg,2,"B, the second",0.500000,known: A']
    assert not list(tmp_path.glob(".*tmp"))  # written atomically: no temporary left behind


def test_thumbnail_keys_are_hashes_only(tmp_path):
    run = RunDir(tmp_path)
    assert run.thumbnail_path("abc123").name == "abc123.png"
    with pytest.raises(RunDirError):
        run.thumbnail_path("../x")


def test_threshold_above_every_score_keeps_every_query_new():
    """When deciding everything "new" is best, the chosen threshold must stay above the top score
    (moving it to a gap's middle must not accept the top query)."""
    from jaguar.retrieval.openset.calibrate import choose_threshold

    scores = np.array([0.9, 0.8])
    right, known = [False, False], [False, True]  # an unknown query on top, the known one named wrong
    sweep = open_set_sweep(scores, right, known)
    threshold = choose_threshold(sweep, scores)
    assert threshold > 0.9
    assert open_set_figures(scores, right, known, threshold).balanced_accuracy == 0.5
    # an ordinary gap: the threshold moves to its middle, deciding the queries as the sweep did
    sweep = open_set_sweep([0.9, 0.5], [True, False], [True, False])
    assert choose_threshold(sweep, np.array([0.9, 0.5])) == pytest.approx(0.7)


def test_calibrate_run_holds_out_identities_joined_by_the_splits_groups(tmp_path):
    """`jaguar calibrate` reads the near-duplicate groups the run's group-aware split recorded."""
    from jaguar.config import Config
    from jaguar.retrieval.openset.calibrate import calibrate_run
    from jaguar.run import SplitRecord

    train, val = _four_identities(with_confused=False)
    run = RunDir(tmp_path / "run")
    run.save_config(Config())
    run.save_features("train", train)
    run.save_features("val", val)
    run.save_split(SplitRecord(list(train.names), list(val.names), {0: 0, 1: 1, 2: 2, 3: 3},
                               groups=[["t_A0", "t_C1"]]))
    calibration = calibrate_run(run, folds=5)
    assert calibration.folds == 3 and "3 blocks of identities, 1 joined" in calibration.held_out_groups
    assert run.load_calibration() == calibration


def test_a_calibration_written_flat_before_the_figures_record_still_loads(tmp_path):
    """calibration.json of runs calibrated before OpenSetCalibration held an OpenSetFigures record:
    the figures at the threshold spelled out beside the rest."""
    import json

    run = RunDir(tmp_path)
    run.save_calibration(_calibration(0.42))
    nested = json.loads(run.calibration_path.read_text())
    flat = {**{k: v for k, v in nested.items() if k != "figures"}, **nested["figures"]}
    run.calibration_path.write_text(json.dumps(flat))
    assert run.load_calibration() == _calibration(0.42)

