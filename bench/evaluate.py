"""Accuracy and CPU throughput: our engine vs faster-whisper on the dev set.

python -m bench.evaluate [--manifest PATH] [--model tiny.en|base] [--settings greedy,defaults]
                         [--limit N] [--rows ours-batched,fw-fp32,ours-seq,fw-int8]

One table: rows = engine x settings, columns = files, audio minutes, WER %, wall s, RTFx
(audio seconds / wall seconds), peak RSS MiB, and the CPU share other processes used just
before (1 s idle check) and during the timed pass.

Each timed pass runs in a fresh worker process (`--worker ROW`) so that its ru_maxrss is that
engine's peak alone; the passes alternate between our engine and faster-whisper on the same
files within one invocation so both see similar machine noise. Every worker decodes the same
files with our decoder, loads its engine, warms it up on the first files with the measured
settings, checks idleness, then times one pass over all files.

- ours-batched: all files transcribed concurrently (at most 32 in flight), as the service runs;
  the runtime batches windows across files.
- ours-seq: one file at a time (no cross-file batching), to show the batching gain.
- fw-fp32 / fw-int8: faster-whisper WhisperModel, cpu_threads=2, one file at a time. On an
  idle machine CTranslate2's default (spin-waiting) OpenMP threads are fastest; when other
  processes share the cores they make fp32 several times slower, so use --fw-omp-wait passive
  (OMP_WAIT_POLICY=PASSIVE) there, and compare only rows timed at low others' CPU %.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common

ROWS: dict[str, str] = {
    "ours-batched": "ours (batched, 32 in flight)",
    "fw-fp32": "faster-whisper fp32",
    "ours-seq": "ours (one file at a time)",
    "fw-int8": "faster-whisper int8",
}
DEFAULT_ROWS = ("ours-batched", "fw-fp32", "ours-seq", "fw-int8")  # alternating order
WARMUP_FILES = 4
CONCURRENCY = 32


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", type=Path, default=common.DEFAULT_MANIFEST)
    p.add_argument("--model", choices=common.MODELS, default="tiny.en")
    p.add_argument("--settings", default="greedy,defaults",
                   help="comma-separated: greedy, defaults (default: both)")
    p.add_argument("--limit", type=int, default=None, help="only the first N files")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                   help=f"comma-separated subset of {', '.join(DEFAULT_ROWS)}, run in that order")
    p.add_argument("--fw-omp-wait", choices=("default", "passive"), default="default",
                   help="OpenMP wait policy of the faster-whisper workers: default (CTranslate2's "
                   "spinning threads; fastest on an idle machine) or passive (OMP_WAIT_POLICY="
                   "PASSIVE; several times faster for fp32 when other processes share the cores)")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    p.add_argument("--worker", choices=tuple(ROWS), help=argparse.SUPPRESS)
    p.add_argument("--worker-settings", choices=common.SETTINGS, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.settings_list = _split(args.settings, common.SETTINGS, "--settings")
    args.rows_list = _split(args.rows, tuple(ROWS), "--rows")
    return args


def _split(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise SystemExit(f"{flag}: expected a comma-separated subset of {', '.join(allowed)}, got {value!r}")
    return items


# --------------------------------------------------------------------------- worker (one pass)


class Timer:
    """Idle check (1 s, before timing), then wall time and others' CPU share of the pass."""

    def __init__(self, idle_pct: float) -> None:
        self.idle_pct = idle_pct
        self.meter = common.CpuMeter()
        self.meter.start()
        self.started = time.perf_counter()

    def done(self, results: list[common.FileResult]) -> dict[str, Any]:
        wall = time.perf_counter() - self.started
        return {"wall_s": wall, "others_idle_pct": self.idle_pct,
                "others_during_pct": self.meter.stop(), "hyps": [r.text for r in results]}


def run_worker(args: argparse.Namespace) -> None:
    items = common.load_manifest(args.manifest, args.limit)
    audio = common.load_audio(items)
    baseline_rss = common.current_rss_mib()  # interpreter, decoder libs, decoded audio
    settings = args.worker_settings
    row = args.worker
    info: dict[str, Any] = {}
    if row.startswith("fw-"):
        import ctranslate2

        model = common.load_fw(args.model, "float32" if row == "fw-fp32" else "int8")
        for samples in audio[:WARMUP_FILES]:
            common.fw_transcribe(model, samples, settings)
        timer = Timer(common.others_busy_pct(1.0))
        out = timer.done([common.fw_transcribe(model, a, settings) for a in audio])
        info["threads"] = "cpu_threads=2"
        info["version"] = f"ctranslate2 {ctranslate2.__version__}"
    else:
        import torch

        concurrency = CONCURRENCY if row == "ours-batched" else 1

        async def main() -> dict[str, Any]:
            runtime = common.load_ours(args.model)
            await runtime.start()
            try:
                await common.ours_transcribe_all(runtime, audio[:WARMUP_FILES], settings, concurrency)
                timer = Timer(await asyncio.to_thread(common.others_busy_pct, 1.0))
                results = await common.ours_transcribe_all(runtime, audio, settings, concurrency)
                info["threads"] = f"engine thread's torch threads={runtime.scheduler.engine_threads}"
                return timer.done(results)
            finally:
                await runtime.stop()

        out = asyncio.run(main())
        info["version"] = f"torch {torch.__version__}"
    out.update(info)
    out["peak_rss_mib"] = common.peak_rss_mib()
    out["baseline_rss_mib"] = baseline_rss
    args.worker_out.write_text(json.dumps(out))


# --------------------------------------------------------------------------- driver


def run_row(args: argparse.Namespace, row: str, settings: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, "-m", "bench.evaluate", "--worker", row, "--worker-settings", settings,
               "--worker-out", str(out), "--model", args.model, "--manifest", str(args.manifest)]
        if args.limit is not None:
            cmd += ["--limit", str(args.limit)]
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        if row.startswith("fw-") and args.fw_omp_wait == "passive":
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        subprocess.run(cmd, cwd=common.REPO_ROOT, env=env, check=True)
        return json.loads(out.read_text())


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ["engine", "settings", "files", "audio min", "WER %", "wall s", "RTFx", "peak RSS MiB",
            "others' CPU % before / during"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["engine"], r["settings"], str(r["files"]), f"{r['audio_s'] / 60:.1f}",
                 f"{r['wer']:.2f}", f"{r['wall_s']:.1f}", f"{r['audio_s'] / r['wall_s']:.1f}",
                 f"{r['peak_rss_mib']:.0f}",
                 f"{r['others_idle_pct']:.0f} / {r['others_during_pct']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_driver(args: argparse.Namespace) -> None:
    command = "python -m bench.evaluate " + shlex.join(sys.argv[1:])
    items = common.load_manifest(args.manifest, args.limit)
    refs = [item.text for item in items]
    audio_s = common.audio_seconds(common.load_audio(items))
    started = dt.datetime.now().astimezone()
    print(f"$ {command}", flush=True)
    print(f"model {args.model}, {len(items)} files, {audio_s / 60:.1f} min of audio; "
          f"CPU: {common.cpu_model()}", flush=True)
    rows: list[dict[str, Any]] = []
    notes: set[str] = set()
    for settings in args.settings_list:
        for row in args.rows_list:
            print(f"... {ROWS[row]} / {settings}", flush=True)
            out = run_row(args, row, settings)
            out.update(engine=ROWS[row], settings=settings, files=len(items), audio_s=audio_s,
                       wer=common.corpus_wer(refs, out["hyps"]))
            notes.add(f"{ROWS[row]}: {out['threads']}, {out['version']}")
            print(f"    wall {out['wall_s']:.1f} s, WER {out['wer']:.2f} %, others' CPU "
                  f"{out['others_idle_pct']:.0f} % before / {out['others_during_pct']:.0f} % during",
                  flush=True)
            rows.append(out)
    table = format_table(rows)
    busy = [r["others_during_pct"] for r in rows]
    footer = [
        f"Command: `{command}`",
        f"Date: {started:%Y-%m-%d %H:%M %Z}",
        f"CPU: {common.cpu_model()}",
        f"Model: {args.model}; {len(items)} files, {audio_s / 60:.1f} min of audio; "
        f"manifest {args.manifest}",
        "Engines: " + "; ".join(sorted(notes))
        + f"; faster-whisper workers ran with OpenMP wait policy {args.fw_omp_wait}",
        f"Others' CPU share during the timed passes: median {statistics.median(busy):.0f} %, "
        f"max {max(busy):.0f} % (100 % = all cores busy)",
        "Peak RSS is each timed pass's own worker process (load, warm-up, pass); it includes a "
        f"baseline of {statistics.median(r['baseline_rss_mib'] for r in rows):.0f} MiB "
        "(interpreter, audio decoder libraries, the decoded audio) measured before any engine "
        "was imported.",
    ]
    print()
    print(table)
    print()
    print("\n".join(footer))
    if not args.no_save:
        common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        # bench/results' one naming scheme: <date>-<what>-<hardware>.<ext>
        what = f"evaluate-{args.model.replace('.', '-')}"
        path = common.RESULTS_DIR / f"{started:%Y-%m-%d}-{what}-cpu-{os.cpu_count()}c.md"
        if path.exists():  # a second run the same day keeps the first
            path = path.with_name(f"{path.stem}-{started:%H%M%S}.md")
        path.write_text(table + "\n\n" + "\n\n".join(footer) + "\n")
        print(f"\nwrote {path.relative_to(common.REPO_ROOT)}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
    else:
        run_driver(args)


if __name__ == "__main__":
    main()
