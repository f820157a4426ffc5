"""The uncommitted input audio of a session, addressed by absolute sample positions.

Positions count 16 kHz samples since the session's first audio, so VAD times, turn starts
and OpenAI's `audio_start_ms` / `audio_end_ms` all refer to the same clock even after the
head of the buffer has been committed or dropped.
"""

from __future__ import annotations

import numpy as np

from app.constants import SAMPLE_RATE


class AudioBuffer:
    def __init__(self, initial_capacity: int = SAMPLE_RATE * 10) -> None:  # 10 s to start
        self._data = np.zeros(initial_capacity, dtype=np.float32)
        self._used = 0  # samples stored in _data
        self.start = 0  # absolute position of _data[0]

    @property
    def end(self) -> int:
        """Absolute position just past the newest sample."""
        return self.start + self._used

    def __len__(self) -> int:
        return self._used

    def append(self, samples: np.ndarray) -> None:
        n = samples.shape[0]
        if self._used + n > self._data.shape[0]:
            # Doubling keeps appends amortised O(1) for 100 ms chunks.
            grown = np.zeros(max(self._data.shape[0] * 2, self._used + n), dtype=np.float32)
            grown[: self._used] = self._data[: self._used]
            self._data = grown
        self._data[self._used : self._used + n] = samples
        self._used += n

    def slice(self, begin: int, end: int) -> np.ndarray:
        """A copy of [begin, end) (clamped to what is held): decodes run while audio arrives."""
        a = max(begin, self.start) - self.start
        b = min(end, self.end) - self.start
        return self._data[a:b].copy() if b > a else np.zeros(0, dtype=np.float32)

    def drop_before(self, position: int) -> None:
        """Forget everything before `position` (committed, or silence older than we keep)."""
        cut = min(max(position, self.start), self.end) - self.start
        if cut <= 0:
            return
        remaining = self._used - cut
        self._data[:remaining] = self._data[cut : self._used]
        self._used = remaining
        self.start += cut

    def clear(self) -> None:
        self.drop_before(self.end)
