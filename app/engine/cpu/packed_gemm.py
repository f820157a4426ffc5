"""The CPU model's GEMMs: oneDNN-packed float32 weights, and torch's int8-weight kernel.

torch's default CPU linear (MKL sgemm) is slow for the few-row, wide GEMMs of a decode step on
AMD CPUs: the tiny.en output projection (5 rows x 51,864 tokens) runs at ~10 GFLOP/s. oneDNN
with the weight reordered once into its blocked layout is 2-3x faster there (and is the GEMM
CTranslate2 uses on the same CPUs). Packing copies each weight once, at load time. The
encoder's large GEMMs run as fast as MKL's, but packing lets each MLP's GELU run inside its
first GEMM, saving a pass over the widest activations (~6 % of an encoder pass).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# The batch-size hint for oneDNN's weight layout; measured on a 2-core Zen 3, a hint of 32
# is as fast as an exact hint for 1-160 rows.
PACK_HINT_ROWS = 32


def onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack_weight(weight: Tensor) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().float().contiguous(), PACK_HINT_ROWS)


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None, gelu: bool = False) -> Tensor:
    """x @ W.T + bias with W packed by pack_weight; gelu=True applies exact (erf) GELU in the GEMM."""
    flat = x.reshape(-1, x.shape[-1])
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if gelu:
        out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "gelu", [], "none")
    else:
        out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], out.shape[-1])


def pack_linears(root: nn.Module) -> dict[nn.Module, Tensor]:
    """Every float32 nn.Linear under `root`, with its weight packed by pack_weight. The modules stay
    as they are (state_dict() unchanged); the packed copies are the caller's."""
    return {module: pack_weight(module.weight) for module in root.modules()
            if type(module) is nn.Linear and module.weight.dtype == torch.float32}


def int8_matmul(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """x @ (weight * scale[:, None]).T on the CPU with torch's int8-weight kernel (fp32 x)."""
    out = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), weight, scale)
    return out.reshape(*x.shape[:-1], weight.shape[0])
