"""A decode step's LayerNorms inside the GEMMs that read them, and residual adds in the GEMMs that
end each sub-layer.

A decoder layer's LayerNorm only feeds the linear layer after it. With the norm's scale g and shift
b folded into that layer once (W' = W diag(g), bias' = bias + W b), LayerNorm(x) W^T + bias equals
rstd * (x W'^T - mean * s) + bias' for each row, where mean and rstd are the row's statistics and
s[n] = sum_k W'[n, k]. The row GEMM (app.engine.row_gemm) reads the raw rows x and applies that
correction in its epilogue. The sub-layers' last GEMMs add their output to the residual stream in
theirs and leave each row's partial sums of x and x^2 for the next GEMM (summing x^2 over the tiles
inside the next GEMM's loop doubled its time: a second read of every tile); only layer 0, whose input
is the embedding sum, gathers them in its loop. The QKV GEMM also writes the step's self-attention
K/V. A decoder layer then runs 8 kernels instead of 12 (large-v3: 128 fewer per step).

The folded model is the same function everywhere else: its LayerNorms keep unit scale and zero shift,
so prompt prefills, word alignment and any other torch path compute exactly what they did. Only
float weights are folded (int8 weights would need quantising again).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from app.engine.row_gemm import KvAppend, RowNorm, can_row_gemm, row_linear


def _norm_linear_pairs(decoder: nn.Module) -> list[tuple[nn.LayerNorm, nn.Module]]:
    pairs: list[tuple[nn.LayerNorm, nn.Module]] = []
    for layer in decoder.layers:
        pairs += [(layer.attn_ln, layer.attn.qkv), (layer.cross_ln, layer.cross.q), (layer.mlp_ln, layer.mlp1)]
    return pairs


def fold_decoder_norms(decoder: nn.Module) -> bool:
    """Fold each decoder layer's three LayerNorms into the linear layer after it (in place), and
    mark the decoder (`norms_folded`) for folded decode steps. False, unchanged, where a linear is
    not a plain float nn.Linear."""
    pairs = _norm_linear_pairs(decoder)
    if not all(isinstance(linear, nn.Linear) and linear.bias is not None and linear.weight.is_floating_point()
               for _, linear in pairs):
        return False
    with torch.no_grad():
        for norm, linear in pairs:
            weight = linear.weight.float()
            folded = weight * norm.weight.float()[None, :]
            linear.bias.copy_(linear.bias.float() + weight @ norm.bias.float())
            linear.weight.copy_(folded)
            # the row sums of the weights as stored (rounded), so the correction cancels exactly
            linear.row_norm = RowNorm(linear.weight.float().sum(dim=1), norm.eps)
            norm.weight.fill_(1.0)
            norm.bias.zero_()
    decoder.norms_folded = True
    return True


def can_fold_step(decoder: nn.Module, x: Tensor) -> bool:
    """Whether a decode step over x [B, 1, d] runs folded: a folded decoder and few-rows GEMMs on x."""
    return getattr(decoder, "norms_folded", False) and can_row_gemm(x, decoder.layers[0].attn.qkv.weight)


def norm_linear(linear: nn.Linear, x: Tensor, gelu: bool = False, append: KvAppend | None = None,
                stats_ready: bool = True) -> Tensor:
    """linear(LayerNorm(x)) (optionally GELU) for the raw residual stream x, the norm folded into
    `linear` (fold_decoder_norms). `stats_ready`: x was last written by residual_linear, which left
    its row statistics; otherwise the kernel gathers them itself."""
    return row_linear(x, linear.weight, linear.bias, gelu, norm=linear.row_norm, stats_ready=stats_ready,
                      append=append)


def residual_linear(linear: nn.Linear, a: Tensor, x: Tensor) -> Tensor:
    """x += linear(a), in place (x contiguous), leaving x's row statistics for the next norm_linear;
    returns x."""
    return row_linear(a, linear.weight, linear.bias, residual=x, write_stats=True)
