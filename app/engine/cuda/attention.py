"""Triton flash-decoding kernel: attention of one query token per row over cached K/V.

Decoding is bound by reading caches: cross-attention K/V (large-v3: 246 MB per window in fp16)
and the self-attention cache. This kernel
- splits the keys of each (row, head) over several programs when the batch is small, so a
  single window still spreads over the whole GPU (a plain kernel would use one SM per head);
- reads int8 K/V with one scale per (head, position) directly, never widening them in memory,
  which halves the dominant bytes (int8 cross-K/V);
- takes a per-row key count, so self-attention reads only the filled part of each row's cache
  and needs no mask tensor.

A prompt prefill's queries (several per row) go through the tensor-core kernel in passes of
QUERIES_PER_PASS; rows of more than MAX_QUERIES queries take the torch reference
(app.engine.cache.attend_cached).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from app.engine.cache import attend_cached
from app.engine.cuda.common import HAVE_TRITON, launch_args

#: Queries per (row, head) the tensor-core kernel takes in one pass (a prompt prefill's; decode: 1)
QUERIES_PER_PASS = 16
#: Queries per row that decode_attention reads with its kernel (in passes of QUERIES_PER_PASS); a
#: row of more takes the torch reference
MAX_QUERIES = 64

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from app.engine.cuda.common import enter_after_previous, load_widened

    # 16-bit fixed point for dp4a's second operand: 256 * 127 + 127 < 2^15, and one word's
    # 4 * 127 * Q16_LIMIT, summed over 16 words of a 64-wide head, stays far inside int32
    Q16_LIMIT = tl.constexpr(32512)

    @triton.jit
    def dp4a(a, b, c):
        """c + the dot product of the four signed bytes of a and of b, per int32 element."""
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def split_bytes16(x, xmax, WORDS: tl.constexpr):
        """x [4 * WORDS] float, |x| <= xmax, as 16-bit fixed point in two byte planes (high, low),
        four bytes per int32 word: x ~ (256 * high + low) * xmax / Q16_LIMIT."""
        x16 = x / xmax * Q16_LIMIT
        x16 = tl.where(x16 >= 0, x16 + 0.5, x16 - 0.5).to(tl.int32)
        high = (x16 + 128) >> 8
        low = x16 - (high << 8)
        shift = tl.arange(0, 4) * 8
        # bytes of one word are disjoint bits, so their sum is their bitwise or
        return (tl.sum((tl.reshape(high, [WORDS, 4]) & 0xFF) << shift[None, :], axis=1),
                tl.sum((tl.reshape(low, [WORDS, 4]) & 0xFF) << shift[None, :], axis=1))

    @triton.jit
    def _split_keys(len_ptr, n_keys, keys_per_split, HAS_LEN: tl.constexpr):
        """Keys [begin, end) of this program: row program_id(0)'s filled keys, split program_id(2)."""
        limit = n_keys
        if HAS_LEN:
            limit = tl.minimum(tl.load(len_ptr + tl.program_id(0)).to(tl.int32), n_keys)
        begin = tl.program_id(2) * keys_per_split
        return begin, tl.minimum(begin + keys_per_split, limit)

    @triton.jit
    def _decode_attention_partial(
        q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, len_ptr, m_ptr, l_ptr, acc_ptr, o_ptr,
        stride_qb, stride_qh, stride_ob, stride_oh,
        stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt,
        stride_sb, stride_sh,
        n_keys, keys_per_split, n_splits, sm_scale, n_queries, stride_qt, stride_ot,
        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_LEN: tl.constexpr,
        NORMALIZE: tl.constexpr, PDL: tl.constexpr, FAST_INT8: tl.constexpr, QUERIES_PER_PASS: tl.constexpr,
    ):
        # The queries (one in a decode step, up to QUERIES_PER_PASS in a prompt prefill; more than one only
        # with NORMALIZE) fill a 16-row tile so both products run on tensor cores (tl.dot); the
        # rows past them are zeros and are never stored. Compute is nearly free here: what matters
        # is streaming K/V at full bandwidth.
        enter_after_previous(PDL)
        b = tl.program_id(0)
        h = tl.program_id(1)
        split = tl.program_id(2)
        n_heads = tl.num_programs(1)
        begin, end = _split_keys(len_ptr, n_keys, keys_per_split, HAS_LEN)
        d = tl.arange(0, HEAD_DIM)
        r = tl.arange(0, QUERIES_PER_PASS)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + r[:, None] * stride_qt + d[None, :],
                    mask=r[:, None] < n_queries, other=0.0)
        q = (q.to(tl.float32) * sm_scale).to(tl.float16)
        m_i = tl.full([QUERIES_PER_PASS], -float("inf"), dtype=tl.float32)
        l_i = tl.zeros([QUERIES_PER_PASS], dtype=tl.float32)
        acc = tl.zeros([QUERIES_PER_PASS, HEAD_DIM], dtype=tl.float32)
        for start in range(begin, end, BLOCK):
            t = start + tl.arange(0, BLOCK)
            valid = t < end
            k = load_widened(k_ptr + b * stride_kb + h * stride_kh + t[:, None] * stride_kt + d[None, :],
                             valid[:, None], tl.float16, FAST_INT8)
            s = tl.dot(q, tl.trans(k))  # [QUERIES_PER_PASS, BLOCK] fp32
            if HAS_SCALE:
                ks = tl.load(ks_ptr + b * stride_sb + h * stride_sh + t, mask=valid, other=0.0).to(tl.float32)
                s = s * ks[None, :]
            s = tl.where(valid[None, :], s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if HAS_SCALE:
                vs = tl.load(vs_ptr + b * stride_sb + h * stride_sh + t, mask=valid, other=0.0).to(tl.float32)
                p = p * vs[None, :]
            v = load_widened(v_ptr + b * stride_vb + h * stride_vh + t[:, None] * stride_vt + d[None, :],
                             valid[:, None], tl.float16, FAST_INT8)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
            m_i = m_new
        first = r == 0
        if NORMALIZE:  # the only split: the output itself, no combine kernel
            out = (acc / l_i[:, None]).to(o_ptr.dtype.element_ty)
            tl.store(o_ptr + b * stride_ob + h * stride_oh + r[:, None] * stride_ot + d[None, :], out,
                     mask=r[:, None] < n_queries)
        else:
            row = (b * n_heads + h) * n_splits + split
            tl.store(m_ptr + row + r * 0, m_i, mask=first)
            tl.store(l_ptr + row + r * 0, l_i, mask=first)
            tl.store(acc_ptr + row * HEAD_DIM + r[:, None] * 0 + d[None, :], acc, mask=first[:, None])

    @triton.jit
    def _decode_attention_partial_fma(
        q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, len_ptr, m_ptr, l_ptr, acc_ptr, o_ptr,
        stride_qb, stride_qh, stride_ob, stride_oh,
        stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt,
        stride_sb, stride_sh,
        n_keys, keys_per_split, n_splits, sm_scale,
        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_LEN: tl.constexpr,
        NORMALIZE: tl.constexpr, PDL: tl.constexpr, FAST_INT8: tl.constexpr, DP4A_K: tl.constexpr = False,
    ):
        # The same partial attention with CUDA-core multiply-adds instead of a padded tensor-core
        # tile: no layout conversion of the (int8) K/V tiles through shared memory.
        # DP4A_K (int8 K read as int32 words, k_ptr/stride_kt in words): the scores by integer
        # dot products against q in 16-bit fixed point (two byte planes), exact up to q's
        # rounding (2^-15 of its largest entry), with no per-element conversion of K.
        enter_after_previous(PDL)
        b = tl.program_id(0)
        h = tl.program_id(1)
        split = tl.program_id(2)
        n_heads = tl.num_programs(1)
        begin, end = _split_keys(len_ptr, n_keys, keys_per_split, HAS_LEN)
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d).to(tl.float32) * sm_scale
        if DP4A_K:
            WORDS: tl.constexpr = HEAD_DIM // 4
            w = tl.arange(0, WORDS)
            q_max = tl.maximum(tl.max(tl.abs(q), axis=0), 1e-30)
            q_high, q_low = split_bytes16(q, q_max, WORDS)
            q_unit = q_max / Q16_LIMIT
        m_i = -float("inf")
        l_i = 0.0
        acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
        for start in range(begin, end, BLOCK):
            t = start + tl.arange(0, BLOCK)
            valid = t < end
            if DP4A_K:
                kw = tl.load(k_ptr + b * stride_kb + h * stride_kh + t[:, None] * stride_kt + w[None, :],
                             mask=valid[:, None], other=0)
                s = tl.sum(dp4a(kw, q_high[None, :], 0) * 256 + dp4a(kw, q_low[None, :], 0), axis=1)
                s = s.to(tl.float32) * q_unit
            else:
                k = load_widened(k_ptr + b * stride_kb + h * stride_kh + t[:, None] * stride_kt + d[None, :],
                                 valid[:, None], tl.float32, FAST_INT8)
                s = tl.sum(k * q[None, :], axis=1)  # [BLOCK]
            if HAS_SCALE:
                s = s * tl.load(ks_ptr + b * stride_sb + h * stride_sh + t, mask=valid, other=0.0).to(tl.float32)
            s = tl.where(valid, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            p = tl.exp(s - m_new)
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            if HAS_SCALE:
                p = p * tl.load(vs_ptr + b * stride_sb + h * stride_sh + t, mask=valid, other=0.0).to(tl.float32)
            v = load_widened(v_ptr + b * stride_vb + h * stride_vh + t[:, None] * stride_vt + d[None, :],
                             valid[:, None], tl.float32, FAST_INT8)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m_i = m_new
        if NORMALIZE:  # the only split: the output itself, no combine kernel
            tl.store(o_ptr + b * stride_ob + h * stride_oh + d, (acc / l_i).to(o_ptr.dtype.element_ty))
        else:
            row = (b * n_heads + h) * n_splits + split
            tl.store(m_ptr + row, m_i)
            tl.store(l_ptr + row, l_i)
            tl.store(acc_ptr + row * HEAD_DIM + d, acc)

    @triton.jit
    def _decode_attention_combine(m_ptr, l_ptr, acc_ptr, o_ptr, stride_ob, stride_oh, n_splits,
                                  HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr):
        enter_after_previous(PDL)
        b = tl.program_id(0)
        h = tl.program_id(1)
        n_heads = tl.num_programs(1)
        s = tl.arange(0, SPLITS)
        valid = s < n_splits
        base = (b * n_heads + h) * n_splits
        m = tl.load(m_ptr + base + s, mask=valid, other=-float("inf"))
        l_ = tl.load(l_ptr + base + s, mask=valid, other=0.0)
        m_max = tl.max(m, axis=0)
        w = tl.where(valid & (m > -float("inf")), tl.exp(m - m_max), 0.0)
        d = tl.arange(0, HEAD_DIM)
        acc = tl.load(acc_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :], mask=valid[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_ * w, axis=0)
        tl.store(o_ptr + b * stride_ob + h * stride_oh + d, out.to(o_ptr.dtype.element_ty))


def _splits(batch: int, heads: int, n_keys: int, block: int, sm_count: int, per_sm: int) -> int:
    """Enough programs for `per_sm` per SM, never splits shorter than one block."""
    wanted = max(1, math.ceil(per_sm * sm_count / (batch * heads)))
    return max(1, min(wanted, math.ceil(n_keys / block), 32))


_SM_COUNT: dict[int, int] = {}


def multiprocessors(device: torch.device) -> int:
    """The SM count of a CUDA device (asked once per device)."""
    index = device.index or 0
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch parameters of the partial kernel; min_splits forces key splits."""

    block: int = 128
    num_warps: int = 4
    num_stages: int = 3
    min_splits: int = 1
    use_dot: bool = True  # tensor-core tile (padded query) or CUDA-core multiply-adds
    programs_per_sm: int = 2  # key splits until (rows x heads x splits) reaches this per SM
    fast_int8: bool = True  # int8 K/V widened by bit assembly (int8_to_fp16), not cvt instructions
    dp4a_k: bool = True  # int8 K: scores by dp4a on whole words, K never widened (CUDA-core kernel)


# int8 K/V, widened by bit assembly, on CUDA cores: long key blocks where many (row, head) pairs
# share the GPU, short ones (more key splits) for one window. From CUDA-graph sweeps of 48 tile
# shapes on an H200 (2026-11-21; python bench/gpu_attention.py --int8-sweep), 1,500 keys:
# B=64 x 20 heads 81 us (cuDNN on fp16 K/V 118), B=16 x 20 25 us (33), B=64 x 6 27 us (38),
# B=1 x 20 5.0 us (5.3).
INT8_CONFIG = KernelConfig(block=512, num_warps=4, num_stages=3, use_dot=False, programs_per_sm=2)
INT8_FEW_PAIRS_CONFIG = replace(INT8_CONFIG, block=128)
INT8_MANY_PAIRS = 64  # (row, head) pairs from which the long blocks win


# Self-attention in a decode step (fp16/bf16 caches, each row's filled length, at most a few
# hundred keys). From a CUDA-graph sweep of 24 tile shapes on an H200 (2026-11-22), 128-key
# cache, 4-104 keys filled: B=64 x 20 heads one-warp programs on 16-key blocks 8.5 us (64-key
# blocks, 4 warps: 10.5); B=1 x 20 128-key blocks, one pass with no combine kernel, 2.5 us (2.9).
SELF_ATTENTION_MANY_PAIRS = KernelConfig(block=16, num_warps=1)
SELF_ATTENTION_FEW_PAIRS = KernelConfig(block=128)


@dataclass(frozen=True)
class AttentionTiles:
    """The KernelConfig decode_attention takes when its caller names none: by what it reads
    (int8 K/V, or a self-attention cache read up to each row's length) and by how many
    (row, head) pairs share the GPU. bench/gpu_ab.py times other choices against these."""

    int8_many_pairs: KernelConfig = INT8_CONFIG
    int8_few_pairs: KernelConfig = INT8_FEW_PAIRS_CONFIG
    self_many_pairs: KernelConfig = SELF_ATTENTION_MANY_PAIRS
    self_few_pairs: KernelConfig = SELF_ATTENTION_FEW_PAIRS
    many_pairs: int = INT8_MANY_PAIRS

    def int8(self, pairs: int) -> KernelConfig:
        return self.int8_many_pairs if pairs >= self.many_pairs else self.int8_few_pairs

    def self_attention(self, pairs: int) -> KernelConfig:
        return self.self_many_pairs if pairs >= self.many_pairs else self.self_few_pairs


ATTENTION_TILES = AttentionTiles()


def cross_lengths_config(n_keys: int) -> KernelConfig:
    """fp16/bf16 cross-attention over each row's own number of audio positions (trimmed windows):
    the tiles decode_attention uses for whole fp16 K/V where cuDNN does not take them."""
    return KernelConfig(block=128 if n_keys >= 1024 else 64)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, *, k_scale: Tensor | None = None,
                     v_scale: Tensor | None = None, lengths: Tensor | None = None,
                     config: KernelConfig | None = None, tiles: AttentionTiles = ATTENTION_TILES,
                     pdl: bool = False) -> Tensor:
    """q [B, H, TQ, dh]; k, v [B, H, T, dh] (fp16/bf16/fp32, or int8 with scales [B, H, T, 1]);
    lengths [B]: keys per row (None: all T). Returns [B, H, TQ, dh] in q's dtype. CUDA tensors.

    Every query attends to all keys of its row (no causal mask): one query per row in a decode
    step, several in a prompt's cross-attention, read in passes of QUERIES_PER_PASS (every query
    of a row sees the same `lengths[b]` keys: a trimmed window's audio positions). Shapes the
    kernel does not take (head size not a power of two, strided head dimension, more than
    MAX_QUERIES queries) get the torch reference."""
    tq, dh = q.shape[2:]
    if not (dh & (dh - 1) == 0 and k.stride(3) == 1 and tq <= MAX_QUERIES):
        return attend_cached(q, k, v, k_scale=k_scale, v_scale=v_scale, lengths=lengths)
    if tq > 1:
        # tensor-core tiles of up to QUERIES_PER_PASS query rows, whole key ranges (no combine pass)
        config = replace(config or KernelConfig(), use_dot=True, min_splits=1, programs_per_sm=0)
        return torch.cat([_attend(q[:, :, i : i + QUERIES_PER_PASS], k, v, k_scale=k_scale, v_scale=v_scale,
                                  lengths=lengths, config=config, tiles=tiles, pdl=pdl)
                          for i in range(0, tq, QUERIES_PER_PASS)], dim=2)
    return _attend(q, k, v, k_scale=k_scale, v_scale=v_scale, lengths=lengths, config=config, tiles=tiles, pdl=pdl)


def _attend(q: Tensor, k: Tensor, v: Tensor, *, k_scale: Tensor | None, v_scale: Tensor | None,
            lengths: Tensor | None, config: KernelConfig | None, tiles: AttentionTiles, pdl: bool) -> Tensor:
    """decode_attention for at most QUERIES_PER_PASS queries (more than one: config uses tl.dot
    and splits no keys)."""
    b, h, tq, dh = q.shape
    n_keys = k.shape[2]
    sm_count = multiprocessors(q.device)
    if config is None and k_scale is None and lengths is None and q.dtype != torch.float32 \
            and b * h >= sm_count and tq == 1:
        # fp16/bf16 K/V read whole (cross-attention) with a (row, head) pair per SM or more:
        # cuDNN's kernel reads them faster than ours (bench/gpu_attention.py, H100: 54 vs 61 us
        # at B=64 x 6 heads, 47 vs 57 us at B=16 x 20 heads, 103 vs 109 us at B=64 x 12 heads).
        # Fewer pairs (one window of a large model) need the key splits below to fill the GPU.
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    if config is None:
        # int8: CUDA-core multiply-adds read fastest (AttentionTiles.int8; bench/gpu_attention.py)
        config = tiles.int8(b * h) if k_scale is not None else \
            tiles.self_attention(b * h) if lengths is not None else KernelConfig(block=128 if n_keys >= 1024 else 64)
    block = config.block
    splits = max(config.min_splits, _splits(b, h, n_keys, block, sm_count, config.programs_per_sm))
    keys_per_split = math.ceil(math.ceil(n_keys / splits) / block) * block
    splits = math.ceil(n_keys / keys_per_split)
    out = torch.empty(b, h, tq, dh, device=q.device, dtype=q.dtype)
    normalize = splits == 1
    if normalize:  # the partial kernel writes `out` directly: no partial results to combine
        m = l_ = acc = None
    else:
        m = torch.empty(b * h * splits, device=q.device, dtype=torch.float32)
        l_ = torch.empty_like(m)
        acc = torch.empty(b * h * splits, dh, device=q.device, dtype=torch.float32)
    has_scale = k_scale is not None
    if config.use_dot:
        partial = _decode_attention_partial
        variant = {"n_queries": tq, "stride_qt": q.stride(2), "stride_ot": out.stride(2),
                   "QUERIES_PER_PASS": QUERIES_PER_PASS}
    else:
        partial = _decode_attention_partial_fma
        dp4a_k = (k.dtype == torch.int8 and config.dp4a_k and dh % 4 == 0
                  and k.storage_offset() % 4 == 0 and all(stride % 4 == 0 for stride in k.stride()[:3]))
        if dp4a_k:
            k = k.view(torch.int32)  # four int8 per word; strides in words
        variant = {"DP4A_K": True} if dp4a_k else {}
    partial[(b, h, splits)](
        q_ptr=q, k_ptr=k, v_ptr=v, ks_ptr=k_scale, vs_ptr=v_scale, len_ptr=lengths, m_ptr=m, l_ptr=l_, acc_ptr=acc,
        o_ptr=out, stride_qb=q.stride(0), stride_qh=q.stride(1), stride_ob=out.stride(0), stride_oh=out.stride(1),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kt=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vt=v.stride(2),
        stride_sb=k_scale.stride(0) if has_scale else 0, stride_sh=k_scale.stride(1) if has_scale else 0,
        n_keys=n_keys, keys_per_split=keys_per_split, n_splits=splits, sm_scale=1.0 / math.sqrt(dh),
        HEAD_DIM=dh, BLOCK=block, HAS_SCALE=has_scale, HAS_LEN=lengths is not None, NORMALIZE=normalize,
        FAST_INT8=v.dtype == torch.int8 and config.fast_int8,
        num_warps=config.num_warps, num_stages=config.num_stages, **variant, **launch_args(pdl),
    )
    if normalize:
        return out
    _decode_attention_combine[(b, h)](
        m_ptr=m, l_ptr=l_, acc_ptr=acc, o_ptr=out, stride_ob=out.stride(0), stride_oh=out.stride(1), n_splits=splits,
        HEAD_DIM=dh, SPLITS=triton.next_power_of_2(splits), **launch_args(pdl))
    return out
