"""The decoder caches' writes on the GPU: a window's cross-attention K/V into its rows, and one
decode step's self-attention K and V at each row's position, each in one kernel.

Cross-attention K/V: torch's copy of the permuted GEMM output took 22 ms for large-v3 at 64
windows on an H200, about three times the time to move its bytes; the kernel reads the GEMM output
once and writes it head-major into the rows, as it is or as int8 values and one fp16 scale per
vector (the int8 cache).

Self-attention K/V: torch needs a scatter per tensor (two short kernels per decoder layer and
step); the append kernel reads K and V straight out of the fused QKV projection's output and
writes both at each row's position.
"""

from __future__ import annotations

from torch import Tensor

from app.engine.cuda.common import HAVE_TRITON, launch_args

if HAVE_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import libdevice

    from app.engine.cuda.common import enter_after_previous

    @triton.jit
    def _write_kv(src_ptr, rows_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr,
                  stride_sb, stride_st, stride_cr, stride_ch, stride_ct, stride_sr, stride_sh,
                  n_t, D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, QUANTIZE: tl.constexpr):
        # One program: BLOCK_T audio positions of one head of one window, K and V. Reads the
        # cross-KV GEMM output once and writes it head-major into the cache row, as it is or as
        # int8 values + one fp16 scale per vector.
        b = tl.program_id(0)
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        h = tl.program_id(2)
        d = tl.arange(0, HEAD_DIM)
        valid = t < n_t
        row = tl.load(rows_ptr + b).to(tl.int64)
        for which in tl.static_range(2):
            x = tl.load(src_ptr + b.to(tl.int64) * stride_sb + t[:, None] * stride_st + which * D + h * HEAD_DIM
                        + d[None, :], mask=valid[:, None], other=0.0)
            dst = row * stride_cr + h * stride_ch + t[:, None] * stride_ct + d[None, :]
            if QUANTIZE:
                x = x.to(tl.float32)
                scale = (tl.maximum(tl.max(tl.abs(x), axis=1), 1e-8) / 127.0).to(tl.float16)
                # one IEEE reciprocal per vector and a multiply per value, rounded half to even (rint),
                # as app.engine.cache.quantize_kv_int8: a division per value made this pass
                # compute-bound (large-v3, 64 windows, H200: 336 us a layer against 205)
                inverse = tl.math.div_rn(tl.full([BLOCK_T], 1.0, tl.float32), scale.to(tl.float32))
                r = libdevice.rint(x * inverse[:, None])
                x = tl.minimum(tl.maximum(r, -127.0), 127.0).to(tl.int8)
                sdst = row * stride_sr + h * stride_sh + t
                if which == 0:
                    tl.store(ks_ptr + sdst, scale, mask=valid)
                else:
                    tl.store(vs_ptr + sdst, scale, mask=valid)
            if which == 0:
                tl.store(k_ptr + dst, x, mask=valid[:, None])
            else:
                tl.store(v_ptr + dst, x, mask=valid[:, None])

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


def write_cross_kv(kv: Tensor, *, heads: int, rows: Tensor, k_cache: Tensor, v_cache: Tensor,
                   k_scale: Tensor | None = None, v_scale: Tensor | None = None) -> None:
    """kv [B, T, 2d] (K then V, heads inside each, fp16/bf16 on the GPU) -> caches k_cache,
    v_cache [R, H, T', dh] at rows `rows` (int64 [B] on kv's device), positions [0, T), in one
    pass. With scales [R, H, T', 1] (fp16 kv) the values are stored as int8 with one fp16 scale
    per vector, as app.engine.cache.quantize_kv_int8 computes."""
    b, t, two_d = kv.shape
    d = two_d // 2
    dh = d // heads
    if kv.stride(-1) != 1:
        kv = kv.contiguous()
    quantize = k_scale is not None
    block_t = 32  # 16-128 positions, 2-8 warps: none faster (H200 sweep, 2026-11-22)
    _write_kv[(b, triton.cdiv(t, block_t), heads)](
        src_ptr=kv, rows_ptr=rows, k_ptr=k_cache, v_ptr=v_cache, ks_ptr=k_scale, vs_ptr=v_scale,
        stride_sb=kv.stride(0), stride_st=kv.stride(1),
        stride_cr=k_cache.stride(0), stride_ch=k_cache.stride(1), stride_ct=k_cache.stride(2),
        stride_sr=k_scale.stride(0) if quantize else 0, stride_sh=k_scale.stride(1) if quantize else 0,
        n_t=t, D=d, HEAD_DIM=dh, BLOCK_T=block_t, QUANTIZE=quantize, num_warps=4,
    )


def append_kv(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor, *, pdl: bool = False) -> None:
    """qkv [B, 1, 3d] (Q, K, V, heads inside each; rows contiguous, qkv's dtype the caches');
    caches [B, H, T, dh] (same strides, dh a power of 2): write row b's K/V at time positions[b]."""
    b, heads, _, dh = k_cache.shape
    _append_kv[(b, heads)](
        qkv_ptr=qkv, k_ptr=k_cache, v_ptr=v_cache, pos_ptr=positions, stride_row=qkv.stride(0), d_model=heads * dh,
        stride_cb=k_cache.stride(0), stride_ch=k_cache.stride(1), stride_ct=k_cache.stride(2), HEAD_DIM=dh,
        **launch_args(pdl))
