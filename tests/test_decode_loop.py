"""The in-flight batching decode loop, the row-cached runner and the scheduler, on a random tiny model.

The reference for "correct" is the same window decoded alone in a fresh loop (itself checked
against a full, uncached decoder pass): batching, joining mid-flight, compaction and cancellation
must never change a window's tokens.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import math
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pytest
import torch
from fakes import (
    SPECIAL,
    random_engine,
    random_mel,
    random_model,
    tiny_config,
    tiny_dims,
    torch_threads,
)

from app import metrics
from app.decoding.options import WindowOptions
from app.decoding.rules import RowRules, apply_rules
from app.decoding.search import make_search, rows_needed
from app.decoding.tokenizer import WhisperTokenizer
from app.decoding.window import WindowResult, WindowTask
from app.engine.greedy import (
    GreedyChunkState,
    chunk_length,
    greedy_step_reference,
    run_greedy_steps,
)
from app.engine.model import WhisperModel
from app.engine.torch_engine import TorchEngine
from app.errors import QueueFullError, ShuttingDownError
from app.scheduler.decode_loop import DecodeLoop
from app.scheduler.scheduler import Scheduler, SchedulerOptions, Ticket
from tests.fakes import NO_WAIT, FakeLoop

AUDIO_CTX = 250  # encoder positions; the mel has twice as many frames
FRAMES = 2 * AUDIO_CTX
CONFIG = tiny_config(dims=tiny_dims(n_audio_ctx=AUDIO_CTX))
TOKENIZER = WhisperTokenizer(None, SPECIAL, multilingual=False)  # type: ignore[arg-type]

GREEDY = WindowOptions(beam_size=1, max_new_tokens=8)
GREEDY_NO_TS = WindowOptions(beam_size=1, without_timestamps=True, max_new_tokens=8)
BEAM = WindowOptions(beam_size=3, max_new_tokens=8)


@dataclass(frozen=True)
class Spec:
    """A window to decode: audio seed, options, previous text (the prompt's length varies)."""

    seed: int
    options: WindowOptions = GREEDY
    previous: tuple[int, ...] = ()

    def task(self, keep_features: bool = False) -> WindowTask:
        return WindowTask(random_mel(self.seed, frames=FRAMES), self.options, list(self.previous),
                          keep_audio_features=keep_features)


def tokens(n: int, start: int = 400) -> tuple[int, ...]:
    return tuple(range(start, start + n))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model() -> WhisperModel:
    return random_model(0, CONFIG.dims)


@pytest.fixture(scope="module")
def engine(model: WhisperModel) -> TorchEngine:
    return random_engine(model, max_rows=16, config=CONFIG)


def drain(loop: DecodeLoop, done: list[tuple[WindowTask, WindowResult]] | None = None,
          max_steps: int = 500) -> dict[int, WindowResult]:
    """Step until no window is active; results by id(task)."""
    done = list(done or [])
    for _ in range(max_steps):
        if not loop.active:
            return {id(task): result for task, result in done}
        done += loop.step()
    raise AssertionError("decode loop did not finish")


class Alone:
    """Each spec decoded alone in a fresh loop (cached: many tests compare against the same)."""

    def __init__(self, engine: TorchEngine) -> None:
        self.engine = engine
        self.cache: dict[Spec, WindowResult] = {}

    def __call__(self, spec: Spec) -> WindowResult:
        if spec not in self.cache:
            loop = DecodeLoop(self.engine, TOKENIZER)
            task = spec.task()
            self.cache[spec] = drain(loop, loop.admit([task]))[id(task)]
            assert loop.rows_in_use() == 0 and all(o is None for o in loop.owner)
        return self.cache[spec]


@pytest.fixture(scope="module")
def alone(engine: TorchEngine) -> Alone:
    return Alone(engine)


def assert_same(result: WindowResult, reference: WindowResult) -> None:
    assert result.tokens == reference.tokens
    assert result.sum_logprob == pytest.approx(reference.sum_logprob, abs=1e-3)
    assert result.no_speech_prob == pytest.approx(reference.no_speech_prob, rel=1e-3, abs=1e-9)
    assert result.prompt_tokens == reference.prompt_tokens


def index_of(tasks: list[WindowTask], task: WindowTask) -> int:
    """tasks.index() by identity (WindowTask's == would compare mel tensors)."""
    return next(i for i, t in enumerate(tasks) if t is task)


def uncached_decode(engine: TorchEngine, options: WindowOptions, prompt: list[int],
                    features: torch.Tensor) -> list[int]:
    """Reference decoding: every step recomputes the whole decoder over prompt + history."""
    config = engine.config
    search = make_search(options, TOKENIZER.eot, options.max_new_tokens)
    while True:
        histories = search.row_histories()
        logits = torch.stack([
            engine.cross_attention_weights(torch.tensor([prompt + h]), features, [(0, 0)])[1][-1]
            for h in histories
        ])
        rules = [RowRules(h, tuple(config.suppress_tokens),
                          tuple(config.suppress_tokens_begin) if options.suppress_blank else (),
                          not options.without_timestamps, round(options.max_initial_timestamp / 0.02))
                 for h in histories]
        apply_rules(logits, rules, TOKENIZER)
        if search.step(logits).finished:
            return search.best().tokens


# --- the decode loop ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [Spec(12, replace(GREEDY, max_new_tokens=6), tokens(5)),
     Spec(12, replace(BEAM, max_new_tokens=6), tokens(5)),
     Spec(14, replace(BEAM, max_new_tokens=6))],
    ids=["greedy", "beam3", "beam3-no-previous"],
)
def test_cached_decoding_matches_an_uncached_decoder(engine: TorchEngine, spec: Spec) -> None:
    # (the beam windows reorder hypotheses between rows: a wrong self-attention cache reorder
    # changes their tokens)
    loop = DecodeLoop(engine, TOKENIZER)
    task = spec.task(keep_features=True)
    result = drain(loop, loop.admit([task]))[id(task)]
    expected_prompt = [SPECIAL.sot_prev, *spec.previous] if spec.previous else []
    assert result.prompt_tokens == [*expected_prompt, SPECIAL.sot]
    assert result.audio_features is not None
    assert result.tokens[0] >= SPECIAL.timestamp_begin  # the timestamp rules were applied
    assert result.tokens == uncached_decode(engine, spec.options, result.prompt_tokens,
                                            result.audio_features)


BATCHES = {
    "greedy": [Spec(1, GREEDY), Spec(2, replace(GREEDY, max_new_tokens=5), tokens(3)),
               Spec(3, GREEDY, tokens(7, 900)), Spec(4, replace(GREEDY, max_new_tokens=11))],
    "greedy-no-timestamps": [Spec(1, GREEDY_NO_TS), Spec(2, GREEDY_NO_TS, tokens(4)),
                             Spec(5, replace(GREEDY_NO_TS, max_new_tokens=4))],
    "beam3": [Spec(1, BEAM), Spec(2, replace(BEAM, max_new_tokens=5), tokens(3)),
              Spec(3, BEAM, tokens(6, 900))],
    "mixed": [Spec(1, BEAM), Spec(2, GREEDY, tokens(3)), Spec(3, GREEDY_NO_TS),
              Spec(4, replace(BEAM, max_new_tokens=4), tokens(2))],
    # beam windows of two sizes: their continuations are ranked per size, their reorders copied together
    "beam-sizes": [Spec(1, replace(BEAM, beam_size=2)), Spec(2, BEAM, tokens(3)),
                   Spec(3, replace(BEAM, beam_size=2, max_new_tokens=5), tokens(5, 900))],
}


@pytest.mark.parametrize("name", list(BATCHES))
def test_batched_windows_decode_exactly_as_alone(engine: TorchEngine, alone: Alone, name: str) -> None:
    specs = BATCHES[name]
    loop = DecodeLoop(engine, TOKENIZER)
    tasks = [s.task() for s in specs]
    admitted = loop.admit(tasks)
    assert loop.rows_in_use() == sum(rows_needed(s.options) for s in specs)
    results = drain(loop, admitted)
    assert len(results) == len(specs)
    for spec, task in zip(specs, tasks, strict=True):
        assert_same(results[id(task)], alone(spec))
    assert loop.rows_in_use() == 0 and loop.span() == 0


class EagerChunks:
    """The CUDA runner's greedy chunks without CUDA graphs: the graphs' chunk body
    (run_greedy_steps) run eagerly on the CPU, as many steps as chunk_length allows."""

    def __init__(self, engine: TorchEngine, chunk_steps: int) -> None:
        self.engine = engine
        self.chunk_steps = chunk_steps
        self.calls: list[tuple[int, int]] = []  # (steps run, largest budget)

    def greedy_chunk(self, tokens: torch.Tensor, positions: torch.Tensor, done: torch.Tensor,
                     suppress: tuple[int, ...], remaining: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        steps = chunk_length(remaining, self.chunk_steps)
        self.calls.append((steps, max(remaining)))
        dims = self.engine.config.dims
        state = GreedyChunkState.allocate(len(tokens), steps, dims.n_vocab, TOKENIZER.eot, "cpu")
        state.set_suppress(suppress)
        state.tokens.copy_(tokens)
        state.positions.copy_(positions)
        state.done.copy_(done)
        state.remaining.copy_(torch.tensor(remaining))
        run_greedy_steps(self.engine.runner.decode_rows, greedy_step_reference, state, len(tokens), dims.n_text_ctx,
                         steps, TOKENIZER.eot)
        return state.out, state.done, state.sum_logprob


def test_greedy_chunks_stop_at_each_windows_token_budget(model: WhisperModel, alone: Alone,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    engine = random_engine(model, max_rows=16, config=CONFIG)
    chunks = EagerChunks(engine, chunk_steps=3)
    monkeypatch.setattr(engine.runner, "greedy_chunks", True)
    monkeypatch.setattr(engine.runner, "greedy_chunk", chunks.greedy_chunk)
    specs = [Spec(11, replace(GREEDY_NO_TS, max_new_tokens=n)) for n in (1, 2, 4, 7, 8)]
    loop = DecodeLoop(engine, TOKENIZER)
    tasks = [s.task() for s in specs]
    results = drain(loop, loop.admit(tasks))
    assert chunks.calls, "the greedy chunk path was not taken"
    assert all(steps <= budget for steps, budget in chunks.calls)
    assert any(steps < 3 for steps, _ in chunks.calls)  # a tail shorter than a chunk
    for spec, task in zip(specs, tasks, strict=True):
        # same tokens and the same sum of log-probs as single steps: nothing past the budget counts
        assert_same(results[id(task)], alone(spec))


def test_windows_joining_mid_flight_decode_as_alone(engine: TorchEngine, alone: Alone) -> None:
    first = [Spec(1, BEAM), Spec(2, GREEDY, tokens(3))]
    later = [Spec(3, GREEDY_NO_TS, tokens(5, 900)), Spec(4, BEAM, tokens(2))]
    loop = DecodeLoop(engine, TOKENIZER)
    first_tasks = [s.task() for s in first]
    done = loop.admit(first_tasks)
    for _ in range(3):
        done += loop.step()
    positions = {id(w.task): w.position for w in loop.active}
    assert len(positions) == 2  # both still decoding: the next two really join in flight
    later_tasks = [s.task() for s in later]
    done += loop.admit(later_tasks)
    assert {w.position for w in loop.active if id(w.task) in positions} == set(positions.values())
    assert len({w.position for w in loop.active}) > 1  # rows sit at different positions
    done += loop.step()
    late = [Spec(6, GREEDY)]  # and one more, two steps later still
    late_tasks = [s.task() for s in late]
    done += loop.admit(late_tasks)
    results = drain(loop, done)
    for spec, task in zip(first + later + late, first_tasks + later_tasks + late_tasks, strict=True):
        assert_same(results[id(task)], alone(spec))


@pytest.mark.parametrize(
    ("specs", "layout_after"),
    [
        # greedy rows 0, 1, 2; window 0 finishes first: window 2 moves down into row 0
        ([Spec(1, replace(GREEDY, max_new_tokens=2)), Spec(2, GREEDY), Spec(3, GREEDY)],
         {1: (1, 1), 2: (0, 1)}),
        # beam rows 0-2, greedy row 3, beam rows 4-6; the first beam ends: the last one moves to 0-2
        ([Spec(1, replace(BEAM, max_new_tokens=2)), Spec(2, GREEDY, tokens(4)), Spec(3, BEAM)],
         {1: (3, 1), 2: (0, 3)}),
    ],
    ids=["greedy", "beam"],
)
def test_compaction_moves_rows_and_keeps_results(engine: TorchEngine, alone: Alone, specs: list[Spec],
                                                 layout_after: dict[int, tuple[int, int]]) -> None:
    loop = DecodeLoop(engine, TOKENIZER)
    tasks = [s.task() for s in specs]
    done = loop.admit(tasks)
    while not done:
        done += loop.step()
    assert len(done) == 1 and done[0][0] is tasks[0]
    layout = {index_of(tasks, w.task): (w.start, w.n_rows) for w in loop.active}
    assert layout == layout_after
    assert loop.span() == sum(n for _, n in layout_after.values())  # dense again
    for i, (start, n) in layout.items():
        assert all(loop.owner[r] is not None and loop.owner[r].task is tasks[i]
                   for r in range(start, start + n))
    assert all(o is None for o in loop.owner[loop.span():])
    results = drain(loop, done)
    for spec, task in zip(specs, tasks, strict=True):
        assert_same(results[id(task)], alone(spec))


def test_cancelled_window_is_dropped_and_its_rows_freed(engine: TorchEngine, alone: Alone) -> None:
    specs = [Spec(1, GREEDY), Spec(2, BEAM, tokens(2)), Spec(3, GREEDY)]
    loop = DecodeLoop(engine, TOKENIZER)
    tasks = [s.task() for s in specs]
    done = loop.admit(tasks)
    done += loop.step() + loop.step()
    assert loop.rows_in_use() == 5
    loop.cancel(tasks[1])
    assert loop.rows_in_use() == 2 and loop.span() == 2  # freed and compacted at once
    done += loop.step()
    assert all(w.task is not tasks[1] for w in loop.active)
    assert loop.rows_in_use() == 2 and loop.span() == 2
    assert sum(o is not None for o in loop.owner) == 2
    results = drain(loop, done)
    assert id(tasks[1]) not in results
    for i in (0, 2):
        assert_same(results[id(tasks[i])], alone(specs[i]))


def test_result_statistics_are_finite_and_in_range(engine: TorchEngine) -> None:
    specs = [Spec(1, GREEDY), Spec(2, BEAM, tokens(3)), Spec(3, GREEDY_NO_TS),
             Spec(4, WindowOptions(temperature=0.7, best_of=2, max_new_tokens=5))]
    loop = DecodeLoop(engine, TOKENIZER)
    tasks = [s.task() for s in specs]
    results = drain(loop, loop.admit(tasks))
    for spec, task in zip(specs, tasks, strict=True):
        r = results[id(task)]
        assert 0.0 <= r.no_speech_prob <= 1.0 and math.isfinite(r.no_speech_prob)
        assert math.isfinite(r.avg_logprob) and r.avg_logprob <= 0.0
        assert r.avg_logprob == pytest.approx(r.sum_logprob / (len(r.tokens) + 1))
        assert 0 < len(r.tokens) <= spec.options.max_new_tokens
        assert r.temperature == spec.options.temperature
        assert r.language == "en"
        assert r.prompt_length == len(r.prompt_tokens)
        expected_prompt = [SPECIAL.sot_prev, *spec.previous] if spec.previous else []
        expected_prompt.append(SPECIAL.sot)
        if spec.options.without_timestamps:
            expected_prompt.append(SPECIAL.no_timestamps)
        assert r.prompt_tokens == expected_prompt
        assert all(t not in CONFIG.suppress_tokens for t in r.tokens)
        assert r.tokens[0] not in CONFIG.suppress_tokens_begin  # suppress_blank


def test_previous_text_is_cut_to_half_the_context(engine: TorchEngine) -> None:
    previous = list(tokens(300))
    loop = DecodeLoop(engine, TOKENIZER)
    task = WindowTask(random_mel(9, frames=FRAMES), replace(GREEDY, max_new_tokens=2), previous)
    loop.admit([task])
    window = loop.active[0]
    n_ctx = CONFIG.dims.n_text_ctx
    assert window.prompt == [SPECIAL.sot_prev, *previous[-(n_ctx // 2 - 1):], SPECIAL.sot]
    assert window.max_new_tokens == 2
    result = drain(loop)[id(task)]
    assert result.prompt_length == n_ctx // 2 + 1 and len(result.tokens) == 2


def test_admission_respects_the_rows(engine: TorchEngine) -> None:
    loop = DecodeLoop(engine, TOKENIZER)
    assert loop.rows == 16 and loop.plan().place(Spec(1, replace(BEAM, beam_size=17)).task()) is None
    tasks = [Spec(i, BEAM).task() for i in range(5)]  # 15 of 16 rows
    loop.admit(tasks)
    assert loop.rows_in_use() == 15
    assert loop.plan().place(Spec(7, GREEDY).task()) == 15
    assert loop.plan().place(Spec(8, BEAM).task()) is None
    with pytest.raises(RuntimeError):
        loop.admit([Spec(8, BEAM).task()])
    for task in tasks:
        loop.cancel(task)
    assert loop.step() == []
    assert loop.rows_in_use() == 0 and loop.plan().place(Spec(8, BEAM).task()) == 0


def test_admit_puts_windows_where_the_plan_placed_them(engine: TorchEngine) -> None:
    loop = DecodeLoop(engine, TOKENIZER)
    first, second = Spec(1, BEAM).task(), Spec(2, GREEDY).task()
    plan = loop.plan()
    assert plan.place(first) == 0 and plan.place(second) == 3
    loop.admit([second], plan)  # the plan's rows, not the first free ones
    assert [(w.start, w.n_rows) for w in loop.active] == [(3, 1)]
    loop.admit([first], plan)
    assert sorted((w.start, w.n_rows) for w in loop.active) == [(0, 3), (3, 1)]
    with pytest.raises(RuntimeError, match="without room"):
        loop.admit([first], plan)  # its planned rows are taken now


# --- the runner: rows at different positions, int8 cross-K/V ----------------------------------


def prepared_rows(engine: TorchEngine, prompts: list[list[int]]) -> torch.Tensor:
    """Encode one window per row and prefill each row's prompt alone; returns audio features."""
    mels = torch.stack([random_mel(20 + r, frames=FRAMES) for r in range(len(prompts))])
    features = engine.encode_into_rows(mels, list(range(len(prompts))))
    for r, prompt in enumerate(prompts):
        engine.decode(torch.tensor([prompt]), torch.tensor([0]), r, len(prompt))
    return features


PROMPTS = [[SPECIAL.sot], [SPECIAL.sot_prev, 17, 18, SPECIAL.sot],
           [SPECIAL.sot_prev, 1, 2, 3, 4, 5, SPECIAL.sot]]
NEXT = [[50364, 262], [11, 50370], [500, 501]]


@pytest.mark.parametrize("n_new", [1, 2])
def test_runner_rows_at_different_positions_equal_each_row_alone(model: WhisperModel, n_new: int) -> None:
    engine = random_engine(model, max_rows=3, config=CONFIG)
    features = prepared_rows(engine, PROMPTS)
    nxt = torch.tensor([n[:n_new] for n in NEXT])
    positions = torch.tensor([len(p) for p in PROMPTS])
    batched = engine.decode(nxt, positions, 0, int(positions.max()) + n_new)
    assert batched.shape == (3, n_new, CONFIG.dims.n_vocab) and batched.dtype == torch.float32
    for r, prompt in enumerate(PROMPTS):
        single = engine.decode(nxt[r : r + 1], positions[r : r + 1], r, len(prompt) + n_new)[0]
        torch.testing.assert_close(batched[r], single, atol=2e-3, rtol=1e-4)
        full = engine.cross_attention_weights(torch.tensor([prompt + NEXT[r][:n_new]]),
                                              features[r : r + 1], [(0, 0)])[1][-n_new:]
        torch.testing.assert_close(single, full, atol=2e-3, rtol=1e-4)


def test_runner_uniform_positions_without_mask_equal_masked(model: WhisperModel) -> None:
    engine = random_engine(model, max_rows=2, config=CONFIG)
    prompts = [[SPECIAL.sot_prev, 5, SPECIAL.sot], [SPECIAL.sot_prev, 6, SPECIAL.sot]]
    prepared_rows(engine, prompts)
    nxt, positions = torch.tensor([[50364], [50380]]), torch.tensor([3, 3])
    fast = engine.decode(nxt, positions, 0, 4, uniform_position=True)
    masked = engine.decode(nxt, positions, 0, 4, uniform_position=False)
    torch.testing.assert_close(fast, masked, atol=1e-3, rtol=1e-4)


def test_int8_cross_kv_is_close_to_fp32(model: WhisperModel) -> None:
    fp32 = random_engine(model, max_rows=3, config=CONFIG)
    int8 = random_engine(model, max_rows=3, config=CONFIG, int8_cross_kv=True)
    logits = []
    for engine in (fp32, int8):
        prepared_rows(engine, PROMPTS)
        nxt = torch.tensor([n[:1] for n in NEXT])
        positions = torch.tensor([len(p) for p in PROMPTS])
        logits.append(engine.decode(nxt, positions, 0, int(positions.max()) + 1)[:, -1])
    exact, cache = fp32.runner.cache, int8.runner.cache
    assert cache.cross_k.dtype == cache.cross_v.dtype == torch.int8
    for full, q, scale in ((exact.cross_k, cache.cross_k, cache.cross_k_scale),
                           (exact.cross_v, cache.cross_v, cache.cross_v_scale)):
        dequantised = q[:, :3].float() * scale[:, :3]
        assert (dequantised - full[:, :3]).norm() / full[:, :3].norm() < 0.01
    ref, quantised = logits
    assert not torch.equal(ref, quantised)  # it really went through int8
    relative = (quantised - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert relative.max() < 0.1
    assert torch.equal(ref.argmax(-1), quantised.argmax(-1))
    total_variation = (ref.softmax(-1) - quantised.softmax(-1)).abs().sum(-1) / 2
    assert total_variation.max() < 0.15


# --- the scheduler ---------------------------------------------------------------------------


def labelled(label: int) -> WindowTask:
    return WindowTask(torch.zeros(1), GREEDY, [label])


@pytest.fixture
def stopper() -> Iterator[list[Scheduler]]:
    started: list[Scheduler] = []
    yield started
    for scheduler in started:
        scheduler.stop(timeout=10)


def test_submit_beyond_the_queue_bound_raises_queue_full() -> None:
    scheduler = Scheduler(FakeLoop(), model_name="test", options=SchedulerOptions(max_queue_windows=2))
    scheduler.submit_nowait(labelled(1), "a")
    scheduler.submit_nowait(labelled(2), "b")
    with pytest.raises(QueueFullError) as info:
        scheduler.submit_nowait(labelled(3), "c")
    assert info.value.retry_after_s >= 1.0 and info.value.status_code == 503
    assert scheduler.queue_depth() == 2
    scheduler.stop_accepting()
    with pytest.raises(ShuttingDownError):
        scheduler.submit_nowait(labelled(4), "a")


def saturation(model: str) -> float:
    return metrics.REGISTRY.get_sample_value("whisper_saturation", {"model": model})


def test_saturation_is_the_larger_of_rows_and_queue_in_use(stopper: list[Scheduler]) -> None:
    loop = FakeLoop(rows=4)
    scheduler = Scheduler(loop, model_name="saturation", options=SchedulerOptions(max_queue_windows=4, batch_wait_ms=0))
    tickets = [scheduler.submit_nowait(labelled(i), f"r{i}") for i in range(3)]
    assert saturation("saturation") == 0.75  # 3 of 4 queue places, no rows yet
    scheduler._publish_rows(4)  # what the engine thread reports with every row taken
    assert saturation("saturation") == 1.0
    stopper.append(scheduler)
    scheduler.start()
    concurrent.futures.wait([t.future for t in tickets], timeout=10)
    deadline = time.monotonic() + 10
    while saturation("saturation") != 0.0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert saturation("saturation") == 0.0  # idle again: nothing queued, no rows in use


def test_round_robin_across_requests(stopper: list[Scheduler]) -> None:
    loop = FakeLoop(rows=1)  # one window at a time: the admission order is the service order
    scheduler = Scheduler(loop, model_name="test", options=NO_WAIT)
    tickets = [scheduler.submit_nowait(labelled(10 + i), "long") for i in range(4)]
    tickets += [scheduler.submit_nowait(labelled(20 + i), "medium") for i in range(2)]
    tickets += [scheduler.submit_nowait(labelled(30), "short")]
    stopper.append(scheduler)
    scheduler.start()
    concurrent.futures.wait([t.future for t in tickets], timeout=10)
    assert [t.previous_tokens[0] for t in loop.admitted] == [10, 20, 30, 11, 21, 12, 13]
    assert [t.future.result().tokens for t in tickets] == [[t.task.previous_tokens[0]] for t in tickets]


async def test_cancelling_a_waiting_submit_withdraws_its_window(stopper: list[Scheduler]) -> None:
    loop = FakeLoop()
    scheduler = Scheduler(loop, model_name="test", options=NO_WAIT)
    withdrawn = labelled(1)
    waiter = asyncio.create_task(scheduler.submit(withdrawn, "gone"))
    await asyncio.sleep(0)
    assert scheduler.queue_depth() == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert scheduler.queue_depth() == 0
    stopper.append(scheduler)
    scheduler.start()
    kept = labelled(2)
    result = await asyncio.wait_for(scheduler.submit(kept, "stays"), timeout=10)
    assert result.tokens == [2]
    assert loop.admitted == [kept]


class RunningLoop(FakeLoop):
    """A FakeLoop whose windows never finish: they stay in the loop until cancelled."""

    def step(self) -> list[tuple[WindowTask, WindowResult]]:
        time.sleep(0.001)
        return []


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_cancelling_a_running_submit_frees_its_rows(stopper: list[Scheduler]) -> None:
    loop = RunningLoop(rows=1)
    scheduler = Scheduler(loop, model_name="test", options=NO_WAIT)
    stopper.append(scheduler)
    scheduler.start()
    first, second = labelled(1), labelled(2)
    running = asyncio.create_task(scheduler.submit(first, "gone"))
    await until(lambda: loop.admitted == [first])
    waiting = asyncio.create_task(scheduler.submit(second, "next"))
    await until(lambda: scheduler.queue_depth() == 1)  # the only row is taken
    running.cancel()
    await until(lambda: loop.admitted == [first, second])  # the row was freed for it
    assert loop.cancelled == [first]
    waiting.cancel()
    await until(lambda: not loop.active)
    assert loop.cancelled == [first, second]


async def test_an_answered_window_is_freed_without_the_cycle_collector(
        engine: TorchEngine, stopper: list[Scheduler]) -> None:
    # A finished window's mel and encoder output are megabytes: held in a reference cycle, they
    # pile up under load until the cyclic collector happens to run.
    scheduler = Scheduler(DecodeLoop(engine, TOKENIZER), model_name="test", options=NO_WAIT)
    stopper.append(scheduler)
    scheduler.start()
    task = Spec(11).task(keep_features=True)
    mel = weakref.ref(task.mel)
    gc.disable()
    try:
        result = await asyncio.wait_for(scheduler.submit(task, "freed"), timeout=30)
        features = weakref.ref(result.audio_features)
        del task, result
        deadline = time.monotonic() + 5  # the engine thread may still be finishing its step
        while (mel() is not None or features() is not None) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert mel() is None and features() is None
    finally:
        gc.enable()


def test_stop_finishes_every_accepted_window() -> None:
    loop = FakeLoop(rows=1)
    scheduler = Scheduler(loop, model_name="test", options=NO_WAIT)
    tickets = [scheduler.submit_nowait(labelled(i), f"r{i % 2}") for i in range(5)]
    scheduler.start()
    scheduler.stop(timeout=10)
    assert all(t.future.done() for t in tickets)
    assert sorted(t.future.result().tokens[0] for t in tickets) == list(range(5))
    with pytest.raises(ShuttingDownError):
        scheduler.submit_nowait(labelled(9), "late")


async def test_scheduler_with_the_real_loop_matches_alone(engine: TorchEngine, alone: Alone,
                                                         stopper: list[Scheduler]) -> None:
    scheduler = Scheduler(DecodeLoop(engine, TOKENIZER), model_name="test", options=NO_WAIT)
    stopper.append(scheduler)
    scheduler.start()
    specs = {"a": [Spec(1, BEAM), Spec(2, GREEDY, tokens(3))], "b": [Spec(3, GREEDY, tokens(7, 900))]}

    async def request(rid: str) -> list[WindowResult]:
        return list(await asyncio.gather(*(scheduler.submit(s.task(), rid) for s in specs[rid])))

    results = await asyncio.wait_for(asyncio.gather(request("a"), request("b")), timeout=60)
    for rid, got in zip(specs, results, strict=True):
        for spec, result in zip(specs[rid], got, strict=True):
            assert_same(result, alone(spec))
    assert scheduler.active_rows() == 0 and scheduler.queue_depth() == 0


FRAGMENTATION = (
    "app/scheduler/scheduler.py _take_round_robin() counts free rows (len(owner) - rows_in_use) "
    "but DecodeLoop.admit() needs a contiguous run, and DecodeLoop._compact() leaves holes smaller "
    "than the tail window: the scheduler takes a window that cannot be placed, admit() raises "
    "RuntimeError and _fail_all() fails every in-flight window"
)


def test_scheduler_admits_only_into_contiguous_free_rows(model: WhisperModel,
                                                         stopper: list[Scheduler]) -> None:
    loop = DecodeLoop(random_engine(model, max_rows=5, config=CONFIG), TOKENIZER)
    short = Spec(1, replace(GREEDY, max_new_tokens=2)).task()
    long = Spec(2, replace(BEAM, max_new_tokens=60)).task()
    done = loop.admit([short, long])  # rows: short 0, long 1-3, free 4
    while not done:
        done += loop.step()
    # precondition: two free rows (0 and 4), but no two adjacent ones
    assert [(w.start, w.n_rows) for w in loop.active] == [(1, 3)]
    assert loop.rows_in_use() == 3
    scheduler = Scheduler(loop, model_name="test", options=NO_WAIT)
    sampled = Spec(3, WindowOptions(temperature=0.5, best_of=2, max_new_tokens=3)).task()
    ticket = scheduler.submit_nowait(sampled, "request")  # needs 2 adjacent rows
    stopper.append(scheduler)
    scheduler.start()
    result = ticket.future.result(timeout=60)  # RuntimeError: admit() called without room
    assert 0 < len(result.tokens) <= 3


def test_a_window_withdrawn_while_others_join_leaves_them_their_planned_rows(
        model: WhisperModel) -> None:
    loop = DecodeLoop(random_engine(model, max_rows=4, config=CONFIG), TOKENIZER)
    short = Spec(1, replace(GREEDY, max_new_tokens=2)).task()
    withdrawn = Spec(2, replace(GREEDY, max_new_tokens=60)).task()
    tail = Spec(3, replace(BEAM, beam_size=2, max_new_tokens=60)).task()
    done = loop.admit([short, withdrawn, tail])  # rows: short 0, withdrawn 1, tail 2-3
    while not done:
        done += loop.step()
    # a hole too small for the tail stays below it
    assert sorted((w.start, w.n_rows) for w in loop.active) == [(1, 1), (2, 2)]
    scheduler = Scheduler(loop, model_name="test", options=NO_WAIT)
    withdrawn_ticket, tail_ticket = Ticket(withdrawn, "withdrawn"), Ticket(tail, "tail")
    scheduler._in_flight.update({id(t.task): t for t in (withdrawn_ticket, tail_ticket)})
    joining = Spec(4, replace(GREEDY, max_new_tokens=60)).task()
    scheduler.submit_nowait(joining, "joining")
    tickets, plan = scheduler._take_round_robin()
    assert plan.start_of(joining) == 0
    withdrawn_ticket.cancelled = True
    # freeing row 1 first would let the tail move down into rows 0-1, where the plan put
    # `joining`: admit() would find them taken and fail the whole step
    scheduler._admit_and_step(tickets, plan, [withdrawn_ticket])
    assert sorted((w.start, w.task is joining) for w in loop.active) == [(0, True), (2, False)]


# --- trimmed audio context (streaming partials) ------------------------------------------------


@pytest.mark.parametrize("options", [GREEDY_NO_TS, BEAM], ids=["greedy", "beam3"])
def test_trimmed_window_attends_only_to_its_own_audio(engine: TorchEngine, alone: Alone,
                                                      options: WindowOptions) -> None:
    # A window encoded from fewer mel frames (TranscribeOptions.trim_audio_context) fills only
    # the start of its cross-attention cache row; rows hold other windows' K/V from earlier
    # tests beyond that. Batched with full windows, it must decode exactly as a decoder that
    # sees its own (shorter) audio features, and the full windows as if alone.
    full_specs = [Spec(1, BEAM), Spec(2, GREEDY, tokens(3))]
    full = [s.task() for s in full_specs]
    short = WindowTask(random_mel(21, frames=200), options, [], keep_audio_features=True)
    loop = DecodeLoop(engine, TOKENIZER)
    results = drain(loop, loop.admit([full[0], short, full[1]]))
    trimmed = results[id(short)]
    assert trimmed.audio_features is not None and trimmed.audio_features.shape[1] == 100
    assert trimmed.tokens == uncached_decode(engine, options, trimmed.prompt_tokens,
                                             trimmed.audio_features)
    for spec, task in zip(full_specs, full, strict=True):
        assert_same(results[id(task)], alone(spec))


# --- retries at a higher temperature reuse the encoder output -----------------------------------


@pytest.mark.parametrize("options", [GREEDY, BEAM], ids=["greedy", "beam3"])
def test_window_with_known_features_is_not_encoded_again(engine: TorchEngine, alone: Alone,
                                                         options: WindowOptions,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    spec = Spec(5, options, tokens(2))
    first = spec.task(keep_features=True)
    loop = DecodeLoop(engine, TOKENIZER)
    features = drain(loop, loop.admit([first]))[id(first)].audio_features
    assert features is not None
    encoded: list[int] = []
    real_encode = engine.encode_into_rows
    monkeypatch.setattr(engine, "encode_into_rows", lambda mel, rows: encoded.append(len(rows)) or
                        real_encode(mel, rows))
    retry = replace(spec.task(keep_features=True), audio_features=features)
    other = Spec(6, GREEDY).task()  # encoded in the same admission
    results = drain(loop, loop.admit([retry, other]))
    assert encoded == [1]  # only `other`
    assert_same(results[id(retry)], alone(spec))
    assert results[id(retry)].audio_features is features
    assert_same(results[id(other)], alone(Spec(6, GREEDY)))


def test_windows_mels_are_stacked_where_the_engine_computes_them() -> None:
    from app.scheduler.decode_loop import stack_on_one_device

    cpu = torch.ones(80, 3000)
    # "meta" stands in for the GPU: a long file's CPU features join the others' device
    stacked = stack_on_one_device([cpu, torch.zeros(80, 3000, device="meta"), cpu])
    assert stacked.device.type == "meta" and stacked.shape == (3, 80, 3000)
    assert torch.equal(stack_on_one_device([cpu, cpu * 2]), torch.stack([cpu, cpu * 2]))


def test_best_of_keeps_to_samples_under_the_repetition_threshold(engine: TorchEngine,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With the fallback's compression-ratio threshold set, the loop ranks only the samples that
    pass the check (app.decoding.repetition), and all of them when none does."""
    import app.decoding.search as search_module
    import app.scheduler.decode_loop as loop_module

    sampled: list[tuple[list[list[int]], list[float]]] = []
    real_best = search_module.SamplingSearch.best

    def recording_best(self: search_module.SamplingSearch, acceptable: object = None) -> object:
        sampled.append(([list(s) for s in self.sequences], list(self.sum_logprobs)))
        return real_best(self, acceptable)  # type: ignore[arg-type]

    monkeypatch.setattr(search_module.SamplingSearch, "best", recording_best)
    window = WindowOptions(temperature=1.0, best_of=4, max_new_tokens=6, without_timestamps=True)

    def decode(options: WindowOptions) -> WindowResult:
        loop = DecodeLoop(engine, TOKENIZER)
        task = Spec(31, options).task()
        return drain(loop, loop.admit([task]))[id(task)]

    free = decode(window)
    sequences, sums = sampled[-1]
    assert len({tuple(s) for s in sequences}) > 1, "precondition: the samples differ"
    assert free.tokens == max(sequences, key=lambda s: sums[sequences.index(s)] / max(len(s), 1))
    # accept only the sample the free choice ranked last: the loop must return it
    worst = min(sequences, key=lambda s: sums[sequences.index(s)] / max(len(s), 1))
    asked: list[float] = []

    def only_worst(tokenizer: object, threshold: float) -> Callable[[list[int]], bool]:
        asked.append(threshold)
        return lambda tokens: tokens == worst

    monkeypatch.setattr(loop_module, "not_repetitive", only_worst)
    assert decode(replace(window, compression_ratio_threshold=2.4)).tokens == worst
    assert asked == [2.4]
    monkeypatch.setattr(loop_module, "not_repetitive", lambda tokenizer, threshold: lambda tokens: False)
    assert decode(replace(window, compression_ratio_threshold=2.4)).tokens == free.tokens
