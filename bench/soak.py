"""Soak test: N clients sending transcriptions for T minutes; errors, latency and server RSS.

Starts `whisper-serve` on a free loopback port (or uses --url with --pid, loopback only). Each
client sends clip after clip (the dev set beside the clone, or tests/data), round-robin, until
the time is up. Prints the responses by status (a 503 counts as expected only with a
Retry-After header), p50/p95/p99 latency of the 200s, and the server's RSS sampled every
--sample-s seconds, with its growth after the first minute.

    python bench/soak.py                         # 16 clients, 10 minutes
    python bench/soak.py --clients 4 --minutes 1
    python bench/soak.py --url http://127.0.0.1:8000 --pid 1234

Bounded: at most 64 clients and 60 minutes, loopback only. Exit status 1 on any error other
than 503 with Retry-After, or when RSS after the first minute grew by more than --max-growth.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import ipaddress
import os
import statistics
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from urllib.parse import urlparse

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.concurrency import DEV_SET, FIXTURES  # noqa: E402
from bench.server_process import serve  # noqa: E402

MAX_CLIENTS = 64
MAX_MINUTES = 60.0


def load_clips(limit: int) -> list[tuple[str, bytes]]:
    directory = DEV_SET if (DEV_SET / "manifest.tsv").is_file() else FIXTURES
    with (directory / "manifest.tsv").open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[:limit]
    # the dev set names the file `path`, tests/data `file`
    paths = [directory / (row.get("path") or row["file"]) for row in rows]
    return [(path.name, path.read_bytes()) for path in paths]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Tally:
    def __init__(self) -> None:
        self.statuses: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.unexpected: list[str] = []

    def record(self, status: str, seconds: float, detail: str = "") -> None:
        self.statuses[status] += 1
        if status == "200":
            self.latencies.append(seconds)
        elif status != "503 with Retry-After":
            self.unexpected.append(f"{status} {detail[:200]}")


async def client(
    url: str, clips: list[tuple[str, bytes]], start: int, until: float, tally: Tally
) -> None:
    async with httpx.AsyncClient(timeout=300) as http:
        i = start
        while time.monotonic() < until:
            name, data = clips[i % len(clips)]
            i += 1
            began = time.monotonic()
            try:
                response = await http.post(
                    f"{url}/v1/audio/transcriptions", files={"file": (name, data)}
                )
            except httpx.HTTPError as exc:
                tally.record(type(exc).__name__, 0.0, str(exc))
                continue
            took = time.monotonic() - began
            status = str(response.status_code)
            if response.status_code == 503:
                if response.headers.get("retry-after"):
                    status = "503 with Retry-After"
                    await asyncio.sleep(float(response.headers["retry-after"]))
                else:
                    status = "503 without Retry-After"
            tally.record(status, took, response.text)


async def soak(url: str, pid: int | None, args: argparse.Namespace) -> int:
    clips = load_clips(args.clips)
    tally = Tally()
    samples: list[tuple[float, float]] = []
    began = time.monotonic()
    until = began + args.minutes * 60

    async def sample() -> None:
        while pid is not None:
            samples.append((time.monotonic() - began, rss_mib(pid)))
            await asyncio.sleep(args.sample_s)

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(client(url, clips, i, until, tally) for i in range(args.clients)))
    sampler.cancel()
    if pid is not None:
        samples.append((time.monotonic() - began, rss_mib(pid)))

    print(f"{args.clients} clients, {args.minutes:g} min, {len(clips)} clips, {url}")
    print("\nresponses by status")
    for status, count in sorted(tally.statuses.items()):
        print(f"  {status:<28} {count}")
    if tally.latencies:
        q = statistics.quantiles(tally.latencies, n=100, method="inclusive")
        print(f"\nlatency of 200s (s): p50 {q[49]:.2f}  p95 {q[94]:.2f}  p99 {q[98]:.2f}")
    failed = 0
    if tally.unexpected:
        failed = 1
        print("\nunexpected responses (first 5):")
        for line in tally.unexpected[:5]:
            print(f"  {line}")
    if samples:
        print("\nserver RSS (MiB)")
        step = max(1, len(samples) // 20)
        for t, rss in samples[::step]:
            print(f"  {t:7.0f} s  {rss:7.0f}")
        after_first = [rss for t, rss in samples if t >= 60]
        if len(after_first) >= 2:
            growth = after_first[-1] / after_first[0] - 1
            print(f"growth after the first minute: {growth * 100:+.1f} %")
            if growth > args.max_growth:
                failed = 1
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clips", type=int, default=20, help="distinct clips to cycle through")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--max-growth", type=float, default=0.10, help="RSS growth allowed")
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--url", help="an already running server (loopback only)")
    parser.add_argument("--pid", type=int, help="its process id, for RSS")
    args = parser.parse_args()
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.minutes <= MAX_MINUTES:
        parser.error(f"--clients 1..{MAX_CLIENTS}, --minutes up to {MAX_MINUTES:g}")
    if args.url and not ipaddress.ip_address(urlparse(args.url).hostname or "").is_loopback:
        parser.error("--url must be a loopback address")

    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPER_")}
    env.update(WHISPER_MODELS=args.model, WHISPER_LOG_LEVEL="warning")
    env.update({k: v for k, v in os.environ.items() if k.startswith("WHISPER_")})
    started = nullcontext(None) if args.url else serve(env)
    with started as server:
        url = args.url or server.url
        pid = args.pid if args.url else server.process.pid
        sys.exit(asyncio.run(soak(url, pid, args)))


if __name__ == "__main__":
    main()
