"""Logging, configured once per process: by the CLI (`jaguar ...`) or by a recipe run as a script
(`accelerate launch recipes/x.py`), both through `configure_logging`. jaguar's own INFO lines on the
launcher's rank 0 only (the other ranks log warnings and errors), other libraries' from WARNING up
(their INFO chatter, e.g. tensorboard's "No path found" or accelerate's line per checkpoint file, is
not the user's business); everything at DEBUG with `verbose`."""

from __future__ import annotations

import logging

from jaguar.lock import launch_rank

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


_configured = False


def configure_logging(verbose: bool = False) -> None:
    """Set up the root handler and jaguar's levels for this process, once: a later call (the trainer's
    entry point under the CLI, say) leaves the first call's set-up as it is."""
    global _configured
    if _configured:
        return
    _configured = True
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format=FORMAT, datefmt="%H:%M:%S")
    own = logging.getLogger("jaguar")
    if verbose:
        own.setLevel(logging.DEBUG)
    else:
        own.setLevel(logging.INFO if launch_rank() == 0 else logging.WARNING)
        logging.getLogger("accelerate").setLevel(logging.WARNING)
