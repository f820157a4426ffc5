"""A window decode request and its result: the unit the scheduler batches."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from app.decoding.options import WindowOptions


@dataclass
class WindowTask:
    """Decode one <= 30 s window. `prompt` = [sot_prev, *previous text] (may be empty)."""

    mel: Tensor  # [n_mels, 3000], already padded/trimmed
    options: WindowOptions
    previous_tokens: list[int] = field(default_factory=list)
    #: keep the encoder output (word timestamps; a retry at a higher temperature)
    keep_audio_features: bool = False
    #: the encoder output of `mel` from an earlier attempt ([1, positions, d]): the window is
    #: not encoded again, only its cross-attention K/V are recomputed from these
    audio_features: Tensor | None = None


@dataclass
class WindowResult:
    tokens: list[int]  # sampled tokens without the final end-of-text
    sum_logprob: float
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    language: str | None
    language_probs: dict[str, float] | None = None
    prompt_length: int = 0  # tokens before the first sampled one (for alignment)
    prompt_tokens: list[int] = field(default_factory=list)
    audio_features: Tensor | None = None  # [1, 1500, d] when requested
