"""Byte progress bars for the slow steps (join, parse, write) of big files."""

from __future__ import annotations

from tqdm import tqdm

#: Below this a file is read or written in well under a second; a bar would only flicker.
MIN_BYTES_FOR_BAR = 32 * 1024 * 1024


def byte_progress(total: int, desc: str) -> tqdm:
    """A bar counting bytes; hidden for small totals and when stderr is not a terminal."""
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        leave=False,
        # None lets tqdm hide the bar on non-terminals (logs, CI, tests).
        disable=None if total >= MIN_BYTES_FOR_BAR else True,
    )
