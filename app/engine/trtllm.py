"""The `trtllm` backend name: reserved in the engine format, not implemented.

This project has no TensorRT-LLM backend (`build_engines.py` only writes torch engines). An
engine whose config.json names backend "trtllm" fails at load with BackendUnavailableError,
which names the command that builds a torch engine, instead of crashing.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from app.engine.config import EngineConfig
from app.errors import BackendUnavailableError


def load_trtllm_engine(engine_dir: Path, config: EngineConfig) -> None:
    try:
        importlib.import_module("tensorrt_llm")
    except Exception as exc:  # ImportError, or the stub package's own download failure
        raise BackendUnavailableError(
            f"Engine {engine_dir} needs the TensorRT-LLM backend, which is not installed here "
            f"({type(exc).__name__}: {exc}). Build a torch engine instead: python build_engines.py"
        ) from exc
    raise BackendUnavailableError(
        "The TensorRT-LLM backend is not implemented in this build; use backend 'torch'."
    )
