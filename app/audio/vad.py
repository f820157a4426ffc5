"""Energy-based voice activity detection: no model file, fast enough for hours of audio.

Used to (1) cut long audio into <= 30 s chunks at pauses, so no word straddles a window
boundary and long silences are never sent to the model, and (2) drive turn detection in
realtime streaming (`StreamingVad`, OpenAI Realtime "server_vad" semantics).

It measures frame RMS in dB and calls a frame speech when it stands out both from the
loudest part of the recording and from the local noise floor. It cannot tell speech from
other sounds (music, a constant tone), so it errs towards keeping audio: Whisper copes with
non-speech much better than with words that were cut off.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from app.audio.constants import SAMPLE_RATE

FRAME_S: float = 0.02  # analysis frame; also the time resolution of the results
_SILENCE_DB: float = -120.0  # energy reported for digital silence (log of 0)
_NOISE_PERCENTILE: float = 10.0  # streaming noise floor: this percentile of recent frames


def frame_energy_db(audio: np.ndarray, frame_samples: int) -> np.ndarray:
    """Mean-square energy (dBFS) of consecutive non-overlapping frames; a short tail frame
    is measured over the samples it has."""
    x = np.asarray(audio, dtype=np.float32)
    n_full = x.shape[0] // frame_samples
    power = np.square(x[: n_full * frame_samples], dtype=np.float64)
    power = power.reshape(n_full, frame_samples).mean(axis=1)
    tail = x[n_full * frame_samples :]
    if tail.size:
        power = np.append(power, np.mean(np.square(tail, dtype=np.float64)))
    return 10.0 * np.log10(np.maximum(power, 10 ** (_SILENCE_DB / 10)))


def _smooth_db(energy_db: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average of dB values taken in the power domain (a loud frame next to
    digital silence stays loud instead of averaging with -120 dB)."""
    power = _moving(10.0 ** (energy_db / 10.0), width, "mean")
    return 10.0 * np.log10(np.maximum(power, 10 ** (_SILENCE_DB / 10)))


def _moving(values: np.ndarray, width: int, reduce: str) -> np.ndarray:
    """Centred moving mean/min over `width` frames, with edges using the frames they have."""
    if width <= 1 or values.size == 0:
        return values.copy()
    half = width // 2
    fill = np.inf if reduce == "min" else np.nan
    padded = np.concatenate([np.full(half, fill), values, np.full(width - 1 - half, fill)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, width)
    return windows.min(axis=1) if reduce == "min" else np.nanmean(windows, axis=1)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index pairs of the True runs in a boolean array."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(
        zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True)
    )


@dataclass(frozen=True)
class VadConfig:
    """Offline detector settings. Levels are in dB; durations in seconds."""

    #: A frame this far below the loudest frame is never speech (dynamic range kept).
    relative_db: float = -40.0
    #: Frames below this absolute level (dBFS RMS) are never speech.
    absolute_db: float = -60.0
    #: How far above the local noise floor a frame must rise to start speech.
    snr_db: float = 10.0
    #: Once in speech, stay in it until the energy drops this much below the start level.
    hysteresis_db: float = 6.0
    #: Window over which the local noise floor (a running minimum) is taken. Long enough to
    #: hold a real pause, so a soft passage is not mistaken for the noise floor.
    noise_window_s: float = 5.0
    min_speech_s: float = 0.1  # shorter bursts (clicks) are dropped
    min_silence_s: float = 0.3  # shorter pauses are bridged
    pad_s: float = 0.1  # kept around each region so word onsets/offsets survive


@dataclass(frozen=True)
class _Analysis:
    energy_db: np.ndarray  # per frame
    speech: np.ndarray  # bool per frame, after bridging, dropping and padding
    frame_samples: int


def _analyse(audio: np.ndarray, sample_rate: int, config: VadConfig) -> _Analysis:
    frame_samples = max(1, round(sample_rate * FRAME_S))
    energy = frame_energy_db(audio, frame_samples)
    speech = np.zeros(energy.shape[0], dtype=bool)
    if energy.size == 0 or energy.max() < config.absolute_db:
        return _Analysis(energy, speech, frame_samples)

    loudest = float(energy.max())
    smooth = _smooth_db(energy, 3)
    noise = _moving(smooth, max(1, round(config.noise_window_s / FRAME_S)), "min")
    # Near-constant loud sound (a tone, or speech with no pause in the whole window) pushes
    # the noise floor up to the signal itself; capping the SNR requirement at
    # "within 6 dB of the loudest frame" keeps such frames as speech.
    floor_based = np.minimum(noise + config.snr_db, loudest - 6.0)
    start_level = np.maximum(floor_based, max(config.absolute_db, loudest + config.relative_db))
    stay_level = start_level - config.hysteresis_db

    active = False
    for i, level in enumerate(smooth.tolist()):
        active = level > (stay_level[i] if active else start_level[i])
        speech[i] = active

    _bridge_and_pad(speech, config)
    return _Analysis(energy, speech, frame_samples)


def _bridge_and_pad(speech: np.ndarray, config: VadConfig) -> None:
    """In place: fill short gaps, drop short bursts, then widen every region by pad_s."""
    min_gap = round(config.min_silence_s / FRAME_S)
    min_len = round(config.min_speech_s / FRAME_S)
    pad = round(config.pad_s / FRAME_S)
    runs = _runs(speech)
    for (_, end), (start, _) in zip(runs, runs[1:], strict=False):
        if start - end < min_gap:
            speech[end:start] = True
    for start, end in _runs(speech):
        if end - start < min_len:
            speech[start:end] = False
    for start, end in _runs(speech):
        speech[max(0, start - pad) : end + pad] = True


def speech_regions(
    audio: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    config: VadConfig | None = None,
) -> list[tuple[float, float]]:
    """(start_s, end_s) of each speech region, padded by `config.pad_s`, in time order."""
    analysis = _analyse(audio, sample_rate, config or VadConfig())
    duration = len(audio) / sample_rate
    frame = analysis.frame_samples / sample_rate
    return [
        (round(start * frame, 6), round(min(end * frame, duration), 6))
        for start, end in _runs(analysis.speech)
    ]


def chunk_at_pauses(
    audio: np.ndarray,
    *,
    max_chunk_s: float = 30.0,
    min_chunk_s: float | None = None,
    split_silence_s: float = 2.0,
    sample_rate: int = SAMPLE_RATE,
    config: VadConfig | None = None,
) -> list[tuple[int, int]]:
    """Split audio into [start, end) sample ranges of at most `max_chunk_s` each.

    Silence before the first and after the last speech, and any pause of `split_silence_s`
    or more, is left out; nothing else is. A stretch longer than `max_chunk_s` is cut
    between [min_chunk_s, max_chunk_s] from its start: at the quietest 100 ms of the
    longest pause there if any, else at the quietest 100 ms in that range; the next chunk
    starts where the previous one ends. min_chunk_s defaults to half of max_chunk_s.
    All-silent audio gives [].
    """
    if max_chunk_s <= FRAME_S:
        raise ValueError(f"max_chunk_s must exceed {FRAME_S} s, got {max_chunk_s}")
    analysis = _analyse(audio, sample_rate, config or VadConfig())
    hop = analysis.frame_samples
    max_frames = int(max_chunk_s * sample_rate) // hop
    min_frames = max_frames // 2 if min_chunk_s is None else round(min_chunk_s * sample_rate / hop)
    min_frames = min(max(1, min_frames), max_frames)
    quietness = _smooth_db(analysis.energy_db, 5)

    frames: list[tuple[int, int]] = []
    for group_start, group_end, gaps in _groups(analysis.speech, round(split_silence_s / FRAME_S)):
        start = group_start
        while group_end - start > max_frames:
            # Chunks inside a group are contiguous: a short "pause" might still hold a soft
            # word, so nothing but silences of split_silence_s or more is ever dropped.
            end = _cut(start, min_frames, max_frames, gaps, quietness)
            frames.append((start, end))
            start = end
        frames.append((start, group_end))
    n = len(audio)
    return [(s * hop, min(e * hop, n)) for s, e in frames if s * hop < n]


def _groups(speech: np.ndarray, split_frames: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Speech regions joined across pauses shorter than `split_frames`, with their pauses."""
    groups: list[tuple[int, int, list[tuple[int, int]]]] = []
    for start, end in _runs(speech):
        if groups and start - groups[-1][1] < split_frames:
            g_start, g_end, gaps = groups[-1]
            groups[-1] = (g_start, end, [*gaps, (g_end, start)])
        else:
            groups.append((start, end, []))
    return groups


def _cut(
    start: int,
    min_frames: int,
    max_frames: int,
    gaps: list[tuple[int, int]],
    quietness: np.ndarray,
) -> int:
    """Frame at which to end the chunk beginning at `start` (the next one starts there)."""
    lo, hi = start + min_frames, start + max_frames
    # Prefer the longest pause reaching into [lo, hi]; without one, the quietest point,
    # which within speech is usually a gap between words too short to count as a pause.
    usable = [(max(a, lo), min(b, hi)) for a, b in gaps if a < hi and b > lo]
    if usable:
        lo, hi = max(usable, key=lambda gap: (gap[1] - gap[0], gap[0]))
    window = quietness[lo : hi + 1]
    if window.size == 0:
        return hi
    # Middle of the longest stretch within 1 dB of the quietest level: in a silent pause
    # that is its centre, leaving both neighbouring words their full tails.
    start_q, end_q = max(_runs(window <= window.min() + 1.0), key=lambda r: r[1] - r[0])
    return lo + (start_q + end_q) // 2


class VadEvent(NamedTuple):
    """("speech_started" | "speech_stopped", seconds since the stream began)."""

    kind: str
    t: float


class StreamingVad:
    """Incremental speech start/stop detection for realtime audio (OpenAI server_vad style).

    `threshold` (0..1) maps linearly to a frame RMS level of -70..-10 dBFS (0.5 -> -40
    dBFS). Over the last `noise_window_s` the 10th-percentile frame is the noise floor,
    and a frame must also rise `snr_db` above it (but never more than to 6 dB below the
    loudest recent frame, so a steady loud voice or tone is not mistaken for noise).

    Events: ("speech_started", t) where t is the start of the first speech frame, reported
    once `min_speech_ms` of speech has been seen; ("speech_stopped", t) once
    `silence_duration_ms` of silence follows speech, where t = end of the last speech frame
    + silence_duration_ms (the point where it was decided, as OpenAI's `audio_end_ms`).
    `prefix_padding_ms` is kept for the consumer: audio to include before a start event.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        prefix_padding_ms: int = 300,
        silence_duration_ms: int = 500,
        sample_rate: int = SAMPLE_RATE,
        *,
        min_speech_ms: int = 60,
        snr_db: float = 10.0,
        hysteresis_db: float = 6.0,
        noise_window_s: float = 3.0,
    ) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be within 0..1, got {threshold}")
        self.threshold = threshold
        self.prefix_padding_ms = prefix_padding_ms
        self.silence_duration_ms = silence_duration_ms
        self.sample_rate = sample_rate
        self.threshold_db = -70.0 + 60.0 * threshold
        self._snr_db = snr_db
        self._hysteresis_db = hysteresis_db
        self._frame = max(1, round(sample_rate * FRAME_S))
        self._recent: deque[float] = deque(maxlen=max(1, round(noise_window_s / FRAME_S)))
        self._sorted: list[float] = []  # the same values as _recent, kept sorted
        self._last_powers: deque[float] = deque(maxlen=3)
        self._min_speech_frames = max(1, round(min_speech_ms / 1000 / FRAME_S))
        self._silence_frames = max(1, round(silence_duration_ms / 1000 / FRAME_S))
        self._pending = np.zeros(0, dtype=np.float32)
        self._frames_done = 0
        self.in_speech = False
        self._run = 0  # consecutive frames disagreeing with the current state
        self.speech_start_s: float | None = None
        self.last_speech_end_s: float | None = None

    @property
    def prefix_padding_s(self) -> float:
        return self.prefix_padding_ms / 1000.0

    @property
    def time_s(self) -> float:
        """Audio time consumed so far (complete frames only)."""
        return self._frames_done * self._frame / self.sample_rate

    def push(self, samples: np.ndarray) -> list[VadEvent]:
        """Feed mono float samples at `sample_rate`; returns events completed by them."""
        data = np.concatenate([self._pending, np.asarray(samples, dtype=np.float32).ravel()])
        n_frames = data.shape[0] // self._frame
        self._pending = data[n_frames * self._frame :].copy()
        events: list[VadEvent] = []
        if n_frames == 0:
            return events
        energies = frame_energy_db(data[: n_frames * self._frame], self._frame)
        for energy in energies.tolist():
            event = self._step(energy)
            if event is not None:
                events.append(event)
        return events

    def flush(self) -> list[VadEvent]:
        """End of stream: close an open speech turn at the current time."""
        self._pending = np.zeros(0, dtype=np.float32)
        if not self.in_speech:
            return []
        self.in_speech = False
        self._run = 0
        return [VadEvent("speech_stopped", self.time_s)]

    def _frame_time(self, frame_index: int) -> float:
        return frame_index * self._frame / self.sample_rate

    def _step(self, energy: float) -> VadEvent | None:
        index = self._frames_done
        self._frames_done += 1
        # Smooth over 3 frames (60 ms) of power, so one quiet/loud frame does not flip state.
        self._last_powers.append(10.0 ** (energy / 10.0))
        energy = 10.0 * math.log10(max(sum(self._last_powers) / len(self._last_powers), 1e-12))
        if len(self._recent) == self._recent.maxlen:
            del self._sorted[bisect.bisect_left(self._sorted, self._recent[0])]
        self._recent.append(energy)
        bisect.insort(self._sorted, energy)
        # A low percentile rather than the minimum: a few frames of digital silence (stream
        # start, a muted mic) must not drag the noise floor below the real room noise.
        noise = self._sorted[int(_NOISE_PERCENTILE / 100.0 * (len(self._sorted) - 1))]
        floor_based = min(noise + self._snr_db, self._sorted[-1] - 6.0)
        start_level = max(self.threshold_db, floor_based)
        level = start_level - self._hysteresis_db if self.in_speech else start_level
        is_speech = energy > level

        if is_speech:
            self.last_speech_end_s = self._frame_time(index + 1)
        if is_speech != self.in_speech:
            self._run += 1
        else:
            self._run = 0

        if not self.in_speech and self._run >= self._min_speech_frames:
            self.in_speech = True
            self._run = 0
            self.speech_start_s = self._frame_time(index + 1 - self._min_speech_frames)
            return VadEvent("speech_started", self.speech_start_s)
        if self.in_speech and self._run >= self._silence_frames:
            self.in_speech = False
            self._run = 0
            return VadEvent("speech_stopped", self._frame_time(index + 1))
        return None
