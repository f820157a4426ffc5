"""GET /v1/realtime?intent=transcription: OpenAI Realtime-compatible streaming transcription.

This module owns the WebSocket: authentication, the per-message size limit, the idle and
session-length timers and the bounded outgoing queue. What the events mean is the business
of app.streaming.session.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, WebSocket
from starlette.datastructures import State

from app import metrics
from app.api.errors import error_response
from app.api.forms import TranscriptionForm, build_transcribe_options
from app.api.registry import ModelRegistry, Phase
from app.config import Settings
from app.decoding.options import TranscribeOptions
from app.server.lifecycle import Lifecycle
from app.streaming.budget import PartialBudget
from app.streaming.events import ErrorDetail, ErrorEvent, ProtocolError
from app.streaming.options import ModelResolver
from app.streaming.outbox import Outbox, SlowClientError
from app.streaming.session import TranscriptionSession

if TYPE_CHECKING:  # app.runtime imports torch, which must not load with the API modules
    from app.runtime import Runtime

log = logging.getLogger(__name__)

router = APIRouter(tags=["realtime"])

#: Browsers cannot set headers on a WebSocket, so OpenAI's browser clients send the key as
#: this subprotocol; it must never be echoed back as the accepted protocol.
KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
#: How long queued events (a last error, say) may take to leave before the socket closes.
DRAIN_TIMEOUT_S = 2.0
#: RFC 6455 close codes.
POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011
#: "Service restart": this replica is draining; reconnect (the load balancer picks another).
SERVICE_RESTART = 1012
#: "Try again later": the session cap (WHISPER_REALTIME_MAX_SESSIONS) is reached.
TRY_AGAIN_LATER = 1013


@dataclass(frozen=True)
class Close:
    code: int
    reason: str
    drain: bool = True  # send what is queued first (not for a client that stopped reading)


def presented_key(websocket: WebSocket) -> str | None:
    """The API key from `Authorization: Bearer`, the key subprotocol, or `?api_key=`."""
    scheme, _, token = websocket.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for protocol in websocket.scope.get("subprotocols", []):
        if protocol.startswith(KEY_SUBPROTOCOL_PREFIX):
            return protocol[len(KEY_SUBPROTOCOL_PREFIX) :]
    return websocket.query_params.get("api_key") or None


def is_authorized(websocket: WebSocket, settings: Settings) -> bool:
    """The REST rule (app.api.auth): open unless WHISPER_API_KEY is set."""
    if settings.api_key is None:
        return True
    key = presented_key(websocket)
    # Constant-time comparison, as for REST, so timing does not leak the key.
    return key is not None and hmac.compare_digest(
        key.encode(), settings.api_key.get_secret_value().encode()
    )


def choose_subprotocol(offered: list[str]) -> str | None:
    # A browser fails the handshake unless the server echoes one of the protocols it offered.
    if "realtime" in offered:
        return "realtime"
    return next((p for p in offered if not p.startswith(KEY_SUBPROTOCOL_PREFIX)), None)


async def _deny(
    websocket: WebSocket, status: int, message: str, error_type: str, code: str
) -> None:
    """Refuse the handshake with an HTTP status and OpenAI's error body."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    response = error_response(status, message, error_type, code=code, headers=headers)
    try:
        await websocket.send_denial_response(response)
    except RuntimeError:  # the server lacks the denial extension: a plain close (HTTP 403)
        await websocket.close(code=POLICY_VIOLATION, reason=message[:120])


def _partial_budget(state: State, settings: Settings) -> PartialBudget:
    """The app's one partial budget, made on first use (shared by all its sessions)."""
    budget: PartialBudget | None = getattr(state, "realtime_partial_budget", None)
    if budget is None:
        budget = state.realtime_partial_budget = PartialBudget(
            settings.realtime_max_partial_decodes
        )
    return budget


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket) -> None:
    settings: Settings = websocket.app.state.settings
    registry: ModelRegistry = websocket.app.state.registry
    if not is_authorized(websocket, settings):
        await _deny(
            websocket,
            401,
            "Incorrect or missing API key.",
            "invalid_request_error",
            "invalid_api_key",
        )
        return
    intent = websocket.query_params.get("intent")
    if intent not in (None, "transcription"):
        await _deny(
            websocket,
            400,
            "Only transcription sessions are supported: use ?intent=transcription.",
            "invalid_request_error",
            "invalid_value",
        )
        return
    if registry.phase is not Phase.READY:
        await _deny(
            websocket,
            503,
            f"The service is {registry.phase.value}; retry shortly.",
            "server_error",
            "shutting_down",
        )
        return

    await websocket.accept(subprotocol=choose_subprotocol(websocket.scope.get("subprotocols", [])))
    state = websocket.app.state
    active = getattr(state, "realtime_sessions", 0)
    if active >= settings.realtime_max_sessions:
        await _refuse_busy(websocket, settings.realtime_max_sessions)
        return
    state.realtime_sessions = active + 1
    try:
        await _run_session(websocket, settings, registry)
    finally:
        state.realtime_sessions -= 1


async def _refuse_busy(websocket: WebSocket, limit: int) -> None:
    """The session cap is reached: one error event, then close 1013 (try again later)."""
    metrics.ERRORS.labels(type="server_busy").inc()
    event = ErrorEvent(
        error=ErrorDetail(
            type="server_error",
            code="server_busy",
            message=f"The server is serving its maximum of {limit} realtime sessions; "
            "retry shortly.",
        )
    )
    with contextlib.suppress(Exception):
        await asyncio.wait_for(websocket.send_text(event.model_dump_json()), DRAIN_TIMEOUT_S)
        await asyncio.wait_for(websocket.close(TRY_AGAIN_LATER, "server busy"), DRAIN_TIMEOUT_S)


def _upload_decoding(registry: ModelRegistry, settings: Settings) -> ModelResolver:
    """A session's finals are decoded as uploads are: the same model lookup, the same options."""

    def resolve(
        *, model: str | None, language: str | None, prompt: str | None
    ) -> tuple[Runtime, TranscribeOptions]:
        served = registry.resolve(model)
        form = TranscriptionForm(language=language, prompt=prompt)
        options = build_transcribe_options(form, task="transcribe", model=served, settings=settings)
        return served.runtime, options

    return resolve


async def _run_session(websocket: WebSocket, settings: Settings, registry: ModelRegistry) -> None:
    outbox = Outbox(
        websocket.send_text,
        max_pending=settings.realtime_max_pending_events,
        send_timeout_s=settings.realtime_send_timeout_s,
    )
    session = TranscriptionSession(
        resolve=_upload_decoding(registry, settings),
        settings=settings,
        emit=outbox.put,
        budget=_partial_budget(websocket.app.state, settings),
        legacy="realtime=v1" in websocket.headers.get("openai-beta", ""),
        model=websocket.query_params.get("model"),
    )
    sender = asyncio.create_task(outbox.run())
    metrics.WEBSOCKET_SESSIONS.inc()
    close: Close | None = Close(INTERNAL_ERROR, "internal error")
    try:
        session.start()
        lifecycle: Lifecycle = websocket.app.state.lifecycle
        close = await _serve(websocket, session, outbox, settings, lifecycle)
    except Exception:
        log.exception("realtime session %s failed", session.id)
        session.error(
            ProtocolError(
                "The server had an error while processing your request.",
                code="server_error",
                error_type="server_error",
            )
        )
    finally:
        # Cancel this session's decodes first: a client that left must not hold slots.
        await session.aclose()
        if close is not None and close.drain:
            await outbox.finish(sender, DRAIN_TIMEOUT_S)
        else:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        if close is not None:
            # It may be gone already, or not reading: then the server drops the socket.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(websocket.close(close.code, close.reason), DRAIN_TIMEOUT_S)
        metrics.WEBSOCKET_SESSIONS.dec()


async def _serve(
    websocket: WebSocket,
    session: TranscriptionSession,
    outbox: Outbox,
    settings: Settings,
    lifecycle: Lifecycle,
) -> Close | None:
    """Feed client messages to the session until a limit is hit (Close) or the client leaves.

    When the server starts draining, the session is closed with 1012 (service restart) as soon
    as the transcripts of its committed turns are sent, so its client reconnects elsewhere.
    """
    loop = asyncio.get_running_loop()
    session_deadline = loop.time() + settings.realtime_max_session_s
    draining = asyncio.ensure_future(lifecycle.draining.wait())
    try:
        while True:
            close = await _next_message(
                websocket, session, outbox, settings, session_deadline, draining
            )
            if close is not _CONTINUE:
                return close
    finally:
        draining.cancel()


_CONTINUE = Close(0, "")


async def _next_message(
    websocket: WebSocket,
    session: TranscriptionSession,
    outbox: Outbox,
    settings: Settings,
    session_deadline: float,
    draining: asyncio.Future[object],
) -> Close | None:
    loop = asyncio.get_running_loop()
    if draining.done() and not session.awaiting_finals:
        return Close(SERVICE_RESTART, "service restart")
    now = loop.time()
    deadline = min(now + settings.realtime_idle_timeout_s, session_deadline)
    if draining.done():
        deadline = min(deadline, now + 0.1)  # poll until the pending transcripts are out
    receive = asyncio.ensure_future(websocket.receive())
    waits: set[asyncio.Future[Any]] = {receive, outbox.failed}
    if not draining.done():
        waits.add(draining)
    done, _ = await asyncio.wait(
        waits, timeout=max(0.0, deadline - now), return_when=asyncio.FIRST_COMPLETED
    )
    if outbox.failed.done():
        # Checked before any message that arrived meanwhile: a client flooding us while not
        # reading always has one waiting, and must still be dropped now.
        if not receive.done():
            receive.cancel()
        await asyncio.gather(receive, return_exceptions=True)
        failure = outbox.failed.result()
        if isinstance(failure, SlowClientError):
            log.warning("realtime session %s dropped: %s", session.id, failure)
            return Close(POLICY_VIOLATION, str(failure)[:120], drain=False)
        return None  # the socket broke under the sender
    if receive not in done:
        receive.cancel()
        await asyncio.gather(receive, return_exceptions=True)
        if draining.done():
            return _CONTINUE  # closed with 1012 once its pending transcripts are out
        if loop.time() >= session_deadline:
            limit = settings.realtime_max_session_s
            session.error(
                ProtocolError(
                    f"Your session hit the maximum duration of {limit:g} seconds.",
                    code="session_expired",
                )
            )
            return Close(POLICY_VIOLATION, "session expired")
        if session.awaiting_finals:
            return _CONTINUE  # a client waiting for its transcripts is not idle
        session.error(
            ProtocolError(
                f"No message for {settings.realtime_idle_timeout_s:g} seconds; closing the idle session.",
                code="idle_timeout",
            )
        )
        return Close(POLICY_VIOLATION, "idle timeout")
    message = receive.result()
    if message["type"] == "websocket.disconnect":
        return None
    data: str | bytes | None = message.get("text")
    if data is None:
        data = message.get("bytes")
    if data is None:
        return _CONTINUE
    size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8"))
    if size > settings.realtime_max_frame_bytes:
        session.error(
            ProtocolError(
                f"The message is {size} bytes; the limit is "
                f"{settings.realtime_max_frame_bytes} bytes per message. "
                "Send audio in smaller appends.",
                code="message_too_large",
            )
        )
        return _CONTINUE
    session.handle(data, time.perf_counter())
    return _CONTINUE
