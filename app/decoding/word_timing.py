"""Glue between the long-form transcriber and the alignment (word timestamps) module."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from app.decoding.alignment import add_word_timestamps
from app.decoding.options import TranscribeOptions, WindowOptions
from app.decoding.window import WindowResult

if TYPE_CHECKING:
    from app.decoding.transcribe import ModelContext, RawSegment


async def assign_words(ctx: ModelContext, raw: list[RawSegment], result: WindowResult, window: WindowOptions,
                       segment_size: int, time_offset: float, last_speech: float,
                       options: TranscribeOptions) -> float:
    """Attach words to each raw segment of one window (updating its bounds); return last speech end."""
    if not raw or result.audio_features is None or ctx.cross_attention is None:
        return last_speech
    features = result.audio_features
    language = result.language or window.language or "en"
    sot_sequence = ctx.tokenizer.sot_sequence(language if ctx.multilingual else None, window.task)
    # The alignment pass is async (it runs on the engine thread) but the alignment module calls
    # a plain function: run the one pass it will ask for (the whole window's text) up front.
    text_tokens = [[t for t in seg.tokens if t < ctx.tokenizer.eot] for seg in raw]
    expected = [*sot_sequence, ctx.tokenizer.no_timestamps, *[t for seg in text_tokens for t in seg],
                ctx.tokenizer.eot]
    weights, logits = await ctx.cross_attention(features, expected)

    def cross_attention(tokens: list[int]) -> tuple[Tensor, Tensor]:
        if tokens != expected:
            raise ValueError("alignment asked for a token sequence other than the window's text")
        return weights.float().cpu(), logits.float().cpu()

    segments_words, last = add_word_timestamps(
        text_tokens,
        [(seg.start, seg.end) for seg in raw],
        cross_attention=cross_attention,
        tokenizer=ctx.tokenizer,
        sot_sequence=sot_sequence,
        time_offset=time_offset,
        num_frames=segment_size,
        last_speech_timestamp=last_speech,
        language=language,
        prepend_punctuations=options.prepend_punctuations,
        append_punctuations=options.append_punctuations,
    )
    for seg, words in zip(raw, segments_words, strict=True):
        seg.words = words.words
        seg.start, seg.end = words.start, words.end
    return last



