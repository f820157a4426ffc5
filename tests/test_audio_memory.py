"""Memory of decoding: streamed decode and resample, the audio budget, log-mel by window."""

from __future__ import annotations

import io
import threading
import time
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import FakeRuntime, assert_openai_error, make_wav

from app.audio.budget import AudioBudget
from app.audio.decode import decode_audio
from app.audio.features import WindowedLogMel, log_mel_spectrogram
from app.errors import AudioBudgetError, AudioDecodeError, AudioTooLongError

SR = 16_000


def flac(seconds: float, rate: int, channels: int = 1) -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).standard_normal((int(seconds * rate), channels)) * 0.01
    sf.write(buffer, noise.astype(np.float32), rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def test_a_high_rate_stereo_file_costs_what_its_16k_mono_version_does() -> None:
    """20 s at 192 kHz stereo: 15 MB as float32 mono at its own rate, 1.3 MB at 16 kHz."""
    data = flac(20, 192_000, channels=2)
    held: list[int] = []
    tracemalloc.start()
    try:
        audio = decode_audio(data, hold=held.append)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    out_bytes = 20 * SR * 4
    assert abs(len(audio) - 20 * SR) <= 1
    assert abs(audio.nbytes - out_bytes) <= 4
    assert audio.nbytes <= max(held) <= audio.nbytes + 64 * 1024  # allocated once, from the header
    # the 16 kHz output and one 2 MB block at 192 kHz
    assert peak < out_bytes + 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"


def test_the_duration_limit_stops_the_decode_early() -> None:
    data = bytearray(make_wav(60.0))
    at = data.find(b"data")
    data[4:8] = data[at + 4 : at + 8] = b"\xff\xff\xff\xff"  # no length in the header
    held: list[int] = []
    with pytest.raises(AudioTooLongError):
        decode_audio(bytes(data), max_duration_s=20.0, hold=held.append)
    assert max(held, default=0) <= 20 * SR * 4  # stopped at the limit, not at the end


def test_decode_errors_do_not_name_the_libraries() -> None:
    with pytest.raises(AudioDecodeError) as info:
        decode_audio(b"fLaC" + np.random.default_rng(3).bytes(4000))
    message = info.value.message.lower()
    assert "corrupt" in message
    assert "libsndfile" not in message and "ffmpeg" not in message and "flac/" not in message


# --- the budget --------------------------------------------------------------------------------


def test_the_budget_waits_then_refuses() -> None:
    budget = AudioBudget(1000, wait_s=0.2)
    first = budget.lease()
    first.hold(800)
    second = budget.lease()
    began = time.monotonic()
    with pytest.raises(AudioBudgetError) as info:
        second.hold(400)
    assert time.monotonic() - began >= 0.2
    assert info.value.status_code == 503 and info.value.code == "server_busy"
    assert budget.used_bytes == 800
    first.release()
    assert budget.used_bytes == 0


def test_a_waiting_lease_gets_the_memory_given_back() -> None:
    budget = AudioBudget(1000, wait_s=5)
    first = budget.lease()
    first.hold(900)
    threading.Timer(0.1, first.release).start()
    with budget.lease() as second:
        second.hold(500)  # waits for the release
        assert budget.used_bytes == 500
    assert budget.used_bytes == 0


async def test_a_request_over_the_budget_gets_503_with_retry_after(make_client) -> None:
    runtime = FakeRuntime()
    client = await make_client(
        {"tiny.en": runtime}, audio_memory_budget_mb=0.05, audio_budget_wait_s=0
    )
    response = await client.post(
        "/v1/audio/transcriptions", files={"file": ("a.wav", make_wav(2.0), "audio/wav")}
    )
    assert_openai_error(response, 503, code="server_busy", error_type="server_error")
    assert int(response.headers["retry-after"]) >= 1
    assert client.app.state.audio_budget.used_bytes == 0  # nothing left charged
    ok = await client.post(
        "/v1/audio/transcriptions", files={"file": ("a.wav", make_wav(0.5), "audio/wav")}
    )
    assert ok.status_code == 200


# --- log-mel by window -------------------------------------------------------------------------


@pytest.mark.parametrize("samples", [1, 159, 160, 16_000 * 65 + 37])
def test_windowed_log_mel_equals_the_whole_file_one(samples: int) -> None:
    audio = (np.random.default_rng(samples).standard_normal(samples) * 0.1).astype(np.float32)
    eager = log_mel_spectrogram(audio, 80)
    lazy = WindowedLogMel(audio, 80)
    assert lazy.shape == tuple(eager.shape)
    n = eager.shape[-1]
    for a, b in [(0, 3000), (17, 3017), (max(0, n - 100), n + 50), (0, n)]:
        torch.testing.assert_close(lazy[:, a:b], eager[:, a:b], rtol=0, atol=1e-6)


def test_a_truncated_file_is_charged_for_what_it_holds_not_what_its_header_claims() -> None:
    data = flac(60, SR)
    held: list[int] = []
    audio = decode_audio(data[: len(data) // 10], hold=held.append)
    assert len(audio) < 20 * SR
    assert max(held) >= 60 * SR * 4  # allocated from the header first...
    assert held[-1] == audio.nbytes  # ...then charged only what was decoded
