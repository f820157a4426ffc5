"""The reference runner: a WhisperModel over a DecoderCache in torch's operators, on any device.

It serves CPU engines (with the CPU's operators, app.engine.cpu.ops) and is what the CUDA runner
(app.engine.runners.cuda) departs from where a kernel is faster: encode windows into cache rows,
feed rows forward (prompt prefills and decode steps of many rows at different positions), and the
uncached pass that yields the alignment heads' cross-attention weights.

A window's cross-attention K/V are stored once, in its first row, and the window's beams or
samples read them there (decode's cross_runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from app.engine.cache import CrossRuns, DecoderCache, attend_cached, quantize_kv_int8
from app.engine.host_copy import device_tensor, to_device
from app.engine.model import (
    TORCH_OPS,
    Ops,
    WhisperModel,
    WholeSequenceAttention,
    merge_heads,
    split_heads,
)


@dataclass
class CachedRows:
    """DecoderAttention of rows [start, end) of a DecoderCache: tokens at `positions` [B, T] write
    their self-attention K/V there and read cache positions [0, kv_len) under `mask`; cross-attention
    reads each row's cross K/V, or with `cross_runs` a window's from its first row."""

    runner: ReferenceRunner
    start: int
    end: int
    positions: Tensor
    kv_len: int
    mask: Tensor | None
    cross_runs: CrossRuns | None

    def self_attention(self, layer: int, qkv: Tensor) -> Tensor:
        cache, n_head = self.runner.cache, self.runner.n_head
        b, t, _ = qkv.shape
        q, k, v = (split_heads(x, n_head) for x in qkv.chunk(3, dim=-1))
        # write this call's K/V into each row at its own positions
        ck, cv = cache.self_k[layer, self.start : self.end], cache.self_v[layer, self.start : self.end]
        if t == 1:  # one scatter kernel per tensor (advanced-index assignment costs more)
            index = self.positions[:, None, :, None].expand(b, n_head, 1, k.shape[-1])
            ck.scatter_(2, index, k)
            cv.scatter_(2, index, v)
        else:
            rows = torch.arange(self.start, self.end, device=qkv.device)[:, None]
            cache.self_k[layer][rows, :, self.positions] = k.transpose(1, 2)
            cache.self_v[layer][rows, :, self.positions] = v.transpose(1, 2)
        a = self.runner.ops.attention(q, ck[:, :, : self.kv_len], cv[:, :, : self.kv_len], attn_mask=self.mask)
        return merge_heads(a)

    def cross_attention(self, layer: int, q: Tensor) -> Tensor:
        return merge_heads(self.runner.cross_attention(layer, split_heads(q, self.runner.n_head), self.start,
                                                       self.cross_runs))


class ReferenceRunner:
    """Stateless model + a DecoderCache: encode windows into rows, step rows forward."""

    #: a window's cross-attention K/V live in its first row only (decode reads them via cross_runs)
    cross_in_first_row = True
    #: windows may be shorter than 30 s: cross_runs carry each window's audio positions
    trims_audio_context = True

    def __init__(self, model: WhisperModel, cache: DecoderCache, ops: Ops = TORCH_OPS) -> None:
        #: no greedy chunks on the device here (greedy_chunk answers None)
        self.greedy_chunks = False
        self.model = model
        self.cache = cache
        self.dims = model.dims
        self.n_head = model.dims.n_text_head
        self.ops = ops
        self.device = cache.self_k.device

    # ---- audio ------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, mel: Tensor) -> Tensor:
        return self.model.encoder.encode(mel, self.ops)

    @torch.inference_mode()
    def write_cross_kv(self, audio_features: Tensor, rows: list[int]) -> None:
        """Compute every decoder layer's cross-attention K/V once per window and store them in rows."""
        b, t, _ = audio_features.shape
        cache = self.cache
        # consecutive rows (the usual case) are a slice: a plain strided copy instead of an index_put
        consecutive = rows == list(range(rows[0], rows[0] + b))
        index = slice(rows[0], rows[0] + b) if consecutive else device_tensor(rows, audio_features.device)
        if cache.cross_len is not None:
            cache.cross_len[index] = t
        for i, layer in enumerate(self.model.decoder.layers):
            # [B, T, 2d]: K then V, heads inside each
            self.store_cross_kv(i, self.ops.linear(layer.cross.kv, audio_features), index)

    def store_cross_kv(self, layer: int, kv: Tensor, index: slice | Tensor) -> None:
        """kv [B, T, 2d] of decoder layer `layer` into the cache rows `index`, positions [0, T)."""
        cache = self.cache
        b, t, two_d = kv.shape
        kv = kv.view(b, t, 2, self.n_head, two_d // (2 * self.n_head)).permute(2, 0, 3, 1, 4)
        if cache.quantized_cross:
            k, ks = quantize_kv_int8(kv[0])
            v, vs = quantize_kv_int8(kv[1])
            cache.cross_k[layer, index, :, :t], cache.cross_k_scale[layer, index, :, :t] = k, ks
            cache.cross_v[layer, index, :, :t], cache.cross_v_scale[layer, index, :, :t] = v, vs
        else:
            cache.cross_k[layer, index, :, :t] = kv[0]
            cache.cross_v[layer, index, :, :t] = kv[1]

    # ---- decoding -----------------------------------------------------------------------------
    def decode(self, tokens: Tensor, positions: Tensor, start: int, kv_len: int,
               uniform_position: bool = False, cross_runs: CrossRuns | None = None) -> Tensor:
        """decode_rows for tokens and positions on any device (host tensors are copied over)."""
        return self.decode_rows(to_device(tokens, self.device), to_device(positions, self.device), start, kv_len,
                                uniform_position, cross_runs)

    @torch.inference_mode()
    def decode_rows(self, tokens: Tensor, positions: Tensor, start: int, kv_len: int,
                    uniform_position: bool = False, cross_runs: CrossRuns | None = None) -> Tensor:
        """Run rows [start, start + B) forward.

        tokens [B, T] are fed at positions positions[b] + t; self-attention K/V are written into the
        cache there and attention reads cache positions [0, kv_len). Returns logits [B, T, V].
        `uniform_position` (every row at the same position, T == 1) drops the mask.
        `cross_runs` (see CrossRuns) says which rows share one window's cross-attention K/V
        (beams or samples), read once from the window's first row; None: every row its own.
        """
        b, t = tokens.shape
        pos = self.token_positions(positions, t)
        mask = None
        if not (uniform_position and t == 1):
            keys = torch.arange(kv_len, device=tokens.device)
            mask = (keys[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, T, kv_len]
        decoder = self.model.decoder
        attention = CachedRows(self, start, start + b, pos, kv_len, mask, cross_runs)
        return self.logits(decoder(decoder.embed(tokens, pos), attention, self.ops))

    @staticmethod
    def token_positions(positions: Tensor, t: int) -> Tensor:
        """[B, T] positions of T tokens per row fed from positions [B] on; one token per row (a
        decode step) needs no kernel for it."""
        return positions[:, None] if t == 1 else positions[:, None] + torch.arange(t, device=positions.device)[None, :]

    def cross_attention(self, layer: int, cq: Tensor, start: int, runs: CrossRuns | None) -> Tensor:
        """Cross-attention of queries cq [B, H, T, dh] for rows [start, start + B).

        Without runs every row reads its own K/V (its own audio positions where the cache records
        them). With runs, each window's g query rows attend together to the K/V in the window's
        first row (g times fewer cache bytes, and the other rows need no copy of them); rows outside
        every run (holes in the batch) get zeros.
        """
        b, h, t, dh = cq.shape
        cache = self.cache
        if runs is None and cache.cross_len is not None:
            rows = slice(start, start + b)
            scales = (cache.cross_k_scale[layer, rows], cache.cross_v_scale[layer, rows]) \
                if cache.quantized_cross else (None, None)
            return attend_cached(cq, cache.cross_k[layer, rows], cache.cross_v[layer, rows], k_scale=scales[0],
                                 v_scale=scales[1], lengths=cache.cross_len[rows])
        if runs is None:
            return self.ops.attention(cq, *cache.cross_kv(layer, start, start + b))
        out: Tensor | None = None
        for offset, n, g, n_audio in runs:
            k, v = cache.cross_kv(layer, start + offset, start + offset + n, g, n_audio)
            q = cq[offset : offset + n]
            if g > 1:
                q = q.view(n // g, g, h, t, dh).transpose(1, 2).reshape(n // g, h, g * t, dh)
            a = self.ops.attention(q, k, v)
            if g > 1:
                a = a.view(n // g, h, g, t, dh).transpose(1, 2).reshape(n, h, t, dh)
            if n == b:  # one run over every row: the common case needs no copy
                return a
            if out is None:
                out = cq.new_zeros(b, h, t, dh)
            out[offset : offset + n] = a
        assert out is not None, "cross_runs must not be empty"
        return out

    def logits(self, x: Tensor) -> Tensor:
        """Output projection tied to the token embedding, in float32."""
        return self.ops.logits(x, self.model.decoder.token_embedding)

    def greedy_chunk(self, tokens: Tensor, positions: Tensor, done: Tensor, suppress: tuple[int, ...],
                     remaining: list[int]) -> tuple[Tensor, Tensor, Tensor] | None:
        return None

    def copy_rows(self, src: list[int], dst: list[int], self_len: int, cross: bool = True) -> None:
        with torch.inference_mode():
            self.cache.copy_rows(src, dst, self_len, cross)

    # ---- word alignment -------------------------------------------------------------------------
    @torch.inference_mode()
    def cross_attention_weights(self, tokens: Tensor, audio_features: Tensor,
                                heads: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """Full (uncached) decoder pass returning the cross-attention weights of `heads` and logits.

        tokens [1, T], audio_features [1, n_audio_ctx', d] ->
        (weights [len(heads), T, n_audio_ctx'] float32, logits [T, V] float32).
        Used once per segment for word timestamps, so clarity wins over speed here.
        """
        return self.whole_sequence_pass(tokens, audio_features, heads, self.ops)

    def whole_sequence_pass(self, tokens: Tensor, audio_features: Tensor, heads: list[tuple[int, int]],
                            ops: Ops) -> tuple[Tensor, Tensor]:
        decoder = self.model.decoder
        t = tokens.shape[1]
        attention = WholeSequenceAttention(decoder, audio_features, ops, heads)
        x = decoder.embed(tokens, torch.arange(t, device=tokens.device)[None])
        logits = self.logits(decoder(x, attention, ops))[0]
        return torch.stack([attention.weights[h] for h in heads]), logits
