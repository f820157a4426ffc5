"""Whisper log-mel features, computed exactly as faster-whisper's FeatureExtractor does.

Matching faster-whisper (not HF's WhisperFeatureExtractor) matters for transcript parity:
the log floor is taken over the whole input, not per 30 s window, and the waveform is
padded by only `padding` samples (docs/weights.md, "Features"). Runs on any torch
device, so the GPU can compute features for long files.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from app.audio.mel import mel_filters
from app.constants import HOP_LENGTH, N_FFT, N_FRAMES

#: log10 floor for the mel power, and the dynamic range kept below the loudest bin.
_LOG_FLOOR: float = 1e-10
_DYNAMIC_RANGE: float = 8.0  # in log10 units, i.e. 80 dB

ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)


def _as_tensor(audio: np.ndarray | torch.Tensor, device: str | torch.device | None) -> torch.Tensor:
    if isinstance(audio, np.ndarray):
        audio = torch.from_numpy(np.ascontiguousarray(audio))
    if audio.dtype != torch.float64:
        # float64 is kept so callers can get a high-precision reference; all else is float32.
        audio = audio.to(torch.float32)
    return audio if device is None else audio.to(device)


def _reflect_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """numpy-style `mode="reflect"` padding of the last dim, valid for any length >= 1.

    torch's own reflect padding refuses pads >= the signal length; numpy (which
    faster-whisper uses) keeps reflecting, so very short clips still get features.
    """
    n = x.shape[-1]
    if n == 1:
        return x.expand(*x.shape[:-1], 2 * pad + 1).contiguous()
    period = 2 * (n - 1)
    left = torch.arange(-pad, 0, device=x.device)
    right = torch.arange(n, n + pad, device=x.device)
    parts = []
    for idx in (left, right):
        idx = idx.remainder(period)
        parts.append(x[..., torch.where(idx >= n, period - idx, idx)])
    return torch.cat([parts[0], x, parts[1]], dim=-1)


def log_mel_spectrogram(
    audio: np.ndarray | torch.Tensor,
    n_mels: int = 80,
    *,
    padding: int = HOP_LENGTH,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Normalised log-mel spectrogram, [n_mels, n_frames] float32 (or [batch, n_mels, n_frames]).

    `audio` is a 16 kHz mono waveform (1-D), or a batch of equal-length ones (2-D, each row
    normalised on its own). It is computed on `device` (default: where `audio` lives, CPU
    for numpy). n_frames = (len(audio) + padding) // 160. float64 input is processed in
    float64 (a reference path); the result is always float32.
    """
    x = _as_tensor(audio, device)
    if x.ndim not in (1, 2):
        raise ValueError(f"audio must be 1-D or 2-D (batch, samples), got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if x.ndim == 1 and (x.shape[0] + padding) // HOP_LENGTH > BLOCK_FRAMES:
        return _blocked_log_mel(x, n_mels, padding)
    if padding:
        x = torch.nn.functional.pad(x, (0, padding))
    if x.shape[-1] < HOP_LENGTH:
        # Fewer samples than one hop: the only STFT frame is the dropped last one.
        return torch.zeros(*x.shape[:-1], n_mels, 0, dtype=torch.float32, device=x.device)

    # center=True semantics of faster-whisper's STFT: reflect-pad n_fft // 2 on both sides.
    x = _reflect_pad(x, N_FFT // 2)
    window = torch.hann_window(N_FFT, periodic=True, dtype=x.dtype, device=x.device)
    spec = torch.stft(x, N_FFT, HOP_LENGTH, window=window, center=False, return_complex=True)
    # Whisper drops the last STFT frame: it only covers the tail padding.
    power = torch.view_as_real(spec[..., :-1]).square().sum(dim=-1)
    mel = mel_filters(n_mels, device=x.device, dtype=x.dtype) @ power
    log_spec = mel.clamp(min=_LOG_FLOOR).log10()
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - _DYNAMIC_RANGE)
    return ((log_spec + 4.0) / 4.0).to(torch.float32)


#: Long 1-D inputs are transformed this many frames (5 min) at a time: the STFT's complex
#: intermediates stay ~100 MB instead of ~1.5 GB an hour of audio.
BLOCK_FRAMES = 30_000


def _padded_slice(x: torch.Tensor, padding: int, lo: int, hi: int) -> torch.Tensor:
    """Samples [lo, hi) of `x` followed by `padding` zeros, reflected beyond both ends as
    _reflect_pad does (one reflection; lo > -len and hi < 2 len), without copying `x`."""
    n, m = x.shape[0], x.shape[0] + padding
    if lo >= 0 and hi <= n:
        return x[lo:hi]
    j = torch.arange(lo, hi, device=x.device)
    j = torch.where(j < 0, -j, j)
    j = torch.where(j >= m, 2 * (m - 1) - j, j)
    return torch.where(j < n, x[j.clamp(max=n - 1)], torch.zeros((), dtype=x.dtype, device=x.device))


def _blocked_log_mel(x: torch.Tensor, n_mels: int, padding: int) -> torch.Tensor:
    """log_mel_spectrogram of a long 1-D input, BLOCK_FRAMES frames per STFT: the same frames
    (each from the same samples), the same whole-input floor."""
    n_frames = (x.shape[0] + padding) // HOP_LENGTH
    half = N_FFT // 2
    window = torch.hann_window(N_FFT, periodic=True, dtype=x.dtype, device=x.device)
    filters = mel_filters(n_mels, device=x.device, dtype=x.dtype)
    out = torch.empty(n_mels, n_frames, dtype=torch.float32, device=x.device)
    peak = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
    for first in range(0, n_frames, BLOCK_FRAMES):
        last = min(n_frames, first + BLOCK_FRAMES)
        # frame k covers samples [k * hop - n_fft / 2, k * hop + n_fft / 2) of the padded input
        piece = _padded_slice(x, padding, first * HOP_LENGTH - half, (last - 1) * HOP_LENGTH + half)
        spec = torch.stft(piece, N_FFT, HOP_LENGTH, window=window, center=False, return_complex=True)
        power = torch.view_as_real(spec).square().sum(dim=-1)
        log_spec = (filters @ power).clamp(min=_LOG_FLOOR).log10()
        peak = torch.maximum(peak, log_spec.amax())
        out[:, first:last] = log_spec
    out = torch.maximum(out, (peak - _DYNAMIC_RANGE).to(torch.float32), out=out)
    return out.add_(4.0).div_(4.0)


def pad_or_trim(mel: ArrayT, n_frames: int = N_FRAMES) -> ArrayT:
    """Trim or zero-pad the last (frame) dim to `n_frames`.

    The pad value is 0 in *normalised* units (log10 power -4), as faster-whisper pads each
    window's features; padding audio before the STFT would give different values.
    """
    length = mel.shape[-1]
    if length > n_frames:
        return mel[..., :n_frames]
    if length == n_frames:
        return mel
    if isinstance(mel, torch.Tensor):
        return torch.nn.functional.pad(mel, (0, n_frames - length))
    widths = [(0, 0)] * (mel.ndim - 1) + [(0, n_frames - length)]
    return np.pad(mel, widths)


class WindowedLogMel:
    """The log-mel spectrogram of a long waveform, computed one window at a time.

    Equal to `log_mel_spectrogram(audio, n_mels, padding=padding)` but never held whole: for a
    2-hour file the whole-file STFT needs ~2 GB of intermediates and the result 230 MB. A
    frame depends only on its own 400 samples, so a slice is computed from the samples under
    it; the one whole-file quantity, the loudest bin (the normalisation's reference), is found
    by a first pass over the file in chunks. Slicing (`mel[:, a:b]`) returns a float32 tensor
    [n_mels, b - a] like the eager spectrogram's.
    """

    #: Frames per chunk of the peak pass (a minute of audio: ~16 MB of STFT intermediates).
    CHUNK_FRAMES = 6000

    def __init__(self, audio: np.ndarray, n_mels: int = 80, *, padding: int = HOP_LENGTH) -> None:
        if audio.ndim != 1:
            raise ValueError(f"audio must be 1-D, got shape {audio.shape}")
        self.audio = np.ascontiguousarray(audio, dtype=np.float32)
        self.n_mels = n_mels
        self._length = len(audio) + padding  # zero padding after the audio
        self.n_frames = self._length // HOP_LENGTH if self._length >= HOP_LENGTH else 0
        self.shape = (n_mels, self.n_frames)
        self.peak = max(
            (
                float(self._log_mel(a, min(a + self.CHUNK_FRAMES, self.n_frames)).max())
                for a in range(0, self.n_frames, self.CHUNK_FRAMES)
            ),
            default=0.0,
        )

    def _samples(self, first: int, last: int) -> np.ndarray:
        """Samples [first, last) of the padded signal reflect-extended by N_FFT // 2 each side."""
        k = np.arange(first - N_FFT // 2, last - N_FFT // 2)
        if self._length > 1:
            period = 2 * (self._length - 1)
            k = np.remainder(k, period)
            k = np.where(k >= self._length, period - k, k)
        else:
            k = np.zeros_like(k)
        inside = k < len(self.audio)
        out = np.zeros(len(k), dtype=np.float32)
        out[inside] = self.audio[k[inside]]
        return out

    def _log_mel(self, a: int, b: int) -> torch.Tensor:
        """log10 mel power of frames [a, b), before normalisation."""
        x = torch.from_numpy(self._samples(a * HOP_LENGTH, (b - 1) * HOP_LENGTH + N_FFT))
        window = torch.hann_window(N_FFT, periodic=True)
        spec = torch.stft(x, N_FFT, HOP_LENGTH, window=window, center=False, return_complex=True)
        power = torch.view_as_real(spec).square().sum(dim=-1)
        return (
            (mel_filters(self.n_mels, device=x.device, dtype=x.dtype) @ power)
            .clamp(min=_LOG_FLOOR)
            .log10()
        )

    def __getitem__(self, key: tuple[slice, slice]) -> torch.Tensor:
        rows, frames = key
        if rows != slice(None) or frames.step not in (None, 1):
            raise IndexError("WindowedLogMel supports mel[:, a:b] only")
        a, b, _ = frames.indices(self.n_frames)
        if b <= a:
            return torch.zeros(self.n_mels, 0, dtype=torch.float32)
        log_spec = torch.maximum(self._log_mel(a, b), torch.tensor(self.peak - _DYNAMIC_RANGE))
        return ((log_spec + 4.0) / 4.0).to(torch.float32)
