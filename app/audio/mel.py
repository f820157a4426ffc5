"""Slaney-style mel filter bank (librosa's default `htk=False, norm="slaney"`), built here.

No model folder ships the filters, so they are computed: the same construction as
`librosa.filters.mel(sr=16000, n_fft=400, n_mels=N)`, which OpenAI's `mel_filters.npz`
and faster-whisper's `get_mel_filters` also follow.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from app.constants import N_FFT, SAMPLE_RATE

# Slaney's auditory-toolbox mel scale: linear (3 mels per 200 Hz) below 1 kHz, then
# logarithmic with 27 mels per factor of 6.4 in frequency.
_LINEAR_HZ_PER_MEL: float = 200.0 / 3.0
_BREAK_HZ: float = 1000.0
_BREAK_MEL: float = _BREAK_HZ / _LINEAR_HZ_PER_MEL  # 15.0
_LOG_STEP: float = float(np.log(6.4) / 27.0)


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _LINEAR_HZ_PER_MEL
    with np.errstate(divide="ignore"):
        log = _BREAK_MEL + np.log(np.maximum(hz, 1e-12) / _BREAK_HZ) / _LOG_STEP
    return np.where(hz >= _BREAK_HZ, log, linear)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * _LINEAR_HZ_PER_MEL
    log = _BREAK_HZ * np.exp(_LOG_STEP * (mel - _BREAK_MEL))
    return np.where(mel >= _BREAK_MEL, log, linear)


def mel_filter_bank(
    n_mels: int, *, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT
) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] float64 triangular filters with Slaney area normalisation."""
    if n_mels <= 0:
        raise ValueError(f"n_mels must be positive, got {n_mels}")
    bin_hz = np.arange(n_fft // 2 + 1, dtype=np.float64) * sample_rate / n_fft
    # n_mels + 2 edges: band i rises from edge i to a peak at i + 1 and falls to i + 2.
    edges_hz = mel_to_hz(np.linspace(0.0, float(hz_to_mel(sample_rate / 2.0)), n_mels + 2))
    lo, mid, hi = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (bin_hz[None, :] - lo) / (mid - lo)
    falling = (hi - bin_hz[None, :]) / (hi - mid)
    weights = np.clip(np.minimum(rising, falling), 0.0, None)
    # "Slaney" normalisation: each triangle gets unit area in Hz, so wide high bands are not
    # louder than narrow low ones.
    return weights * (2.0 / (hi - lo))


@functools.lru_cache(maxsize=16)
def _cached_filters(n_mels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(mel_filter_bank(n_mels)).to(device=device, dtype=dtype)


def mel_filters(
    n_mels: int,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Cached [n_mels, 201] filter bank tensor for 16 kHz / n_fft 400 on `device`."""
    return _cached_filters(int(n_mels), torch.device(device or "cpu"), dtype)
