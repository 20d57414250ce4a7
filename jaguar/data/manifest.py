"""The manifest of a shards folder (`manifest.json`): what `jaguar prep` and pseudo-labelling write
and the shard reader reads. It records each split's shards (name, sample count, byte size, sha256),
its wids index and samples (key, filename, label, sha256 of the image bytes, and the viewpoint where
the source's label file has that column), the identity -> label
map, the options used, the files skipped, warnings and near-duplicate groups.

Checks: `Manifest.check_sizes` compares each shard's byte size with the manifest (a stat, no read;
the reader runs it on open, so a truncated or partly copied shard is named before training reads
it); `Manifest.verify` also recomputes every shard's sha256 (`jaguar verify SHARDS`), which finds a
shard changed in place at the same size. The manifest's own content (labels, identity map,
sample hashes) carries its sha256 (`content_sha256`), checked on every load: an edited label is
named, not trained on."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from jaguar.checksums import file_sha256  # noqa: F401 (importable from here, as before)
from jaguar.config import ConfigError
from jaguar.errors import MissingInputError
from jaguar.io import atomic_write_json
from jaguar.untrusted_names import resolve_inside

MANIFEST_FORMAT = "jaguar-shards/1"
MANIFEST_NAME = "manifest.json"


class ShardsError(ConfigError):
    """A shard folder that cannot be used; the message names the folder or file and what to do."""


@dataclass
class ShardEntry:
    url: str  # file name inside the shards folder, e.g. "train-000000.tar"
    nsamples: int
    sha256: str
    filesize: int  # bytes


@dataclass
class SampleEntry:
    key: str  # webdataset sample key
    filename: str  # the image's name in the source data set
    label: int  # -1: identity unknown
    sha256: str  # of the sample's image member bytes, in order
    viewpoint: Optional[str] = None  # left | right | unknown; None: the source gave no viewpoint column


@dataclass
class SplitEntry:
    num_samples: int
    shards: list[ShardEntry]
    index: str  # the split's wids index file
    samples: list[SampleEntry]  # in shard order


@dataclass
class Manifest:
    layout: str  # "challenge", "folders" or "pseudo-labels"
    source: str  # the folder the shards were made from
    identities: dict[str, int]  # identity name -> label
    splits: dict[str, SplitEntry]
    options: dict[str, Any] = field(default_factory=dict)  # prep's settings (max_side, encoding, ...)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason"} of each file left out
    warnings: list[str] = field(default_factory=list)
    # Near-duplicate groups by method ("phash", "embedding"): JSON objects owned by jaguar.data.dedup.
    groups: dict[str, Any] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT
    content_sha256: str = field(default="", compare=False)  # of every other field (`content_digest`); set by save, checked by load

    @property
    def label_names(self) -> dict[int, str]:
        """label -> identity name."""
        return {int(label): name for name, label in self.identities.items()}

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data = {"format": data.pop("format"), **data}
        for entry in data["splits"].values():  # a viewpoint is written only where the source had one
            for sample in entry["samples"]:
                if sample["viewpoint"] is None:
                    del sample["viewpoint"]
        if not self.groups:
            data.pop("groups")
        data.pop("content_sha256")
        data["content_sha256"] = content_digest(data)
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Manifest":
        """A Manifest from its JSON object; `where` (the file) names it in errors."""
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ShardsError(f"{where} has format {found!r}, expected {MANIFEST_FORMAT!r}; re-run `jaguar prep` "
                              f"with this version of jaguar")
        try:
            splits = {name: SplitEntry(entry["num_samples"], [ShardEntry(**s) for s in entry["shards"]],
                                       entry["index"], [SampleEntry(**s) for s in entry["samples"]])
                      for name, entry in data["splits"].items()}
            known = {f.name for f in dataclasses.fields(cls)} - {"splits"}
            unknown = sorted(set(data) - known - {"splits"})
            if unknown:
                raise ShardsError(f"{where} has unknown key(s) {unknown}; re-run `jaguar prep` with this version "
                                  f"of jaguar")
            return cls(splits=splits, **{k: v for k, v in data.items() if k in known})
        except (KeyError, TypeError, AttributeError) as err:
            raise ShardsError(f"{where} is not a complete manifest ({type(err).__name__}: {err}); re-run "
                              f"`jaguar prep`") from None

    @staticmethod
    def path(shards_dir: str | Path) -> Path:
        return Path(shards_dir) / MANIFEST_NAME

    @staticmethod
    def exists(shards_dir: str | Path) -> bool:
        return Manifest.path(shards_dir).is_file()

    @classmethod
    def load(cls, shards_dir: str | Path) -> "Manifest":
        """The manifest of a shards folder, checked for its format and fields."""
        shards_dir = Path(shards_dir)
        path = cls.path(shards_dir)
        if shards_dir.exists() and not shards_dir.is_dir():
            raise ShardsError(f"{shards_dir} is a file, not a shards folder; give the folder `jaguar prep` wrote "
                              f"(the one holding {MANIFEST_NAME})")
        if not shards_dir.is_dir():
            raise MissingInputError(f"shard folder {shards_dir} does not exist; create it with `jaguar prep SRC "
                                    f"{shards_dir}` (or fix data.shards)")
        if not path.is_file():
            raise MissingInputError(f"{path} does not exist: {shards_dir} is not a `jaguar prep` output; "
                                    f"re-run `jaguar prep SRC {shards_dir}`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ShardsError(f"{path} is unreadable ({err}); re-run `jaguar prep`") from None
        manifest = cls.from_dict(data, str(path))
        for split, entry in manifest.splits.items():  # names the readers join to the folder: untrusted
            resolve_inside(shards_dir, entry.index, f"{path} split {split!r} index")
            for number, shard in enumerate(entry.shards):
                resolve_inside(shards_dir, shard.url, f"{path} split {split!r} shard {number}")
        if manifest.content_sha256 and content_digest(data) != manifest.content_sha256:
            raise ShardsError(f"{path} was changed since `jaguar prep` wrote it (its content no longer matches "
                              f"its content_sha256): labels or sample hashes edited by hand are not used; "
                              f"re-run `jaguar prep` (fix the source labels there)")
        return manifest

    def save(self, shards_dir: str | Path) -> Path:
        """Write manifest.json into `shards_dir`, atomically."""
        path = self.path(shards_dir)
        atomic_write_json(path, self.to_dict())
        return path

    def _size_problems(self, shards_dir: Path, splits: list[str]) -> list[str]:
        problems = []
        for split in splits:
            for shard in self.splits[split].shards:
                path = shards_dir / shard.url
                if not path.is_file():
                    problems.append(f"{path}: missing shard of split {split!r}")
                elif path.stat().st_size != shard.filesize:
                    problems.append(f"{path}: {path.stat().st_size} bytes, the manifest records {shard.filesize} "
                                    f"(truncated or replaced)")
        return problems

    def check_sizes(self, shards_dir: str | Path, splits: Optional[list[str]] = None) -> None:
        """Raise ShardsError naming every shard of `splits` (default all) that is missing or whose
        byte size differs from the manifest. Cheap: one stat a shard."""
        shards_dir = Path(shards_dir)
        problems = self._size_problems(shards_dir, list(self.splits) if splits is None else splits)
        if problems:
            raise ShardsError("\n".join(problems) + f"\nthe shards in {shards_dir} do not match "
                              f"{self.path(shards_dir)}; re-run `jaguar prep` (or copy the folder again)")

    def verify(self, shards_dir: str | Path) -> list[str]:
        """Every problem of the folder against this manifest (empty = ok): each split's wids index
        and sample counts, each shard's presence, byte size and sha256. Reads every shard."""
        shards_dir = Path(shards_dir)
        problems = []
        for split, entry in self.splits.items():
            if not (shards_dir / entry.index).is_file():
                problems.append(f"{shards_dir / entry.index}: missing wids index of split {split!r}")
            listed = sum(shard.nsamples for shard in entry.shards)
            if listed != entry.num_samples or listed != len(entry.samples):
                problems.append(f"{self.path(shards_dir)}: split {split!r} lists {entry.num_samples} samples, "
                                f"its shards hold {listed} and its sample list {len(entry.samples)}")
        sized = self._size_problems(shards_dir, list(self.splits))
        problems += sized
        bad = {problem.split(": ", 1)[0] for problem in sized}
        for entry in self.splits.values():
            for shard in entry.shards:
                path = shards_dir / shard.url
                if str(path) in bad:
                    continue
                digest = file_sha256(path)
                if digest != shard.sha256:
                    problems.append(f"{path}: sha256 {digest} differs from the manifest's {shard.sha256} "
                                    f"(corrupt or replaced); re-run `jaguar prep`")
        return problems


def content_digest(data: dict[str, Any]) -> str:
    """sha256 of a manifest's JSON object without its content_sha256 (keys sorted, compact)."""
    rest = {key: value for key, value in data.items() if key != "content_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
