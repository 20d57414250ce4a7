"""Reading a `jaguar prep` output: the manifest (jaguar.data.manifest), checksum verification, and random
access to one split through its wids index (picklable, opened lazily in each DataLoader worker process;
each shard's size is checked against the manifest when a split is opened)."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image

from jaguar.data.manifest import Manifest, ShardsError
from jaguar.errors import MissingInputError
from jaguar.untrusted_names import resolve_inside

IMAGE_MEMBERS = ("png", "jpg", "mask.png")  # an RGBA PNG, or a JPEG with its alpha mask as a PNG


def load_manifest(shards_dir: str | Path) -> Manifest:
    """The manifest of a `jaguar prep` output folder, checked for its format (see jaguar.data.manifest)."""
    return Manifest.load(shards_dir)


def _shard_path_as_is(url: str) -> str:
    # wids copies shards to a cache dir by default; local shards are opened in place (no copy, no stale cache)
    return url


def _as_bytes(value: object) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return value.read()  # a stream


def _decode(data: bytes, flags: int) -> np.ndarray | None:
    return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)


REDUCED_COLOR = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                 8: cv2.IMREAD_REDUCED_COLOR_8}


def decode_rgba(sample: dict, where: str, reduction: int = 1) -> np.ndarray:
    """The H x W x 4 uint8 RGBA array of a shard sample's image members (OpenCV decodes PNG and
    JPEG faster than PIL). `where` names the sample in errors.

    `reduction` (1, 2, 4 or 8) lets a JPEG colour member decode at 1/reduction of its size
    (libjpeg's scaled inverse DCT, each output pixel the mean of a reduction x reduction block:
    ceil(W / reduction) x ceil(H / reduction)); its mask is area-averaged to the same size. PNG
    members always decode at full size. Callers learn the size from the array's shape."""
    if reduction not in REDUCED_COLOR:
        raise ValueError(f"reduction must be one of {sorted(REDUCED_COLOR)}, got {reduction}")
    if ".png" in sample:
        image = _decode(_as_bytes(sample[".png"]), cv2.IMREAD_UNCHANGED)
        if image is not None and image.ndim == 3 and image.shape[2] == 4 and image.dtype == np.uint8:
            return cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
        # not 8-bit RGBA (prep always writes that; a hand-made shard may not): let PIL convert it
        try:
            with Image.open(io.BytesIO(_as_bytes(sample[".png"]))) as opened:
                return np.asarray(opened.convert("RGBA"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ShardsError(f"{where}: its .png member cannot be decoded ({type(err).__name__}; corrupt "
                              f"shard?); run `jaguar verify` on the shards folder and re-run `jaguar prep`") from None
    if ".jpg" in sample and ".mask.png" in sample:
        colour = _decode(_as_bytes(sample[".jpg"]), REDUCED_COLOR[reduction])
        mask = _decode(_as_bytes(sample[".mask.png"]), cv2.IMREAD_GRAYSCALE)
        # name the member at fault: an undecodable colour image, an undecodable mask, or a size mismatch
        if colour is None or mask is None:
            member = ".jpg" if colour is None else ".mask.png"
            raise ShardsError(f"{where}: its {member} member cannot be decoded (corrupt shard?); run "
                              f"`jaguar verify` on the shards folder and re-run `jaguar prep`")
        if colour.shape[:2] != tuple(-(-side // reduction) for side in mask.shape):
            reduced = f" (decoded at 1/{reduction})" if reduction > 1 else ""
            raise ShardsError(f"{where}: its .jpg is {colour.shape[1]}x{colour.shape[0]}{reduced} but its .mask.png is "
                              f"{mask.shape[1]}x{mask.shape[0]}; re-run `jaguar prep`")
        if reduction > 1:
            mask = cv2.resize(mask, (colour.shape[1], colour.shape[0]), interpolation=cv2.INTER_AREA)
        rgba = cv2.cvtColor(colour, cv2.COLOR_BGR2RGBA)
        rgba[:, :, 3] = mask
        return rgba
    found = sorted(key for key in sample if key.startswith("."))
    raise ShardsError(f"{where} has no image ({', '.join(found)}); expected .png or .jpg + .mask.png; "
                      f"re-run `jaguar prep`")


def _check_index_urls(index_path: Path, shards_dir: Path) -> None:
    """wids opens the shards its index names: each must be a plain name inside the shard folder."""
    try:
        shardlist = json.loads(index_path.read_text(encoding="utf-8"))["shardlist"]
        urls = [shard["url"] for shard in shardlist]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise ShardsError(f"wids index {index_path} is unreadable ({type(err).__name__}: {err}); "
                          f"re-run `jaguar prep`") from None
    for number, url in enumerate(urls):
        resolve_inside(shards_dir, url, f"{index_path} shard {number}")


class ShardSplit:
    """Random access to one split of a `jaguar prep` output: item i is (RGBA PIL image, sample json);
    `read_rgba(i)` gives the image as an array instead.

    `filenames`, `labels`, `identities` and `viewpoints` come from the manifest (no tar is opened) in
    item order; `viewpoints` is None when no sample of the split has one (a source without the column)."""

    def __init__(self, shards_dir: str | Path, split: str) -> None:
        self.shards_dir = Path(shards_dir).resolve()
        self.manifest = load_manifest(self.shards_dir)
        self.split = split
        splits = self.manifest.splits
        if split not in splits:
            raise ShardsError(f"split {split!r} is not in {Manifest.path(self.shards_dir)}; it has "
                              f"{', '.join(sorted(splits)) or 'no splits'}")
        entry = splits[split]
        self.index_path = resolve_inside(self.shards_dir, entry.index, f"split {split!r} index")
        if not self.index_path.is_file():
            raise MissingInputError(f"wids index {self.index_path} is missing; re-run `jaguar prep`")
        _check_index_urls(self.index_path, self.shards_dir)
        self.manifest.check_sizes(self.shards_dir, [split])
        self.filenames: list[str] = [s.filename for s in entry.samples]
        self.labels: np.ndarray = np.array([s.label for s in entry.samples], dtype=np.int64)
        self.label_names: dict[int, str] = self.manifest.label_names
        self.identities: list[str | None] = [self.label_names.get(int(label)) for label in self.labels]
        views = [s.viewpoint for s in entry.samples]
        self.viewpoints: list[str | None] | None = views if any(v is not None for v in views) else None
        self._shard_ends = np.cumsum([shard.nsamples for shard in entry.shards])  # to name a sample's shard
        self._shard_urls = [shard.url for shard in entry.shards]
        self._dataset = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.filenames)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_dataset"], state["_pid"] = None, None  # open file handles and mmaps stay in their process
        return state

    def _open(self):
        if self._dataset is None or self._pid != os.getpid():
            import wids

            # wids prints a banner on every open; one per worker process is noise
            with contextlib.redirect_stderr(io.StringIO()):
                self._dataset = wids.ShardListDataset(str(self.index_path), localname=_shard_path_as_is,
                                                      transformations=[], lru_size=16)
            self._pid = os.getpid()
            if len(self._dataset) != len(self.filenames):
                raise ShardsError(f"{self.index_path} holds {len(self._dataset)} samples but the manifest lists "
                                  f"{len(self.filenames)}; re-run `jaguar prep`")
        return self._dataset

    def __getitem__(self, i: int) -> tuple[Image.Image, dict]:
        rgba, meta = self.read_rgba(i)
        return Image.fromarray(rgba, "RGBA"), meta

    def read_rgba(self, i: int, reduction: Callable[[dict], int] | None = None) -> tuple[np.ndarray, dict]:
        """Item i as (H x W x 4 uint8 RGBA array, sample json): what the data loaders read.

        `reduction(sample json)` may choose a reduced JPEG decode (see `decode_rgba`); the array is
        then smaller than the json's "size" [W, H], which stays as stored."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for split {self.split!r} of {len(self)} samples")
        i = int(i) % len(self)
        sample = self._open()[i]
        meta = json.loads(_as_bytes(sample[".json"]))
        if meta["filename"] != self.filenames[i]:
            raise ShardsError(f"sample {i} of {self.split!r} in {self.shards_dir} is {meta['filename']}, the "
                              f"manifest says {self.filenames[i]}; the shards were changed, re-run `jaguar prep`")
        shard = self._shard_urls[min(int(np.searchsorted(self._shard_ends, i, side="right")), len(self._shard_urls) - 1)]
        return decode_rgba(sample, f"sample {i} ({meta['filename']}) of {self.split!r} in shard "
                                   f"{self.shards_dir / shard}", 1 if reduction is None else reduction(meta)), meta
