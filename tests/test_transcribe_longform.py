"""Long-form transcription without a model: a fake `submit` returns scripted window results.

The fake recognises which window it is asked for by comparing the task's mel with the windows
the audio can produce, so every test checks *where* the transcriber seeks, not only what it
does with the answers. Text tokens spell " t{id}" (tests/fakes.py), so texts are predictable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from fakes import SPECIAL, fake_tokenizer, torch_threads

from app.audio.features import log_mel_spectrogram, pad_or_trim
from app.audio.vad import VadOptions, chunk_at_pauses, speech_regions
from app.constants import HOP_LENGTH, N_FRAMES, SAMPLE_RATE
from app.decoding.options import TranscribeOptions, WindowOptions
from app.decoding.repetition import compression_ratio
from app.decoding.results import TranscriptionResult
from app.decoding.transcribe import (
    DecodeOutcome,
    ModelContext,
    Transcriber,
    decode_with_fallback,
    should_skip_window,
    split_by_timestamps,
    trimmed_frames,
)
from app.decoding.window import WindowResult, WindowTask

DATA = Path(__file__).parent / "data"

TB = SPECIAL.timestamp_begin
TOKENIZER = fake_tokenizer()
TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def T(seconds: float) -> int:  # noqa: N802 - reads like Whisper's <|t|> notation
    """The timestamp token of a time (relative to its window)."""
    return TB + round(seconds / 0.02)


def result(tokens: list[int], avg_logprob: float = -0.3, no_speech: float = 0.05,
           temperature: float = 0.0) -> WindowResult:
    return WindowResult(tokens=tokens, sum_logprob=avg_logprob * (len(tokens) + 1),
                        avg_logprob=avg_logprob, no_speech_prob=no_speech,
                        temperature=temperature, language="en")


DIVERSE = list(range(100, 130))  # " t100 t101 ..." compresses poorly: ratio < 2.4
REPETITIVE = [5] * 60  # " t5 t5 t5 ..." compresses well: ratio >> 2.4


def test_text_fixtures_sit_on_either_side_of_the_threshold() -> None:
    assert compression_ratio(TOKENIZER.decode(DIVERSE).strip()) < 2.4
    assert compression_ratio(TOKENIZER.decode(REPETITIVE).strip()) > 2.4
    assert compression_ratio("") == 0.0


# --- split_by_timestamps -------------------------------------------------------------------


def spans(segments: list) -> list[tuple[float, float, list[int]]]:
    return [(round(s.start, 3), round(s.end, 3), s.tokens) for s in segments]


def test_split_consecutive_pairs_with_single_timestamp_ending() -> None:
    tokens = [T(0), 1, 2, T(1.0), T(1.0), 3, T(2.5), T(2.5), 4, T(4.0)]
    segments, next_seek, single = split_by_timestamps(tokens, TB, 10.0, 3000, 1000)
    assert single
    assert spans(segments) == [(10.0, 11.0, [T(0), 1, 2, T(1.0)]),
                               (11.0, 12.5, [T(1.0), 3, T(2.5)]),
                               (12.5, 14.0, [T(2.5), 4, T(4.0)])]
    assert all(s.seek == 1000 for s in segments)
    assert next_seek == 1000 + 3000  # everything was said: the next window starts after this one


def test_split_trailing_unfinished_segment_seeks_to_the_last_timestamp() -> None:
    tokens = [T(0), 1, T(1.0), T(1.0), 2, T(7.0), T(7.0), 3, 4]  # "3 4" never closed
    segments, next_seek, single = split_by_timestamps(tokens, TB, 0.0, 3000, 0)
    assert not single
    assert spans(segments) == [(0.0, 1.0, [T(0), 1, T(1.0)]), (1.0, 7.0, [T(1.0), 2, T(7.0)])]
    assert next_seek == 700  # 7.00 s: "3 4" is decoded again by the next window


def test_split_ending_with_a_pair_seeks_to_it() -> None:
    tokens = [T(0), 1, T(2.0), T(2.0)]
    segments, next_seek, single = split_by_timestamps(tokens, TB, 30.0, 3000, 3000)
    assert not single
    assert spans(segments) == [(30.0, 32.0, [T(0), 1, T(2.0)])]
    assert next_seek == 3000 + 200


def test_split_without_timestamps_is_one_segment_over_the_window() -> None:
    segments, next_seek, single = split_by_timestamps([1, 2, 3], TB, 5.0, 1234, 500)
    assert not single
    assert spans(segments) == [(5.0, 5.0 + 12.34, [1, 2, 3])]
    assert next_seek == 500 + 1234


def test_split_single_timestamps_without_pairs_end_at_the_last_one() -> None:
    segments, next_seek, single = split_by_timestamps([T(0.4), 1, 2, T(3.2)], TB, 2.0, 3000, 200)
    assert single
    assert spans(segments) == [(2.0, 2.0 + 3.2, [T(0.4), 1, 2, T(3.2)])]
    assert next_seek == 3200
    # a lone <|0.00|> says nothing about the end: the segment spans the window
    segments, _, _ = split_by_timestamps([T(0), 1, 2], TB, 0.0, 3000, 0)
    assert spans(segments) == [(0.0, 30.0, [T(0), 1, 2])]


# --- decode_with_fallback --------------------------------------------------------------------


class ScriptedSubmit:
    """submit() answering by temperature; remembers every task."""

    def __init__(self, by_temperature: Mapping[float, WindowResult]) -> None:
        self.by_temperature = by_temperature
        self.tasks: list[WindowTask] = []

    async def __call__(self, task: WindowTask) -> WindowResult:
        self.tasks.append(task)
        return replace(self.by_temperature[task.options.temperature],
                       temperature=task.options.temperature)

    @property
    def temperatures(self) -> list[float]:
        return [t.options.temperature for t in self.tasks]


def fallback(by_temperature: Mapping[float, WindowResult], **options: object
             ) -> tuple[DecodeOutcome, ScriptedSubmit]:
    submit = ScriptedSubmit(by_temperature)
    ctx = ModelContext(TOKENIZER, 80, False, submit)
    opts = replace(TranscribeOptions(), **options)  # type: ignore[arg-type]
    mel = torch.zeros(80, N_FRAMES)
    outcome = asyncio.run(decode_with_fallback(ctx, mel, [7, 8], opts, opts.window, True))
    return outcome, submit


def test_fallback_stops_at_the_first_passing_temperature() -> None:
    outcome, submit = fallback(dict.fromkeys(TEMPERATURES, result(DIVERSE)))
    assert submit.temperatures == [0.0]
    assert outcome.temperature == 0.0 and outcome.avg_logprob == -0.3
    assert outcome.compression_ratio == compression_ratio(TOKENIZER.decode(DIVERSE).strip())
    task = submit.tasks[0]
    assert task.previous_tokens == [7, 8] and task.keep_audio_features


def test_fallback_on_high_compression_ratio() -> None:
    script = dict.fromkeys(TEMPERATURES, result(DIVERSE, -0.4))
    script[0.0] = result(REPETITIVE, -0.05)  # confident but repetitive
    outcome, submit = fallback(script)
    assert submit.temperatures == [0.0, 0.2]
    assert outcome.temperature == 0.2 and outcome.result.tokens == DIVERSE


def test_fallback_retries_reuse_the_first_encoder_output() -> None:
    features = torch.ones(1, 1500, 4)
    script = {t: replace(result(REPETITIVE, -0.05), audio_features=features) for t in TEMPERATURES}
    script[0.4] = replace(result(DIVERSE, -0.4), audio_features=features)
    submit = ScriptedSubmit(script)
    ctx = ModelContext(TOKENIZER, 80, False, submit)
    opts = TranscribeOptions()
    outcome = asyncio.run(decode_with_fallback(ctx, torch.zeros(80, N_FRAMES), [], opts, opts.window, False))
    assert submit.temperatures == [0.0, 0.2, 0.4]
    assert submit.tasks[0].audio_features is None and submit.tasks[0].keep_audio_features
    assert all(t.audio_features is features for t in submit.tasks[1:])
    assert outcome.result.audio_features is None  # not kept for the caller: not asked for


def test_fallback_on_low_average_logprob() -> None:
    script = dict.fromkeys(TEMPERATURES, result(DIVERSE, -0.5))
    script[0.0] = result(DIVERSE, -1.2)
    script[0.2] = result(DIVERSE, -1.01)
    outcome, submit = fallback(script)
    assert submit.temperatures == [0.0, 0.2, 0.4]
    assert outcome.temperature == 0.4 and outcome.avg_logprob == -0.5


def test_silence_stops_the_fallback() -> None:
    script = dict.fromkeys(TEMPERATURES, result(DIVERSE, -0.3))
    script[0.0] = result([], -1.5, no_speech=0.8)
    outcome, submit = fallback(script)
    assert submit.temperatures == [0.0]
    assert outcome.result.no_speech_prob == 0.8


def test_likely_no_speech_alone_does_not_stop_a_repetitive_fallback() -> None:
    # high no_speech but a confident (yet repetitive) decode is not "silence"
    script = dict.fromkeys(TEMPERATURES, result(DIVERSE, -0.3))
    script[0.0] = result(REPETITIVE, -0.2, no_speech=0.9)
    _, submit = fallback(script)
    assert submit.temperatures == [0.0, 0.2]
    # low log-prob with no_speech under the threshold is not silence either
    script[0.0] = result(DIVERSE, -1.5, no_speech=0.5)
    _, submit = fallback(script)
    assert submit.temperatures == [0.0, 0.2]


def test_all_temperatures_fail_best_logprob_under_the_compression_threshold_wins() -> None:
    script = {
        0.0: result(REPETITIVE, -0.1),  # best log-prob, but repetitive: not eligible
        0.2: result(DIVERSE, -1.3),
        0.4: result(DIVERSE[:20], -1.1),  # the winner
        0.6: result(DIVERSE, -1.5),
        0.8: result(REPETITIVE, -0.05),
        1.0: result(DIVERSE, -2.0),
    }
    outcome, submit = fallback(script)
    assert submit.temperatures == list(TEMPERATURES)
    assert outcome.result.tokens == DIVERSE[:20] and outcome.avg_logprob == -1.1
    assert outcome.temperature == 1.0  # the last temperature tried, for the prompt reset rule


def test_all_repetitive_best_logprob_overall_wins() -> None:
    script = {t: result(REPETITIVE, -0.5 - t) for t in TEMPERATURES}
    script[0.6] = result(REPETITIVE[:50], -0.01)
    outcome, submit = fallback(script)
    assert len(submit.tasks) == len(TEMPERATURES)
    assert outcome.result.tokens == REPETITIVE[:50]


def test_no_thresholds_no_fallback() -> None:
    script = dict.fromkeys(TEMPERATURES, result(REPETITIVE, -3.0, no_speech=0.99))
    _, submit = fallback(script, compression_ratio_threshold=None, log_prob_threshold=None,
                         no_speech_threshold=None)
    assert submit.temperatures == [0.0]


@pytest.mark.parametrize(
    ("no_speech", "avg_logprob", "threshold", "log_prob_threshold", "skip"),
    [
        (0.9, -1.5, 0.6, -1.0, True),  # likely silence and an unsure decode
        (0.9, -0.5, 0.6, -1.0, False),  # the decode is confident: keep it
        (0.5, -1.5, 0.6, -1.0, False),  # speech is likely
        (0.9, -0.5, 0.6, None, True),  # no log-prob guard
        (0.9, -1.5, None, -1.0, False),  # never skip without a no-speech threshold
    ],
)
def test_should_skip_window(no_speech: float, avg_logprob: float, threshold: float | None,
                            log_prob_threshold: float | None, skip: bool) -> None:
    outcome = DecodeOutcome(result([1], avg_logprob, no_speech), avg_logprob, 0.0, 1.0)
    options = TranscribeOptions(no_speech_threshold=threshold, log_prob_threshold=log_prob_threshold)
    assert should_skip_window(outcome, options) is skip


# --- Transcriber: sequential seeking -----------------------------------------------------------


def noise(seconds: float, seed: int = 0, level: float = 0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * SAMPLE_RATE)) * level).astype(np.float32)


@dataclass
class Call:
    seek: int
    temperature: float
    previous: list[int]
    options: WindowOptions


class WindowModel:
    """Fake submit for sequential mode: identifies the window (its seek, in mel frames) from
    the mel it is given, then answers from `script[seek]` (one result, or one per temperature)."""

    def __init__(self, audio: np.ndarray,
                 script: Mapping[int, WindowResult | Mapping[float, WindowResult]]) -> None:
        self.mel = log_mel_spectrogram(audio, 80, padding=HOP_LENGTH)
        self.content_frames = self.mel.shape[-1] - 1
        self.script = script
        self.calls: list[Call] = []

    def window_mel(self, seek: int) -> torch.Tensor:
        size = min(N_FRAMES, self.content_frames - seek)
        return pad_or_trim(self.mel[:, seek : seek + size], N_FRAMES)

    async def submit(self, task: WindowTask) -> WindowResult:
        seek = next((s for s in self.script if torch.equal(task.mel, self.window_mel(s))), None)
        if seek is None:
            raise AssertionError("the transcriber asked for a window at an unscripted position")
        temperature = task.options.temperature
        self.calls.append(Call(seek, temperature, list(task.previous_tokens), task.options))
        answer = self.script[seek]
        chosen = answer if isinstance(answer, WindowResult) else answer[temperature]
        return replace(chosen, temperature=temperature)

    def transcribe(self, audio: np.ndarray, **options: object) -> TranscriptionResult:
        ctx = ModelContext(TOKENIZER, 80, False, self.submit)
        opts = replace(TranscribeOptions(), **options)  # type: ignore[arg-type]
        return asyncio.run(Transcriber(ctx).transcribe(audio, opts))

    @property
    def seeks(self) -> list[int]:
        return list(dict.fromkeys(c.seek for c in self.calls))

    def previous_at(self, seek: int) -> list[int]:
        return next(c.previous for c in self.calls if c.seek == seek)


AUDIO_50S = noise(50.0)
# Window 1 (0-30 s): three segments, then "16 17" is cut off at 28 s: the next window must
# start at 28.00 s and decode it again. Window 2 (28-50 s) ends on a single timestamp.
WINDOW_1 = [T(0), 10, 11, T(5), T(5), 12, 13, T(12), T(12), 14, 15, T(28), T(28), 16, 17]
WINDOW_2 = [T(0), 16, 17, 18, T(6), T(6), 19, T(20)]
FIRST_WINDOW_SEGMENTS = WINDOW_1[:4] + WINDOW_1[4:8] + WINDOW_1[8:12]


def two_windows(first: WindowResult | Mapping[float, WindowResult] | None = None) -> WindowModel:
    return WindowModel(AUDIO_50S, {0: first or result(WINDOW_1), 2800: result(WINDOW_2)})


def test_sequential_seeks_to_the_last_complete_segment_and_loses_no_text() -> None:
    model = two_windows()
    out = model.transcribe(AUDIO_50S)
    assert model.seeks == [0, 2800]
    assert [(s.start, s.end, s.text) for s in out.segments] == [
        (0.0, 5.0, " t10 t11"), (5.0, 12.0, " t12 t13"), (12.0, 28.0, " t14 t15"),
        (28.0, 34.0, " t16 t17 t18"), (34.0, 48.0, " t19"),
    ]
    assert out.text == "t10 t11 t12 t13 t14 t15 t16 t17 t18 t19"  # nothing lost, nothing twice
    assert [s.id for s in out.segments] == list(range(5))
    assert [s.seek for s in out.segments] == [0, 0, 0, 2800, 2800]
    assert out.segments[3].tokens == WINDOW_2[:5]
    assert out.duration == pytest.approx(50.0) and out.language == "en"
    assert all(c.options.language == "en" for c in model.calls)  # English-only: no detection
    # the segments tile the audio in order, inside it
    for a, b in zip(out.segments, out.segments[1:], strict=False):
        assert a.start < a.end <= b.start < b.end
    assert out.segments[-1].end <= out.duration


def test_sequential_conditions_on_previous_text() -> None:
    model = two_windows()
    model.transcribe(AUDIO_50S)
    assert model.previous_at(0) == []
    assert model.previous_at(2800) == FIRST_WINDOW_SEGMENTS  # "16 17" was not kept: cut off


def test_sequential_without_conditioning_sends_no_previous_text() -> None:
    model = two_windows()
    model.transcribe(AUDIO_50S, condition_on_previous_text=False)
    assert model.previous_at(0) == [] and model.previous_at(2800) == []


def test_initial_prompt_goes_first() -> None:
    model = two_windows()
    model.transcribe(AUDIO_50S, initial_prompt="  t7 t8 ")
    assert model.previous_at(0) == [7, 8]
    assert model.previous_at(2800) == [7, 8, *FIRST_WINDOW_SEGMENTS]


def test_prompt_resets_after_a_high_temperature_window() -> None:
    # window 1 only passes at 0.6 (> prompt_reset_on_temperature 0.5): window 2 starts afresh
    unsure = result(WINDOW_1, -1.4)
    model = two_windows({0.0: unsure, 0.2: unsure, 0.4: unsure, 0.6: result(WINDOW_1, -0.4)})
    out = model.transcribe(AUDIO_50S, initial_prompt="t7 t8")
    assert [c.temperature for c in model.calls if c.seek == 0] == [0.0, 0.2, 0.4, 0.6]
    assert out.segments[0].temperature == 0.6
    assert model.previous_at(2800) == []


def test_prompt_kept_after_a_low_temperature_fallback() -> None:
    unsure = result(WINDOW_1, -1.4)
    model = two_windows({0.0: unsure, 0.2: unsure, 0.4: result(WINDOW_1, -0.4)})
    model.transcribe(AUDIO_50S)
    assert model.previous_at(2800) == FIRST_WINDOW_SEGMENTS


def test_a_sliver_under_one_second_after_a_window_is_not_decoded() -> None:
    # 30.5 s: the first window says everything ended by 29 s; the 0.5 s left is not a window
    # (decoding it, Whisper tends to repeat the previous text over the silence)
    audio = noise(30.5)
    model = WindowModel(audio, {0: result([T(0), 10, 11, T(29)])})
    out = model.transcribe(audio)
    assert model.seeks == [0]
    assert [(s.start, s.end, s.text) for s in out.segments] == [(0.0, 29.0, " t10 t11")]


def test_text_cut_off_within_the_last_second_is_kept_from_its_window() -> None:
    # Window 2 (30-40.5 s) closes a segment at 40.0 s and starts " t31 t32" without closing it:
    # the next window would start 0.5 s before the end, so that text is kept as it is instead.
    audio = noise(40.5)
    model = WindowModel(audio, {0: result([T(0), 10, T(30)]),
                                3000: result([T(0), 20, 21, T(10), T(10), 31, 32])})
    out = model.transcribe(audio)
    assert model.seeks == [0, 3000]
    assert [(s.start, s.text) for s in out.segments] == [(0.0, " t10"), (30.0, " t20 t21"), (40.0, " t31 t32")]
    assert out.segments[-1].end == pytest.approx(40.5, abs=0.02)
    assert out.text == "t10 t20 t21 t31 t32"


def test_silent_window_is_skipped_and_seek_moves_on() -> None:
    silent = result([T(0), 3, T(1)], -1.6, no_speech=0.9)
    model = WindowModel(AUDIO_50S, {0: silent, 3000: result([T(0), 21, 22, T(4)])})
    out = model.transcribe(AUDIO_50S)
    assert model.seeks == [0, 3000]
    assert [(s.start, s.end, s.text) for s in out.segments] == [(30.0, 34.0, " t21 t22")]
    assert model.previous_at(3000) == []  # nothing from the skipped window is conditioned on


def test_silent_audio_gives_no_segments() -> None:
    audio = np.zeros(35 * SAMPLE_RATE, dtype=np.float32)
    model = WindowModel(audio, {0: result([], -1.5, 0.95), 3000: result([], -1.5, 0.95)})
    out = model.transcribe(audio)
    assert out.segments == [] and out.text == ""
    assert model.seeks == [0, 3000] and len(model.calls) == 2  # silence: no fallback either


def test_empty_text_segments_are_dropped() -> None:
    # a window whose only "segment" has no text (timestamps only) gives no segment
    model = WindowModel(noise(10.0), {0: result([T(0), T(0), T(3)])})
    out = model.transcribe(noise(10.0))
    assert out.segments == [] and out.text == ""


# --- Transcriber: VAD chunks decoded together ----------------------------------------------------


def speech_like(bursts: list[tuple[float, float]], total: float) -> np.ndarray:
    """Silence with real speech (the JFK fixture) in each burst: what Silero VAD calls speech."""
    clip, rate = sf.read(DATA / "jfk-inaugural-1961-excerpt.flac", dtype="float32")
    assert rate == SAMPLE_RATE
    audio = np.zeros(int(total * SAMPLE_RATE), dtype=np.float32)
    for start, end in bursts:
        a, b = int(start * SAMPLE_RATE), int(end * SAMPLE_RATE)
        audio[a:b] = clip[: b - a]
    return audio


# Each pair of neighbours spans more than 30 s, so VAD long-form makes three chunks.
VAD_AUDIO = speech_like([(1.0, 11.0), (24.0, 33.0), (48.0, 56.0)], 60.0)


class ChunkModel:
    """Fake submit for VAD mode: identifies the chunk from its mel; holds every answer until all
    chunks were submitted (so sequential decoding would time out), then answers the last chunk
    first."""

    def __init__(self, audio: np.ndarray, answers: list[list[int]]) -> None:
        self.chunks = chunk_at_pauses(audio, max_chunk_s=30.0)
        self.mels = [
            pad_or_trim(log_mel_spectrogram(audio[a:b], 80, padding=HOP_LENGTH), N_FRAMES)
            for a, b in self.chunks
        ]
        self.answers = answers
        self.arrived: list[int] = []
        self.finished: list[int] = []
        self.all_in: asyncio.Event | None = None

    async def submit(self, task: WindowTask) -> WindowResult:
        if self.all_in is None:
            self.all_in = asyncio.Event()
        index = next(i for i, m in enumerate(self.mels) if torch.equal(task.mel, m))
        self.arrived.append(index)
        if len(self.arrived) == len(self.chunks):
            self.all_in.set()
        await asyncio.wait_for(self.all_in.wait(), timeout=5)
        await asyncio.sleep(0.01 * (len(self.chunks) - index))
        self.finished.append(index)
        return result(self.answers[index], temperature=task.options.temperature)


def test_vad_chunks_are_decoded_concurrently_and_segments_ordered_by_time() -> None:
    answers = [
        [T(0), 100, T(1), T(1), 101, T(3)],
        [T(0), 110, T(2), T(2), 111, T(4), T(4), 112, 113],  # unfinished tail is kept
        [T(0.5), 120, T(2)],  # no pair: Whisper starts the segment at the window start
    ]
    model = ChunkModel(VAD_AUDIO, answers)
    assert len(model.chunks) == 3  # precondition: the pauses split the audio in three
    ctx = ModelContext(TOKENIZER, 80, False, model.submit)
    out = asyncio.run(Transcriber(ctx).transcribe(VAD_AUDIO, TranscribeOptions(long_form="vad")))
    assert sorted(model.arrived) == [0, 1, 2]
    assert model.finished == [2, 1, 0]  # answered in reverse ...
    starts = [s.start for s in out.segments]
    assert starts == sorted(starts)  # ... still in time order
    c = [start / SAMPLE_RATE for start, _ in model.chunks]
    end_1 = model.chunks[1][1] / SAMPLE_RATE
    expected = [
        (c[0], c[0] + 1, " t100"), (c[0] + 1, c[0] + 3, " t101"),
        (c[1], c[1] + 2, " t110"), (c[1] + 2, c[1] + 4, " t111"), (c[1] + 4, end_1, " t112 t113"),
        (c[2], c[2] + 2, " t120"),
    ]
    got = [(s.start, s.end, s.text) for s in out.segments]
    assert [g[2] for g in got] == [e[2] for e in expected]
    for (start, end, _), (exp_start, exp_end, _) in zip(got, expected, strict=True):
        assert start == pytest.approx(exp_start, abs=1e-3) and end == pytest.approx(exp_end, abs=1e-3)
    assert out.text == "t100 t101 t110 t111 t112 t113 t120"
    assert [s.id for s in out.segments] == list(range(6))


def test_vad_mode_on_silence_decodes_nothing() -> None:
    calls: list[WindowTask] = []

    async def submit(task: WindowTask) -> WindowResult:
        calls.append(task)
        return result([T(0), 1, T(1)])

    audio = np.zeros(40 * SAMPLE_RATE, dtype=np.float32)
    ctx = ModelContext(TOKENIZER, 80, False, submit)
    out = asyncio.run(Transcriber(ctx).transcribe(audio, TranscribeOptions(long_form="vad")))
    assert calls == [] and out.segments == [] and out.text == ""
    assert out.duration == pytest.approx(40.0)


def test_vad_mode_on_short_audio_seeks_sequentially() -> None:
    audio = noise(12.0)
    model = WindowModel(audio, {0: result([T(0), 40, 41, T(11)])})
    out = model.transcribe(audio, long_form="vad")
    assert model.seeks == [0]
    assert [(s.start, s.end, s.text) for s in out.segments] == [(0.0, 11.0, " t40 t41")]


def test_window_options_reach_the_engine() -> None:
    audio = noise(3.0)
    model = WindowModel(audio, {0: result([T(0), 40, T(2)])})
    window = WindowOptions(beam_size=2, patience=1.5, max_initial_timestamp=0.5)
    model.transcribe(audio, window=window, temperatures=(0.0,), word_timestamps=False)
    # the fallback's repetition threshold travels with the window (best-of sampling uses it)
    expected = replace(window, language="en", temperature=0.0, compression_ratio_threshold=2.4)
    assert [c.options for c in model.calls] == [expected]


def test_trimmed_audio_context_encodes_the_audio_plus_padding() -> None:
    # Streaming partials (trim_audio_context) send a window of the audio's own length plus 5 s
    # of padding, in whole seconds, to engines that can decode it; others get a 30 s window.
    assert trimmed_frames(1) == 600 and trimmed_frames(100) == 600 and trimmed_frames(101) == 700
    assert trimmed_frames(2900) == N_FRAMES
    audio = noise(2.3)
    frames: list[int] = []

    async def submit(task: WindowTask) -> WindowResult:
        frames.append(task.mel.shape[-1])
        return result([T(0), 10, T(2)])

    options = replace(TranscribeOptions(), trim_audio_context=True)
    for trims in (True, False):
        ctx = ModelContext(TOKENIZER, 80, False, submit, trims_audio_context=trims)
        asyncio.run(Transcriber(ctx).transcribe(audio, options))
    assert frames == [800, N_FRAMES]


# --- Transcriber: speech gating ------------------------------------------------------------------


def test_gating_decodes_nothing_without_speech() -> None:
    calls: list[WindowTask] = []

    async def submit(task: WindowTask) -> WindowResult:
        calls.append(task)
        return result([T(0), 1, T(1)])

    rng = np.random.default_rng(0)
    ctx = ModelContext(TOKENIZER, 80, False, submit)
    options = TranscribeOptions(vad=VadOptions())
    for audio in (np.zeros(90 * SAMPLE_RATE, np.float32),
                  rng.uniform(-0.3, 0.3, 20 * SAMPLE_RATE).astype(np.float32)):
        for long_form in ("sequential", "vad"):
            out = asyncio.run(Transcriber(ctx).transcribe(audio, replace(options, long_form=long_form)))
            assert out.text == "" and out.segments == []
            assert out.duration == pytest.approx(len(audio) / SAMPLE_RATE)
    assert calls == []


def test_gated_speech_is_decoded_joined_and_timestamps_map_back() -> None:
    # speech at 1-11 s and 24-33 s of 60 s: the decoder sees the two regions joined (~21 s,
    # one window); its timestamps come back in the original's time
    seen: list[int] = []

    async def submit(task: WindowTask) -> WindowResult:
        seen.append(int((task.mel != task.mel[:, -1:]).any(dim=0).sum()))
        return result([T(1), 100, T(9), T(12), 101, T(20)])

    audio = VAD_AUDIO[: 36 * SAMPLE_RATE]
    ctx = ModelContext(TOKENIZER, 80, False, submit)
    out = asyncio.run(Transcriber(ctx).transcribe(audio, TranscribeOptions(vad=VadOptions())))
    assert len(seen) == 1 and seen[0] < 23 * 100  # one window of ~21 s of gated audio
    (a1, b1), (a2, b2) = [(a / SAMPLE_RATE, b / SAMPLE_RATE) for a, b in speech_regions(audio)]
    assert 0.5 < a1 < 1.5 and 20 < a2 < 25  # padded regions around the two bursts
    first, second = out.segments
    # gated 1-9 s lies in region 1; gated 12-20 s in region 2, whose gated start is b1 - a1
    assert (first.start, first.end) == pytest.approx((a1 + 1, a1 + 9), abs=1e-3)
    assert second.start == pytest.approx(a2 + 12 - (b1 - a1), abs=1e-3)
    assert second.end == pytest.approx(min(b2, a2 + 20 - (b1 - a1)), abs=1e-3)
    assert out.duration == pytest.approx(36.0)


def gated_windows(answers: list[WindowResult]) -> tuple[TranscriptionResult, list[int], list[tuple[float, float]]]:
    """VAD_AUDIO's three regions (~29 s joined, one window) decoded with `answers` in turn:
    the result, each window's gated start in mel frames, and the regions in seconds."""
    regions = [(a / SAMPLE_RATE, b / SAMPLE_RATE) for a, b in speech_regions(VAD_AUDIO)]
    content = round(sum(b - a for a, b in regions) * 100)
    seeks: list[int] = []

    async def submit(task: WindowTask) -> WindowResult:
        seeks.append(content - int((task.mel != task.mel[:, -1:]).any(dim=0).sum()))
        return answers[len(seeks) - 1]

    ctx = ModelContext(TOKENIZER, 80, False, submit)
    out = asyncio.run(Transcriber(ctx).transcribe(VAD_AUDIO, TranscribeOptions(vad=VadOptions())))
    return out, seeks, regions


def test_a_window_that_ends_early_goes_on_at_the_next_speech_region() -> None:
    # Whisper's single timestamp ending means "nothing more in this window"; openai-whisper
    # then skips the whole window, here the two regions after the first. Gated audio goes on
    # at the next region that starts after the last timestamp instead.
    out, seeks, regions = gated_windows([result([T(1), 100, T(9)]), result([T(0), 101, T(8)]),
                                         result([T(0), 102, T(7)])])
    (a1, b1), (a2, b2), (a3, _) = regions
    starts = [0, round((b1 - a1) * 100), round((b1 - a1 + b2 - a2) * 100)]
    assert seeks == pytest.approx(starts, abs=2)
    assert out.text == "t100 t101 t102"
    assert [s.start for s in out.segments] == pytest.approx([a1, a2, a3], abs=0.02)


def test_a_region_judged_silent_does_not_skip_the_regions_after_it() -> None:
    silent = result([T(0), 3, T(1)], -1.6, no_speech=0.9)
    out, seeks, regions = gated_windows([silent, result([T(0), 101, T(8), T(10), 102, T(17)])])
    (a1, b1), (a2, b2), (a3, b3) = regions
    assert seeks == pytest.approx([0, round((b1 - a1) * 100)], abs=2)
    assert out.text == "t101 t102"
    first, second = out.segments
    assert first.start == pytest.approx(a2, abs=0.02) and a3 <= second.start < b3


def test_a_window_ending_inside_the_last_region_is_its_last() -> None:
    out, seeks, _ = gated_windows([result([T(1), 100, T(9), T(12), 101, T(27)])])
    assert seeks == [0] and out.text == "t100 t101"
