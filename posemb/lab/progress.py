"""Progress bars (tqdm) counted in tokens, so the rate reads as tokens/s and the ETA is honest,
plus a study-level log line with the estimated time left. Only rank 0 of a DDP job draws bars."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator

from tqdm.auto import tqdm


class NullBar:
    """Stands in for a bar when progress is off (tests, non-zero DDP ranks)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


@contextmanager
def token_bar(total_tokens: int, desc: str, *, enabled: bool = True, initial: int = 0) -> Iterator[tqdm | NullBar]:
    """A bar over ``total_tokens`` tokens (``initial`` already done, e.g. when resuming)."""
    if not enabled:
        yield NullBar()
        return
    bar = tqdm(total=total_tokens, initial=initial, desc=desc, unit="tok", unit_scale=True, leave=False,
               dynamic_ncols=True, file=sys.stderr, smoothing=0.1)
    try:
        yield bar
    finally:
        bar.close()


class StudyLog:
    """One line per event: ``[run 3/10 | 2m31s elapsed | ~5m00s left] rope seed 0: training``.

    The estimate is the mean time of the runs done in this process times the runs left, so it is
    only as good as the runs are alike (content-site schemes are slower than the others).
    """

    def __init__(self, total_runs: int, *, enabled: bool = True, warnings: bool = True) -> None:
        self.total_runs = total_runs
        self.enabled = enabled
        self.warnings = warnings
        self.start = time.perf_counter()
        self.done_durations: list[float] = []
        self.current = 0
        self.finished = False

    def begin_run(self, index: int) -> None:
        self.current = index
        self._run_start = time.perf_counter()

    def end_run(self, *, worked: bool) -> None:
        if worked:
            self.done_durations.append(time.perf_counter() - self._run_start)

    def finish(self) -> None:
        self.finished = True

    def warn(self, message: str) -> None:
        """A line the user must see (a damaged file set aside), even with progress off."""
        if self.warnings:
            tqdm.write(f"posemb study: warning: {message}", file=sys.stderr)

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        left = ""
        if self.done_durations and 0 < self.current <= self.total_runs and not self.finished:
            remaining = self.total_runs - self.current + 1  # the current run is not finished
            mean = sum(self.done_durations) / len(self.done_durations)
            left = f" | ~{format_seconds(mean * remaining)} left"
        where = f"run {self.current}/{self.total_runs}" if 0 < self.current and not self.finished else "study"
        tqdm.write(f"[{where} | {format_seconds(elapsed)} elapsed{left}] {message}", file=sys.stderr)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
