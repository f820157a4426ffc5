"""Where a CPU run's time goes: the service's runtime in-process, engine calls timed.

    python -m bench.cpu_profile                      # 32 files in flight, tiny.en, service defaults
    python -m bench.cpu_profile --concurrency 1      # one file at a time
    python -m bench.cpu_profile --limit 20 --settings greedy

Runs the dev set through `ModelRuntime.transcribe` (the same scheduler, decode loop and engine as
the server, without HTTP) and prints the wall time, the process CPU time, and the seconds spent in
each engine call: the encoder (`encode_into_rows`), cross-K/V from kept encoder output
(`features_into_rows`, temperature-fallback retries), prompt prefills, decode steps (with their
mean rows), cache row copies, and the decode loop's own Python (`step` minus the engine calls in
it). Wall time and percentages, not a speed target: compare runs made on an idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402


class CallTimer:
    """Wraps methods of an object so that each call's seconds add up under a label."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.calls: defaultdict[str, int] = defaultdict(int)
        self.rows = 0  # decode-step rows, summed over steps

    def wrap(self, owner: Any, name: str, label: Callable[..., str] | None = None) -> None:
        method = getattr(owner, name)

        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            key = label(*args, **kwargs) if label is not None else name
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - started
                self.calls[key] += 1

        setattr(owner, name, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.rows = 0


async def run(args: argparse.Namespace) -> None:
    items = common.load_manifest(args.manifest, args.limit)
    audio = common.load_audio(items)
    runtime = common.load_ours(args.model)
    timer = CallTimer()
    engine, loop = runtime.engine, runtime.scheduler.decode_loop
    for name in ("encode_into_rows", "features_into_rows"):
        timer.wrap(engine, name)
    # engine.decode runs for new windows' prompts inside admit() and for decode steps in step()
    phase = ["decode prefill"]
    timer.wrap(engine, "decode", lambda *args, **kwargs: phase[0])
    timer.wrap(engine, "copy_rows", lambda *args, **kwargs: f"copy_rows in {phase[0]}")
    timer.wrap(loop, "step", lambda: "loop step (all)")
    timed_step = loop.step

    def step() -> Any:
        timer.rows += loop.rows_in_use()
        phase[0] = "decode step"
        try:
            return timed_step()
        finally:
            phase[0] = "decode prefill"

    loop.step = step  # type: ignore[method-assign]
    await runtime.start()  # warm-up, not counted
    timer.reset()
    options = common.our_options(args.settings)
    pending = list(range(len(audio)))

    async def client() -> None:
        while pending:
            await runtime.transcribe(audio[pending.pop(0)], options)

    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    await runtime.stop()

    seconds = common.audio_seconds(audio)
    print(f"{len(audio)} files, {seconds:.0f} s of audio, {args.model}, {args.settings}, "
          f"{args.concurrency} in flight")
    print(f"wall {wall:.1f} s ({seconds / wall:.2f} audio-s/s), process CPU {cpu:.1f} s "
          f"({cpu / wall:.2f} cores busy; spinning OpenMP threads count as busy)")
    steps = timer.calls["loop step (all)"]
    in_step = timer.seconds["decode step"] + timer.seconds["copy_rows in decode step"]
    python = timer.seconds["loop step (all)"] - in_step
    rows = [
        ("encoder + cross-K/V (encode_into_rows)", "encode_into_rows"),
        ("cross-K/V of kept features (retries)", "features_into_rows"),
        ("prompt prefill", "decode prefill"),
        ("decode steps", "decode step"),
        ("cache row copies (beams, compaction)", "copy_rows in decode step"),
        ("cache row copies (new windows' beams)", "copy_rows in decode prefill"),
    ]
    print(f"{'engine call':42s} {'seconds':>8s} {'% wall':>7s} {'calls':>7s}")
    for title, key in rows:
        print(f"{title:42s} {timer.seconds[key]:8.1f} {100 * timer.seconds[key] / wall:6.1f}% "
              f"{timer.calls[key]:7d}")
    print(f"{'decode loop Python (step - engine calls)':42s} {python:8.1f} {100 * python / wall:6.1f}%")
    print(f"mean rows per decode step: {timer.rows / max(steps, 1):.1f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", type=Path, default=common.DEFAULT_MANIFEST)
    p.add_argument("--model", choices=common.MODELS, default="tiny.en")
    p.add_argument("--settings", choices=common.SETTINGS, default="defaults")
    p.add_argument("--concurrency", type=int, default=32, help="files in flight (1: one at a time)")
    p.add_argument("--limit", type=int, default=None, help="only the first N files")
    asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
