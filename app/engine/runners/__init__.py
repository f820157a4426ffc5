"""How a loaded WhisperModel runs: the reference runner (torch's operators, any device; the CPU's
with oneDNN-packed GEMMs) and the CUDA runner (kernels, CUDA graphs, folded steps, fp8 encoder).
make_runner picks one from resolved EngineOptions, once, when the engine loads."""

from __future__ import annotations

import torch

from app.engine.cache import DecoderCache
from app.engine.config import EngineConfig
from app.engine.cpu.ops import CpuOps
from app.engine.model import TORCH_OPS, WhisperModel
from app.engine.options import EngineOptions
from app.engine.runners.cuda import CudaRunner
from app.engine.runners.cuda_graphs import prompt_lengths
from app.engine.runners.reference import ReferenceRunner


def make_runner(model: WhisperModel, config: EngineConfig, options: EngineOptions) -> ReferenceRunner:
    """The runner for `model` (on the options' device and dtype) and its DecoderCache."""
    assert options.resolved and options.max_rows is not None, "resolve() the options first"
    device, dtype = options.torch_device, options.torch_dtype
    cuda = device.type == "cuda"
    cache = DecoderCache(model.dims, options.max_rows, device, dtype,
                         cross_dtype=torch.int8 if options.int8_cross_kv else None,
                         cross_lengths=cuda and options.trimmed_context)
    if cuda:
        return CudaRunner(model, cache, options, eot=config.special_tokens.eot,
                          suppress_ids=tuple(config.suppress_tokens), prompt_lengths=prompt_lengths(config.multilingual))
    return ReferenceRunner(model, cache, CpuOps.for_model(model, dtype) if device.type == "cpu" else TORCH_OPS)
