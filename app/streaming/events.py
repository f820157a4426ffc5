"""OpenAI Realtime transcription events: what clients send and what the server answers.

Client events are parsed leniently (unknown fields are ignored, as OpenAI does) but every
field we act on is validated; anything wrong becomes a `ProtocolError`, which the session
turns into an `error` event instead of dropping the connection.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


def new_id(prefix: str) -> str:
    """OpenAI-style ids: `event_…`, `item_…`, `sess_…`."""
    return f"{prefix}_{secrets.token_hex(10)}"


class ProtocolError(Exception):
    """A client event we cannot act on; reported to the client as an `error` event."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "invalid_value",
        param: str | None = None,
        error_type: str = "invalid_request_error",
        event_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.error_type = error_type
        self.event_id = event_id


# --- client events -------------------------------------------------------------------------


class ClientEvent(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    type: str
    event_id: str | None = None


class SessionUpdate(ClientEvent):
    session: dict[str, Any]


class AudioAppend(ClientEvent):
    audio: str


#: The client events a transcription session understands, by their `type`.
CLIENT_EVENTS: dict[str, type[ClientEvent]] = {
    "session.update": SessionUpdate,
    "transcription_session.update": SessionUpdate,
    "input_audio_buffer.append": AudioAppend,
    "input_audio_buffer.commit": ClientEvent,
    "input_audio_buffer.clear": ClientEvent,
}


def parse_client_event(data: str | bytes) -> ClientEvent:
    """One WebSocket message -> a validated client event, or ProtocolError."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"The message is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise ProtocolError("An event must be a JSON object.", code="invalid_json")
    event_id = raw.get("event_id") if isinstance(raw.get("event_id"), str) else None
    kind = raw.get("type")
    if not isinstance(kind, str) or not kind:
        raise ProtocolError(
            "The event has no 'type'.",
            code="missing_required_parameter",
            param="type",
            event_id=event_id,
        )
    model = CLIENT_EVENTS.get(kind)
    if model is None:
        supported = ", ".join(f"'{name}'" for name in CLIENT_EVENTS)
        raise ProtocolError(
            f"Invalid value: '{kind[:64]}'. Supported values are: {supported}.",
            param="type",
            event_id=event_id,
        )
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        code = "missing_required_parameter" if error["type"] == "missing" else "invalid_value"
        raise ProtocolError(
            f"Invalid '{param}' in '{kind}': {error['msg']}",
            code=code,
            param=param,
            event_id=event_id,
        ) from None


# --- server events -------------------------------------------------------------------------


class ServerEvent(BaseModel):
    event_id: str = Field(default_factory=lambda: new_id("event"))
    type: str


class ErrorDetail(BaseModel):
    type: str
    code: str | None
    message: str
    param: str | None = None
    event_id: str | None = None

    @classmethod
    def from_protocol(cls, exc: ProtocolError) -> ErrorDetail:
        return cls(
            type=exc.error_type,
            code=exc.code,
            message=exc.message,
            param=exc.param,
            event_id=exc.event_id,
        )


class ErrorEvent(ServerEvent):
    type: Literal["error"] = "error"
    error: ErrorDetail


class SessionEvent(ServerEvent):
    """session.created / session.updated, or their transcription_session.* names."""

    session: dict[str, Any]


class SpeechStarted(ServerEvent):
    type: Literal["input_audio_buffer.speech_started"] = "input_audio_buffer.speech_started"
    audio_start_ms: int
    item_id: str


class SpeechStopped(ServerEvent):
    type: Literal["input_audio_buffer.speech_stopped"] = "input_audio_buffer.speech_stopped"
    audio_end_ms: int
    item_id: str


class Committed(ServerEvent):
    type: Literal["input_audio_buffer.committed"] = "input_audio_buffer.committed"
    item_id: str
    previous_item_id: str | None


class Cleared(ServerEvent):
    type: Literal["input_audio_buffer.cleared"] = "input_audio_buffer.cleared"


class ItemCreated(ServerEvent):
    type: Literal["conversation.item.created"] = "conversation.item.created"
    previous_item_id: str | None
    item: dict[str, Any]

    @classmethod
    def user_audio(cls, item_id: str, previous_item_id: str | None) -> ItemCreated:
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        return cls(previous_item_id=previous_item_id, item=item)


class TranscriptionDelta(ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.delta"] = (
        "conversation.item.input_audio_transcription.delta"
    )
    item_id: str
    content_index: int = 0
    delta: str


class TranscriptionCompleted(ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.completed"] = (
        "conversation.item.input_audio_transcription.completed"
    )
    item_id: str
    content_index: int = 0
    transcript: str
    usage: dict[str, Any]


class TranscriptionFailed(ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.failed"] = (
        "conversation.item.input_audio_transcription.failed"
    )
    item_id: str
    content_index: int = 0
    error: ErrorDetail
