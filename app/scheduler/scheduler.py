"""The batching scheduler: one queue of windows from every client, one engine thread.

Clients `await submit(task)`. The engine thread admits waiting windows into the running decode
loop between steps (in-flight batching), round-robin across requests so a 2-hour upload cannot
starve a 5-second clip, and resolves each window's future when it finishes. Inference never runs
on the event loop. The queue is bounded: beyond `max_queue_windows` submit() raises QueueFullError.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from app import metrics
from app.decoding.search import rows_needed
from app.decoding.window import WindowResult, WindowTask
from app.engine.cpu.threads import become_engine_thread
from app.errors import EngineStepError, QueueFullError, ShuttingDownError
from app.scheduler.rows import RowPlan

log = logging.getLogger(__name__)

#: Successful steps after which a memory cap set by an out-of-memory error is doubled.
ROW_LIMIT_RECOVERY_STEPS = 50


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA (or other device) allocator failure, as opposed to a bug."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


@dataclass(frozen=True, kw_only=True)
class SchedulerOptions:
    """How the scheduler queues and batches windows (WHISPER_* settings of the same names).

    app.runtime.RuntimeOptions extends this class, so the runtime hands the scheduler its own
    options object and no field is copied from one to the other.
    """

    #: admission bound: windows queued beyond it make submit() raise QueueFullError
    max_queue_windows: int = 1024
    #: how long the idle scheduler waits for a first batch to grow
    batch_wait_ms: float = 5.0
    #: windows encoded together when joining a running batch
    max_encode_batch: int = 8
    #: the engine thread's torch intra-op threads (0: torch's default, one per physical core;
    #: None: leave the thread as it is)
    cpu_threads: int | None = None


class WindowLoop(Protocol):
    """What the scheduler drives: app.scheduler.decode_loop.DecodeLoop (tests: a double).

    Called on the engine thread only. The scheduler places windows on a plan() and admit()
    puts them where the plan did; it withdraws a cancelled window with cancel().
    """

    @property
    def active(self) -> Sequence[object]: ...
    @property
    def rows(self) -> int: ...
    def rows_in_use(self) -> int: ...
    def plan(self) -> RowPlan: ...
    def admit(self, tasks: list[WindowTask], plan: RowPlan | None = None
              ) -> list[tuple[WindowTask, WindowResult]]: ...
    def step(self) -> list[tuple[WindowTask, WindowResult]]: ...
    def cancel(self, task: WindowTask) -> None: ...
    def reset(self) -> None: ...


@dataclass(eq=False)
class Ticket:
    """The scheduler's handle on one submitted window."""

    task: WindowTask
    request_id: object
    future: Future[WindowResult] = field(default_factory=Future)
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)


class Scheduler:
    def __init__(self, loop: WindowLoop, *, model_name: str,
                 options: SchedulerOptions = SchedulerOptions()) -> None:
        self.decode_loop = loop
        self.model_name = model_name
        self.options = options
        self.engine_threads: int | None = None  # the count in effect on the engine thread, once started
        self._queues: OrderedDict[object, deque[Ticket]] = OrderedDict()
        self._queued = 0
        self._jobs: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = True
        self._in_flight: dict[int, Ticket] = {}
        #: cancelled tickets that had left the queue: the engine thread withdraws their windows
        self._withdrawn: list[Ticket] = []
        self._rows_fraction = 0.0  # decoder rows in use / rows, as of the last step
        #: rows the loop may use at once after running out of device memory (None: all)
        self._row_limit: int | None = None
        self._ok_steps = 0

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"engine-{self.model_name}", daemon=True)
            self._thread.start()

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    def stop(self, timeout: float | None = None) -> None:
        """Finish every accepted window, then stop the engine thread."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ---- client side --------------------------------------------------------------------------
    def queue_depth(self) -> int:
        return self._queued

    def active_rows(self) -> int:
        return self.decode_loop.rows_in_use()

    async def submit(self, task: WindowTask, request_id: object) -> WindowResult:
        ticket = self.submit_nowait(task, request_id)
        try:
            return await asyncio.wrap_future(ticket.future)
        except asyncio.CancelledError:
            self.cancel(ticket)
            raise

    def submit_nowait(self, task: WindowTask, request_id: object) -> Ticket:
        ticket = Ticket(task, request_id)
        with self._cond:
            if not self._accepting:
                raise ShuttingDownError("The server is shutting down; retry on another instance.",
                                        retry_after_s=5.0)
            if self._queued >= self.options.max_queue_windows:
                raise QueueFullError(
                    f"The server is at capacity ({self._queued} windows queued); retry shortly.",
                    retry_after_s=max(1.0, self._queued * 0.05),
                )
            self._queues.setdefault(request_id, deque()).append(ticket)
            self._queued += 1
            self._publish_queue()
            self._cond.notify_all()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Withdraw a window whose client went away: from the queue now, from the decode loop
        (its rows freed) before the engine thread's next step."""
        with self._cond:
            ticket.cancelled = True
            queue = self._queues.get(ticket.request_id)
            if queue is not None and ticket in queue:
                queue.remove(ticket)
                self._queued -= 1
                if not queue:
                    del self._queues[ticket.request_id]
                self._publish_queue()
            else:
                self._withdrawn.append(ticket)
                self._cond.notify_all()

    def run_in_engine_thread(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run fn on the engine thread between steps (alignment passes, warm-up)."""
        future: Future[Any] = Future()
        with self._cond:
            self._jobs.append((fn, future))
            self._cond.notify_all()
        return future

    # ---- load signals (app.metrics; what autoscalers read) -----------------------------------
    def _publish_queue(self) -> None:
        metrics.QUEUE_DEPTH.labels(self.model_name).set(self._queued)
        self._publish_saturation()

    def _publish_rows(self, rows: int) -> None:
        metrics.ACTIVE_SLOTS.labels(self.model_name).set(rows)
        self._rows_fraction = rows / max(1, self.decode_loop.rows)
        self._publish_saturation()

    def _publish_saturation(self) -> None:
        queue_fraction = min(1.0, self._queued / self.options.max_queue_windows)
        metrics.SATURATION.labels(self.model_name).set(max(self._rows_fraction, queue_fraction))

    # ---- engine thread ----------------------------------------------------------------------
    def _take_round_robin(self) -> tuple[list[Ticket], RowPlan]:
        """Pop windows that fit, one per request per round, oldest request first; the plan
        holds where each goes (admit() puts them there)."""
        taken: list[Ticket] = []
        taken_rows = 0
        loop = self.decode_loop
        plan = loop.plan()
        while self._queues and len(taken) < self.options.max_encode_batch:
            progressed = False
            for request_id in list(self._queues):
                queue = self._queues[request_id]
                ticket = queue[0]
                need = rows_needed(ticket.task.options)
                if need > plan.rows:
                    # can never fit: fail this window alone, keep serving the others
                    queue.popleft()
                    self._queued -= 1
                    if not queue:
                        del self._queues[request_id]
                    ticket.future.set_exception(ValueError(
                        f"a window needs {need} decoder rows but the engine has {plan.rows}; "
                        "lower beam_size/best_of or raise WHISPER_MAX_BATCH_SIZE"))
                    progressed = True
                    continue
                limit = self._row_limit
                over = limit is not None and loop.rows_in_use() + taken_rows + need > limit
                if (over and (taken or loop.active)) or plan.place(ticket.task) is None:
                    continue  # (over the cap, a window still runs alone: progress is kept)
                taken_rows += need
                queue.popleft()
                self._queued -= 1
                # rotate: this request goes to the back of the line
                self._queues.move_to_end(request_id)
                if not queue:
                    del self._queues[request_id]
                taken.append(ticket)
                progressed = True
                if len(taken) >= self.options.max_encode_batch:
                    break
            if not progressed:
                break
        self._publish_queue()
        return taken, plan

    def _run(self) -> None:
        if self.options.cpu_threads is not None:
            self.engine_threads = become_engine_thread(self.options.cpu_threads)
        loop = self.decode_loop
        while True:
            with self._cond:
                while not (self._queued or self._jobs or self._withdrawn or loop.active
                           or self._stopping):
                    self._cond.wait()
                if self._stopping and not (self._queued or self._jobs or loop.active):
                    return
                jobs = list(self._jobs)
                self._jobs.clear()
            for fn, future in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:  # noqa: BLE001 - delivered to the waiting caller
                        future.set_exception(exc)
            if not loop.active and self.options.batch_wait_ms > 0 and self._queued:
                # idle: let a first batch gather for a moment
                time.sleep(self.options.batch_wait_ms / 1000.0)
            with self._cond:
                tickets, plan = self._take_round_robin()
                withdrawn, self._withdrawn = self._withdrawn, []
            try:
                self._admit_and_step(tickets, plan, withdrawn)
            except BaseException as exc:  # noqa: BLE001 - fail the affected windows, keep serving
                if is_out_of_memory(exc) and self._shrink_after_oom(tickets):
                    continue
                log.exception("decode step failed; failing the windows in it")
                failure = EngineStepError()
                failure.__cause__ = exc
                self._fail_all(tickets, failure)
            else:
                self._recover_rows()

    def _admit_and_step(self, tickets: list[Ticket], plan: RowPlan, withdrawn: list[Ticket]) -> None:
        loop = self.decode_loop
        done: list[tuple[WindowTask, WindowResult]] = []
        live = [t for t in tickets if not t.cancelled]
        for t in live:
            self._in_flight[id(t.task)] = t
        if live:
            started = time.perf_counter()
            done += loop.admit([t.task for t in live], plan)
            metrics.ENCODE_SECONDS.labels(self.model_name).observe(time.perf_counter() - started)
            metrics.ENCODE_BATCH_SIZE.labels(self.model_name).observe(len(live))
        # Withdrawn after admit(): freeing rows compacts the span, which would move running
        # windows into rows the plan has given to the windows just admitted.
        for t in withdrawn:
            if self._in_flight.pop(id(t.task), None) is not None:
                loop.cancel(t.task)
        if loop.active:
            rows = loop.rows_in_use()
            started = time.perf_counter()
            done += loop.step()
            metrics.DECODE_STEP_SECONDS.labels(self.model_name).observe(time.perf_counter() - started)
            metrics.BATCH_SIZE.labels(self.model_name).observe(rows)
            metrics.TOKENS.labels(self.model_name).inc(rows)
        self._publish_rows(loop.rows_in_use())
        for task, result in done:
            ticket = self._in_flight.pop(id(task), None)
            metrics.WINDOWS.labels(self.model_name).inc()
            if ticket is not None and not ticket.future.done():
                ticket.future.set_result(result)

    def _fail_all(self, tickets: list[Ticket], exc: BaseException) -> None:
        for t in self._reset_loop(tickets):
            if not t.future.done():
                t.future.set_exception(exc)

    def _reset_loop(self, tickets: list[Ticket]) -> list[Ticket]:
        """Empty the decode loop; return every window that was in it or on its way in."""
        windows = list(self._in_flight.values())
        windows += [t for t in tickets if t not in windows]
        self._in_flight.clear()
        self.decode_loop.reset()
        return windows

    # ---- out of device memory ------------------------------------------------------------------
    def _shrink_after_oom(self, tickets: list[Ticket]) -> bool:
        """Halve the rows in use and put the step's windows back in line (a lone window fails).

        The windows restart from their first token (their work so far is lost, their results
        are the same), at most half as many rows at a time. The cap is lifted step by step
        once steps succeed again (_recover_rows).
        """
        windows = [t for t in self._reset_loop(tickets) if not t.future.done()]
        rows = sum(rows_needed(t.task.options) for t in windows if not t.cancelled)
        if len([t for t in windows if not t.cancelled]) <= 1:
            failure = EngineStepError()
            log.error("out of device memory with a single window of %d rows; failing it", rows)
            for t in windows:
                t.future.set_exception(failure)
            self._release_device_memory()
            return True
        self._row_limit = max(1, rows // 2)
        self._ok_steps = 0
        log.warning(
            "out of device memory with %d windows (%d rows): retrying at most %d rows at a time",
            len(windows),
            rows,
            self._row_limit,
        )
        with self._cond:
            for t in reversed(windows):
                if t.cancelled:
                    continue
                self._queues.setdefault(t.request_id, deque()).appendleft(t)
                self._queues.move_to_end(t.request_id, last=False)
                self._queued += 1
            metrics.QUEUE_DEPTH.labels(self.model_name).set(self._queued)
        self._release_device_memory()
        return True

    @staticmethod
    def _release_device_memory() -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _recover_rows(self) -> None:
        if self._row_limit is None:
            return
        self._ok_steps += 1
        if self._ok_steps >= ROW_LIMIT_RECOVERY_STEPS:
            self._ok_steps = 0
            self._row_limit *= 2
            if self._row_limit >= self.decode_loop.rows:
                self._row_limit = None
                log.info("device memory cap lifted")
