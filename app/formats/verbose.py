"""OpenAI's `verbose_json` transcription body."""

from __future__ import annotations

from collections.abc import Collection

from app.decoding.results import Segment, TranscriptionResult

# Times are multiples of 20 ms in principle; rounding hides float noise such as
# 0.30000000000000004 without losing anything.
_TIME_DECIMALS = 3


def language_name(code: str) -> str:
    """Whisper language code -> lower-case English name, as OpenAI reports it ("english")."""
    try:
        # Imported late: the language table lives with the decoder, which formats must not
        # require at import time.
        from app.languages import LANGUAGES
    except ImportError:
        return code
    key = code.lower()
    return LANGUAGES.get(key, key)


def _t(seconds: float) -> float:
    return round(float(seconds), _TIME_DECIMALS)


def _segment(segment: Segment) -> dict[str, object]:
    return {
        "id": segment.id,
        "seek": segment.seek,
        "start": _t(segment.start),
        "end": _t(segment.end),
        "text": segment.text,
        "tokens": list(segment.tokens),
        "temperature": float(segment.temperature),
        "avg_logprob": float(segment.avg_logprob),
        "compression_ratio": float(segment.compression_ratio),
        "no_speech_prob": float(segment.no_speech_prob),
    }


def _words(result: TranscriptionResult) -> list[dict[str, object]]:
    return [
        {"word": word.word.strip(), "start": _t(word.start), "end": _t(word.end)}
        for segment in result.segments
        for word in segment.words or ()
    ]


def to_verbose_json(
    result: TranscriptionResult, granularities: Collection[str]
) -> dict[str, object]:
    """{"task", "language", "duration", "text", ["segments"], ["words"]}.

    `granularities` is a validated subset of {"segment", "word"}: "segments" appears for
    "segment", "words" (from the segments' word timings) for "word".
    """
    body: dict[str, object] = {
        "task": result.task,
        "language": language_name(result.language),
        "duration": _t(result.duration),
        "text": result.text.strip(),
    }
    if "segment" in granularities:
        body["segments"] = [_segment(s) for s in result.segments]
    if "word" in granularities:
        body["words"] = _words(result)
    return body
