"""Input-layout readers for `jaguar prep`: the challenge layout (train.csv + train/, test.csv + test/) and
the folder-per-identity layout. They list the images to convert and every problem found, never stopping
at the first."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from jaguar.data.image_forms import IMAGE_SUFFIXES
from jaguar.formats import LABEL_COLUMNS, FormatError, Table, examples, read_label_table, read_pairs, viewpoints
from jaguar.untrusted_names import UnsafeNameError, check_name, resolve_inside


# Bytes of a sample key: with the longest member suffix (".mask.png") a member name stays within the
# 100 bytes of a ustar header's name field, the only one wids' shard reader reads.
MAX_KEY_BYTES = 90


@dataclass
class SourceImage:
    """One image to convert: where it is, what it will be called in the shards, whose it is."""

    split: str
    filename: str  # name stored in the sample json ("train_0001.png", or "Abril/001.jpg" for folders)
    path: Path
    identity: str | None
    viewpoint: str | None = None  # left | right | unknown from the label file's viewpoint column; None: no column

    @property
    def key(self) -> str:
        # webdataset splits a member name at the first dot of its base name, so the key must have none
        key = re.sub(r"\.", "_", self.filename.rsplit(".", 1)[0])
        if len(key.encode("utf-8")) <= MAX_KEY_BYTES:
            return key
        # A ustar member name holds 100 bytes (and wids' reader reads no longer form), while camera-trap
        # software writes names up to the file system's 255 bytes: a long name gets a short key (its
        # start and a hash of the whole name); the name itself is kept whole in the sample's json.
        digest = hashlib.sha256(self.filename.encode("utf-8")).hexdigest()[:16]
        head = key.encode("utf-8")[:MAX_KEY_BYTES - len(digest) - 1].decode("utf-8", errors="ignore")
        return f"{head}~{digest}"


@dataclass
class Problem:
    """A bad input. `fatal` problems (an unreadable CSV) cannot be skipped with --skip-bad."""

    file: str
    reason: str
    fatal: bool = False


def _inside(folder: Path, name: str, where: str, source: Path, problems: list[Problem]) -> Path | None:
    """folder/name when the name (read from `source`, at `where`) stays inside `folder`; else None, and the
    reason is recorded as a problem of `source`."""
    try:
        return resolve_inside(folder, name, where)
    except UnsafeNameError as err:
        problems.append(Problem(str(source), str(err)))
        return None


@dataclass
class Listing:
    layout: str  # "challenge" | "folders"
    images: list[SourceImage] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    require_alpha: bool = True
    warnings: list[str] = field(default_factory=list)  # worth telling, not a reason to stop


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


def _read_table(read, path: Path, problems: list[Problem], warnings: list[str]):
    """`read(path)` (a jaguar.formats reader), or None with a fatal problem when the file breaks its format."""
    try:
        table = read(path)
    except (FormatError, OSError) as err:
        problems.append(Problem(str(path), str(err), fatal=True))
        return None
    if table.repeated:
        warnings.append(f"{path}: line(s) {examples(table.repeated)} repeat an earlier row exactly; read once")
    return table


def _viewpoints(table: Table | None, problems: list[Problem]) -> dict[str, str]:
    """The label table's viewpoint column ({} without one); bad values are a fatal problem."""
    try:
        return viewpoints(table) if table is not None else {}
    except FormatError as err:
        problems.append(Problem(str(table.path), str(err), fatal=True))
        return {}


def _read_challenge(src: Path) -> Listing:
    listing = Listing("challenge", require_alpha=True)
    problems = listing.problems
    train_csv = src / "train.csv"
    if train_csv.exists():
        table = _read_table(read_label_table, train_csv, problems, listing.warnings)
        views = _viewpoints(table, problems)
        for line, name, identity in zip(table.lines, table.column("filename"), table.column("ground_truth")) \
                if table else ():
            path = _inside(src / "train", name, f"line {line}", train_csv, problems)
            if path is None:
                continue
            if not path.is_file():
                problems.append(Problem(str(path), f"missing: named on train.csv line {line} but not in "
                                                   f"{src / 'train'}"))
                continue
            listing.images.append(SourceImage("train", name, path, identity, views.get(name)))
    elif (src / "train").is_dir():
        problems.append(Problem(str(train_csv), "missing: train/ exists but train.csv (header "
                                                 f"'{','.join(LABEL_COLUMNS)}') does not", fatal=True))

    test_labels, test_views = _read_test_labels(src, problems, listing.warnings)
    test_csv = src / "test.csv"
    if test_csv.exists():
        pairs = _read_table(read_pairs, test_csv, problems, listing.warnings)
        first_line: dict[str, int] = {}
        for line, query, gallery in zip(pairs.lines, pairs.query_images, pairs.gallery_images) if pairs else ():
            first_line.setdefault(query, line)
            first_line.setdefault(gallery, line)
        test_paths = {}
        for name, line in sorted(first_line.items()):
            path = _inside(src / "test", name, f"line {line}", test_csv, problems)
            if path is not None and not path.is_file():
                problems.append(Problem(str(path), f"unknown image: named in test.csv but not in {src / 'test'}"))
            elif path is not None:
                test_paths[name] = path
    elif (src / "test").is_dir():
        found = [(p.name, _inside(src / "test", p.name, "file", src / "test", problems))
                 for p in sorted((src / "test").glob("*.png"))]
        test_paths = {name: path for name, path in found if path is not None and path.is_file()}
    else:
        test_paths = {}
    listing.images += [SourceImage("test", name, path, test_labels.get(name), test_views.get(name))
                       for name, path in test_paths.items()]
    _check_keys(listing)
    return listing


def _read_test_labels(src: Path, problems: list[Problem], warnings: list[str]
                      ) -> tuple[dict[str, str], dict[str, str]]:
    """The optional hidden truth of the test split (written by `jaguar synth`), for local evaluation:
    ({filename: identity}, {filename: viewpoint} when the file has that column)."""
    path = src / "test_labels.csv"
    if not path.exists():
        return {}, {}
    table = _read_table(read_label_table, path, problems, warnings)
    views = _viewpoints(table, problems)
    labels = {}
    for line, name, identity in zip(table.lines, table.column("filename"), table.column("ground_truth")) \
            if table else ():
        try:
            labels[check_name(name, f"line {line}")] = identity  # never joined to a folder, but a name all the same
        except UnsafeNameError as err:
            problems.append(Problem(str(path), str(err)))
    return labels, views


def _read_folders(src: Path) -> Listing:
    listing = Listing("folders", require_alpha=False)
    for folder in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if _inside(src, folder.name, "identity folder", folder, listing.problems) is None:
            continue
        images = [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        files = [p for p in images if _inside(src, f"{folder.name}/{p.name}", "image", p, listing.problems)]
        if not images:
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
