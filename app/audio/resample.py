"""Sample-rate conversion with soxr (band-limited, much cleaner than linear interpolation)."""

from __future__ import annotations

import numpy as np
import soxr

#: soxr quality used everywhere; "HQ" is transparent for speech and ~2x faster than "VHQ".
DEFAULT_QUALITY: str = "HQ"


def resample(
    audio: np.ndarray, orig_sr: int, target_sr: int, *, quality: str = DEFAULT_QUALITY
) -> np.ndarray:
    """Resample a mono float waveform (1-D) or [n_samples, n_channels] array to `target_sr`.

    Returns float32. A whole signal is converted in one call, so there are no edge effects;
    for audio that arrives in pieces use `StreamResampler`, which keeps filter state.
    """
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    audio = np.asarray(audio, dtype=np.float32)
    if orig_sr == target_sr or audio.shape[0] == 0:
        return np.ascontiguousarray(audio)
    return np.asarray(soxr.resample(audio, orig_sr, target_sr, quality=quality), dtype=np.float32)


class StreamResampler:
    """Resample a mono stream chunk by chunk (e.g. 24 kHz realtime PCM16 to 16 kHz).

    Resampling each chunk independently would click at every boundary; soxr's stream object
    carries the filter history across calls. Output lags input by the filter delay, which
    `flush()` releases at the end of the stream.
    """

    def __init__(self, orig_sr: int, target_sr: int, *, quality: str = DEFAULT_QUALITY) -> None:
        self.orig_sr = orig_sr
        self.target_sr = target_sr
        self._passthrough = orig_sr == target_sr
        self._stream = (
            None
            if self._passthrough
            else soxr.ResampleStream(orig_sr, target_sr, 1, dtype="float32", quality=quality)
        )

    def process(self, chunk: np.ndarray) -> np.ndarray:
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        if self._stream is None:
            return chunk
        return self._stream.resample_chunk(chunk, last=False)

    def flush(self) -> np.ndarray:
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        return self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
