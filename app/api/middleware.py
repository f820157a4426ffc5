"""Pure ASGI middleware recording request counts and latency per endpoint and status.

Pure ASGI rather than BaseHTTPMiddleware: it must not buffer or wrap the request body, which
the upload reader streams, nor the receive channel, which the disconnect watcher listens to.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import REQUEST_LATENCY, REQUESTS

#: Label for paths no route matched, so scanners cannot blow up the label cardinality.
UNMATCHED = "unmatched"


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app raises before sending anything, the client sees a 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            # The router stores the matched route in the (shared) scope: label by its template,
            # e.g. /v1/models/{model_id}, never by the raw path.
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or UNMATCHED
            labels = {"endpoint": endpoint, "status": str(status)}
            REQUESTS.labels(**labels).inc()
            REQUEST_LATENCY.labels(**labels).observe(time.perf_counter() - started)


class CloseUnreadBodyMiddleware:
    """Close the connection after a response sent before the request body was read to its end.

    A request refused early (401, 413, 503) would otherwise leave the server reading and
    discarding the rest of its body, up to gigabytes, to find the next request on a kept-alive
    connection. `Connection: close` makes the server close it right after the response.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        body_read = False

        async def receive_and_track() -> Message:
            nonlocal body_read
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_read = True
            return message

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_read:
                headers = [*message.get("headers", []), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive_and_track, send_closing)


def _has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            return value.strip() not in (b"", b"0")
        if name == b"transfer-encoding":
            return True
    return False
