"""Options for decoding one window and for transcribing a whole file.

Defaults follow what the service uses (faster-whisper's defaults: beam 5, temperature fallback,
timestamps, conditioning on previous text), which reach the best accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from app.audio.vad import VadOptions
from app.constants import MAX_NEW_TOKENS

Task = Literal["transcribe", "translate"]

DEFAULT_TEMPERATURES: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass(frozen=True)
class WindowOptions:
    """How to decode one <= 30 s window. Everything the decode loop needs, nothing about files."""

    task: Task = "transcribe"
    language: str | None = None  # None: detect (multilingual models only)
    temperature: float = 0.0
    beam_size: int = 5  # used when temperature == 0; 1 means greedy
    best_of: int = 5  # number of samples when temperature > 0
    patience: float = 1.0
    length_penalty: float | None = None
    without_timestamps: bool = False
    max_initial_timestamp: float = 1.0
    suppress_blank: bool = True
    #: None: the engine's default list (Whisper's "-1"); () disables; else explicit ids
    suppress_tokens: tuple[int, ...] | None = None
    max_new_tokens: int = MAX_NEW_TOKENS
    #: best-of sampling (temperature > 0) picks among the samples whose text compresses at or
    #: under this ratio when any does: the fallback rejects the others as repetition loops, which
    #: often have the best log-probability (TranscribeOptions.compression_ratio_threshold)
    compression_ratio_threshold: float | None = None


@dataclass(frozen=True)
class TranscribeOptions:
    """How to transcribe a file: window options plus the long-form rules around them."""

    window: WindowOptions = field(default_factory=WindowOptions)
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES
    compression_ratio_threshold: float | None = 2.4
    log_prob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_previous_text: bool = True
    prompt_reset_on_temperature: float = 0.5
    initial_prompt: str | None = None
    word_timestamps: bool = False
    prepend_punctuations: str = "\"'“¿([{-"
    append_punctuations: str = "\"'.。,，!！?？:：”)]}、"
    #: "sequential": openai-whisper's timestamp seeking; "vad": cut at pauses into <= 30 s
    #: chunks decoded together (faster for long files, no conditioning across chunks)
    long_form: Literal["sequential", "vad"] = "sequential"
    #: Encode only the audio's own length (rounded up to whole seconds) instead of a window
    #: padded to 30 s, as whisper.cpp's audio_ctx does: the encoder's cost shrinks with the
    #: audio, at some cost in accuracy. For streaming partials; engines that cannot (the GPU's
    #: fused kernels read whole windows) ignore it.
    trim_audio_context: bool = False
    #: Speech gating: only the speech regions Silero VAD finds are decoded (joined, their
    #: timestamps mapped back), and audio without speech decodes to nothing. None: decode
    #: everything (the VAD long-form mode still cuts its chunks with VadOptions()).
    vad: VadOptions | None = None

    @classmethod
    def greedy(cls) -> TranscribeOptions:
        """Greedy, temperature 0, no fallback, no timestamps: the parity setting."""
        return cls(
            window=WindowOptions(beam_size=1, without_timestamps=True),
            temperatures=(0.0,),
            compression_ratio_threshold=None,
            log_prob_threshold=None,
            condition_on_previous_text=False,
        )
