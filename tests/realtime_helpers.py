"""Helpers for the realtime tests: a scripted runtime, an in-process server, a small client.

The in-process server is real uvicorn on a loopback port (so frame limits, close codes and
the handshake are the real ones) running in the test's own event loop, with fake runtimes
instead of engines: protocol tests take milliseconds.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
import websockets
from conftest import make_engine_config, make_result, started_port
from test_e2e_server import STARTUP_TIMEOUT_S, Server, _server_env

from app.audio.decode import decode_audio
from app.audio.pcm import float_to_pcm16, pcm16_to_wav
from app.audio.resample import resample
from app.constants import SAMPLE_RATE
from app.decoding.options import TranscribeOptions
from app.decoding.results import TranscriptionResult
from app.decoding.transcribe import SegmentCallback
from bench.server_process import ServerStartError
from bench.server_process import serve as serve_subprocess

DATA = Path(__file__).parent / "data"
SCRIPT = [
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
]
FINAL_SUFFIX = " (final)"


def is_greedy(options: TranscribeOptions) -> bool:
    return options.window.beam_size == 1 and options.temperatures == (0.0,)


class ScriptedRuntime:
    """Implements app.runtime.Runtime: the transcript grows with the audio's length.

    Partials (greedy) return one word of SCRIPT per `word_s` seconds of audio; finals return
    the same words, so partial deltas and final agree, unless `final_suffix` is set. Each
    decode takes `delay_s` (finals also the next of `final_delays`); `block` makes every
    decode wait until cancelled.
    """

    def __init__(
        self,
        *,
        word_s: float = 0.3,
        delay_s: float = 0.0,
        block: bool = False,
        final_suffix: str = "",
        error: BaseException | None = None,
        final_delays: list[float] | None = None,
    ) -> None:
        self.name = "tiny.en"
        self.config = make_engine_config("tiny.en")
        self.word_s = word_s
        self.delay_s = delay_s
        self.block = block
        self.final_suffix = final_suffix
        self.error = error
        self.final_delays = list(final_delays or [])  # per final decode, in call order
        self.calls: list[tuple[float, bool]] = []  # (audio seconds, greedy)
        self.in_flight = 0
        self.max_in_flight = 0
        self.cancelled = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def text_for(self, seconds: float) -> str:
        return " ".join(SCRIPT[: int(seconds / self.word_s)])

    async def transcribe(
        self,
        audio: np.ndarray,
        options: TranscribeOptions,
        *,
        duration_limit_s: float | None = None,
        on_segment: SegmentCallback | None = None,
    ) -> TranscriptionResult:
        seconds = len(audio) / SAMPLE_RATE
        greedy = is_greedy(options)
        self.calls.append((seconds, greedy))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.block:
                await asyncio.Event().wait()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if not greedy and self.final_delays:
                await asyncio.sleep(self.final_delays.pop(0))
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
        if self.error is not None and not greedy:
            raise self.error
        text = self.text_for(seconds) + ("" if greedy else self.final_suffix)
        result = make_result(" " + text, duration=seconds)
        for segment in result.segments if on_segment is not None else ():
            await on_segment(segment)
        return result

    def queue_depth(self) -> int:
        return 0

    def active_rows(self) -> int:
        return 0


@asynccontextmanager
async def serve(runtime: object, **settings: Any) -> AsyncIterator[str]:
    """Run the app on a free loopback port in this event loop; yields 'host:port'."""
    from app.config import Settings
    from app.main import create_app

    app = create_app(Settings(models=["tiny.en"], **settings), {"tiny.en": runtime})  # type: ignore[dict-item]
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        port = await started_port(server, task)
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)


class Client:
    """A websockets client speaking the Realtime events, with timeouts on every read."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []

    async def send(self, **event: Any) -> None:
        await self.ws.send(json.dumps(event))

    async def append(self, samples: np.ndarray, rate: int = 24000) -> None:
        audio = base64.b64encode(float_to_pcm16(samples)).decode()
        await self.send(type="input_audio_buffer.append", audio=audio)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        event = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.events.append(event)
        return event

    async def expect(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        """Read until an event of this type arrives (earlier ones stay in `events`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = await self.recv(max(0.01, deadline - loop.time()))
            if event["type"] == kind:
                return event

    async def expect_count(
        self, kind: str, count: int, timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """Read until `count` events of this type have arrived in all; returns them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.of_type(kind)) < count:
            await self.recv(max(0.01, deadline - loop.time()))
        return self.of_type(kind)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]


@asynccontextmanager
async def connect(
    address: str, *, path: str = "/v1/realtime?intent=transcription", **kwargs: Any
) -> AsyncIterator[Client]:
    async with websockets.connect(f"ws://{address}{path}", open_timeout=5, **kwargs) as ws:
        yield Client(ws)


#: (fixture, start s, end s): stretches Silero VAD scores as speech in every 32 ms frame.
_VOICED = (
    ("ljspeech-LJ001-0002.flac", 0.032, 1.856),
    ("ljspeech-LJ001-0008.flac", 0.032, 1.76),
)


@cache
def _voiced_16k() -> np.ndarray:
    parts = []
    for name, start, end in _VOICED:
        audio = decode_audio((DATA / name).read_bytes(), sample_rate=SAMPLE_RATE)
        parts.append(audio[round(start * SAMPLE_RATE) : round(end * SAMPLE_RATE)])
    return np.concatenate(parts)


def speech(seconds: float, rate: int = 24000) -> np.ndarray:
    """`seconds` of continuous real speech (fixture clips, repeated as needed) at `rate`."""
    voiced = _voiced_16k()
    need = round(seconds * SAMPLE_RATE)
    audio = np.tile(voiced, -(-need // len(voiced)))[:need]
    return resample(audio, SAMPLE_RATE, rate) if rate != SAMPLE_RATE else audio.copy()


def quiet(seconds: float, rate: int = 24000, level: float = 1e-4) -> np.ndarray:
    """Faint noise: silence with a noise floor (digital zeros are a degenerate case)."""
    rng = np.random.default_rng(0)
    return (level * rng.standard_normal(round(seconds * rate))).astype(np.float32)


# --- a real server (real engine), for the end-to-end tests ---------------------------------


@contextmanager
def real_server(engine_dir: Path, log: Path, **env: str) -> Iterator[Server]:
    """`whisper-serve` on a free loopback port, as tests/test_e2e_server.py starts it."""
    with log.open("wb") as out:
        try:
            with serve_subprocess(_server_env(engine_dir.parent, **env), output=out, log=log,
                       startup_timeout_s=STARTUP_TIMEOUT_S) as running:
                yield Server(running.url, running.port, running.process, log)
        except ServerStartError as exc:
            pytest.fail(str(exc))


def clip_pcm24(path: Path) -> bytes:
    """A fixture clip as 24 kHz mono PCM16: what OpenAI clients stream."""
    return float_to_pcm16(decode_audio(path.read_bytes(), sample_rate=24000))


def wav_bytes(pcm: bytes, rate: int = 24000) -> bytes:
    return pcm16_to_wav(pcm, rate)


def rest_transcript(url: str, pcm: bytes, rate: int = 24000) -> str:
    """What POST /v1/audio/transcriptions says about the same PCM, sent as a WAV file."""
    response = httpx.post(
        f"{url}/v1/audio/transcriptions",
        files={"file": ("clip.wav", wav_bytes(pcm, rate), "audio/wav")},
        timeout=300,
    )
    response.raise_for_status()
    return response.json()["text"]
