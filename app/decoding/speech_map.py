"""Speech-only audio and the way back: times in the gated audio -> times in the original.

Gating (app.audio.vad) keeps the speech regions of a recording and drops the silences
between them; the decoder sees the regions joined end to end. Every timestamp it produces is
mapped back here, so segments and words point at where they were spoken.
"""

from __future__ import annotations

import bisect
from dataclasses import replace

import numpy as np

from app.constants import SAMPLE_RATE
from app.decoding.results import Segment, Word


class SpeechMap:
    """Regions [start, end) in samples of the original audio, joined in order."""

    def __init__(self, regions: list[tuple[int, int]]) -> None:
        if not regions:
            raise ValueError("a speech map needs at least one region")
        self.regions = regions
        self._gated_starts: list[float] = []  # seconds, in the joined audio
        self._gated_ends: list[float] = []
        self._offsets: list[float] = []  # original - gated, seconds, per region
        position = 0
        for start, end in regions:
            self._gated_starts.append(position / SAMPLE_RATE)
            self._offsets.append((start - position) / SAMPLE_RATE)
            position += end - start
            self._gated_ends.append(position / SAMPLE_RATE)
        self.gated_samples = position

    def is_identity(self, n_samples: int) -> bool:
        return self.regions == [(0, n_samples)]

    def gate(self, audio: np.ndarray) -> np.ndarray:
        """The regions of `audio` joined end to end (no copy when one region is all of it)."""
        if self.is_identity(len(audio)):
            return audio
        return np.concatenate([audio[start:end] for start, end in self.regions])

    def next_start(self, t: float) -> float | None:
        """Gated time at which the first region starting at or after gated time `t` begins."""
        index = bisect.bisect_left(self._gated_starts, t)
        return self._gated_starts[index] if index < len(self._gated_starts) else None

    def region_of(self, t: float, *, is_end: bool = False) -> int:
        """Index of the region a gated time falls in; an end exactly at a join belongs to the
        region before it."""
        ends = self._gated_ends
        index = bisect.bisect_left(ends, t) if is_end else bisect.bisect_right(ends, t)
        return min(index, len(ends) - 1)

    def original(self, t: float, *, is_end: bool = False, region: int | None = None) -> float:
        """Original time of gated time `t`, within `region` (default: the one `t` is in)."""
        index = self.region_of(t, is_end=is_end) if region is None else region
        start, end = self.regions[index]
        mapped = t + self._offsets[index]
        return min(max(mapped, start / SAMPLE_RATE), end / SAMPLE_RATE)

    def word(self, word: Word) -> Word:
        # Both ends with the region of the word's start: a word never spans a removed silence.
        region = self.region_of(word.start)
        start = self.original(word.start, region=region)
        end = max(start, self.original(word.end, region=region))
        return replace(word, start=round(start, 3), end=round(end, 3))

    def segment(self, segment: Segment) -> Segment:
        start = self.original(segment.start)
        end = max(start, self.original(segment.end, is_end=True))
        words = [self.word(w) for w in segment.words] if segment.words is not None else None
        if words:
            start, end = min(start, words[0].start), max(end, words[-1].end)
        return replace(segment, start=round(start, 3), end=round(end, 3), words=words)
