"""TensorRT-LLM backend: same Engine interface, not runnable here.

TensorRT and TensorRT-LLM wheels on the package registry we can reach are stubs that download
from an unreachable host, so this backend cannot be installed in this environment. The class
exists so an engine config with backend "trtllm" fails with a clear message instead of a crash.
"""

from __future__ import annotations

from pathlib import Path

from app.engine.config import EngineConfig
from app.errors import BackendUnavailableError


def load_trtllm_engine(engine_dir: Path, config: EngineConfig) -> None:
    try:
        import tensorrt_llm  # type: ignore[import-not-found]  # noqa: F401
    except Exception as exc:  # ImportError, or the stub package's own download failure
        raise BackendUnavailableError(
            f"Engine {engine_dir} needs the TensorRT-LLM backend, which is not installed here "
            f"({type(exc).__name__}: {exc}). Build a torch engine instead: python build_engines.py"
        ) from exc
    raise BackendUnavailableError(
        "The TensorRT-LLM backend is not implemented in this build; use backend 'torch'."
    )
