"""Checksums of the files jaguar writes (checkpoint parts, weights; the manifest's sha256 scheme,
extended): a record {size, sha256, mtime_ns} per file taken when it is written, and the checks made
when it is read: the size always (a stat), the sha256 when asked or when the mtime moved (the file
was rewritten or copied without its times), so a truncated, bit-flipped or substituted file is named
before it is used.

A record kept beside the files proves they are unchanged, not who wrote them. Where a loader
unpickles (DeepSpeed's checkpoint engine reads its files with `weights_only=False`), a checkpoint must
also carry an HMAC-SHA256 of its records under this account's key (`signing_key`), so that only a
checkpoint jaguar wrote here is ever handed to it."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Optional

from jaguar.errors import JaguarError


class ChecksumError(JaguarError, ValueError):
    """A file that does not match the checksum recorded when jaguar wrote it; the message names it."""


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def arrays_sha256(arrays: dict, metadata: dict[str, str], dtype_name: Callable[[Any], str] = lambda dtype: dtype.str
                  ) -> str:
    """sha256 of a tensor file's content, independent of how the file lays it out: each numpy array's
    name, dtype (as `dtype_name` spells it), shape and bytes, then each metadata entry, in sorted
    order. Feature files (jaguar.core.features) and local-feature files (jaguar.retrieval.local.store)
    record it in their metadata and check it when read."""
    import numpy as np  # only where tensor files are written or read

    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{dtype_name(array.dtype)}|{tuple(array.shape)}|".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    for key in sorted(metadata):
        digest.update(f"{key}={metadata[key]}|".encode())
    return digest.hexdigest()


def file_record(path: Path) -> dict:
    """{size (bytes), sha256 (hex), mtime_ns} of a file, as it is now."""
    stat = Path(path).stat()
    return {"size": stat.st_size, "sha256": file_sha256(path), "mtime_ns": stat.st_mtime_ns}


def folder_records(folder: Path) -> dict[str, dict]:
    """The record of every file under `folder` (recursively), by its path relative to it ("/"-joined)."""
    folder = Path(folder)
    return {path.relative_to(folder).as_posix(): file_record(path)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def check_file(path: Path, record: dict, full: bool = False) -> Optional[str]:
    """The problem of `path` against its record (None = ok): missing, another size (truncated or
    replaced), or another sha256 (read when `full`, or when the mtime differs from the record's)."""
    path = Path(path)
    if not path.is_file():
        return f"{path}: missing (its checksum was recorded when it was written)"
    stat = path.stat()
    if stat.st_size != record["size"]:
        return f"{path}: {stat.st_size} bytes, {record['size']} when it was written (truncated or replaced)"
    if full or stat.st_mtime_ns != record.get("mtime_ns"):
        digest = file_sha256(path)
        if digest != record["sha256"]:
            return f"{path}: sha256 {digest[:16]}... differs from the one recorded when it was written " \
                   f"({record['sha256'][:16]}...): the file is corrupt or was changed"
    return None


def check_folder(folder: Path, records: dict[str, dict], full: bool = False, exempt: tuple[str, ...] = ()) -> list[str]:
    """Every problem of `folder` against `records` (empty = ok): each recorded file checked as
    `check_file` does, and each file present that was not recorded (placed there since) named;
    `exempt` names files written after the records (the file holding them)."""
    folder = Path(folder)
    problems = [problem for name, record in records.items()
                if (problem := check_file(folder / name, record, full)) is not None]
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name not in records and name not in exempt:
            problems.append(f"{path}: not written by jaguar with this checkpoint (no checksum recorded for it)")
    return problems


# ---------------------------------------------------------------------------------- signatures


def key_path() -> Path:
    """This account's signing key: $JAGUAR_KEY_FILE, else $XDG_CONFIG_HOME/jaguar/signing.key
    (~/.config when unset)."""
    if os.environ.get("JAGUAR_KEY_FILE"):
        return Path(os.environ["JAGUAR_KEY_FILE"])
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "jaguar" / "signing.key"


def signing_key(create: bool) -> Optional[bytes]:
    """The key (32 random bytes, a 0600 file) or None when absent and not `create`d."""
    path = key_path()
    if not path.is_file():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return path.read_bytes()
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(32))
    return path.read_bytes()


def _canonical(records: dict) -> bytes:
    return json.dumps({name: [r["size"], r["sha256"]] for name, r in records.items()}, sort_keys=True).encode()


def sign(records: dict) -> str:
    """HMAC-SHA256 (hex) of the records' names, sizes and hashes under this account's key."""
    return hmac.new(signing_key(create=True), _canonical(records), hashlib.sha256).hexdigest()


def signed_here(records: dict, signature: str) -> bool:
    """Whether `signature` is this account's HMAC of `records` (constant-time comparison)."""
    key = signing_key(create=False)
    if key is None or not signature:
        return False
    return hmac.compare_digest(hmac.new(key, _canonical(records), hashlib.sha256).hexdigest(), signature)
