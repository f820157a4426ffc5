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
