"""The CUDA runner: the reference runner's work with the GPU's kernels (app.engine.cuda), CUDA
graphs, the folded decode step, int8 cross-K/V read in place and the fp8 encoder.

Every choice is made once, when the runner is built from resolved EngineOptions: which kernels run,
the weight bundles they read (the folded decoder's, the fp8 copies, the row GEMM's views of each
linear), the logits path. A decode call then only looks at its shapes.

Paths by call:
- a decode step (one token per row): the folded step where the norms were folded (a float model
  in half precision), else the model's forward with the row GEMM, fused add + LayerNorm, the K/V
  append kernel and the decode-attention kernel, which reads each row's filled cache (no mask)
  and splits long key ranges across SMs; cross-attention reads every row's own K/V, so every row
  of a window holds a copy (cross_in_first_row is False);
- a prompt prefill: the model's forward with masked SDPA (no cuDNN plans: its shapes rarely
  repeat); int8 or per-row-length cross-K/V through the decode-attention kernel;
- replay of the captured graphs wherever a bucket fits (app.engine.runners.cuda_graphs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.engine.cache import CrossRuns, DecoderCache, attend_cached
from app.engine.cuda.attention import MAX_QUERIES, cross_lengths_config, decode_attention
from app.engine.cuda.encoder_input import fused_encoder_input
from app.engine.cuda.greedy_step import greedy_step
from app.engine.cuda.kv_cache import append_kv, write_cross_kv
from app.engine.cuda.logits_gemm import MAX_LOGITS_ROWS, logits_fp32
from app.engine.cuda.norms import add_layer_norm
from app.engine.cuda.row_gemm import (
    MAX_STEP_ROWS,
    KvAppend,
    LinearWeights,
    TilePolicy,
    choose_tiles,
    fixed_tiles,
    row_linear,
)
from app.engine.cuda.sdpa import attention
from app.engine.greedy import greedy_step_reference
from app.engine.host_copy import device_tensor, to_device
from app.engine.model import Int8Linear, Ops, WhisperModel, merge_heads, split_heads
from app.engine.options import EngineOptions
from app.engine.runners.cuda_graphs import GraphedDecoder
from app.engine.runners.fp8_audio import Fp8AudioGemms, Fp8Kernels
from app.engine.runners.norm_fold import FoldedLayer, fold_decoder_norms
from app.engine.runners.reference import CachedRows, ReferenceRunner


class CudaOps(Ops):
    """Ops on the GPU: `row_weights` (the row GEMM's view of each linear; None: torch's GEMMs) for
    inputs of at most MAX_STEP_ROWS rows, the fused residual add + LayerNorm, SDPA without cuDNN's
    per-shape plans unless the shape repeats, the fused encoder input stage."""

    def __init__(self, *, row_weights: dict[nn.Module, LinearWeights] | None, fused_norms: bool, fused_input: bool,
                 tiles: TilePolicy, pdl: bool) -> None:
        self.row_weights = row_weights
        self.fused_norms = fused_norms
        self.fused_input = fused_input
        self.tiles = tiles
        self.pdl = pdl

    def linear(self, layer: nn.Module, x: Tensor, gelu: bool = False) -> Tensor:
        if self.row_weights is not None and x.numel() // x.shape[-1] <= MAX_STEP_ROWS:
            return row_linear(x, self.row_weights[layer], gelu=gelu, tiles=self.tiles, pdl=self.pdl)
        return super().linear(layer, x, gelu)

    def add_layer_norm(self, x: Tensor, y: Tensor, norm: nn.LayerNorm) -> tuple[Tensor, Tensor]:
        if self.fused_norms:
            return add_layer_norm(x, y, norm, pdl=self.pdl)
        return super().add_layer_norm(x, y, norm)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, *,
                  repeated_shape: bool = False) -> Tensor:
        return attention(q, k, v, attn_mask, repeated_shape=repeated_shape)

    def encoder_input(self, mel: Tensor, conv1: nn.Conv1d, conv2: nn.Conv1d, positional_embedding: Tensor) -> Tensor:
        if self.fused_input:
            return fused_encoder_input(mel, conv1, conv2, positional_embedding)
        return super().encoder_input(mel, conv1, conv2, positional_embedding)


def row_gemm_weights(layers: Iterable[nn.Module]) -> dict[nn.Module, LinearWeights]:
    """The row GEMM's view of every linear under `layers` (int8 ones with their scale)."""
    return {m: LinearWeights(m.weight, m.bias, m.weight_scale if isinstance(m, Int8Linear) else None)
            for layer in layers for m in layer.modules() if isinstance(m, nn.Linear | Int8Linear)}


def mm_fp32_out_supported(weight: Tensor) -> bool:
    """Whether torch.mm takes half-precision inputs with a float32 output here."""
    try:
        probe = torch.ones(2, weight.shape[1], device=weight.device, dtype=weight.dtype)
        out = torch.mm(probe, weight[:4].t(), out_dtype=torch.float32)
        return out.dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


@dataclass
class StepAttention:
    """DecoderAttention of a decode step on the GPU, one token per row of rows [start, end) at
    `positions` [B]: the K/V append and decode-attention kernels read each row's first lengths[b]
    self-attention positions; cross-attention reads each row's own K/V."""

    runner: CudaRunner
    start: int
    end: int
    positions: Tensor
    lengths: Tensor
    kv_len: int

    def self_attention(self, layer: int, qkv: Tensor) -> Tensor:
        runner = self.runner
        n_head = runner.n_head
        q, k, v = (split_heads(x, n_head) for x in qkv.chunk(3, dim=-1))
        ck, cv = runner.cache.self_k[layer, self.start : self.end], runner.cache.self_v[layer, self.start : self.end]
        if runner.append_kernel:  # both in one kernel, read from the QKV output
            append_kv(qkv, ck, cv, self.positions, pdl=runner.pdl)
        else:  # one scatter kernel per tensor
            index = self.positions[:, None, None, None].expand(qkv.shape[0], n_head, 1, k.shape[-1])
            ck.scatter_(2, index, k)
            cv.scatter_(2, index, v)
        return merge_heads(runner.attend(q, ck[:, :, : self.kv_len], cv[:, :, : self.kv_len], lengths=self.lengths))

    def cross_attention(self, layer: int, q: Tensor) -> Tensor:
        return merge_heads(self.runner.cross_attention_kernel(layer, split_heads(q, self.runner.n_head), self.start))


class CudaRunner(ReferenceRunner):
    """A WhisperModel on a CUDA device, every kernel and weight bundle chosen when it is built."""

    #: the decode-attention kernel reads each row's own cross-attention K/V
    cross_in_first_row = False

    def __init__(self, model: WhisperModel, cache: DecoderCache, options: EngineOptions, *, eot: int,
                 suppress_ids: tuple[int, ...], prompt_lengths: tuple[int, ...]) -> None:
        kernels = options.kernels
        dtype = options.torch_dtype
        self.kernels = kernels
        self.pdl = kernels.pdl
        self.trims_audio_context = options.trimmed_context
        # the audio side's fp8 copies (from the float weights), then the decoder's norms folded in place
        self.fp8 = Fp8AudioGemms(model, dtype, Fp8Kernels(pdl=self.pdl, fused_input_norm=kernels.fused_encoder_input)) \
            if options.fp8_encoder else None
        self.folded: list[FoldedLayer] | None = fold_decoder_norms(model.decoder) if kernels.fold_norms else None
        tiles = choose_tiles if kernels.swept_tiles else fixed_tiles
        self.tiles = tiles
        row_weights = row_gemm_weights(model.decoder.layers) if kernels.row_gemm else None
        super().__init__(model, cache, CudaOps(row_weights=row_weights, fused_norms=kernels.fused_norms,
                                               fused_input=False, tiles=tiles, pdl=self.pdl))
        self.encoder_ops = CudaOps(row_weights=None, fused_norms=kernels.fused_norms,
                                   fused_input=kernels.fused_encoder_input, tiles=tiles, pdl=self.pdl)
        self.alignment_ops = CudaOps(row_weights=None, fused_norms=False, fused_input=False, tiles=tiles, pdl=self.pdl)
        head_dim = model.dims.n_text_state // model.dims.n_text_head
        power_of_two = head_dim & (head_dim - 1) == 0
        self.append_kernel = kernels.triton and power_of_two
        self.attend: Callable[..., Tensor] = functools.partial(
            decode_attention, tiles=kernels.attention_tiles, pdl=self.pdl) if kernels.triton else _attend_in_torch
        # int8 caches are written quantised by the kernel from fp16; full-precision ones on request
        self.write_kv_kernel = kernels.triton and dtype == torch.float16 if cache.quantized_cross \
            else kernels.write_kv_kernel
        self.int8_prefill_kernel = cache.quantized_cross and kernels.int8_prefill_kernel
        # fp16/bf16 K/V read to each row's own length take the kernel's long-key tiles, not cuDNN's
        self.cross_config = cross_lengths_config(cache.cross_k.shape[3]) \
            if cache.cross_len is not None and not cache.quantized_cross else None
        self._choose_logits()
        self.graphs: GraphedDecoder | None = None
        if options.graphs.enabled:
            self._capture_graphs(options, eot, suppress_ids, prompt_lengths)
        self.greedy_chunks = self.graphs is not None

    def _choose_logits(self) -> None:
        # fp32 logits on the GPU: rounding logits to fp16 flips argmax / beam ranking against the
        # fp32 reference. Up to MAX_LOGITS_ROWS rows (decode steps, short prefills) a Triton GEMM
        # writes fp32 (app.engine.cuda.logits_gemm); longer inputs use torch's half-precision GEMM
        # with an fp32 output, or an fp32 copy of the embedding where that GEMM is not available.
        embedding = self.model.decoder.token_embedding
        self.logits_kernel_weights = (embedding.weight, getattr(embedding, "weight_scale", None)) \
            if self.kernels.logits_kernel else None
        self.logits_weight: Tensor | None = None
        self.logits_fallback: Callable[[Tensor], Tensor] = functools.partial(self.ops.logits, embedding=embedding)
        if isinstance(embedding, nn.Embedding) and embedding.weight.dtype != torch.float32:
            if mm_fp32_out_supported(embedding.weight):
                self.logits_fallback = functools.partial(_mm_fp32_out, weight=embedding.weight)
            else:
                self.logits_weight = embedding.weight.float()
                self.logits_fallback = functools.partial(_linear_fp32, weight=self.logits_weight)

    def _capture_graphs(self, options: EngineOptions, eot: int, suppress_ids: tuple[int, ...],
                        prompt_lengths: tuple[int, ...]) -> None:
        kernels, graphs = options.kernels, options.graphs
        step = functools.partial(greedy_step, chunks=kernels.greedy_vocab_chunks, pdl=self.pdl) \
            if kernels.greedy_step_kernel else greedy_step_reference
        dims = self.dims
        self.graphs = GraphedDecoder(
            self.decode_rows, step, device=self.device, n_ctx=dims.n_text_ctx, n_vocab=dims.n_vocab,
            max_rows=self.cache.max_rows, chunk_steps=graphs.chunk_steps, eot=eot, suppress_ids=suppress_ids,
            batch_buckets=graphs.batch_buckets, kv_buckets=graphs.kv_buckets,
            prefill_lengths=prompt_lengths if graphs.prefill else (), chunk_tail=graphs.chunk_tail)
        self.graphs.capture_all()

    # ---- audio ------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, mel: Tensor) -> Tensor:
        if self.fp8 is not None:
            return self.fp8.encode(self.model.encoder, mel, self.encoder_ops)
        return self.model.encoder.encode(mel, self.encoder_ops)

    @torch.inference_mode()
    def write_cross_kv(self, audio_features: Tensor, rows: list[int]) -> None:
        b, t, _ = audio_features.shape
        cache = self.cache
        # one kernel per layer writes the GEMM output head-major into the rows (and quantizes it
        # for an int8 cache); else consecutive rows (the usual case) are a slice for torch's copy
        consecutive = rows == list(range(rows[0], rows[0] + b))
        row_index = device_tensor(rows, audio_features.device) if self.write_kv_kernel or not consecutive else None
        index: slice | Tensor = slice(rows[0], rows[0] + b) if consecutive or row_index is None else row_index
        projections = self.fp8.cross_kv_projections(audio_features) if self.fp8 is not None else \
            (self.encoder_ops.linear(layer.cross.kv, audio_features) for layer in self.model.decoder.layers)
        if cache.cross_len is not None:
            cache.cross_len[index] = t
        for i, kv in enumerate(projections):
            if row_index is not None and self.write_kv_kernel:
                scales = (cache.cross_k_scale[i], cache.cross_v_scale[i]) if cache.quantized_cross else (None, None)
                write_cross_kv(kv, heads=self.n_head, rows=row_index, k_cache=cache.cross_k[i],
                               v_cache=cache.cross_v[i], k_scale=scales[0], v_scale=scales[1])
            else:
                self.store_cross_kv(i, kv, index)

    # ---- decoding ---------------------------------------------------------------------------
    def decode(self, tokens: Tensor, positions: Tensor, start: int, kv_len: int,
               uniform_position: bool = False, cross_runs: CrossRuns | None = None) -> Tensor:
        """A captured graph's replay where one fits (host tensors are copied into its static
        inputs), else decode_rows."""
        if self.graphs is not None and start == 0 and tokens.shape[1] == 1:
            out = self.graphs.step(tokens, positions, kv_len)
            if out is not None:
                return out[:, None]
        elif self.graphs is not None and start == 0 and kv_len == tokens.shape[1]:  # a prompt prefill
            out = self.graphs.prefill(tokens, positions)
            if out is not None:
                return out
        return self.decode_rows(to_device(tokens, self.device), to_device(positions, self.device), start, kv_len,
                                uniform_position, cross_runs)

    @torch.inference_mode()
    def decode_rows(self, tokens: Tensor, positions: Tensor, start: int, kv_len: int,
                    uniform_position: bool = False, cross_runs: CrossRuns | None = None) -> Tensor:
        b, t = tokens.shape
        pos = self.token_positions(positions, t)
        decoder = self.model.decoder
        x = decoder.embed(tokens, pos)
        if t > 1:  # a prompt prefill
            keys = torch.arange(kv_len, device=tokens.device)
            mask = (keys[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, T, kv_len]
            attention = CachedRows(self, start, start + b, pos, kv_len, mask, cross_runs)
            return self.logits(decoder(x, attention, self.ops))
        lengths = pos[:, 0] + 1
        if self.folded is not None and b <= MAX_STEP_ROWS:
            return self._folded_step(x, pos[:, 0], lengths, start, start + b, kv_len)
        return self.logits(decoder(x, StepAttention(self, start, start + b, pos[:, 0], lengths, kv_len), self.ops))

    def _folded_step(self, x: Tensor, positions: Tensor, lengths: Tensor, start: int, end: int, kv_len: int) -> Tensor:
        """A decode step of rows [start, end), one token each, with the LayerNorms folded into the
        GEMMs (app.engine.runners.norm_fold): x [B, 1, d] is the residual stream, updated in place."""
        assert self.folded is not None
        cache, n_head, tiles, pdl = self.cache, self.n_head, self.tiles, self.pdl
        x = x.contiguous()
        d = x.shape[-1]
        for i, layer in enumerate(self.folded):
            ck, cv = cache.self_k[i, start:end], cache.self_v[i, start:end]
            # K/V written into the cache; the embedding sum (layer 0) has no statistics yet
            qkv = row_linear(x, layer.qkv, append=KvAppend(ck, cv, positions), stats_ready=i > 0, tiles=tiles,
                             pdl=pdl)
            a = self.attend(split_heads(qkv[..., :d], n_head), ck[:, :, :kv_len], cv[:, :, :kv_len], lengths=lengths)
            row_linear(merge_heads(a), layer.out, residual=x, write_stats=True, tiles=tiles, pdl=pdl)
            q = row_linear(x, layer.cross_q, stats_ready=True, tiles=tiles, pdl=pdl)
            a = self.cross_attention_kernel(i, split_heads(q, n_head), start)
            row_linear(merge_heads(a), layer.cross_out, residual=x, write_stats=True, tiles=tiles, pdl=pdl)
            hidden = row_linear(x, layer.mlp1, gelu=True, stats_ready=True, tiles=tiles, pdl=pdl)
            row_linear(hidden, layer.mlp2, residual=x, write_stats=True, tiles=tiles, pdl=pdl)
        return self.logits(self.model.decoder.ln(x))

    def cross_attention_kernel(self, layer: int, cq: Tensor, start: int) -> Tensor:
        """The decode-attention kernel for queries cq [B, H, T, dh] over the cached cross-K/V of
        rows [start, start + B): int8 ones with their scales, each row's own audio positions
        where the cache records them."""
        c = self.cache
        rows = slice(start, start + cq.shape[0])
        k_scale = c.cross_k_scale[layer, rows] if c.quantized_cross else None
        v_scale = c.cross_v_scale[layer, rows] if c.quantized_cross else None
        lengths = c.cross_len[rows] if c.cross_len is not None else None
        return self.attend(cq, c.cross_k[layer, rows], c.cross_v[layer, rows], k_scale=k_scale, v_scale=v_scale,
                           lengths=lengths, config=self.cross_config)

    def cross_attention(self, layer: int, cq: Tensor, start: int, runs: CrossRuns | None) -> Tensor:
        # rows that may hold trimmed windows: only the kernel (or its masked reference) reads each
        # row's own length. A prompt's queries against int8 K/V: read as they are (dequantising
        # every layer's K/V for a few queries took ~40 ms of a large-v3 batch of 64 windows on an H200)
        if runs is None and (self.cache.cross_len is not None
                             or (self.int8_prefill_kernel and cq.shape[2] <= MAX_QUERIES)):
            return self.cross_attention_kernel(layer, cq, start)
        return super().cross_attention(layer, cq, start, runs)

    def logits(self, x: Tensor) -> Tensor:
        if self.logits_kernel_weights is not None and x.numel() // x.shape[-1] <= MAX_LOGITS_ROWS:
            weight, scale = self.logits_kernel_weights
            return logits_fp32(x, weight, scale, pdl=self.pdl)
        return self.logits_fallback(x)

    # ---- greedy chunks ------------------------------------------------------------------------
    def greedy_chunk(self, tokens: Tensor, positions: Tensor, done: Tensor, suppress: tuple[int, ...],
                     remaining: list[int]) -> tuple[Tensor, Tensor, Tensor] | None:
        # host tensors: the graphs copy them into their static inputs (no second copy, and the
        # chunk's kv bucket comes from positions without a device sync)
        if self.graphs is None:
            return None
        return self.graphs.greedy_chunk(tokens, positions, done, suppress, remaining)

    # ---- word alignment -----------------------------------------------------------------------
    @torch.inference_mode()
    def cross_attention_weights(self, tokens: Tensor, audio_features: Tensor,
                                heads: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        # torch's GEMMs and norms: the alignment pass runs once per segment, its shapes vary
        return self.whole_sequence_pass(tokens, audio_features, heads, self.alignment_ops)


def _attend_in_torch(q: Tensor, k: Tensor, v: Tensor, *, k_scale: Tensor | None = None, v_scale: Tensor | None = None,
                     lengths: Tensor | None = None, config: object = None) -> Tensor:
    """decode_attention's torch reference where Triton is missing (`config`, the kernel's tiles, unused)."""
    return attend_cached(q, k, v, k_scale=k_scale, v_scale=v_scale, lengths=lengths)


def _mm_fp32_out(x: Tensor, weight: Tensor) -> Tensor:
    flat = x.reshape(-1, x.shape[-1])
    return torch.mm(flat, weight.t(), out_dtype=torch.float32).reshape(*x.shape[:-1], -1)


def _linear_fp32(x: Tensor, weight: Tensor) -> Tensor:
    return F.linear(x.float(), weight)
