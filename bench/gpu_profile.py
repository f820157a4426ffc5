"""Where the GPU time goes: torch.profiler over one batch of bench/gpu.py's work unit.

    python bench/gpu_profile.py --shape large-v3 --batch 64 [--int8-kv] [--fp8-encoder]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu import SHAPES, build_ours, ours_options, run_ours  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="large-v3")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--int8-kv", action="store_true")
    p.add_argument("--fp8-encoder", action="store_true", help="fp8 encoder GEMMs (compute capability 8.9+)")
    p.add_argument("--rows", type=int, default=22)
    args = p.parse_args()
    ours = build_ours(args.shape, ours_options(args.batch, torch.float16, args.int8_kv, True, (1, args.batch), 8,
                                               args.fp8_encoder))
    mel = torch.randn(args.batch, SHAPES[args.shape][0], 3000, device="cuda", dtype=torch.float16)
    run_ours(ours, mel, args.tokens)
    encoder_events = []
    with torch.inference_mode():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        ours.engine.runner.encode(mel)
        end.record()
        torch.cuda.synchronize()
        encoder_events.append(start.elapsed_time(end))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_ours(ours, mel, args.tokens)
    print(f"{args.shape} B={args.batch}: encoder alone {encoder_events[0]:.1f} ms")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
