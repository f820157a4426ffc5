"""Faults inside the engine: a failing step fails only its windows; running out of device memory
halves the batch and retries before failing anything.

The fault-injection seam is the decode loop the scheduler drives: `tests.fakes.FakeLoop` stands in
for DecodeLoop and raises, from admit() or step(), what a CUDA engine would (torch.cuda's
OutOfMemoryError exists in CPU builds of torch too), so the recovery runs on the CPU.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator

import pytest
import torch

from app.decoding.options import WindowOptions
from app.decoding.window import WindowTask
from app.errors import EngineStepError
from app.scheduler.scheduler import Scheduler, is_out_of_memory
from tests.fakes import NO_WAIT, FakeLoop

GREEDY = WindowOptions(beam_size=1, max_new_tokens=4)
POISON = 99  # a window labelled so makes the fault fire whenever it is in the batch


def labelled(label: int) -> WindowTask:
    return WindowTask(torch.zeros(1), GREEDY, [label])


def label(task: WindowTask) -> int:
    return task.previous_tokens[0]


@pytest.fixture
def schedulers() -> Iterator[list[Scheduler]]:
    started: list[Scheduler] = []
    yield started
    for scheduler in started:
        scheduler.stop(timeout=10)


def run(loop: FakeLoop, labels: dict[str, list[int]], started: list[Scheduler]) -> dict:
    scheduler = Scheduler(loop, model_name="test", options=NO_WAIT)
    tickets = {
        n: scheduler.submit_nowait(labelled(n), request)
        for request, ns in labels.items()
        for n in ns
    }
    started.append(scheduler)
    scheduler.start()
    concurrent.futures.wait([t.future for t in tickets.values()], timeout=10)
    outcome: dict[int, object] = {}
    for n, ticket in tickets.items():
        assert ticket.future.done(), f"window {n} never finished"
        error = ticket.future.exception()
        outcome[n] = error if error is not None else ticket.future.result().tokens[0]
    return outcome


def test_out_of_memory_halves_the_batch_and_every_window_succeeds(
    schedulers: list[Scheduler],
) -> None:
    def fits_two(phase: str, tasks: list[WindowTask]) -> None:
        if len(tasks) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    loop = FakeLoop(fault=fits_two)
    outcome = run(loop, {"a": [1, 2, 3], "b": [4, 5], "c": [6]}, schedulers)
    assert outcome == {n: n for n in range(1, 7)}  # nothing failed
    assert loop.most_active <= 2


def test_a_window_out_of_memory_alone_fails_and_the_rest_go_on(
    schedulers: list[Scheduler],
) -> None:
    def poison(phase: str, tasks: list[WindowTask]) -> None:
        if any(label(t) == POISON for t in tasks):
            raise RuntimeError("CUDA error: out of memory")

    outcome = run(FakeLoop(fault=poison), {"a": [1, POISON, 2], "b": [3, 4]}, schedulers)
    assert isinstance(outcome.pop(POISON), EngineStepError)
    assert outcome == {1: 1, 2: 2, 3: 3, 4: 4}


def test_a_failing_step_fails_only_its_windows(schedulers: list[Scheduler]) -> None:
    """A bug (not memory) in a step: the windows in that step fail; queued ones still run."""
    failed_once = False

    def one_bad_step(phase: str, tasks: list[WindowTask]) -> None:
        nonlocal failed_once
        if phase == "step" and not failed_once:
            failed_once = True
            raise IndexError("index 7 is out of bounds for dimension 0 with size 4")

    loop = FakeLoop(rows=2, fault=one_bad_step)
    outcome = run(loop, {"a": [1, 2], "b": [3, 4]}, schedulers)
    failed = {n for n, o in outcome.items() if isinstance(o, EngineStepError)}
    assert failed == {1, 3}  # the first step held one window of each request
    assert {n: o for n, o in outcome.items() if n not in failed} == {2: 2, 4: 4}
    error = outcome[1]
    assert isinstance(error, EngineStepError) and isinstance(error.__cause__, IndexError)
    assert error.status_code == 500 and "server had an error" in error.message


def test_is_out_of_memory() -> None:
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


async def test_an_engine_failure_reaches_the_client_as_an_openai_500(make_client) -> None:
    from conftest import FakeRuntime, assert_openai_error, make_wav

    failure = EngineStepError()
    failure.__cause__ = RuntimeError("kernel launch failed")
    client = await make_client({"tiny.en": FakeRuntime(error=failure)})
    response = await client.post(
        "/v1/audio/transcriptions", files={"file": ("a.wav", make_wav(0.5), "audio/wav")}
    )
    assert_openai_error(response, 500, code="engine_error", error_type="server_error")
