"""Server memory for a small upload of long audio: one request, then several at once.

Writes a silent mono FLAC (default 30 minutes at 192 kHz: about 1 MB that decodes to 345
million samples), starts `whisper-serve` on a free loopback port, and reads the server's RSS
from /proc: its peak (VmHWM) before and after one request, then the highest RSS sampled while
--concurrent such requests run at once, with each one's status. Prints a table.

    python bench/memory.py                      # 30 min at 192 kHz, then 8 at once
    python bench/memory.py --minutes 60 --concurrent 4

Bounded: the requests have a timeout and the whole run --time-limit seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.server_process import serve  # noqa: E402

MIB = 1024 * 1024


def silent_flac(minutes: float, rate: int) -> bytes:
    buffer = io.BytesIO()
    block = np.zeros(rate * 10, dtype=np.int16)
    with sf.SoundFile(buffer, "w", rate, 1, format="FLAC", subtype="PCM_16") as out:
        for _ in range(int(minutes * 6)):
            out.write(block)
    return buffer.getvalue()


def proc_status(pid: int, field: str) -> float:
    """A VmRSS/VmHWM-style field of /proc/<pid>/status, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


async def post(client: httpx.AsyncClient, url: str, data: bytes) -> str:
    try:
        response = await client.post(
            f"{url}/v1/audio/transcriptions", files={"file": ("silence.flac", data, "audio/flac")}
        )
    except httpx.HTTPError as exc:
        return type(exc).__name__
    if response.status_code == 503:
        return f"503 ({response.json()['error']['code']}, Retry-After {response.headers.get('retry-after')})"
    return str(response.status_code)


async def measure(url: str, pid: int, data: bytes, concurrent: int, timeout: float) -> None:
    rows: list[tuple[str, str]] = []
    base_rss, base_peak = proc_status(pid, "VmRSS"), proc_status(pid, "VmHWM")
    rows.append(("idle RSS / peak RSS (MiB)", f"{base_rss:.0f} / {base_peak:.0f}"))
    async with httpx.AsyncClient(timeout=timeout) as client:
        started = time.perf_counter()
        status = await post(client, url, data)
        rows.append(
            ("one request: status, seconds", f"{status}, {time.perf_counter() - started:.0f}")
        )
        peak = proc_status(pid, "VmHWM")
        rows.append(("one request: peak RSS rise (MiB)", f"{peak - base_peak:.0f}"))
        rows.append(("RSS after it (MiB)", f"{proc_status(pid, 'VmRSS'):.0f}"))

        highest = 0.0

        async def sample() -> None:
            nonlocal highest
            while True:
                highest = max(highest, proc_status(pid, "VmRSS"))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        started = time.perf_counter()
        statuses = await asyncio.gather(*(post(client, url, data) for _ in range(concurrent)))
        sampler.cancel()
        rows.append(
            (
                f"{concurrent} at once: statuses",
                ", ".join(f"{n}x {s}" for s, n in Counter(statuses).items()),
            )
        )
        rows.append((f"{concurrent} at once: seconds", f"{time.perf_counter() - started:.0f}"))
        rows.append(
            (
                f"{concurrent} at once: highest RSS (MiB)",
                f"{max(highest, proc_status(pid, 'VmHWM')):.0f}",
            )
        )
        rows.append(("RSS after them (MiB)", f"{proc_status(pid, 'VmRSS'):.0f}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=int, default=192_000)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per request, seconds")
    parser.add_argument("--time-limit", type=float, default=3600.0, help="whole run, seconds")
    args = parser.parse_args()
    if not 1 <= args.concurrent <= 64:
        parser.error("--concurrent must be 1..64")

    data = silent_flac(args.minutes, args.rate)
    print(
        f"upload: {len(data) / MIB:.2f} MiB FLAC, {args.minutes:g} min of silence at {args.rate} Hz"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPER_")}
    env.update(WHISPER_MODELS=args.model, WHISPER_LOG_LEVEL="warning")
    env.update({k: v for k, v in os.environ.items() if k.startswith("WHISPER_")})
    with serve(env) as server:
        asyncio.run(
            asyncio.wait_for(
                measure(server.url, server.process.pid, data, args.concurrent, args.timeout),
                args.time_limit,
            )
        )


if __name__ == "__main__":
    main()
