"""uvicorn.Server that owns SIGTERM/SIGINT and shuts down in three stages.

uvicorn on its own closes the listener the moment a signal arrives (new clients get
"connection refused" while the load balancer still sends them here), waits for connections
without a bound unless told otherwise, and re-raises the signal at the end (exit status 143).
Here a signal starts:

1. the drain (`drain_s`): the listener still answers; /ready and new work get 503
   `shutting_down` with Retry-After; realtime sessions are closed with 1012 (service restart)
   once their pending transcripts are sent; in-flight requests go on;
2. the grace period (`grace_s`): the listener is closed, in-flight requests may finish;
3. the hard stop, just before the grace period ends: what still runs is cancelled and
   answered 503, slow uploads are cut, the remaining sockets are closed; the engines stop
   and the process exits with status 0, within drain + grace of the signal.

A second SIGINT (Ctrl+C twice) skips to the end, as in uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from types import FrameType
from typing import cast

import uvicorn

from app.server import memory
from app.server.protocols import ClosingWebSocketProtocol, LimitedHttpProtocol

log = logging.getLogger("whisper_serve")

#: The hard stop comes this long before the grace period ends, so that the 503s are written,
#: the sockets closed and the engines stopped within drain + grace.
HARD_STOP_MARGIN_S = 1.5
#: uvicorn ticks every 0.1 s: give freed heap memory back to the OS every 30 s (under steady
#: load, requests free their memory in worker threads' arenas, which glibc keeps otherwise).
TRIM_EVERY_TICKS = 300
#: How long cut connections linger (and WebSockets wait for their close) at the hard stop.
HARD_STOP_LINGER_S = 0.5


class DrainingServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        *,
        drain_s: float,
        grace_s: float,
        on_drain: Callable[[], None],
        on_hard_stop: Callable[[], None],
    ) -> None:
        # uvicorn cancels what is left when the grace period ends. It annotates the period as
        # int but hands it to asyncio.timeout(), which takes fractions of a second as well.
        config.timeout_graceful_shutdown = cast(int, max(0.1, grace_s))
        super().__init__(config)
        self.drain_s = drain_s
        self.grace_s = grace_s
        self._on_drain = on_drain
        self._on_hard_stop = on_hard_stop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_deadline: float | None = None

    async def startup(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it on exit (status 143).
        if self._drain_deadline is not None or self._loop is None or not self.started:
            if sig == signal.SIGINT and self.should_exit:
                self.force_exit = True
            self.should_exit = True
            return
        # A signal handler runs between two bytecodes of whatever the loop was doing: hand the
        # work to the loop instead of touching its objects from here.
        self._drain_deadline = self._loop.time() + self.drain_s
        self._loop.call_soon_threadsafe(self._begin_drain, sig)

    def _begin_drain(self, sig: int) -> None:
        log.info(
            "%s: draining for %g s (new work gets 503), then up to %g s for in-flight work",
            signal.Signals(sig).name,
            self.drain_s,
            self.grace_s,
        )
        self._on_drain()

    async def on_tick(self, counter: int) -> bool:
        if (
            self._drain_deadline is not None
            and asyncio.get_running_loop().time() >= self._drain_deadline
        ):
            self.should_exit = True
        if counter and counter % TRIM_EVERY_TICKS == 0:
            await asyncio.to_thread(memory.trim)
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list | None = None) -> None:
        hard_stop = asyncio.get_running_loop().call_later(
            max(0.0, self.grace_s - HARD_STOP_MARGIN_S), self._hard_stop
        )
        try:
            await super().shutdown(sockets=sockets)
        finally:
            hard_stop.cancel()

    def _hard_stop(self) -> None:
        busy = len(self.server_state.tasks)
        log.warning("Grace period over: cancelling %d request(s) still running", busy)
        self._on_hard_stop()
        for connection in list(self.server_state.connections):
            if isinstance(connection, LimitedHttpProtocol):
                if connection.receiving_body or not connection.in_request:
                    connection.cut(linger_s=HARD_STOP_LINGER_S)
                # else: the app answers 503 as its work is cancelled (on_hard_stop)
            elif isinstance(connection, ClosingWebSocketProtocol):
                connection.force_close(HARD_STOP_LINGER_S)
