"""Server events on their way to one WebSocket client, through a bounded queue.

The session never awaits the socket: it puts events here and one sender task writes them in
order. A client that stops reading fills the queue (or stalls a single send past a time
limit) and is dropped instead of making the server buffer without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from app import metrics
from app.streaming.events import ServerEvent, TranscriptionDelta

SendText = Callable[[str], Awaitable[None]]


class SlowClientError(Exception):
    """The client is not reading its events fast enough."""


class Outbox:
    def __init__(self, send_text: SendText, *, max_pending: int, send_timeout_s: float) -> None:
        self._send_text = send_text
        self._send_timeout_s = send_timeout_s
        self._queue: asyncio.Queue[tuple[ServerEvent, float | None] | None] = asyncio.Queue(
            maxsize=max_pending
        )
        #: Resolved with the reason when the client must be dropped (too slow, socket gone).
        self.failed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    def put(self, event: ServerEvent, latency_from: float | None = None) -> None:
        """Queue an event; `latency_from` (perf_counter) marks a partial to time on sending."""
        if self.failed.done():
            return
        try:
            self._queue.put_nowait((event, latency_from))
        except asyncio.QueueFull:
            self._fail(SlowClientError(f"client too slow: {self._queue.maxsize} events unread"))

    def _fail(self, exc: BaseException) -> None:
        if not self.failed.done():
            self.failed.set_result(exc)

    async def run(self) -> None:
        """The sender task: write queued events in order until `finish()` or a failure."""
        while True:
            item = await self._queue.get()
            if item is None:
                return
            event, latency_from = item
            try:
                await asyncio.wait_for(
                    self._send_text(event.model_dump_json()), timeout=self._send_timeout_s
                )
            except TimeoutError:
                self._fail(
                    SlowClientError(f"client too slow: a send took over {self._send_timeout_s:g} s")
                )
                return
            except Exception as exc:  # the socket is gone; the receive side will notice too
                self._fail(exc)
                return
            if latency_from is not None and isinstance(event, TranscriptionDelta):
                metrics.PARTIAL_LATENCY.observe(time.perf_counter() - latency_from)

    async def finish(self, sender: asyncio.Task[None], timeout_s: float) -> None:
        """Let the sender write what is queued (bounded by `timeout_s`), then stop it."""
        if not self.failed.done() and not self._queue.full():
            self._queue.put_nowait(None)
            # A sender that fails or times out has already recorded why in `failed`.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(sender), timeout=timeout_s)
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
