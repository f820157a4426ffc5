"""Silero VAD: batched probabilities, regions, chunking, the streaming detector, the speech map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from app.audio import vad
from app.audio.vad import (
    FRAME_S,
    StreamingVad,
    VadOptions,
    chunk_at_pauses,
    merge_into_chunks,
    speech_probabilities,
    speech_regions,
)
from app.decoding.results import Segment, Word
from app.decoding.speech_map import SpeechMap

SR = 16_000
DATA = Path(__file__).parent / "data"


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * SR), np.float32)


def clip(name: str = "jfk-inaugural-1961-excerpt") -> np.ndarray:
    audio, rate = sf.read(DATA / f"{name}.flac", dtype="float32")
    assert rate == SR
    return audio


def seconds(regions: list[tuple[int, int]]) -> list[tuple[float, float]]:
    return [(start / SR, end / SR) for start, end in regions]


# --- probabilities -------------------------------------------------------------------------


def test_batched_probabilities_equal_the_stock_streaming_model() -> None:
    audio = clip()[: 4 * SR]
    stock = torch.jit.load(str(vad._model_path())).eval()
    expected = []
    with torch.inference_mode():
        for i in range(0, len(audio), 512):
            frame = np.zeros(512, np.float32)
            frame[: len(audio[i : i + 512])] = audio[i : i + 512]
            expected.append(stock(torch.from_numpy(frame)[None], SR).item())
    got = speech_probabilities(audio)
    assert got.shape == (len(expected),)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_long_digital_silence_never_runs_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_model(device: str = "cpu") -> None:
        raise AssertionError("the model ran on digital silence")

    monkeypatch.setattr(vad, "silero_model", no_model)
    probs = speech_probabilities(silence(600.0))
    assert probs.shape == (round(600 * SR / 512),) and not probs.any()
    hiss = (1e-5 * np.random.default_rng(0).standard_normal(30 * SR)).astype(np.float32)
    assert not speech_probabilities(hiss).any()  # -100 dBFS: below the -80 dBFS peak floor


def test_a_short_dropout_inside_speech_is_scored() -> None:
    audio = clip().copy()
    audio[SR : SR + 2048] = 0.0  # 4 silent frames: too short to skip, scored by the model
    assert speech_probabilities(audio)[SR // 512 + 1] >= 0.0


# --- regions -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["silence-60s.flac", "white-noise-120s.flac", "tone-440hz-60s.flac"]
)
def test_non_speech_has_no_regions(name: str) -> None:
    path = Path(__file__).parents[1] / ".." / "shared" / "data" / "nonspeech" / name
    if path.exists():
        audio, _ = sf.read(path, dtype="float32")
    else:  # the shared data set is absent: the same kind of signal, made here
        rng = np.random.default_rng(0)
        t = np.arange(60 * SR) / SR
        audio = {
            "silence-60s.flac": silence(60.0),
            "white-noise-120s.flac": rng.uniform(-0.3, 0.3, 120 * SR),
            "tone-440hz-60s.flac": 0.5 * np.sin(2 * np.pi * 440 * t),
        }[name].astype(np.float32)
    assert speech_regions(audio) == []
    assert chunk_at_pauses(audio) == []


def test_regions_of_speech_between_long_silences_are_padded() -> None:
    speech = clip()
    audio = np.concatenate([silence(20.0), speech, silence(30.0), speech, silence(5.0)])
    regions = seconds(speech_regions(audio))
    assert len(regions) == 2  # the clip's own pauses (< 2 s) stay inside its region
    for (start, end), offset in zip(regions, (20.0, 61.0), strict=True):
        # the clip's speech runs from ~0.35 s to ~10.9 s; 0.4 s of padding either side
        assert offset + 0.35 - 0.4 - 0.05 <= start <= offset + 0.35 - 0.3
        assert offset + 10.5 <= end <= offset + 11.0 + 0.45


def test_options_change_regions() -> None:
    speech = clip()
    strict = VadOptions(min_silence_ms=100, speech_pad_ms=0)
    assert len(speech_regions(speech, strict)) >= 3  # the pauses after "Americans" etc.
    assert speech_regions(speech, VadOptions(min_speech_ms=20_000)) == []  # all too short


# --- chunking ------------------------------------------------------------------------------


def test_merge_into_chunks() -> None:
    regions = [(0, 10), (12, 20), (40, 45), (50, 130)]
    assert merge_into_chunks(regions, 30) == [(0, 20), (40, 45), (50, 80), (80, 110), (110, 130)]
    assert merge_into_chunks([], 30) == []


def test_chunks_cover_speech_and_drop_long_silences() -> None:
    speech = clip()
    audio = np.concatenate([speech, speech, speech, silence(40.0), speech])  # 33 s, gap, 11 s
    chunks = chunk_at_pauses(audio, max_chunk_s=30.0)
    assert all(0 < end - start <= 30 * SR for start, end in chunks)
    assert chunks == sorted(chunks)
    for (_, prev_end), (next_start, _) in zip(chunks, chunks[1:], strict=False):
        assert prev_end <= next_start
    covered = np.zeros(len(audio), bool)
    for start, end in chunks:
        covered[start:end] = True
    probs = speech_probabilities(audio)
    for i in np.flatnonzero(probs >= 0.5):  # every speech frame is in a chunk
        assert covered[i * 512 : (i + 1) * 512].all(), i * FRAME_S
    assert not covered[int(40 * SR) : int(70 * SR)].any()


# --- streaming -----------------------------------------------------------------------------


def run_stream(detector: StreamingVad, audio: np.ndarray, chunk: int) -> list[tuple[str, float]]:
    events = []
    for i in range(0, len(audio), chunk):
        events += detector.push(audio[i : i + chunk])
    return [(kind, round(t, 3)) for kind, t in events + detector.flush()]


def test_streaming_turns_of_real_speech() -> None:
    audio = np.concatenate([silence(1.0), clip("ljspeech-LJ001-0002"), silence(1.5)])
    events = run_stream(StreamingVad(0.5, 300, 500), audio, chunk=320)
    assert [kind for kind, _ in events] == ["speech_started", "speech_stopped"]
    assert events[0][1] == pytest.approx(1.03, abs=0.1)  # voiced from ~30 ms into the clip
    assert events[1][1] == pytest.approx(1.0 + 1.86 + 0.5, abs=0.15)  # end + 500 ms silence


def test_streaming_is_independent_of_chunking() -> None:
    audio = np.concatenate([silence(0.5), clip()[: 6 * SR], silence(1.0)])
    whole = run_stream(StreamingVad(), audio, chunk=len(audio))
    assert run_stream(StreamingVad(), audio, chunk=333) == whole


def test_streaming_ignores_noise_and_tones() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(5 * SR) / SR
    for audio in (rng.uniform(-0.3, 0.3, 5 * SR), 0.5 * np.sin(2 * np.pi * 440 * t)):
        assert run_stream(StreamingVad(), audio.astype(np.float32), chunk=480) == []


def test_threshold_is_the_speech_probability() -> None:
    audio = np.concatenate([silence(0.5), clip("ljspeech-LJ001-0002"), silence(1.0)])
    assert run_stream(StreamingVad(threshold=1.0), audio, chunk=320) == []
    assert len(run_stream(StreamingVad(threshold=0.5), audio, chunk=320)) == 2
    with pytest.raises(ValueError):
        StreamingVad(threshold=1.5)


def test_flush_closes_open_speech() -> None:
    detector = StreamingVad()
    speech = clip("ljspeech-LJ001-0002")[:SR]
    events = detector.push(speech)
    assert [kind for kind, _ in events] == ["speech_started"] and detector.in_speech
    assert detector.flush() == [("speech_stopped", pytest.approx(31 * FRAME_S))]
    assert detector.flush() == []


# --- speech map ----------------------------------------------------------------------------


def segment(start: float, end: float, words: list[Word] | None = None) -> Segment:
    return Segment(0, 0, start, end, " x", [], 0.0, -0.1, 1.0, 0.0, words)


def test_speech_map_puts_times_back_where_they_were_said() -> None:
    # regions 10-15 s and 40-50 s: gated 0-5 s is original 10-15 s, gated 5-15 s is 40-50 s
    speech = SpeechMap([(10 * SR, 15 * SR), (40 * SR, 50 * SR)])
    assert speech.gated_samples == 15 * SR
    assert speech.original(0.0) == 10.0 and speech.original(4.0) == 14.0
    assert speech.original(5.0) == 40.0  # a start at the join: the later region
    assert speech.original(5.0, is_end=True) == 15.0  # an end at the join: the earlier one
    assert speech.original(12.0) == 47.0
    mapped = speech.segment(
        segment(
            3.0,
            9.0,
            [Word(" a", 3.0, 4.5, 0.9), Word(" b", 4.8, 5.4, 0.9), Word(" c", 6.0, 9.0, 0.9)],
        )
    )
    assert (mapped.start, mapped.end) == (13.0, 44.0)
    # a word keeps to the region it starts in: "b" is cut at 15 s instead of spanning the gap
    assert [(w.start, w.end) for w in mapped.words or []] == [
        (13.0, 14.5),
        (14.8, 15.0),
        (41.0, 44.0),
    ]


def test_speech_map_gates_audio() -> None:
    audio = np.arange(100, dtype=np.float32)
    assert SpeechMap([(0, 100)]).gate(audio) is audio
    gated = SpeechMap([(10, 20), (50, 55)]).gate(audio)
    assert gated.tolist() == list(range(10, 20)) + list(range(50, 55))
    with pytest.raises(ValueError):
        SpeechMap([])
