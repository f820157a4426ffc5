"""The process's shutdown state, shared by the server (which drives it) and the API (which obeys).

SIGTERM starts the drain: `draining` is set, /ready answers 503 and new work gets 503
`shutting_down` while in-flight work goes on. When the grace period runs out, `stopping` is set:
what is still running is cancelled and answered 503.
"""

from __future__ import annotations

import asyncio


class Lifecycle:
    def __init__(self) -> None:
        self.draining = asyncio.Event()
        self.stopping = asyncio.Event()

    def begin_draining(self) -> None:
        self.draining.set()

    def stop_now(self) -> None:
        self.draining.set()
        self.stopping.set()
