"""The challenge's file formats, read and written in one place: label files (`train.csv`, the hidden
`test_labels.csv`, any `filename,ground_truth` file, with an optional `viewpoint` column: left, right or
unknown, the flank a photo shows), the pair list (`test.csv`: `row_id,query_image,gallery_image`)
and the submission (`row_id,similarity`).

Every reader follows the same rules:

- UTF-8 text, with or without a byte-order mark (spreadsheet programs write one). Writers write
  UTF-8 without one, "\\n" line ends, quoting only where a cell needs it, atomically (jaguar.io).
- The first non-blank line is the header: the file's columns, in any order; spaces around names
  are ignored. A missing or repeated column is an error naming both lists. Other columns (e.g. the
  `Usage` column of a Kaggle solution file) are read past: named in a warning and in
  `Table.ignored`, their cells may be empty.
- Blank lines (no cells, or only empty ones) are skipped wherever they are.
- Cells are stripped of surrounding spaces. A row with another number of cells than the header, or
  with an empty cell in one of the file's columns (other than an optional one, where empty means
  not given), is an error.
- Duplicate keys (the filename of a label file, the row_id of a pair list or submission): a row that
  repeats an earlier one exactly is read once, and its line is listed in `repeated` so a caller can
  warn; the same key with different values is an error naming the key and both lines.
- Errors (FormatError) name the file and every bad line (the first 10 of them and how many more),
  never only the first; a header without rows is an error too.
- CSVs written for people (`identify.csv`, `jaguar rank --format csv`) hold names from users (identity
  names, photo file names): a text cell starting with `=`, `+`, `-`, `@`, a tab or a carriage return
  (OWASP's CSV-injection rule), or with `'`, is written with one `'` in front, so a spreadsheet shows
  it as text instead of running it as a formula (`spreadsheet_cell`); every reader here takes that
  `'` off again (`from_spreadsheet_cell`), so jaguar reads back exactly what it wrote. The challenge's
  own files (labels, pair list, submission) are written as they are.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence, Union

import numpy as np

from jaguar.errors import JaguarError, MissingInputError
from jaguar.io import atomic_write_text

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
LABEL_COLUMNS = ("filename", "ground_truth")
VIEWPOINT_COLUMN = "viewpoint"  # optional in label files: the flank a photo shows
VIEWPOINTS = ("left", "right", "unknown")
UNKNOWN_VIEWPOINT = "unknown"
PAIR_COLUMNS = ("row_id", "query_image", "gallery_image")
SUBMISSION_COLUMNS = ("row_id", "similarity")
IDENTIFY_COLUMNS = ("photo", "rank", "individual", "score", "decision")
IDENTIFY_LOCAL_COLUMNS = ("inliers", "probability")  # appended when identify used local evidence
_SHOWN = 10


class FormatError(JaguarError, ValueError):
    """A challenge file that breaks its format; the message names the file and the lines at fault."""


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_cell(text: str) -> str:
    """`text` made inert for spreadsheets: a leading formula character (or `'`) gets a `'` in front."""
    return "'" + text if text.startswith(_FORMULA_START + ("'",)) else text


def from_spreadsheet_cell(text: str) -> str:
    """The text `spreadsheet_cell` was given (a cell without its escape is returned as it is)."""
    return text[1:] if text.startswith("'") and text[1:].startswith(_FORMULA_START + ("'",)) else text


def capped_listing(lines: Sequence[str], limit: int = 20, full_list: Path | None = None) -> str:
    """The first `limit` of `lines`, one an indented line, then how many more; with `full_list`,
    every line is also written to that file (when there are more than `limit`) and named, so a
    million-line problem list stays a screenful."""
    shown = "\n  ".join(str(line) for line in lines[:limit])
    if len(lines) <= limit:
        return shown
    more = f"\n  ... and {len(lines) - limit} more"
    if full_list is not None:
        atomic_write_text(Path(full_list), "".join(f"{line}\n" for line in lines))
        more += f" (all {len(lines)} in {full_list})"
    return shown + more


def examples(items: Sequence, limit: int = 5) -> str:
    """The first `limit` items, comma-separated, and how many more there are."""
    shown = ", ".join(str(item) for item in list(items)[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


@dataclass
class Table:
    """Rows of one challenge file, each key once: `rows[i]` holds the cells of `columns` in order
    (the required columns, then the optional ones the file has; an optional cell may be "")."""

    path: Path
    columns: tuple[str, ...]
    rows: list[tuple[str, ...]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # the file line of each row (1 = header)
    repeated: list[int] = field(default_factory=list)  # lines that repeat an earlier row exactly (read once)
    ignored: tuple[str, ...] = ()  # header columns that are not the file's, read past

    def column(self, name: str) -> list[str]:
        position = self.columns.index(name)
        return [row[position] for row in self.rows]

    def has(self, name: str) -> bool:
        return name in self.columns


def _require_file(path: Path, columns: Sequence[str], what: str) -> None:
    if path.is_dir():  # it exists: "does not exist" would blame the wrong thing
        raise FormatError(f"{what} {path} is a folder; give the CSV file (header {','.join(columns)}) inside it")
    if not path.is_file():
        raise MissingInputError(f"{what} {path} does not exist (expected a CSV with header {','.join(columns)})")


def count_pair_rows(path: PathLike) -> int:
    """Lines after the header of a pair list, counted in 1 MB blocks (O(1) memory, nothing parsed):
    its size before reading it. Raises MissingInputError/FormatError as `read_pairs` does for a
    missing file or a folder."""
    path = Path(path)
    _require_file(path, PAIR_COLUMNS, "pair list")
    lines, last = 0, b"\n"
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            lines, last = lines + block.count(b"\n"), block[-1:]
    return max(lines + (last != b"\n") - 1, 0)


def read_table(path: PathLike, columns: Sequence[str], what: str, optional: Sequence[str] = ()) -> Table:
    """Read a challenge CSV by the rules of this module; the key is the first of `columns`.
    `optional` columns may be absent from the header, and their cells may be empty."""
    path = Path(path)
    _require_file(path, columns, what)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            records = list(enumerate(csv.reader(handle), start=1))
    except UnicodeDecodeError as err:
        raise FormatError(f"{path}: cannot read CSV: not UTF-8 text ({err}); save it as UTF-8") from None
    except csv.Error as err:
        raise FormatError(f"{path}: cannot read CSV ({err})") from None
    records = [(line, [from_spreadsheet_cell(cell.strip()) for cell in cells]) for line, cells in records
               if any(c.strip() for c in cells)]
    expected = ",".join(columns)
    if not records:
        raise FormatError(f"{path} is empty; expected '{expected}' and rows")
    header_line, header = records[0]
    missing = [c for c in columns if c not in header]
    unknown = [c for c in header if c not in columns and c not in optional]
    repeated = sorted({c for c in header if header.count(c) > 1})
    if missing or repeated:
        raise FormatError(f"{path} line {header_line}: wrong header '{','.join(header)}': expected "
                          f"'{expected}' (any order{'; optional: ' + ','.join(optional) if optional else ''})"
                          + (f"; missing {', '.join(missing)}" if missing else "")
                          + (f"; unknown {', '.join(unknown)}" if unknown else "")
                          + (f"; repeated {', '.join(repeated)}" if repeated else ""))
    if unknown:
        log.warning("%s: column(s) %s ignored (read: %s)", path, ", ".join(unknown), expected)
    columns = tuple(columns) + tuple(c for c in optional if c in header)
    required = [header.index(c) for c in columns if c not in optional]
    order = [header.index(c) for c in columns]
    table = Table(path, columns, ignored=tuple(unknown))
    first: dict[str, int] = {}  # key -> index in table.rows
    bad: list[str] = []
    for line, cells in records[1:]:
        if len(cells) != len(header) or any(not cells[i] for i in required):
            bad.append(f"line {line} has {len(cells)} cell(s) {cells!r}; expected {len(header)} non-empty "
                       f"cells ({','.join(header)})")
            continue
        row = tuple(cells[i] for i in order)
        if row[0] in first:
            earlier = first[row[0]]
            if table.rows[earlier] == row:
                table.repeated.append(line)
            else:
                bad.append(f"line {line} gives {columns[0]} {row[0]!r} other values than line "
                           f"{table.lines[earlier]} ({','.join(row[1:])} vs {','.join(table.rows[earlier][1:])})")
            continue
        first[row[0]] = len(table.rows)
        table.rows.append(row)
        table.lines.append(line)
    if bad:
        more = f"\n  ... and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
        raise FormatError(f"{path}: {len(bad)} bad row(s):\n  " + "\n  ".join(bad[:_SHOWN]) + more)
    if not table.rows:
        raise FormatError(f"{path} has a header but no rows")
    return table


def _write(path: PathLike, columns: Sequence[str], rows: Iterable[Sequence[object]], line_end: str = "\n") -> None:
    """Write a CSV atomically. csv quotes a cell only for the characters of its line end: a file of
    users' names takes "\r\n" (RFC 4180's, what spreadsheets write), so a cell holding a bare CR is
    quoted and stays one cell."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=line_end)
    writer.writerow(columns)
    writer.writerows(rows)
    atomic_write_text(Path(path), buffer.getvalue())


# Label files: filename,ground_truth


def read_labels(path: PathLike) -> dict[str, str]:
    """{filename: identity} of a `filename,ground_truth[,viewpoint]` file, in file order."""
    table = read_label_table(path)
    return dict(zip(table.column("filename"), table.column("ground_truth")))


def read_label_table(path: PathLike) -> Table:
    """A `filename,ground_truth[,viewpoint]` file with the line of each row (for messages) and
    repeated lines. The viewpoint column is optional; `viewpoints` reads it."""
    return read_table(path, LABEL_COLUMNS, "label file", optional=(VIEWPOINT_COLUMN,))


def viewpoints(table: Table) -> dict[str, str]:
    """{filename: viewpoint} of a label table, each one of VIEWPOINTS (lower case; an empty cell is
    unknown); {} when the file has no viewpoint column. A value outside VIEWPOINTS is a FormatError
    naming the file and every line at fault."""
    if not table.has(VIEWPOINT_COLUMN):
        return {}
    found, bad = {}, []
    for line, name, value in zip(table.lines, table.column("filename"), table.column(VIEWPOINT_COLUMN)):
        value = value.lower() or UNKNOWN_VIEWPOINT
        if value not in VIEWPOINTS:
            bad.append(f"line {line}: {VIEWPOINT_COLUMN} {value!r}")
        found[name] = value
    if bad:
        raise FormatError(f"{table.path}: {len(bad)} bad {VIEWPOINT_COLUMN}(s), expected one of "
                          f"{', '.join(VIEWPOINTS)} (or empty for unknown): {examples(bad, _SHOWN)}")
    return found


def write_labels(path: PathLike, rows: Iterable[Sequence[str]]) -> None:
    """Write (filename, identity) or (filename, identity, viewpoint) rows as a label file
    (`filename,ground_truth[,viewpoint]`), atomically; every row the same width."""
    rows = [tuple(row) for row in rows]
    widths = {len(row) for row in rows}
    if not widths <= {2} and not widths <= {3}:
        raise FormatError(f"{path}: label rows must all be (filename, identity) or all (filename, identity, "
                          f"viewpoint), got widths {sorted(widths)}")
    bad = [row for row in rows if len(row) == 3 and row[2] not in VIEWPOINTS]
    if bad:
        raise FormatError(f"{path}: viewpoint(s) outside {', '.join(VIEWPOINTS)}: {examples(bad)}")
    _write(path, LABEL_COLUMNS + ((VIEWPOINT_COLUMN,) if widths == {3} else ()), rows)


# Pair list: row_id,query_image,gallery_image


@dataclass
class PairList:
    row_ids: list[str]
    query_images: list[str]
    gallery_images: list[str]
    lines: list[int]  # file line of each row
    repeated: list[int]  # lines that repeat an earlier row exactly (read once)

    def __len__(self) -> int:
        return len(self.row_ids)

    def images(self) -> list[str]:
        """Every image named, each once, in order of first appearance."""
        return list(dict.fromkeys(self.query_images + self.gallery_images))


def read_pairs(path: PathLike) -> PairList:
    """The rows of a `row_id,query_image,gallery_image` pair list (the challenge's test.csv)."""
    table = read_table(path, PAIR_COLUMNS, "pair list")
    return PairList(table.column("row_id"), table.column("query_image"), table.column("gallery_image"),
                    table.lines, table.repeated)


def all_pairs(images: Sequence[str]) -> Iterator[tuple[int, str, str]]:
    """(row_id, query_image, gallery_image) of every ordered pair of distinct images, query-major,
    row_id from 0: the challenge's test.csv for `images` (N * (N - 1) rows), lazily."""
    pairs = ((query, gallery) for query in images for gallery in images if gallery != query)
    return ((row, query, gallery) for row, (query, gallery) in enumerate(pairs))


def write_pairs(path: PathLike, rows: Iterable[tuple[object, str, str]]) -> None:
    """Write (row_id, query_image, gallery_image) rows as a pair list, atomically."""
    _write(path, PAIR_COLUMNS, rows)


# Submission: row_id,similarity


@dataclass
class Submission:
    row_ids: list[str]
    similarity: np.ndarray  # float64 in [0, 1], one per row_id


def check_rows(row_ids: Sequence[str], expected: Iterable[str], where: str) -> None:
    """Every expected row_id exactly once and nothing else; errors name the rows."""
    counts: dict[str, int] = {}
    for row_id in row_ids:
        counts[row_id] = counts.get(row_id, 0) + 1
    duplicates = [r for r, c in counts.items() if c > 1]
    if duplicates:
        raise FormatError(f"{where}: duplicate row_id {examples(duplicates)}")
    expected_list = list(expected)
    expected_set = set(expected_list)
    missing = [r for r in expected_list if r not in counts]
    if missing:
        raise FormatError(f"{where}: {len(missing)} row_id(s) of the pair list are missing: {examples(missing)}")
    unknown = [r for r in row_ids if r not in expected_set]
    if unknown:
        raise FormatError(f"{where}: {len(unknown)} row_id(s) not in the pair list: {examples(unknown)}")


def _check_values(row_ids: Sequence[str], values: np.ndarray, where: str) -> None:
    nan_rows = [row_ids[i] for i in np.flatnonzero(~np.isfinite(values))]
    if nan_rows:
        raise FormatError(f"{where}: NaN or infinite similarity at row_id {examples(nan_rows)}")
    outside = [f"{row_ids[i]}={values[i]:g}" for i in np.flatnonzero((values < 0) | (values > 1))]
    if outside:
        raise FormatError(f"{where}: similarity outside [0, 1] at row_id {examples(outside)}")


def read_submission(path: PathLike) -> Submission:
    """A `row_id,similarity` file with every value parsed and checked (a number, finite, in [0, 1])."""
    table = read_table(path, SUBMISSION_COLUMNS, "submission")
    row_ids, values, not_numbers = table.column("row_id"), [], []
    for line, (row_id, text) in zip(table.lines, table.rows):
        try:
            values.append(float(text))
        except ValueError:
            not_numbers.append(f"{row_id} (line {line}: {text!r})")
            values.append(math.nan)
    if not_numbers:
        raise FormatError(f"{path}: similarity is not a number at row_id {examples(not_numbers)}")
    similarity = np.asarray(values, dtype=np.float64)
    _check_values(row_ids, similarity, str(path))
    return Submission(row_ids, similarity)


def write_submission(path: PathLike, row_ids: Sequence[str], similarities: Sequence[float],
                     expected_row_ids: Iterable[str] | None = None) -> None:
    """Validate, then write `row_id,similarity` atomically, rows in the given order: each row_id
    once (and, with expected_row_ids, exactly those), every value finite and in [0, 1]."""
    values = np.asarray(similarities, dtype=np.float64).reshape(-1)
    if values.shape[0] != len(row_ids):
        raise FormatError(f"{path}: {len(row_ids)} row_ids but {values.shape[0]} similarities")
    check_rows(row_ids, row_ids if expected_row_ids is None else expected_row_ids, str(path))
    _check_values(row_ids, values, str(path))
    # repr keeps every float64 digit, so distinct similarities stay distinct in the file.
    _write(path, SUBMISSION_COLUMNS, ((r, repr(float(v))) for r, v in zip(row_ids, values)))


# Open-set identification: photo,rank,individual,score,decision[,inliers,probability] (`jaguar identify`)


def write_identify(path: PathLike, rows: Iterable[tuple]) -> None:
    """One row per photo and candidate: the photo as given, the candidate's rank (1 = best), the
    individual, its score (cosine similarity, 6 decimals) and the photo's decision ("known: NAME"
    or "new individual"); with local evidence each row also holds the inlier count of the
    candidate's best-matching gallery image and its fused probability P(same individual) (6
    decimals), the columns IDENTIFY_LOCAL_COLUMNS (rows of 7 values; all rows alike). Written
    atomically with CRLF line ends, its text cells made inert for spreadsheets (`spreadsheet_cell`);
    `read_identify` gives the rows back as they were."""
    rows = list(rows)
    local = bool(rows) and len(rows[0]) == 7
    if any(len(row) != (7 if local else 5) for row in rows):
        raise ValueError("identify rows must all hold 5 values, or all 7 (with inliers and probability)")
    _write(path, IDENTIFY_COLUMNS + (IDENTIFY_LOCAL_COLUMNS if local else ()),
           ([spreadsheet_cell(row[0]), int(row[1]), spreadsheet_cell(row[2]), f"{float(row[3]):.6f}",
             spreadsheet_cell(row[4])] + ([int(row[5]), f"{float(row[6]):.6f}"] if local else []) for row in rows),
           line_end="\r\n")


def read_identify(path: PathLike) -> list[tuple]:
    """The rows of a `write_identify` file, in file order: (photo, rank, individual, score, decision),
    plus (inliers, probability) when the file has those columns (a photo has one row per candidate,
    so rows are not keyed as in `read_table`)."""
    path = Path(path)
    _require_file(path, IDENTIFY_COLUMNS, "identification file")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        records = [cells for cells in csv.reader(handle) if any(c.strip() for c in cells)]
    header = tuple(c.strip() for c in records[0]) if records else ()
    if header not in (IDENTIFY_COLUMNS, IDENTIFY_COLUMNS + IDENTIFY_LOCAL_COLUMNS):
        raise FormatError(f"{path}: expected the header '{','.join(IDENTIFY_COLUMNS)}' (optionally followed by "
                          f"'{','.join(IDENTIFY_LOCAL_COLUMNS)}') of `jaguar identify`")
    try:
        if any(len(cells) != len(header) for cells in records[1:]):
            raise ValueError(f"a row has another number of cells than the header's {len(header)}")
        return [(from_spreadsheet_cell(c[0]), int(c[1]), from_spreadsheet_cell(c[2]), float(c[3]),
                 from_spreadsheet_cell(c[4])) + ((int(c[5]), float(c[6])) if len(header) == 7 else ())
                for c in records[1:]]
    except ValueError as err:
        raise FormatError(f"{path}: not a `jaguar identify` file ({err})") from None
