"""Long-form transcription: windows, temperature fallback, timestamps, segments.

Two modes:
- sequential: openai-whisper's timestamp seeking. Each window starts where the last complete
  segment ended, so no text is lost at 30 s cuts; optionally conditioned on previous text.
  With `options.vad`, only the speech regions Silero VAD finds are decoded, joined end to end,
  and their timestamps mapped back (app.decoding.speech_map); no speech, no decoding. A
  window the decoder ends early (or judges silent) goes on at the next region inside it.
- vad: cut the audio at pauses into <= 30 s chunks and decode them all at once (batched).

Everything model-specific is behind `submit` (decode one window, batched by the scheduler) and
`cross_attention` (alignment pass for word timestamps), so the same code serves every backend.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from app.audio.features import WindowedLogMel, log_mel_spectrogram, pad_or_trim
from app.audio.vad import VadOptions
from app.constants import (
    CHUNK_LENGTH,
    FRAMES_PER_SECOND,
    HOP_LENGTH,
    N_FRAMES,
    SAMPLE_RATE,
    TIME_PRECISION,
    TOKENS_PER_SECOND,
)
from app.decoding.options import TranscribeOptions, WindowOptions
from app.decoding.repetition import tokens_compression_ratio
from app.decoding.results import Segment, TranscriptionResult, Word
from app.decoding.speech_map import SpeechMap
from app.decoding.tokenizer import WhisperTokenizer
from app.decoding.window import WindowResult, WindowTask

INPUT_STRIDE = FRAMES_PER_SECOND // TOKENS_PER_SECOND  # mel frames per encoder position
GPU_FEATURES_MAX_SECONDS = 600.0  # longer files: log-mel on the CPU (ModelContext.feature_device)
EAGER_FEATURES_MAX_SECONDS = 120.0  # longer files on the CPU: log-mel window by window
TRIM_PADDING_FRAMES = 5 * FRAMES_PER_SECOND  # silence after a trimmed window's audio
#: When a window leaves less audio than this after it, transcription stops there instead of
#: decoding the sliver as a window of its own: conditioned on the text before it, Whisper tends to
#: repeat that text over a fraction of a second of trailing silence (whisper.cpp and WhisperKit
#: also stop with one second left).
MIN_TAIL_FRAMES = FRAMES_PER_SECOND

SubmitFn = Callable[[WindowTask], Awaitable[WindowResult]]
#: Called with each segment as soon as it is final (SSE streaming sends it on at once).
SegmentCallback = Callable[[Segment], Awaitable[None]]
#: (audio_features, tokens) -> (alignment-head weights [H, T, 1500], logits [T, V])
CrossAttentionFn = Callable[[Tensor, list[int]], Awaitable[tuple[Tensor, Tensor]]]


@dataclass
class DecodeOutcome:
    result: WindowResult
    avg_logprob: float
    temperature: float
    compression_ratio: float


@dataclass
class ModelContext:
    tokenizer: WhisperTokenizer
    n_mels: int
    multilingual: bool
    submit: SubmitFn
    cross_attention: CrossAttentionFn | None = None
    #: the engine decodes windows shorter than 30 s (TranscribeOptions.trim_audio_context)
    trims_audio_context: bool = False
    #: where the log-mel spectrogram of files up to GPU_FEATURES_MAX_SECONDS is computed: the
    #: engine's GPU, or None for the CPU. On the GPU the windows need no stacking and copying on
    #: the engine thread (~2.5 ms an admission of 8 windows on an H200 host).
    feature_device: torch.device | None = None


def trimmed_frames(content_frames: int) -> int:
    """Mel frames of a trimmed-context window: the content plus 5 s of padding, whole seconds.

    Without trailing silence the decoder tends not to see where speech ends and repeats
    itself to the token limit; on dev-set turn prefixes 5 s of padding gave the best agreement
    with full-window decodes of the fixed lengths tried, at a fraction of the encoder cost.
    """
    quantum = FRAMES_PER_SECOND
    padded = content_frames + TRIM_PADDING_FRAMES
    return min(N_FRAMES, -(-padded // quantum) * quantum)


async def decode_with_fallback(ctx: ModelContext, mel: Tensor, previous: list[int],
                               options: TranscribeOptions, window: WindowOptions,
                               keep_features: bool) -> DecodeOutcome:
    """Decode a window at rising temperatures until it passes the quality thresholds."""
    attempts: list[DecodeOutcome] = []
    below_cr: list[DecodeOutcome] = []
    outcome: DecodeOutcome | None = None
    # A retry at a higher temperature reuses the first attempt's encoder output (on a CPU the
    # encoder is most of a window's cost), so every attempt but the last keeps it.
    features: Tensor | None = None
    for i, temperature in enumerate(options.temperatures):
        last = i == len(options.temperatures) - 1
        # best-of sampling keeps to samples that pass the repetition check where any does
        attempt = replace(window, temperature=temperature,
                          compression_ratio_threshold=options.compression_ratio_threshold)
        result = await ctx.submit(WindowTask(mel, attempt, previous,
                                             keep_audio_features=keep_features or not last,
                                             audio_features=features))
        features = result.audio_features
        if not keep_features:
            result = replace(result, audio_features=None)
        outcome = DecodeOutcome(result, result.avg_logprob, temperature,
                                tokens_compression_ratio(ctx.tokenizer, result.tokens))
        attempts.append(outcome)
        if window.language is None and result.language is not None:
            window = replace(window, language=result.language)
        needs_fallback = False
        if options.compression_ratio_threshold is not None:
            if outcome.compression_ratio > options.compression_ratio_threshold:
                needs_fallback = True  # too repetitive
            else:
                below_cr.append(outcome)
        if options.log_prob_threshold is not None and outcome.avg_logprob < options.log_prob_threshold:
            needs_fallback = True
        if (options.no_speech_threshold is not None and options.log_prob_threshold is not None
                and result.no_speech_prob > options.no_speech_threshold
                and outcome.avg_logprob < options.log_prob_threshold):
            needs_fallback = False  # silence: no temperature will help
        if not needs_fallback:
            return outcome
    assert outcome is not None
    best = max(below_cr or attempts, key=lambda o: o.avg_logprob)
    return replace(best, temperature=outcome.temperature)


def should_skip_window(outcome: DecodeOutcome, options: TranscribeOptions) -> bool:
    if options.no_speech_threshold is None:
        return False
    skip = outcome.result.no_speech_prob > options.no_speech_threshold
    if options.log_prob_threshold is not None and outcome.avg_logprob > options.log_prob_threshold:
        skip = False
    return skip


@dataclass
class RawSegment:
    seek: int
    start: float
    end: float
    tokens: list[int]
    words: list[Word] | None = None


def split_by_timestamps(tokens: list[int], tb: int, time_offset: float, segment_size: int,
                        seek: int) -> tuple[list[RawSegment], int, bool]:
    """Cut a window's tokens into segments at timestamp pairs; return them and the next seek."""
    single_ending = len(tokens) >= 2 and tokens[-2] < tb <= tokens[-1]
    pairs = [i for i in range(1, len(tokens)) if tokens[i] >= tb and tokens[i - 1] >= tb]
    segments: list[RawSegment] = []
    if pairs:
        cuts = pairs + ([len(tokens)] if single_ending else [])
        last = 0
        for cut in cuts:
            part = tokens[last:cut]
            start = time_offset + (part[0] - tb) * TIME_PRECISION
            end = time_offset + (part[-1] - tb) * TIME_PRECISION
            segments.append(RawSegment(seek, start, end, part))
            last = cut
        if single_ending:
            next_seek = seek + segment_size  # nothing was said after the last timestamp
        else:
            # the text after the last complete pair is cut off: re-decode it in the next window
            next_seek = seek + (tokens[last - 1] - tb) * INPUT_STRIDE
    else:
        duration = segment_size * HOP_LENGTH / SAMPLE_RATE
        stamps = [t for t in tokens if t >= tb]
        if stamps and stamps[-1] != tb:
            duration = (stamps[-1] - tb) * TIME_PRECISION
        segments.append(RawSegment(seek, time_offset, time_offset + duration, tokens))
        next_seek = seek + segment_size
    return segments, next_seek, single_ending


def keep_tail(raw: list[RawSegment], tokens: list[int], tb: int, end_time: float) -> None:
    """Add the text after the last timestamp pair as a segment ending at `end_time`.

    split_by_timestamps leaves that text for the next window to re-decode; this is for windows
    that have no next one.
    """
    if not raw:
        return
    tail = tokens[sum(len(r.tokens) for r in raw):]
    if any(t < tb for t in tail):
        raw.append(RawSegment(raw[-1].seek, raw[-1].end, end_time, tail))


class Transcriber:
    def __init__(self, ctx: ModelContext) -> None:
        self.ctx = ctx
        self.tokenizer = ctx.tokenizer
        self._speech_map: SpeechMap | None = None  # set while decoding gated audio

    async def transcribe(self, audio: np.ndarray, options: TranscribeOptions,
                         on_segment: SegmentCallback | None = None) -> TranscriptionResult:
        duration = len(audio) / SAMPLE_RATE
        window = options.window
        if not self.ctx.multilingual:
            window = replace(window, language="en")
        long_form_vad = options.long_form == "vad" and duration > CHUNK_LENGTH
        if long_form_vad:
            segments, language, lang_prob = await self._transcribe_vad(audio, options, window)
            for segment in segments if on_segment is not None else ():
                await on_segment(segment)  # chunks finish together: nothing to send earlier
        else:
            speech = await self._speech(audio, options)
            if speech is None:  # no speech: nothing reaches the decoder
                return TranscriptionResult(text="", segments=[], language=window.language or "en",
                                           duration=duration, task=window.task)
            self._speech_map = None if speech.is_identity(len(audio)) else speech
            gated = speech.gate(audio)
            # a long file's whole-file STFT would hold ~1.5 GB of GPU memory per 2 hours of audio
            gated_s = len(gated) / SAMPLE_RATE
            device = self.ctx.feature_device if gated_s <= GPU_FEATURES_MAX_SECONDS else None
            mel: Tensor | WindowedLogMel
            if device is None and gated_s > EAGER_FEATURES_MAX_SECONDS:
                # window by window: the whole-file STFT's intermediates grow with the file (~1 GB
                # for 30 minutes), the windows' don't
                mel = await asyncio.to_thread(WindowedLogMel, gated, self.ctx.n_mels, padding=HOP_LENGTH)
            else:
                mel = await asyncio.to_thread(log_mel_spectrogram, gated, self.ctx.n_mels,
                                              padding=HOP_LENGTH, device=device)
            del gated
            segments, language, lang_prob = await self._transcribe_sequential(mel, options, window,
                                                                              on_segment)
        text = "".join(s.text for s in segments).strip()
        return TranscriptionResult(text=text, segments=segments, language=language or "en",
                                   duration=duration, language_probability=lang_prob,
                                   task=window.task)

    async def _speech(self, audio: np.ndarray, options: TranscribeOptions) -> SpeechMap | None:
        """The speech regions to decode (all of the audio without gating); None: no speech."""
        if options.vad is None:
            return SpeechMap([(0, len(audio))]) if len(audio) else None
        from app.audio.vad import speech_regions

        regions = await asyncio.to_thread(speech_regions, audio, options.vad,
                                          device=self.ctx.feature_device)
        return SpeechMap(regions) if regions else None

    async def _transcribe_sequential(self, mel: Tensor | WindowedLogMel, options: TranscribeOptions, window: WindowOptions,
                                     on_segment: SegmentCallback | None = None
                                     ) -> tuple[list[Segment], str | None, float | None]:
        tok = self.tokenizer
        tb = tok.timestamp_begin
        content_frames = mel.shape[-1] - 1
        seek = 0
        all_tokens: list[int] = []
        prompt_reset_since = 0
        if options.initial_prompt:
            all_tokens.extend(tok.encode(" " + options.initial_prompt.strip()))
        segments: list[Segment] = []
        language_prob: float | None = None
        last_speech = 0.0
        while seek < content_frames:
            time_offset = seek * HOP_LENGTH / SAMPLE_RATE
            segment_size = min(N_FRAMES, content_frames - seek)
            frames = N_FRAMES
            if options.trim_audio_context and self.ctx.trims_audio_context:
                frames = trimmed_frames(segment_size)
            window_mel = pad_or_trim(mel[:, seek : seek + segment_size], frames)
            previous = all_tokens[prompt_reset_since:] if options.condition_on_previous_text or \
                options.initial_prompt else []
            outcome = await decode_with_fallback(self.ctx, window_mel, previous, options, window,
                                                 options.word_timestamps)
            result = outcome.result
            if window.language is None and result.language is not None:
                window = replace(window, language=result.language)
                if result.language_probs:
                    language_prob = result.language_probs.get(result.language)
            if should_skip_window(outcome, options):
                seek = self._next_region_seek(time_offset, seek, seek + segment_size)
                continue
            previous_seek = seek
            raw, seek, single_ending = split_by_timestamps(result.tokens, tb, time_offset, segment_size, seek)
            if single_ending and options.vad is not None:
                # Whisper heard nothing after its last timestamp, but a speech region whose
                # speech (past its padding) starts later in the window is still decoded
                heard_until = time_offset + (result.tokens[-1] - tb) * TIME_PRECISION
                seek = self._next_region_seek(heard_until - options.vad.speech_pad_ms / 1000,
                                              previous_seek, seek)
            if content_frames - seek < MIN_TAIL_FRAMES:
                if not single_ending:  # the text cut off at the last timestamp pair stays
                    keep_tail(raw, result.tokens, tb, time_offset + segment_size / FRAMES_PER_SECOND)
                seek = content_frames
            if options.word_timestamps and self.ctx.cross_attention is not None:
                last_speech = await self._add_words(raw, result, window, segment_size, time_offset,
                                                    last_speech, options)
                if not single_ending and seek < content_frames:
                    last_end = next((s.words[-1].end for s in reversed(raw) if s.words), None)
                    if last_end is not None and last_end > time_offset:
                        seek = round(last_end * FRAMES_PER_SECOND)
            for part in raw:
                text = tok.decode(part.tokens)
                if part.start == part.end or not text.strip():
                    continue
                all_tokens.extend(part.tokens)
                segments.append(self._segment(len(segments), previous_seek, part, text, outcome))
                if on_segment is not None:
                    await on_segment(segments[-1])
            if not options.condition_on_previous_text or outcome.temperature > options.prompt_reset_on_temperature:
                prompt_reset_since = len(all_tokens)
            if seek <= previous_seek:  # guarantee progress even on degenerate timestamp output
                seek = previous_seek + segment_size
        return segments, window.language, language_prob

    def _next_region_seek(self, earliest: float, seek: int, window_end: int) -> int:
        """Where to go on when the decoder heard no speech in a window from some point on.

        openai-whisper skips to the window's end. With gated audio the regions VAD found are
        known: go to the first one that starts at or after gated time `earliest` and inside
        the window, so one region judged silent (or a decoder that stops early) does not take
        the regions after it along; else to `window_end`.
        """
        if self._speech_map is None:
            return window_end
        start = self._speech_map.next_start(max(earliest, (seek + 1) / FRAMES_PER_SECOND))
        if start is None:
            return window_end
        # up to the next frame: a window that started a hair early would map to the region before
        return min(math.ceil(start * FRAMES_PER_SECOND - 1e-6), window_end)

    async def _transcribe_vad(self, audio: np.ndarray, options: TranscribeOptions,
                              window: WindowOptions) -> tuple[list[Segment], str | None, float | None]:
        from app.audio.vad import chunk_at_pauses

        chunks = await asyncio.to_thread(chunk_at_pauses, audio,
                                         max_chunk_s=CHUNK_LENGTH,
                                         options=options.vad or VadOptions(),
                                         device=self.ctx.feature_device)
        language_prob = None
        if window.language is None and chunks:
            # detect once on the first chunk so every chunk is decoded in the same language
            first = await self._chunk_mel(audio, chunks[0])
            probe = await self.ctx.submit(WindowTask(first, replace(window, beam_size=1, max_new_tokens=1)))
            window = replace(window, language=probe.language)
            if probe.language_probs and probe.language:
                language_prob = probe.language_probs.get(probe.language)
        tb = self.tokenizer.timestamp_begin

        async def run_chunk(start: int, end: int) -> list[tuple[RawSegment, DecodeOutcome]]:
            chunk_mel = await self._chunk_mel(audio, (start, end))
            outcome = await decode_with_fallback(self.ctx, chunk_mel, [], options, window,
                                                 options.word_timestamps)
            if should_skip_window(outcome, options):
                return []
            seek = start // HOP_LENGTH
            size = min(N_FRAMES, max(1, (end - start) // HOP_LENGTH))
            offset = start / SAMPLE_RATE
            tokens = outcome.result.tokens
            raw, _, single_ending = split_by_timestamps(tokens, tb, offset, size, seek)
            if not single_ending:
                keep_tail(raw, tokens, tb, end / SAMPLE_RATE)  # no later window re-decodes it
            if options.word_timestamps and self.ctx.cross_attention is not None:
                await self._add_words(raw, outcome.result, window, size, offset, offset, options)
            return [(r, outcome) for r in raw]

        per_chunk = await asyncio.gather(*(run_chunk(s, e) for s, e in chunks))
        segments: list[Segment] = []
        for items in per_chunk:
            for raw, outcome in items:
                text = self.tokenizer.decode(raw.tokens)
                if raw.start >= raw.end or not text.strip():
                    continue
                segments.append(self._segment(len(segments), raw.seek, raw, text, outcome))
        return segments, window.language, language_prob

    async def _chunk_mel(self, audio: np.ndarray, chunk: tuple[int, int]) -> Tensor:
        """A chunk's own log-mel, padded to a window: no whole-file spectrogram is held."""
        start, end = chunk
        mel = await asyncio.to_thread(log_mel_spectrogram, audio[start:end], self.ctx.n_mels,
                                      padding=HOP_LENGTH, device=self.ctx.feature_device)
        return pad_or_trim(mel[:, :N_FRAMES], N_FRAMES)

    def _segment(self, index: int, seek: int, raw: RawSegment, text: str, outcome: DecodeOutcome) -> Segment:
        segment = Segment(
            id=index,
            seek=seek,
            start=round(raw.start, 3),
            end=round(raw.end, 3),
            text=text,
            tokens=raw.tokens,
            temperature=outcome.temperature,
            avg_logprob=outcome.avg_logprob,
            compression_ratio=outcome.compression_ratio,
            no_speech_prob=outcome.result.no_speech_prob,
            words=raw.words,
        )
        # gated audio: back to where it was said in the original
        return segment if self._speech_map is None else self._speech_map.segment(segment)

    async def _add_words(self, raw: list[RawSegment], result: WindowResult, window: WindowOptions,
                         segment_size: int, time_offset: float, last_speech: float,
                         options: TranscribeOptions) -> float:
        from app.decoding.word_timing import assign_words

        return await assign_words(self.ctx, raw, result, window, segment_size, time_offset,
                                  last_speech, options)


