"""Command-line transcription: `python -m app.transcribe [--model-dir DIR] [--format F] FILE...`.

All files go through the same batching scheduler as the service, so several files are decoded
together. Transcripts go to stdout; progress and errors to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from app.audio.decode import decode_audio
from app.audio.vad import VadOptions
from app.decoding.options import TranscribeOptions
from app.errors import WhisperServeError
from app.runtime import RuntimeOptions, load_runtime


def build_options(args: argparse.Namespace) -> TranscribeOptions:
    options = TranscribeOptions.greedy() if args.greedy else TranscribeOptions()
    window = replace(options.window, task=args.task, language=args.language)
    if args.beam_size is not None:
        window = replace(window, beam_size=args.beam_size)
    return replace(options, window=window, word_timestamps=args.word_timestamps,
                   long_form="vad" if args.vad else "sequential", initial_prompt=args.prompt,
                   vad=None if args.no_gate else VadOptions())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m app.transcribe", description=__doc__)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--model-dir", default="engines/tiny.en")
    p.add_argument("--format", choices=["text", "json", "srt", "vtt"], default="text")
    p.add_argument("--device", default="auto")
    p.add_argument("--compute-dtype", default=None)
    p.add_argument("--language", default=None)
    p.add_argument("--task", choices=["transcribe", "translate"], default="transcribe")
    p.add_argument("--beam-size", type=int, default=None)
    p.add_argument("--greedy", action="store_true", help="greedy, temperature 0, no fallback, no timestamps")
    p.add_argument("--word-timestamps", action="store_true")
    p.add_argument("--vad", action="store_true", help="cut long audio at pauses and decode chunks together")
    p.add_argument("--no-gate", action="store_true",
                   help="decode all of the audio, not only the speech Silero VAD finds (WHISPER_VAD=false)")
    p.add_argument("--prompt", default=None, help="initial prompt")
    p.add_argument("--max-batch-size", type=int, default=None, help="decoder rows per step (default: the device's)")
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    from app.formats import render

    runtime = load_runtime(args.model_dir, RuntimeOptions(device=args.device, compute_dtype=args.compute_dtype,
                                                          max_batch_size=args.max_batch_size, warmup=False))
    await runtime.start()
    options = build_options(args)
    status = 0

    async def one(path: Path) -> object:
        audio = await asyncio.to_thread(decode_audio, path)
        return await runtime.transcribe(audio, options)

    try:
        results = await asyncio.gather(*(one(f) for f in args.files), return_exceptions=True)
    finally:
        await runtime.stop()
    for path, result in zip(args.files, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, WhisperServeError | OSError):
                raise result
            print(f"{path}: error: {result}", file=sys.stderr)
            status = 1
            continue
        if args.format == "json":
            obj = {"file": str(path), "text": result.text, "language": result.language,
                   "duration": result.duration, "segments": [asdict(s) for s in result.segments]}
            print(json.dumps(obj, ensure_ascii=False))
        elif args.format == "text":
            print(result.text)
        else:
            body, _ = render(result, args.format, {"segment"})
            if len(args.files) > 1:
                print(f"# {path}")
            print(body if isinstance(body, str) else json.dumps(body))
    return status


def main(argv: list[str] | None = None) -> None:
    sys.exit(asyncio.run(run(parse_args(argv))))


if __name__ == "__main__":
    main()
