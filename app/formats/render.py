"""Pick the response body and media type for an OpenAI `response_format`."""

from __future__ import annotations

from collections.abc import Iterable

from app.decoding.results import TranscriptionResult
from app.errors import InvalidRequestError
from app.formats.subtitles import to_srt, to_vtt
from app.formats.verbose import to_verbose_json

RESPONSE_FORMATS: tuple[str, ...] = ("json", "text", "srt", "verbose_json", "vtt")
TIMESTAMP_GRANULARITIES: frozenset[str] = frozenset({"segment", "word"})

JSON_MEDIA_TYPE = "application/json"
TEXT_MEDIA_TYPE = "text/plain; charset=utf-8"
VTT_MEDIA_TYPE = "text/vtt; charset=utf-8"


def validate_granularities(granularities: Iterable[str] | None) -> frozenset[str]:
    """Check `timestamp_granularities[]`; none given means segments, as in OpenAI's API."""
    chosen = frozenset(granularities or ())
    unknown = sorted(chosen - TIMESTAMP_GRANULARITIES)
    if unknown:
        raise InvalidRequestError(
            f"Invalid timestamp_granularities {unknown}: expected 'segment' and/or 'word'.",
            param="timestamp_granularities[]",
        )
    return chosen or frozenset({"segment"})


def render(
    result: TranscriptionResult,
    response_format: str = "json",
    timestamp_granularities: Iterable[str] | None = None,
) -> tuple[str | dict[str, object], str]:
    """(body, media type). Bodies are str for text/srt/vtt and a dict for json/verbose_json.

    `timestamp_granularities` only shapes verbose_json; as in OpenAI's API, "json" stays
    {"text"} even when word or segment timings were asked for.
    """
    granularities = validate_granularities(timestamp_granularities)
    if response_format == "json":
        return {"text": result.text.strip()}, JSON_MEDIA_TYPE
    if response_format == "text":
        return result.text.strip() + "\n", TEXT_MEDIA_TYPE
    if response_format == "srt":
        return to_srt(result), TEXT_MEDIA_TYPE
    if response_format == "vtt":
        return to_vtt(result), VTT_MEDIA_TYPE
    if response_format == "verbose_json":
        return to_verbose_json(result, granularities), JSON_MEDIA_TYPE
    raise InvalidRequestError(
        f"Invalid response_format {response_format!r}: expected one of {', '.join(RESPONSE_FORMATS)}.",
        param="response_format",
    )
