"""Subtitle timestamp strings."""

from __future__ import annotations


def format_timestamp(seconds: float, *, decimal_marker: str = ".") -> str:
    """`HH:MM:SS<marker>mmm`, hours always present (valid for both SRT and WebVTT).

    Rounded to the nearest millisecond; negative inputs (never expected) clamp to zero.
    """
    total_ms = max(0, round(seconds * 1000))
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{millis:03d}"
