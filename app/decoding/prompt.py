"""A window's prompt: previous text, the start-of-transcript sequence and the timestamp mode."""

from __future__ import annotations

from app.decoding.options import WindowOptions
from app.decoding.tokenizer import WhisperTokenizer


def window_prompt(tokenizer: WhisperTokenizer, options: WindowOptions, previous_tokens: list[int],
                  language: str | None, n_ctx: int) -> list[int]:
    """[sot_prev, *previous text] (at most half the text context, as openai-whisper keeps it),
    then the start-of-transcript sequence, then no-timestamps when timestamps are off."""
    prompt: list[int] = []
    if previous_tokens:
        prompt = [tokenizer.sot_prev, *previous_tokens[-(n_ctx // 2 - 1):]]
    prompt += tokenizer.sot_sequence(language, options.task)
    if options.without_timestamps:
        prompt.append(tokenizer.no_timestamps)
    return prompt
