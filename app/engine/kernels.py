"""Triton kernel for decode-time cross-attention over int8 K/V.

At high batch the decoder of a large model is bound by reading every window's cross-attention
K/V each step (large-v3: 246 MB per window in fp16). Keeping them in int8 with one scale per
(head, audio position) halves those bytes, but only if they are never widened in memory: this
kernel reads int8 K/V and scales directly and keeps the softmax in registers (online softmax).
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
    def _int8_cross_attention_kernel(
        q_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, o_ptr,
        stride_qb, stride_qh,
        stride_kb, stride_kh, stride_kt,
        stride_sb, stride_sh,
        stride_ob, stride_oh,
        n_ctx, sm_scale,
        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d).to(tl.float32) * sm_scale
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_kb + h * stride_kh
        ks_base = ks_ptr + b * stride_sb + h * stride_sh
        vs_base = vs_ptr + b * stride_sb + h * stride_sh
        m_i = -float("inf")
        l_i = 0.0
        acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
        for start in range(0, n_ctx, BLOCK):
            t = start + tl.arange(0, BLOCK)
            valid = t < n_ctx
            k = tl.load(k_base + t[:, None] * stride_kt + d[None, :], mask=valid[:, None], other=0).to(tl.float32)
            ks = tl.load(ks_base + t, mask=valid, other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1) * ks
            s = tl.where(valid, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            p = tl.exp(s - m_new)
            alpha = tl.exp(m_i - m_new)
            v = tl.load(v_base + t[:, None] * stride_kt + d[None, :], mask=valid[:, None], other=0).to(tl.float32)
            vs = tl.load(vs_base + t, mask=valid, other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum((p * vs)[:, None] * v, axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        out = acc / l_i
        tl.store(o_ptr + b * stride_ob + h * stride_oh + d, out.to(o_ptr.dtype.element_ty))


def int8_cross_attention(q: Tensor, k: Tensor, k_scale: Tensor, v: Tensor, v_scale: Tensor) -> Tensor:
    """q [B, H, 1, dh] (fp16/bf16/fp32); k, v [B, H, T, dh] int8; scales [B, H, T, 1]. -> [B, H, 1, dh]."""
    b, h, tq, dh = q.shape
    if not (HAVE_TRITON and q.is_cuda and tq == 1 and dh & (dh - 1) == 0):
        kf = k.to(q.dtype) * k_scale.to(q.dtype)
        vf = v.to(q.dtype) * v_scale.to(q.dtype)
        return torch.nn.functional.scaled_dot_product_attention(q, kf, vf)
    n_ctx = k.shape[2]
    out = torch.empty(b, h, 1, dh, device=q.device, dtype=q.dtype)
    assert k.stride(3) == 1 and v.stride() == k.stride() and k_scale.stride() == v_scale.stride()
    _int8_cross_attention_kernel[(b, h)](
        q, k, k_scale, v, v_scale, out,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        k_scale.stride(0), k_scale.stride(1),
        out.stride(0), out.stride(1),
        n_ctx, 1.0 / math.sqrt(dh),
        HEAD_DIM=dh, BLOCK=64, num_warps=4,
    )
    return out
