"""Service settings: every knob is an environment variable prefixed with ``WHISPER_``.

Each field is documented in README.md's settings table; keep the two in step.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:  # app.runtime may import torch; settings must stay light
    from app.decoding.options import VadOptions
    from app.runtime import RuntimeOptions

#: OpenAI's model name; clients written for OpenAI send it, so it names our default model.
OPENAI_ALIAS = "whisper-1"

CommaList = Annotated[list[str], NoDecode]


def _split_commas(value: object) -> object:
    # Env vars hold "a,b,c"; NoDecode keeps pydantic-settings from expecting JSON.
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WHISPER_", extra="ignore", frozen=True)

    # Models
    engines_dir: Path = Path("engines")
    models: CommaList = Field(default_factory=lambda: ["tiny.en"], min_length=1)
    default_model: str | None = None

    # Runtime (mapped onto app.runtime.RuntimeOptions)
    device: str = "auto"
    compute_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    max_batch_size: int | None = Field(None, ge=1)  # None: 160 on CPU, 32 on CUDA
    max_queue_windows: int = Field(1024, ge=1)
    batch_wait_ms: float = Field(5.0, ge=0)
    max_encode_batch: int = Field(8, ge=1)
    int8_cross_kv: bool = False
    #: the encoder's and the cross-attention K/V's GEMMs in fp8 (GPUs of compute capability 8.9+)
    fp8_encoder: bool = False
    #: torch intra-op threads on the CPU (0: torch's default, one per core)
    cpu_threads: int = Field(0, ge=0)
    cuda_graphs: bool = True
    warmup: bool = True

    # Default decoding options for requests (clients cannot set these through OpenAI's API)
    beam_size: int = Field(5, ge=1, le=16)
    vad_long_form: bool = Field(
        False,
        description="Long files (over 30 s) are cut at pauses into <= 30 s chunks that are "
        "decoded together, instead of openai-whisper's sequential timestamp seeking (see "
        "docs/vad.md for the measured trade-off).",
    )

    # Speech gating with Silero VAD (docs/vad.md)
    vad: bool = Field(
        True,
        description="Decode only the speech Silero VAD finds: audio without speech returns no "
        "text without reaching the model, and silences inside a file are skipped (timestamps "
        "still refer to the original audio). Applies to uploads, streaming and realtime turns.",
    )
    vad_threshold: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Silero speech probability at or above which a 32 ms frame is speech; "
        "speech continues until frames fall below this minus 0.15.",
    )
    vad_min_speech_ms: int = Field(
        250, ge=0, description="Speech regions shorter than this are dropped as clicks."
    )
    vad_min_silence_ms: int = Field(
        2000,
        ge=0,
        description="A pause this long ends a speech region; shorter pauses are decoded "
        "with the speech around them.",
    )
    vad_speech_pad_ms: int = Field(
        400,
        ge=0,
        description="Audio kept on each side of a speech region (faster-whisper's "
        "speech_pad_ms), so the first and last words are not clipped.",
    )

    # Limits and access
    api_key: SecretStr | None = None
    max_upload_mb: float = Field(25.0, gt=0)
    max_audio_seconds: float = Field(7200.0, gt=0)
    cors_origins: CommaList = Field(default_factory=list)

    # Realtime WebSocket sessions (/v1/realtime)
    realtime_max_frame_bytes: int = Field(2 * 1024 * 1024, ge=1024)
    realtime_max_session_s: float = Field(3600.0, gt=0)
    realtime_max_buffer_s: float = Field(60.0, gt=0)
    realtime_idle_timeout_s: float = Field(60.0, gt=0)
    realtime_partial_interval_s: float = Field(0.25, ge=0)  # 0 turns partial transcripts off
    realtime_partial_trim_audio: bool = True  # partials encode only the turn's audio (CPU engines)
    realtime_max_partial_decodes: int = Field(16, ge=1)  # in flight, all sessions together
    realtime_max_pending_events: int = Field(256, ge=1)
    realtime_send_timeout_s: float = Field(10.0, gt=0)

    # Server
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"

    @field_validator("models", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        # WHISPER_API_KEY="" (common in compose files) means "no auth", not "the empty key".
        return None if value == "" else value

    @model_validator(mode="after")
    def _check_models(self) -> Settings:
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"WHISPER_MODELS lists a model twice: {self.models}")
        if OPENAI_ALIAS in self.models:
            raise ValueError(f"{OPENAI_ALIAS!r} is reserved as the alias of the default model")
        if self.default_model is not None and self.default_model not in self.models:
            raise ValueError(
                f"WHISPER_DEFAULT_MODEL={self.default_model!r} is not in WHISPER_MODELS={self.models}"
            )
        return self

    @property
    def default_model_name(self) -> str:
        return self.default_model or self.models[0]

    @property
    def vad_options(self) -> VadOptions | None:
        """Speech gating for requests, or None with WHISPER_VAD=false."""
        from app.decoding.options import VadOptions

        if not self.vad:
            return None
        return VadOptions(
            threshold=self.vad_threshold,
            min_speech_ms=self.vad_min_speech_ms,
            min_silence_ms=self.vad_min_silence_ms,
            speech_pad_ms=self.vad_speech_pad_ms,
        )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def runtime_options(self) -> RuntimeOptions:
        from app.runtime import RuntimeOptions

        return RuntimeOptions(
            device=self.device,
            compute_dtype=self.compute_dtype,
            max_batch_size=self.max_batch_size,
            max_queue_windows=self.max_queue_windows,
            batch_wait_ms=self.batch_wait_ms,
            max_encode_batch=self.max_encode_batch,
            int8_cross_kv=self.int8_cross_kv,
            fp8_encoder=self.fp8_encoder,
            cpu_threads=self.cpu_threads,
            cuda_graphs=self.cuda_graphs,
            warmup=self.warmup,
        )

    def engine_dir(self, model: str) -> Path:
        return self.engines_dir / model
