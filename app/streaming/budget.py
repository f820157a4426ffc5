"""A process-wide cap on partial decodes in flight, shared by every realtime session.

Each session keeps at most one partial decode in flight, but a thousand sessions would
still flood the engine with work nobody strictly needs. Partials are best effort: a session
that finds the budget spent skips that tick (its next append tries again), so finals and
uploads never queue behind more than `limit` partial windows.
"""

from __future__ import annotations


class PartialBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def try_acquire(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
