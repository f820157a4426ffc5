"""Decoder rows: where a window's rows go, and how windows share cross-attention K/V.

A window takes a contiguous run of rows of the engine's caches (1 for greedy, beam_size or
best_of otherwise). `first_fit` is the one placement rule: the scheduler plans with it which
waiting windows fit (a RowPlan), and the decode loop puts each window where the plan put it.
"""

from __future__ import annotations

from app.decoding.search import rows_needed
from app.decoding.window import WindowTask


def first_fit(taken: list[bool], k: int, before: int | None = None) -> int | None:
    """Start of the first run of k free rows below `before`, or None."""
    run = 0
    for r in range(len(taken) if before is None else before):
        run = 0 if taken[r] else run + 1
        if run == k:
            return r - k + 1
    return None


class RowPlan:
    """Windows placed on a copy of the decoder rows' occupancy, before they are admitted.

    Free runs are fragmented once windows finish in the middle of the span, so counting free
    rows does not tell whether a window fits; placing it does.
    """

    def __init__(self, taken: list[bool]) -> None:
        self._taken = taken
        self._starts: dict[int, int] = {}  # id(task) -> its first row

    @property
    def rows(self) -> int:
        """Rows of the engine: a window needing more never fits."""
        return len(self._taken)

    def place(self, task: WindowTask) -> int | None:
        """Take the first free run of the rows `task` needs; its first row, or None if none."""
        k = rows_needed(task.options)
        start = first_fit(self._taken, k)
        if start is not None:
            self._taken[start : start + k] = [True] * k
            self._starts[id(task)] = start
        return start

    def start_of(self, task: WindowTask) -> int | None:
        """Where `task` was placed, or None if it was not."""
        return self._starts.get(id(task))


def cross_runs(windows: list[tuple[int, int, int]]) -> list[tuple[int, int, int, int]]:
    """decode()'s cross_runs for windows (first row, rows, audio positions) in row order:
    adjacent windows with the same row count and audio length merge into one run."""
    runs: list[tuple[int, int, int, int]] = []
    for start, n_rows, n_audio in windows:
        if runs:
            offset, n, g, audio = runs[-1]
            if g == n_rows and audio == n_audio and offset + n == start:
                runs[-1] = (offset, n + g, g, audio)
                continue
        runs.append((start, n_rows, n_rows, n_audio))
    return runs
