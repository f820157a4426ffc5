"""The decoder's preallocated per-row caches, and how torch reads them.

The decoder never recomputes anything: cross-attention K/V are written once per window into a
preallocated *row* of the cache, self-attention K/V are appended at each row's position, and one
decode call serves many rows at different positions (in-flight batching).
"""

from __future__ import annotations

import functools
import math
import mmap

import torch
import torch.nn.functional as F
from torch import Tensor

from app.engine.config import ModelDims
from app.engine.host_copy import device_tensor

# (row offset in the batch, rows, g, audio positions): rows [offset, offset + rows) form windows
# of g rows each (beams or samples of one window) whose cross-attention K/V live in each window's
# first row and cover the first `audio positions` encoder outputs (1500 for a full 30 s window;
# fewer for a window encoded with a trimmed audio context).
CrossRuns = list[tuple[int, int, int, int]]


def lazily_zeroed(*shape: int, dtype: torch.dtype) -> Tensor:
    """A zero-filled CPU tensor whose pages the kernel maps only when first touched (like calloc)."""
    count = math.prod(shape)
    buffer = mmap.mmap(-1, max(1, count * torch.empty((), dtype=dtype).element_size()))
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(*shape)  # keeps buffer alive


class DecoderCache:
    """Preallocated per-row caches. Row r holds one decoding sequence (a window, or one beam of it).

    Layout [layer, row, head, time, head_dim] so attention reads them without transposes.
    """

    def __init__(self, dims: ModelDims, max_rows: int, device: torch.device, dtype: torch.dtype,
                 cross_dtype: torch.dtype | None = None, cross_lengths: bool = False) -> None:
        h, dh = dims.n_text_head, dims.n_text_state // dims.n_text_head
        layers = dims.n_text_layer
        self.max_rows = max_rows
        # On the CPU the caches come from anonymous memory maps: zero-filled, with pages mapped on
        # first touch, so memory follows the rows and positions in use (a CPU engine reads a
        # window's cross-K/V from its first row only; its beam rows' cross pages stay unmapped).
        # GPU memory is committed at allocation either way.
        alloc = lazily_zeroed if torch.device(device).type == "cpu" else functools.partial(torch.zeros, device=device)
        self.self_k = alloc(layers, max_rows, h, dims.n_text_ctx, dh, dtype=dtype)
        self.self_v = alloc(layers, max_rows, h, dims.n_text_ctx, dh, dtype=dtype)
        cross_dtype = cross_dtype or dtype
        self.cross_k = alloc(layers, max_rows, h, dims.n_audio_ctx, dh, dtype=cross_dtype)
        self.cross_v = alloc(layers, max_rows, h, dims.n_audio_ctx, dh, dtype=cross_dtype)
        # int8 cross-K/V keeps one scale per (layer, row, head, audio position)
        self.quantized_cross = cross_dtype == torch.int8
        if self.quantized_cross:
            self.cross_k_scale = torch.ones(layers, max_rows, h, dims.n_audio_ctx, 1, device=device, dtype=dtype)
            self.cross_v_scale = torch.ones_like(self.cross_k_scale)
        # Encoder positions each row's cross-K/V hold (n_audio_ctx for a 30 s window, fewer for a
        # trimmed audio context): the GPU's cross-attention reads only those, so windows of any
        # length share the rows and the CUDA graphs (which read this buffer when replayed).
        self.cross_len: Tensor | None = None
        if cross_lengths:
            self.cross_len = torch.full((max_rows,), dims.n_audio_ctx, dtype=torch.int32, device=device)

    def tensors(self) -> list[Tensor]:
        out = [self.self_k, self.self_v, self.cross_k, self.cross_v]
        if self.quantized_cross:
            out += [self.cross_k_scale, self.cross_v_scale]
        return out

    def cross_kv(self, layer: int, start: int, end: int, step: int = 1,
                 n_audio: int | None = None) -> tuple[Tensor, Tensor]:
        """Layer `layer`'s cross-attention K/V of rows [start, end) (every `step`-th), first
        `n_audio` positions (None: all); int8 ones dequantised."""
        rows, positions = slice(start, end, step), slice(0, n_audio)
        if self.quantized_cross:
            # Dequantize on read; the int8 read is what halves the dominant memory traffic on GPU.
            k = self.cross_k[layer, rows, :, positions].to(self.cross_k_scale.dtype) * \
                self.cross_k_scale[layer, rows, :, positions]
            v = self.cross_v[layer, rows, :, positions].to(self.cross_v_scale.dtype) * \
                self.cross_v_scale[layer, rows, :, positions]
            return k, v
        return self.cross_k[layer, rows, :, positions], self.cross_v[layer, rows, :, positions]

    def copy_rows(self, src: list[int], dst: list[int], self_len: int, cross: bool = True) -> None:
        """Copy rows src -> dst (compaction and beam reordering); gathers first, so overlaps are safe."""
        if not src:
            return
        device = self.self_k.device
        s = device_tensor(src, device)
        d = device_tensor(dst, device)
        for cache in (self.self_k, self.self_v):
            cache[:, d, :, :self_len] = cache[:, s, :, :self_len]
        if cross:
            for cache in self.tensors()[2:]:
                cache[:, d] = cache[:, s]
            if self.cross_len is not None:
                self.cross_len[d] = self.cross_len[s]


def quantize_kv_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """K or V vectors in the int8 cache's format: symmetric int8 per vector along the last dim;
    returns (int8 values, scale in x's dtype).

    Values are multiplied by the float32 reciprocal of the stored (rounded) scale and rounded half
    to even, so dequantizing with that scale is as exact as int8 allows; the GPU's cross-K/V write
    (app.engine.cuda.kv_cache.write_cross_kv) computes the same, bit for bit."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127.0).to(x.dtype)
    values = torch.round(x.float() * (1.0 / scale.float())).clamp_(-127, 127).to(torch.int8)
    return values, scale


def attend_cached(q: Tensor, k: Tensor, v: Tensor, *, k_scale: Tensor | None = None,
                  v_scale: Tensor | None = None, lengths: Tensor | None = None) -> Tensor:
    """Attention of q [B, H, TQ, dh] over cached k, v [B, H, T, dh] (int8 with their scales
    [B, H, T, 1]), every query of row b reading its first lengths[b] keys (None: all): the torch
    reference of app.engine.cuda.attention.decode_attention, on any device."""
    if k_scale is not None and v_scale is not None:
        k = k.to(q.dtype) * k_scale.to(q.dtype)
        v = v.to(q.dtype) * v_scale.to(q.dtype)
    mask = None
    if lengths is not None:
        keys = torch.arange(k.shape[2], device=q.device)
        mask = (keys[None, :] < lengths[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
