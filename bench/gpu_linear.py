"""Decode-step GEMMs alone: torch (cuBLAS) against app.engine.cuda.row_gemm, microseconds per call.

Each call reads a different copy of the weight (over 200 MB in rotation, more than the L2 cache
holds) inside a CUDA graph, as a decode step streams every layer's weights once. Shapes are the
decoder's: QKV (3d x d), projections (d x d), MLP in (4d x d, with GELU) and out (d x 4d).

    python bench/gpu_linear.py                      # chosen tiles vs torch
    python bench/gpu_linear.py --sweep              # also every tile config, best first
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine.cuda import row_gemm  # noqa: E402
from bench.reference_ops import reference_linear  # noqa: E402

WIDTHS = {"tiny.en": 384, "small": 768, "large-v3": 1280}
SWEEP = [row_gemm.TileConfig(bn, bk, split, warps, stages)
         for bn, bk, split, warps, stages in itertools.product((16, 32, 64, 128), (64, 128, 256), (1, 2, 4, 8), (4,),
                                                               (3, 4))]


def graph_us(fn: Callable[[int], object], copies: int, calls: int = 40) -> float:
    """Mean microseconds per call of fn(i) replayed in a CUDA graph, i cycling over the copies."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(i % copies)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % copies)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (10 * calls)


def time_linear(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor, gelu: bool,
                tiles: row_gemm.TileConfig | None) -> float:
    """Microseconds per call: torch's GEMM when tiles is None, else row_linear with those tiles."""
    if tiles is None:
        return graph_us(lambda i: reference_linear(x, weights[i], bias, gelu), len(weights))
    linears = [row_gemm.LinearWeights(weight, bias) for weight in weights]
    return graph_us(lambda i: row_gemm.row_linear(x, linears[i], gelu=gelu, tiles=lambda n, k, m: tiles),
                    len(weights))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="tiny.en,small,large-v3")
    p.add_argument("--rows", default="1,16,64")
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, {sms} SMs")
    print("| shape | rows | n x k | act | torch us | ours us | speed-up | tiles | max err / max |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        d = WIDTHS[shape]
        for n, k, gelu in ((3 * d, d, False), (d, d, False), (4 * d, d, True), (d, 4 * d, False)):
            copies = max(2, (200 << 20) // (n * k * 2))
            weights = [torch.randn(n, k, device="cuda", dtype=torch.float16) / k**0.5 for _ in range(copies)]
            bias = torch.randn(n, device="cuda", dtype=torch.float16)
            for m in map(int, args.rows.split(",")):
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                ref = reference_linear(x, weights[0], bias, gelu)
                tiles = row_gemm.choose_tiles(n, k, m)
                out = row_gemm.row_linear(x, row_gemm.LinearWeights(weights[0], bias), gelu=gelu)
                err = (out.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
                t_torch = time_linear(x, weights, bias, gelu, None)
                t_ours = time_linear(x, weights, bias, gelu, tiles)
                cfg = f"{tiles.block_n}x{tiles.block_k}/{tiles.split}"
                print(f"| {shape} | {m} | {n} x {k} | {'gelu' if gelu else '-'} | {t_torch:.2f} | {t_ours:.2f} | "
                      f"{t_torch / t_ours:.2f} | {cfg} | {err:.1e} |", flush=True)
                if args.sweep:
                    results = []
                    for t in SWEEP:
                        if t.split > 1 and k // t.split < t.block_k:
                            continue
                        try:
                            results.append((time_linear(x, weights, bias, gelu, t), t))
                        except Exception:  # noqa: BLE001 - tiles that do not fit in shared memory
                            torch.cuda.synchronize()
                    results.sort(key=lambda r: r[0])
                    print("    best: " + ", ".join(f"{us:.2f} {t.block_n}x{t.block_k}/{t.split} w{t.warps}s{t.stages}"
                                                   for us, t in results[:5]), flush=True)


if __name__ == "__main__":
    main()
