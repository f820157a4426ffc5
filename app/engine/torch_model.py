"""Whisper as PyTorch modules, shaped for serving.

Differences from a textbook Whisper, each for speed:
- fused QKV (self-attention) and fused KV (cross-attention) projections: one GEMM instead of three;
- SDPA attention (flash / memory-efficient kernels on GPU);
- the decoder never recomputes anything: cross-attention K/V are written once per window into a
  preallocated *row* of a cache, self-attention K/V are appended into a preallocated cache, and
  one decode call serves many rows at different positions (in-flight batching).
"""

from __future__ import annotations

import functools
import math
import mmap
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.engine.attention import attention
from app.engine.cache_write import append_kv, can_append
from app.engine.config import ModelDims
from app.engine.cpu_gemm import (
    fuse_feed_forward_gelu,
    onednn_available,
    pack_linears,
    pack_weight,
    packed_linear,
)
from app.engine.encoder_input import encoder_input
from app.engine.fp8_gemm import Fp8Linear, Fp8Rows, fp8_linear, quantize_rows
from app.engine.fused_norm import add_layer_norm, add_layer_norm_fp8, layer_norm_fp8
from app.engine.host_copy import device_tensor
from app.engine.kernels import MAX_PREFILL_QUERIES, can_write_kv, decode_attention, write_kv_into
from app.engine.logits_gemm import can_logits_fp32, logits_fp32
from app.engine.norm_fold import can_fold_step, norm_linear, residual_linear
from app.engine.row_gemm import KvAppend, step_linear

# (row offset in the batch, rows, g, audio positions): rows [offset, offset + rows) form windows
# of g rows each (beams or samples of one window) whose cross-attention K/V live in each window's
# first row and cover the first `audio positions` encoder outputs (1500 for a full 30 s window;
# fewer for a window encoded with a trimmed audio context).
CrossRuns = list[tuple[int, int, int, int]]


def int8_matmul(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """x @ (weight * scale[:, None]).T on the CPU with torch's int8-weight kernel (fp32 x)."""
    out = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), weight, scale)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Int8Linear(nn.Module):
    """Weight-only int8 linear layer: int8 weights with a per-output-row scale."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda or x.dtype != torch.float32:
            # Dequantize in the activation dtype; on GPU the int8 read halves the weight bytes.
            w = self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
            return F.linear(x, w, self.bias)
        out = int8_matmul(x, self.weight, self.weight_scale)
        return out + self.bias if self.bias is not None else out


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


class SelfAttention(nn.Module):
    def __init__(self, d: int, n_head: int, int8: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = make_linear(d, 3 * d, True, int8)
        self.out = make_linear(d, d, True, int8)

    def split_heads(self, x: Tensor) -> Tensor:  # [B, T, d] -> [B, H, T, dh]
        b, t, d = x.shape
        return x.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)

    def merge_heads(self, x: Tensor) -> Tensor:  # [B, H, T, dh] -> [B, T, d]
        b, h, t, dh = x.shape
        return x.transpose(1, 2).reshape(b, t, h * dh)


class FeedForward(nn.Module):
    """The block's MLP half: x + mlp2(gelu(mlp1(ln(x)))). Parameter names match the engines'."""

    def __init__(self, d: int, ffn: int, int8: bool) -> None:
        super().__init__()
        self.mlp_ln = nn.LayerNorm(d)
        self.mlp1 = make_linear(d, ffn, True, int8)
        # Parameter-free, so state_dict() is unchanged; the CPU's oneDNN path folds it into mlp1.
        self.mlp_act: nn.Module = nn.GELU()
        self.mlp2 = make_linear(ffn, d, True, int8)

    def mlp(self, normed: Tensor) -> Tensor:
        return self.mlp2(self.mlp_act(self.mlp1(normed)))

    def step_mlp(self, normed: Tensor) -> Tensor:
        """mlp() in a decode step: few-rows GEMMs on the GPU with the GELU inside the first."""
        if isinstance(self.mlp_act, nn.GELU) and self.mlp_act.approximate == "none":
            return step_linear(self.mlp2, step_linear(self.mlp1, normed, gelu=True))
        return self.mlp(normed)  # the CPU's oneDNN path has its GELU inside mlp1 already

    def feed_forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.mlp_ln(x))


@dataclass(frozen=True)
class EncoderFp8Weights:
    """An encoder block's four GEMMs in e4m3 (enable_fp8_audio_gemms)."""

    qkv: Fp8Linear
    out: Fp8Linear
    mlp1: Fp8Linear
    mlp2: Fp8Linear


class EncoderBlock(FeedForward):
    def __init__(self, d: int, n_head: int, ffn: int, int8: bool) -> None:
        super().__init__(d, ffn, int8)
        self.attn_ln = nn.LayerNorm(d)
        self.attn = SelfAttention(d, n_head, int8)
        self.fp8: EncoderFp8Weights | None = None  # not a buffer: state_dict() stays the engine's

    def forward(self, x: Tensor, normed: Tensor, next_norm: nn.LayerNorm) -> tuple[Tensor, Tensor]:
        """(x, attn_ln(x)) -> (x', next_norm(x')): each residual add runs with the LayerNorm after
        it (one kernel on the GPU, app.engine.fused_norm)."""
        q, k, v = self.attn.qkv(normed).chunk(3, dim=-1)
        heads = self.attn.split_heads
        a = attention(heads(q), heads(k), heads(v), repeated_shape=True)
        x, normed = add_layer_norm(x, self.attn.out(self.attn.merge_heads(a)), self.mlp_ln)
        return add_layer_norm(x, self.mlp(normed), next_norm)

    def residuals_fp8(self, x: Tensor, normed: Fp8Rows) -> tuple[Tensor, Tensor]:
        """forward() with fp8 GEMMs up to the block's last residual add: (x after the attention
        half, the MLP's output). The caller adds them with the LayerNorm that follows, in e4m3 for
        a next block, in the activation dtype for ln_post; the residual stream stays in its dtype."""
        w = self.fp8
        assert w is not None, "enable_fp8_audio_gemms() first"
        b, t, d = x.shape
        heads = self.attn.split_heads
        q, k, v = fp8_linear(normed, w.qkv, x.dtype).view(b, t, 3 * d).chunk(3, dim=-1)
        a = attention(heads(q), heads(k), heads(v), repeated_shape=True)
        attn_out = fp8_linear(quantize_rows(self.attn.merge_heads(a)), w.out, x.dtype).view(b, t, d)
        x, normed = add_layer_norm_fp8(x, attn_out, self.mlp_ln)
        hidden = quantize_rows(fp8_linear(normed, w.mlp1, x.dtype), gelu=True)
        return x, fp8_linear(hidden, w.mlp2, x.dtype).view(b, t, d)


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

    def forward(self, mel: Tensor) -> Tensor:  # [B, n_mels, 3000] -> [B, 1500, d]
        x = encoder_input(mel, self.conv1, self.conv2, self.positional_embedding)
        layers = list(self.layers)
        if layers[0].fp8 is not None:
            return self._layers_fp8(x, layer_norm_fp8(x, layers[0].attn_ln), layers)
        normed = layers[0].attn_ln(x)
        for layer, next_norm in zip(layers, following_norms(layers, self.ln_post), strict=True):
            x, normed = layer(x, normed, next_norm)
        return normed

    def _layers_fp8(self, x: Tensor, normed: Fp8Rows, layers: list[EncoderBlock]) -> Tensor:
        norms = following_norms(layers, self.ln_post)
        for layer, next_norm in zip(layers[:-1], norms[:-1], strict=True):
            x, normed = add_layer_norm_fp8(*layer.residuals_fp8(x, normed), next_norm)
        return add_layer_norm(*layers[-1].residuals_fp8(x, normed), self.ln_post)[1]


class CrossAttention(nn.Module):
    def __init__(self, d: int, n_head: int, int8: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.q = make_linear(d, d, True, int8)
        self.kv = make_linear(d, 2 * d, True, int8)
        self.out = make_linear(d, d, True, int8)
        self.fp8_kv: Fp8Linear | None = None  # enable_fp8_audio_gemms


class DecoderBlock(FeedForward):
    def __init__(self, d: int, n_head: int, ffn: int, int8: bool) -> None:
        super().__init__(d, ffn, int8)
        self.attn_ln = nn.LayerNorm(d)
        self.attn = SelfAttention(d, n_head, int8)
        self.cross_ln = nn.LayerNorm(d)
        self.cross = CrossAttention(d, n_head, int8)


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


class WhisperModel(nn.Module):
    def __init__(self, dims: ModelDims, int8: bool = False) -> None:
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(dims, int8)
        self.decoder = TextDecoder(dims, int8)


def enable_fp8_audio_gemms(model: WhisperModel, dtype: torch.dtype) -> None:
    """Run the encoder's GEMMs and the cross-attention K/V projection in fp8 (app.engine.fp8_gemm):
    everything computed once per window. The decode steps keep their own GEMMs."""
    for block in model.encoder.layers:
        block.fp8 = EncoderFp8Weights(*(Fp8Linear.from_linear(m, dtype) for m in
                                        (block.attn.qkv, block.attn.out, block.mlp1, block.mlp2)))
    for layer in model.decoder.layers:
        layer.cross.fp8_kv = Fp8Linear.from_linear(layer.cross.kv, dtype)


def lazily_zeroed(*shape: int, dtype: torch.dtype) -> Tensor:
    """A zero-filled CPU tensor whose pages the kernel maps only when first touched (like calloc)."""
    count = math.prod(shape)
    buffer = mmap.mmap(-1, max(1, count * torch.empty((), dtype=dtype).element_size()))
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(*shape)  # keeps buffer alive


class DecoderCache:
    """Preallocated per-row caches. Row r holds one decoding sequence (a window, or one beam of it).

    Layout [layer, row, head, time, head_dim] so attention reads them without transposes.
    """

    def __init__(self, dims: ModelDims, max_rows: int, device: torch.device, dtype: torch.dtype,
                 cross_dtype: torch.dtype | None = None) -> None:
        h, dh = dims.n_text_head, dims.n_text_state // dims.n_text_head
        layers = dims.n_text_layer
        self.max_rows = max_rows
        # On the CPU the caches come from anonymous memory maps: zero-filled, with pages mapped on
        # first touch, so memory follows the rows and positions in use (a CPU engine reads a
        # window's cross-K/V from its first row only; its beam rows' cross pages stay unmapped).
        # GPU memory is committed at allocation either way.
        alloc = lazily_zeroed if torch.device(device).type == "cpu" else functools.partial(torch.zeros, device=device)
        self.self_k = alloc(layers, max_rows, h, dims.n_text_ctx, dh, dtype=dtype)
        self.self_v = alloc(layers, max_rows, h, dims.n_text_ctx, dh, dtype=dtype)
        cross_dtype = cross_dtype or dtype
        self.cross_k = alloc(layers, max_rows, h, dims.n_audio_ctx, dh, dtype=cross_dtype)
        self.cross_v = alloc(layers, max_rows, h, dims.n_audio_ctx, dh, dtype=cross_dtype)
        # int8 cross-K/V keeps one scale per (layer, row, head, audio position)
        self.quantized_cross = cross_dtype == torch.int8
        if self.quantized_cross:
            self.cross_k_scale = torch.ones(layers, max_rows, h, dims.n_audio_ctx, 1, device=device, dtype=dtype)
            self.cross_v_scale = torch.ones_like(self.cross_k_scale)

    def tensors(self) -> list[Tensor]:
        out = [self.self_k, self.self_v, self.cross_k, self.cross_v]
        if self.quantized_cross:
            out += [self.cross_k_scale, self.cross_v_scale]
        return out

    def copy_rows(self, src: list[int], dst: list[int], self_len: int, cross: bool = True) -> None:
        """Copy rows src -> dst (compaction and beam reordering); gathers first, so overlaps are safe."""
        if not src:
            return
        device = self.self_k.device
        s = device_tensor(src, device)
        d = device_tensor(dst, device)
        for cache in (self.self_k, self.self_v):
            cache[:, d, :, :self_len] = cache[:, s, :, :self_len]
        if cross:
            for cache in self.tensors()[2:]:
                cache[:, d] = cache[:, s]


def quantize_rows_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per vector along the last dim: returns (int8 values, scale in x's dtype).

    Values are multiplied by the float32 reciprocal of the stored (rounded) scale and rounded half
    to even, so dequantizing with that scale is as exact as int8 allows; kernels.write_kv_into
    computes the same, bit for bit, on the GPU."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127.0).to(x.dtype)
    values = torch.round(x.float() * (1.0 / scale.float())).clamp_(-127, 127).to(torch.int8)
    return values, scale


def _mm_fp32_out_supported(weight: Tensor) -> bool:
    try:
        probe = torch.ones(2, weight.shape[1], device=weight.device, dtype=weight.dtype)
        out = torch.mm(probe, weight[:4].t(), out_dtype=torch.float32)
        return out.dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


class WhisperRunner:
    """Stateless model + a DecoderCache: encode windows into rows, step rows forward."""

    def __init__(self, model: WhisperModel, cache: DecoderCache) -> None:
        self.model = model
        self.cache = cache
        self.dims = model.dims
        embedding = model.decoder.token_embedding
        # fp32 logits on the GPU: rounding logits to fp16 flips argmax / beam ranking against the
        # fp32 reference. Up to 256 rows (decode steps, short prefills) a Triton GEMM writes fp32
        # (app.engine.logits_gemm); longer inputs use torch's half-precision GEMM with an fp32
        # output, or an fp32 copy of the embedding where that GEMM is not available.
        self.logits_weight: Tensor | None = None
        self.packed_logits: Tensor | None = None
        self.mm_fp32_out = False
        if isinstance(embedding, nn.Embedding) and embedding.weight.is_cuda and \
                embedding.weight.dtype != torch.float32:
            self.mm_fp32_out = _mm_fp32_out_supported(embedding.weight)
            if not self.mm_fp32_out:
                self.logits_weight = embedding.weight.float()

    def pack_cpu_gemms(self) -> bool:
        """Move the float32 CPU model's GEMMs (and the tied output projection) to oneDNN, with each
        MLP's GELU applied inside its first GEMM."""
        embedding = self.model.decoder.token_embedding
        if not (isinstance(embedding, nn.Embedding) and embedding.weight.device.type == "cpu"
                and embedding.weight.dtype == torch.float32 and onednn_available()):
            return False
        pack_linears(self.model)
        fuse_feed_forward_gelu(self.model)
        self.packed_logits = pack_weight(embedding.weight)
        return True

    def logits(self, x: Tensor) -> Tensor:
        """Output projection tied to the token embedding, in float32."""
        embedding = self.model.decoder.token_embedding
        if self.packed_logits is not None:
            return packed_linear(x, self.packed_logits, None)
        if isinstance(embedding, nn.Embedding | Int8Embedding) and can_logits_fp32(x, embedding.weight):
            return logits_fp32(x, embedding.weight, getattr(embedding, "weight_scale", None))  # int8: scaled
        if self.mm_fp32_out:
            flat = x.reshape(-1, x.shape[-1])
            out = torch.mm(flat, embedding.weight.t(), out_dtype=torch.float32)
            return out.reshape(*x.shape[:-1], -1)
        if self.logits_weight is not None:
            return F.linear(x.float(), self.logits_weight)
        if isinstance(embedding, Int8Embedding):
            if x.is_cuda or x.dtype != torch.float32:
                w = embedding.weight.to(x.dtype) * embedding.weight_scale.to(x.dtype)[:, None]
                return F.linear(x, w).float()
            return int8_matmul(x, embedding.weight, embedding.weight_scale)
        return (x @ embedding.weight.T).float()

    @torch.inference_mode()
    def encode(self, mel: Tensor) -> Tensor:
        return self.model.encoder(mel)

    @torch.inference_mode()
    def write_cross_kv(self, audio_features: Tensor, rows: list[int]) -> None:
        """Compute every decoder layer's cross-attention K/V once per window and store them in rows."""
        b, t, d = audio_features.shape
        h = self.dims.n_text_head
        cache = self.cache
        # On the GPU one kernel per layer writes the GEMM output head-major into the rows (and
        # quantizes it for an int8 cache). Elsewhere consecutive rows (the usual case) are a slice:
        # a plain strided copy instead of an index_put.
        consecutive = rows == list(range(rows[0], rows[0] + b))
        fused = can_write_kv(audio_features, cache.quantized_cross)
        # the rows as a tensor (the kernel's input, or an index): built once
        row_index = device_tensor(rows, audio_features.device) if fused or not consecutive else None
        index = slice(rows[0], rows[0] + b) if consecutive else row_index
        layers = list(self.model.decoder.layers)
        # fp8 projections quantise the encoder output once for every layer
        audio_fp8 = quantize_rows(audio_features) if layers[0].cross.fp8_kv is not None else None
        for i, layer in enumerate(layers):
            fp8_kv = layer.cross.fp8_kv
            if audio_fp8 is not None and fp8_kv is not None:
                kv = fp8_linear(audio_fp8, fp8_kv, audio_features.dtype).view(b, t, 2 * d)
            else:
                kv = layer.cross.kv(audio_features)  # [B, T, 2d]: K then V, heads inside each
            if fused:
                scales = (cache.cross_k_scale[i], cache.cross_v_scale[i]) if cache.quantized_cross else (None, None)
                write_kv_into(kv, h, row_index, cache.cross_k[i], cache.cross_v[i], *scales)
                continue
            kv = kv.view(b, t, 2, h, d // h).permute(2, 0, 3, 1, 4)
            if cache.quantized_cross:
                k, ks = quantize_rows_int8(kv[0])
                v, vs = quantize_rows_int8(kv[1])
                cache.cross_k[i, index, :, :t], cache.cross_k_scale[i, index, :, :t] = k, ks
                cache.cross_v[i, index, :, :t], cache.cross_v_scale[i, index, :, :t] = v, vs
            else:
                cache.cross_k[i, index, :, :t] = kv[0]
                cache.cross_v[i, index, :, :t] = kv[1]

    def _cross_kv(self, layer: int, start: int, end: int, step: int = 1,
                  n_audio: int | None = None) -> tuple[Tensor, Tensor]:
        c = self.cache
        rows, positions = slice(start, end, step), slice(0, n_audio)
        if c.quantized_cross:
            # Dequantize on read; the int8 read is what halves the dominant memory traffic on GPU.
            k = c.cross_k[layer, rows, :, positions].to(c.cross_k_scale.dtype) * \
                c.cross_k_scale[layer, rows, :, positions]
            v = c.cross_v[layer, rows, :, positions].to(c.cross_v_scale.dtype) * \
                c.cross_v_scale[layer, rows, :, positions]
            return k, v
        return c.cross_k[layer, rows, :, positions], c.cross_v[layer, rows, :, positions]

    def _cross_attention(self, layer: int, cq: Tensor, start: int, runs: CrossRuns | None) -> Tensor:
        """Cross-attention of queries cq [B, H, T, dh] for rows [start, start + B).

        Without runs every row reads its own K/V. With runs, each window's g query rows attend
        together to the K/V in the window's first row (g times fewer cache bytes, and the other
        rows need no copy of them); rows outside every run (holes in the batch) get zeros.
        """
        b, h, t, dh = cq.shape
        if runs is None and self.cache.quantized_cross and cq.is_cuda and t <= MAX_PREFILL_QUERIES:
            # a prompt prefill: the int8 K/V read as they are (dequantising every layer's K/V for a
            # few queries took ~40 ms of a large-v3 batch of 64 windows on an H200)
            return self._cross_attention_kernel(layer, cq, start)
        if runs is None:
            return attention(cq, *self._cross_kv(layer, start, start + b))
        out: Tensor | None = None
        for offset, n, g, n_audio in runs:
            k, v = self._cross_kv(layer, start + offset, start + offset + n, g, n_audio)
            q = cq[offset : offset + n]
            if g > 1:
                q = q.view(n // g, g, h, t, dh).transpose(1, 2).reshape(n // g, h, g * t, dh)
            a = attention(q, k, v)
            if g > 1:
                a = a.view(n // g, h, g, t, dh).transpose(1, 2).reshape(n, h, t, dh)
            if n == b:  # one run over every row: the common case needs no copy
                return a
            if out is None:
                out = cq.new_zeros(b, h, t, dh)
            out[offset : offset + n] = a
        assert out is not None, "cross_runs must not be empty"
        return out

    @torch.inference_mode()
    def decode(self, tokens: Tensor, positions: Tensor, start: int, kv_len: int,
               uniform_position: bool = False, cross_runs: CrossRuns | None = None) -> Tensor:
        """Run rows [start, start + B) forward.

        tokens [B, T] are fed at positions positions[b] + t; self-attention K/V are written into the
        cache there and attention reads cache positions [0, kv_len). Returns logits [B, T, V].
        `uniform_position` (every row at the same position, T == 1) drops the mask on CPU.
        `cross_runs` (see CrossRuns) says which rows share one window's cross-attention K/V
        (beams or samples), read once from the window's first row; None: every row its own.
        """
        dec = self.model.decoder
        cache = self.cache
        b, t = tokens.shape
        end = start + b
        # [B, T]; one token per row (a decode step) needs no kernel for it
        pos = positions[:, None] if t == 1 else positions[:, None] + torch.arange(t, device=tokens.device)[None, :]
        x = dec.token_embedding(tokens) + dec.positional_embedding[pos]
        # One query token on the GPU: the Triton decode kernel reads only each row's filled
        # cache (no mask tensor) and splits long key ranges across SMs.
        fused = t == 1 and tokens.is_cuda
        lengths = pos[:, 0] + 1 if fused else None
        mask = None
        if not fused and not (uniform_position and t == 1):
            keys = torch.arange(kv_len, device=tokens.device)
            mask = (keys[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, T, kv_len]
        if fused and can_fold_step(dec, x):
            return self._decode_folded(x, pos[:, 0], lengths, start, end, kv_len)
        layers = list(dec.layers)
        # Each sub-layer's residual add and the next sub-layer's LayerNorm run as one kernel on
        # the GPU (app.engine.fused_norm); `normed` is the normalised residual stream x.
        normed = layers[0].attn_ln(x)
        for i, (layer, next_norm) in enumerate(zip(layers, following_norms(layers, dec.ln), strict=True)):
            attn = layer.attn
            qkv = step_linear(attn.qkv, normed)
            q, k, v = qkv.chunk(3, dim=-1)
            q, k, v = attn.split_heads(q), attn.split_heads(k), attn.split_heads(v)
            # write this step's K/V into each row at its own positions
            ck, cv = cache.self_k[i], cache.self_v[i]
            if t == 1 and can_append(qkv, ck):  # both in one kernel, read from the QKV output
                append_kv(qkv, ck[start:end], cv[start:end], pos[:, 0])
            elif t == 1:  # one scatter kernel per tensor (advanced-index assignment costs more)
                index = pos[:, None, :, None].expand(b, attn.n_head, 1, k.shape[-1])
                ck[start:end].scatter_(2, index, k)
                cv[start:end].scatter_(2, index, v)
            else:
                rows = torch.arange(start, end, device=tokens.device)[:, None]
                ck[rows, :, pos] = k.transpose(1, 2)
                cv[rows, :, pos] = v.transpose(1, 2)
            if fused:
                a = decode_attention(q, ck[start:end, :, :kv_len], cv[start:end, :, :kv_len], lengths=lengths)
            else:
                a = attention(q, ck[start:end, :, :kv_len], cv[start:end, :, :kv_len], attn_mask=mask)
            x, normed = add_layer_norm(x, step_linear(attn.out, attn.merge_heads(a)), layer.cross_ln)
            cross = layer.cross
            cq = attn.split_heads(step_linear(cross.q, normed))
            if fused:
                a = self._cross_attention_kernel(i, cq, start)
            else:
                a = self._cross_attention(i, cq, start, cross_runs)
            x, normed = add_layer_norm(x, step_linear(cross.out, attn.merge_heads(a)), layer.mlp_ln)
            x, normed = add_layer_norm(x, layer.step_mlp(normed), next_norm)
        return self.logits(normed)

    def _cross_attention_kernel(self, layer: int, cq: Tensor, start: int) -> Tensor:
        """kernels.decode_attention of queries cq [B, H, T, dh] over the cached cross-K/V of rows
        [start, start + B), int8 ones with their scales."""
        c = self.cache
        rows = slice(start, start + cq.shape[0])
        scales = {"k_scale": c.cross_k_scale[layer, rows], "v_scale": c.cross_v_scale[layer, rows]} \
            if c.quantized_cross else {}
        return decode_attention(cq, c.cross_k[layer, rows], c.cross_v[layer, rows], **scales)

    def _decode_folded(self, x: Tensor, positions: Tensor, lengths: Tensor | None, start: int, end: int,
                       kv_len: int) -> Tensor:
        """A GPU decode step of rows [start, end), one token each, with the LayerNorms folded into
        the GEMMs (app.engine.norm_fold): x [B, 1, d] is the residual stream, updated in place."""
        dec = self.model.decoder
        cache = self.cache
        x = x.contiguous()
        d = x.shape[-1]
        for i, layer in enumerate(dec.layers):
            attn, cross = layer.attn, layer.cross
            ck, cv = cache.self_k[i, start:end], cache.self_v[i, start:end]
            # K/V written into the cache; the embedding sum (layer 0) has no statistics yet
            qkv = norm_linear(attn.qkv, x, append=KvAppend(ck, cv, positions), stats_ready=i > 0)
            a = decode_attention(attn.split_heads(qkv[..., :d]), ck[:, :, :kv_len], cv[:, :, :kv_len], lengths=lengths)
            residual_linear(attn.out, attn.merge_heads(a), x)
            a = self._cross_attention_kernel(i, attn.split_heads(norm_linear(cross.q, x)), start)
            residual_linear(cross.out, attn.merge_heads(a), x)
            residual_linear(layer.mlp2, norm_linear(layer.mlp1, x, gelu=True), x)
        return self.logits(dec.ln(x))

    @torch.inference_mode()
    def cross_attention_weights(self, tokens: Tensor, audio_features: Tensor,
                                heads: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """Full (uncached) decoder pass returning the cross-attention weights of `heads` and logits.

        tokens [1, T], audio_features [1, n_audio_ctx', d] ->
        (weights [len(heads), T, n_audio_ctx'] float32, logits [T, V] float32).
        Used once per segment for word timestamps, so clarity wins over speed here.
        """
        dec = self.model.decoder
        t = tokens.shape[1]
        x = dec.token_embedding(tokens) + dec.positional_embedding[:t]
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        wanted: dict[int, list[int]] = {}
        for layer_idx, head in heads:
            wanted.setdefault(layer_idx, []).append(head)
        collected: dict[tuple[int, int], Tensor] = {}
        for i, layer in enumerate(dec.layers):
            attn = layer.attn
            q, k, v = attn.qkv(layer.attn_ln(x)).chunk(3, dim=-1)
            a = attention(attn.split_heads(q), attn.split_heads(k), attn.split_heads(v), attn_mask=causal)
            x = x + attn.out(attn.merge_heads(a))
            cross = layer.cross
            cq = attn.split_heads(cross.q(layer.cross_ln(x)))
            kv = cross.kv(audio_features)
            ck, cv = kv.chunk(2, dim=-1)
            ck, cv = attn.split_heads(ck), attn.split_heads(cv)
            scores = (cq.float() @ ck.float().transpose(-1, -2)) / math.sqrt(cq.shape[-1])
            weights = scores.softmax(dim=-1)
            for head in wanted.get(i, []):
                collected[(i, head)] = weights[0, head]
            x = x + cross.out(attn.merge_heads(weights.to(cv.dtype) @ cv))
            x = layer.feed_forward(x)
        logits = self.logits(dec.ln(x))[0]
        return torch.stack([collected[h] for h in heads]), logits
