"""Real weights on the GPU: dev-set transcripts of fp16, int8 cross-K/V, fp8 encoder GEMMs and int8 weights against
CPU fp32, plus RTFx. Writes every transcript to JSON; WER is computed from that file with
`python -m bench.gpu_accuracy --report FILE` (jiwer + whisper-normalizer are not on the GPU image).

    python bench/gpu_accuracy.py --engines DIR[,DIR] --manifest dev/manifest.tsv --out results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.decoding.options import TranscribeOptions  # noqa: E402
from app.engine.config import load_engine_config, save_engine_config  # noqa: E402
from app.engine.cuda.fp8 import fp8_supported  # noqa: E402
from app.runtime import RuntimeOptions, load_runtime  # noqa: E402

WARM_UP_CLIPS = 16


@dataclass
class Clip:
    id: str
    audio: np.ndarray
    reference: str


def load_clips(manifest: Path) -> list[Clip]:
    from bench.common import load_audio, load_manifest

    items = load_manifest(manifest)
    return [Clip(item.id, audio, item.text) for item, audio in zip(items, load_audio(items), strict=True)]


def int8_engine(src: Path) -> Path:
    """Weight-only int8 copy of an engine (the same transform as build_engines.py --quantize int8)."""
    from safetensors.torch import load_file, save_file

    from app.engine.checksum import sha256_file
    from app.engine.convert.quantize import to_stored

    dst = Path(tempfile.mkdtemp()) / (src.name + "-int8")
    dst.mkdir()
    config = load_engine_config(src)
    tensors = {k: v.float() for k, v in load_file(str(src / config.weights_file)).items()}
    save_file(to_stored(tensors, torch.float16, "int8"), str(dst / config.weights_file))
    (dst / config.tokenizer_file).write_bytes((src / config.tokenizer_file).read_bytes())
    config = config.model_copy(update={"quantization": "int8", "weights_sha256": sha256_file(dst / config.weights_file)})
    save_engine_config(dst, config)
    return dst


def weight_bytes(engine_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(engine_dir / "model.safetensors"), "pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
            t = handle.get_tensor(key)
            total += t.numel() * t.element_size()
    return total


async def run_variant(engine_dir: Path, clips: list[Clip], options: TranscribeOptions, runtime_options: RuntimeOptions,
                      concurrency: int) -> dict[str, object]:
    runtime = load_runtime(engine_dir, runtime_options)
    await runtime.start()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sem = asyncio.Semaphore(concurrency)

    async def one(clip: Clip) -> str:
        async with sem:
            return (await runtime.transcribe(clip.audio, options)).text

    # warm-up outside the timing: Triton's JIT and cuDNN's plans for this process's shapes
    await asyncio.gather(*(one(c) for c in clips[:WARM_UP_CLIPS]))
    started = time.perf_counter()
    texts = await asyncio.gather(*(one(c) for c in clips))
    wall = time.perf_counter() - started
    await runtime.stop()
    audio_s = sum(len(c.audio) for c in clips) / 16000
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return dict(texts=dict(zip([c.id for c in clips], texts, strict=True)), wall_s=wall, audio_s=audio_s,
                rtfx=audio_s / wall, peak_gpu_gib=peak, weight_bytes=weight_bytes(engine_dir))


async def main_async(args: argparse.Namespace) -> None:
    clips = load_clips(args.manifest)
    if args.limit:
        clips = clips[: args.limit]
    results: dict[str, object] = dict(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                                      references={c.id: c.reference for c in clips}, runs={})
    for engine in args.engines.split(","):
        engine_dir = Path(engine)
        name = engine_dir.name
        variants = [
            ("cuda fp16 defaults", engine_dir, TranscribeOptions(), RuntimeOptions(device="cuda", max_batch_size=64)),
            ("cuda fp16 greedy", engine_dir, TranscribeOptions.greedy(), RuntimeOptions(device="cuda", max_batch_size=64)),
            ("cuda fp16 int8-cross-kv defaults", engine_dir, TranscribeOptions(),
             RuntimeOptions(device="cuda", max_batch_size=64, int8_cross_kv=True)),
            ("cuda fp8-encoder defaults", engine_dir, TranscribeOptions(),
             RuntimeOptions(device="cuda", max_batch_size=64, fp8_encoder=True)),
            ("cuda fp8-encoder int8-cross-kv defaults", engine_dir, TranscribeOptions(),
             RuntimeOptions(device="cuda", max_batch_size=64, int8_cross_kv=True, fp8_encoder=True)),
            ("cuda int8-weights defaults", engine_dir,
             TranscribeOptions(),
             RuntimeOptions(device="cuda", max_batch_size=64)),
            ("cpu fp32 defaults", engine_dir, TranscribeOptions(), RuntimeOptions(device="cpu", max_batch_size=32,
                                                                                           cpu_threads=args.cpu_threads)),
        ]
        for label, directory, options, runtime_options in variants:
            if args.only and not any(part in label for part in args.only.split(",")):
                continue
            if runtime_options.fp8_encoder and not fp8_supported(torch.device("cuda")):
                print(f"{name} | {label}: skipped, this GPU has no fp8 (it would run fp16)", flush=True)
                continue
            if label.startswith("cuda int8-weights"):
                directory = int8_engine(engine_dir)  # built only when that variant runs
            started = time.perf_counter()
            out = await run_variant(directory, clips, options, runtime_options, args.concurrency)
            results["runs"][f"{name} | {label}"] = out  # type: ignore[index]
            print(f"{name} | {label}: rtfx {out['rtfx']:.1f} wall {out['wall_s']:.1f}s "
                  f"peak {out['peak_gpu_gib']} (total {time.perf_counter() - started:.0f}s)", flush=True)
            args.out.write_text(json.dumps(results, indent=1))


def report(path: Path) -> None:
    from bench.common import corpus_wer

    data = json.loads(path.read_text())
    refs = data["references"]
    ids = list(refs)
    print(f"GPU: {data['gpu']}")
    print("| model | variant | WER % | same text as CPU fp32 | RTFx | weights MiB | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|")
    for key, run in data["runs"].items():
        model = key.split(" | ")[0]
        cpu = data["runs"].get(f"{model} | cpu fp32 defaults")
        wer = corpus_wer([refs[i] for i in ids], [run["texts"][i] for i in ids])
        same = sum(run["texts"][i] == cpu["texts"][i] for i in ids) if cpu else None
        peak = f"{run['peak_gpu_gib']:.1f}" if run["peak_gpu_gib"] else "-"
        print(f"| {key.replace(' | ', ' | ', 1)} | {wer:.2f} | {same}/{len(ids)} | {run['rtfx']:.1f} | "
              f"{run['weight_bytes'] / 2**20:.0f} | {peak} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="engines/tiny.en")
    p.add_argument("--manifest", type=Path, default=Path("../shared/data/speech/dev/manifest.tsv"))
    p.add_argument("--out", type=Path, default=Path("gpu_accuracy.json"))
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--cpu-threads", type=int, default=16)
    p.add_argument("--report", type=Path, default=None)
    p.add_argument("--only", default=None, help="run only variants whose label contains one of these (comma-separated)")
    args = p.parse_args()
    if args.report:
        report(args.report)
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
