"""An hour of real speech through the service: wall time, RTFx and WER per model and long-form mode.

The audio is the dev set's clips in manifest order, each followed by 0.5 s of silence, the set
repeated until --minutes are reached (whole clips only, so the reference text is exact): the same
audio on every run. It goes to POST /v1/audio/transcriptions as one 16 kHz FLAC, with the
server's default decoding, from a server started with each long-form mode:

- sequential: openai-whisper's timestamp seeking, one 30 s window after the other;
- vad: WHISPER_VAD_LONG_FORM=true, cut at pauses into <= 30 s chunks decoded as one batch;

once alone and once alongside --load short-clip clients (closed loop: each sends dev clips of at
most --short-max-seconds, one after the other, until the long request is answered). Prints one
row per (model, mode, load): audio minutes, wall seconds, RTFx (audio seconds / wall seconds),
WER of the whole transcript (whisper-normalizer, jiwer), and the short clips answered meanwhile
with their p50/p95 latency.

    python -m bench.hour --models tiny.en,base --json hour.json          # the GPU table
    python -m bench.hour --minutes 2 --models tiny.en --load 0,4         # this CPU, a smoke run

Bounded: at most 240 minutes of audio, --request-timeout per long request (a run over it is
reported, not waited for), --time-limit for everything. Starts its own loopback servers (both
modes at once, every model in each) with an upload and duration limit that fits the file;
--server-env KEY=VALUE adds settings (unknown names are ignored by the server).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.concurrency import (  # noqa: E402
    DEV_SET,
    Clip,
    ensure_loopback,
    fmt,
    load_clips,
    local_server,
    percentile,
)

SAMPLE_RATE = 16_000
GAP_S = 0.5
MAX_MINUTES = 240.0
MODES = ("sequential", "vad")


@dataclass(frozen=True)
class LongAudio:
    flac: bytes
    seconds: float
    reference: str
    clips: int  # clips joined (with repeats)


def build_long_audio(clips: Sequence[Clip], minutes: float) -> LongAudio:
    """Clips in order (repeated as needed), 0.5 s of silence after each, until `minutes`."""
    import soundfile

    from app.audio.decode import decode_audio

    if not clips:
        raise ValueError("no clips to join")
    decoded = [decode_audio(c.path) for c in clips]
    gap = np.zeros(int(GAP_S * SAMPLE_RATE), dtype=np.float32)
    parts: list[np.ndarray] = []
    texts: list[str] = []
    total = 0
    target = int(minutes * 60 * SAMPLE_RATE)
    i = 0
    while total < target:
        audio = decoded[i % len(clips)]
        parts += [audio, gap]
        texts.append(clips[i % len(clips)].text)
        total += len(audio) + len(gap)
        i += 1
    samples = np.concatenate(parts)
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return LongAudio(buffer.getvalue(), len(samples) / SAMPLE_RATE, " ".join(texts), i)


def wer_percent(reference: str, hypothesis: str) -> float:
    import jiwer

    from bench.common import normalize

    ref, hyp = normalize(reference), normalize(hypothesis)
    return 100.0 * jiwer.wer(ref, hyp) if ref else math.nan


@dataclass
class RunResult:
    model: str
    mode: str
    load: int
    audio_s: float
    wall_s: float | None = None  # None: no answer within the request timeout
    wer: float | None = None
    error: str | None = None
    short_done: int = 0
    short_p50_s: float | None = None
    short_p95_s: float | None = None
    short_errors: int = 0
    short_latencies: list[float] = field(default_factory=list, repr=False)

    @property
    def rtfx(self) -> float | None:
        return self.audio_s / self.wall_s if self.wall_s else None


async def post(client: httpx.AsyncClient, name: str, data: bytes, model: str) -> str:
    response = await client.post(
        "/v1/audio/transcriptions",
        files={"file": (name, data, "application/octet-stream")},
        data={"model": model, "response_format": "json"},
    )
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code} {response.text[:300]}")
    return response.json()["text"]


async def one_run(
    url: str,
    model: str,
    mode: str,
    long: LongAudio,
    short: Sequence[tuple[str, bytes]],
    load: int,
    timeout_s: float,
) -> RunResult:
    """The long request, alone or beside `load` closed-loop short-clip clients."""
    result = RunResult(model, mode, load, long.seconds)
    limits = httpx.Limits(max_connections=load + 4, max_keepalive_connections=load + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        await post(client, short[0][0], short[0][1], model)  # warm: connections, caches
        finished = asyncio.Event()

        async def short_client(first: int) -> None:
            index = first
            while not finished.is_set():
                name, data = short[index % len(short)]
                started = time.perf_counter()
                try:
                    await post(client, name, data, model)
                    if not finished.is_set():
                        result.short_latencies.append(time.perf_counter() - started)
                except Exception:  # noqa: BLE001 - counted, the long request is what is measured
                    result.short_errors += 1
                index += 1

        clients = [
            asyncio.create_task(short_client(i * len(short) // max(1, load))) for i in range(load)
        ]
        if load:
            await asyncio.sleep(2.0)  # the short clients' load is running before the long request
        started = time.perf_counter()
        try:
            text = await asyncio.wait_for(post(client, "hour.flac", long.flac, model), timeout_s)
            result.wall_s = time.perf_counter() - started
            result.wer = wer_percent(long.reference, text)
        except TimeoutError:
            result.error = f"no answer within {timeout_s:g} s"
        except Exception as exc:  # noqa: BLE001
            result.error = str(exc)[:300]
        finished.set()
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    if result.short_latencies:
        result.short_done = len(result.short_latencies)
        result.short_p50_s = percentile(result.short_latencies, 50)
        result.short_p95_s = percentile(result.short_latencies, 95)
    return result


HEADER = (
    f"{'model':<9} {'long form':<11} {'load':<12} {'audio min':>9} {'wall s':>8} {'RTFx':>8} {'WER %':>7}"
    f" {'short done':>10} {'p50 s':>7} {'p95 s':>7}"
)


def print_row(r: RunResult) -> None:
    load = "alone" if r.load == 0 else f"+{r.load} clients"
    print(
        f"{r.model:<9} {r.mode:<11} {load:<12} {r.audio_s / 60:>9.1f} {fmt(r.wall_s):>8} {fmt(r.rtfx, 1):>8}"
        f" {fmt(r.wer):>7} {r.short_done if r.load else '-':>10} {fmt(r.short_p50_s):>7}"
        f" {fmt(r.short_p95_s):>7}" + (f"  ERROR: {r.error}" if r.error else ""),
        flush=True,
    )


def server_env(mode: str, long: LongAudio, args: argparse.Namespace) -> dict[str, str]:
    env = {
        "WHISPER_VAD_LONG_FORM": "true" if mode == "vad" else "false",
        "WHISPER_MAX_UPLOAD_MB": str(max(25, math.ceil(2 * len(long.flac) / 2**20))),
        "WHISPER_MAX_AUDIO_SECONDS": str(max(7200, math.ceil(long.seconds) + 60)),
        "WHISPER_MAX_QUEUE_WINDOWS": "8192",
    }
    if args.max_batch_size:
        env["WHISPER_MAX_BATCH_SIZE"] = str(args.max_batch_size)
    for item in args.server_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--server-env takes KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def parse_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=DEV_SET, help="folder with manifest.tsv (default: dev set)"
    )
    parser.add_argument("--models", type=parse_list, default=["tiny.en", "base"])
    parser.add_argument("--modes", type=parse_list, default=list(MODES), help="sequential, vad")
    parser.add_argument(
        "--minutes", type=float, default=60.0, help="minutes of audio (whole clips)"
    )
    parser.add_argument(
        "--load",
        type=lambda t: [int(x) for x in parse_list(t)],
        default=[0, 64],
        help="short-clip clients beside the long request, one run each (default 0,64)",
    )
    parser.add_argument("--short-max-seconds", type=float, default=15.0)
    parser.add_argument(
        "--request-timeout", type=float, default=600.0, help="s for the long request"
    )
    parser.add_argument(
        "--time-limit", type=float, default=1800.0, help="s for everything (no new run after)"
    )
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--max-batch-size", type=int, help="WHISPER_MAX_BATCH_SIZE of the servers")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--server-log", type=Path, help="folder for the servers' output")
    parser.add_argument(
        "--url",
        action="append",
        default=[],
        metavar="MODE=URL",
        help="a running loopback server started with that mode's settings (e.g. vad=http://127.0.0.1:8001);"
        " modes without one get their own server",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= MAX_MINUTES:
        parser.error(f"--minutes must be in (0, {MAX_MINUTES:g}]")
    if set(args.modes) - set(MODES) or not args.modes:
        parser.error(f"--modes: some of {', '.join(MODES)}")
    if any(not 0 <= n <= 256 for n in args.load):
        parser.error("--load: client counts between 0 and 256")
    urls = {}
    for item in args.url:
        mode, sep, url = item.partition("=")
        if not sep or mode not in MODES:
            parser.error(f"--url takes MODE=URL with MODE one of {', '.join(MODES)}, got {item!r}")
        urls[mode] = ensure_loopback(url)
    args.url = urls
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.time_limit
    clips = load_clips(args.data, 100_000)
    long = build_long_audio(clips, args.minutes)
    short = [
        (c.path.name, c.path.read_bytes()) for c in clips if c.duration <= args.short_max_seconds
    ]
    if not short:
        raise SystemExit(
            f"no clips of at most {args.short_max_seconds:g} s for the short-clip clients"
        )
    print(
        f"{long.seconds / 60:.1f} min of audio ({long.clips} clips from {args.data}, {len(long.flac) / 2**20:.0f} MiB"
        f" FLAC), {len(short)} short clips; models {','.join(args.models)}",
        flush=True,
    )
    results: list[RunResult] = []
    with ExitStack() as stack:
        if args.server_log:
            args.server_log.mkdir(parents=True, exist_ok=True)
        urls = {mode: url for mode, url in args.url.items() if mode in args.modes}
        starting = [mode for mode in args.modes if mode not in urls]
        servers = [
            local_server(
                ",".join(args.models),
                args.startup_timeout,
                extra_env=server_env(mode, long, args),
                log=args.server_log / f"hour-{mode}.log" if args.server_log else None,
            )
            for mode in starting
        ]
        if servers:
            with ThreadPoolExecutor(len(servers)) as pool:  # the servers load at once
                urls.update(zip(starting, pool.map(stack.enter_context, servers), strict=True))
        print(HEADER)
        print("-" * len(HEADER))
        for model in args.models:
            for mode in args.modes:
                for load in args.load:
                    if time.monotonic() >= deadline:
                        print(
                            f"stopped: over --time-limit {args.time_limit:.0f} s", file=sys.stderr
                        )
                        break
                    timeout = max(1.0, min(args.request_timeout, deadline - time.monotonic()))
                    result = asyncio.run(
                        one_run(urls[mode], model, mode, long, short, load, timeout)
                    )
                    results.append(result)
                    print_row(result)
    if args.json:
        rows = [
            {**{k: v for k, v in asdict(r).items() if k != "short_latencies"}, "rtfx": r.rtfx}
            for r in results
        ]
        args.json.write_text(
            json.dumps({"audio_s": long.seconds, "clips": long.clips, "runs": rows}, indent=2)
        )
    return 0 if results and all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
