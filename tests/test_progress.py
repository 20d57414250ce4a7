"""Progress reporting (jaguar.progress): a live bar on a terminal; in a redirected log a few whole
lines (start, every interval, end), never a refresh per update."""

from __future__ import annotations

import io

from jaguar.progress import progress_bar


def test_a_redirected_stream_gets_whole_lines_not_a_refresh_per_update():
    log = io.StringIO()
    for _ in progress_bar(range(5000), desc="extract test", unit="img", stream=log, interval=3600):
        pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 2  # the start and the end, nothing in between within the interval
    assert lines[0].startswith("extract test: 0/5000 img (0%)")
    assert lines[-1].startswith("extract test: 5000/5000 img (100%)")


def test_lines_come_once_per_interval_and_carry_the_postfix():
    log = io.StringIO()
    bar = progress_bar(total=4, initial=1, desc="train", unit="step", stream=log, interval=0)
    for _ in range(3):
        bar.update(1)
        bar.set_postfix(loss="0.123", refresh=False)
    bar.close()
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("train: 1/4 step (25%)")  # a resumed count starts where it was
    assert [line.split(":")[1].split()[0] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]  # one line each
    assert lines[-1].endswith("loss=0.123")


def test_a_terminal_gets_the_live_bar_and_disabled_shows_nothing():
    tty = io.StringIO()
    tty.isatty = lambda: True  # type: ignore[method-assign]
    for _ in progress_bar(range(3), desc="prep", stream=tty):
        pass
    assert "\r" in tty.getvalue()  # tqdm's in-place refresh
    quiet = io.StringIO()
    assert list(progress_bar(range(3), stream=quiet, enabled=False)) == [0, 1, 2]
    assert quiet.getvalue() == ""
