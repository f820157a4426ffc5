"""The real tiny.en engine on the real clips of tests/data, through the runtime (scheduler and all).

Every clip is transcribed with the service defaults (beam 5, fallback, timestamps), with
TranscribeOptions.greedy(), and with word timestamps. Requests are submitted together, so the
scheduler batches windows of different requests, as in production. Normalised transcripts must
match the references (WER <= 5 %).
"""

from __future__ import annotations

import asyncio
import csv
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jiwer
import numpy as np
import pytest
from fakes import torch_threads
from whisper_normalizer.english import EnglishTextNormalizer

from app.audio.decode import decode_audio
from app.constants import SAMPLE_RATE
from app.decoding.options import TranscribeOptions
from app.decoding.results import TranscriptionResult
from app.runtime import ModelRuntime, RuntimeOptions, load_runtime

REPO_ROOT = Path(__file__).resolve().parent.parent
ENGINE_DIR = REPO_ROOT / "engines" / "tiny.en"
DATA = REPO_ROOT / "tests" / "data"
MAX_WER = 0.05

MODES: dict[str, TranscribeOptions] = {
    "defaults": TranscribeOptions(),
    "greedy": TranscribeOptions.greedy(),
    "words": TranscribeOptions(word_timestamps=True),
}


@dataclass(frozen=True)
class Clip:
    id: str
    path: Path
    duration: float
    text: str


def read_manifest() -> list[Clip]:
    with open(DATA / "manifest.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [Clip(r["id"], DATA / r["file"], float(r["duration"]), r["text"]) for r in rows]


CLIPS = read_manifest()


@pytest.fixture(scope="session")
def tiny_en() -> Iterator[ModelRuntime]:
    """The real tiny.en engine on CPU, its scheduler thread running (loaded once, ~1 s)."""
    if not (ENGINE_DIR / "config.json").is_file():
        pytest.skip(f"{ENGINE_DIR} is missing: build it with `python build_engines.py`")
    # Small matrices on shared CI cores: one intra-op thread is fastest. The scheduler's engine
    # thread, started here, keeps that setting; the rest of the session does not see it.
    with torch_threads(1):
        runtime = load_runtime(ENGINE_DIR, RuntimeOptions(device="cpu", warmup=False, batch_wait_ms=0))
        asyncio.run(runtime.start())
    try:
        yield runtime
    finally:
        asyncio.run(runtime.stop())


#: Word timestamps on the longest clip (most words) and on one whose decoded last timestamp lies
#: beyond its end (where words must still stay inside the audio).
WORD_CLIPS = ("jfk-inaugural-1961-excerpt", "ljspeech-LJ001-0002")
#: Requests submitted together. Beam-5 and best-of-5 windows all take 5 rows, greedy ones 1:
#: mixing the two sizes in one batch can fragment the decoder rows, which the scheduler
#: mishandles (test_decode_loop.py::test_scheduler_admits_only_into_contiguous_free_rows).
BATCHES = (
    [(clip.id, "defaults") for clip in CLIPS] + [(clip_id, "words") for clip_id in WORD_CLIPS],
    [(clip.id, "greedy") for clip in CLIPS],
)


@pytest.fixture(scope="module")
def transcripts(tiny_en: ModelRuntime) -> dict[tuple[str, str], TranscriptionResult]:
    """The clips in every mode; each batch of requests is submitted at once."""
    audio = {clip.id: decode_audio(clip.path) for clip in CLIPS}
    out: dict[tuple[str, str], TranscriptionResult] = {}

    async def run(keys: list[tuple[str, str]]) -> None:
        results = await asyncio.gather(*(tiny_en.transcribe(audio[c], MODES[m]) for c, m in keys))
        out.update(zip(keys, results, strict=True))

    with torch_threads(1):
        for keys in BATCHES:
            asyncio.run(run(keys))
    return out


NORMALIZE = EnglishTextNormalizer()


def test_manifest_lists_the_clips() -> None:
    assert len(CLIPS) == 3
    assert all(clip.path.is_file() and clip.text for clip in CLIPS)


RUNS = [(clip, mode) for batch in BATCHES for clip in CLIPS for clip_id, mode in batch
        if clip.id == clip_id]
RUN_IDS = [f"{clip.id}-{mode}" for clip, mode in RUNS]


@pytest.mark.parametrize(("clip", "mode"), RUNS, ids=RUN_IDS)
def test_transcript_matches_the_reference(transcripts: dict, clip: Clip, mode: str) -> None:
    result = transcripts[(clip.id, mode)]
    hypothesis, reference = NORMALIZE(result.text), NORMALIZE(clip.text)
    assert hypothesis, "empty transcript"
    if hypothesis != reference:
        wer = jiwer.wer(reference, hypothesis)
        assert wer <= MAX_WER, f"WER {wer:.1%}: {hypothesis!r} vs {reference!r}"
    assert result.language == "en"
    assert result.duration == pytest.approx(clip.duration, abs=0.01)


@pytest.mark.parametrize(("clip", "mode"), RUNS, ids=RUN_IDS)
def test_segments_are_ordered_and_consistent(transcripts: dict, clip: Clip, mode: str) -> None:
    result = transcripts[(clip.id, mode)]
    segments = result.segments
    assert segments
    assert "".join(s.text for s in segments).strip() == result.text
    assert [s.id for s in segments] == list(range(len(segments)))
    for a, b in zip(segments, segments[1:], strict=False):
        assert a.start <= b.start and a.end <= b.end
    for s in segments:
        assert 0.0 <= s.start < s.end and s.start < clip.duration
        assert math.isfinite(s.avg_logprob) and s.avg_logprob <= 0
        assert 0.0 <= s.no_speech_prob <= 1.0
        assert s.temperature in MODES[mode].temperatures
    if mode == "greedy":  # no timestamps: one segment over the whole clip
        assert len(segments) == 1
        assert segments[0].end == pytest.approx(clip.duration, abs=0.02)


@pytest.mark.parametrize("clip", [c for c in CLIPS if c.id in WORD_CLIPS], ids=list(WORD_CLIPS))
def test_word_timestamps_are_monotonic_and_inside_the_clip(transcripts: dict, clip: Clip) -> None:
    result = transcripts[(clip.id, "words")]
    words = [w for s in result.segments for w in (s.words or [])]
    assert len(words) == len(result.text.split())
    previous_end = 0.0
    for w in words:
        assert previous_end - 1e-6 <= w.start <= w.end <= clip.duration + 1e-6, w
        assert 0.0 <= w.probability <= 1.0
        previous_end = w.end
    for s in result.segments:
        assert s.words, "a segment without words"
        assert "".join(w.word for w in s.words).strip() == s.text.strip()
        assert s.start - 1e-6 <= s.words[0].start and s.words[-1].end <= s.end + 1e-6
    assert NORMALIZE("".join(w.word for w in words)) == NORMALIZE(result.text)


def test_silence_gives_an_empty_transcript(tiny_en: ModelRuntime) -> None:
    # Greedy: no log-prob threshold, so a no_speech_prob above 0.6 alone skips the window. (With
    # the defaults, Whisper's rule keeps a decode whose avg log-prob is above -1: tiny.en then
    # says "You" over digital silence, as openai-whisper's tiny.en does.)
    silence = np.zeros(3 * SAMPLE_RATE, dtype=np.float32)
    with torch_threads(1):
        result = asyncio.run(tiny_en.transcribe(silence, TranscribeOptions.greedy()))
    assert result.text == "" and result.segments == []
    assert result.duration == pytest.approx(3.0)
