"""Whisper as PyTorch modules, shaped for serving.

Differences from a textbook Whisper, each for speed:
- fused QKV (self-attention) and fused KV (cross-attention) projections: one GEMM instead of three;
- each residual add is paired with the LayerNorm after it, so a runner can run the pair as one
  kernel: a block takes (x, its first norm of x) and returns (x', the next block's norm of x');
- the decoder reads and writes attention state through a DecoderAttention that the caller hands it:
  preallocated per-row caches for serving (app.engine.runners), or a whole sequence at once.

The forward passes are written once, here, in terms of `Ops`: how each linear layer, residual add +
LayerNorm, attention, the encoder's input stage and the output projection run. `Ops` itself is
plain torch on any device; the runners pass their own (oneDNN-packed GEMMs on the CPU, Triton
kernels on CUDA) to AudioEncoder.encode and TextDecoder.forward, while AudioEncoder.forward and
WhisperModel.forward take tensors only and run torch's (so the modules trace and export as they
are). Parameter names are the engine files' (app.engine.config).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.engine.config import ModelDims


class Int8Linear(nn.Module):
    """Weight-only int8 linear layer: int8 weights with a per-output-row scale."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        return self.weight.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: Tensor) -> Tensor:
        # Dequantize in the activation dtype; on a GPU the int8 read halves the weight bytes.
        return F.linear(x, self.dequantized(x.dtype), self.bias)


class Int8Embedding(nn.Module):
    """Token embedding stored int8 with one scale per token (also the tied output projection)."""

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_embeddings, dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.weight[tokens].to(self.weight_scale.dtype) * self.weight_scale[tokens, None]


def make_linear(in_features: int, out_features: int, bias: bool, int8: bool) -> nn.Module:
    return Int8Linear(in_features, out_features, bias) if int8 else nn.Linear(in_features, out_features, bias)


def split_heads(x: Tensor, n_head: int) -> Tensor:
    """[B, T, d] -> [B, H, T, dh]"""
    b, t, d = x.shape
    return x.view(b, t, n_head, d // n_head).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[B, H, T, dh] -> [B, T, d]"""
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)


class Ops:
    """How a forward pass runs each operation: plain torch, on any device. Runners subclass it."""

    def linear(self, layer: nn.Module, x: Tensor, gelu: bool = False) -> Tensor:
        """layer(x), followed by exact (erf) GELU where asked."""
        y = layer(x)
        return F.gelu(y) if gelu else y

    def add_layer_norm(self, x: Tensor, y: Tensor, norm: nn.LayerNorm) -> tuple[Tensor, Tensor]:
        """(x + y, norm(x + y)): a residual add and the LayerNorm after it."""
        total = x + y
        return total, norm(total)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, *,
                  repeated_shape: bool = False) -> Tensor:
        """SDPA of q [B, H, T, dh] over k, v; `repeated_shape`: the shape comes from a small fixed
        set (encoder batches)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

    def encoder_input(self, mel: Tensor, conv1: nn.Conv1d, conv2: nn.Conv1d, positional_embedding: Tensor) -> Tensor:
        """[B, n_mels, frames] log-mel -> the residual stream [B, frames / 2, d] entering the first
        block: gelu(conv2(gelu(conv1(mel)))) transposed, plus the positional embedding."""
        x = F.gelu(conv1(mel))
        x = F.gelu(conv2(x)).transpose(1, 2)
        return x + positional_embedding[: x.shape[1]]

    def logits(self, x: Tensor, embedding: nn.Module) -> Tensor:
        """The output projection tied to the token embedding, in float32."""
        if isinstance(embedding, Int8Embedding):
            return F.linear(x, embedding.weight.to(x.dtype) * embedding.weight_scale.to(x.dtype)[:, None]).float()
        return (x @ embedding.weight.T).float()


TORCH_OPS = Ops()


class SelfAttention(nn.Module):
    def __init__(self, d: int, n_head: int, int8: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = make_linear(d, 3 * d, True, int8)
        self.out = make_linear(d, d, True, int8)


class CrossAttention(nn.Module):
    def __init__(self, d: int, n_head: int, int8: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.q = make_linear(d, d, True, int8)
        self.kv = make_linear(d, 2 * d, True, int8)
        self.out = make_linear(d, d, True, int8)


class FeedForward(nn.Module):
    """The block's MLP half: mlp2(gelu(mlp1(mlp_ln(x)))). Parameter names match the engines'."""

    def __init__(self, d: int, ffn: int, int8: bool) -> None:
        super().__init__()
        self.mlp_ln = nn.LayerNorm(d)
        self.mlp1 = make_linear(d, ffn, True, int8)
        self.mlp2 = make_linear(ffn, d, True, int8)

    def mlp(self, normed: Tensor, ops: Ops = TORCH_OPS) -> Tensor:
        return ops.linear(self.mlp2, ops.linear(self.mlp1, normed, gelu=True))


class EncoderBlock(FeedForward):
    def __init__(self, d: int, n_head: int, ffn: int, int8: bool) -> None:
        super().__init__(d, ffn, int8)
        self.attn_ln = nn.LayerNorm(d)
        self.attn = SelfAttention(d, n_head, int8)

    def forward(self, x: Tensor, normed: Tensor, next_norm: nn.LayerNorm, ops: Ops = TORCH_OPS) -> tuple[Tensor, Tensor]:
        """(x, attn_ln(x)) -> (x', next_norm(x'))."""
        n_head = self.attn.n_head
        q, k, v = ops.linear(self.attn.qkv, normed).chunk(3, dim=-1)
        a = ops.attention(split_heads(q, n_head), split_heads(k, n_head), split_heads(v, n_head), repeated_shape=True)
        x, normed = ops.add_layer_norm(x, ops.linear(self.attn.out, merge_heads(a)), self.mlp_ln)
        return ops.add_layer_norm(x, self.mlp(normed, ops), next_norm)


def following_norms(layers: list[nn.Module], final: nn.LayerNorm) -> list[nn.LayerNorm]:
    """For each block, the LayerNorm its output goes through next: the next block's attn_ln, and
    `final` after the last block (the fused residual add + LayerNorm pairs each block with it)."""
    return [layer.attn_ln for layer in layers[1:]] + [final]


class AudioEncoder(nn.Module):
    def __init__(self, dims: ModelDims, int8: bool) -> None:
        super().__init__()
        d = dims.n_audio_state
        self.conv1 = nn.Conv1d(dims.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", torch.zeros(dims.n_audio_ctx, d))
        self.layers = nn.ModuleList(
            EncoderBlock(d, dims.n_audio_head, dims.ffn_dim, int8) for _ in range(dims.n_audio_layer)
        )
        self.ln_post = nn.LayerNorm(d)

    def input_stage(self, mel: Tensor, ops: Ops = TORCH_OPS) -> Tensor:
        return ops.encoder_input(mel, self.conv1, self.conv2, self.positional_embedding)

    def forward(self, mel: Tensor) -> Tensor:  # [B, n_mels, 3000] -> [B, 1500, d]
        return self.encode(mel, TORCH_OPS)

    def encode(self, mel: Tensor, ops: Ops) -> Tensor:
        """forward() with the operations of `ops`."""
        x = self.input_stage(mel, ops)
        layers = list(self.layers)
        normed = layers[0].attn_ln(x)
        for layer, next_norm in zip(layers, following_norms(layers, self.ln_post), strict=True):
            x, normed = layer(x, normed, next_norm, ops)
        return normed


class DecoderAttention(Protocol):
    """Where a decoder pass's attention reads and writes its keys and values."""

    def self_attention(self, layer: int, qkv: Tensor) -> Tensor:
        """Layer `layer`'s causal self-attention of the fused projection qkv [B, T, 3d] (Q, K, V,
        heads inside each) -> [B, T, d]."""
        ...

    def cross_attention(self, layer: int, q: Tensor) -> Tensor:
        """Layer `layer`'s cross-attention of queries q [B, T, d] over the audio -> [B, T, d]."""
        ...


class DecoderBlock(FeedForward):
    def __init__(self, d: int, n_head: int, ffn: int, int8: bool) -> None:
        super().__init__(d, ffn, int8)
        self.attn_ln = nn.LayerNorm(d)
        self.attn = SelfAttention(d, n_head, int8)
        self.cross_ln = nn.LayerNorm(d)
        self.cross = CrossAttention(d, n_head, int8)

    def forward(self, x: Tensor, normed: Tensor, next_norm: nn.LayerNorm, layer: int, attention: DecoderAttention,
                ops: Ops = TORCH_OPS) -> tuple[Tensor, Tensor]:
        """(x, attn_ln(x)) -> (x', next_norm(x')) for decoder layer number `layer`."""
        a = attention.self_attention(layer, ops.linear(self.attn.qkv, normed))
        x, normed = ops.add_layer_norm(x, ops.linear(self.attn.out, a), self.cross_ln)
        a = attention.cross_attention(layer, ops.linear(self.cross.q, normed))
        x, normed = ops.add_layer_norm(x, ops.linear(self.cross.out, a), self.mlp_ln)
        return ops.add_layer_norm(x, self.mlp(normed, ops), next_norm)


class TextDecoder(nn.Module):
    def __init__(self, dims: ModelDims, int8: bool) -> None:
        super().__init__()
        d = dims.n_text_state
        self.token_embedding: nn.Module = Int8Embedding(dims.n_vocab, d) if int8 else nn.Embedding(dims.n_vocab, d)
        self.positional_embedding = nn.Parameter(torch.zeros(dims.n_text_ctx, d))
        self.layers = nn.ModuleList(
            DecoderBlock(d, dims.n_text_head, dims.ffn_dim, int8) for _ in range(dims.n_text_layer)
        )
        self.ln = nn.LayerNorm(d)

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """tokens [B, T] at positions [B, T] -> the residual stream [B, T, d] entering the first block."""
        return self.token_embedding(tokens) + self.positional_embedding[positions]

    def forward(self, x: Tensor, attention: DecoderAttention, ops: Ops = TORCH_OPS) -> Tensor:
        """The embedded tokens x [B, T, d] -> ln(the last block's output) [B, T, d]; the output
        projection is ops.logits(..., self.token_embedding)."""
        layers = list(self.layers)
        normed = layers[0].attn_ln(x)
        for i, (layer, next_norm) in enumerate(zip(layers, following_norms(layers, self.ln), strict=True)):
            x, normed = layer(x, normed, next_norm, i, attention, ops)
        return normed


class WholeSequenceAttention:
    """DecoderAttention of a whole token sequence at once, no cache: causal self-attention, and
    cross-attention over given audio features [B, positions, d] in float32, keeping the attention
    weights of the (layer, head) pairs asked for (word timestamps' alignment heads)."""

    def __init__(self, decoder: TextDecoder, audio_features: Tensor, ops: Ops = TORCH_OPS,
                 heads: list[tuple[int, int]] | None = None) -> None:
        self.decoder = decoder
        self.audio_features = audio_features
        self.ops = ops
        self.wanted: dict[int, list[int]] = {}
        for layer, head in heads or []:
            self.wanted.setdefault(layer, []).append(head)
        self.weights: dict[tuple[int, int], Tensor] = {}

    def self_attention(self, layer: int, qkv: Tensor) -> Tensor:
        n_head = self.decoder.layers[layer].attn.n_head
        t = qkv.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=qkv.device).tril()
        q, k, v = (split_heads(x, n_head) for x in qkv.chunk(3, dim=-1))
        return merge_heads(self.ops.attention(q, k, v, attn_mask=causal))

    def cross_attention(self, layer: int, q: Tensor) -> Tensor:
        cross = self.decoder.layers[layer].cross
        cq = split_heads(q, cross.n_head)
        ck, cv = (split_heads(x, cross.n_head) for x in self.ops.linear(cross.kv, self.audio_features).chunk(2, dim=-1))
        scores = (cq.float() @ ck.float().transpose(-1, -2)) / math.sqrt(cq.shape[-1])
        weights = scores.softmax(dim=-1)
        for head in self.wanted.get(layer, []):
            self.weights[(layer, head)] = weights[0, head]
        return merge_heads(weights.to(cv.dtype) @ cv)


class WhisperModel(nn.Module):
    def __init__(self, dims: ModelDims, int8: bool = False) -> None:
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(dims, int8)
        self.decoder = TextDecoder(dims, int8)

    def forward(self, mel: Tensor, tokens: Tensor) -> Tensor:
        """mel [B, n_mels, frames], tokens [B, T] -> float32 logits [B, T, V]: the whole model once,
        without caches, in torch's operators (the runners serve it with their own)."""
        ops = TORCH_OPS
        features = self.encoder(mel)
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None].expand_as(tokens)
        x = self.decoder.embed(tokens, positions)
        hidden = self.decoder(x, WholeSequenceAttention(self.decoder, features, ops), ops)
        return ops.logits(hidden, self.decoder.token_embedding)
