"""fp8 (e4m3) GEMMs for the audio side of the model: the encoder's layers and the cross-attention K/V.

Why: at 64 windows the large-v3 encoder takes about a third of a 100-token batch on an H200, and
its four GEMMs per layer run at ~710 TFLOP/s in fp16, close to what cuBLAS reaches. cuBLAS's fp8
GEMM (torch._scaled_mm) runs the same shapes at 1,000-1,300 TFLOP/s on an H100.

How: activations are quantised per row (one scale per audio position), weights per output
channel, both symmetric onto e4m3's +-448; the GEMM applies both scales and the bias in its
epilogue and writes the activation dtype. Each quantisation is one pass over the activation,
done where a kernel already holds the whole row: the residual add + LayerNorm
(app.engine.cuda.norms) writes its normalised row in fp8, and the MLP's GELU is computed by the
kernel that quantises its input. That GELU is the tanh form (one hardware tanh per value): it is
within 3e-4 of the exact (erf) GELU, far below e4m3's rounding (~6 % of a value), and it let
the quantising pass run at memory speed (large-v3, 64 windows, H200: 346 against 514 us a layer).

Accuracy: e4m3 keeps 3 mantissa bits, so each GEMM's output moves by ~4 % (relative L2 on
random data) and some transcripts change: an option (WHISPER_FP8_ENCODER), off by default; its
dev-set WER is in docs/performance.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.engine.cuda.common import HAVE_TRITON

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
#: smallest row scale: an all-zero row quantises to zeros instead of dividing by zero
MIN_SCALE = 1e-12
#: cuBLAS's fast fp8 accumulation (Hopper): 10-20 % faster on the encoder's shapes
FAST_ACCUM = True

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from app.engine.cuda.common import gelu_tanh

    _FP8_MAX = tl.constexpr(FP8_MAX)
    _MIN_SCALE = tl.constexpr(MIN_SCALE)

    @triton.jit
    def row_scale(absmax):
        """A row's scale from its largest magnitude, as quantize_fp8_reference computes it."""
        return tl.maximum(absmax / _FP8_MAX, _MIN_SCALE)

    @triton.jit
    def store_fp8_rows(q_ptr, scale_ptr, rows, row_ok, offsets, x, mask):
        """Rows x [R, C] (float32, zeros where masked) as e4m3 values at q_ptr + offsets and their
        scales at scale_ptr + rows (where row_ok)."""
        scale = row_scale(tl.max(tl.abs(x), axis=1))
        tl.store(scale_ptr + rows, scale, mask=row_ok)
        tl.store(q_ptr + offsets, (x * (1.0 / scale)[:, None]).to(q_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _quantize_fp8(x_ptr, q_ptr, scale_ptr, k, GELU: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr):
        """One program per row: optional GELU (tanh form), then e4m3 values and the row's fp32 scale.
        The row is a power-of-two HEAD (<= k) plus a masked TAIL, so that widths like 5,120 are
        4,096 + 1,024 instead of 8,192 lanes of which 3,072 would compute nothing."""
        row = tl.program_id(0).to(tl.int64)
        head_cols = tl.arange(0, HEAD)
        tail_cols = HEAD + tl.arange(0, TAIL)
        tail_mask = tail_cols < k
        head = tl.load(x_ptr + row * k + head_cols).to(tl.float32)
        tail = tl.load(x_ptr + row * k + tail_cols, mask=tail_mask, other=0.0).to(tl.float32)
        if GELU:  # gelu(0) = 0: masked lanes stay out of the row's maximum
            head = gelu_tanh(head)
            tail = gelu_tanh(tail)
        scale = row_scale(tl.maximum(tl.max(tl.abs(head), axis=0), tl.max(tl.abs(tail), axis=0)))
        tl.store(scale_ptr + row, scale)
        inverse = 1.0 / scale
        tl.store(q_ptr + row * k + head_cols, (head * inverse).to(q_ptr.dtype.element_ty))
        tl.store(q_ptr + row * k + tail_cols, (tail * inverse).to(q_ptr.dtype.element_ty), mask=tail_mask)


def fp8_supported(device: torch.device) -> bool:
    """fp8 tensor cores (compute capability 8.9+: Ada, Hopper and later), Triton and _scaled_mm."""
    if device.type != "cuda" or not HAVE_TRITON or not hasattr(torch, "_scaled_mm"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (8, 9)


class Fp8Rows(NamedTuple):
    """A 2-D activation in e4m3 with one float32 scale per row: x ~= values * scale."""

    values: Tensor  # [M, k] float8_e4m3fn
    scale: Tensor  # [M, 1] float32


def quantize_fp8_reference(x: Tensor, gelu: bool = False) -> Fp8Rows:
    """torch version of quantize_fp8 (any device): rows of x [..., k] -> Fp8Rows [M, k], after
    GELU's tanh form if asked (the kernel's)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    if gelu:
        rows = F.gelu(rows, approximate="tanh")
    scale = (rows.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)
    return Fp8Rows((rows / scale).to(FP8), scale)


def quantize_fp8(x: Tensor, gelu: bool = False) -> Fp8Rows:
    """Rows of x [..., k] (on the GPU) in e4m3 with one scale per row, after GELU's tanh form if
    asked: one kernel."""
    k = x.shape[-1]
    x = x.reshape(-1, k).contiguous()
    values = torch.empty(x.shape, device=x.device, dtype=FP8)
    scale = torch.empty(x.shape[0], 1, device=x.device, dtype=torch.float32)
    head = 1 << (k.bit_length() - 1)  # the largest power of two <= k
    tail = max(16, triton.next_power_of_2(k - head))  # all masked when k is a power of two
    # four warps for every width: 346 against 358 us with eight for the GELU rows of 5,120 (H200)
    _quantize_fp8[(x.shape[0],)](x_ptr=x, q_ptr=values, scale_ptr=scale, k=k, GELU=gelu, HEAD=head, TAIL=tail,
                                 num_warps=4)
    return Fp8Rows(values, scale)


def dense_weight(linear: nn.Module) -> Tensor:
    """A linear layer's weight in float32: nn.Linear's as is, an int8 layer's dequantised.
    Detached: an autograd graph from a Parameter would keep every intermediate alive."""
    weight = linear.weight.detach()
    if weight.dtype == torch.int8:
        return weight.float() * linear.weight_scale.detach().float()[:, None]
    return weight.float()


@dataclass(frozen=True)
class Fp8Linear:
    """A linear layer's weight in e4m3, one scale per output channel, laid out for _scaled_mm."""

    weight_t: Tensor  # [k, n] float8_e4m3fn, column-major (the transpose of a row-major [n, k])
    scale: Tensor  # [1, n] float32
    bias: Tensor | None  # [n], the activation dtype

    @classmethod
    def from_linear(cls, linear: nn.Module, dtype: torch.dtype) -> Fp8Linear:
        q = quantize_fp8_reference(dense_weight(linear))
        bias = linear.bias.detach().to(dtype) if linear.bias is not None else None
        return cls(q.values.t(), q.scale.t().contiguous(), bias)


def fp8_linear(x: Fp8Rows, weight: Fp8Linear, out_dtype: torch.dtype) -> Tensor:
    """x @ W.T + bias on the GPU with both scales applied in cuBLAS's fp8 GEMM: [M, k] -> [M, n] in
    out_dtype."""
    return torch._scaled_mm(x.values, weight.weight_t, x.scale, weight.scale, bias=weight.bias,
                            out_dtype=out_dtype, use_fast_accum=FAST_ACCUM)
