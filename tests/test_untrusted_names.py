"""Names read from data files stay inside their folder (or are refused naming the file and row), and identity
names never become paths or markup: train.csv / test.csv / label rows, identity folders, manifests, wids
indexes, pseudo-label shards and report pages, each tried with every spelling of the kind."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jaguar.data.prep import PrepError, prepare
from jaguar.data.shards import ShardSplit, load_manifest
from jaguar.untrusted_names import UnsafeNameError, check_name, resolve_inside

# every way a name can point out of its folder, or be no name at all; {outside} is an absolute path there
ESCAPING = {
    "dotdot": "../../outside/else.png",
    "dotdot-inside-a-path": "sub/../../../outside/else.png",
    "absolute": "{outside}",
    "backslash-dotdot": "..\\..\\outside\\else.png",
    "windows-drive": "C:\\outside\\else.png",
    "windows-drive-relative": "C:else.png",
    "unc-share": "\\\\server\\share\\else.png",
    "url-scheme": "file://{outside}",
    "nul": "ok.png\x00../../outside/else.png",
    "newline": "else\n.png",
    "dot-segment": "./ok.png",
    "empty-segment": "sub//ok.png",
    "bare-dotdot": "..",
}
PLAIN = ["ok.png", "sub/ok.png", "Abril/001.jpg", "2021-01-01 12:30:00.jpg", "a..b.png", "...png", "名前.png",
         "<b>odd</b>.png"]
HOSTILE_IDENTITIES = ["../../evil", "<script>alert(1)</script>", "$\\foo$", "a/b", "x'\"&<y>"]


def _spelling(name: str, outside: Path) -> str:
    return name.replace("{outside}", str(outside))


def _rgba(path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (12, 10, 4), dtype=np.uint8), "RGBA").save(path)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file beside the data set that no data-set name may reach."""
    (tmp_path / "outside").mkdir()
    _rgba(tmp_path / "outside" / "else.png", seed=99)
    return tmp_path / "outside" / "else.png"


def _challenge(root: Path, train_rows: list[tuple[str, str]], test_pairs: list[tuple[str, str]] = (),
               label_rows: list[tuple[str, str]] = ()) -> Path:
    (root / "train").mkdir(parents=True)
    _rgba(root / "train" / "ok.png")
    for name, header, rows in (("train.csv", ("filename", "ground_truth"), train_rows),
                               ("test.csv", ("row_id", "query_image", "gallery_image"),
                                [(i, q, g) for i, (q, g) in enumerate(test_pairs)]),
                               ("test_labels.csv", ("filename", "ground_truth"), label_rows)):
        if rows or name == "train.csv":
            with (root / name).open("w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerows([header, *rows])
    if test_pairs:
        (root / "test").mkdir()
        _rgba(root / "test" / "t1.png", 1)
        _rgba(root / "test" / "t2.png", 2)
    return root


@pytest.mark.parametrize("name", list(ESCAPING.values()), ids=list(ESCAPING))
def test_escaping_names_are_refused_with_their_reason(name: str, tmp_path: Path) -> None:
    name = _spelling(name, tmp_path / "outside" / "else.png")
    with pytest.raises(UnsafeNameError, match=r"^train\.csv line 7: the name .* (is|has|contains|begins)"):
        check_name(name, "train.csv line 7")
    with pytest.raises(UnsafeNameError):
        resolve_inside(tmp_path / "data", name, "here")


@pytest.mark.parametrize("name", ["", "   ", None, 7], ids=["empty", "blank", "none", "number"])
def test_no_name_at_all_is_refused(name) -> None:
    with pytest.raises(UnsafeNameError, match="row 3"):
        check_name(name, "row 3")


@pytest.mark.parametrize("name", PLAIN)
def test_plain_names_resolve_inside(name: str, tmp_path: Path) -> None:
    assert resolve_inside(tmp_path, name, "here") == tmp_path / name


def test_symbolic_links_are_followed(tmp_path: Path, outside: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    _rgba(data / "sub" / "real.png")
    os.symlink(outside, data / "out.png")
    os.symlink(outside.parent, data / "outdir")
    os.symlink(data / "sub" / "real.png", data / "in.png")
    linked_folder = tmp_path / "linked"
    os.symlink(data, linked_folder)  # the folder itself may be a link
    for name in ("out.png", "outdir/else.png"):
        with pytest.raises(UnsafeNameError, match="symbolic link"):
            resolve_inside(data, name, "here")
    assert resolve_inside(data, "in.png", "here") == data / "in.png"
    assert resolve_inside(linked_folder, "sub/real.png", "here") == linked_folder / "sub" / "real.png"


@pytest.mark.parametrize("name", list(ESCAPING.values()), ids=list(ESCAPING))
def test_prep_refuses_a_train_row_that_leads_out(name: str, tmp_path: Path, outside: Path) -> None:
    src = _challenge(tmp_path / "src", [("ok.png", "Abril"), (_spelling(name, outside), "Bora")])
    with pytest.raises(PrepError, match=r"train\.csv: line 3: the name"):
        prepare(src, tmp_path / "out", workers=1)
    manifest = prepare(src, tmp_path / "out", workers=1, skip_bad=True)
    assert [s.filename for s in manifest.splits["train"].samples] == ["ok.png"]
    assert any("line 3" in item["reason"] for item in manifest.skipped)


def test_prep_refuses_a_linked_file_and_rows_of_test_and_label_files(tmp_path: Path, outside: Path) -> None:
    src = _challenge(tmp_path / "src", [("ok.png", "Abril"), ("link.png", "Bora")],
                     test_pairs=[("t1.png", "t2.png"), ("t1.png", "../../outside/else.png")],
                     label_rows=[("t1.png", "Abril"), ("/etc/t2.png", "Bora")])
    os.symlink(outside, src / "train" / "link.png")
    with pytest.raises(PrepError) as raised:
        prepare(src, tmp_path / "out", workers=1)
    message = str(raised.value)
    assert "train.csv: line 3: the name 'link.png' leads to" in message and "symbolic link" in message
    assert "test.csv: line 3: the name '../../outside/else.png' has a '..' segment" in message
    assert "test_labels.csv: line 3: the name '/etc/t2.png' is an absolute path" in message
    manifest = prepare(src, tmp_path / "out", workers=1, skip_bad=True)
    packed = {s.filename for entry in manifest.splits.values() for s in entry.samples}
    assert packed == {"ok.png", "t1.png", "t2.png"}


def test_prep_refuses_a_linked_test_file_without_test_csv(tmp_path: Path, outside: Path) -> None:
    src = _challenge(tmp_path / "src", [("ok.png", "Abril")])
    (src / "test").mkdir()
    _rgba(src / "test" / "t1.png")
    os.symlink(outside, src / "test" / "t2.png")
    with pytest.raises(PrepError, match=r"test: file: the name 't2\.png' leads to .* symbolic link"):
        prepare(src, tmp_path / "out", workers=1)


@pytest.mark.parametrize("link", ["identity-folder", "image"])
def test_folder_layout_refuses_links_out_of_the_data_set(link: str, tmp_path: Path, outside: Path) -> None:
    src = tmp_path / "src"
    (src / "Abril").mkdir(parents=True)
    _rgba(src / "Abril" / "a.png")
    if link == "identity-folder":
        os.symlink(outside.parent, src / "Bora")
    else:
        os.symlink(outside, src / "Abril" / "b.png")
    with pytest.raises(PrepError, match="symbolic link"):
        prepare(src, tmp_path / "out", workers=1)
    manifest = prepare(src, tmp_path / "out", workers=1, skip_bad=True)
    assert [s.filename for s in manifest.splits["train"].samples] == ["Abril/a.png"]


@pytest.mark.parametrize("folder", ["back\\slash", "new\nline"], ids=["backslash", "control-character"])
def test_folder_layout_refuses_identity_folders_that_are_no_plain_name(folder: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for name in ("Abril", folder):
        (src / name).mkdir(parents=True)
        _rgba(src / name / "a.png")
    with pytest.raises(PrepError, match="identity folder: the name"):
        prepare(src, tmp_path / "out", workers=1)


@pytest.fixture(scope="module")
def prepared_once(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    prepare(_challenge(root / "src", [("ok.png", "Abril")]), root / "shards", workers=1)
    return root / "shards"


@pytest.fixture
def small_shards(prepared_once: Path, tmp_path: Path) -> Path:
    """A fresh copy of a one-image shard folder, for a test to tamper with."""
    return Path(shutil.copytree(prepared_once, tmp_path / "shards"))


@pytest.mark.parametrize("field", ["url", "index"])
@pytest.mark.parametrize("name", list(ESCAPING.values()), ids=list(ESCAPING))
def test_manifest_names_must_stay_in_the_shard_folder(small_shards: Path, outside: Path, field: str,
                                                      name: str) -> None:
    path = small_shards / "manifest.json"
    manifest = json.loads(path.read_text())
    if field == "url":
        manifest["splits"]["train"]["shards"][0]["url"] = _spelling(name, outside)
    else:
        manifest["splits"]["train"]["index"] = _spelling(name, outside)
    path.write_text(json.dumps(manifest))
    where = "shard 0" if field == "url" else "index"
    with pytest.raises(UnsafeNameError, match=rf"manifest\.json split 'train' {where}: the name"):
        load_manifest(small_shards)


def test_wids_index_names_must_stay_in_the_shard_folder(small_shards: Path, outside: Path) -> None:
    path = small_shards / "train.wids.json"
    index = json.loads(path.read_text())
    index["shardlist"][0]["url"] = str(outside.parent / "train-000000.tar")
    path.write_text(json.dumps(index))
    with pytest.raises(UnsafeNameError, match=r"train\.wids\.json shard 0: the name .* is an absolute path"):
        ShardSplit(small_shards, "train")


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def test_identity_names_stay_data_through_prep_and_pseudo_labels(tmp_path: Path) -> None:
    from jaguar.pseudo import PseudoLabel, write_pseudo_shards

    rows = [(f"img{i}.png", identity) for i, identity in enumerate(HOSTILE_IDENTITIES)]
    src = _challenge(tmp_path / "data" / "src", [("ok.png", "Abril"), *rows])
    for i, (name, _) in enumerate(rows):
        _rgba(src / "train" / name, seed=i + 10)
    before = _files(tmp_path)
    manifest = prepare(src, tmp_path / "data" / "shards", workers=1)
    assert set(manifest.identities) == {"Abril", *HOSTILE_IDENTITIES}
    selected = {name: PseudoLabel(name, manifest.identities[identity], identity, 0.9, 0.9, 3, True, True)
                for name, identity in rows}
    out = tmp_path / "data" / "pseudo"
    write_pseudo_shards(tmp_path / "data" / "shards", manifest, selected, out)
    created = _files(tmp_path) - before
    assert all(p.parts[:2] in (("data", "shards"), ("data", "pseudo")) for p in created), created
    assert {p.name for p in out.iterdir()} == {"manifest.json", "train.wids.json", "train-000000.tar"}
    pseudo = ShardSplit(out, "train")
    assert {meta["filename"]: meta["identity"] for meta in (pseudo.read_rgba(i)[1] for i in range(len(pseudo)))} \
        == dict(rows)


def test_report_escapes_identity_and_image_names(tmp_path: Path) -> None:
    from jaguar.report import build_report
    from jaguar.core.features import FeatureSet

    names = [f"<img src=x onerror=alert({i})>.png" for i in range(10)]
    labels = [i % len(HOSTILE_IDENTITIES) for i in range(10)]
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(10, 8, generator=generator), dim=1)
    run = tmp_path / "run"
    (run / "features").mkdir(parents=True)
    FeatureSet(names, embeddings, torch.tensor(labels), dict(enumerate(HOSTILE_IDENTITIES)),
               {"split": "val"}).save(run / "features" / "val.safetensors")
    (run / "config.yaml").write_text("run:\n  name: \"<script>alert('run')</script>\"\n")
    index = build_report(run)
    page = index.read_text()
    assert "<script>alert" not in page and "&lt;script&gt;" in page
    assert "<img src=x" not in page
    assert _files(run) - {Path("features"), Path("features/val.safetensors"), Path("config.yaml")} <= {
        Path("report"), *(Path("report") / p.name for p in (run / "report").iterdir())}
