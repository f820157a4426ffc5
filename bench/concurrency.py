"""Service concurrency benchmark: the dev clips one at a time, then from 32 concurrent clients.

Two concurrent measurements follow the sequential one: (1) the same clips once, from N clients
taking the next clip from a shared list (its wall time includes the ramp-up and the drain, when
the last long files decode window after window with little else to batch with); (2) sustained
load: N clients sending clip after clip, counting the audio of the requests that complete inside
a measuring window after a warm-up, the throughput a busy service keeps up.

Starts `whisper-serve` on a free loopback port (or uses --url, loopback only), sends every
clip sequentially, then the same clips from N concurrent clients (httpx.AsyncClient), checks
that both runs produced identical transcripts, and prints a table (requests, audio seconds,
wall seconds, throughput in audio-seconds per second, concurrent/sequential ratio, p50/p95
latency) plus the decode batch-size histogram read from /metrics during the concurrent run.

    python bench/concurrency.py                     # dev set beside the clone, tiny.en
    python bench/concurrency.py --clips 20 --concurrency 8
    python bench/concurrency.py --url http://127.0.0.1:8000

Bounded: at most --clips requests per run (hard cap 1000), a per-request timeout and an
overall --time-limit. Exit status 1 if transcripts differ between the runs.
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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.server_process import ServerStartError, serve  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEV_SET = REPO_ROOT.parent / "shared" / "data" / "speech" / "dev"
FIXTURES = REPO_ROOT / "tests" / "data"
MAX_CLIPS = 1000
MAX_CONCURRENCY = 256


@dataclass(frozen=True)
class Clip:
    id: str
    path: Path
    duration: float
    text: str


@dataclass
class Run:
    name: str
    texts: dict[str, str]
    latencies: list[float]
    wall_s: float
    audio_s: float

    @property
    def throughput(self) -> float:
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0


def load_clips(data_dir: Path, limit: int) -> list[Clip]:
    """Rows of <data_dir>/manifest.tsv (id, path|file, duration, text)."""
    manifest = data_dir / "manifest.tsv"
    with manifest.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    clips = [
        Clip(r["id"], data_dir / (r.get("path") or r["file"]), float(r["duration"]), r["text"])
        for r in rows
    ]
    return clips[:limit]


def ensure_loopback(url: str) -> str:
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"--url must point at this machine (loopback), got {host!r}")
    return url.rstrip("/")


@contextmanager
def local_server(model: str, startup_timeout: float, extra_env: Mapping[str, str] | None = None,
                 log: Path | None = None) -> Iterator[str]:
    """Run whisper-serve on a free loopback port for the duration of the benchmark (`model` may
    list several, comma-separated; `extra_env` adds settings; `log` gets the server's output)."""
    env = dict(os.environ, WHISPER_MODELS=model, WHISPER_LOG_LEVEL="warning", **(extra_env or {}))
    with ExitStack() as stack:
        output = stack.enter_context(log.open("ab")) if log is not None else None
        try:
            server = stack.enter_context(serve(env, startup_timeout_s=startup_timeout, build=True,
                                               output=output, log=log))
        except ServerStartError as exc:
            raise SystemExit(str(exc)) from exc
        yield server.url


async def _transcribe(
    client: httpx.AsyncClient, clip: Clip, data: bytes, model: str
) -> tuple[str, float]:
    started = time.perf_counter()
    response = await client.post(
        "/v1/audio/transcriptions",
        files={"file": (clip.path.name, data, "application/octet-stream")},
        data={"model": model, "response_format": "json"},
    )
    latency = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{clip.id}: HTTP {response.status_code} {response.text[:300]}")
    return response.json()["text"], latency


def _client(url: str, concurrency: int, request_timeout: float) -> httpx.AsyncClient:
    """One pooled client with a connection per concurrent sender."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(base_url=url, timeout=request_timeout, limits=limits)


async def run_clips(
    url: str,
    clips: Sequence[Clip],
    audio: Sequence[bytes],
    *,
    model: str,
    concurrency: int,
    request_timeout: float,
    name: str,
) -> Run:
    texts: dict[str, str] = {}
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(clips)):
        queue.put_nowait(index)
    async with _client(url, concurrency, request_timeout) as client:

        async def worker() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                text, latency = await _transcribe(client, clips[index], audio[index], model)
                texts[clips[index].id] = text
                latencies.append(latency)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return Run(name, texts, latencies, wall, sum(c.duration for c in clips))


async def run_sustained(
    url: str,
    clips: Sequence[Clip],
    audio: Sequence[bytes],
    *,
    model: str,
    concurrency: int,
    request_timeout: float,
    warmup_s: float,
    measure_s: float,
) -> tuple[Run, list[tuple[str, str]]]:
    """Closed-loop load: each client sends clip after clip (client i starts at clip i * n / N) until
    warm-up + measure seconds have passed. Counts the audio of the requests that *complete* inside
    the measuring window [warm-up, warm-up + measure), so the ramp-up at the start and the drain
    of the last long requests at the end are both left out: the service's steady throughput.
    Returns the run (texts of every completed request) and (clip id, text) of each completion."""
    done: list[tuple[str, str]] = []
    latencies: list[float] = []
    counted_audio = 0.0
    async with _client(url, concurrency, request_timeout) as client:
        started = time.perf_counter()
        window = (started + warmup_s, started + warmup_s + measure_s)

        async def worker(first: int) -> None:
            nonlocal counted_audio
            index = first
            while time.perf_counter() < window[1]:
                clip = clips[index % len(clips)]
                text, latency = await _transcribe(client, clip, audio[index % len(clips)], model)
                finished = time.perf_counter()
                done.append((clip.id, text))
                if window[0] <= finished < window[1]:
                    counted_audio += clip.duration
                    latencies.append(latency)
                index += 1

        await asyncio.gather(*(worker(i * len(clips) // concurrency) for i in range(concurrency)))
    return Run(f"sustained({concurrency})", dict(done), latencies, measure_s, counted_audio), done


def scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=30).text


def batch_histogram(metrics_text: str, model: str) -> dict[float, float]:
    """Cumulative `whisper_batch_size` bucket counts for one model, keyed by upper bound."""
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "whisper_batch_size":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("model") == model:
                buckets[float(sample.labels["le"])] = sample.value
    return buckets


def print_histogram(before: dict[float, float], after: dict[float, float]) -> None:
    print("\nDecode batch sizes during the concurrent run (steps per bucket, from /metrics):")
    if not after:
        print("  (no whisper_batch_size samples)")
        return
    previous = 0.0
    lower = 0.0
    total = after.get(float("inf"), 0.0) - before.get(float("inf"), 0.0)
    for bound in sorted(after):
        cumulative = after[bound] - before.get(bound, 0.0)
        count = cumulative - previous
        previous = cumulative
        label = f"> {lower:g}" if bound == float("inf") else f"{lower:g} < b <= {bound:g}"
        lower = bound
        share = 100 * count / total if total else 0.0
        print(f"  {label:>16}  {int(count):>8}  {share:5.1f} %  {'#' * int(share / 2)}")


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def fmt(value: float | None, digits: int = 2) -> str:
    """A table cell: `digits` decimals, "-" for a missing or NaN value."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.{digits}f}"


def print_table(runs: Sequence[Run]) -> None:
    header = f"{'run':<16}{'requests':>9}{'audio s':>10}{'wall s':>9}{'audio-s/s':>11}{'p50 s':>8}{'p95 s':>8}"
    print("\n" + header)
    print("-" * len(header))
    for run in runs:
        print(
            f"{run.name:<16}{len(run.latencies):>9}{run.audio_s:>10.1f}{run.wall_s:>9.2f}"
            f"{run.throughput:>11.1f}{percentile(run.latencies, 50):>8.2f}{percentile(run.latencies, 95):>8.2f}"
        )
    if len(runs) == 2 and runs[0].throughput > 0:
        print(
            f"\nthroughput ratio concurrent/sequential: {runs[1].throughput / runs[0].throughput:.2f}x"
        )


def corpus_wer(clips: Sequence[Clip], texts: dict[str, str]) -> float | None:
    try:
        import jiwer
        from whisper_normalizer.english import EnglishTextNormalizer
    except ImportError:
        return None
    normalize = EnglishTextNormalizer()
    refs = [normalize(c.text) for c in clips]
    hyps = [normalize(texts.get(c.id, "")) for c in clips]
    pairs = [(r, h) for r, h in zip(refs, hyps, strict=True) if r.strip()]
    return jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]) if pairs else None


async def benchmark(url: str, clips: Sequence[Clip], args: argparse.Namespace) -> int:
    audio = [clip.path.read_bytes() for clip in clips]
    options = {"model": args.model, "request_timeout": args.request_timeout}
    # One request first, untimed: warms caches and connections so neither run pays for it.
    await run_clips(url, clips[:1], audio[:1], concurrency=1, name="warm-up", **options)

    sequential = await run_clips(url, clips, audio, concurrency=1, name="sequential", **options)
    before = batch_histogram(scrape(url), args.model)
    concurrent = await run_clips(
        url,
        clips,
        audio,
        concurrency=args.concurrency,
        name=f"concurrent({args.concurrency})",
        **options,
    )
    after = batch_histogram(scrape(url), args.model)
    sustained_completions: list[tuple[str, str]] = []
    if args.sustained > 0:
        sustained, sustained_completions = await run_sustained(
            url, clips, audio, concurrency=args.concurrency, warmup_s=args.sustained_warmup,
            measure_s=args.sustained, **options)

    print(f"\n{len(clips)} clips, {sequential.audio_s:.1f} s of audio, model {args.model}, {url}")
    print_table([sequential, concurrent])
    print_histogram(before, after)
    if args.sustained > 0:
        print(f"\nSustained load: {args.concurrency} clients sending clip after clip; audio of the requests "
              f"completed in a {args.sustained:g} s window after {args.sustained_warmup:g} s of warm-up "
              f"({len(sustained.latencies)} requests, {len(sustained_completions)} completed in all)")
        print_table([sequential, sustained])
    wer = corpus_wer(clips, sequential.texts)
    if wer is not None:
        print(f"\ncorpus WER (sequential run, normalised): {100 * wer:.2f} %")

    completions = [(c.id, concurrent.texts[c.id]) for c in clips] + sustained_completions
    differing = [(clip_id, text) for clip_id, text in completions if text != sequential.texts[clip_id]]
    if differing:
        print(f"\nTRANSCRIPTS DIFFER from the sequential run in {len(differing)} request(s):")
        for clip_id, text in differing[:10]:
            print(f"  {clip_id}\n    seq: {sequential.texts[clip_id]!r}\n    con: {text!r}")
        return 1
    print("\ntranscripts identical between the sequential and the concurrent runs")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--url", help="benchmark a running server on this machine instead of starting one"
    )
    parser.add_argument(
        "--data", type=Path, help="folder with manifest.tsv (default: the dev set, else tests/data)"
    )
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--clips", type=int, default=100, help=f"clips per run (max {MAX_CLIPS})")
    parser.add_argument(
        "--concurrency", type=int, default=32, help=f"concurrent clients (max {MAX_CONCURRENCY})"
    )
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--sustained", type=float, default=120.0,
                        help="seconds of the sustained-load measuring window (0: skip that run)")
    parser.add_argument("--sustained-warmup", type=float, default=30.0,
                        help="seconds of sustained load before the measuring window opens")
    parser.add_argument(
        "--time-limit", type=float, default=1800.0, help="seconds for the whole benchmark"
    )
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    if not 1 <= args.clips <= MAX_CLIPS:
        parser.error(f"--clips must be between 1 and {MAX_CLIPS}")
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        parser.error(f"--concurrency must be between 1 and {MAX_CONCURRENCY}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data_dir = args.data or (DEV_SET if (DEV_SET / "manifest.tsv").is_file() else FIXTURES)
    clips = load_clips(data_dir, args.clips)
    if not clips:
        raise SystemExit(f"no clips in {data_dir / 'manifest.tsv'}")

    async def bounded(url: str) -> int:
        return await asyncio.wait_for(benchmark(url, clips, args), timeout=args.time_limit)

    try:
        if args.url:
            return asyncio.run(bounded(ensure_loopback(args.url)))
        with local_server(args.model, args.startup_timeout) as url:
            return asyncio.run(bounded(url))
    except TimeoutError:
        print(f"benchmark stopped: over --time-limit {args.time_limit:.0f} s", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
