"""Reading a run's TensorBoard events back as plain scalar series (tag -> steps, values)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from jaguar.errors import MissingInputError

logger = logging.getLogger(__name__)


@dataclass
class ScalarSeries:
    steps: list[int]
    values: list[float]

    def __len__(self) -> int:
        return len(self.steps)


def _event_dirs(tb_dir: Path) -> list[Path]:
    """Every folder under tb_dir holding event files (a resumed run may add files or sub-folders)."""
    return sorted({p.parent for p in tb_dir.rglob("events.out.tfevents.*")})


def read_scalars(tb_dir: str | Path) -> dict[str, ScalarSeries]:
    """All scalar tags under `tb_dir`, sorted by step.

    A run resumed from a checkpoint logs some steps twice (between the checkpoint and the crash);
    the value written last wins, which is the one the resumed training actually continued from."""
    # tensorboard's reader takes seconds to import and only the curves section needs it
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    tb_dir = Path(tb_dir)
    if not tb_dir.is_dir():
        raise MissingInputError(f"TensorBoard folder {tb_dir} does not exist; `jaguar train` writes it")
    by_tag: dict[str, dict[int, tuple[float, float]]] = {}
    for folder in _event_dirs(tb_dir):
        # size 0 keeps every event; the default reservoir-samples long runs down to 10,000 points
        accumulator = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
        try:
            accumulator.Reload()
        except Exception as err:  # a truncated last record from a killed run must not hide the rest
            logger.warning("could not read all TensorBoard events in %s: %s", folder, err)
        for tag in accumulator.Tags().get(SCALARS, []):
            prefix = "" if folder == tb_dir else f"{folder.relative_to(tb_dir).as_posix()}/"
            series = by_tag.setdefault(prefix + tag, {})
            for event in accumulator.Scalars(tag):
                previous = series.get(event.step)
                if previous is None or event.wall_time >= previous[0]:
                    series[event.step] = (event.wall_time, float(event.value))
    result = {}
    for tag, points in sorted(by_tag.items()):
        steps = sorted(points)
        result[tag] = ScalarSeries(steps, [points[s][1] for s in steps])
    return result
