"""Triton flash-decoding kernel: attention of one query token per row over cached K/V.

Decoding is bound by reading caches: cross-attention K/V (large-v3: 246 MB per window in fp16)
and the self-attention cache. This kernel
- splits the keys of each (row, head) over several programs when the batch is small, so a
  single window still spreads over the whole GPU (a plain kernel would use one SM per head);
- reads int8 K/V with one scale per (head, position) directly, never widening them in memory,
  which halves the dominant bytes (int8 cross-K/V);
- takes a per-row key count, so self-attention reads only the filled part of each row's cache
  and needs no mask tensor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit
    def _decode_attention_partial(
        q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, len_ptr, m_ptr, l_ptr, acc_ptr,
        stride_qb, stride_qh,
        stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt,
        stride_sb, stride_sh,
        n_keys, keys_per_split, n_splits, sm_scale,
        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_LEN: tl.constexpr,
    ):
        # The single query is padded to a 16-row tile so both products run on tensor cores
        # (tl.dot); rows 1..15 are zeros and are never stored. Compute is nearly free here:
        # what matters is streaming K/V at full bandwidth.
        QROWS: tl.constexpr = 16
        b = tl.program_id(0)
        h = tl.program_id(1)
        split = tl.program_id(2)
        n_heads = tl.num_programs(1)
        limit = n_keys
        if HAS_LEN:
            limit = tl.minimum(tl.load(len_ptr + b).to(tl.int32), n_keys)
        begin = split * keys_per_split
        end = tl.minimum(begin + keys_per_split, limit)
        d = tl.arange(0, HEAD_DIM)
        r = tl.arange(0, QROWS)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + r[:, None] * 0 + d[None, :], mask=r[:, None] == 0, other=0.0)
        q = (q.to(tl.float32) * sm_scale).to(tl.float16)
        m_i = tl.full([QROWS], -float("inf"), dtype=tl.float32)
        l_i = tl.zeros([QROWS], dtype=tl.float32)
        acc = tl.zeros([QROWS, HEAD_DIM], dtype=tl.float32)
        for start in range(begin, end, BLOCK):
            t = start + tl.arange(0, BLOCK)
            valid = t < end
            k = tl.load(k_ptr + b * stride_kb + h * stride_kh + t[:, None] * stride_kt + d[None, :],
                        mask=valid[:, None], other=0).to(tl.float16)
            s = tl.dot(q, tl.trans(k))  # [QROWS, BLOCK] fp32
            if HAS_SCALE:
                ks = tl.load(ks_ptr + b * stride_sb + h * stride_sh + t, mask=valid, other=0.0).to(tl.float32)
                s = s * ks[None, :]
            s = tl.where(valid[None, :], s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if HAS_SCALE:
                vs = tl.load(vs_ptr + b * stride_sb + h * stride_sh + t, mask=valid, other=0.0).to(tl.float32)
                p = p * vs[None, :]
            v = tl.load(v_ptr + b * stride_vb + h * stride_vh + t[:, None] * stride_vt + d[None, :],
                        mask=valid[:, None], other=0).to(tl.float16)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
            m_i = m_new
        row = (b * n_heads + h) * n_splits + split
        first = r == 0
        tl.store(m_ptr + row + r * 0, m_i, mask=first)
        tl.store(l_ptr + row + r * 0, l_i, mask=first)
        tl.store(acc_ptr + row * HEAD_DIM + r[:, None] * 0 + d[None, :], acc, mask=first[:, None])

    @triton.jit
    def _decode_attention_combine(m_ptr, l_ptr, acc_ptr, o_ptr, stride_ob, stride_oh, n_splits,
                                  HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        n_heads = tl.num_programs(1)
        s = tl.arange(0, SPLITS)
        valid = s < n_splits
        base = (b * n_heads + h) * n_splits
        m = tl.load(m_ptr + base + s, mask=valid, other=-float("inf"))
        l_ = tl.load(l_ptr + base + s, mask=valid, other=0.0)
        m_max = tl.max(m, axis=0)
        w = tl.where(valid & (m > -float("inf")), tl.exp(m - m_max), 0.0)
        d = tl.arange(0, HEAD_DIM)
        acc = tl.load(acc_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :], mask=valid[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_ * w, axis=0)
        tl.store(o_ptr + b * stride_ob + h * stride_oh + d, out.to(o_ptr.dtype.element_ty))


def _splits(batch: int, heads: int, n_keys: int, block: int, sm_count: int) -> int:
    """Enough programs to fill the GPU twice over, never splits shorter than one block."""
    wanted = max(1, math.ceil(2 * sm_count / (batch * heads)))
    return max(1, min(wanted, math.ceil(n_keys / block), 32))


_SM_COUNT: dict[int, int] = {}


def decode_attention(q: Tensor, k: Tensor, v: Tensor, *, k_scale: Tensor | None = None,
                     v_scale: Tensor | None = None, lengths: Tensor | None = None) -> Tensor:
    """q [B, H, 1, dh]; k, v [B, H, T, dh] (fp16/bf16/fp32, or int8 with scales [B, H, T, 1]);
    lengths [B]: keys per row (None: all T). Returns [B, H, 1, dh] in q's dtype."""
    b, h, tq, dh = q.shape
    n_keys = k.shape[2]
    if not (HAVE_TRITON and q.is_cuda and tq == 1 and dh & (dh - 1) == 0 and k.stride(3) == 1):
        return _reference(q, k, v, k_scale, v_scale, lengths)
    device = q.device.index or 0
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    if k_scale is None and lengths is None and b * h >= 4 * _SM_COUNT[device] and q.dtype != torch.float32:
        # plenty of (row, head) pairs to fill the GPU: the flash kernel needs no split
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    block = 128 if n_keys >= 1024 else 64
    splits = _splits(b, h, n_keys, block, _SM_COUNT[device])
    keys_per_split = math.ceil(math.ceil(n_keys / splits) / block) * block
    splits = math.ceil(n_keys / keys_per_split)
    m = torch.empty(b * h * splits, device=q.device, dtype=torch.float32)
    l_ = torch.empty_like(m)
    acc = torch.empty(b * h * splits, dh, device=q.device, dtype=torch.float32)
    has_scale = k_scale is not None
    ks = k_scale if has_scale else q
    vs = v_scale if has_scale else q
    _decode_attention_partial[(b, h, splits)](
        q, k, v, ks, vs, lengths if lengths is not None else q, m, l_, acc,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        ks.stride(0) if has_scale else 0, ks.stride(1) if has_scale else 0,
        n_keys, keys_per_split, splits, 1.0 / math.sqrt(dh),
        HEAD_DIM=dh, BLOCK=block, HAS_SCALE=has_scale, HAS_LEN=lengths is not None, num_warps=4,
        num_stages=3,
    )
    out = torch.empty(b, h, 1, dh, device=q.device, dtype=q.dtype)
    _decode_attention_combine[(b, h)](m, l_, acc, out, out.stride(0), out.stride(1), splits,
                                      HEAD_DIM=dh, SPLITS=triton.next_power_of_2(splits))
    return out


def _reference(q: Tensor, k: Tensor, v: Tensor, k_scale: Tensor | None, v_scale: Tensor | None,
               lengths: Tensor | None) -> Tensor:
    if k_scale is not None and v_scale is not None:
        k = k.to(q.dtype) * k_scale.to(q.dtype)
        v = v.to(q.dtype) * v_scale.to(q.dtype)
    mask = None
    if lengths is not None:
        keys = torch.arange(k.shape[2], device=q.device)
        mask = (keys[None, :] < lengths[:, None])[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def int8_cross_attention(q: Tensor, k: Tensor, k_scale: Tensor, v: Tensor, v_scale: Tensor) -> Tensor:
    return decode_attention(q, k, v, k_scale=k_scale, v_scale=v_scale)
