"""The one base class of user-facing errors. Every failure a user can fix (a bad config key, a
missing or malformed input file, a value out of range) is a `JaguarError` whose message names the
file, key or value at fault and what to do next; `jaguar.cli.main` catches it once and prints it
(exit status 2, no traceback). Each module keeps its own subclass (ConfigError, SubmissionError,
...), so callers can still catch the narrower kind."""

from __future__ import annotations


class JaguarError(Exception):
    """A failure the user can fix; its message names the file, key or value at fault."""


class MissingInputError(JaguarError, FileNotFoundError):
    """An input file or folder a stage needs is absent; the message names it and the command that
    produces it."""


class Interrupted(KeyboardInterrupt):
    """A command stopped by Ctrl-C (SIGINT) or SIGTERM. `jaguar.cli.main` reports it once, in one
    line: what was interrupted, what was kept and the command that resumes (exit 128 + the signal
    number: 130 for SIGINT, 143 for SIGTERM; a traceback only with --debug or JAGUAR_DEBUG=1).
    `kept` is what the command kept, when it knows it better than the CLI does (e.g. the step of
    training's last checkpoint)."""

    def __init__(self, signum: int, kept: str | None = None) -> None:
        super().__init__(signum)
        self.signum = signum
        self.kept = kept
