"""Crash-safe file writing: everything a run keeps is written to a temporary name, then renamed.

A temporary name carries its writer's host and pid (`.NAME.HOST-PID.XXXX.tmp` / `.partial`), so the
next writer of the same file removes what a killed one left (`remove_leftovers`). A full disk, a
quota, a read-only or forbidden folder is a `WriteError` (a JaguarError) naming the file, the cause
("disk full on /data: 20.0 MB free") and what was kept (`write_failed`)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NoReturn, Optional

from jaguar.errors import JaguarError


class WriteError(JaguarError, OSError):
    """A file could not be written (disk full, no permission, read-only); the message names it, the
    cause and what was kept."""


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_FORBIDDEN = (errno.EACCES, errno.EPERM, errno.EROFS)


def _size_text(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return ""


def _free_space(path: Path) -> Optional[int]:
    for folder in (Path(path), *Path(path).parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def write_failed(path: Path, err: BaseException, kept: str, remove: Optional[Path] = None) -> NoReturn:
    """Raise the WriteError for `err` raised while writing `path` (`kept`: what is left as it was),
    after removing the half-written `remove` (file or folder); re-raise `err` when it is neither a
    full disk nor a refused write. Libraries report a full disk in their own types: safetensors as
    a SafetensorError saying "No space left on device (os error 28)", torch as a RuntimeError
    ("unexpected pos", "file write failed"), taken as one when under 1 MB is left."""
    path = Path(path)
    if remove is not None:
        shutil.rmtree(remove, ignore_errors=True) if Path(remove).is_dir() else Path(remove).unlink(missing_ok=True)
    code = getattr(err, "errno", None)
    free = _free_space(path.parent)
    free_text = f"{_size_text(free)} free" if free is not None else "free space unknown"
    text = str(err)
    said_full = "No space left" in text or "os error 28" in text or "Disk quota exceeded" in text
    if code in _DISK_FULL or said_full or (isinstance(err, RuntimeError) and free is not None and free < (1 << 20)):
        raise WriteError(f"could not write {path}: disk full on {path.parent} ({free_text}); {kept}. Free some "
                         f"space (or point the output elsewhere) and run the command again") from err
    if code in _FORBIDDEN:
        cause = "read-only file system" if code == errno.EROFS else "permission denied"
        raise WriteError(f"could not write {path}: {cause} ({err.strerror}); {kept}. Write somewhere you "
                         f"may write, or fix the folder's permissions") from err
    raise err


def _owner_tag() -> str:
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_leftovers(path: Path, suffix: str) -> list[Path]:
    """Remove the temporaries of `path` (suffix ".tmp" or ".partial") that a writer on this host left
    when it was killed (its pid is gone); those of live writers and of other hosts stay. Returns
    what was removed."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[^.]+{re.escape(suffix)}$")
    host = _owner_tag().rsplit("-", 1)[0]
    removed = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for sibling in siblings:
        match = pattern.match(sibling.name)
        if match and match["host"] == host and not _alive(int(match["pid"])):
            shutil.rmtree(sibling, ignore_errors=True) if sibling.is_dir() else sibling.unlink(missing_ok=True)
            removed.append(sibling)
    return removed


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{_owner_tag()}."


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through `atomic_file`: complete, or untouched (and a WriteError)."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def _body_failed(final: Path, err: OSError, tmp: Path) -> NoReturn:
    """An OSError while the caller wrote the temporary `tmp` of `final`: a full disk is a WriteError;
    anything else (reading an input, say) is the caller's to report. `tmp` is removed either way."""
    if getattr(err, "errno", None) in _DISK_FULL and not isinstance(err, JaguarError):
        write_failed(final, err, _kept(final), remove=tmp)
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    raise err


def _kept(path: Path) -> str:
    return f"the earlier {path.name} is kept as it was" if path.exists() else f"{path.name} was not written"


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write (e.g. streamed, chunk by chunk); on success it
    becomes `path` in one rename, on any error it is removed: `path` is complete or untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(path, ".tmp")
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as err:
        write_failed(path, err, "nothing was written")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as err:
        _body_failed(path, err, Path(tmp))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: object, allow_nan: bool = True) -> None:
    """Write `obj` as JSON; allow_nan=False raises ValueError (nothing written) for a NaN or
    infinity, which strict JSON readers reject."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=allow_nan) + "\n")


def replace_directory(complete: Path, final: Path) -> None:
    """Move the finished folder `complete` to `final`, replacing any folder there. `final` is never
    half-written: it is the old folder, or the new one, or (between two renames) absent."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(complete, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(complete, final)


@contextmanager
def atomic_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it becomes `final` in one rename.

    On any error the temporary folder is removed, so `final` is either complete or absent."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(final, ".partial")
        tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(final), suffix=".partial", dir=final.parent))
    except OSError as err:
        write_failed(final, err, "nothing was written")
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the result is shared data
    try:
        yield tmp
        if final.exists() and not overwrite:
            raise FileExistsError(f"{final} already exists; remove it or choose another output")
        replace_directory(tmp, final)
    except OSError as err:
        _body_failed(final, err, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
