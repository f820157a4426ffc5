"""Long-form modes side by side: sequential timestamp seeking against VAD-chunked batching.

python -m bench.long_form [--model tiny.en] [--clips 24] [--gap 1.0] [--clients 16]

For each mode (WHISPER_VAD_LONG_FORM=false, then true) a real server starts on a loopback port
with the service's defaults otherwise (Silero gating on). The long file is the first --clips
dev clips joined with --gap seconds of silence (a few minutes of speech). Measured:

- WER % of the long file alone (no other traffic), and its latency then;
- its latency while --clients clients keep the service busy sending dev clips back to back
  (the clients start first; the long file is sent once they are all in flight), and the
  clients' throughput over that time (audio seconds per wall second).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

from bench import common

SR = common.SAMPLE_RATE


@dataclass
class Result:
    mode: str
    wer: float
    alone_s: float
    loaded_s: float
    clients_rate: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.long_form", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=common.MODELS, default="tiny.en")
    p.add_argument("--clips", type=int, default=24, help="dev clips in the long file")
    p.add_argument("--gap", type=float, default=1.0, help="seconds of silence between clips")
    p.add_argument("--clients", type=int, default=16, help="clients loading the service")
    p.add_argument("--modes", default="sequential,vad")
    return p.parse_args(argv)


def flac(audio: np.ndarray) -> bytes:
    out = io.BytesIO()
    sf.write(out, audio, SR, format="FLAC", subtype="PCM_16")
    return out.getvalue()


async def post(client: httpx.AsyncClient, url: str, data: bytes) -> str:
    response = await client.post(f"{url}/v1/audio/transcriptions",
                                 files={"file": ("a.flac", data, "audio/flac")},
                                 data={"model": "whisper-1"}, timeout=3600)
    response.raise_for_status()
    return response.json()["text"]


async def measure(url: str, long_file: bytes, clips: list[tuple[bytes, float]], clients: int
                  ) -> tuple[str, float, float, float]:
    async with httpx.AsyncClient() as client:
        started = time.perf_counter()
        text = await post(client, url, long_file)
        alone = time.perf_counter() - started

        stop = asyncio.Event()
        done_audio = [0.0]

        async def load(offset: int) -> None:
            i = offset
            while not stop.is_set():
                data, seconds = clips[i % len(clips)]
                await post(client, url, data)
                if not stop.is_set():
                    done_audio[0] += seconds
                i += 1

        loaders = [asyncio.create_task(load(k)) for k in range(clients)]
        await asyncio.sleep(3.0)  # every client has a request in flight
        started = time.perf_counter()
        await post(client, url, long_file)
        loaded = time.perf_counter() - started
        stop.set()
        await asyncio.gather(*loaders, return_exceptions=True)
        return text, alone, loaded, done_audio[0] / loaded


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from bench.server_process import serve

    print(f"$ python -m bench.long_form {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"{common.cpu_model()}; {dt.date.today().isoformat()}; others' CPU "
          f"{common.others_busy_pct(1.0):.0f} % before", flush=True)
    items = common.load_manifest()
    audio = common.load_audio(items)
    gap = np.zeros(int(args.gap * SR), np.float32)
    long_audio = np.concatenate([part for a in audio[: args.clips] for part in (a, gap)])
    reference = " ".join(item.text for item in items[: args.clips])
    long_file = flac(long_audio)
    clips = [(flac(a), len(a) / SR) for a in audio[args.clips :]]
    print(f"long file: {len(long_audio) / SR / 60:.1f} min; load: {args.clients} clients", flush=True)
    results = []
    for mode in args.modes.split(","):
        env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPER_")}
        env.update(WHISPER_ENGINES_DIR=str(common.engine_dir(args.model).parent),
                   WHISPER_MODELS=args.model, WHISPER_MAX_UPLOAD_MB="200",
                   WHISPER_VAD_LONG_FORM="true" if mode == "vad" else "false")
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "server.log"
            with log.open("wb") as out, serve(env, output=out, log=log,
                                              startup_timeout_s=600) as server:
                text, alone, loaded, rate = asyncio.run(
                    measure(server.url, long_file, clips, args.clients))
        wer = common.corpus_wer([reference], [text])
        results.append(Result(mode, wer, alone, loaded, rate))
        print(f"    {mode}: WER {wer:.2f} %, alone {alone:.1f} s, loaded {loaded:.1f} s", flush=True)
    print()
    print("| long-form mode | WER % | latency alone s | latency under load s | "
          "clients' audio s/s |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r.mode} | {r.wer:.2f} | {r.alone_s:.1f} | {r.loaded_s:.1f} | "
              f"{r.clients_rate:.1f} |")


if __name__ == "__main__":
    main()
