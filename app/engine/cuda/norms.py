"""Residual add + LayerNorm in one GPU kernel: (x + y, LayerNorm(x + y)).

Every sub-layer ends with a residual add whose result the next sub-layer normalises. In a decode
step these are tiny tensors (rows x d_model) and each op is one short kernel, so at small batches
a step costs kernel count more than bytes: fusing the pair removes three kernels per decoder layer
(96 per step for large-v3). In the encoder the tensors are large (64 windows x 1,500 positions) and
the fused kernel saves a pass over them instead. The sum is rounded to the activation dtype before it
is normalised, exactly as the two separate torch ops do; the statistics are in float32 like
torch's LayerNorm, so only the order of the reduction differs. The same kernel, without the add,
normalises the encoder's input into fp8 rows (layer_norm_fp8).

These are the kernels alone: a runner that takes them decided so when it loaded (CUDA, fp16/bf16,
Triton); the torch forms are app.engine.model.Ops.add_layer_norm and app.engine.cuda.fp8.Fp8Reference.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from app.engine.cuda.common import HAVE_TRITON, launch_args
from app.engine.cuda.fp8 import FP8, Fp8Rows

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from app.engine.cuda.common import enter_after_previous
    from app.engine.cuda.fp8 import store_fp8_rows

    @triton.jit
    def _add_layer_norm(x_ptr, y_ptr, w_ptr, b_ptr, sum_ptr, out_ptr, scale_ptr, n_rows, d, eps, BLOCK: tl.constexpr,
                        ROWS: tl.constexpr, ADD: tl.constexpr, FP8_OUT: tl.constexpr, PDL: tl.constexpr):
        # ROWS rows per program as one 2-D tile; without ADD, LayerNorm(x) alone (y and the sum unused)
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        col_ok = cols < d
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        enter_after_previous(PDL)
        offsets = rows[:, None] * d + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        total = x
        if ADD:
            y = tl.load(y_ptr + offsets, mask=mask, other=0.0)
            total = (x.to(tl.float32) + y.to(tl.float32)).to(x.dtype)  # the residual stream, rounded
            tl.store(sum_ptr + offsets, total, mask=mask)
        s = total.to(tl.float32)
        mean = tl.sum(s, axis=1) / d
        centred = tl.where(mask, s - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / d + eps)
        normed = tl.where(mask, centred * rstd[:, None] * w[None, :] + b[None, :], 0.0)
        if FP8_OUT:  # e4m3 with one scale per row (app.engine.cuda.fp8's quantize_fp8)
            store_fp8_rows(out_ptr, scale_ptr, rows, row_ok, offsets, normed, mask)
        else:
            tl.store(out_ptr + offsets, normed.to(x.dtype), mask=mask)


#: Rows from which a program takes two rows with two warps (the encoder's 64 windows x 1,500
#: positions): 216-217 against 248-277 us a layer for large-v3 with fp8 rows on an H200 (d = 384:
#: 64 against 117) than the one-row 4-8-warp programs that short inputs (decode steps, prompts) keep.
MANY_ROWS = 4096


def add_layer_norm(x: Tensor, y: Tensor, norm: nn.LayerNorm, *, pdl: bool = False) -> tuple[Tensor, Tensor]:
    """(x + y, norm(x + y)) for x, y [..., d] of one shape, fp16/bf16 on the GPU, in one kernel."""
    total, out, _ = _launch(x, y, norm, fp8=False, pdl=pdl)
    return total, out


def add_layer_norm_fp8(x: Tensor, y: Tensor, norm: nn.LayerNorm, *, pdl: bool = False) -> tuple[Tensor, Fp8Rows]:
    """(x + y, norm(x + y) in e4m3 with one scale per row): the normalised rows ready for an fp8
    GEMM (app.engine.cuda.fp8), in the same kernel."""
    total, values, scale = _launch(x, y, norm, fp8=True, pdl=pdl)
    assert scale is not None
    return total, Fp8Rows(values.view(-1, x.shape[-1]), scale)


def layer_norm_fp8(x: Tensor, norm: nn.LayerNorm, *, pdl: bool = False) -> Fp8Rows:
    """norm(x) in e4m3 with one scale per row, in one kernel (x fp16/bf16 on the GPU)."""
    _, values, scale = _launch(x, None, norm, fp8=True, pdl=pdl)
    assert scale is not None
    return Fp8Rows(values.view(-1, x.shape[-1]), scale)


def _launch(x: Tensor, y: Tensor | None, norm: nn.LayerNorm, *, fp8: bool,
            pdl: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    d = x.shape[-1]
    rows = x.numel() // d
    x = x.contiguous()
    y = y.contiguous() if y is not None else None
    total = torch.empty_like(x) if y is not None else x
    out = torch.empty_like(x, dtype=FP8) if fp8 else torch.empty_like(x)
    scale = torch.empty(rows, 1, device=x.device, dtype=torch.float32) if fp8 else None
    per_program, warps = (2, 2) if rows >= MANY_ROWS else (1, 4 if d <= 1024 else 8)
    _add_layer_norm[(triton.cdiv(rows, per_program),)](
        x_ptr=x, y_ptr=y, w_ptr=norm.weight, b_ptr=norm.bias, sum_ptr=total if y is not None else None, out_ptr=out,
        scale_ptr=scale, n_rows=rows, d=d, eps=norm.eps, BLOCK=triton.next_power_of_2(d), ROWS=per_program,
        ADD=y is not None, FP8_OUT=fp8, num_warps=warps, **launch_args(pdl))
    return total, out, scale
