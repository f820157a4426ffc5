"""A decode step's LayerNorms inside the GEMMs that read them, and residual adds in the GEMMs that
end each sub-layer.

A decoder layer's LayerNorm only feeds the linear layer after it. With the norm's scale g and shift
b folded into that layer once (W' = W diag(g), bias' = bias + W b), LayerNorm(x) W^T + bias equals
rstd * (x W'^T - mean * s) + bias' for each row, where mean and rstd are the row's statistics and
s[n] = sum_k W'[n, k]. The row GEMM (app.engine.cuda.row_gemm) reads the raw rows x and applies that
correction in its epilogue. The sub-layers' last GEMMs add their output to the residual stream in
theirs and leave each row's partial sums of x and x^2 for the next GEMM (summing x^2 over the tiles
inside the next GEMM's loop doubled its time: a second read of every tile); only layer 0, whose input
is the embedding sum, gathers them in its loop. The QKV GEMM also writes the step's self-attention
K/V. A decoder layer then runs 8 kernels instead of 12 (large-v3: 128 fewer per step).

The folded weights replace the model's when the CUDA runner loads (the model computes the same
function: its LayerNorms keep unit scale and zero shift, so prompt prefills, word alignment and any
other torch path compute exactly what they did); the runner keeps each layer's FoldedLayer. Only
float weights are folded (int8 weights would need quantising again).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from app.engine.cuda.row_gemm import LinearWeights, RowNorm
from app.engine.model import DecoderBlock, TextDecoder


@dataclass(frozen=True)
class FoldedLayer:
    """A decoder layer's six linears as the folded step reads them: the three after a LayerNorm
    with that norm folded in (RowNorm), the three that end a sub-layer as they are."""

    qkv: LinearWeights
    out: LinearWeights
    cross_q: LinearWeights
    cross_out: LinearWeights
    mlp1: LinearWeights
    mlp2: LinearWeights


def _norm_linear_pairs(layer: DecoderBlock) -> list[tuple[nn.LayerNorm, nn.Module]]:
    return [(layer.attn_ln, layer.attn.qkv), (layer.cross_ln, layer.cross.q), (layer.mlp_ln, layer.mlp1)]


def _plain(linear: nn.Module) -> LinearWeights:
    return LinearWeights(linear.weight, linear.bias)


def fold_decoder_norms(decoder: TextDecoder) -> list[FoldedLayer] | None:
    """Fold each decoder layer's three LayerNorms into the linear layer after it (the parameters
    change in place, the function they compute does not) and return every layer's FoldedLayer.
    None, the decoder unchanged, where a linear is not a plain float nn.Linear with a bias."""
    pairs = [pair for layer in decoder.layers for pair in _norm_linear_pairs(layer)]
    if not all(isinstance(linear, nn.Linear) and linear.bias is not None and linear.weight.is_floating_point()
               for _, linear in pairs):
        return None
    norms: dict[nn.Module, RowNorm] = {}
    with torch.no_grad():
        for norm, linear in pairs:
            weight = linear.weight.float()
            folded = weight * norm.weight.float()[None, :]
            linear.bias.copy_(linear.bias.float() + weight @ norm.bias.float())
            linear.weight.copy_(folded)
            # the row sums of the weights as stored (rounded), so the correction cancels exactly
            norms[linear] = RowNorm(linear.weight.float().sum(dim=1), norm.eps)
            norm.weight.fill_(1.0)
            norm.bias.zero_()

    def with_norm(linear: nn.Module) -> LinearWeights:
        return LinearWeights(linear.weight, linear.bias, norm=norms[linear])

    return [FoldedLayer(qkv=with_norm(layer.attn.qkv), out=_plain(layer.attn.out), cross_q=with_norm(layer.cross.q),
                        cross_out=_plain(layer.cross.out), mlp1=with_norm(layer.mlp1), mlp2=_plain(layer.mlp2))
            for layer in decoder.layers]
