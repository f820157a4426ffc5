"""Energy VAD: offline regions, chunking at pauses, and the streaming detector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from app.audio.vad import StreamingVad, VadConfig, chunk_at_pauses, speech_regions

SR = 16_000
DATA = Path(__file__).parent / "data"
RNG = np.random.default_rng(1234)


def tone(
    seconds: float, amp: float = 0.3, freq: float = 300.0, sample_rate: int = SR
) -> np.ndarray:
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(seconds: float, amp: float, sample_rate: int = SR) -> np.ndarray:
    return (amp * RNG.standard_normal(int(round(seconds * sample_rate)))).astype(np.float32)


def silence(seconds: float, sample_rate: int = SR) -> np.ndarray:
    return np.zeros(int(round(seconds * sample_rate)), np.float32)


def jfk() -> np.ndarray:
    audio, rate = sf.read(DATA / "jfk-inaugural-1961-excerpt.flac", dtype="float32")
    assert rate == SR
    return audio


def synthetic(sample_rate: int = SR) -> np.ndarray:
    """1 s silence, 2 s tone, 1.5 s silence, 1 s noise burst, 2 s silence, over faint hiss."""
    parts = [
        silence(1.0, sample_rate),
        tone(2.0, sample_rate=sample_rate),
        silence(1.5, sample_rate),
        noise(1.0, 0.2, sample_rate),
        silence(2.0, sample_rate),
    ]
    audio = np.concatenate(parts)
    return audio + noise(len(audio) / sample_rate, 0.003, sample_rate)  # about -50 dBFS


def assert_regions(found: list[tuple[float, float]], expected: list[tuple[float, float]]) -> None:
    assert len(found) == len(expected), found
    for (start, end), (exp_start, exp_end) in zip(found, expected, strict=True):
        # pad_s = 0.1 widens each region; allow one more frame of smoothing either way.
        assert exp_start - 0.15 <= start <= exp_start, found
        assert exp_end <= end <= exp_end + 0.15, found


# --- offline regions -----------------------------------------------------------------------


def test_regions_of_tone_and_noise() -> None:
    assert_regions(speech_regions(synthetic()), [(1.0, 3.0), (4.5, 5.5)])


def test_silence_has_no_regions() -> None:
    assert speech_regions(silence(3.0)) == []
    assert speech_regions(noise(3.0, 1e-4)) == []  # -80 dBFS hiss is below the absolute floor
    assert speech_regions(np.zeros(0, np.float32)) == []


def test_quiet_speech_next_to_loud_speech_is_kept() -> None:
    audio = np.concatenate([tone(1.0, 0.5), silence(1.0), tone(1.0, 0.02), silence(1.0)])
    assert_regions(speech_regions(audio), [(0.0, 1.0), (2.0, 3.0)])


def test_click_is_dropped_and_short_gap_is_bridged() -> None:
    audio = np.concatenate(
        [silence(1.0), tone(0.02), silence(1.0), tone(0.5), silence(0.2), tone(0.5), silence(1.0)]
    )
    assert_regions(speech_regions(audio), [(2.02, 3.22)])
    strict = VadConfig(min_silence_s=0.1, min_speech_s=0.0, pad_s=0.0)
    assert len(speech_regions(audio, config=strict)) == 3


def test_regions_of_real_speech() -> None:
    regions = speech_regions(jfk())
    assert len(regions) >= 3
    # "And so, my fellow Americans, | ask not ..." has a pause from about 2.3 s to 3.1 s.
    assert all(not (start < 2.7 < end) for start, end in regions)
    covered = sum(end - start for start, end in regions)
    assert 0.6 * 11.0 < covered < 11.0


# --- chunking ------------------------------------------------------------------------------


def words(
    n: int, pause_every: int, long_pause_s: float
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """n 0.6 s "words" with 0.15 s gaps, and a longer pause after every `pause_every` words."""
    parts, spans, pos = [], [], 0
    for i in range(n):
        word = tone(0.6, freq=200.0 + 10 * (i % 7))
        spans.append((pos, pos + len(word)))
        gap = silence(long_pause_s if (i + 1) % pause_every == 0 else 0.15)
        parts += [word, gap]
        pos += len(word) + len(gap)
    return np.concatenate(parts), spans


def assert_chunks_keep_speech(
    chunks: list[tuple[int, int]], spans: list[tuple[int, int]], max_samples: int
) -> None:
    assert chunks == sorted(chunks)
    for start, end in chunks:
        assert 0 < end - start <= max_samples
    for (_, prev_end), (next_start, _) in zip(chunks, chunks[1:], strict=False):
        assert prev_end <= next_start
    for span_start, span_end in spans:  # every word lies wholly inside one chunk
        assert any(s <= span_start and span_end <= e for s, e in chunks), (span_start, span_end)


def test_long_audio_is_cut_at_the_pauses() -> None:
    audio, spans = words(100, pause_every=9, long_pause_s=0.8)  # ~83 s
    chunks = chunk_at_pauses(audio, max_chunk_s=30.0)
    assert len(chunks) >= 3
    assert_chunks_keep_speech(chunks, spans, 30 * SR)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))
    # Cuts fall in the long (0.8 s) pauses between the 15 s and 30 s marks of each chunk.
    for start, end in chunks[:-1]:
        assert end - start >= 15 * SR
        assert not audio[end - SR // 4 : end + SR // 4].any()


def test_continuous_sound_is_cut_at_the_quietest_point() -> None:
    audio = tone(70.0) * np.where(np.arange(70 * SR) // SR == 20, 0.05, 1.0).astype(np.float32)
    chunks = chunk_at_pauses(audio, max_chunk_s=30.0)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(audio)
    assert all(end - start <= 30 * SR for start, end in chunks)
    assert 20 * SR <= chunks[0][1] <= 21 * SR  # the quiet second, 20..21 s
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))  # nothing lost


def test_long_silence_is_dropped() -> None:
    audio = np.concatenate([silence(2.0), tone(5.0), silence(10.0), tone(5.0), silence(3.0)])
    chunks = chunk_at_pauses(audio)
    assert len(chunks) == 2
    (s1, e1), (s2, e2) = chunks
    assert 1.8 * SR <= s1 <= 2 * SR and 7 * SR <= e1 <= 7.2 * SR
    assert 16.8 * SR <= s2 <= 17 * SR and 22 * SR <= e2 <= 22.2 * SR


def test_all_silence_gives_no_chunks() -> None:
    assert chunk_at_pauses(silence(40.0)) == []


def test_real_speech_chunks() -> None:
    audio = jfk()
    chunks = chunk_at_pauses(audio, max_chunk_s=5.0, min_chunk_s=1.0)
    assert len(chunks) >= 3
    assert all(0 < end - start <= 5 * SR for start, end in chunks)
    # Every detected speech region survives chunking.
    for start_s, end_s in speech_regions(audio):
        for t in np.arange(start_s, end_s, 0.05):
            assert any(s <= t * SR <= e for s, e in chunks), t


# --- streaming -----------------------------------------------------------------------------


def run_stream(vad: StreamingVad, audio: np.ndarray, chunk: int) -> list[tuple[str, float]]:
    events = []
    for i in range(0, len(audio), chunk):
        events += vad.push(audio[i : i + chunk])
    return [(kind, round(t, 3)) for kind, t in events + vad.flush()]


@pytest.mark.parametrize("sample_rate", [16_000, 24_000])
def test_streaming_events(sample_rate: int) -> None:
    vad = StreamingVad(0.5, 300, 500, sample_rate)
    events = run_stream(vad, synthetic(sample_rate), chunk=sample_rate // 50 + 7)
    expected = [
        ("speech_started", 1.0),
        ("speech_stopped", 3.5),  # end of speech + 500 ms of silence
        ("speech_started", 4.5),
        ("speech_stopped", 6.0),
    ]
    assert [kind for kind, _ in events] == [kind for kind, _ in expected]
    for (_, t), (_, exp) in zip(events, expected, strict=True):
        assert t == pytest.approx(exp, abs=0.061), events
    assert vad.prefix_padding_s == 0.3


def test_streaming_is_independent_of_chunking() -> None:
    audio = synthetic()
    whole = run_stream(StreamingVad(), audio, chunk=len(audio))
    assert run_stream(StreamingVad(), audio, chunk=333) == whole


def test_short_pause_does_not_stop_speech() -> None:
    audio = np.concatenate([tone(1.0), silence(0.3), tone(1.0), silence(1.0)])
    events = run_stream(StreamingVad(silence_duration_ms=500), audio, chunk=320)
    assert [kind for kind, _ in events] == ["speech_started", "speech_stopped"]


def test_threshold_maps_to_level() -> None:
    quiet = np.concatenate([silence(0.5), tone(1.0, amp=0.008), silence(1.0)])  # ~ -45 dBFS
    assert run_stream(StreamingVad(threshold=0.5), quiet, chunk=320) == []
    events = run_stream(StreamingVad(threshold=0.3), quiet, chunk=320)
    assert [kind for kind, _ in events] == ["speech_started", "speech_stopped"]
    with pytest.raises(ValueError):
        StreamingVad(threshold=1.5)


def test_flush_closes_open_speech() -> None:
    vad = StreamingVad()
    assert vad.push(tone(1.0)) == [("speech_started", 0.0)]
    assert vad.in_speech
    assert vad.flush() == [("speech_stopped", 1.0)]
    assert vad.flush() == []


def test_streaming_real_speech() -> None:
    events = run_stream(StreamingVad(), jfk(), chunk=1600)
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "speech_started" and len(kinds) >= 4
    assert kinds == ["speech_started", "speech_stopped"] * (len(kinds) // 2)
    assert 0.2 < events[0][1] < 0.45  # speech begins at ~0.32 s
    assert 2.5 < events[1][1] < 3.0  # ... pauses after "Americans" (~2.2 s) + 0.5 s
