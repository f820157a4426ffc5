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

The workspace and counters are shared per device: kernels on one stream run one after another,
which is how the engine thread issues all of its GPU work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.engine.kernels import HAVE_TRITON
from app.engine.logits_gemm import as_rows, streams_weight
from app.engine.pdl import launch_options, line_elements

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from app.engine.logits_gemm import dot_weight_rows, scale_columns
    from app.engine.pdl import enter_after_previous, prefetch_weight_rows

    @triton.jit
    def _bias_act_store(acc, rows, cols, s_ptr, b_ptr, out_ptr, m, n, stride_om,
                        HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr):
        if HAS_SCALE:  # int8 weights: one scale per output column
            acc = scale_columns(acc, s_ptr, cols, n)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
        if GELU:
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < m) & (cols[None, :] < n))

    @triton.jit
    def _row_gemm(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, part_ptr, count_ptr, m, n, k, stride_xm, stride_wn,
                  stride_om, k_per_split,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
                  HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, LINE: tl.constexpr,
                  PDL: tl.constexpr):
        # out[m, n] = act(scale[n] sum_k x[m, k] w[n, k] + bias[n]); program (column block, K slice)
        block = tl.program_id(0)
        split = tl.program_id(1)
        rows = tl.arange(0, BM)
        cols = block * BN + tl.arange(0, BN)
        begin = split * k_per_split
        # the weights do not depend on earlier kernels: fetch them while the previous one drains
        prefetch_weight_rows(w_ptr, cols, n, k, stride_wn, begin, begin + k_per_split, BK, LINE, PDL)
        enter_after_previous(PDL)
        acc = dot_weight_rows(x_ptr, w_ptr, rows, cols, m, n, k, stride_xm, stride_wn, begin, begin + k_per_split,
                              BM, BN, BK)
        if SPLIT == 1:
            _bias_act_store(acc, rows, cols, s_ptr, b_ptr, out_ptr, m, n, stride_om, HAS_SCALE, HAS_BIAS, GELU)
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
                _bias_act_store(total, rows, cols, s_ptr, b_ptr, out_ptr, m, n, stride_om, HAS_SCALE, HAS_BIAS,
                                GELU)


#: Rows the kernel takes: a decode step of up to 64 sequences (one BM tile).
MAX_ROWS = 64


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


def choose_tiles(n: int, k: int, m: int = MAX_ROWS) -> TileConfig:
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


class _Workspace:
    """Per-device fp32 partial sums and arrival counters (counters are left at zero by the kernel).

    A grown buffer replaces the old one for later calls but the old one is kept alive: CUDA graphs
    captured earlier still write to it.
    """

    def __init__(self) -> None:
        self.partials: dict[torch.device, Tensor] = {}
        self.counters: dict[torch.device, Tensor] = {}
        self.retired: list[Tensor] = []

    def get(self, device: torch.device, partial_elems: int, blocks: int) -> tuple[Tensor, Tensor]:
        partials = self._at_least(self.partials, device, partial_elems,
                                  lambda: torch.empty(partial_elems, device=device, dtype=torch.float32))
        counters = self._at_least(self.counters, device, blocks,
                                  lambda: torch.zeros(max(blocks, 256), device=device, dtype=torch.int32))
        return partials, counters

    def _at_least(self, buffers: dict[torch.device, Tensor], device: torch.device, size: int,
                  make: Callable[[], Tensor]) -> Tensor:
        buffer = buffers.get(device)
        if buffer is None or buffer.numel() < size:
            if buffer is not None:
                self.retired.append(buffer)
            buffer = buffers[device] = make()
        return buffer


_WORKSPACE = _Workspace()


def can_row_gemm(x: Tensor, weight: Tensor) -> bool:
    return streams_weight(x, weight, MAX_ROWS)


def row_linear(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool = False,
               tiles: TileConfig | None = None, scale: Tensor | None = None) -> Tensor:
    """act(x @ (weight * scale[:, None]).T + bias) for x [..., k] with at most MAX_ROWS rows (see
    can_row_gemm). int8 weights need `scale`; they are read as int8, half the bytes of fp16."""
    if (weight.dtype == torch.int8) != (scale is not None):
        raise ValueError("int8 weights need their per-row scale (and only they take one)")
    flat = as_rows(x)
    m, k = flat.shape
    n = weight.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if tiles is None:
        tiles = choose_tiles(n, k, m)
    bm = max(16, triton.next_power_of_2(m))
    blocks = triton.cdiv(n, tiles.block_n)
    partials, counters = _WORKSPACE.get(x.device, blocks * tiles.split * bm * tiles.block_n, blocks)
    k_per_split = triton.cdiv(triton.cdiv(k, tiles.split), tiles.block_k) * tiles.block_k
    _row_gemm[(blocks, tiles.split)](
        flat, weight, scale if scale is not None else weight, bias if bias is not None else weight, out,
        partials, counters, m, n, k, flat.stride(0), weight.stride(0), out.stride(0), k_per_split,
        BM=bm, BN=tiles.block_n, BK=tiles.block_k, SPLIT=tiles.split, HAS_SCALE=scale is not None,
        HAS_BIAS=bias is not None,
        GELU=gelu, LINE=line_elements(weight), num_warps=tiles.warps, num_stages=tiles.stages,
        **launch_options(x.device),
    )
    return out.reshape(*x.shape[:-1], n)


def step_linear(linear: nn.Module, x: Tensor, gelu: bool = False) -> Tensor:
    """A decode step's linear layer (optionally followed by exact GELU): row_linear where it
    applies (CUDA, half precision, <= MAX_ROWS rows, an nn.Linear or an int8 linear with a
    `weight_scale`), torch elsewhere."""
    scale = getattr(linear, "weight_scale", None)  # int8 linears only
    if (isinstance(linear, nn.Linear) or scale is not None) and can_row_gemm(x, linear.weight):
        return row_linear(x, linear.weight, linear.bias, gelu, scale=scale)
    y = linear(x)
    return F.gelu(y) if gelu else y


def reference_linear(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool = False) -> Tensor:
    """What row_linear replaces: torch's GEMM (+ GELU), for checks and benchmarks."""
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y
