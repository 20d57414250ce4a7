"""The open-set commands on a tiny trained synthetic run: 6 identities trained on, 2 left out as
unseen. calibrate -> identify (CSV, review page, unreadable photos named) -> enroll -> gallery.
The model is too small to identify well (the synthetic open-set figures are measured by
benchmarks/openset_synth.py); these tests check what must hold whatever its quality."""

from __future__ import annotations

import csv
import html
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jaguar.cli.main import main
from jaguar.retrieval.openset.photos import PhotoEmbedder
from jaguar.run import RunDir

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny_cpu.py")
UNSEEN = ("Oxum", "Saseka")  # left out of training (3 and 15 images in this synthetic set)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def field(tmp_path_factory) -> dict:
    """Synthetic photos in folders per identity (known/ trained on, unseen/ not), the trained run."""
    from jaguar.data.prep import prepare
    from jaguar.data.synth import make_synthetic

    root = tmp_path_factory.mktemp("field")
    raw = make_synthetic(root / "raw", identities=8, train_images=96, test_images=8, size=64, workers=1)
    for row in csv.DictReader(open(raw / "train.csv", newline="")):
        side = "unseen" if row["ground_truth"] in UNSEEN else "known"
        (root / side / row["ground_truth"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(raw / "train" / row["filename"], root / side / row["ground_truth"] / row["filename"])
    prepare(root / "known", root / "shards", workers=1)
    run = root / "run"
    result = subprocess.run([sys.executable, "-m", "jaguar.cli.main", "train", TINY, f"data.shards={root / 'shards'}",
                             f"run.dir={run}", "train.epochs=4", "model.img_size=[48,96]", "data.val_fraction=0.25",
                             "train.eval_every=4"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "run": RunDir(run)}


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path, newline="")))


def test_photos_are_embedded_exactly_as_extraction_embeds_them(field):
    """A training photo read from its file gets the embedding `jaguar extract` gave its shard copy."""
    run = field["run"]
    assert main(["calibrate", str(run.path)]) == 0  # extracts train and val features on the way
    train = run.load_features("train")
    photos = [next((field["root"] / "known").rglob(name)) for name in train.names[:3]]
    embedded = PhotoEmbedder(run).embed(photos)
    assert not embedded.problems
    assert torch.allclose(embedded.embeddings, train.select(train.names[:3]).embeddings, atol=1e-5)


def test_calibrate_identify_and_the_review_page(field, tmp_path, capsys):
    run, root = field["run"], field["root"]
    assert main(["calibrate", str(run.path), "--folds", "3"]) == 0
    calibration = run.load_calibration()
    assert calibration.folds == 3 and calibration.figures.num_known > 0 and calibration.figures.num_unknown > 0
    for value in (calibration.figures.known_accuracy, calibration.figures.unknown_accuracy, calibration.figures.balanced_accuracy):
        assert 0.0 <= value <= 1.0
    assert calibration.figures.balanced_accuracy >= 0.5  # deciding everything "new" scores 0.5: the sweep includes it
    assert "balanced accuracy" in capsys.readouterr().out

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a picture")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out" / "identify.csv"
    photos = [root / "unseen" / "Oxum", root / "known" / "Marcela", bad, empty, tmp_path / "absent.png"]
    code = main(["identify", str(run.path), *map(str, photos), "--top-k", "3", "-o", str(out)])
    assert code == 1  # some photos could not be read: the rest are identified, the status says so
    err = capsys.readouterr().err
    for item in (bad, empty, tmp_path / "absent.png"):
        assert str(item) in err
    rows = _rows(out)
    expected = sorted(str(p) for folder in photos[:2] for p in folder.iterdir())
    assert sorted({row["photo"] for row in rows}) == expected
    assert len(rows) == 3 * len(expected)
    by_photo: dict[str, list[dict]] = {}
    for row in rows:
        by_photo.setdefault(row["photo"], []).append(row)
    for candidates in by_photo.values():
        assert [int(r["rank"]) for r in candidates] == [1, 2, 3]
        scores = [float(r["score"]) for r in candidates]
        assert scores == sorted(scores, reverse=True)
        decision = candidates[0]["decision"]
        assert {r["decision"] for r in candidates} == {decision}
        if scores[0] >= calibration.figures.threshold + 1e-6:
            assert decision == f"known: {candidates[0]['individual']}"
        elif scores[0] < calibration.figures.threshold - 1e-6:
            assert decision == "new individual"
    assert not {r["individual"] for r in rows} & set(UNSEEN)  # unseen identities are nobody's candidates

    page = out.parent / "identify_review" / "index.html"
    text = page.read_text()
    assert "could not be read" in text and html.escape(str(bad)) in text
    images = [part.split('"')[0] for part in text.split('src="')[1:]]
    assert len(images) >= len(expected)
    for source in images:
        assert not source.startswith(("/", "http")) and (page.parent / source).is_file()


def test_enrol_then_identify_the_new_individual(field, tmp_path, capsys):
    run, root = field["run"], field["root"]
    if not run.has_calibration():
        assert main(["calibrate", str(run.path)]) == 0
    saseka = sorted((root / "unseen" / "Saseka").iterdir())
    name = "<b>Saseka</b> & co"  # markup in a name must be shown as text
    assert main(["enroll", str(run.path), "--name", name, str(saseka[0]), str(saseka[1])]) == 0
    capsys.readouterr()
    assert main(["gallery", str(run.path)]) == 0
    listing = capsys.readouterr().out
    assert [line.split() for line in listing.splitlines() if line.startswith(name)] == [name.split() + ["2", "enrolled"]]
    enrolled = run.load_enrolled()
    assert enrolled.label_names == {0: name} and len(enrolled) == 2

    # all or nothing: a taken name, a bad photo or a photo already enrolled leave the gallery as it was
    before = run.enrolled_path.read_bytes()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    assert main(["enroll", str(run.path), "--name", "Marcela", str(saseka[2])]) == 2
    assert main(["enroll", str(run.path), "--name", "Other", str(saseka[2]), str(bad)]) == 2
    assert main(["enroll", str(run.path), "--name", "Again", str(saseka[0])]) == 2
    err = capsys.readouterr().err
    assert "already a training identity" in err and str(bad) in err and "already in the gallery" in err
    assert run.enrolled_path.read_bytes() == before

    # the enrolled photos' own embeddings are in the gallery: as queries they match it exactly
    from jaguar.retrieval.openset.identify import individual_scores, load_gallery

    gallery = load_gallery(run)
    queries = PhotoEmbedder(run).embed(saseka[:2]).embeddings
    scores = individual_scores(queries, gallery, "max")
    assert gallery.individuals[int(scores.argmax(dim=1)[0])] == name
    assert scores[:, gallery.individuals.index(name)].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    out = tmp_path / "after.csv"
    assert main(["identify", str(run.path), str(root / "unseen" / "Saseka"), "-o", str(out), "--top-k", "8"]) == 0
    rows = _rows(out)
    assert {r["individual"] for r in rows} >= {name}  # the new individual is now a candidate of every photo
    assert all(sum(r["individual"] == name for r in rows if r["photo"] == p) == 1 for p in {r["photo"] for r in rows})
    page = (tmp_path / "after_review" / "index.html").read_text()
    assert html.escape(name) in page and name not in page


def test_unknown_run_and_no_photos_are_clear_errors(field, tmp_path, capsys):
    assert main(["identify", str(tmp_path / "no-run"), str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["identify", str(field["run"].path), str(empty)]) == 2
    assert f"{empty}: folder holds no photos" in capsys.readouterr().err
    assert main(["gallery", str(tmp_path)]) == 2
    assert "not a trained run folder" in capsys.readouterr().err


def test_two_enrolments_into_one_gallery_lose_no_individual(field, tmp_path):
    """Two `jaguar enroll` at once: the second waits for the gallery's lock (JAGUAR_LOCK_WAIT) and
    reads the gallery the first wrote, so both individuals are in it; without waiting it refuses,
    naming the holder, and the gallery is unchanged."""
    run, root = field["run"], field["root"]
    oxum = sorted((root / "unseen" / "Oxum").iterdir())
    before = set(run.load_enrolled().label_names.values()) if run.has_enrolled() else set()
    env = {**__import__("os").environ, "JAGUAR_LOCK_WAIT": "300", "PYTHONPATH": str(ROOT)}
    names = ["=HYPERLINK(\"http://x\")", "Second"]
    processes = [subprocess.Popen([sys.executable, "-m", "jaguar.cli.main", "enroll", str(run.path), "--name", name,
                                   str(photo)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for name, photo in zip(names, oxum)]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert set(run.load_enrolled().label_names.values()) == before | set(names)

    gallery = run.enrolled_path.read_bytes()
    with run.gallery_lock("jaguar enroll"):
        assert main(["enroll", str(run.path), "--name", "Third", str(oxum[2])]) == 2
    assert run.enrolled_path.read_bytes() == gallery
    # the formula-like name is listed as text in identify.csv
    out = tmp_path / "formula.csv"
    assert main(["identify", str(run.path), str(oxum[0]), "-o", str(out), "--top-k", "3"]) == 0
    cells = [row["individual"] for row in _rows(out)]
    assert "'" + names[0] in cells and names[0] not in cells
