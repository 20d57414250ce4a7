"""Preemption: SIGUSR1 (Slurm's warning signal), SIGTERM or the run folder's PREEMPT file asks a
running training to checkpoint at the next optimizer-step boundary and exit."""

from __future__ import annotations

import signal
from typing import Optional


class PreemptFlag:
    """Set by SIGUSR1/SIGTERM; the loop checkpoints and exits at the next optimizer-step boundary."""

    def __init__(self) -> None:
        self.raised = False
        self.signum: Optional[int] = None  # which signal (None: the run folder's PREEMPT file)
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. under some test runners)
                pass

    def _handle(self, signum, frame) -> None:
        self.raised = True
        self.signum = signum
