"""Run a coroutine for a request and cancel it if the client goes away first.

A transcription can hold decoder slots for seconds; when nobody waits for the answer anymore,
those slots should go to other clients.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from app.errors import ShuttingDownError
from app.server.lifecycle import Lifecycle

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    # Once the body is consumed, the server's receive() blocks until the connection drops or
    # the response is sent, so this waits on an event instead of polling is_disconnected().
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; cancel it if the client disconnects first (raise ClientDisconnected), or
    if the server's shutdown grace period ends first (raise ShuttingDownError: a 503)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    lifecycle: Lifecycle | None = getattr(request.app.state, "lifecycle", None)
    stopper = asyncio.create_task(lifecycle.stopping.wait()) if lifecycle is not None else None
    waits = {task, watcher} if stopper is None else {task, watcher, stopper}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
        if stopper is not None:
            stopper.cancel()
    if not task.done():
        task.cancel()
        # Let the cancellation run to the end so the runtime has released the work.
        await asyncio.gather(task, return_exceptions=True)
        if stopper is not None and stopper.done() and not stopper.cancelled():
            raise ShuttingDownError(
                "The server shut down before the work finished; retry on another instance."
            )
        raise ClientDisconnected
    return task.result()
