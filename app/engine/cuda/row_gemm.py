"""Linear layers of decode steps (a few rows against a large weight) in one Triton kernel.

A decode step multiplies at most a few dozen rows by each weight matrix. On an H200 each such
cuBLAS GEMM took 4-9 us inside a CUDA graph (plus a split-K reduce kernel for the MLP's second
GEMM, and a separate GELU kernel after the first), about what a graph kernel costs whatever its
bytes: a decode step of large-v3 spent ~1.2 ms in 192 GEMMs against ~0.35 ms to read their 1.5 GB
of weights once.

This kernel gives each program a narrow column block (and, for the MLP's second GEMM, a quarter of
K), applies the bias and, optionally, exact (erf) GELU in float32 before rounding once, so the
MLP's GELU kernel and the split-K reduce kernel disappear. The programs of a split column block
leave fp32 partial sums in a workspace; the last one to arrive (an atomic counter per block) adds
them in a fixed order, so results do not depend on timing, and resets the counter, so the kernel
needs no setup and can be replayed inside CUDA graphs. Measured per GEMM (bench/gpu_linear.py):
5-50 % faster than cuBLAS for tiny.en and small, even for large-v3. int8 weight-only layers are
read as int8 (half the bytes) with their per-row scale applied in the epilogue.

The same kernel runs a decode step's LayerNorms and residual adds (app.engine.runners.norm_fold):
a LayerNorm'd input arrives raw with the norm folded into the weights (RowNorm), and a sub-layer's
last GEMM adds its output to the residual stream and leaves the rows' statistics for the next one.

The partial sums, counters and row statistics live in app.engine.cuda.workspace (one per device).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from app.engine.cuda.common import HAVE_TRITON, launch_args, line_elements
from app.engine.cuda.logits_gemm import as_rows
from app.engine.cuda.workspace import WORKSPACE

# Row statistics handed from a residual GEMM (write_stats) to the next GEMM's LayerNorm: sums of the
# stored values and of their squares per _STAT_COLS-column group, float32 [2, _STAT_GROUPS,
# _STAT_ROWS] per device (widths up to 4,096, up to 64 rows).
_STAT_COLS = 32
_STAT_GROUPS = 128
_STAT_ROWS = 64
# where a LayerNorm'd input's statistics come from (the kernel's NORM_IN)
_NORM_IN_LOOP = 1  # gathered by the tile loop from the rows it reads
_NORM_IN_STATS = 2  # left by the residual GEMM that wrote the rows

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from app.engine.cuda.common import enter_after_previous, gelu_erf, prefetch_weight_rows
    from app.engine.cuda.logits_gemm import dot_weight_rows, scale_columns

    STAT_COLS = tl.constexpr(_STAT_COLS)
    STAT_ROWS = tl.constexpr(_STAT_ROWS)
    STAT_PLANE = tl.constexpr(_STAT_GROUPS * _STAT_ROWS)
    NORM_IN_LOOP = tl.constexpr(_NORM_IN_LOOP)
    NORM_IN_STATS = tl.constexpr(_NORM_IN_STATS)

    @triton.jit
    def _finish(acc, block, rows, cols, m, n, s_ptr, b_ptr, out_ptr, stride_om, mean, rstd, wsum_ptr, stats_ptr,
                kc_ptr, vc_ptr, pos_ptr, stride_cb, stride_ch, stride_ct, d_model,
                BM: tl.constexpr, BN: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                GELU: tl.constexpr, NORM_IN: tl.constexpr, RESIDUAL: tl.constexpr, WRITE_STATS: tl.constexpr,
                APPEND_KV: tl.constexpr, HEAD_DIM: tl.constexpr):
        """The epilogue: column scale, LayerNorm correction, bias, GELU, residual add; store; the
        stored rows' partial statistics for the next GEMM's LayerNorm, and the K/V thirds of a QKV
        output into the self-attention caches."""
        if HAS_SCALE:  # int8 weights: one scale per output column
            acc = scale_columns(acc, s_ptr, cols, n)
        if NORM_IN:  # x W'^T of the raw rows -> LayerNorm(x) W^T (app.engine.runners.norm_fold)
            wsum = tl.load(wsum_ptr + cols, mask=cols < n, other=0.0)
            acc = rstd[:, None] * (acc - mean[:, None] * wsum[None, :])
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
        if GELU:
            acc = gelu_erf(acc)
        inside = (rows[:, None] < m) & (cols[None, :] < n)
        out = acc.to(out_ptr.dtype.element_ty)
        if RESIDUAL:  # out += linear(a) in place, the sum rounded once more, as two separate ops would
            res = tl.load(out_ptr + rows[:, None] * stride_om + cols[None, :], mask=inside, other=0.0)
            out = (res.to(tl.float32) + out.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], out, mask=inside)
        if WRITE_STATS:  # sums of the stored values and their squares per STAT_COLS-column group
            GROUPS: tl.constexpr = BN // STAT_COLS
            grouped = tl.reshape(tl.where(inside, out.to(tl.float32), 0.0), [BM, GROUPS, STAT_COLS])
            group = block * GROUPS + tl.arange(0, GROUPS)
            dst = stats_ptr + group[None, :] * STAT_ROWS + rows[:, None]
            tl.store(dst, tl.sum(grouped, axis=2), mask=rows[:, None] < m)
            tl.store(dst + STAT_PLANE, tl.sum(grouped * grouped, axis=2), mask=rows[:, None] < m)
        if APPEND_KV:  # columns [d, 2d) are K, [2d, 3d) V, heads inside each: row r's go to its position
            first = block * BN - d_model  # this block's first column within K | V
            if first >= 0:  # a block lies inside one head of K or of V (BN divides HEAD_DIM)
                within = first % d_model
                pos = tl.load(pos_ptr + rows, mask=rows < m, other=0).to(tl.int64)
                dst = (rows[:, None].to(tl.int64) * stride_cb + pos[:, None] * stride_ct
                       + (within // HEAD_DIM) * stride_ch + within % HEAD_DIM + tl.arange(0, BN)[None, :])
                if first < d_model:
                    tl.store(kc_ptr + dst, out, mask=rows[:, None] < m)
                else:
                    tl.store(vc_ptr + dst, out, mask=rows[:, None] < m)

    @triton.jit
    def _row_gemm(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, part_ptr, count_ptr, wsum_ptr, stats_ptr, kc_ptr, vc_ptr,
                  pos_ptr, m, n, k, stride_xm, stride_wn, stride_om, stride_cb, stride_ch, stride_ct, d_model,
                  k_per_split, eps,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
                  HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, NORM_IN: tl.constexpr,
                  STAT_GROUPS: tl.constexpr, RESIDUAL: tl.constexpr, WRITE_STATS: tl.constexpr,
                  APPEND_KV: tl.constexpr, HEAD_DIM: tl.constexpr, LINE: tl.constexpr, PDL: tl.constexpr):
        # out[m, n] = act(scale[n] sum_k x[m, k] w[n, k] + bias[n]) (+ residual); program (column
        # block, K slice). NORM_IN: x is the raw residual stream and its LayerNorm is applied here,
        # from row statistics the tile loop gathers (NORM_IN_LOOP; a program then spans all of K) or
        # that the GEMM which last wrote x left in stats_ptr (NORM_IN_STATS, STAT_GROUPS partials).
        tl.static_assert(not (NORM_IN == NORM_IN_LOOP and SPLIT > 1), "in-loop statistics need whole rows")
        block = tl.program_id(0)
        split = tl.program_id(1)
        rows = tl.arange(0, BM)
        cols = block * BN + tl.arange(0, BN)
        begin = split * k_per_split
        # the weights do not depend on earlier kernels: fetch them while the previous one drains
        prefetch_weight_rows(w_ptr, cols, n, k, stride_wn, begin, begin + k_per_split, BK, LINE, PDL)
        enter_after_previous(PDL)
        if NORM_IN == NORM_IN_STATS:  # issued before the tile loop, summed after it
            group = tl.arange(0, STAT_GROUPS)
            stat_ok = (group[:, None] < tl.cdiv(k, STAT_COLS)) & (rows[None, :] < m)
            stat_src = stats_ptr + group[:, None] * STAT_ROWS + rows[None, :]
            sums = tl.load(stat_src, mask=stat_ok, other=0.0)
            sums_sq = tl.load(stat_src + STAT_PLANE, mask=stat_ok, other=0.0)
        acc, row_sum, row_sum_sq = dot_weight_rows(x_ptr, w_ptr, rows, cols, m, n, k, stride_xm, stride_wn, begin,
                                                   begin + k_per_split, BM, BN, BK, NORM_IN == NORM_IN_LOOP)
        if NORM_IN == NORM_IN_STATS:
            row_sum = tl.sum(sums, axis=0)
            row_sum_sq = tl.sum(sums_sq, axis=0)
        mean = row_sum / k
        rstd = 1.0 / tl.sqrt(tl.maximum(row_sum_sq / k - mean * mean, 0.0) + eps)
        if SPLIT == 1:
            _finish(acc, block, rows, cols, m, n, s_ptr, b_ptr, out_ptr, stride_om, mean, rstd, wsum_ptr, stats_ptr,
                    kc_ptr, vc_ptr, pos_ptr, stride_cb, stride_ch, stride_ct, d_model,
                    BM, BN, HAS_SCALE, HAS_BIAS, GELU, NORM_IN != 0, RESIDUAL, WRITE_STATS, APPEND_KV, HEAD_DIM)
        else:
            tile = rows[:, None] * BN + tl.arange(0, BN)[None, :]
            tl.store(part_ptr + (block * SPLIT + split) * BM * BN + tile, acc)
            # release: this partial is visible before the count; acquire for the last arrival
            arrived = tl.atomic_add(count_ptr + block, 1, sem="acq_rel")
            if arrived == SPLIT - 1:
                total = tl.zeros([BM, BN], dtype=tl.float32)
                for s in range(SPLIT):  # fixed order: the same sums whichever program is last
                    total += tl.load(part_ptr + (block * SPLIT + s) * BM * BN + tile, cache_modifier=".cg")
                tl.atomic_xchg(count_ptr + block, 0)
                _finish(total, block, rows, cols, m, n, s_ptr, b_ptr, out_ptr, stride_om, mean, rstd, wsum_ptr,
                        stats_ptr, kc_ptr, vc_ptr, pos_ptr, stride_cb, stride_ch, stride_ct,
                        d_model, BM, BN, HAS_SCALE, HAS_BIAS, GELU, NORM_IN != 0, RESIDUAL, WRITE_STATS, APPEND_KV,
                        HEAD_DIM)


#: Rows the kernel takes: a decode step of up to 64 sequences (one BM tile).
MAX_STEP_ROWS = 64


@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_k: int
    split: int
    warps: int = 4
    stages: int = 4


#: Model width (the smaller side of each decoder weight) from which the tiles below change
#: (large-v3: 1,280; small's 768 and tiny.en's 384 keep the narrow ones).
WIDE_MODEL = 1024


def choose_tiles(n: int, k: int, m: int = MAX_STEP_ROWS) -> TileConfig:
    """Tiles for an m x k by k x n GEMM, from sweeps of bench/gpu_linear.py on an H200.

    Narrow column blocks, with K split where it is longer than the output (the MLP's second GEMM):
    elsewhere the extra pass over partial sums cost more than the added programs gained. From a
    width of WIDE_MODEL on, 256-wide K steps (fewer, longer loads per program), and at more than
    32 rows the MLP's first GEMM takes 64 columns per program and its second splits K two ways,
    not four: every program re-reads all m rows of the input from L2, which at 64 rows costs more
    than the weights.
    """
    if min(n, k) < WIDE_MODEL:
        return TileConfig(block_n=32, block_k=128, split=4 if k > n else 1)
    many_rows = m > 32
    if k > n:  # MLP out
        return TileConfig(block_n=32, block_k=256, split=2 if many_rows else 4)
    if n >= 4 * k:  # MLP in
        return TileConfig(block_n=64, block_k=128 if many_rows else 256, split=1)
    if n == k and many_rows:  # projections: the 128-wide steps stay best at 64 rows
        return TileConfig(block_n=32, block_k=128, split=1)
    return TileConfig(block_n=32, block_k=256, split=1)


def fixed_tiles(n: int, k: int, m: int = MAX_STEP_ROWS) -> TileConfig:
    """32 x 128 tiles everywhere, K split four ways where it is longer than the output: the tiles
    before choose_tiles' sweeps (bench/gpu_ab.py times them against it)."""
    return TileConfig(block_n=32, block_k=128, split=4 if k > n else 1)


#: (n, k, rows) -> the tiles of that GEMM
TilePolicy = Callable[[int, int, int], TileConfig]


@dataclass(frozen=True)
class RowNorm:
    """The input is the raw residual stream; apply its LayerNorm inside the GEMM. The weight has the
    norm's scale folded in and `weight_sum` is its float32 row sums (app.engine.runners.norm_fold)."""

    weight_sum: Tensor
    eps: float


@dataclass(frozen=True)
class LinearWeights:
    """A linear layer as row_linear reads it: weight [n, k] (the input's dtype, or int8 with its
    per-row `scale`), optional bias, and, for a folded LayerNorm, the RowNorm of its input."""

    weight: Tensor
    bias: Tensor | None = None
    scale: Tensor | None = None
    norm: RowNorm | None = None

    def __post_init__(self) -> None:
        if (self.weight.dtype == torch.int8) != (self.scale is not None):
            raise ValueError("int8 weights need their per-row scale (and only they take one)")


@dataclass(frozen=True)
class KvAppend:
    """Also write the K and V thirds of a QKV output ([rows, 3d]: Q, K, V, heads inside each) into
    self-attention caches [rows, H, T, dh] at each row's position `positions[row]`."""

    k_cache: Tensor
    v_cache: Tensor
    positions: Tensor


def row_linear(x: Tensor, weights: LinearWeights, *, gelu: bool = False, tiles: TilePolicy = choose_tiles,
               stats_ready: bool = False, residual: Tensor | None = None, write_stats: bool = False,
               append: KvAppend | None = None, pdl: bool = False) -> Tensor:
    """act(x @ (weight * scale[:, None]).T + bias) for x [..., k] (fp16/bf16 on the GPU) with at most
    MAX_STEP_ROWS rows; int8 weights are read as int8, half the bytes of fp16. `gelu`: exact (erf)
    GELU in the epilogue.

    `weights.norm`: x is normalised inside (RowNorm), from statistics the kernel gathers itself, or
    with `stats_ready` from those the last `write_stats` call on this device left for these very
    rows. `residual` [..., n] (contiguous): the result is added to it in place and returned.
    `append`: see KvAppend."""
    flat = as_rows(x)
    m, k = flat.shape
    weight, norm = weights.weight, weights.norm
    n = weight.shape[0]
    if residual is not None:
        if not residual.is_contiguous() or residual.numel() != m * n:
            raise ValueError("the residual must be contiguous with one row of n per input row")
        out = residual.view(m, n)
    else:
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    config = tiles(n, k, m)
    norm_in = 0 if norm is None else _NORM_IN_STATS if stats_ready else _NORM_IN_LOOP
    if norm_in == _NORM_IN_LOOP and config.split != 1:  # the statistics need whole rows in each program
        config = replace(config, split=1)
    if write_stats and (config.block_n % _STAT_COLS or n > _STAT_COLS * _STAT_GROUPS or m > _STAT_ROWS):
        raise ValueError(f"row statistics need column blocks of a multiple of {_STAT_COLS}, at most "
                         f"{_STAT_COLS * _STAT_GROUPS} columns and {_STAT_ROWS} rows")
    bm = max(16, triton.next_power_of_2(m))
    blocks = triton.cdiv(n, config.block_n)
    partials = counters = None
    if config.split > 1:  # the split programs' partial sums, and their arrival count per block
        partials = WORKSPACE.get("row_gemm.partials", x.device, blocks * config.split * bm * config.block_n,
                                 torch.float32)
        counters = WORKSPACE.get("row_gemm.counters", x.device, max(blocks, 256), torch.int32, zeroed=True)
    stats = WORKSPACE.get("row_gemm.stats", x.device, 2 * _STAT_GROUPS * _STAT_ROWS, torch.float32, zeroed=True) \
        if norm_in == _NORM_IN_STATS or write_stats else None
    k_per_split = triton.cdiv(triton.cdiv(k, config.split), config.block_k) * config.block_k
    if append is not None and (append.k_cache.stride() != append.v_cache.stride() or append.k_cache.stride(3) != 1
                               or append.k_cache.shape[-1] % config.block_n or n % (3 * config.block_n)):
        raise ValueError("the K and V caches need the same strides, head dimension contiguous and a multiple "
                         "of the column block, as the model width")
    cache_strides = append.k_cache.stride()[:3] if append is not None else (0, 0, 0)
    _row_gemm[(blocks, config.split)](
        x_ptr=flat, w_ptr=weight, s_ptr=weights.scale, b_ptr=weights.bias, out_ptr=out, part_ptr=partials,
        count_ptr=counters, wsum_ptr=norm.weight_sum if norm is not None else None, stats_ptr=stats,
        kc_ptr=append.k_cache if append is not None else None, vc_ptr=append.v_cache if append is not None else None,
        pos_ptr=append.positions if append is not None else None,
        m=m, n=n, k=k, stride_xm=flat.stride(0), stride_wn=weight.stride(0), stride_om=out.stride(0),
        stride_cb=cache_strides[0], stride_ch=cache_strides[1], stride_ct=cache_strides[2], d_model=n // 3,
        k_per_split=k_per_split, eps=norm.eps if norm is not None else 0.0,
        BM=bm, BN=config.block_n, BK=config.block_k, SPLIT=config.split, HAS_SCALE=weights.scale is not None,
        HAS_BIAS=weights.bias is not None, GELU=gelu, NORM_IN=norm_in,
        STAT_GROUPS=triton.next_power_of_2(triton.cdiv(k, _STAT_COLS)), RESIDUAL=residual is not None,
        WRITE_STATS=write_stats, APPEND_KV=append is not None,
        HEAD_DIM=append.k_cache.shape[-1] if append is not None else 1,
        LINE=line_elements(weight), num_warps=config.warps, num_stages=config.stages, **launch_args(pdl),
    )
    return out.reshape(*x.shape[:-1], n)
