"""One writer at a time: an advisory lock on a lock file (`fcntl.flock`) that a run folder's writers
(train, extract, tune-post, submit, rank, score, calibrate, report, ...) and a gallery's writers
(enrol) hold while they write. A second writer refuses, naming the holder (pid, host, command,
since when) that the lock file records, or waits for it with JAGUAR_LOCK_WAIT=SECONDS. Readers take
no lock and never block.

The kernel drops a flock when its process ends, however it ends (kill -9 included), so a dead
writer's lock is never in the way; the holder it recorded is overwritten by the next one. Under a
multi-process launch only the launcher's rank 0 takes the lock (`launch_rank`), for the whole job.

Where flock holds: local file systems; NFS (Linux clients map flock to NFS byte-range locks, held
across clients when the server runs lockd / NFSv4); Lustre mounted with `-o flock` (across nodes) or
`localflock` (one node only). Where the file system refuses locks (Lustre `noflock`, some FUSE
mounts), the lock file alone is used: a holder recorded by a live process on this host refuses a
second writer, a dead one on this host is recognised as stale and replaced, and one recorded on
another host is only reported (remove the file once that job has ended)."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from jaguar.errors import JaguarError

log = logging.getLogger(__name__)

WAIT_VARIABLE = "JAGUAR_LOCK_WAIT"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class LockError(JaguarError):
    """Another writer holds the folder's lock; the message names it and what to do."""


def launch_rank() -> int:
    """This process's rank as the launcher (torchrun, accelerate, srun via torchrun) set it; 0 alone."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (it has not recorded itself yet)"
    return (f"{holder.get('command', 'a jaguar command')} (pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')}, since {holder.get('since', '?')})")


class WriterLock:
    """The lock of one folder's writers, held from `acquire` to `release` (or as a context manager).

    path: the lock file; what: the folder in words for messages ("run folder runs/x"); command: the
    holder's command line in words ("jaguar train"). `wait` (seconds; default $JAGUAR_LOCK_WAIT or 0)
    waits that long for the holder before refusing. Raises LockError naming the holder."""

    def __init__(self, path: Path, what: str, command: str, wait: Optional[float] = None) -> None:
        self.path = Path(path)
        self.what = what
        self.command = command
        self.wait = float(os.environ.get(WAIT_VARIABLE, "0") or 0) if wait is None else wait
        self._fd: Optional[int] = None
        self._file_only = False

    def holder(self) -> dict:
        """The holder the lock file records ({} when none or unreadable)."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _record(self) -> None:
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                             "since": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")})
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, record.encode(), 0)

    def _try_file_only(self) -> bool:
        holder = self.holder()
        if holder and holder.get("pid") != os.getpid():
            if holder.get("host") != socket.gethostname() or _alive(int(holder.get("pid", 0))):
                return False
            log.warning("%s: the lock of %s (pid %s) has ended; taking its place", self.path,
                        holder.get("command"), holder.get("pid"))
        return True

    def acquire(self) -> "WriterLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                if self._file_only:
                    if not self._try_file_only():
                        raise BlockingIOError
                else:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(min(1.0, max(deadline - time.monotonic(), 0.01)))
                    continue
                holder = self.holder()
                os.close(self._fd)
                self._fd = None
                raise LockError(
                    f"{self.what} is being written by {_describe(holder)}: one writer at a time. Wait for it to "
                    f"finish (or set {WAIT_VARIABLE}=SECONDS to wait), or use another folder; lock file "
                    f"{self.path}" + (" (if that job has ended, remove the file)" if self._file_only else "")
                ) from None
            except OSError as err:
                if err.errno not in _NO_LOCKS or self._file_only:
                    raise
                log.warning("%s: this file system offers no flock (%s); the lock file alone keeps writers "
                            "apart, on this host only", self.path, err.strerror)
                self._file_only = True
        self._record()
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # the next reader of the file sees no holder
            if not self._file_only:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except OSError:
            pass


class NoLock:
    """Stands in for a WriterLock on ranks other than the launcher's 0 (rank 0 holds the job's lock)."""

    def acquire(self) -> "NoLock":
        return self

    def release(self) -> None:
        pass

    def __enter__(self) -> "NoLock":
        return self

    def __exit__(self, *exc) -> None:
        pass
