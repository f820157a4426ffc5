"""The server around the app: connection limits, timeouts, early close, drain, log redaction.

Runs the real server stack (`app.cli.build_server`: uvicorn with our protocols and shutdown
stages) in the test's event loop on a loopback port, with fake runtimes instead of engines,
so each test takes a second or two. Raw sockets play the misbehaving clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from conftest import FakeRuntime, make_wav, started_port

from app.cli import build_server
from app.config import Settings
from app.main import create_app
from app.server.server import DrainingServer

pytestmark = pytest.mark.usefixtures("clean_env")

KEY = "sk-test-0123456789abcdef"
WRONG_KEY = "sk-wrong-fedcba9876543210"


class SlowRuntime(FakeRuntime):
    """A runtime whose transcriptions take `delay_s` (None: until cancelled)."""

    def __init__(self, delay_s: float | None) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.running = 0

    async def transcribe(self, audio: np.ndarray, options: Any, **kwargs: Any) -> Any:
        self.running += 1
        try:
            if self.delay_s is None:
                await asyncio.Event().wait()
            await asyncio.sleep(self.delay_s)
            return self.result
        finally:
            self.running -= 1


@dataclass
class Running:
    server: DrainingServer
    task: asyncio.Task[None]
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def sigterm(self) -> None:
        self.server.handle_exit(signal.SIGTERM, None)


@asynccontextmanager
async def running(runtime: object | None = None, **settings: Any) -> AsyncIterator[Running]:
    settings.setdefault("log_level", "info")
    config = Settings(models=["tiny.en"], port=0, **settings)
    app = create_app(config, {"tiny.en": runtime or FakeRuntime()})  # type: ignore[dict-item]
    server = build_server(app, config)
    task = asyncio.create_task(server.serve())
    try:
        port = await started_port(server, task)
        yield Running(server, task, "127.0.0.1", port)
    finally:
        if not task.done():
            server.should_exit = True
            await asyncio.wait_for(task, timeout=30)


def upload_request(port: int, body: bytes, *, query: str = "", headers: str = "") -> bytes:
    """Raw multipart POST head for /v1/audio/transcriptions (the body is sent separately)."""
    return (
        f"POST /v1/audio/transcriptions{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: multipart/form-data; boundary=xyz\r\n"
        f"Content-Length: {len(body)}\r\n{headers}\r\n"
    ).encode()


def multipart(data: bytes) -> bytes:
    return (
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\n" + data + b"\r\n--xyz--\r\n"
    )


async def read_until_closed(
    reader: asyncio.StreamReader, timeout: float
) -> tuple[bytes, float | None]:
    """Everything the server sends until it closes; and when it closed (None: it did not)."""
    data = b""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            part = await asyncio.wait_for(reader.read(65536), max(0.01, deadline - loop.time()))
        except TimeoutError:
            return data, None
        except ConnectionResetError:
            return data, loop.time()
        if not part:
            return data, loop.time()
        data += part


# --- header and body deadlines ---------------------------------------------------------------


async def test_a_silent_connection_is_closed_after_the_header_timeout() -> None:
    async with running(http_header_timeout_s=0.5) as srv:
        reader, writer = await asyncio.open_connection(srv.host, srv.port)
        opened = asyncio.get_running_loop().time()
        data, closed = await read_until_closed(reader, 5)
        writer.close()
    assert closed is not None and closed - opened < 2.0
    assert data == b""


async def test_headers_trickling_in_get_408() -> None:
    async with running(http_header_timeout_s=0.5) as srv:
        reader, writer = await asyncio.open_connection(srv.host, srv.port)
        writer.write(b"GET /health HTTP/1.1\r\n")
        trickle = asyncio.create_task(_trickle(writer, b"X-Slow: " + b"a" * 50))
        data, closed = await read_until_closed(reader, 5)
        trickle.cancel()
        writer.close()
    assert closed is not None
    assert data.startswith(b"HTTP/1.1 408"), data


async def _trickle(writer: asyncio.StreamWriter, data: bytes, every_s: float = 0.1) -> None:
    with contextlib.suppress(ConnectionError):
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(every_s)


async def test_a_body_at_one_byte_a_second_is_cut_with_408() -> None:
    body = multipart(make_wav(0.5))
    async with running(http_body_timeout_s=1.0, http_body_min_rate=1000) as srv:
        reader, writer = await asyncio.open_connection(srv.host, srv.port)
        writer.write(upload_request(srv.port, body))
        started = asyncio.get_running_loop().time()
        trickle = asyncio.create_task(_trickle(writer, body, every_s=1.0))
        data, closed = await read_until_closed(reader, 10)
        trickle.cancel()
        writer.close()
    assert closed is not None and closed - started < 4.0
    assert data.startswith(b"HTTP/1.1 408"), data
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "timeout"


async def test_a_steady_upload_is_not_cut() -> None:
    """The body deadline grows with the bytes received: a long upload at a fair rate passes."""
    body = multipart(make_wav(3.0))  # ~96 kB at ~200 kB/s
    async with running(http_body_timeout_s=0.3, http_body_min_rate=50_000) as srv:
        reader, writer = await asyncio.open_connection(srv.host, srv.port)
        writer.write(upload_request(srv.port, body))
        for i in range(0, len(body), 4096):
            writer.write(body[i : i + 4096])
            await writer.drain()
            await asyncio.sleep(0.02)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
    assert head.startswith(b"HTTP/1.1 200"), head


# --- connection cap ------------------------------------------------------------------------


async def test_connections_past_the_cap_get_503() -> None:
    async with running(max_connections=3) as srv:
        held = [await asyncio.open_connection(srv.host, srv.port) for _ in range(3)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection(srv.host, srv.port)
        data, closed = await read_until_closed(reader, 5)
        writer.close()
        assert closed is not None
        assert data.startswith(b"HTTP/1.1 503"), data
        assert b"retry-after: 1" in data.lower()
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "server_busy"
        for _, w in held:
            w.close()
        await asyncio.sleep(0.1)
        async with httpx.AsyncClient() as client:  # room again
            assert (await client.get(f"{srv.url}/health")).status_code == 200


# --- early answers close the connection -----------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "status"), [({"api_key": KEY}, 401), ({"max_upload_mb": 0.5}, 413)]
)
async def test_an_early_error_closes_without_reading_the_body(
    settings: dict[str, Any], status: int
) -> None:
    claimed = 3 * 1024 * 1024
    async with running(**settings) as srv:
        reader, writer = await asyncio.open_connection(srv.host, srv.port)
        head = upload_request(srv.port, b"")
        head = head.replace(b"Content-Length: 0", f"Content-Length: {claimed}".encode())
        writer.write(head + b"--xyz\r\n" + b"\0" * 1000)
        data, closed = await read_until_closed(reader, 5)
        writer.close()
    assert data.startswith(f"HTTP/1.1 {status}".encode()), data
    assert b"connection: close" in data.lower()
    assert closed is not None  # the server did not wait for the other 3 MB


# --- shutdown ------------------------------------------------------------------------------


async def test_sigterm_drains_answers_503_and_finishes_in_flight_work() -> None:
    runtime = SlowRuntime(delay_s=1.0)
    wav = make_wav(0.5)
    async with (
        running(runtime, shutdown_drain_s=1.0, shutdown_grace_s=5.0) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=30) as client,
    ):

        async def one() -> httpx.Response:
            return await client.post(
                "/v1/audio/transcriptions", files={"file": ("a.wav", wav, "audio/wav")}
            )

        in_flight = [asyncio.create_task(one()) for _ in range(8)]
        while runtime.running < 8:
            await asyncio.sleep(0.01)
        started = asyncio.get_running_loop().time()
        srv.sigterm()
        await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=srv.url, timeout=5) as fresh:
            ready = await fresh.get("/ready")
            late = await fresh.post(
                "/v1/audio/transcriptions", files={"file": ("a.wav", wav, "audio/wav")}
            )
        answers = await asyncio.gather(*in_flight)
        await asyncio.wait_for(srv.task, 10)
        took = asyncio.get_running_loop().time() - started
    assert ready.status_code == 503
    assert late.status_code == 503 and late.headers["retry-after"]
    assert late.json()["error"]["code"] == "shutting_down"
    assert [r.status_code for r in answers] == [200] * 8
    assert took < 1.0 + 5.0


async def test_the_grace_period_cancels_work_with_503_and_cuts_slow_uploads() -> None:
    runtime = SlowRuntime(delay_s=None)
    wav = make_wav(0.5)
    body = multipart(wav)
    async with (
        running(runtime, shutdown_drain_s=0.2, shutdown_grace_s=0.5) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=30) as client,
    ):
        stuck = asyncio.create_task(
            client.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav)})
        )
        reader, writer = await asyncio.open_connection(srv.host, srv.port)
        writer.write(upload_request(srv.port, body))
        trickle = asyncio.create_task(_trickle(writer, body, every_s=0.2))
        while runtime.running < 1:
            await asyncio.sleep(0.01)
        started = asyncio.get_running_loop().time()
        srv.sigterm()
        answer = await stuck
        data, closed = await read_until_closed(reader, 10)
        trickle.cancel()
        writer.close()
        await asyncio.wait_for(srv.task, 10)
        took = asyncio.get_running_loop().time() - started
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "shutting_down"
    assert data.startswith(b"HTTP/1.1 503"), data
    assert closed is not None
    assert took < 0.2 + 0.5 + 3.0
    assert runtime.running == 0


async def test_realtime_sessions_are_closed_with_1012_when_draining() -> None:
    async with running(shutdown_drain_s=0.5, shutdown_grace_s=1.0) as srv:
        url = f"ws://{srv.host}:{srv.port}/v1/realtime?intent=transcription"
        async with websockets.connect(url, open_timeout=5) as ws:
            await asyncio.wait_for(ws.recv(), 5)  # transcription_session.created
            srv.sigterm()
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
        await asyncio.wait_for(srv.task, 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012


# --- realtime caps -------------------------------------------------------------------------


async def test_realtime_sessions_past_the_cap_get_an_error_then_1013() -> None:
    async with running(realtime_max_sessions=1) as srv:
        url = f"ws://{srv.host}:{srv.port}/v1/realtime?intent=transcription"
        async with websockets.connect(url, open_timeout=5) as first:
            await asyncio.wait_for(first.recv(), 5)
            async with websockets.connect(url, open_timeout=5) as second:
                event = json.loads(await asyncio.wait_for(second.recv(), 5))
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(second.recv(), 5)
        assert event["type"] == "error" and event["error"]["code"] == "server_busy"
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        async with websockets.connect(url, open_timeout=5) as again:  # the slot came back
            assert json.loads(await asyncio.wait_for(again.recv(), 5))["type"] != "error"


@pytest.mark.slow
async def test_a_realtime_client_that_stops_reading_loses_its_socket() -> None:
    """Dropped for not reading: the server's socket is gone within 5 s and the gauge agrees.

    uvicorn's own close waits for the unread output to drain first, i.e. for ever.
    """
    from app import metrics

    async with running(realtime_max_pending_events=8, realtime_send_timeout_s=0.5) as srv:
        loop = asyncio.get_running_loop()
        before = metrics.WEBSOCKET_SESSIONS._value.get()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills fast
        sock.setblocking(False)
        await loop.sock_connect(sock, (srv.host, srv.port))
        await loop.sock_sendall(
            sock,
            b"GET /v1/realtime?intent=transcription HTTP/1.1\r\nHost: x\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        handshake = b""
        while b"\r\n\r\n" not in handshake:  # byte by byte: nothing after it is read
            handshake += await asyncio.wait_for(loop.sock_recv(sock, 1), 5)
        assert handshake.startswith(b"HTTP/1.1 101"), handshake
        assert srv.server.server_state.connections
        # Masked text frames (zero mask) of invalid JSON: each earns an error event, unread.
        # 40,000 events (~10 MB) overflow every buffer between us; then we go quiet.
        frame = b"\x81\xc0\0\0\0\0" + b"x" * 64
        for _ in range(40_000):
            if not srv.server.server_state.connections:
                break
            try:
                await asyncio.wait_for(loop.sock_sendall(sock, frame), 5)
            except (OSError, TimeoutError):
                break  # the server reset the socket, or stopped reading it
        stopped = loop.time()
        while srv.server.server_state.connections and loop.time() < stopped + 5:
            await asyncio.sleep(0.05)
        held = bool(srv.server.server_state.connections)
        sock.close()
    assert not held, "the server still holds the socket"
    assert metrics.WEBSOCKET_SESSIONS._value.get() == before


# --- secrets stay out of the logs ----------------------------------------------------------


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def test_api_keys_in_query_strings_are_not_logged() -> None:
    capture = _Capture()
    loggers = [logging.getLogger(n) for n in ("uvicorn.access", "uvicorn.error", "")]
    wav = make_wav(0.2)
    try:
        async with running(api_key=KEY) as srv:
            for logger in loggers:
                logger.addHandler(capture)
            async with httpx.AsyncClient(base_url=srv.url, timeout=10) as client:
                for key in (KEY, WRONG_KEY):
                    await client.post(
                        f"/v1/audio/transcriptions?api_key={key}&model=whisper-1",
                        files={"file": ("a.wav", wav)},
                    )
                    await client.get(f"/v1/models?api_key={key}")
            base = f"ws://{srv.host}:{srv.port}/v1/realtime?intent=transcription&api_key="
            async with websockets.connect(base + KEY, open_timeout=5) as ws:
                await asyncio.wait_for(ws.recv(), 5)
            with pytest.raises(websockets.InvalidStatus):
                async with websockets.connect(base + WRONG_KEY, open_timeout=5):
                    pass
    finally:
        for logger in loggers:
            logger.removeHandler(capture)
    text = "\n".join(capture.lines)
    assert "api_key=***" in text and "WebSocket /v1/realtime" in text, text
    assert KEY not in text and WRONG_KEY not in text, text
    assert "model=whisper-1" in text  # harmless parameters stay readable


def test_redact_query() -> None:
    from app.server.log_redaction import redact_query

    assert (
        redact_query('"GET /v1/realtime?intent=transcription&api_key=sk-1&token=t HTTP/1.1"')
        == '"GET /v1/realtime?intent=transcription&api_key=***&token=*** HTTP/1.1"'
    )
    assert redact_query("/v1/models") == "/v1/models"


def test_keep_alive_timeout_comes_from_settings() -> None:
    config = Settings(models=["tiny.en"], http_keep_alive_timeout_s=7)
    app = create_app(config, {"tiny.en": FakeRuntime()})  # type: ignore[dict-item]
    assert build_server(app, config).config.timeout_keep_alive == 7
