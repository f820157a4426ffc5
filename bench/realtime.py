"""Realtime streaming benchmark: N concurrent real-time sessions on /v1/realtime.

Each session streams one clip as 24 kHz PCM16 in 100 ms `input_audio_buffer.append` events at
real-time pace (turn detection off: the clip is one turn), commits, and waits for the final
transcript, which must equal what POST /v1/audio/transcriptions returns for the same audio.
Clips are reused round-robin when there are fewer clips than streams.

Prints one row per session (first-partial latency: from sending the first chunk that holds
speech to receiving the first delta; partials: deltas before the commit, the rest is the
final's remainder; final latency after the commit; final == REST)
and a summary: p50/p95 first-partial latency over the sessions, and p50/p95 of the server's
own partial latency histogram (`whisper_partial_latency_seconds`: audio chunk arrival to the
delta it triggered being sent) read back from /metrics for this run.

    python -m bench.realtime                          # 8 streams, dev set beside the clone
    python -m bench.realtime --streams 4 --data tests/data
    python -m bench.realtime --url http://127.0.0.1:8000 --json out.json

Bounded: at most 64 streams, a --time-limit for the whole run. Exit status 1 if a session
failed or a final differs from REST.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import websockets
from prometheus_client.parser import text_string_to_metric_families

from app.audio.decode import decode_audio
from app.audio.pcm import float_to_pcm16, pcm16_to_wav
from app.audio.vad import VadOptions, speech_regions
from bench.concurrency import (
    DEV_SET,
    FIXTURES,
    Clip,
    ensure_loopback,
    load_clips,
    local_server,
    percentile,
)

RATE = 24000
MAX_STREAMS = 64
PARTIAL_METRIC = "whisper_partial_latency_seconds"


@dataclass(frozen=True)
class StreamAudio:
    clip: Clip
    pcm: bytes  # 24 kHz mono PCM16, exactly what is streamed and what REST receives
    speech_start_s: float  # where the offline VAD first hears speech


@dataclass
class SessionResult:
    stream: int
    clip: str
    deltas: list[str] = field(default_factory=list)
    partials: int = 0  # deltas received before the commit (after it: the final's remainder)
    first_partial_s: float | None = None  # first speech chunk sent -> first partial received
    final: str | None = None
    final_latency_s: float | None = None  # commit sent -> completed received
    rest: str | None = None
    error: str | None = None

    @property
    def matches_rest(self) -> bool:
        return self.final is not None and self.final == self.rest

SPEECH_ONSET = VadOptions(speech_pad_ms=100)


def prepare(clip: Clip) -> StreamAudio:
    data = clip.path.read_bytes()
    audio = decode_audio(data, sample_rate=RATE)
    # Silero's onset, padded by 100 ms: an early (conservative) mark for partial latency
    regions = speech_regions(decode_audio(data, sample_rate=16000), SPEECH_ONSET)
    return StreamAudio(clip, float_to_pcm16(audio), regions[0][0] / 16000 if regions else 0.0)


def wav_bytes(pcm: bytes, rate: int = RATE) -> bytes:
    return pcm16_to_wav(pcm, rate)


async def rest_transcript(client: httpx.AsyncClient, audio: StreamAudio) -> str:
    response = await client.post(
        "/v1/audio/transcriptions",
        files={"file": (f"{audio.clip.id}.wav", wav_bytes(audio.pcm), "audio/wav")},
    )
    response.raise_for_status()
    return response.json()["text"]


async def stream_session(
    ws_url: str, index: int, audio: StreamAudio, *, chunk_ms: int, timeout_s: float
) -> SessionResult:
    """One real-time session: stream, commit, wait for the final."""
    result = SessionResult(index, audio.clip.id)
    step = RATE * chunk_ms // 1000 * 2  # bytes per chunk
    speech_chunk = int(audio.speech_start_s * 1000 // chunk_ms)
    speech_sent_at: float | None = None
    commit_sent_at: float | None = None
    async with websockets.connect(ws_url, open_timeout=30, max_size=None) as ws:

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
                            "transcription": {"model": "whisper-1"},
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
                        if result.first_partial_s is None and speech_sent_at is not None:
                            result.first_partial_s = now - speech_sent_at
                    result.deltas.append(event["delta"])
                elif kind == "conversation.item.input_audio_transcription.completed":
                    result.final = event["transcript"]
                    if commit_sent_at is not None:
                        result.final_latency_s = now - commit_sent_at
                    return
                elif kind in ("error", "conversation.item.input_audio_transcription.failed"):
                    result.error = event["error"]["message"]
                    return

        receiver = asyncio.create_task(receive())
        started = time.perf_counter()
        for n, offset in enumerate(range(0, len(audio.pcm), step)):
            # Real-time pace: chunk n leaves when its audio would have been spoken.
            await asyncio.sleep(max(0.0, started + n * chunk_ms / 1000 - time.perf_counter()))
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
    return result


def partial_histogram(metrics_text: str) -> dict[float, float]:
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name == PARTIAL_METRIC:
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    buckets[float(sample.labels["le"])] = sample.value
    return buckets


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


@dataclass
class Report:
    sessions: list[SessionResult]
    first_partial_p50_s: float
    first_partial_p95_s: float
    partial_p50_s: float  # server histogram
    partial_p95_s: float
    partials_sent: int
    wall_s: float

    @property
    def ok(self) -> bool:
        return all(s.error is None and s.matches_rest for s in self.sessions)


async def run(
    url: str, audios: Sequence[StreamAudio], streams: int, *, chunk_ms: int, timeout_s: float
) -> Report:
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as client:
        rest = {a.clip.id: await rest_transcript(client, a) for a in audios}
        before = partial_histogram((await client.get("/metrics")).text)
        ws_url = url.replace("http://", "ws://", 1) + "/v1/realtime?intent=transcription"
        started = time.perf_counter()
        sessions = await asyncio.gather(
            *(
                stream_session(
                    ws_url, i, audios[i % len(audios)], chunk_ms=chunk_ms, timeout_s=timeout_s
                )
                for i in range(streams)
            )
        )
        wall = time.perf_counter() - started
        after = partial_histogram((await client.get("/metrics")).text)
    for session in sessions:
        session.rest = rest[session.clip]
    firsts = [s.first_partial_s for s in sessions if s.first_partial_s is not None]
    sent = after.get(math.inf, 0.0) - before.get(math.inf, 0.0)
    return Report(
        sessions=list(sessions),
        first_partial_p50_s=percentile(firsts, 50),
        first_partial_p95_s=percentile(firsts, 95),
        partial_p50_s=histogram_quantile(before, after, 0.50),
        partial_p95_s=histogram_quantile(before, after, 0.95),
        partials_sent=int(sent),
        wall_s=wall,
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def print_report(report: Report) -> None:
    header = (
        f"{'stream':>6}  {'clip':<34}{'1st partial s':>14}{'partials':>9}{'deltas':>8}"
        f"{'final s':>9}  final == REST"
    )
    print("\n" + header)
    print("-" * len(header))
    for s in report.sessions:
        verdict = "yes" if s.matches_rest else f"NO ({s.error or 'differs'})"
        print(
            f"{s.stream:>6}  {s.clip[:33]:<34}{_fmt(s.first_partial_s):>14}{s.partials:>9}{len(s.deltas):>8}"
            f"{_fmt(s.final_latency_s):>9}  {verdict}"
        )
    print(
        f"\n{len(report.sessions)} concurrent real-time streams in {report.wall_s:.1f} s wall"
        f"\nfirst partial (speech start -> first delta): p50 {_fmt(report.first_partial_p50_s)} s,"
        f" p95 {_fmt(report.first_partial_p95_s)} s"
        f"\npartial latency from /metrics ({report.partials_sent} deltas, chunk arrival -> delta"
        f" sent): p50 {_fmt(report.partial_p50_s)} s, p95 {_fmt(report.partial_p95_s)} s"
    )
    for s in report.sessions:
        if not s.matches_rest:
            print(f"\n  stream {s.stream} {s.clip}\n    final: {s.final!r}\n    REST:  {s.rest!r}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--url", help="use a running server on this machine instead of starting one"
    )
    parser.add_argument(
        "--data", type=Path, help="folder with manifest.tsv (default: dev set, else tests/data)"
    )
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument(
        "--streams", type=int, default=8, help=f"concurrent sessions (max {MAX_STREAMS})"
    )
    parser.add_argument("--clips", type=int, default=8, help="distinct clips to use")
    parser.add_argument("--chunk-ms", type=int, default=100)
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds per session after its audio"
    )
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds for the whole run")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not 1 <= args.streams <= MAX_STREAMS:
        parser.error(f"--streams must be between 1 and {MAX_STREAMS}")
    if not 10 <= args.chunk_ms <= 1000:
        parser.error("--chunk-ms must be between 10 and 1000")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data_dir = args.data or (DEV_SET if (DEV_SET / "manifest.tsv").is_file() else FIXTURES)
    clips = load_clips(data_dir, min(args.clips, args.streams))
    if not clips:
        raise SystemExit(f"no clips in {data_dir / 'manifest.tsv'}")
    audios = [prepare(clip) for clip in clips]

    async def bounded(url: str) -> Report:
        return await asyncio.wait_for(
            run(url, audios, args.streams, chunk_ms=args.chunk_ms, timeout_s=args.timeout),
            timeout=args.time_limit,
        )

    try:
        if args.url:
            report = asyncio.run(bounded(ensure_loopback(args.url)))
        else:
            with local_server(args.model, args.startup_timeout) as url:
                report = asyncio.run(bounded(url))
    except TimeoutError:
        print(f"benchmark stopped: over --time-limit {args.time_limit:.0f} s", file=sys.stderr)
        return 2
    print_report(report)
    if args.json:
        payload = {
            **{k: v for k, v in asdict(report).items() if k != "sessions"},
            "sessions": [{**asdict(s), "matches_rest": s.matches_rest} for s in report.sessions],
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
