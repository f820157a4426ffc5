"""A process-wide budget for decoded audio held in memory.

Each request's decoded 16 kHz samples (4 bytes each, 3.7 MiB a minute) stay in memory until
its transcript is done. Without a bound, a handful of small, highly compressed uploads of long
silences could take all the memory there is. A request takes a lease and charges it as its audio
is decoded; when the budget is spent it waits up to `wait_s` for other requests to give memory
back, then fails with AudioBudgetError (503 with Retry-After). The lease is released when the
request ends.

Decoding runs in worker threads, so the budget is guarded by a threading.Condition.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

from app.errors import AudioBudgetError


class AudioBudget:
    def __init__(self, limit_bytes: int, *, wait_s: float = 2.0) -> None:
        self.limit_bytes = limit_bytes
        self.wait_s = wait_s
        self._used = 0
        self._cond = threading.Condition()

    @property
    def used_bytes(self) -> int:
        return self._used

    def lease(self) -> AudioLease:
        return AudioLease(self)

    def _grow(self, nbytes: int) -> None:
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while self._used + nbytes > self.limit_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AudioBudgetError(
                        "The server is holding as much audio as it may "
                        f"({self.limit_bytes / 2**20:.0f} MiB); retry shortly.",
                        retry_after_s=max(1.0, self.wait_s),
                    )
                self._cond.wait(remaining)
            self._used += nbytes

    def _shrink(self, nbytes: int) -> None:
        with self._cond:
            self._used -= nbytes
            self._cond.notify_all()


class AudioLease:
    """One request's share of the budget; a context manager that gives it back on exit."""

    def __init__(self, budget: AudioBudget) -> None:
        self._budget = budget
        self.held = 0

    def hold(self, nbytes: int) -> None:
        """Make the lease cover `nbytes`: what the request holds now (more or less than before)."""
        if nbytes > self.held:
            self._budget._grow(nbytes - self.held)
        elif nbytes < self.held:
            self._budget._shrink(self.held - nbytes)
        self.held = nbytes

    def release(self) -> None:
        if self.held:
            self._budget._shrink(self.held)
            self.held = 0

    def __enter__(self) -> AudioLease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
