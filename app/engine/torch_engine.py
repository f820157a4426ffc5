"""Load an engine directory into the torch backend (CPU fp32 or CUDA fp16/bf16)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from app.engine.config import EngineConfig, build_hint, load_engine_config
from app.engine.cuda_graphs import GraphedDecoder, prompt_lengths
from app.engine.fp8_gemm import fp8_supported
from app.engine.host_copy import to_device
from app.engine.norm_fold import fold_decoder_norms
from app.engine.torch_model import (
    CrossRuns,
    DecoderCache,
    WhisperModel,
    WhisperRunner,
    enable_fp8_audio_gemms,
)
from app.errors import EngineError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(device: torch.device, compute_dtype: str | None) -> torch.dtype:
    if compute_dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if compute_dtype not in DTYPES:
        raise EngineError(f"Unknown compute dtype {compute_dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[compute_dtype]


def load_model(engine_dir: Path, config: EngineConfig, device: torch.device, dtype: torch.dtype) -> WhisperModel:
    int8 = config.quantization == "int8"
    model = WhisperModel(config.dims, int8=int8)
    try:
        state = load_file(str(engine_dir / config.weights_file), device="cpu")
    except Exception as exc:
        raise EngineError(
            f"Cannot read weights {engine_dir / config.weights_file}: {exc}. {build_hint(engine_dir)}"
        ) from exc
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise EngineError(
            f"Engine {engine_dir} does not match its config: missing {missing[:5]} unexpected "
            f"{unexpected[:5]}. {build_hint(engine_dir)}"
        )
    for name, tensor in state.items():
        if tensor.dtype != torch.int8 and tensor.shape != expected[name].shape:
            raise EngineError(
                f"Engine {engine_dir}: {name} has shape {tuple(tensor.shape)}, config implies "
                f"{tuple(expected[name].shape)}. {build_hint(engine_dir)}"
            )
        if tensor.is_floating_point():
            state[name] = tensor.to(dtype)
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()


class TorchEngine:
    """The torch backend: a WhisperModel plus preallocated per-row decoder caches."""

    def __init__(self, engine_dir: Path, config: EngineConfig, device: torch.device, dtype: torch.dtype,
                 max_rows: int, int8_cross_kv: bool = False, model: WhisperModel | None = None,
                 cpu_packed_gemm: bool = True, fp8_encoder: bool = False,
                 cuda_trimmed_context: bool = False) -> None:
        self.engine_dir = engine_dir
        self.config = config
        self.device = device
        self.dtype = dtype
        self.max_rows = max_rows
        # `model` lets benchmarks run random weights of real shapes without an engine directory
        self.model = model if model is not None else load_model(engine_dir, config, device, dtype)
        # fp8 GEMMs write the activation dtype: float16/bfloat16 (float32 keeps its own GEMMs)
        self.fp8_encoder = fp8_encoder and fp8_supported(device) and dtype in (torch.float16, torch.bfloat16)
        if self.fp8_encoder:
            enable_fp8_audio_gemms(self.model, dtype)
        elif fp8_encoder:
            log.warning("fp8 encoder GEMMs need a CUDA GPU of compute capability 8.9+ (Ada, Hopper) "
                        "and float16/bfloat16 compute; %s runs them in %s", device, dtype)
        if device.type == "cuda":
            # decode steps apply the LayerNorms inside their GEMMs (float weights; a no-op for int8)
            fold_decoder_norms(self.model.decoder)
        # Windows shorter than 30 s (a realtime partial's trimmed audio context): the CPU reads each
        # window's K/V through cross_runs, which carry its length; the GPU's decode kernel and its
        # CUDA graphs read one K/V range per row, so there each row records its own length
        # (DecoderCache.cross_len), on request: those reads then skip cuDNN's attention kernel.
        self.trims_audio_context = device.type == "cpu" or cuda_trimmed_context
        cache = DecoderCache(config.dims, max_rows, device, dtype,
                             cross_dtype=torch.int8 if int8_cross_kv else None,
                             cross_lengths=device.type != "cpu" and cuda_trimmed_context)
        self.runner = WhisperRunner(self.model, cache)
        # On the CPU a window's cross-attention K/V are stored once, in its first row, and its
        # beams read them there (decode's cross_runs); the GPU's fused decode kernel reads K/V per
        # row, so there every row of a window holds a copy.
        self.cross_in_first_row = device.type == "cpu"
        if device.type == "cpu" and cpu_packed_gemm:
            self.runner.pack_cpu_gemms()
        self.graphs: GraphedDecoder | None = None
        self.greedy_suppress: tuple[int, ...] = tuple(config.suppress_tokens)

    def enable_cuda_graphs(self, chunk_steps: int = 8, batch_buckets: tuple[int, ...] | None = None,
                           kv_buckets: tuple[int, ...] | None = None) -> None:
        """Capture decoder graphs for every (batch, kv-length) bucket. Call before serving."""
        if self.device.type != "cuda":
            return
        self.graphs = GraphedDecoder(self.runner, self.max_rows, chunk_steps,
                                     self.config.special_tokens.eot, list(self.greedy_suppress),
                                     batch_buckets=batch_buckets, kv_buckets=kv_buckets,
                                     prefill_lengths=prompt_lengths(self.config.multilingual))
        self.graphs.capture_all()

    @property
    def greedy_chunks(self) -> bool:
        return self.graphs is not None

    def greedy_chunk(self, tokens: Tensor, positions: Tensor, done: Tensor,
                     suppress: tuple[int, ...], remaining: list[int]) -> tuple[Tensor, Tensor, Tensor] | None:
        """Up to K greedy steps on the device for rows [0, B), none past any row's `remaining`
        token budget (None: not available, step instead)."""
        if self.graphs is None:
            return None
        if suppress != self.greedy_suppress:
            self.graphs.set_suppress(suppress)
            self.greedy_suppress = suppress
        # host tensors: the graphs copy them into their static inputs (no second copy, and the
        # chunk's kv bucket comes from positions without a device sync)
        return self.graphs.greedy_chunk(tokens, positions, done, remaining)

    def encode_into_rows(self, mel: Tensor, rows: list[int]) -> Tensor:
        with torch.inference_mode():
            features = self.runner.encode(mel.to(self.device, self.dtype))
        self.features_into_rows(features, rows)
        return features

    def features_into_rows(self, features: Tensor, rows: list[int]) -> None:
        with torch.inference_mode():
            self.runner.write_cross_kv(features.to(self.device, self.dtype), rows)

    def decode(self, tokens: Tensor, positions: Tensor, start: int, kv_len: int,
               uniform_position: bool = False, cross_runs: CrossRuns | None = None) -> Tensor:
        if self.graphs is not None and start == 0 and tokens.shape[1] == 1:
            out = self.graphs.step(tokens, positions, kv_len)  # copied into the graph's static inputs
            if out is not None:
                return out[:, None]
        elif self.graphs is not None and start == 0 and kv_len == tokens.shape[1]:  # a prompt prefill
            out = self.graphs.prefill(tokens, positions)
            if out is not None:
                return out
        return self.runner.decode(to_device(tokens, self.device), to_device(positions, self.device), start, kv_len,
                                  uniform_position, cross_runs)

    def copy_rows(self, src: list[int], dst: list[int], self_len: int, cross: bool = True) -> None:
        with torch.inference_mode():
            self.runner.cache.copy_rows(src, dst, self_len, cross)

    def cross_attention_weights(self, tokens: Tensor, audio_features: Tensor,
                                heads: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        return self.runner.cross_attention_weights(tokens.to(self.device), audio_features, heads)


# Decoder rows per step when not configured. CPU: 32 windows of 5 beams; a decode step there is
# GEMM-bound only from ~100 rows on, and its caches cost memory only for rows in use. CUDA: every
# row holds its own cross-attention K/V (246 MB per row for large-v3 in fp16), committed up front.
DEFAULT_MAX_ROWS = {"cpu": 160, "cuda": 32}


def load_engine(engine_dir: str | Path, *, device: str = "auto", compute_dtype: str | None = None,
                max_rows: int | None = None, int8_cross_kv: bool = False, cuda_graphs: bool = True,
                fp8_encoder: bool = False, cuda_trimmed_context: bool = False) -> TorchEngine:
    engine_dir = Path(engine_dir)
    config = load_engine_config(engine_dir)
    if config.backend == "trtllm":
        from app.engine.trtllm import load_trtllm_engine

        load_trtllm_engine(engine_dir, config)
    dev = resolve_device(device)
    dtype = resolve_dtype(dev, compute_dtype)
    max_rows = max_rows or DEFAULT_MAX_ROWS.get(dev.type, 32)
    if dev.type == "cpu" and dtype != torch.float32:
        log.warning("compute dtype %s on CPU is slow; float32 is recommended", dtype)
    engine = TorchEngine(engine_dir, config, dev, dtype, max_rows, int8_cross_kv, fp8_encoder=fp8_encoder,
                         cuda_trimmed_context=cuda_trimmed_context)
    if cuda_graphs:
        engine.enable_cuda_graphs()
    # what actually runs (an option the device cannot honour was downgraded with a warning)
    log.info("engine %s on %s: %s, %d rows, cross-K/V %s, encoder GEMMs %s, CUDA graphs %s, trimmed audio "
             "context %s", config.name, dev, str(dtype).removeprefix("torch."), max_rows,
             "int8" if int8_cross_kv else "full precision", "fp8" if engine.fp8_encoder else "full precision",
             "on" if engine.graphs is not None else "off", "on" if engine.trims_audio_context else "off")
    return engine
