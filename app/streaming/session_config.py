"""A transcription session's configuration: parsing `session.update`, rendering the session.

OpenAI has two shapes for the same settings and clients in the field send both:

- current (`session.update`, GA): ``session.audio.input.{format, transcription, turn_detection}``
  with ``format = {"type": "audio/pcm", "rate": 24000}``;
- older (`transcription_session.update`, beta): flat ``input_audio_format: "pcm16"``,
  ``input_audio_transcription`` and ``turn_detection``.

Both are accepted in either event. Updates merge: a field that is absent keeps its value,
`turn_detection: null` turns server VAD off (the client commits turns itself).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.constants import OPENAI_ALIAS
from app.streaming.events import ProtocolError

#: Sample rates accepted for PCM16 input: OpenAI's 24 kHz, and Whisper's own 16 kHz.
SUPPORTED_RATES: tuple[int, ...] = (24000, 16000)
DEFAULT_RATE = 24000


@dataclass(frozen=True)
class ServerVad:
    """OpenAI `server_vad` turn detection (defaults are OpenAI's)."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500


@dataclass(frozen=True)
class SessionConfig:
    sample_rate: int = DEFAULT_RATE
    model: str = OPENAI_ALIAS  # as the client named it; resolved by the model registry
    language: str | None = None
    prompt: str | None = None
    #: None: no turn detection; the client commits the buffer itself.
    turn_detection: ServerVad | None = field(default_factory=ServerVad)


# --- validation of the pieces --------------------------------------------------------------


class _Lenient(BaseModel):
    # OpenAI fields we do not implement (create_response, noise_reduction, delay ...) are
    # accepted and ignored so that clients written for OpenAI work unchanged.
    model_config = ConfigDict(extra="ignore")


class _Format(_Lenient):
    type: str = "audio/pcm"
    rate: int = DEFAULT_RATE


class _Transcription(_Lenient):
    model: str | None = None
    language: str | None = None
    prompt: str | None = None


class _TurnDetection(_Lenient):
    type: Literal["server_vad"]
    threshold: float = Field(ServerVad.threshold, ge=0.0, le=1.0)
    prefix_padding_ms: int = Field(ServerVad.prefix_padding_ms, ge=0, le=10_000)
    silence_duration_ms: int = Field(ServerVad.silence_duration_ms, ge=20, le=10_000)


def _validate(model: type[BaseModel], value: object, param: str) -> Any:
    if not isinstance(value, dict):
        raise ProtocolError(f"'{param}' must be an object.", param=param)
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join([param, *(str(p) for p in error["loc"])])
        raise ProtocolError(f"Invalid '{where}': {error['msg']}", param=where) from None


def _format_rate(value: object, param: str) -> int:
    """A format (legacy string or {type, rate} object) -> the PCM16 sample rate."""
    if isinstance(value, str):
        # Legacy names: "pcm16" is 24 kHz mono little-endian PCM16; the G.711 ones are not
        # supported (Whisper wants linear PCM and nobody has asked for them).
        if value == "pcm16":
            return DEFAULT_RATE
        raise ProtocolError(
            f"Unsupported input audio format '{value}'; use 'pcm16' (24 kHz PCM16 mono).",
            param=param,
        )
    fmt: _Format = _validate(_Format, value, param)
    if fmt.type not in ("audio/pcm", "pcm16"):
        raise ProtocolError(
            f"Unsupported input audio format '{fmt.type}'; use 'audio/pcm' (PCM16 mono).",
            param=f"{param}.type",
        )
    if fmt.rate not in SUPPORTED_RATES:
        rates = " or ".join(str(r) for r in SUPPORTED_RATES)
        raise ProtocolError(
            f"Unsupported sample rate {fmt.rate}; use {rates}.", param=f"{param}.rate"
        )
    return fmt.rate


def _turn_detection(value: object, param: str) -> ServerVad | None:
    if value is None:
        return None
    if isinstance(value, dict) and value.get("type") != "server_vad":
        raise ProtocolError(
            f"Unsupported turn detection type {value.get('type')!r}; use 'server_vad' or null.",
            param=f"{param}.type",
        )
    vad: _TurnDetection = _validate(_TurnDetection, value, param)
    return ServerVad(vad.threshold, vad.prefix_padding_ms, vad.silence_duration_ms)


def _transcription(config: SessionConfig, value: object, param: str) -> SessionConfig:
    if value is None:
        # "Turn transcription off" makes no sense for a transcription session: back to defaults.
        return replace(config, model=SessionConfig.model, language=None, prompt=None)
    parsed: _Transcription = _validate(_Transcription, value, param)
    fields = parsed.model_fields_set
    return replace(
        config,
        model=(parsed.model or SessionConfig.model) if "model" in fields else config.model,
        language=(parsed.language or None) if "language" in fields else config.language,
        prompt=(parsed.prompt or None) if "prompt" in fields else config.prompt,
    )


def apply_update(config: SessionConfig, session: dict[str, Any]) -> SessionConfig:
    """The configuration after a `session.update` / `transcription_session.update`."""
    kind = session.get("type")
    if kind is not None and kind != "transcription":
        raise ProtocolError(
            f"Only transcription sessions are supported; got session type {kind!r}.",
            param="session.type",
        )
    # Older flat fields.
    if "input_audio_format" in session:
        config = replace(
            config,
            sample_rate=_format_rate(session["input_audio_format"], "session.input_audio_format"),
        )
    if "input_audio_transcription" in session:
        config = _transcription(
            config, session["input_audio_transcription"], "session.input_audio_transcription"
        )
    if "turn_detection" in session:
        config = replace(
            config,
            turn_detection=_turn_detection(session["turn_detection"], "session.turn_detection"),
        )
    # Current nested fields.
    audio = session.get("audio")
    if audio is None:
        return config
    if not isinstance(audio, dict) or not isinstance(audio.get("input", {}), dict):
        raise ProtocolError("'session.audio.input' must be an object.", param="session.audio")
    audio_input = audio.get("input") or {}
    prefix = "session.audio.input"
    if "format" in audio_input:
        config = replace(
            config, sample_rate=_format_rate(audio_input["format"], f"{prefix}.format")
        )
    if "transcription" in audio_input:
        config = _transcription(config, audio_input["transcription"], f"{prefix}.transcription")
    if "turn_detection" in audio_input:
        config = replace(
            config,
            turn_detection=_turn_detection(
                audio_input["turn_detection"], f"{prefix}.turn_detection"
            ),
        )
    return config


# --- rendering -----------------------------------------------------------------------------


def _render_turn_detection(vad: ServerVad | None) -> dict[str, Any] | None:
    if vad is None:
        return None
    return {
        "type": "server_vad",
        "threshold": vad.threshold,
        "prefix_padding_ms": vad.prefix_padding_ms,
        "silence_duration_ms": vad.silence_duration_ms,
    }


def render_session(
    config: SessionConfig, session_id: str, expires_at: float, *, legacy: bool
) -> dict[str, Any]:
    """The session object of session.created/updated, in the shape the client speaks."""
    transcription = {
        "model": config.model,
        "language": config.language,
        "prompt": config.prompt or "",
    }
    common = {
        "id": session_id,
        "object": "realtime.transcription_session",
        "expires_at": int(expires_at or time.time()),
        "include": [],
    }
    if legacy:
        audio_format: object = (
            "pcm16"
            if config.sample_rate == DEFAULT_RATE
            else {"type": "audio/pcm", "rate": config.sample_rate}
        )
        return {
            **common,
            "modalities": ["text"],
            "input_audio_format": audio_format,
            "input_audio_transcription": transcription,
            "turn_detection": _render_turn_detection(config.turn_detection),
            "input_audio_noise_reduction": None,
        }
    return {
        "type": "transcription",
        **common,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": config.sample_rate},
                "transcription": transcription,
                "turn_detection": _render_turn_detection(config.turn_detection),
                "noise_reduction": None,
            }
        },
    }
