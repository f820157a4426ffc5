"""Slow clients against the server: do they cost others latency, are they cut, does SIGTERM wait?

Starts `whisper-serve` on a free loopback port, then:
1. the median latency of --requests short transcriptions, one at a time, on the idle server;
2. the same while --slow connections each send a request body at 1 byte/s, and when the
   server closed those connections (the body timeout);
3. SIGTERM while one such connection is open: the exit status and how long the exit took,
   against the drain + grace defaults.

    python bench/slow_clients.py
    python bench/slow_clients.py --slow 50 --requests 20

Bounded: loopback only; the slow connections are abandoned after --max-wait seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.config import Settings  # noqa: E402
from bench.server_process import serve  # noqa: E402

CLIP = Path(__file__).resolve().parents[1] / "tests" / "data" / "ljspeech-LJ001-0008.flac"


async def latencies(url: str, n: int, data: bytes) -> list[float]:
    out = []
    async with httpx.AsyncClient(timeout=120) as client:
        for _ in range(n):
            began = time.perf_counter()
            response = await client.post(
                f"{url}/v1/audio/transcriptions", files={"file": ("a.flac", data)}
            )
            response.raise_for_status()
            out.append(time.perf_counter() - began)
    return out


async def slow_connection(port: int, max_wait: float) -> float | None:
    """Send a 100 kB body at 1 byte/s; seconds until the server closed it (None: it did not)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    )
    began = time.monotonic()

    async def trickle() -> None:
        while True:
            writer.write(b"\0")  # the file's bytes, one a second
            await writer.drain()
            await asyncio.sleep(1.0)

    sender = asyncio.create_task(trickle())
    try:
        while time.monotonic() - began < max_wait:
            data = await asyncio.wait_for(reader.read(65536), max_wait)
            if not data:
                return time.monotonic() - began
    except (ConnectionError, TimeoutError):
        return time.monotonic() - began
    finally:
        sender.cancel()
        writer.close()
    return None


async def run(url: str, port: int, args: argparse.Namespace, data: bytes) -> None:
    idle = await latencies(url, args.requests, data)
    slow = [asyncio.create_task(slow_connection(port, args.max_wait)) for _ in range(args.slow)]
    await asyncio.sleep(2)
    loaded = await latencies(url, args.requests, data)
    closed = await asyncio.gather(*slow)
    cut = [c for c in closed if c is not None]
    print(f"median latency, idle server:        {statistics.median(idle):.3f} s")
    print(
        f"median latency, {args.slow} slow bodies:   {statistics.median(loaded):.3f} s "
        f"({(statistics.median(loaded) / statistics.median(idle) - 1) * 100:+.1f} %)"
    )
    print(
        f"slow connections closed by the server: {len(cut)}/{len(closed)}"
        + (f", after {min(cut):.0f}-{max(cut):.0f} s" if cut else "")
    )


async def one_slow_then(port: int, max_wait: float) -> asyncio.Task[float | None]:
    task = asyncio.create_task(slow_connection(port, max_wait))
    await asyncio.sleep(1)
    return task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow", type=int, default=50)
    parser.add_argument("--requests", type=int, default=15)
    parser.add_argument("--max-wait", type=float, default=120.0)
    parser.add_argument("--model", default="tiny.en")
    args = parser.parse_args()
    if not 1 <= args.slow <= 200:
        parser.error("--slow must be 1..200")
    data = CLIP.read_bytes()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPER_")}
    env.update(WHISPER_MODELS=args.model, WHISPER_LOG_LEVEL="warning")
    with serve(env) as server:
        asyncio.run(run(server.url, server.port, args, data))

        async def sigterm_with_one_slow() -> tuple[float, int | None]:
            slow = await one_slow_then(server.port, args.max_wait)
            began = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            while server.process.poll() is None and time.monotonic() - began < 120:
                await asyncio.sleep(0.05)
            slow.cancel()
            return time.monotonic() - began, server.process.returncode

        took, status = asyncio.run(sigterm_with_one_slow())
    defaults = Settings.model_fields
    budget = defaults["shutdown_drain_s"].default + defaults["shutdown_grace_s"].default
    print(
        f"SIGTERM with a slow upload connected: exit status {status} after {took:.1f} s "
        f"(drain + grace defaults: {budget:g} s)"
    )


if __name__ == "__main__":
    main()
