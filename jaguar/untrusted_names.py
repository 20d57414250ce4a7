"""Names read from data files -- CSV rows, label files, manifests, wids indexes, shard keys -- are untrusted
input: a downloaded data set may name `../../elsewhere.png`. Every such name is checked here, and joined to
its folder here, so it stays inside that folder or is refused with an error naming where it was read.

A valid name is a relative path of plain '/'-separated segments: not empty, no NUL or other control
character, no backslash (a Windows separator), no drive letter or URL scheme ('C:', 'file:'), no leading
'/', no empty, '.' or '..' segment; and, joined to its folder, it must not resolve (through symbolic
links) to a place outside that folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from jaguar.errors import JaguarError

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE_OR_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class UnsafeNameError(JaguarError, ValueError):
    """A name from a data file that is no plain relative name or leads outside its folder; the message
    names the file and row it came from."""


def name_problem(name: object) -> str | None:
    """Why `name` is not a plain relative name (see the module docstring), or None when it is one."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a text name"
    if not name.strip():
        return "is empty"
    control = _CONTROL.search(name)
    if control:
        which = "a NUL" if control.group() == "\x00" else f"the control character U+{ord(control.group()):04X}"
        return f"contains {which} character"
    if "\\" in name:
        return "contains a backslash (a Windows separator); names in data files use '/'"
    if _DRIVE_OR_SCHEME.match(name):
        return "begins with a drive letter or URL scheme (like 'C:' or 'file:'); give a name relative to its folder"
    if name.startswith("/"):
        return "is an absolute path; give a name relative to its folder"
    segments = name.split("/")
    if ".." in segments:
        return "has a '..' segment, which leads out of its folder"
    if any(segment in ("", ".") for segment in segments):
        return "has an empty or '.' segment ('a//b', 'a/./b' or a trailing '/'); give the plain name"
    return None


def check_name(name: object, where: str) -> str:
    """`name` when it is a plain relative name; else UnsafeNameError naming `where` (file and row)."""
    problem = name_problem(name)
    if problem:
        raise UnsafeNameError(f"{where}: the name {name!r} {problem}")
    return name  # type: ignore[return-value]


def resolve_inside(folder: str | Path, name: object, where: str) -> Path:
    """`folder / name` after checking that `name` is a plain relative name and that the joined path,
    symbolic links followed, stays inside `folder`. A missing file is not an error here (its reader
    reports it). Raises UnsafeNameError naming `where`, the name and what is wrong."""
    path = Path(folder) / check_name(name, where)
    real_folder, real = Path(folder).resolve(), path.resolve()
    if real != real_folder and real_folder not in real.parents:
        raise UnsafeNameError(f"{where}: the name {name!r} leads to {real} through a symbolic link, outside "
                              f"{folder}; copy the file into the folder instead of linking to it")
    return path
