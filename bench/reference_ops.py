"""What the GPU kernels replace, in torch ops: the references their checks and benchmarks compare
against (bench/gpu.py --smoke, bench/gpu_linear.py, the CUDA tests)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def reference_linear(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool = False) -> Tensor:
    """What the row GEMM (app.engine.cuda.row_gemm) replaces: torch's GEMM (+ exact GELU)."""
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


def reference_add_layer_norm(x: Tensor, y: Tensor, norm: nn.LayerNorm) -> tuple[Tensor, Tensor]:
    """The two torch ops the fused add + LayerNorm kernel (app.engine.cuda.norms) replaces."""
    total = x + y
    return total, F.layer_norm(total, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
