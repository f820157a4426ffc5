"""Response renderers: json, text, srt, vtt and verbose_json bodies from a transcript."""

from __future__ import annotations

from app.formats.render import RESPONSE_FORMATS, render, validate_granularities

__all__ = ["RESPONSE_FORMATS", "render", "validate_granularities"]
