"""The engine interface every backend implements. The decode loop talks only to this."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from app.engine.config import EngineConfig


class Engine(Protocol):
    """Encoder + cross-K/V precompute + row-cached decoder for one loaded model."""

    config: EngineConfig
    device: torch.device
    dtype: torch.dtype
    max_rows: int
    # True: a window's cross-attention K/V live only in its first row (pass cross_runs to decode)
    cross_in_first_row: bool
    # True: windows may be shorter than 30 s (TranscribeOptions.trim_audio_context is honoured)
    trims_audio_context: bool
    # True: greedy_chunk runs several greedy steps on the device per call (CUDA graphs captured)
    greedy_chunks: bool

    def encode_into_rows(self, mel: Tensor, rows: list[int]) -> Tensor:
        """Encode mel [B, n_mels, frames <= 3000]; write cross-attention K/V into `rows`; return features."""
        ...

    def features_into_rows(self, features: Tensor, rows: list[int]) -> None:
        """Write cross-attention K/V of already encoded windows (features [B, positions, d]) into `rows`."""
        ...

    def decode(self, tokens: Tensor, positions: Tensor, start: int, kv_len: int,
               uniform_position: bool = False,
               cross_runs: list[tuple[int, int, int, int]] | None = None) -> Tensor:
        """Feed tokens [B, T] for rows [start, start+B) at `positions`; return float32 logits [B, T, V].

        cross_runs: (offset, rows, g, audio positions) runs of windows of g rows sharing
        cross-attention K/V (see app.engine.cache.CrossRuns).
        """
        ...

    def copy_rows(self, src: list[int], dst: list[int], self_len: int, cross: bool = True) -> None:
        """Copy cached state between rows (compaction, beam reorder, replicas of one window)."""
        ...

    def greedy_chunk(self, tokens: Tensor, positions: Tensor, done: Tensor,
                     suppress: tuple[int, ...], remaining: list[int]) -> tuple[Tensor, Tensor, Tensor] | None:
        """Up to K greedy steps for rows [0, B), none past any row's `remaining` token budget;
        returns (tokens [B, K], done [B], summed log-probs [B]), or None where no captured
        bucket fits (the caller steps instead). Only called when `greedy_chunks` is True."""
        ...

    def cross_attention_weights(self, tokens: Tensor, audio_features: Tensor,
                                heads: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """Alignment-head cross-attention weights for word timestamps."""
        ...
