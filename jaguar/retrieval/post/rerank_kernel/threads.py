"""What the kernel does differently on the CPU: its worker threads (`Workers`) and two numpy
shortcuts (a k-smallest selection and a stable sort of small keys). Everywhere else, and on
other devices, the kernel is plain torch ops; `on_host` is the one switch between the two."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, TypeVar

import numpy as np
import torch

_T = TypeVar("_T")


def on_host(device: torch.device) -> bool:
    """Whether the CPU shortcuts apply (numpy selections and sorts, worker threads); elsewhere the
    same kernel runs on torch ops alone, on the calling thread. The tests turn it off to run that
    path on the CPU."""
    return device.type == "cpu"


def _one_intra_op_thread() -> None:
    """Set this thread's torch intra-op count to 1. torch gives a thread the process default on
    its first use of threads (get_num_threads is one), which would undo a count set before it."""
    torch.get_num_threads()
    torch.set_num_threads(1)


class Workers:
    """Python threads that the kernel's row loops are shared out to, each running torch on one
    intra-op thread. A context manager: the threads exist between __enter__ and __exit__; a
    `Workers` that is not entered (or has one thread) runs everything on the calling thread.

    Why: the dense kernel is hundreds of ops on tensors of ~N x 100 elements. torch's intra-op
    threads wake for every op and spin until all arrive: on a busy 2-core machine a descheduled
    thread made each op wait (N = 371: 0.69 s with 2 threads against 0.04 s with 1). Threads that
    each run whole chunks of rows on one intra-op thread apiece need no such rendezvous (torch
    releases the GIL inside each op), and one that is descheduled holds up nobody until the
    chunks are joined; each output row is written by one thread.

    Thread counts: each worker sets its own intra-op count to 1 (`torch.set_num_threads` sets the
    calling thread's OpenMP and MKL counts; other threads keep theirs). It also records the value
    as the default for threads that first use torch later, so __enter__ writes back the entering
    thread's own count once the workers are set up; nothing else in the process changes. One
    `Workers` may serve several calls, from several threads at once: a job that no worker has
    started yet when its caller waits for it runs on the caller's thread, so no call waits on
    another's jobs."""

    def __init__(self, threads: int | None = None) -> None:
        """threads: how many threads share a call's row chunks (default: the entering thread's
        torch intra-op count, so the kernel uses as many cores as torch would)."""
        if threads is not None and int(threads) < 1:
            raise ValueError(f"Workers needs threads >= 1, got {threads}")
        self._requested = None if threads is None else int(threads)
        self.threads = self._requested or 1  # until entered, everything runs on the calling thread
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> Workers:
        if self._pool is not None:
            raise RuntimeError("this Workers is already entered; use a second one or share it")
        own = torch.get_num_threads()
        self.threads = self._requested or own
        if self.threads > 1:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="jaguar-rerank",
                                            initializer=_one_intra_op_thread)
            # Start every thread now (each waits until all run), then restore the default.
            started = threading.Barrier(self.threads)
            list(self._pool.map(lambda _: started.wait(), range(self.threads)))
            torch.set_num_threads(own)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def parts(self, device: torch.device) -> int:
        """How many pieces a row loop on `device` is split into: the thread count on the CPU when
        entered, one otherwise (a GPU already queues one thread's ops asynchronously)."""
        return self.threads if self._pool is not None and on_host(device) else 1

    def run(self, device: torch.device, function: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """function(*args, **kwargs) on a worker thread (one intra-op thread) when the work is on the
        CPU, else here: the calling thread's torch settings (and CUDA stream) are never touched.
        Not for use inside a job of this Workers (it would wait for a thread that job holds)."""
        if self.parts(device) == 1:
            return function(*args, **kwargs)
        return self._pool.submit(function, *args, **kwargs).result()

    def map(self, jobs: list[Callable[[], _T]]) -> list[_T]:
        """Run the jobs, the first on this thread and the others on worker threads; their results
        in order. An exception in any job is raised here, after all of them have stopped."""
        if self._pool is None or len(jobs) == 1:
            return [job() for job in jobs]
        futures = [self._pool.submit(job) for job in jobs[1:]]
        try:
            results = [jobs[0]()]
            for future, job in zip(futures, jobs[1:]):
                results.append(job() if future.cancel() else future.result())
        finally:  # what has not started will not; wait for what has (a cancelled one never ends)
            wait([future for future in futures if not future.cancel()])
        return results


def run_on_workers(workers: Workers | None, device: torch.device, function: Callable[..., _T], *args: Any) -> _T:
    """function(*args, workers=...) through `Workers.run` on the given workers, or on workers made
    for this call (as many threads as the caller's torch intra-op count, one off the CPU)."""
    if workers is not None:
        return workers.run(device, function, *args, workers=workers)
    with Workers(None if on_host(device) else 1) as owned:
        return owned.run(device, function, *args, workers=owned)


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """range(n) as `parts` contiguous (start, stop) pieces of near-equal size (fewer when n is small)."""
    parts = max(1, min(parts, n))
    edges = [n * p // parts for p in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def k_smallest_set(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns, tied): the columns of the k smallest entries of each row (in column order), and
    the rows where that set is not unique, i.e. the (k+1)-th smallest equals the k-th; those rows
    come back with their first k columns, for the caller to redo. numpy's introselect has a far
    smaller per-row cost than torch.topk/kthvalue on CPU (0.8 vs 5.5 ms for 2,000 x 250)."""
    n_rows, width = values.shape
    if k >= width:
        return (torch.arange(width, device=values.device).expand(n_rows, -1),
                torch.zeros(n_rows, dtype=torch.bool, device=values.device))
    if on_host(values.device):
        parted = torch.from_numpy(np.partition(values.contiguous().numpy(), k - 1, axis=1))
        kth, following = parted[:, k - 1], parted[:, k:].amin(dim=1)
    else:
        two = torch.topk(values, k + 1, dim=1, largest=False, sorted=True).values
        kth, following = two[:, k - 1], two[:, k]
    tied = following == kth
    # Exactly k entries are <= the k-th smallest where the (k+1)-th is larger.
    member = (values <= kth[:, None]) if not bool(tied.any()) else torch.where(
        tied[:, None], torch.arange(width, device=values.device) < k, values <= kth[:, None])
    return member.nonzero()[:, 1].view(n_rows, k), tied


def stable_order(key: torch.Tensor) -> torch.Tensor:
    """The permutation that sorts a 1-D non-negative integer key stably."""
    if on_host(key.device) and key.numel() and int(key.max()) < 1 << 16:
        # numpy sorts 16-bit keys with a stable radix sort: ~10x torch.sort at N = 2,000.
        return torch.from_numpy(np.argsort(key.numpy().astype(np.uint16), kind="stable"))
    return torch.sort(key, stable=True).indices
