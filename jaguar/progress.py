"""Progress reporting for long loops (prep, synth, extract): tqdm's live bar on a terminal; on a
redirected stream (a log file, Slurm's output) one plain line every `LOG_INTERVAL_S` seconds, plus
one at the start and one at the end. tqdm alone refreshes a redirected stream with a carriage
return many times a second, which leaves a log unreadable."""

from __future__ import annotations

import sys
from typing import IO, Iterable, Optional

from tqdm import tqdm

LOG_INTERVAL_S = 30.0
_LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {elapsed} elapsed, {remaining} left, {rate_fmt}{postfix}"
_LOG_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit}, {elapsed} elapsed, {rate_fmt}{postfix}"


class _Lines:
    """A file for tqdm that turns each of its refreshes ('\\r' + text + padding) into one line, and
    drops a refresh that repeats the previous count (tqdm's closing one after a last update)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._last = None

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        count = text.split(",", 1)[0]  # "{desc}: {n}/{total} {unit} (p%)" in both formats
        if text and count != self._last:
            self.stream.write(text + "\n")
            self._last = count

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", initial: int = 0, enabled: bool = True, stream: Optional[IO[str]] = None,
                 interval: float = LOG_INTERVAL_S) -> tqdm:
    """A tqdm over `iterable` (or updated by hand with `.update(n)`) that writes to `stream`
    (default stderr): a live bar when it is a terminal, else a plain line every `interval` seconds
    (and at the start and the end). `enabled=False` shows nothing (e.g. on every process but the
    main one)."""
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return tqdm(iterable, total=total, initial=initial, disable=True)
    if _is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream, dynamic_ncols=True)
    # tqdm prints when `mininterval` has passed at an update; maxinterval bounds how far its monitor
    # thread may lower the updates-between-checks, so the two together give one line per interval.
    fmt = _LOG_FORMAT if (total if total is not None else _len(iterable)) else _LOG_FORMAT_NO_TOTAL
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=_Lines(stream),
                mininterval=interval, maxinterval=interval, bar_format=fmt, ascii=True)


def _len(iterable: Optional[Iterable]) -> Optional[int]:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None
