"""uvicorn's HTTP and WebSocket protocols with the limits uvicorn lacks.

uvicorn bounds idle kept-alive connections but nothing else: a client may hold a connection
open for ever by never finishing its headers, or by sending a body at one byte a second, and any
number of such connections may be open. These subclasses add, per connection:

- a header deadline: complete headers within `header_timeout_s` of the connection opening (or
  of the first byte of a later request on it), else the connection is closed (408 if it sent
  anything);
- a body deadline that grows with the bytes received: `body_timeout_s + received / min_rate`
  seconds after the headers (Apache's mod_reqtimeout rule), else 408 and close. It is not
  charged while uvicorn itself has paused reading because the app is behind;
- a cap on open connections: one more is answered 503 (OpenAI's error shape) and closed;
- a bounded lingering close: after a response sent before the request body was read (the app
  marks it `Connection: close`), the write side is shut and whatever else arrives is thrown
  away, unparsed, for at most `LINGER_S`; then the socket closes.

The WebSocket protocol sends its close frame even when the client has stopped reading, and
aborts a socket whose closing handshake does not finish within `CLOSE_TIMEOUT_S`: a plain
transport.close() waits for the unread output to drain, i.e. for ever.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

#: Seconds a WebSocket close handshake may take before the socket is aborted.
CLOSE_TIMEOUT_S = 2.0
#: After answering a request whose body was not read (401, 413, 503...), how long the rest of
#: the body is read and thrown away before the socket closes. Closing at once would make the
#: kernel answer the client's next segments with a reset, which can destroy the response
#: before the client reads it; lingering a bounded time is what nginx does (lingering_close).
LINGER_S = 2.0


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    body_min_rate: float = 1024.0  # bytes per second
    max_connections: int = 512


def canned_response(
    status: int, message: str, code: str, *, retry_after: int | None = None
) -> bytes:
    """A complete HTTP/1.1 response with an OpenAI-shaped error body, closing the connection."""
    error_type = "server_error" if status >= 500 else "invalid_request_error"
    body = json.dumps(
        {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    ).encode()
    headers = [
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"connection: close",
    ]
    if retry_after is not None:
        headers.append(b"retry-after: %d" % retry_after)
    return STATUS_LINE[status] + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


TOO_MANY_CONNECTIONS = canned_response(
    503, "The server has too many open connections; retry shortly.", "server_busy", retry_after=1
)
HEADER_TIMEOUT = canned_response(408, "The request headers took too long to arrive.", "timeout")
BODY_TIMEOUT = canned_response(408, "The request body arrived too slowly.", "timeout")
SHUTTING_DOWN = canned_response(
    503, "The server is shutting down; retry on another instance.", "shutting_down", retry_after=1
)


class LimitedHttpProtocol(HttpToolsProtocol):
    """httptools protocol with header/body deadlines and a connection cap (see module doc)."""

    limits: ConnectionLimits = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_started = self._body_checked = 0.0
        self._body_received = 0
        self._bytes_seen = False
        self._lingering = False

    # -- connection -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio gives stream protocols a Transport, which uvicorn's protocol is typed for
        super().connection_made(cast(asyncio.Transport, transport))
        if len(self.connections) > self.limits.max_connections:
            self.logger.warning(
                "Refusing a connection: %d open (WHISPER_MAX_CONNECTIONS)",
                len(self.connections) - 1,
            )
            self._close_with(TOO_MANY_CONNECTIONS)
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # the rest of a refused request: thrown away unparsed
        if data:
            self._bytes_seen = True
        super().data_received(data)

    def handle_websocket_upgrade(self) -> None:
        self._cancel_timers()  # the WebSocket protocol has its own idle/ping rules
        super().handle_websocket_upgrade()

    # -- request phases ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:  # a later request on a kept-alive connection
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()
        if self.cycle is not None and not isinstance(self.cycle.transport, _LingeringTransport):
            # a proxy: every attribute but close() is the transport's own
            self.cycle.transport = cast(asyncio.Transport, _LingeringTransport(self.transport, self))
        if self.cycle is not None and self.cycle.more_body and self._has_body():
            self._body_started = self._body_checked = self.loop.time()
            self._body_received = 0
            self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._check_body)

    def on_body(self, body: bytes) -> None:
        self._body_received += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._cancel_body_timer()
        self._bytes_seen = False
        super().on_message_complete()

    def _has_body(self) -> bool:
        for name, value in self.headers:
            if name == b"content-length":
                return value.strip() not in (b"0", b"")
            if name == b"transfer-encoding":
                return True
        return False

    # -- deadlines ----------------------------------------------------------------------------
    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_late)

    def _header_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._bytes_seen:
            self.logger.info("Closing a connection: request headers took too long")
            self._close_with(HEADER_TIMEOUT)
        else:
            self.transport.close()  # silent since it opened: nothing to answer

    def _check_body(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.cycle is None or not self.cycle.more_body:
            return
        now = self.loop.time()
        if self.flow.read_paused:
            # uvicorn stopped reading because the app is behind, not the client: don't charge it.
            self._body_started += now - self._body_checked
        self._body_checked = now
        limits = self.limits
        deadline = (
            self._body_started + limits.body_timeout_s + self._body_received / limits.body_min_rate
        )
        if now < deadline:
            wait = min(deadline - now, 1.0) if self.flow.read_paused else deadline - now
            self._body_timer = self.loop.call_later(wait, self._check_body)
            return
        self.logger.info(
            "Closing a connection: request body too slow (%d bytes in %.0f s)",
            self._body_received,
            now - self._body_started,
        )
        self.cut(BODY_TIMEOUT)

    # -- closing ------------------------------------------------------------------------------
    def cut(self, response: bytes = SHUTTING_DOWN, linger_s: float = LINGER_S) -> None:
        """End the connection now: answer `response` if nothing was answered yet, then close.

        The app, if it is still reading the body, sees the client disconnect.
        """
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if not cycle.response_started:
                self.transport.write(response)
            cycle.disconnected = True
            cycle.message_event.set()
        elif cycle is None and self._bytes_seen:
            self.transport.write(response)
        self.linger_then_close(linger_s)

    def _close_with(self, response: bytes) -> None:
        self.transport.write(response)
        self.linger_then_close()

    def linger_then_close(self, linger_s: float = LINGER_S) -> None:
        """Shut the write side now, discard what still arrives, close after `linger_s`."""
        self._cancel_timers()
        transport = self.transport
        if transport.is_closing() or self._lingering:
            return
        if not transport.can_write_eof():
            transport.close()
            return
        self._lingering = True
        transport.write_eof()
        self.flow.resume_reading()
        self.loop.call_later(linger_s, transport.close)

    def close_after_response(self) -> None:
        """The app's response is out and the connection is not kept alive."""
        if self.cycle is not None and self.cycle.more_body:
            self.linger_then_close()  # the client may still be sending the body
        else:
            self.transport.close()

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()

    @property
    def in_request(self) -> bool:
        """A request is being received or answered on this connection."""
        return self.cycle is not None and not self.cycle.response_complete

    @property
    def receiving_body(self) -> bool:
        return self.in_request and bool(self.cycle.more_body)


class _LingeringTransport:
    """The transport as uvicorn's request cycle sees it: its close() lingers (see module doc)."""

    def __init__(self, transport: asyncio.Transport, protocol: LimitedHttpProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def close(self) -> None:
        self._protocol.close_after_response()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class ClosingWebSocketProtocol(WebSocketsSansIOProtocol):
    """WebSocket protocol whose close always reaches the wire and always ends the socket.

    uvicorn's own `shutdown()` (called when the listener closes at the end of the drain)
    would close every session at once; sessions are instead closed by the app with 1012 when
    the drain starts (app.api.realtime), and by `force_close()` when the grace period ends.
    """

    async def send(self, message: Any) -> None:
        closing = (
            message["type"] == "websocket.close"
            and self.handshake_complete
            and self.initial_response is None
            and not self.close_sent
            and not self.disconnected
        )
        if closing:
            # Don't wait for a client that stopped reading to drain its buffer: the close frame
            # goes behind the unread data, and the socket is aborted if it is not answered.
            self.writable.set()
        await super().send(message)
        if closing and self.close_sent:
            if self.close_timer is not None:
                self.close_timer.cancel()
            self.close_timer = self.loop.call_later(CLOSE_TIMEOUT_S, self._abort)

    def _abort(self) -> None:
        self.close_timer = None
        self.transport.abort()

    def shutdown(self) -> None:
        if not self.handshake_complete:
            super().shutdown()  # mid-handshake: nothing the app could close yet

    def force_close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Close with 1012 (service restart) now; abort if still open after `timeout_s`."""
        if self.transport.is_closing():
            return
        self.writable.set()
        super().shutdown()
        self.loop.call_later(timeout_s, self.transport.abort)


def http_protocol(limits: ConnectionLimits) -> type[LimitedHttpProtocol]:
    """A LimitedHttpProtocol class bound to `limits` (uvicorn instantiates it per connection)."""
    return type("LimitedHttpProtocol", (LimitedHttpProtocol,), {"limits": limits})
