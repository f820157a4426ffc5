"""Load an engine directory into the torch backend (CPU fp32 or CUDA fp16/bf16).

The only place besides build_engines.py that knows the engine files: load_engine reads the config
and the weights, resolves EngineOptions and hands the model to the runner they choose
(app.engine.runners).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from app.engine.cache import CrossRuns
from app.engine.config import EngineConfig, build_hint, load_engine_config
from app.engine.model import WhisperModel
from app.engine.options import EngineOptions
from app.engine.runners import make_runner
from app.errors import EngineError

log = logging.getLogger(__name__)


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
    """The torch backend (app.engine.base.Engine): a WhisperModel run by the runner its options
    chose, with preallocated per-row decoder caches."""

    def __init__(self, config: EngineConfig, model: WhisperModel, options: EngineOptions,
                 engine_dir: Path = Path(".")) -> None:
        """`model` on the options' device and dtype; tests and benchmarks pass random weights of
        real shapes without an engine directory."""
        self.options = options = options.resolve()
        assert options.max_rows is not None
        self.engine_dir = engine_dir
        self.config = config
        self.device = options.torch_device
        self.dtype = options.torch_dtype
        self.max_rows: int = options.max_rows
        self.model = model
        self.runner = make_runner(model, config, options)
        self.cross_in_first_row = self.runner.cross_in_first_row
        self.trims_audio_context = self.runner.trims_audio_context

    @property
    def greedy_chunks(self) -> bool:
        return self.runner.greedy_chunks

    def greedy_chunk(self, tokens: Tensor, positions: Tensor, done: Tensor,
                     suppress: tuple[int, ...], remaining: list[int]) -> tuple[Tensor, Tensor, Tensor] | None:
        """Up to K greedy steps on the device for rows [0, B), none past any row's `remaining`
        token budget (None: not available, step instead)."""
        return self.runner.greedy_chunk(tokens, positions, done, suppress, remaining)

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
        return self.runner.decode(tokens, positions, start, kv_len, uniform_position, cross_runs)

    def copy_rows(self, src: list[int], dst: list[int], self_len: int, cross: bool = True) -> None:
        self.runner.copy_rows(src, dst, self_len, cross)

    def cross_attention_weights(self, tokens: Tensor, audio_features: Tensor,
                                heads: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        return self.runner.cross_attention_weights(tokens.to(self.device), audio_features, heads)


def load_engine(engine_dir: str | Path, options: EngineOptions | None = None) -> TorchEngine:
    """Load an engine directory (raises app.errors.EngineError with a build hint)."""
    engine_dir = Path(engine_dir)
    config = load_engine_config(engine_dir)
    if config.backend == "trtllm":
        from app.engine.trtllm import load_trtllm_engine

        load_trtllm_engine(engine_dir, config)
    options = (options or EngineOptions()).resolve()
    engine = TorchEngine(config, load_model(engine_dir, config, options.torch_device, options.torch_dtype), options,
                         engine_dir)
    # what actually runs (an option the device cannot honour was downgraded with a warning)
    log.info("engine %s on %s: %s, %d rows, cross-K/V %s, encoder GEMMs %s, CUDA graphs %s, trimmed audio "
             "context %s", config.name, options.device, options.compute_dtype, engine.max_rows,
             "int8" if options.int8_cross_kv else "full precision", "fp8" if options.fp8_encoder else "full precision",
             "on" if engine.greedy_chunks else "off", "on" if engine.trims_audio_context else "off")
    return engine
