"""SRT and WebVTT renderings of a transcript's segments."""

from __future__ import annotations

from collections.abc import Iterator

from app.decoding.results import Segment, TranscriptionResult
from app.formats.timestamps import format_timestamp


def _cue_text(segment: Segment) -> str:
    # Whisper segment text starts with the space that separated it from the previous one.
    # "-->" inside a cue would be read as a timing line by subtitle parsers.
    return segment.text.strip().replace("-->", "->")


def _cues(result: TranscriptionResult) -> Iterator[tuple[Segment, str]]:
    for segment in result.segments:
        text = _cue_text(segment)
        if text:
            yield segment, text


def to_srt(result: TranscriptionResult) -> str:
    """SubRip: 1-based cue numbers, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, blank line after each."""
    cues = []
    for number, (segment, text) in enumerate(_cues(result), start=1):
        start = format_timestamp(segment.start, decimal_marker=",")
        end = format_timestamp(segment.end, decimal_marker=",")
        cues.append(f"{number}\n{start} --> {end}\n{text}\n\n")
    return "".join(cues)


def to_vtt(result: TranscriptionResult) -> str:
    """WebVTT: `WEBVTT` header, then `HH:MM:SS.mmm --> HH:MM:SS.mmm` cues."""
    cues = ["WEBVTT\n\n"]
    for segment, text in _cues(result):
        start = format_timestamp(segment.start)
        end = format_timestamp(segment.end)
        cues.append(f"{start} --> {end}\n{text}\n\n")
    return "".join(cues)
