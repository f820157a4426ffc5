"""fp32 logits from half-precision weights on the GPU, in one Triton kernel.

The output projection needs float32 logits: rounding them to fp16 flips argmax and beam ranking
against the float32 reference. torch's mixed-output `mm` (fp16 inputs, fp32 output) runs an sm75
CUTLASS kernel on Hopper: 158 us a step for small at 64 rows on an H200, eight times the time to
read its 80 MB of weights. `logits_fp32` is a plain tile GEMM that streams them instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from app.engine.cuda.common import HAVE_TRITON, launch_args

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from app.engine.cuda.common import enter_after_previous, load_widened

    @triton.jit
    def dot_weight_rows(x_ptr, w_ptr, rows, cols, m, n, k, stride_xm, stride_wn, begin, end,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ROW_STATS: tl.constexpr = False):
        """(sum over k in [begin, end) of x[rows, k] w[cols, k] as float32 [BM, BN], and with
        ROW_STATS the sums of x[rows, k] and of its squares, float32 [BM] each, else zeros): the
        tile loop of this module's GEMM and app.engine.cuda.row_gemm's. int8 weights widen in registers
        by bit assembly (common.load_widened): the plain conversion runs at a quarter of the FMA
        rate."""
        rk = tl.arange(0, BK)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        row_sum = tl.zeros([BM], dtype=tl.float32)
        row_sum_sq = tl.zeros([BM], dtype=tl.float32)
        for k0 in range(begin, end, BK):
            kk = k0 + rk
            x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :],
                        mask=(rows[:, None] < m) & (kk[None, :] < k), other=0.0)
            if ROW_STATS:  # the input rows' LayerNorm statistics, from the tiles the product reads anyway
                xf = x.to(tl.float32)
                row_sum += tl.sum(xf, axis=1)
                row_sum_sq += tl.sum(xf * xf, axis=1)
            w = load_widened(w_ptr + cols[:, None].to(tl.int64) * stride_wn + kk[None, :],
                             (cols[:, None] < n) & (kk[None, :] < k), x.dtype, w_ptr.dtype.element_ty == tl.int8)
            acc = tl.dot(x, tl.trans(w), acc)
        return acc, row_sum, row_sum_sq

    @triton.jit
    def scale_columns(acc, s_ptr, cols, n):
        """acc * scale[cols]: int8 weights' per-row (output column) scale."""
        return acc * tl.load(s_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]

    @triton.jit
    def _logits(x_ptr, w_ptr, s_ptr, out_ptr, m, n_vocab, k, stride_xm, stride_wv, stride_om,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_SCALE: tl.constexpr,
                PDL: tl.constexpr):
        # out[m, v] = sum_k x[m, k] w[v, k], float32 accumulate and output; a program owns BN
        # vocabulary entries for BM rows, so the weights are read once per BM rows.
        rows = tl.program_id(1) * BM + tl.arange(0, BM)
        vocab = tl.program_id(0) * BN + tl.arange(0, BN)
        # no weight prefetch: a large vocabulary's embedding (133 MB for large-v3) would not fit in L2
        enter_after_previous(PDL)
        acc, _, _ = dot_weight_rows(x_ptr, w_ptr, rows, vocab, m, n_vocab, k, stride_xm, stride_wv, 0, k, BM, BN, BK)
        if HAS_SCALE:  # int8 embedding: one scale per token
            acc = scale_columns(acc, s_ptr, vocab, n_vocab)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + vocab[None, :], acc,
                 mask=(rows[:, None] < m) & (vocab[None, :] < n_vocab))


# Decode steps and short prompt prefills; the kernel was measured on those shapes only, so longer
# inputs keep torch's GEMM.
MAX_LOGITS_ROWS = 256


def as_rows(x: Tensor) -> Tensor:
    """x [..., k] as a [rows, k] matrix with contiguous rows."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def logits_fp32(x: Tensor, weight: Tensor, scale: Tensor | None = None, *, pdl: bool = False) -> Tensor:
    """x [..., d] @ (weight [V, d] * scale[:, None])^T in float32, for x fp16/bf16 on the GPU with at
    most MAX_LOGITS_ROWS rows; weight of x's dtype, or int8 with its per-token `scale`, rows
    contiguous."""
    flat = as_rows(x)
    m, k = flat.shape
    n_vocab = weight.shape[0]
    out = torch.empty(m, n_vocab, device=x.device, dtype=torch.float32)
    bm = min(64, max(16, triton.next_power_of_2(m)))
    bn = 128
    _logits[(triton.cdiv(n_vocab, bn), triton.cdiv(m, bm))](
        x_ptr=flat, w_ptr=weight, s_ptr=scale, out_ptr=out, m=m, n_vocab=n_vocab, k=k, stride_xm=flat.stride(0),
        stride_wv=weight.stride(0), stride_om=out.stride(0), BM=bm, BN=bn, BK=64, HAS_SCALE=scale is not None,
        num_warps=4, num_stages=4, **launch_args(pdl),
    )
    return out.reshape(*x.shape[:-1], n_vocab)
