"""The audio side of the model in fp8 (e4m3): the encoder's four GEMMs per block and the decoder's
cross-attention K/V projections, everything computed once per window (app.engine.cuda.fp8 says
why and how). The decode steps keep their own GEMMs.

Fp8AudioGemms holds the e4m3 copies of those weights beside the model (the model is unchanged)
and runs the encoder's blocks with them; the quantising, GEMM and LayerNorm functions it calls
(Fp8Functions) are Fp8Kernels: Triton's and cuBLAS's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from app.engine.cuda.fp8 import Fp8Linear, Fp8Rows, fp8_linear, quantize_fp8
from app.engine.cuda.norms import add_layer_norm_fp8, layer_norm_fp8
from app.engine.model import (
    AudioEncoder,
    EncoderBlock,
    Ops,
    WhisperModel,
    following_norms,
    merge_heads,
    split_heads,
)


class Fp8Functions(Protocol):
    """The fp8 path's quantisation, GEMM and LayerNorms."""

    def quantize(self, x: Tensor, gelu: bool = False) -> Fp8Rows:
        """Rows of x in e4m3 with one scale per row, after GELU's tanh form if asked."""
        ...

    def linear(self, x: Fp8Rows, weight: Fp8Linear, out_dtype: torch.dtype) -> Tensor:
        """x @ W.T + bias with both scales applied, in out_dtype."""
        ...

    def layer_norm(self, x: Tensor, norm: nn.LayerNorm) -> Fp8Rows:
        """norm(x) in e4m3 rows."""
        ...

    def add_layer_norm(self, x: Tensor, y: Tensor, norm: nn.LayerNorm) -> tuple[Tensor, Fp8Rows]:
        """(x + y, norm(x + y) in e4m3 rows)."""
        ...


class Fp8Kernels:
    """The fp8 path on CUDA: Triton's quantising and LayerNorm kernels, cuBLAS's fp8 GEMM.
    `fused_input_norm` False: the encoder's first LayerNorm is torch's, then quantised."""

    def __init__(self, *, pdl: bool, fused_input_norm: bool) -> None:
        self.pdl = pdl
        self.fused_input_norm = fused_input_norm

    def quantize(self, x: Tensor, gelu: bool = False) -> Fp8Rows:
        return quantize_fp8(x, gelu)

    def linear(self, x: Fp8Rows, weight: Fp8Linear, out_dtype: torch.dtype) -> Tensor:
        return fp8_linear(x, weight, out_dtype)

    def layer_norm(self, x: Tensor, norm: nn.LayerNorm) -> Fp8Rows:
        if self.fused_input_norm:
            return layer_norm_fp8(x, norm, pdl=self.pdl)
        return quantize_fp8(norm(x))

    def add_layer_norm(self, x: Tensor, y: Tensor, norm: nn.LayerNorm) -> tuple[Tensor, Fp8Rows]:
        return add_layer_norm_fp8(x, y, norm, pdl=self.pdl)


@dataclass(frozen=True)
class EncoderFp8Weights:
    """An encoder block's four GEMMs in e4m3."""

    qkv: Fp8Linear
    out: Fp8Linear
    mlp1: Fp8Linear
    mlp2: Fp8Linear


class Fp8AudioGemms:
    def __init__(self, model: WhisperModel, dtype: torch.dtype, fp8: Fp8Functions) -> None:
        """e4m3 copies of `model`'s audio-side weights, for activations in `dtype` (the GEMMs write it)."""
        self.fp8 = fp8
        self.blocks = [EncoderFp8Weights(*(Fp8Linear.from_linear(m, dtype) for m in
                                           (block.attn.qkv, block.attn.out, block.mlp1, block.mlp2)))
                       for block in model.encoder.layers]
        self.cross_kv = [Fp8Linear.from_linear(layer.cross.kv, dtype) for layer in model.decoder.layers]

    def encode(self, encoder: AudioEncoder, mel: Tensor, ops: Ops) -> Tensor:
        """encoder(mel) with every block's GEMMs in fp8; `ops` runs the rest (input stage, attention,
        the last residual add + ln_post)."""
        x = encoder.input_stage(mel, ops)
        layers = list(encoder.layers)
        norms = following_norms(layers, encoder.ln_post)
        normed = self.fp8.layer_norm(x, layers[0].attn_ln)
        for block, weights, next_norm in zip(layers[:-1], self.blocks[:-1], norms[:-1], strict=True):
            x, normed = self.fp8.add_layer_norm(*self._residuals(block, weights, x, normed, ops), next_norm)
        return ops.add_layer_norm(*self._residuals(layers[-1], self.blocks[-1], x, normed, ops), encoder.ln_post)[1]

    def _residuals(self, block: EncoderBlock, w: EncoderFp8Weights, x: Tensor, normed: Fp8Rows,
                   ops: Ops) -> tuple[Tensor, Tensor]:
        """A block's forward with fp8 GEMMs up to its last residual add: (x after the attention
        half, the MLP's output). The caller adds them with the LayerNorm that follows, in e4m3 for
        a next block, in the activation dtype for ln_post; the residual stream stays in its dtype."""
        fp8 = self.fp8
        b, t, d = x.shape
        n_head = block.attn.n_head
        q, k, v = fp8.linear(normed, w.qkv, x.dtype).view(b, t, 3 * d).chunk(3, dim=-1)
        a = ops.attention(split_heads(q, n_head), split_heads(k, n_head), split_heads(v, n_head), repeated_shape=True)
        attn_out = fp8.linear(fp8.quantize(merge_heads(a)), w.out, x.dtype).view(b, t, d)
        x, normed = fp8.add_layer_norm(x, attn_out, block.mlp_ln)
        hidden = fp8.quantize(fp8.linear(normed, w.mlp1, x.dtype), gelu=True)
        return x, fp8.linear(hidden, w.mlp2, x.dtype).view(b, t, d)

    def cross_kv_projections(self, features: Tensor) -> Iterator[Tensor]:
        """Each decoder layer's cross-attention K/V [B, T, 2d] of features [B, T, d], one layer at a
        time; the features are quantised once for all layers, now."""
        b, t, d = features.shape
        audio = self.fp8.quantize(features)
        return (self.fp8.linear(audio, weight, features.dtype).view(b, t, 2 * d) for weight in self.cross_kv)
