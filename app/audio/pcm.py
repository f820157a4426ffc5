"""Raw PCM helpers (headerless audio, as sent by realtime/streaming clients)."""

from __future__ import annotations

import io
import wave

import numpy as np

from app.errors import AudioDecodeError

_INT16_SCALE: float = 32768.0  # int16 full scale; -32768 maps to exactly -1.0


def pcm16_to_float(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Little-endian signed 16-bit mono PCM -> float32 in [-1, 1)."""
    if len(data) % 2:
        raise AudioDecodeError(
            f"PCM16 data must have an even number of bytes, got {len(data)}", param="audio"
        )
    samples = np.frombuffer(data, dtype="<i2")
    return samples.astype(np.float32) / _INT16_SCALE


def float_to_pcm16(audio: np.ndarray) -> bytes:
    """float waveform -> little-endian PCM16 bytes, clipping to full scale."""
    scaled = np.clip(np.asarray(audio, dtype=np.float32) * _INT16_SCALE, -32768.0, 32767.0)
    return np.round(scaled).astype("<i2").tobytes()


def pcm16_to_wav(pcm: bytes, sample_rate: int) -> bytes:
    """Wrap mono PCM16 bytes in a WAV container (for posting streamed audio as a file)."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm)
    return buffer.getvalue()
