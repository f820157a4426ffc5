"""The repetition check of temperature fallback: how well a window's text compresses.

A decode stuck in a loop ("sa sa sa ...") compresses far better than speech; Whisper's fallback
retries such a window at a higher temperature when the ratio exceeds a threshold (2.4).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

from app.decoding.tokenizer import WhisperTokenizer


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def tokens_compression_ratio(tokenizer: WhisperTokenizer, tokens: list[int]) -> float:
    """compression_ratio of the text the tokens decode to (as the fallback measures a window)."""
    return compression_ratio(tokenizer.decode(tokens).strip())


def not_repetitive(tokenizer: WhisperTokenizer, threshold: float) -> Callable[[list[int]], bool]:
    """A predicate over token sequences: compression ratio at or under threshold."""
    return lambda tokens: tokens_compression_ratio(tokenizer, tokens) <= threshold
