"""Shared fixtures: paths to test data, synthetic audio, and the API with a fake runtime.

Keep this file to fixtures several test modules use; module-specific helpers live in the
module that needs them.
"""

from __future__ import annotations

import asyncio
import io
import os
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.decoding.options import TranscribeOptions
from app.decoding.results import Segment, TranscriptionResult, Word
from app.decoding.transcribe import SegmentCallback
from app.engine.config import EngineConfig, ModelDims, SpecialTokens

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_DATA = REPO_ROOT / "tests" / "data"
#: The shared dev set lives beside the repository (CI places it next to the clone).
DEV_SET = REPO_ROOT.parent / "shared" / "data" / "speech" / "dev"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def test_data_dir() -> Path:
    return TEST_DATA


@pytest.fixture(scope="session")
def dev_set_dir() -> Path:
    """The shared dev set; tests needing it skip cleanly where it is absent."""
    if not (DEV_SET / "manifest.tsv").is_file():
        pytest.skip(f"dev set not found at {DEV_SET}")
    return DEV_SET


# --- synthetic audio -------------------------------------------------------------------------



async def started_port(server: Any, task: asyncio.Task[None]) -> int:
    """Wait until a uvicorn server running as `task` listens; its port (it may have been 0)."""
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("server stopped before starting")
        await asyncio.sleep(0.01)
    return server.servers[0].sockets[0].getsockname()[1]

def make_wav(seconds: float = 1.0, sample_rate: int = 16_000, frequency: float = 440.0) -> bytes:
    """A 16-bit mono WAV of a quiet sine: decodes everywhere, costs nothing to build."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    pcm = (0.1 * np.sin(2 * np.pi * frequency * t) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


@pytest.fixture(scope="session")
def wav_bytes() -> bytes:
    return make_wav()


# --- a fake runtime for API tests -----------------------------------------------------------


def make_engine_config(name: str = "tiny.en", *, multilingual: bool = False) -> EngineConfig:
    languages = {"en": 50259, "fr": 50265, "de": 50261} if multilingual else {}
    return EngineConfig(
        name=name,
        dims=ModelDims(
            n_mels=80,
            n_audio_state=384,
            n_audio_head=6,
            n_audio_layer=4,
            n_text_state=384,
            n_text_head=6,
            n_text_layer=4,
            n_vocab=51865 if multilingual else 51864,
            ffn_dim=1536,
        ),
        multilingual=multilingual,
        special_tokens=SpecialTokens(
            eot=50257,
            sot=50258,
            translate=50358,
            transcribe=50359,
            sot_lm=50360,
            sot_prev=50361,
            no_speech=50362,
            no_timestamps=50363,
            timestamp_begin=50364,
            languages=languages,
        ),
        suppress_tokens=[],
        suppress_tokens_begin=[],
        alignment_heads=[],
        weights_sha256="0" * 64,
    )


def make_result(
    text: str = " Hello world.", duration: float = 1.0, language: str = "en"
) -> TranscriptionResult:
    words = [Word(" Hello", 0.0, 0.4, 0.9), Word(" world.", 0.4, 0.9, 0.8)]
    segment = Segment(
        id=0,
        seek=0,
        start=0.0,
        end=0.9,
        text=text,
        tokens=[50364, 2425, 1002, 13, 50409],
        temperature=0.0,
        avg_logprob=-0.2,
        compression_ratio=0.9,
        no_speech_prob=0.01,
        words=words,
    )
    return TranscriptionResult(
        text=text.strip(), segments=[segment], language=language, duration=duration
    )


class FakeRuntime:
    """Implements app.runtime.Runtime without an engine; records what the API asked of it."""

    def __init__(
        self,
        name: str = "tiny.en",
        *,
        multilingual: bool = False,
        result: TranscriptionResult | None = None,
        error: BaseException | None = None,
        block: bool = False,
    ) -> None:
        self.name = name
        self.config = make_engine_config(name, multilingual=multilingual)
        self.result = result or make_result()
        self.error = error
        self.block = block
        self.calls: list[tuple[np.ndarray, TranscribeOptions, float | None]] = []
        self.started = False
        self.stopped = False
        self.entered = asyncio.Event()
        self.cancelled = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def transcribe(
        self,
        audio: np.ndarray,
        options: TranscribeOptions,
        *,
        duration_limit_s: float | None = None,
        on_segment: SegmentCallback | None = None,
    ) -> TranscriptionResult:
        self.calls.append((audio, options, duration_limit_s))
        self.entered.set()
        if self.error is not None:
            raise self.error
        if self.block:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        for segment in self.result.segments if on_segment is not None else ():
            await on_segment(segment)
        return self.result

    def queue_depth(self) -> int:
        return 0

    def active_rows(self) -> int:
        return 0

    @property
    def last_options(self) -> TranscribeOptions:
        return self.calls[-1][1]


@pytest.fixture
def fake_runtime() -> FakeRuntime:
    return FakeRuntime()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read WHISPER_* variables; tests must not depend on the caller's environment."""
    for key in list(os.environ):
        if key.startswith("WHISPER_"):
            monkeypatch.delenv(key)


ClientFactory = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def make_client(clean_env: None) -> AsyncIterator[ClientFactory]:
    """`await make_client(runtimes=None, **settings)` -> an httpx client on a started app.

    The app's lifespan runs (start() on each runtime) and is closed at teardown; the app is
    reachable as `client.app` for tests that need its state.
    """
    from app.config import Settings
    from app.main import create_app

    async with AsyncExitStack() as stack:

        async def factory(
            runtimes: dict[str, FakeRuntime] | None = None,
            *,
            raise_app_exceptions: bool = True,
            **settings: object,
        ) -> httpx.AsyncClient:
            runtimes = runtimes or {"tiny.en": FakeRuntime()}
            settings.setdefault("models", list(runtimes))
            app = create_app(Settings(**settings), runtimes)  # type: ignore[arg-type]
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
            client = httpx.AsyncClient(transport=transport, base_url="http://testserver")
            client.app = app  # type: ignore[attr-defined]
            await stack.enter_async_context(client)
            return client

        yield factory


def assert_openai_error(
    response: httpx.Response,
    status: int,
    *,
    param: str | None = None,
    code: str | None = None,
    error_type: str | None = None,
) -> dict:
    """The exact OpenAI error shape, and the given fields where the caller names them."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    if error_type is not None:
        assert error["type"] == error_type
    return error
