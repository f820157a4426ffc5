"""How an engine runs: one frozen EngineOptions, resolved once when the engine loads.

Resolving turns what was asked for into what this machine runs: "auto" into a device, the
default dtype and row count, and every CUDA feature the GPU, the dtype or the installed Triton
cannot honour switched off (an fp8 encoder with a warning). The runner is chosen from the
resolved options (app.engine.runners.make_runner) and never probes the device again.

CudaKernels and CudaGraphOptions hold the GPU's switches, all on by default; bench/gpu_ab.py
times an engine with one of them off against the default.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

import torch

from app.engine.cuda.attention import ATTENTION_TILES, AttentionTiles
from app.engine.cuda.common import HAVE_TRITON, pdl_supported
from app.engine.cuda.fp8 import fp8_supported
from app.engine.cuda.greedy_step import CHUNKS
from app.errors import EngineError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HALF = (torch.float16, torch.bfloat16)

# Decoder rows per step when not configured. CPU: 32 windows of 5 beams; a decode step there is
# GEMM-bound only from ~100 rows on, and its caches cost memory only for rows in use. CUDA: every
# row holds its own cross-attention K/V (246 MB per row for large-v3 in fp16), committed up front.
DEFAULT_MAX_ROWS = {"cpu": 160, "cuda": 32}


@dataclass(frozen=True)
class CudaKernels:
    """The Triton kernels a CUDA engine runs in place of torch's ops. Resolved: each is on only
    where Triton, the GPU and the dtype allow it (`triton` records whether Triton is installed)."""

    triton: bool = True
    #: programmatic dependent launch (Hopper and later; WHISPER_PDL=0 turns it off)
    pdl: bool = True
    #: residual add + LayerNorm in one kernel (app.engine.cuda.norms; fp16/bf16)
    fused_norms: bool = True
    #: the encoder's input stage in two kernels, and its first LayerNorm in one (fp16/bf16)
    fused_encoder_input: bool = True
    #: decode steps' and short prefills' linears in the few-rows GEMM (app.engine.cuda.row_gemm)
    row_gemm: bool = True
    #: row GEMM tiles from choose_tiles' sweeps; off: fixed 32 x 128 tiles
    swept_tiles: bool = True
    #: decode steps with the LayerNorms and residual adds inside the row GEMMs
    #: (app.engine.runners.norm_fold); needs row_gemm and float weights
    fold_norms: bool = True
    #: fp32 logits of short inputs from half-precision weights in one kernel (fp16/bf16)
    logits_kernel: bool = True
    #: full-precision cross-attention K/V written by one kernel (int8 caches always are: fp16)
    write_kv_kernel: bool = True
    #: a prompt prefill's cross-attention reads int8 K/V in the decode-attention kernel instead of
    #: dequantising them for SDPA
    int8_prefill_kernel: bool = True
    #: the decode-attention kernel's tiles by what it reads
    attention_tiles: AttentionTiles = ATTENTION_TILES
    #: a graphed greedy step's token choice and bookkeeping in one kernel (app.engine.cuda.greedy_step)
    greedy_step_kernel: bool = True
    #: programs scanning each row's vocabulary in that kernel
    greedy_vocab_chunks: int = CHUNKS


NO_KERNELS = CudaKernels(triton=False, pdl=False, fused_norms=False, fused_encoder_input=False, row_gemm=False,
                         fold_norms=False, logits_kernel=False, write_kv_kernel=False, int8_prefill_kernel=False,
                         greedy_step_kernel=False)


@dataclass(frozen=True)
class CudaGraphOptions:
    """Decoder steps captured in CUDA graphs at load (app.engine.runners.cuda_graphs)."""

    enabled: bool = True
    #: greedy steps per replay of a chunk graph
    chunk_steps: int = 8
    #: batch and self-attention length buckets captured (None: cuda_graphs' defaults up to the rows)
    batch_buckets: tuple[int, ...] | None = None
    kv_buckets: tuple[int, ...] | None = None
    #: prompt prefills of whole batch buckets replayed too
    prefill: bool = True
    #: a window's last tokens (fewer than a chunk) through the one-step graph, so no chunk decodes
    #: past every row's token budget; off: whole chunks
    chunk_tail: bool = True


@dataclass(frozen=True)
class EngineOptions:
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    compute_dtype: str | None = None  # "float32" | "float16" | "bfloat16"; None: float16 on CUDA, float32 on CPU
    max_rows: int | None = None  # decoder rows in one step (beam rows count); None: DEFAULT_MAX_ROWS
    int8_cross_kv: bool = False  # cross-attention K/V cached in int8
    fp8_encoder: bool = False  # the encoder's and the cross-K/V projection's GEMMs in fp8 (CUDA, 8.9+)
    #: windows shorter than 30 s on a GPU (realtime partials' trimmed audio context); CPU engines
    #: always decode them
    trimmed_context: bool = False
    graphs: CudaGraphOptions = field(default_factory=CudaGraphOptions)
    kernels: CudaKernels = field(default_factory=CudaKernels)
    resolved: bool = False  # True once resolve() has run

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        assert self.compute_dtype is not None, "resolve() first"
        return DTYPES[self.compute_dtype]

    def resolve(self) -> EngineOptions:
        """These options as this machine runs them (idempotent). Raises EngineError for an
        unknown dtype."""
        if self.resolved:
            return self
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" \
            else torch.device(self.device)
        if self.compute_dtype is not None and self.compute_dtype not in DTYPES:
            raise EngineError(f"Unknown compute dtype {self.compute_dtype!r}; use one of {sorted(DTYPES)}")
        dtype_name = self.compute_dtype or ("float16" if device.type == "cuda" else "float32")
        dtype = DTYPES[dtype_name]
        if device.type == "cpu" and dtype != torch.float32:
            log.warning("compute dtype %s on CPU is slow; float32 is recommended", dtype)
        cuda = device.type == "cuda"
        # fp8 GEMMs write the activation dtype: float16/bfloat16 (float32 keeps its own GEMMs)
        fp8 = self.fp8_encoder and dtype in HALF and fp8_supported(device)
        if self.fp8_encoder and not fp8:
            log.warning("fp8 encoder GEMMs need a CUDA GPU of compute capability 8.9+ (Ada, Hopper) "
                        "and float16/bfloat16 compute; %s runs them in %s", device, dtype)
        return replace(
            self, device=str(device), compute_dtype=dtype_name,
            max_rows=self.max_rows or DEFAULT_MAX_ROWS.get(device.type, 32), fp8_encoder=fp8,
            trimmed_context=self.trimmed_context or not cuda,
            graphs=replace(self.graphs, enabled=self.graphs.enabled and cuda),
            kernels=resolve_kernels(self.kernels, device, dtype) if cuda else NO_KERNELS,
            resolved=True,
        )


def resolve_kernels(kernels: CudaKernels, device: torch.device, dtype: torch.dtype) -> CudaKernels:
    """The kernels of `kernels` that a CUDA `device` runs for activations in `dtype`."""
    triton = kernels.triton and HAVE_TRITON
    half = triton and dtype in HALF
    row_gemm = kernels.row_gemm and half
    return replace(
        kernels, triton=triton,
        pdl=kernels.pdl and triton and os.environ.get("WHISPER_PDL", "1") != "0" and pdl_supported(device),
        fused_norms=kernels.fused_norms and half, fused_encoder_input=kernels.fused_encoder_input and half,
        row_gemm=row_gemm, fold_norms=kernels.fold_norms and row_gemm, logits_kernel=kernels.logits_kernel and half,
        write_kv_kernel=kernels.write_kv_kernel and half, int8_prefill_kernel=kernels.int8_prefill_kernel and triton,
        greedy_step_kernel=kernels.greedy_step_kernel and triton,
    )
