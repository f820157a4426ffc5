"""Response renderers: exact bodies for a hand-built transcript."""

from __future__ import annotations

import json

import pytest

from app.decoding.results import Segment, TranscriptionResult, Word
from app.errors import InvalidRequestError
from app.formats import RESPONSE_FORMATS, render
from app.formats.timestamps import format_timestamp


def make_result() -> TranscriptionResult:
    first = Segment(
        id=0,
        seek=0,
        start=0.0,
        end=2.5,
        text=" And so, my fellow Americans,",
        tokens=[50364, 400, 370, 11, 50489],
        temperature=0.0,
        avg_logprob=-0.25,
        compression_ratio=1.1,
        no_speech_prob=0.01,
        words=[
            Word(" And", 0.0, 0.3, 0.9),
            Word(" so,", 0.3, 0.6, 0.8),
            Word(" my", 0.8, 1.0, 0.95),
            Word(" fellow", 1.0, 1.4, 0.99),
            Word(" Americans,", 1.4, 2.5, 0.97),
        ],
    )
    second = Segment(
        id=1,
        seek=0,
        start=3.3000000000000003,  # float noise, as the decoder's arithmetic produces
        end=3726.04,  # past one hour, to exercise the hours field
        text=" ask not --> what",
        tokens=[50529, 1029, 406, 51864],
        temperature=0.2,
        avg_logprob=-0.5,
        compression_ratio=1.3,
        no_speech_prob=0.02,
        words=[
            Word(" ask", 3.3, 3.6, 0.9),
            Word(" not", 3.6, 3.9, 0.9),
            Word(" -->", 3.9, 4.0, 0.1),
            Word(" what", 4.0, 3726.04, 0.9),
        ],
    )
    blank = Segment(2, 3000, 3726.04, 3727.0, " ", [50364], 0.0, -1.0, 1.0, 0.5, None)
    return TranscriptionResult(
        text=" And so, my fellow Americans, ask not --> what",
        segments=[first, second, blank],
        language="en",
        duration=3727.0,
    )


def test_json() -> None:
    body, media_type = render(make_result(), "json")
    assert body == {"text": "And so, my fellow Americans, ask not --> what"}
    assert media_type == "application/json"
    # OpenAI keeps json to the text even when timings were asked for.
    assert render(make_result(), "json", ["word", "segment"])[0] == body


def test_text() -> None:
    body, media_type = render(make_result(), "text")
    assert body == "And so, my fellow Americans, ask not --> what\n"
    assert media_type.startswith("text/plain")


def test_srt() -> None:
    body, media_type = render(make_result(), "srt")
    assert body == (
        "1\n"
        "00:00:00,000 --> 00:00:02,500\n"
        "And so, my fellow Americans,\n"
        "\n"
        "2\n"
        "00:00:03,300 --> 01:02:06,040\n"
        "ask not -> what\n"
        "\n"
    )
    assert media_type.startswith("text/plain")


def test_vtt() -> None:
    body, media_type = render(make_result(), "vtt")
    assert body == (
        "WEBVTT\n"
        "\n"
        "00:00:00.000 --> 00:00:02.500\n"
        "And so, my fellow Americans,\n"
        "\n"
        "00:00:03.300 --> 01:02:06.040\n"
        "ask not -> what\n"
        "\n"
    )
    assert media_type.startswith("text/vtt")


EXPECTED_SEGMENTS = [
    {
        "id": 0,
        "seek": 0,
        "start": 0.0,
        "end": 2.5,
        "text": " And so, my fellow Americans,",
        "tokens": [50364, 400, 370, 11, 50489],
        "temperature": 0.0,
        "avg_logprob": -0.25,
        "compression_ratio": 1.1,
        "no_speech_prob": 0.01,
    },
    {
        "id": 1,
        "seek": 0,
        "start": 3.3,
        "end": 3726.04,
        "text": " ask not --> what",
        "tokens": [50529, 1029, 406, 51864],
        "temperature": 0.2,
        "avg_logprob": -0.5,
        "compression_ratio": 1.3,
        "no_speech_prob": 0.02,
    },
    {
        "id": 2,
        "seek": 3000,
        "start": 3726.04,
        "end": 3727.0,
        "text": " ",
        "tokens": [50364],
        "temperature": 0.0,
        "avg_logprob": -1.0,
        "compression_ratio": 1.0,
        "no_speech_prob": 0.5,
    },
]
EXPECTED_WORDS = [
    {"word": "And", "start": 0.0, "end": 0.3},
    {"word": "so,", "start": 0.3, "end": 0.6},
    {"word": "my", "start": 0.8, "end": 1.0},
    {"word": "fellow", "start": 1.0, "end": 1.4},
    {"word": "Americans,", "start": 1.4, "end": 2.5},
    {"word": "ask", "start": 3.3, "end": 3.6},
    {"word": "not", "start": 3.6, "end": 3.9},
    {"word": "-->", "start": 3.9, "end": 4.0},
    {"word": "what", "start": 4.0, "end": 3726.04},
]
HEAD = {
    "task": "transcribe",
    "language": "english",
    "duration": 3727.0,
    "text": "And so, my fellow Americans, ask not --> what",
}


def test_verbose_json_defaults_to_segments() -> None:
    body, media_type = render(make_result(), "verbose_json")
    assert media_type == "application/json"
    assert body == {**HEAD, "segments": EXPECTED_SEGMENTS}
    assert list(body) == ["task", "language", "duration", "text", "segments"]
    json.dumps(body)  # serialisable as is
    assert render(make_result(), "verbose_json", [])[0] == body


def test_verbose_json_words_only() -> None:
    body, _ = render(make_result(), "verbose_json", ["word"])
    assert body == {**HEAD, "words": EXPECTED_WORDS}


def test_verbose_json_words_and_segments() -> None:
    body, _ = render(make_result(), "verbose_json", {"segment", "word"})
    assert body == {**HEAD, "segments": EXPECTED_SEGMENTS, "words": EXPECTED_WORDS}


def test_verbose_json_without_word_timings_gives_empty_words() -> None:
    result = make_result()
    for segment in result.segments:
        segment.words = None
    assert render(result, "verbose_json", ["word"])[0]["words"] == []


def test_language_name_and_task() -> None:
    result = make_result()
    result.language, result.task = "de", "translate"
    body, _ = render(result, "verbose_json")
    assert body["language"] == "german" and body["task"] == "translate"
    result.language = "xx"  # unknown codes pass through
    assert render(result, "verbose_json")[0]["language"] == "xx"


def test_empty_transcript() -> None:
    result = TranscriptionResult(text="", segments=[], language="en", duration=0.0)
    assert render(result, "srt")[0] == ""
    assert render(result, "vtt")[0] == "WEBVTT\n\n"
    assert render(result, "text")[0] == "\n"
    assert render(result, "verbose_json")[0]["segments"] == []


def test_invalid_arguments() -> None:
    with pytest.raises(InvalidRequestError) as info:
        render(make_result(), "xml")
    assert info.value.param == "response_format"
    with pytest.raises(InvalidRequestError) as info:
        render(make_result(), "verbose_json", ["sentence"])
    assert info.value.param == "timestamp_granularities[]"
    assert set(RESPONSE_FORMATS) == {"json", "text", "srt", "verbose_json", "vtt"}


@pytest.mark.parametrize(
    ("seconds", "srt", "vtt"),
    [
        (0.0, "00:00:00,000", "00:00:00.000"),
        (0.0004, "00:00:00,000", "00:00:00.000"),
        (0.0006, "00:00:00,001", "00:00:00.001"),
        (59.9996, "00:01:00,000", "00:01:00.000"),
        (3661.5, "01:01:01,500", "01:01:01.500"),
        (360000.0, "100:00:00,000", "100:00:00.000"),
        (-1.0, "00:00:00,000", "00:00:00.000"),
    ],
)
def test_format_timestamp(seconds: float, srt: str, vtt: str) -> None:
    assert format_timestamp(seconds, decimal_marker=",") == srt
    assert format_timestamp(seconds) == vtt
