"""Append one decode step's self-attention K and V to the row caches in one GPU kernel.

torch needs a scatter per tensor (two short kernels per decoder layer and step); this kernel reads
K and V straight out of the fused QKV projection's output and writes both at each row's position.
"""

from __future__ import annotations

from torch import Tensor

from app.engine.kernels import HAVE_TRITON
from app.engine.pdl import launch_options

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from app.engine.pdl import enter_after_previous

    @triton.jit
    def _append_kv(qkv_ptr, k_ptr, v_ptr, pos_ptr, stride_row, d_model,
                   stride_cb, stride_ch, stride_ct, HEAD_DIM: tl.constexpr, PDL: tl.constexpr):
        enter_after_previous(PDL)
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs = tl.arange(0, HEAD_DIM)
        src = qkv_ptr + b.to(tl.int64) * stride_row + h * HEAD_DIM + offs
        dst = b.to(tl.int64) * stride_cb + h * stride_ch + tl.load(pos_ptr + b).to(tl.int64) * stride_ct + offs
        tl.store(k_ptr + dst, tl.load(src + d_model))
        tl.store(v_ptr + dst, tl.load(src + 2 * d_model))


def can_append(qkv: Tensor, k_cache: Tensor) -> bool:
    """One query token per row, the QKV output rows contiguous, caches [B, H, T, dh] with dh a power of 2."""
    dh = k_cache.shape[-1]
    return (HAVE_TRITON and qkv.is_cuda and qkv.dim() == 3 and qkv.shape[1] == 1 and qkv.stride(2) == 1
            and k_cache.stride(3) == 1 and dh & (dh - 1) == 0 and qkv.dtype == k_cache.dtype)


def append_kv(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor) -> None:
    """qkv [B, 1, 3d] (Q, K, V, heads inside each); caches [B, H, T, dh] (same strides);
    positions [B]: write row b's K/V at time positions[b]."""
    b, heads, _, dh = k_cache.shape
    _append_kv[(b, heads)](qkv, k_cache, v_cache, positions, qkv.stride(0), heads * dh,
                           k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), HEAD_DIM=dh,
                           **launch_options(qkv.device))
