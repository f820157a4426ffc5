"""Live streams per server: ramp the number of concurrent real-time sessions on /v1/realtime.

Each stream streams one dev clip as 24 kHz PCM16 in 100 ms `input_audio_buffer.append` events
at real-time pace (turn detection off: the clip is one turn), commits, and waits for the final
transcript, which must equal what POST /v1/audio/transcriptions returns for the same audio.
Streams start spread over --stagger seconds (people do not start talking in the same 100 ms).
Several load processes (--workers, each an asyncio loop with up to --streams-per-worker
WebSockets) share the streams, so the load generator keeps the pace at thousands of streams;
each reports how late its chunks left (client lag), and a step whose load generator fell behind
is marked as such instead of being blamed on the server.

Each step of the ramp (--ramp 50,100,200,...) reports:
- partial latency p50/p95/p99: the server's own histogram (`whisper_partial_latency_seconds`:
  arrival of the audio chunk that triggered a partial decode -> the delta it produced was sent),
  read from /metrics before and after the step;
- final latency p50/p95/p99/max: commit sent -> `...completed` received (client side);
- first partial: the first chunk that holds speech sent -> first delta received (client side);
- finals == REST, session errors;
- partial cost: windows the engine decoded per second and engine milliseconds per window
  (encoder + decode-step time from /metrics over windows decoded; nearly all are partials), and
  the engine's busy share of the step's wall time;
- agreement: of the words sent as partials before the commit, the share the final keeps (word for
  word from the start, case and punctuation aside), and the share of the final's words the
  partials had already delivered.
A step passes when every session finished without error, every final equals REST, partial p95
<= --partial-limit (1.0 s) and final latency at --final-percentile (95) <= --final-limit
(1.5 s). The ramp stops after the first failing step; the result is the largest passing count.

    python -m bench.realtime --model base --ramp 50,100,200,400,700,1000,1500,2000 --json rt.json
    python -m bench.realtime --ramp 2,4                  # this CPU: a smoke run, tiny.en
    python -m bench.realtime --url http://127.0.0.1:8000 --ramp 8 --data tests/data

Without --url it starts the server itself (loopback) with the caps thousands of sessions need
(queue, partial decodes, realtime sessions and connections; unknown setting names are ignored by
the server) plus --max-batch-size and every --server-env KEY=VALUE. Bounded: at most 2,000
streams, a deadline per step and --time-limit for the whole ramp. Exit status 1 if no step
passed, 2 when over the time limit.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import random
import re
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.concurrency import (  # noqa: E402
    DEV_SET,
    FIXTURES,
    Clip,
    ensure_loopback,
    fmt,
    load_clips,
    local_server,
    percentile,
)

RATE = 24000
MAX_STREAMS = 2000
DEFAULT_RAMP = (50, 100, 200, 400, 700, 1000, 1500, 2000)
PARTIAL_METRIC = "whisper_partial_latency_seconds"
#: client lag (chunks leaving late) from which a step's load generator counts as overloaded
CLIENT_LAG_LIMIT_S = 0.25


def capacity_env(max_streams: int) -> dict[str, str]:
    """Server settings for thousands of sessions: the session and connection caps
    (docs/operations.md) above the ramp's largest step."""
    sessions = str(2 * max_streams + 64)
    return {
        "WHISPER_MAX_QUEUE_WINDOWS": str(max(1024, 8 * max_streams)),
        "WHISPER_REALTIME_MAX_PARTIAL_DECODES": str(max(16, max_streams)),
        "WHISPER_REALTIME_MAX_PENDING_EVENTS": "1024",
        "WHISPER_REALTIME_IDLE_TIMEOUT_S": "120",
        "WHISPER_REALTIME_MAX_SESSIONS": sessions,
        "WHISPER_MAX_CONNECTIONS": sessions,
    }


def raise_open_files_limit() -> int:
    """Thousands of WebSockets need file descriptors: lift the soft limit to the hard one (the
    server and the load processes inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


# --------------------------------------------------------------------------- audio


@dataclass(frozen=True)
class StreamAudio:
    clip_id: str
    pcm: bytes  # 24 kHz mono PCM16, exactly what is streamed and what REST receives
    speech_start_s: float  # first 100 ms with speech-like energy

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / RATE


def speech_start(samples: np.ndarray, rate: int, chunk_s: float = 0.1) -> float:
    """Start of the first chunk whose RMS reaches a tenth of the loudest chunk's (dev clips are
    read speech: a plain energy gate finds its first word; no VAD model needed)."""
    step = max(1, int(rate * chunk_s))
    n = len(samples) // step
    if n == 0:
        return 0.0
    rms = np.sqrt(np.mean(samples[: n * step].reshape(n, step).astype(np.float64) ** 2, axis=1))
    loud = np.flatnonzero(rms >= 0.1 * rms.max()) if rms.max() > 0 else np.array([0])
    return float(loud[0] * chunk_s)


def prepare(clip: Clip) -> StreamAudio:
    from app.audio.decode import decode_audio
    from app.audio.pcm import float_to_pcm16

    audio = decode_audio(clip.path.read_bytes(), sample_rate=RATE)
    return StreamAudio(clip.id, float_to_pcm16(audio), speech_start(audio, RATE))


def pick_clips(clips: Sequence[Clip], count: int, min_s: float, max_s: float) -> list[Clip]:
    """The first `count` clips (manifest order) of min_s..max_s seconds: every step streams the
    same audio, and the clip length bounds a step's duration."""
    return [c for c in clips if min_s <= c.duration <= max_s][:count]


# --------------------------------------------------------------------------- one stream


@dataclass
class StreamResult:
    stream: int
    clip: str
    partial_text: str = ""  # deltas received before the commit, joined
    partials: int = 0
    first_partial_s: float | None = None
    final: str | None = None
    final_latency_s: float | None = None
    client_lag_s: float = 0.0  # how late the latest chunk left against real-time pace (max)
    rest: str | None = None
    error: str | None = None

    @property
    def matches_rest(self) -> bool:
        return self.final is not None and self.final == self.rest


async def stream_session(
    ws_url: str, index: int, audio: StreamAudio, *, model: str, chunk_ms: int, timeout_s: float
) -> StreamResult:
    """One real-time session: connect, stream at real-time pace, commit, wait for the final."""
    import websockets

    result = StreamResult(index, audio.clip_id)
    step = RATE * chunk_ms // 1000 * 2  # bytes per chunk
    speech_chunk = int(audio.speech_start_s * 1000 // chunk_ms)
    speech_sent_at: float | None = None
    commit_sent_at: float | None = None
    deltas: list[str] = []
    try:
        async with websockets.connect(
            ws_url, open_timeout=60, max_size=None, ping_interval=None
        ) as ws:

            async def send(event: dict) -> None:
                await ws.send(json.dumps(event))

            await send(
                {
                    "type": "session.update",
                    "session": {
                        "type": "transcription",
                        "audio": {
                            "input": {
                                "format": {"type": "audio/pcm", "rate": RATE},
                                "transcription": {"model": model},
                                "turn_detection": None,
                            }
                        },
                    },
                }
            )

            async def receive() -> None:
                async for message in ws:
                    event = json.loads(message)
                    kind = event["type"]
                    now = time.perf_counter()
                    if kind == "conversation.item.input_audio_transcription.delta":
                        if commit_sent_at is None:
                            result.partials += 1
                            deltas.append(event["delta"])
                            if result.first_partial_s is None and speech_sent_at is not None:
                                result.first_partial_s = now - speech_sent_at
                    elif kind == "conversation.item.input_audio_transcription.completed":
                        result.final = event["transcript"]
                        if commit_sent_at is not None:
                            result.final_latency_s = now - commit_sent_at
                        return
                    elif kind in ("error", "conversation.item.input_audio_transcription.failed"):
                        result.error = str(event.get("error", {}).get("message", kind))
                        return

            receiver = asyncio.create_task(receive())
            started = time.perf_counter()
            for n, offset in enumerate(range(0, len(audio.pcm), step)):
                due = started + n * chunk_ms / 1000
                now = time.perf_counter()
                await asyncio.sleep(max(0.0, due - now))
                result.client_lag_s = max(result.client_lag_s, time.perf_counter() - due)
                chunk = audio.pcm[offset : offset + step]
                await send(
                    {"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()}
                )
                if n == speech_chunk:
                    speech_sent_at = time.perf_counter()
                if receiver.done():
                    break
            commit_sent_at = time.perf_counter()
            await send({"type": "input_audio_buffer.commit"})
            try:
                await asyncio.wait_for(receiver, timeout_s)
            except TimeoutError:
                result.error = f"no final within {timeout_s:g} s"
    except Exception as exc:  # noqa: BLE001 - a refused or dropped connection is a result
        result.error = result.error or f"{type(exc).__name__}: {exc}"[:200]
    result.partial_text = "".join(deltas)
    return result


# --------------------------------------------------------------------------- load processes


@dataclass(frozen=True)
class Job:
    """One load process's share of a step: (stream index, clip index, start offset s)."""

    ws_url: str
    model: str
    streams: tuple[tuple[int, int, float], ...]
    start_at: float  # time.time() at which offsets count from (the same for every process)
    chunk_ms: int
    timeout_s: float
    deadline_s: float  # the job gives up (its open streams fail) this long after start_at


def plan(
    streams: int, workers: int, n_clips: int, stagger_s: float, seed: int = 0
) -> list[list[tuple[int, int, float]]]:
    """Streams dealt round-robin to `workers` processes: stream i plays clip i mod n_clips and
    starts at a seeded uniform offset in [0, stagger_s)."""
    rng = random.Random(seed + streams)
    shares: list[list[tuple[int, int, float]]] = [[] for _ in range(max(1, min(workers, streams)))]
    for i in range(streams):
        shares[i % len(shares)].append((i, i % n_clips, rng.uniform(0.0, stagger_s)))
    return shares


_AUDIOS: list[StreamAudio] = []


def _init_worker(audios: list[StreamAudio]) -> None:
    global _AUDIOS
    _AUDIOS = audios
    raise_open_files_limit()


def run_job(job: Job) -> list[StreamResult]:
    """A load process's share: its streams on one event loop (uvloop where installed)."""
    try:
        import uvloop

        runner: Callable[..., list[StreamResult]] = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(_run_job(job))


async def _run_job(job: Job) -> list[StreamResult]:
    async def one(index: int, clip: int, offset: float) -> StreamResult:
        await asyncio.sleep(max(0.0, job.start_at + offset - time.time()))
        return await stream_session(
            job.ws_url,
            index,
            _AUDIOS[clip],
            model=job.model,
            chunk_ms=job.chunk_ms,
            timeout_s=job.timeout_s,
        )

    tasks = [asyncio.ensure_future(one(*s)) for s in job.streams]
    _, pending = await asyncio.wait(
        tasks, timeout=max(1.0, job.start_at + job.deadline_s - time.time())
    )
    for task in pending:
        task.cancel()
    results = []
    for (index, clip, _), task in zip(job.streams, tasks, strict=True):
        if task in pending or task.cancelled():
            results.append(
                StreamResult(index, _AUDIOS[clip].clip_id, error="over the step deadline")
            )
        else:
            results.append(task.result())
    return results


# --------------------------------------------------------------------------- metrics


@dataclass
class Snapshot:
    """What one /metrics scrape says about partials and the engine (one model)."""

    partial_buckets: dict[float, float] = field(default_factory=dict)  # cumulative, by upper bound
    engine_s: float = 0.0  # encoder + decode-step seconds
    windows: float = 0.0


def snapshot(metrics_text: str, model: str) -> Snapshot:
    snap = Snapshot()
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if family.name == PARTIAL_METRIC and sample.name.endswith("_bucket"):
                snap.partial_buckets[float(sample.labels["le"])] = sample.value
            elif sample.labels.get("model") != model:
                continue
            elif sample.name in ("whisper_encode_seconds_sum", "whisper_decode_step_seconds_sum"):
                snap.engine_s += sample.value
            elif sample.name == "whisper_windows_total":
                snap.windows += sample.value
    return snap


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """Prometheus-style quantile (linear within a bucket) of the samples added in between."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bucket: its bound is all we know
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return lower


def share_within(before: dict[float, float], after: dict[float, float], limit: float) -> float:
    """Share of the samples added in between that are <= limit (exact when limit is a bucket
    bound; 1.0 without samples)."""
    total = after.get(math.inf, 0.0) - before.get(math.inf, 0.0)
    if total <= 0:
        return 1.0
    bounds = [b for b in sorted(after) if b <= limit]
    if not bounds:
        return 0.0
    return (after[bounds[-1]] - before.get(bounds[-1], 0.0)) / total


# --------------------------------------------------------------------------- one step


_WORD = re.compile(r"[^\w']+")


def words(text: str) -> list[str]:
    return [w for w in (_WORD.sub("", t.lower()) for t in text.split()) if w]


def kept_words(partial: str, final: str) -> int:
    """Words of `partial` the final repeats word for word from the start (loosely compared)."""
    n = 0
    for a, b in zip(words(partial), words(final), strict=False):
        if a != b:
            break
        n += 1
    return n


@dataclass(frozen=True)
class Limits:
    partial_p95_s: float = 1.0
    final_s: float = 1.5
    final_percentile: int = 95


@dataclass
class StepReport:
    streams: int
    workers: int
    wall_s: float
    partial_p50_s: float
    partial_p95_s: float
    partial_p99_s: float
    partial_within_limit: float  # share of partials within Limits.partial_p95_s
    deltas: int
    final_p50_s: float
    final_p95_s: float
    final_p99_s: float
    final_max_s: float
    first_partial_p50_s: float
    first_partial_p95_s: float
    errors: int
    mismatches: int
    client_lag_p99_s: float
    windows: int
    windows_per_s: float
    engine_ms_per_window: float
    engine_busy: float  # engine seconds / wall seconds
    partial_words: int
    partial_words_kept: int
    final_words: int
    passed: bool
    reasons: list[str]
    sessions: list[StreamResult] = field(default_factory=list)

    @property
    def kept_share(self) -> float:
        return self.partial_words_kept / self.partial_words if self.partial_words else math.nan

    @property
    def covered_share(self) -> float:
        return self.partial_words / self.final_words if self.final_words else math.nan


def summarize(
    streams: int,
    workers: int,
    sessions: Sequence[StreamResult],
    wall_s: float,
    before: Snapshot,
    after: Snapshot,
    limits: Limits,
) -> StepReport:
    finals = [s.final_latency_s for s in sessions if s.final_latency_s is not None]
    firsts = [s.first_partial_s for s in sessions if s.first_partial_s is not None]
    lags = [s.client_lag_s for s in sessions]
    pb, pa = before.partial_buckets, after.partial_buckets
    deltas = int(pa.get(math.inf, 0.0) - pb.get(math.inf, 0.0))
    engine_s = after.engine_s - before.engine_s
    windows = int(round(after.windows - before.windows))
    errors = sum(s.error is not None for s in sessions)
    mismatches = sum(s.error is None and not s.matches_rest for s in sessions)
    within = share_within(pb, pa, limits.partial_p95_s)
    final_at = percentile(finals, limits.final_percentile) if finals else math.nan
    reasons = []
    if errors:
        reasons.append(f"{errors} session error(s)")
    if mismatches:
        reasons.append(f"{mismatches} final(s) differ from REST")
    if within < 0.95:
        reasons.append(f"partial p95 > {limits.partial_p95_s:g} s ({100 * within:.1f} % within)")
    if not finals or final_at > limits.final_s:
        reasons.append(f"final p{limits.final_percentile} > {limits.final_s:g} s")
    client_lag = percentile(lags, 99) if lags else 0.0
    if client_lag > CLIENT_LAG_LIMIT_S:
        reasons.append(f"load generator behind (client lag p99 {client_lag:.2f} s)")
    ok = [s for s in sessions if s.final is not None]
    return StepReport(
        streams=streams,
        workers=workers,
        wall_s=wall_s,
        partial_p50_s=histogram_quantile(pb, pa, 0.50),
        partial_p95_s=histogram_quantile(pb, pa, 0.95),
        partial_p99_s=histogram_quantile(pb, pa, 0.99),
        partial_within_limit=within,
        deltas=deltas,
        final_p50_s=percentile(finals, 50),
        final_p95_s=percentile(finals, 95),
        final_p99_s=percentile(finals, 99),
        final_max_s=max(finals, default=math.nan),
        first_partial_p50_s=percentile(firsts, 50),
        first_partial_p95_s=percentile(firsts, 95),
        errors=errors,
        mismatches=mismatches,
        client_lag_p99_s=client_lag,
        windows=windows,
        windows_per_s=windows / wall_s if wall_s > 0 else 0.0,
        engine_ms_per_window=1000 * engine_s / windows if windows else math.nan,
        engine_busy=engine_s / wall_s if wall_s > 0 else 0.0,
        partial_words=sum(len(words(s.partial_text)) for s in ok),
        partial_words_kept=sum(kept_words(s.partial_text, s.final or "") for s in ok),
        final_words=sum(len(words(s.final or "")) for s in ok),
        passed=not reasons,
        reasons=reasons,
        sessions=list(sessions),
    )


def run_ramp(
    counts: Sequence[int],
    run_step: Callable[[int], StepReport],
    *,
    keep_going: bool = False,
    deadline: float | None = None,
) -> list[StepReport]:
    """Steps in order; stop after the first failing one (unless keep_going) or at `deadline`
    (time.monotonic())."""
    steps: list[StepReport] = []
    for n in counts:
        if deadline is not None and time.monotonic() >= deadline:
            break
        steps.append(run_step(n))
        if not steps[-1].passed and not keep_going:
            break
    return steps


def capacity(steps: Sequence[StepReport]) -> int:
    """The largest stream count of a passing step (0: none passed)."""
    return max((s.streams for s in steps if s.passed), default=0)


# --------------------------------------------------------------------------- the benchmark


class Bench:
    def __init__(
        self, url: str, model: str, audios: list[StreamAudio], args: argparse.Namespace
    ) -> None:
        self.url = url
        self.model = model
        self.audios = audios
        self.args = args
        self.ws_url = url.replace("http://", "ws://", 1) + "/v1/realtime?intent=transcription"
        self.rest: dict[str, str] = {}

    def rest_references(self) -> None:
        from app.audio.pcm import pcm16_to_wav

        with httpx.Client(base_url=self.url, timeout=self.args.timeout) as client:
            for audio in self.audios:
                response = client.post(
                    "/v1/audio/transcriptions",
                    files={
                        "file": (f"{audio.clip_id}.wav", pcm16_to_wav(audio.pcm, RATE), "audio/wav")
                    },
                    data={"model": self.model},
                )
                response.raise_for_status()
                self.rest[audio.clip_id] = response.json()["text"]

    def scrape(self) -> Snapshot:
        return snapshot(httpx.get(f"{self.url}/metrics", timeout=60).text, self.model)

    def step(self, pool: ProcessPoolExecutor, streams: int) -> StepReport:
        args = self.args
        workers = min(args.workers, max(1, math.ceil(streams / args.streams_per_worker)))
        shares = plan(streams, workers, len(self.audios), args.stagger)
        longest = max(a.seconds for a in self.audios)
        deadline_s = args.stagger + longest + args.timeout + 30.0
        start_at = time.time() + 1.0 + 0.002 * streams  # every process has its share before then
        jobs = [
            Job(
                self.ws_url,
                self.model,
                tuple(share),
                start_at,
                args.chunk_ms,
                args.timeout,
                deadline_s,
            )
            for share in shares
        ]
        before = self.scrape()
        started = time.perf_counter()
        sessions = [s for part in pool.map(run_job, jobs) for s in part]
        wall = time.perf_counter() - started
        after = self.scrape()
        for s in sessions:
            s.rest = self.rest.get(s.clip)
        sessions.sort(key=lambda s: s.stream)
        limits = Limits(args.partial_limit, args.final_limit, args.final_percentile)
        report = summarize(streams, len(jobs), sessions, wall, before, after, limits)
        print_step(report, flush=True)
        return report


HEADER = (
    f"{'streams':>7} {'partial p50/p95/p99 s':>22} {'final p50/p95/p99/max s':>24} {'1st p50/p95':>12}"
    f" {'final=REST':>10} {'err':>4} {'lag p99':>7} {'win/s':>7} {'ms/win':>7} {'busy':>5}"
    f" {'kept %':>6} {'cover %':>7}  verdict"
)


def print_step(s: StepReport, flush: bool = False) -> None:
    partial = f"{fmt(s.partial_p50_s)}/{fmt(s.partial_p95_s)}/{fmt(s.partial_p99_s)}"
    final = (
        f"{fmt(s.final_p50_s)}/{fmt(s.final_p95_s)}/{fmt(s.final_p99_s)}/{fmt(s.final_max_s)}"
    )
    first = f"{fmt(s.first_partial_p50_s)}/{fmt(s.first_partial_p95_s)}"
    same = f"{s.streams - s.mismatches - s.errors}/{s.streams}"
    verdict = "pass" if s.passed else "FAIL: " + "; ".join(s.reasons)
    print(
        f"{s.streams:>7} {partial:>22} {final:>24} {first:>12} {same:>10} {s.errors:>4}"
        f" {fmt(s.client_lag_p99_s):>7} {fmt(s.windows_per_s, 1):>7} {fmt(s.engine_ms_per_window, 1):>7}"
        f" {fmt(s.engine_busy):>5} {fmt(100 * s.kept_share, 1):>6} {fmt(100 * s.covered_share, 1):>7}"
        f"  {verdict}",
        flush=flush,
    )


def print_report(model: str, steps: Sequence[StepReport], limits: Limits) -> None:
    print(
        f"\nmodel {model}: streams within partial p95 <= {limits.partial_p95_s:g} s and final"
        f" p{limits.final_percentile} <= {limits.final_s:g} s, every final == REST"
    )
    print(HEADER)
    print("-" * len(HEADER))
    for s in steps:
        print_step(s)
    print(f"\nlargest passing step: {capacity(steps)} streams ({model})")
    for s in steps:
        shown = 0
        for session in s.sessions:
            if (session.error or not session.matches_rest) and shown < 3:
                shown += 1
                print(
                    f"  [{s.streams}] stream {session.stream} {session.clip}: {session.error or 'differs'}"
                    f"\n    final: {session.final!r}\n    REST:  {session.rest!r}"
                )


def report_json(
    model: str,
    url: str,
    steps: Sequence[StepReport],
    args: argparse.Namespace,
    sessions_detail: bool,
) -> dict:
    out_steps = []
    for s in steps:
        row = {k: v for k, v in asdict(s).items() if k != "sessions"}
        row["kept_share"], row["covered_share"] = s.kept_share, s.covered_share
        if sessions_detail:
            row["sessions"] = [{**asdict(x), "matches_rest": x.matches_rest} for x in s.sessions]
        out_steps.append(row)
    return {
        "model": model,
        "url": url,
        "capacity": capacity(steps),
        "ramp": [s.streams for s in steps],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "steps": out_steps,
    }


def parse_ramp(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--ramp takes comma-separated integers, got {text!r}"
        ) from None
    if (
        not counts
        or any(not 1 <= n <= MAX_STREAMS for n in counts)
        or counts != sorted(set(counts))
    ):
        raise argparse.ArgumentTypeError(
            f"--ramp: increasing counts between 1 and {MAX_STREAMS}, got {text!r}"
        )
    return counts


def parse_env(items: Sequence[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--server-env takes KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--url", help="a running server on this machine (loopback) instead of starting one"
    )
    parser.add_argument(
        "--data", type=Path, help="folder with manifest.tsv (default: dev set, else tests/data)"
    )
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument(
        "--ramp",
        type=parse_ramp,
        default=list(DEFAULT_RAMP),
        help="concurrent stream counts, increasing (default %(default)s)",
    )
    parser.add_argument(
        "--streams", type=int, help="one step of this many streams (the same as --ramp N)"
    )
    parser.add_argument(
        "--keep-going", action="store_true", help="run every step even after one fails"
    )
    parser.add_argument("--clips", type=int, default=16, help="distinct clips (manifest order)")
    parser.add_argument("--min-seconds", type=float, default=0.0, help="shortest clip to use")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="longest clip to use")
    parser.add_argument(
        "--stagger", type=float, default=2.0, help="streams start spread over this many s"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=max(1, min(8, (os.cpu_count() or 2) // 2)),
        help="load processes at most (default: half the cores, at most 8)",
    )
    parser.add_argument("--streams-per-worker", type=int, default=250)
    parser.add_argument("--chunk-ms", type=int, default=100)
    parser.add_argument(
        "--partial-limit", type=float, default=1.0, help="partial latency p95 limit, s"
    )
    parser.add_argument("--final-limit", type=float, default=1.5, help="final latency limit, s")
    parser.add_argument(
        "--final-percentile", type=int, default=95, help="of final latency held to the limit"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="s for a final after the commit"
    )
    parser.add_argument(
        "--time-limit", type=float, default=900.0, help="s for the whole ramp (no new step after)"
    )
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument(
        "--max-batch-size", type=int, help="WHISPER_MAX_BATCH_SIZE of the server it starts"
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more settings for the server it starts (repeatable)",
    )
    parser.add_argument("--server-log", type=Path, help="write the server's output here")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--sessions", action="store_true", help="every session's result in the JSON too"
    )
    args = parser.parse_args(argv)
    if args.streams is not None:
        args.ramp = parse_ramp(str(args.streams))
    if not 10 <= args.chunk_ms <= 1000:
        parser.error("--chunk-ms must be between 10 and 1000")
    if not 1 <= args.workers <= 64 or args.streams_per_worker < 1:
        parser.error("--workers must be between 1 and 64, --streams-per-worker at least 1")
    return args


@contextmanager
def server_for(args: argparse.Namespace) -> Iterator[str]:
    if args.url:
        yield ensure_loopback(args.url)
        return
    env = capacity_env(max(args.ramp))
    if args.max_batch_size:
        env["WHISPER_MAX_BATCH_SIZE"] = str(args.max_batch_size)
    env.update(parse_env(args.server_env))
    with local_server(args.model, args.startup_timeout, extra_env=env, log=args.server_log) as url:
        yield url


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    files = raise_open_files_limit()
    if files < 2 * max(args.ramp) + 256:
        print(
            f"warning: {files} open files allowed; {max(args.ramp)} streams need about"
            f" {2 * max(args.ramp) + 256} (ulimit -n)",
            file=sys.stderr,
        )
    data_dir = args.data or (DEV_SET if (DEV_SET / "manifest.tsv").is_file() else FIXTURES)
    clips = pick_clips(
        load_clips(data_dir, 100_000), args.clips, args.min_seconds, args.max_seconds
    )
    if not clips:
        raise SystemExit(
            f"no clips of {args.min_seconds:g}-{args.max_seconds:g} s in {data_dir / 'manifest.tsv'}"
        )
    audios = [prepare(clip) for clip in clips]
    limits = Limits(args.partial_limit, args.final_limit, args.final_percentile)
    deadline = time.monotonic() + args.time_limit
    print(
        f"{len(audios)} clips of {min(a.seconds for a in audios):.1f}-{max(a.seconds for a in audios):.1f} s,"
        f" model {args.model}, ramp {args.ramp}",
        flush=True,
    )
    with server_for(args) as url:
        bench = Bench(url, args.model, audios, args)
        bench.rest_references()
        context = get_context("spawn")  # no forked copy of this process's threads or sockets
        workers = min(args.workers, max(1, math.ceil(max(args.ramp) / args.streams_per_worker)))
        print(HEADER, flush=True)
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init_worker, initargs=(audios,)
        ) as pool:
            steps = run_ramp(
                args.ramp,
                lambda n: bench.step(pool, n),
                keep_going=args.keep_going,
                deadline=deadline,
            )
    print_report(args.model, steps, limits)
    if args.json:
        args.json.write_text(
            json.dumps(
                report_json(args.model, url, steps, args, args.sessions), indent=2, default=str
            )
        )
    if (
        len(steps) < len(args.ramp)
        and time.monotonic() >= deadline
        and all(s.passed for s in steps)
    ):
        print(f"ramp stopped: over --time-limit {args.time_limit:.0f} s", file=sys.stderr)
        return 2
    return 0 if capacity(steps) > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
