"""The challenge's file formats: one behaviour for BOMs, blank lines, spaces, column order, duplicate and
conflicting rows across label files, pair lists and submissions; atomic writers; prep using the readers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from jaguar.formats import (FormatError, read_label_table, read_labels, read_pairs, read_submission, write_labels,
                            write_pairs, write_submission)

LABELS = "filename,ground_truth\n"
PAIRS = "row_id,query_image,gallery_image\n"
SUBMISSION = "row_id,similarity\n"

# (reader, file bytes, words the error must hold): every malformed form the readers must refuse.
MALFORMED = [
    (read_labels, b"", "is empty"),
    (read_labels, b"\n  \n", "is empty"),
    (read_labels, LABELS.encode(), "a header but no rows"),
    (read_labels, b"name,identity\na.png,x\n", "line 1: wrong header 'name,identity': expected "
                                               "'filename,ground_truth' (any order; optional: viewpoint); missing filename, "
                                               "ground_truth; unknown name, identity"),
    (read_labels, b"filename,filename\na.png,x\n", "missing ground_truth; repeated filename"),
    (read_labels, (LABELS + "a.png,x\nb.png\n").encode(), "line 3 has 1 cell(s) ['b.png']"),
    (read_labels, (LABELS + "a.png,x,y\n").encode(), "line 2 has 3 cell(s)"),
    (read_labels, (LABELS + "a.png, \n").encode(), "line 2 has 2 cell(s) ['a.png', '']"),
    (read_labels, (LABELS + "a.png,x\nb.png,y\na.png,z\n").encode(),
     "line 4 gives filename 'a.png' other values than line 2 (z vs x)"),
    (read_labels, b"\xff\xfe\x00garbage\xff", "cannot read CSV: not UTF-8"),
    (read_labels, (LABELS + "".join(f"f{i}.png\n" for i in range(12))).encode(), "12 bad row(s)"),
    (read_pairs, (PAIRS + "0,a,b\n1,a\n").encode(), "line 3 has 2 cell(s)"),
    (read_pairs, (PAIRS + "0,a,b\n0,a,c\n").encode(), "line 3 gives row_id '0' other values than line 2"),
    (read_pairs, b"row_id,query,gallery_image\n0,a,b\n", "missing query_image; unknown query"),
    (read_submission, (SUBMISSION + "0,0.5\n0,0.25\n").encode(), "line 3 gives row_id '0' other values"),
    (read_submission, (SUBMISSION + "0,high\n").encode(), "not a number at row_id 0 (line 2: 'high')"),
    (read_submission, (SUBMISSION + "0,nan\n").encode(), "NaN or infinite similarity at row_id 0"),
    (read_submission, (SUBMISSION + "0,1.5\n").encode(), "outside [0, 1] at row_id 0=1.5"),
]


@pytest.mark.parametrize("reader, content, words", MALFORMED)
def test_malformed_files_are_refused_naming_file_and_line(tmp_path: Path, reader, content: bytes, words: str):
    path = tmp_path / "file.csv"
    path.write_bytes(content)
    with pytest.raises(FormatError) as caught:
        reader(path)
    assert str(path) in str(caught.value) and words in str(caught.value)


def test_many_bad_rows_are_all_counted_and_the_first_shown(tmp_path: Path):
    path = tmp_path / "labels.csv"
    path.write_text(LABELS + "".join(f"f{i}.png\n" for i in range(12)))
    with pytest.raises(FormatError) as caught:
        read_labels(path)
    message = str(caught.value)
    assert "line 2 " in message and "line 11 " in message and "line 12 " not in message
    assert "... and 2 more" in message


def test_one_behaviour_for_bom_blank_lines_spaces_order_and_repeats(tmp_path: Path):
    # BOM, CRLF line ends, blank lines anywhere, spaces around cells, columns in another order,
    # and an exact repeat (read once, its line listed): the same table as the plain file.
    messy = tmp_path / "messy.csv"
    messy.write_bytes("\ufeff\r\nground_truth , filename\r\n\r\n Abril , a.png\r\nZorro,b.png\r\n"
                      "Abril,a.png\r\n , \r\n".encode("utf-8"))
    plain = tmp_path / "plain.csv"
    plain.write_text("filename,ground_truth\na.png,Abril\nb.png,Zorro\n")
    assert read_labels(messy) == read_labels(plain) == {"a.png": "Abril", "b.png": "Zorro"}
    table = read_label_table(messy)
    assert table.lines == [4, 5] and table.repeated == [6]
    pairs = tmp_path / "pairs.csv"
    pairs.write_bytes(b"\xef\xbb\xbfrow_id,query_image,gallery_image\n0,a.png,b.png\n\n0,a.png,b.png\n1,b.png,a.png\n")
    read = read_pairs(pairs)
    assert read.row_ids == ["0", "1"] and read.repeated == [4] and read.images() == ["a.png", "b.png"]
    submission = tmp_path / "sub.csv"
    submission.write_text(SUBMISSION + "0,0.5\n0,0.5\n1,1\n")
    assert read_submission(submission).row_ids == ["0", "1"]


def test_missing_file_or_a_folder_is_named_as_such(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"label file .*nowhere.csv does not exist"):
        read_labels(tmp_path / "nowhere.csv")
    (tmp_path / "labels.csv").mkdir()
    with pytest.raises(FormatError, match=r"label file .*labels.csv is a folder; give the CSV file"):
        read_labels(tmp_path / "labels.csv")


def test_writers_round_trip_and_quote_what_needs_it(tmp_path: Path):
    rows = [("a.png", "Abril"), ("b, with comma.png", 'Say "hi"')]
    write_labels(tmp_path / "labels.csv", rows)
    assert read_labels(tmp_path / "labels.csv") == dict(rows)
    assert not (tmp_path / "labels.csv").read_bytes().startswith(b"\xef\xbb\xbf")  # no BOM written
    write_pairs(tmp_path / "pairs.csv", [(0, "a.png", "b.png"), (1, "b.png", "a.png")])
    assert (tmp_path / "pairs.csv").read_text() == PAIRS + "0,a.png,b.png\n1,b.png,a.png\n"
    values = np.array([0.1, 1 / 3])
    write_submission(tmp_path / "sub.csv", ["x", "y"], values)
    assert np.array_equal(read_submission(tmp_path / "sub.csv").similarity, values)  # every digit kept


def test_a_refused_submission_leaves_the_old_file(tmp_path: Path):
    target = tmp_path / "sub.csv"
    write_submission(target, ["a", "b"], [0.5, 0.25])
    before = target.read_bytes()
    with pytest.raises(FormatError, match="NaN"):
        write_submission(target, ["a", "b"], [0.5, float("nan")])
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["sub.csv"]


def _small_challenge(synth_dir: Path, root: Path) -> Path:
    rows = list(read_labels(synth_dir / "train.csv").items())[:4]
    (root / "train").mkdir(parents=True)
    for name, _ in rows:
        shutil.copy(synth_dir / "train" / name, root / "train" / name)
    write_labels(root / "train.csv", rows)
    return root


def test_prep_reads_train_csv_by_the_same_rules(synth_dir: Path, tmp_path: Path):
    from jaguar.data.prep import PrepError, prepare

    src = _small_challenge(synth_dir, tmp_path / "src")
    first = (src / "train.csv").read_text().splitlines()[1]
    with (src / "train.csv").open("a") as handle:
        handle.write(first + "\n")  # an exact repeat: read once, and said
    manifest = prepare(src, tmp_path / "out", workers=1)
    assert manifest.splits["train"].num_samples == 4
    assert any("line(s) 6 repeat an earlier row exactly" in w for w in manifest.warnings)
    name = first.split(",")[0]
    with (src / "train.csv").open("a") as handle:
        handle.write(f"{name},SomeoneElse\n")  # a conflicting row: no skipping it
    for skip_bad in (False, True):
        with pytest.raises(PrepError, match=f"line 7 gives filename '{name}' other values than line 2"):
            prepare(src, tmp_path / "again", workers=1, skip_bad=skip_bad)
    assert not (tmp_path / "again").exists()


def test_the_viewpoint_column_is_optional_checked_and_written_back(tmp_path: Path):
    from jaguar.formats import viewpoints

    path = tmp_path / "labels.csv"
    path.write_text("viewpoint,filename,ground_truth\nLeft,a.png,Abril\n,b.png,Zorro\nright,c.png,Abril\n")
    table = read_label_table(path)
    assert read_labels(path) == {"a.png": "Abril", "b.png": "Zorro", "c.png": "Abril"}
    assert viewpoints(table) == {"a.png": "left", "b.png": "unknown", "c.png": "right"}  # empty = unknown
    assert viewpoints(read_label_table(_write(tmp_path / "plain.csv", LABELS + "a.png,x\n"))) == {}
    path.write_text("filename,ground_truth,viewpoint\na.png,Abril,front\nb.png,Zorro,left\nc.png,Abril,side\n")
    with pytest.raises(FormatError, match=r"2 bad viewpoint\(s\).*line 2: viewpoint 'front', line 4: viewpoint 'side'"):
        viewpoints(read_label_table(path))
    rows = [("a.png", "Abril", "left"), ("b.png", "Zorro", "unknown")]
    write_labels(tmp_path / "out.csv", rows)
    assert (tmp_path / "out.csv").read_text().splitlines()[0] == "filename,ground_truth,viewpoint"
    assert viewpoints(read_label_table(tmp_path / "out.csv")) == {"a.png": "left", "b.png": "unknown"}
    with pytest.raises(FormatError, match="viewpoint"):
        write_labels(tmp_path / "bad.csv", [("a.png", "Abril", "top")])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_an_extra_column_is_named_and_read_past(tmp_path: Path, caplog):
    path = tmp_path / "solution.csv"
    path.write_text("filename,Usage,ground_truth\na.png,Public,x\nb.png,,y\n")  # Kaggle's Usage column
    with caplog.at_level("WARNING", logger="jaguar.formats"):
        assert read_labels(path) == {"a.png": "x", "b.png": "y"}
    assert f"{path}: column(s) Usage ignored" in caplog.text
    assert read_label_table(path).ignored == ("Usage",)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("row_id,query_image,gallery_image,Usage\n0,a.png,b.png,Private\n")
    assert read_pairs(pairs).query_images == ["a.png"]
    submission = tmp_path / "submission.csv"
    submission.write_text("row_id,similarity,note\n0,0.5,\n")
    assert list(read_submission(submission).row_ids) == ["0"]
    path.write_text("filename,Usage,ground_truth\na.png,Public,\n")  # an empty cell of the file's own column
    with pytest.raises(FormatError, match="line 2 has 3 cell"):
        read_labels(path)

