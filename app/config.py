"""Service settings: every knob is an environment variable prefixed with ``WHISPER_``.

Each field's `description` is its documentation: docs/configuration.md is generated from them
(`python -m app.config_docs --write`), and a test checks the page is current.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.constants import MIB, OPENAI_ALIAS

CommaList = Annotated[list[str], NoDecode]


def _split_commas(value: object) -> object:
    # Env vars hold "a,b,c"; NoDecode keeps pydantic-settings from expecting JSON.
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WHISPER_", extra="ignore", frozen=True)

    # Models
    engines_dir: Path = Field(
        Path("engines"), description="Directory holding one built engine per subdirectory."
    )
    models: CommaList = Field(
        default_factory=lambda: ["tiny.en"],
        min_length=1,
        description="Comma-separated engine names to load and serve; all load at startup.",
    )
    default_model: str | None = Field(
        None,
        description="Model used when a request names none or `whisper-1`. "
        "Unset: the first of `WHISPER_MODELS`.",
    )

    # Runtime: app.runtime.RuntimeOptions.from_settings copies these by name
    device: str = Field(
        "auto", description="`auto` (CUDA if available, else CPU), `cpu`, `cuda` or `cuda:N`."
    )
    compute_dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None,
        description="`float32`, `float16` or `bfloat16`. Unset: float16 on CUDA, float32 on CPU.",
    )
    max_batch_size: int | None = Field(
        None,
        ge=1,
        description="Decoder rows per step; beam hypotheses count as rows. "
        "Unset: 160 on CPU, 32 on CUDA.",
    )
    max_queue_windows: int = Field(
        1024,
        ge=1,
        description="30 s windows waiting or running before new requests get 503 `queue_full`.",
    )
    batch_wait_ms: float = Field(
        5.0, ge=0, description="How long an idle scheduler waits for a first batch to grow."
    )
    max_encode_batch: int = Field(
        8, ge=1, description="Windows encoded together when joining a running batch."
    )
    int8_cross_kv: bool = Field(
        False,
        description="Keep cross-attention K/V in int8: on a GPU, half the cache memory and "
        "faster decoding of large batches, at nearly the same WER (docs/performance.md).",
    )
    fp8_encoder: bool = Field(
        False,
        description="Run the encoder's and the cross-attention K/V projection's GEMMs in fp8 "
        "(e4m3) on GPUs of compute capability 8.9+ (Ada, Hopper) with float16/bfloat16 compute; "
        "ignored with a warning elsewhere. Faster large batches, more weight memory, and some "
        "transcripts change (docs/performance.md).",
    )
    cpu_threads: int = Field(
        0,
        ge=0,
        description="Torch threads of each engine's decode-loop thread (0: one per physical "
        "core); every other thread runs torch single-threaded. 1 avoids OpenMP stalls when "
        "other processes share the cores.",
    )
    cuda_graphs: bool = Field(True, description="Capture the decode step in CUDA graphs (GPU).")
    cuda_trimmed_context: bool = Field(
        False,
        description="GPU engines decode realtime partials over the turn's audio plus 5 s of "
        "padding instead of a whole 30 s window (the CPU always does): each row records its "
        "window's length and the cross-attention reads only that. Off: every partial pays a full "
        "30 s window on the GPU.",
    )
    warmup: bool = Field(True, description="Run warm-up windows before reporting ready.")

    # Default decoding options for requests (clients cannot set these through OpenAI's API)
    beam_size: int = Field(
        5, ge=1, le=16, description="Beam size at temperature 0 (1: greedy decoding)."
    )
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
    api_key: SecretStr | None = Field(
        None,
        description="If set, `/v1/*` requires `Authorization: Bearer <key>`; `/health`, "
        "`/ready` and `/metrics` stay open.",
    )
    max_upload_mb: float = Field(
        25.0, gt=0, description="Largest accepted upload, in MiB (OpenAI's limit)."
    )
    max_audio_seconds: float = Field(
        7200.0, gt=0, description="Longest accepted audio, in seconds."
    )
    cors_origins: CommaList = Field(
        default_factory=list,
        description="Comma-separated origins allowed to call the API from a browser "
        "(empty: no CORS).",
    )

    # Realtime WebSocket sessions (/v1/realtime)
    realtime_max_frame_bytes: int = Field(
        2 * 1024 * 1024,
        ge=1024,
        description="Largest WebSocket message accepted on `/v1/realtime`; bigger ones get a "
        "`message_too_large` error event.",
    )
    realtime_max_session_s: float = Field(
        3600.0,
        gt=0,
        description="Longest realtime session, in seconds, before it is closed "
        "(`session_expired`).",
    )
    realtime_max_buffer_s: float = Field(
        60.0,
        gt=0,
        description="Most audio one uncommitted buffer or open turn may hold, in seconds.",
    )
    realtime_idle_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Close a realtime session after this many seconds without a client message.",
    )
    realtime_partial_interval_s: float = Field(
        0.25,
        ge=0,
        description="Seconds of new audio between partial transcripts of an open turn; "
        "0 turns partials off.",
    )
    realtime_partial_trim_audio: bool = Field(
        True,
        description="Partial decodes encode only the open turn's audio instead of a 30 s "
        "window: several times cheaper on a CPU. Finals always use whole windows; GPU engines "
        "do so only with `WHISPER_CUDA_TRIMMED_CONTEXT`.",
    )
    realtime_max_partial_decodes: int = Field(
        16,
        ge=1,
        description="Partial decodes in flight across all realtime sessions; a session finding "
        "none free skips that tick (1-2 on a small CPU).",
    )
    realtime_max_pending_events: int = Field(
        256, ge=1, description="Events queued for a slow realtime client before it is dropped."
    )
    realtime_send_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Seconds one send to a realtime client may take before it is dropped.",
    )

    # Memory (docs/operations.md)
    audio_memory_budget_mb: float = Field(
        1024.0,
        gt=0,
        description="Decoded 16 kHz audio all requests together may hold in memory, in MiB "
        "(about 4 bytes a sample, 3.7 MiB a minute). A request that would pass it waits up to "
        "WHISPER_AUDIO_BUDGET_WAIT_S, then gets 503 with Retry-After.",
    )
    audio_budget_wait_s: float = Field(
        2.0,
        ge=0,
        description="How long a request may wait for room in WHISPER_AUDIO_MEMORY_BUDGET_MB "
        "before it is refused with 503.",
    )

    # Connections (docs/operations.md)
    http_header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A connection must send a request's complete headers within this many "
        "seconds of opening (or of its first byte, on a kept-alive connection); else it is closed.",
    )
    http_body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Seconds a request body may take beyond what WHISPER_HTTP_BODY_MIN_RATE "
        "allows for its bytes so far; a body that falls behind (or stalls this long) is cut "
        "with 408.",
    )
    http_body_min_rate: float = Field(
        1024.0,
        gt=0,
        description="Bytes per second a request body must average (after the "
        "WHISPER_HTTP_BODY_TIMEOUT_S allowance) to stay connected.",
    )
    http_keep_alive_timeout_s: float = Field(
        5.0, gt=0, description="Seconds an idle kept-alive connection stays open."
    )
    max_connections: int = Field(
        512,
        ge=1,
        description="Open HTTP connections (WebSockets included) at once; one more is answered "
        "503 with Retry-After and closed.",
    )
    realtime_max_sessions: int = Field(
        64,
        ge=1,
        description="Realtime WebSocket sessions at once; one more gets an error event and "
        "close code 1013 (try again later).",
    )

    # Shutdown (docs/operations.md). Defaults fit Kubernetes' 30 s termination grace period.
    shutdown_drain_s: float = Field(
        5.0,
        ge=0,
        description="After SIGTERM/SIGINT: seconds the listener keeps answering (new work gets "
        "503 shutting_down, /ready 503) so load balancers can move away; in-flight work goes on.",
    )
    shutdown_grace_s: float = Field(
        20.0,
        ge=0,
        description="After the drain: seconds in-flight work may still take; then what remains "
        "is cancelled (its clients get 503) and slow uploads are cut.",
    )

    # Server
    host: str = Field("127.0.0.1", description="Bind address (the Docker image sets `0.0.0.0`).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="`critical`, `error`, `warning`, `info`, `debug` or `trace`."
    )

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
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MIB)

    @property
    def audio_memory_budget_bytes(self) -> int:
        return int(self.audio_memory_budget_mb * MIB)

    def engine_dir(self, model: str) -> Path:
        return self.engines_dir / model
