"""Token-level parity with faster-whisper (fp32, greedy): how many files decode identically.

python -m bench.parity [--model tiny.en|base] [--limit N] [--manifest PATH] [--sequential] [--mel]

Greedy settings (beam 1, temperature 0, no fallback thresholds, no timestamps, no conditioning,
no VAD, language "en") for both engines, on the same float32 arrays. Our tokens are the
concatenated segment tokens of each file, faster-whisper's likewise. Our files run
concurrently (as the service batches them) unless --sequential. For each mismatch: the first
differing token index, both texts around it, the number of 30 s windows, the windows (mel-frame
seeks) that produced segments in each engine. --mel compares our log-mel features with
faster-whisper's FeatureExtractor on every file (largest |difference| per file: summary, and the
value for each mismatching file).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench import common

TARGETS = {"tiny.en": 98, "base": 95}  # identical files out of 100
N_FRAMES = 3000
HOP = 160


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.parity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", type=Path, default=common.DEFAULT_MANIFEST)
    p.add_argument("--model", choices=common.MODELS, default="tiny.en")
    p.add_argument("--limit", type=int, default=None, help="only the first N files")
    p.add_argument("--sequential", action="store_true", help="our files one at a time (no batching)")
    p.add_argument("--mel", action="store_true", help="compare log-mel features with faster-whisper's on every file")
    p.add_argument("--context", type=int, default=8, help="tokens shown either side of a difference")
    return p.parse_args(argv)


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def n_windows(samples: int) -> int:
    """30 s windows of a no-timestamp pass: ceil(content frames / 3000)."""
    content_frames = (samples + HOP) // HOP - 1
    return max(1, math.ceil(content_frames / N_FRAMES))


def mel_difference(audio: np.ndarray, fw_model: Any, n_mels: int) -> float:
    """Largest |ours - faster-whisper| of the normalised log-mel features of one file."""
    from app.audio.features import log_mel_spectrogram

    ours = log_mel_spectrogram(audio, n_mels, padding=HOP).numpy()
    theirs = fw_model.feature_extractor(audio, padding=HOP)
    if ours.shape != theirs.shape:
        return float("inf")
    return float(np.abs(ours - theirs).max())


async def run_ours(model: str, audio: list[np.ndarray], concurrency: int) -> list[common.FileResult]:
    runtime = common.load_ours(model)
    await runtime.start()
    try:
        return await common.ours_transcribe_all(runtime, audio, "greedy", concurrency)
    finally:
        await runtime.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print("$ python -m bench.parity " + shlex.join(sys.argv[1:] if argv is None else argv), flush=True)
    items = common.load_manifest(args.manifest, args.limit)
    audio = common.load_audio(items)
    print(f"model {args.model}, {len(items)} files, {common.audio_seconds(audio) / 60:.1f} min; "
          f"faster-whisper dir {common.fw_model_dir(args.model)}", flush=True)

    ours = asyncio.run(run_ours(args.model, audio, 1 if args.sequential else 32))
    fw_model = common.load_fw(args.model, "float32")
    theirs = [common.fw_transcribe(fw_model, a, "greedy") for a in audio]

    from app.decoding.tokenizer import WhisperTokenizer
    from app.engine.config import load_engine_config

    engine = common.engine_dir(args.model)
    tokenizer = WhisperTokenizer.from_engine(engine, load_engine_config(engine))

    def show(tokens: list[int], start: int, end: int) -> str:
        return repr(tokenizer.decode(tokens[start:end]))

    mel_diffs = [mel_difference(a, fw_model, fw_model.model.n_mels) for a in audio] if args.mel else []
    identical = 0
    mismatches: list[str] = []
    for i, (item, samples, a, b) in enumerate(zip(items, audio, ours, theirs, strict=True)):
        index = first_difference(a.tokens, b.tokens)
        if index is None:
            identical += 1
            continue
        lo, hi = max(0, index - args.context), index + args.context
        lines = [
            f"- {item.id}: first difference at token {index} "
            f"(ours {len(a.tokens)} tokens, faster-whisper {len(b.tokens)}); "
            f"{len(samples) / common.SAMPLE_RATE:.1f} s, {n_windows(len(samples))} window(s); "
            f"segment seeks ours {a.seeks}, faster-whisper {b.seeks}",
            f"    ours: ...{show(a.tokens, lo, hi)}...",
            f"    fw:   ...{show(b.tokens, lo, hi)}...",
        ]
        if args.mel:
            lines.append(f"    log-mel max |ours - faster-whisper| on this file: {mel_diffs[i]:.2e}")
        mismatches.append("\n".join(lines))

    print()
    if mel_diffs:
        worst = int(np.argmax(mel_diffs))
        print(f"log-mel features vs faster-whisper's FeatureExtractor, max |diff| per file: median "
              f"{np.median(mel_diffs):.2e}, max {mel_diffs[worst]:.2e} ({items[worst].id}); "
              "inf = shapes differ")
    for text in mismatches:
        print(text)
    target = TARGETS[args.model] * len(items) / 100
    verdict = "meets" if identical >= target else "MISSES"
    print(f"\nidentical: {identical}/{len(items)} files "
          f"({verdict} the target of {TARGETS[args.model]}/100 for {args.model})")
    return 0 if identical >= target else 1


if __name__ == "__main__":
    sys.exit(main())
