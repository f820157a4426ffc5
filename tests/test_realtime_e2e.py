"""End to end: real-time streams into a real `whisper-serve` (tiny.en on this CPU).

- The official `openai` SDK's realtime client streams a fixture clip in 100 ms chunks at
  real-time pace; the final transcript must equal the REST transcript of the same audio,
  and the first partial must arrive soon after speech starts.
- Server VAD splits a clip with pauses into turns.
- 8 concurrent real-time streams (bench/realtime.py): every final equals REST; p95 partial
  latency printed and read back from /metrics.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from conftest import REPO_ROOT
from realtime_helpers import clip_pcm24, real_server, rest_transcript
from test_e2e_server import CLIPS, JFK, Server, wer
from test_e2e_server import engine_dir as engine_dir  # noqa: F401 (the fixture, reused)

from app.audio.pcm import pcm16_to_float
from app.audio.resample import resample
from app.audio.vad import VadOptions, speech_regions

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHUNK_MS = 100
RATE = 24000
#: The issue's target for speech start -> first partial delta.
FIRST_PARTIAL_TARGET_S = 1.5


@pytest.fixture(scope="module")
def server(engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("realtime-server") / "server.log"
    # Two partial decodes in flight at most, server-wide: about what 2 CPU cores manage
    # within the partial interval; more only delays the finals queued behind them.
    with real_server(engine_dir, log, WHISPER_REALTIME_MAX_PARTIAL_DECODES="2") as running:
        yield running


@dataclass
class Stream:
    deltas: list[tuple[float, str]] = field(default_factory=list)  # (receive time, text)
    finals: list[dict] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    speech_sent_at: float | None = None
    commit_sent_at: float | None = None  # manual mode: later deltas complete the final

    @property
    def first_partial_s(self) -> float | None:
        end = self.commit_sent_at or float("inf")
        partials = [t for t, _ in self.deltas if t < end]
        if not partials or self.speech_sent_at is None:
            return None
        return partials[0] - self.speech_sent_at


def speech_start_s(pcm: bytes) -> float:
    """Where speech begins (Silero's onset less 100 ms of padding: an early, conservative mark)."""
    audio16 = resample(pcm16_to_float(pcm), RATE, 16000)
    regions = speech_regions(audio16, VadOptions(speech_pad_ms=100))
    return regions[0][0] / 16000 if regions else 0.0


def metric_sum(url: str, name: str) -> tuple[float, float]:
    """(sum, count) of a histogram from /metrics, over all label sets."""
    values = {"sum": 0.0, "count": 0.0}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        for key in values:
            if line.startswith((f"{name}_{key} ", f"{name}_{key}{{")):
                values[key] += float(line.split()[-1])
    return values["sum"], values["count"]


def words(text: str) -> list[str]:
    return [re.sub(r"[^\w']", "", w.lower()) for w in text.split()]


async def stream_with_sdk(
    server: Server, pcm: bytes, session: dict, tail_silence_s: float = 0.0
) -> Stream:
    """Stream `pcm` at real-time pace through openai.AsyncOpenAI().realtime; collect events."""
    client = openai.AsyncOpenAI(
        api_key="unused",
        base_url=f"{server.url}/v1",
        websocket_base_url=f"ws://127.0.0.1:{server.port}/v1",
    )
    result = Stream()
    manual = session["audio"]["input"]["turn_detection"] is None
    speech_chunk = int(speech_start_s(pcm) * 1000 // CHUNK_MS)
    step = RATE * CHUNK_MS // 1000 * 2
    pcm = pcm + bytes(round(tail_silence_s * RATE) * 2)
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
        created = await connection.recv()
        assert created.type == "session.created"
        await connection.session.update(session=session)  # type: ignore[arg-type]

        async def receive() -> None:
            async for event in connection:
                result.events.append(event.type)
                if event.type == "conversation.item.input_audio_transcription.delta":
                    result.deltas.append((time.perf_counter(), event.delta or ""))
                elif event.type == "conversation.item.input_audio_transcription.completed":
                    result.finals.append({"item_id": event.item_id, "transcript": event.transcript})
                    if manual:
                        return
                elif event.type in ("error", "conversation.item.input_audio_transcription.failed"):
                    raise AssertionError(f"{event.type}: {event}")

        receiver = asyncio.create_task(receive())
        started = time.perf_counter()
        for n, offset in enumerate(range(0, len(pcm), step)):
            await asyncio.sleep(max(0.0, started + n * CHUNK_MS / 1000 - time.perf_counter()))
            await connection.input_audio_buffer.append(
                audio=base64.b64encode(pcm[offset : offset + step]).decode()
            )
            if n == speech_chunk:
                result.speech_sent_at = time.perf_counter()
        if manual:
            result.commit_sent_at = time.perf_counter()
            await connection.input_audio_buffer.commit()
            await asyncio.wait_for(receiver, 300)
        else:
            await asyncio.sleep(0)
            for _ in range(3000):  # until every committed turn has its final
                if receiver.done() or result.events.count("input_audio_buffer.committed") == len(
                    result.finals
                ):
                    break
                await asyncio.sleep(0.1)
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
    return result


MANUAL_SESSION = {
    "type": "transcription",
    "audio": {
        "input": {
            "format": {"type": "audio/pcm", "rate": RATE},
            "transcription": {"model": "whisper-1"},
            "turn_detection": None,
        }
    },
}


async def test_sdk_stream_final_equals_rest_and_partials_come_early(server: Server) -> None:
    clip = CLIPS[JFK]
    pcm = clip_pcm24(clip.path)
    rest = rest_transcript(server.url, pcm)
    encode_before = metric_sum(server.url, "whisper_encode_seconds")
    partial_before = metric_sum(server.url, "whisper_partial_latency_seconds")

    stream = await stream_with_sdk(server, pcm, MANUAL_SESSION)

    final = stream.finals[0]["transcript"]
    sent = "".join(text for _, text in stream.deltas)
    encode_sum, encode_count = (
        a - b
        for a, b in zip(
            metric_sum(server.url, "whisper_encode_seconds"), encode_before, strict=True
        )
    )
    encode_s = encode_sum / max(encode_count, 1)
    partial_sum, partial_count = (
        a - b
        for a, b in zip(
            metric_sum(server.url, "whisper_partial_latency_seconds"), partial_before, strict=True
        )
    )
    first = stream.first_partial_s
    print(
        f"\n[realtime] first partial {first if first is None else round(first, 3)} s after the first"
        f" speech chunk (target {FIRST_PARTIAL_TARGET_S} s); {len(stream.deltas)} deltas;"
        f" mean encoder call on this CPU {encode_s:.2f} s; server partial latency (/metrics)"
        f" mean {partial_sum / max(partial_count, 1):.2f} s over {partial_count:.0f} deltas"
        f"\n[realtime] deltas: {sent!r}\n[realtime] final:  {final!r}\n[realtime] REST:   {rest!r}"
    )
    assert final == rest
    assert wer(clip.text, final) < 0.10
    assert first is not None, "no partial transcript before the commit"
    # Stable partials: what was sent lines up with the start of the final word for word (case
    # and punctuation aside) up to revised words: partials are tiny.en greedy decodes of a
    # growing turn ("what you are country" before "your country" is said), the final is beam
    # search over the whole turn, and a word once sent is never taken back.
    sent_words = words(sent)
    final_words = words(final)[: len(sent_words)]
    assert len(final_words) == len(sent_words)
    revised = sum(a != b for a, b in zip(sent_words, final_words, strict=True))
    assert revised <= max(2, len(sent_words) // 4), (sent_words, final_words)
    # How early the first partial comes is a latency figure: it is printed above and measured by
    # `python -m bench.realtime`, not asserted here, where it depends on what else the machine
    # runs (the project checks speed with benchmarks, never with timed tests). What this test
    # holds is that a partial comes before the commit at all (asserted above).


async def test_server_vad_splits_turns_and_transcribes_each(server: Server) -> None:
    clip = CLIPS[JFK]  # pauses of about 0.5 s between its phrases
    pcm = clip_pcm24(clip.path)
    session = {
        "type": "transcription",
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": RATE},
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 400},
            }
        },
    }
    stream = await stream_with_sdk(server, pcm, session, tail_silence_s=1.0)
    texts = [f["transcript"] for f in stream.finals]
    print(f"\n[realtime] server VAD turns: {texts}")
    assert stream.events.count("input_audio_buffer.speech_started") >= 2
    assert len(texts) == stream.events.count("input_audio_buffer.committed") >= 2
    assert wer(clip.text, " ".join(texts)) < 0.25


def test_eight_concurrent_streams(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "realtime.json"
    before = httpx.get(f"{server.url}/metrics").text
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.realtime",
            "--url",
            server.url,
            "--ramp",
            "8",
            "--workers",
            "2",
            "--data",
            str(REPO_ROOT / "tests" / "data"),
            "--max-seconds",
            "30",
            "--timeout",
            "300",
            "--time-limit",
            "600",
            "--sessions",
            "--json",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=660,
    )
    print(result.stdout[-6000:], result.stderr[-3000:])
    assert out.is_file(), result.stderr[-3000:]
    report = json.loads(out.read_text())
    (step,) = report["steps"]
    sessions = step["sessions"]
    assert len(sessions) == 8
    for session in sessions:
        assert session["error"] is None, session
        assert session["matches_rest"], session
    # pass or fail on latency depends on what else this machine runs: not asserted here
    assert result.returncode in (0, 1)
    after = httpx.get(f"{server.url}/metrics").text
    assert "whisper_partial_latency_seconds_bucket" in after and after != before
    assert "whisper_websocket_sessions 0.0" in after  # every session closed
    print(
        f"[realtime] 8 streams: p95 first partial {step['first_partial_p95_s']},"
        f" p95 partial latency (/metrics) {step['partial_p95_s']} s over {step['deltas']} deltas"
    )


def test_sse_stream_matches_the_plain_response(server: Server) -> None:
    """stream=true through the real engine, read by the OpenAI SDK."""
    clip = CLIPS[JFK]
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=300)
    with clip.path.open("rb") as audio:
        plain = sdk.audio.transcriptions.create(model="whisper-1", file=audio)
    with clip.path.open("rb") as audio:
        events = list(sdk.audio.transcriptions.create(model="whisper-1", file=audio, stream=True))
    assert events[-1].type == "transcript.text.done"
    assert events[-1].text == plain.text
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert deltas and "".join(deltas) == plain.text
