"""Input-layout readers for `jaguar prep`: the challenge layout (train.csv + train/, test.csv + test/) and
the folder-per-identity layout. They list the images to convert and every problem found, never stopping
at the first."""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TRAIN_HEADER = ["filename", "ground_truth"]
TEST_HEADER = ["row_id", "query_image", "gallery_image"]


@dataclass
class SourceImage:
    """One image to convert: where it is, what it will be called in the shards, whose it is."""

    split: str
    filename: str  # name stored in the sample json ("train_0001.png", or "Abril/001.jpg" for folders)
    path: Path
    identity: str | None

    @property
    def key(self) -> str:
        # webdataset splits a member name at the first dot of its base name, so the key must have none
        return re.sub(r"\.", "_", self.filename.rsplit(".", 1)[0])


@dataclass
class Problem:
    """A bad input. `fatal` problems (an unreadable CSV) cannot be skipped with --skip-bad."""

    file: str
    reason: str
    fatal: bool = False


@dataclass
class Listing:
    layout: str  # "challenge" | "folders"
    images: list[SourceImage] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    require_alpha: bool = True


def detect_layout(src: Path) -> str:
    if (src / "train.csv").exists() or (src / "test.csv").exists() or (src / "train").is_dir():
        return "challenge"
    if any(p.is_dir() and not p.name.startswith(".") for p in src.iterdir()):
        return "folders"
    raise ValueError(f"{src} is neither the challenge layout (train.csv + train/, test.csv + test/) nor a "
                     f"folder-per-identity layout (SRC/<identity>/*.png|jpg); point SRC at one of those")


def read_listing(src: Path) -> Listing:
    layout = detect_layout(src)
    return _read_challenge(src) if layout == "challenge" else _read_folders(src)


def _read_csv(path: Path, header: list[str], problems: list[Problem]) -> list[tuple[int, list[str]]] | None:
    """(line number, row) pairs, or None (with a fatal problem) when the file cannot be used at all."""
    expected = ",".join(header)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        problems.append(Problem(str(path), f"cannot read CSV ({err}); expected a UTF-8 CSV with header "
                                           f"'{expected}'", fatal=True))
        return None
    if not rows or [c.strip() for c in rows[0]] != header:
        found = ",".join(rows[0]) if rows else "an empty file"
        problems.append(Problem(str(path), f"wrong header: expected '{expected}', found '{found}'", fatal=True))
        return None
    numbered = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header) or any(not c.strip() for c in row):
            problems.append(Problem(str(path), f"line {line} has {len(row)} field(s) {row!r}; expected "
                                               f"{len(header)} non-empty fields ({expected})"))
            continue
        numbered.append((line, [c.strip() for c in row]))
    return numbered


def _read_challenge(src: Path) -> Listing:
    listing = Listing("challenge", require_alpha=True)
    problems = listing.problems
    train_csv = src / "train.csv"
    if train_csv.exists():
        rows = _read_csv(train_csv, TRAIN_HEADER, problems) or []
        seen: dict[str, tuple[int, str]] = {}
        conflicting: set[str] = set()
        for line, (name, identity) in rows:
            if name in seen:
                first_line, first_identity = seen[name]
                why = "with a different identity" if identity != first_identity else "again"
                problems.append(Problem(str(src / "train" / name),
                                        f"duplicate filename: train.csv line {line} names it {why} "
                                        f"(first on line {first_line})"))
                if identity != first_identity:
                    conflicting.add(name)
                continue
            seen[name] = (line, identity)
        for name, (line, identity) in seen.items():
            if name in conflicting:
                continue
            path = src / "train" / name
            if not path.is_file():
                problems.append(Problem(str(path), f"missing: named on train.csv line {line} but not in "
                                                   f"{src / 'train'}"))
                continue
            listing.images.append(SourceImage("train", name, path, identity))
    elif (src / "train").is_dir():
        problems.append(Problem(str(train_csv), "missing: train/ exists but train.csv (header "
                                                 f"'{','.join(TRAIN_HEADER)}') does not", fatal=True))

    test_labels = _read_test_labels(src, problems)
    test_csv = src / "test.csv"
    if test_csv.exists():
        names: list[str] = []
        for _, (_, query, gallery) in _read_csv(test_csv, TEST_HEADER, problems) or []:
            names.extend((query, gallery))
        test_names = sorted(set(names))
        for name in test_names:
            if not (src / "test" / name).is_file():
                problems.append(Problem(str(src / "test" / name),
                                        f"unknown image: named in test.csv but not in {src / 'test'}"))
    elif (src / "test").is_dir():
        test_names = sorted(p.name for p in (src / "test").glob("*.png"))
    else:
        test_names = []
    listing.images += [SourceImage("test", name, src / "test" / name, test_labels.get(name))
                       for name in test_names if (src / "test" / name).is_file()]
    _check_keys(listing)
    return listing


def _read_test_labels(src: Path, problems: list[Problem]) -> dict[str, str]:
    """The optional hidden truth of the test split (written by `jaguar synth`), for local evaluation."""
    path = src / "test_labels.csv"
    if not path.exists():
        return {}
    return {name: identity for _, (name, identity) in _read_csv(path, TRAIN_HEADER, problems) or []}


def _read_folders(src: Path) -> Listing:
    listing = Listing("folders", require_alpha=False)
    for folder in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            listing.problems.append(Problem(str(folder), f"empty identity folder: no "
                                                         f"{'/'.join(IMAGE_SUFFIXES)} images"))
            continue
        listing.images += [SourceImage("train", f"{folder.name}/{p.name}", p, folder.name) for p in files]
    _check_keys(listing)
    return listing


def _check_keys(listing: Listing) -> None:
    """Two files whose keys collide in one split (e.g. a.png and a.jpg) would merge into one sample."""
    counts = Counter((image.split, image.key) for image in listing.images)
    clashes = {k for k, n in counts.items() if n > 1}
    if not clashes:
        return
    kept = []
    for image in listing.images:
        if (image.split, image.key) in clashes:
            listing.problems.append(Problem(str(image.path), f"duplicate filename: another {image.split} file "
                                                             f"also becomes sample key '{image.key}'"))
        else:
            kept.append(image)
    listing.images = kept
