"""Speech gating: words invented on non-speech, and speech kept across long pauses.

python -m bench.vad [--model tiny.en] [--clips 8] [--no-hour] [--no-fw] [--seed 0] [--shuffle]

One table; for each input, our service (a real server on a loopback port, the service's
defaults, REST with verbose_json and word timestamps) beside faster-whisper with
`vad_filter=True` (in this process, the same CTranslate2 weights, cpu_threads=2), one after
the other in the same run:

- the files in ../shared/data/nonspeech/ (silence, white noise, a 440 Hz tone);
- one hour of digital silence at 44.1 kHz stereo and ten minutes of white noise (made here);
- the first --clips dev clips joined with 20-60 s of digital silence between them, the same
  clips joined without pauses, and (a control) joined with the silence that gating leaves
  between two speech regions (twice the speech padding: 0.8 s by default).

Columns: words returned ("invented" for non-speech: the right transcript is empty), WER %
against the joined references, wall seconds end to end (ours: the HTTP request, upload and
audio decoding included), the server's peak-RSS rise while serving it (ours), and the share
of word timestamps lying outside the clip they belong to by more than 0.5 s (joined speech).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from app.audio.vad import VadOptions
from bench import common

NONSPEECH_DIR = common.REPO_ROOT.parent / "shared" / "data" / "nonspeech"
SR = common.SAMPLE_RATE


@dataclass
class Input:
    name: str
    path: Path
    seconds: float
    reference: str = ""
    spans: list[tuple[float, float]] | None = None  # where each clip's speech lies


@dataclass
class Row:
    input: str
    engine: str
    seconds: float
    words: int
    wer: float | None
    wall_s: float
    rss_rise_mib: float | None
    outside: float | None  # share of words outside their clip's span (+-0.5 s)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.vad", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=common.MODELS, default="tiny.en")
    p.add_argument("--clips", type=int, default=8, help="dev clips joined with pauses")
    p.add_argument("--seed", type=int, default=0, help="seeds the pause lengths (and --shuffle)")
    p.add_argument("--shuffle", action="store_true",
                   help="join the clips in an order drawn from --seed instead of the manifest's: "
                        "sequential decoding's WER moves by a few tenths with the order, so "
                        "differences that small need several orders")
    p.add_argument("--no-hour", action="store_true", help="skip the hour of silence")
    p.add_argument("--no-fw", action="store_true", help="skip faster-whisper")
    p.add_argument("--env", action="append", default=[], metavar="WHISPER_X=V",
                   help="extra server setting (repeatable), e.g. WHISPER_VAD_LONG_FORM=true")
    return p.parse_args(argv)


def server_settings(args: argparse.Namespace) -> dict[str, str]:
    """The WHISPER_* settings given with --env (the server runs with these and its defaults)."""
    return dict(item.split("=", 1) for item in args.env)


def make_inputs(args: argparse.Namespace, workdir: Path) -> list[Input]:
    inputs = [Input(p.stem, p, sf.info(str(p)).duration) for p in sorted(NONSPEECH_DIR.glob("*.flac"))]
    if not args.no_hour:
        path = workdir / "silence-1h-44k-stereo.flac"
        with sf.SoundFile(str(path), "w", 44_100, 2, subtype="PCM_16") as out:
            zeros = np.zeros((44_100 * 60, 2), np.int16)
            for _ in range(60):
                out.write(zeros)
        inputs.append(Input("silence-1h-44k-stereo", path, 3600.0))
    path = workdir / "white-noise-10min.flac"
    rng = np.random.default_rng(args.seed)
    with sf.SoundFile(str(path), "w", SR, 1, subtype="PCM_16") as out:
        for _ in range(10):
            out.write(rng.uniform(-0.3, 0.3, SR * 60).astype(np.float32))
    inputs.append(Input("white-noise-10min", path, 600.0))

    items = common.load_manifest(limit=args.clips)
    if args.shuffle:
        items = [items[i] for i in rng.permutation(len(items))]
    audio = common.load_audio(items)
    reference = " ".join(item.text for item in items)
    pauses = rng.uniform(20.0, 60.0, max(0, len(audio) - 1))
    # Gating joins speech regions end to end, each widened by the speech padding on both sides,
    # so between two clips the decoder hears 2 x speech_pad_ms of the pause. The control input
    # has exactly that gap and no long pause: it separates the effect of the gap on Whisper's
    # decoding from anything gating does. The padding is the server's: --env may set it.
    pad_ms = int(server_settings(args).get("WHISPER_VAD_SPEECH_PAD_MS", VadOptions().speech_pad_ms))
    joined_gap = 2 * pad_ms / 1000
    for name, gaps in (("dev-joined-pauses", pauses), ("dev-joined", np.zeros_like(pauses)),
                       (f"dev-joined-{joined_gap:g}s-gaps", np.full_like(pauses, joined_gap))):
        parts, spans, position = [], [], 0.0
        for i, clip in enumerate(audio):
            parts.append(clip)
            spans.append((position, position + len(clip) / SR))
            position += len(clip) / SR
            if i < len(gaps) and gaps[i] > 0:
                parts.append(np.zeros(int(gaps[i] * SR), np.float32))
                position += int(gaps[i] * SR) / SR
        path = workdir / f"{name}.flac"
        sf.write(str(path), np.concatenate(parts), SR, subtype="PCM_16")
        inputs.append(Input(name, path, position, reference, spans if gaps.any() else None))
    return inputs


def outside_share(words: list[tuple[float, float]], spans: list[tuple[float, float]] | None
                  ) -> float | None:
    if spans is None or not words:
        return None
    bad = sum(not any(a - 0.5 <= s and e <= b + 0.5 for a, b in spans) for s, e in words)
    return bad / len(words)


def score(inp: Input, engine: str, text: str, words: list[tuple[float, float]], wall: float,
          rss: float | None) -> Row:
    wer = common.corpus_wer([inp.reference], [text]) if inp.reference else None
    n_words = len(common.normalize(text).split())
    return Row(inp.name, engine, inp.seconds, n_words, wer, wall, rss, outside_share(words, inp.spans))


def _vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak(pid: int) -> None:
    # Linux: writing 5 resets the peak RSS (VmHWM) to the current RSS
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def run_ours(args: argparse.Namespace, inputs: list[Input], log: Path) -> list[Row]:
    import httpx

    from bench.server_process import serve

    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPER_")}
    env.update(WHISPER_ENGINES_DIR=str(common.engine_dir(args.model).parent),
               WHISPER_MODELS=args.model, WHISPER_MAX_UPLOAD_MB="200",
               WHISPER_MAX_AUDIO_SECONDS="7200")
    env.update(server_settings(args))
    rows = []
    with log.open("wb") as out, serve(env, output=out, log=log, startup_timeout_s=600) as server:
        pid = server.process.pid
        for inp in inputs:
            data = inp.path.read_bytes()
            _reset_peak(pid)
            base = _vm_hwm_mib(pid)
            started = time.perf_counter()
            response = httpx.post(
                f"{server.url}/v1/audio/transcriptions",
                files={"file": (inp.path.name, data, "audio/flac")},
                data={"model": "whisper-1", "response_format": "verbose_json",
                      "timestamp_granularities[]": ["word", "segment"]},
                timeout=1800,
            )
            wall = time.perf_counter() - started
            response.raise_for_status()
            body = response.json()
            words = [(w["start"], w["end"]) for w in body.get("words", [])]
            rows.append(score(inp, "ours", body["text"], words, wall, _vm_hwm_mib(pid) - base))
            print(f"    ours  {inp.name}: {wall:.1f} s, {rows[-1].words} words", flush=True)
    return rows


def run_fw(args: argparse.Namespace, inputs: list[Input]) -> list[Row]:
    model = common.load_fw(args.model, "float32")
    rows = []
    for inp in inputs:
        started = time.perf_counter()
        segments, _ = model.transcribe(str(inp.path), language="en", vad_filter=True,
                                       word_timestamps=True)
        segments = list(segments)
        wall = time.perf_counter() - started
        text = "".join(s.text for s in segments).strip()
        words = [(w.start, w.end) for s in segments for w in s.words or ()]
        rows.append(score(inp, "faster-whisper vad_filter", text, words, wall, None))
        print(f"    fw    {inp.name}: {wall:.1f} s, {rows[-1].words} words", flush=True)
    return rows


def format_table(rows: list[Row]) -> str:
    header = ["input", "audio s", "engine", "words", "WER %", "wall s", "server RSS rise MiB",
              "words outside speech"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.input, f"{r.seconds:.0f}", r.engine, str(r.words),
                 "-" if r.wer is None else f"{r.wer:.2f}", f"{r.wall_s:.1f}",
                 "-" if r.rss_rise_mib is None else f"{r.rss_rise_mib:.0f}",
                 "-" if r.outside is None else f"{100 * r.outside:.1f} %"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"$ python -m bench.vad {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"{common.cpu_model()}; {dt.date.today().isoformat()}; others' CPU "
          f"{common.others_busy_pct(1.0):.0f} % before", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-vad-") as tmp:
        workdir = Path(tmp)
        inputs = make_inputs(args, workdir)
        rows: list[Row] = run_ours(args, inputs, workdir / "server.log")
        if not args.no_fw:
            fw_rows = run_fw(args, inputs)
            rows = [r for pair in zip(rows, fw_rows, strict=True) for r in pair]
    print()
    print(format_table(rows))


if __name__ == "__main__":
    main()
