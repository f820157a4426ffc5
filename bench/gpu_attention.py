"""Decode-attention kernels alone: effective K/V read bandwidth of each variant on this GPU.

One query token per (row, head) over T cached keys, the decoder's cross-attention at batch B
(large-v3: 20 heads x 1500 positions x 64). Prints microseconds per call and GB/s of K/V bytes
read, for cuDNN/flash SDPA in fp16 and our Triton kernel in fp16 and int8 at several tile
configurations, so the int8 path can be tuned against the fp16 one it must beat.

    python bench/gpu_attention.py --batch 64 --heads 20 --keys 1500
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine.cache import quantize_kv_int8  # noqa: E402
from app.engine.cuda import attention as kernels  # noqa: E402
from app.engine.cuda.kv_cache import write_cross_kv  # noqa: E402
from bench.gpu_linear import graph_us  # noqa: E402

# Tile shapes tried with --all-configs: (block, warps, stages, min splits, tensor-core tile)
CONFIGS_TO_TRY = tuple(
    kernels.KernelConfig(block, warps, stages, splits, use_dot)
    for block, warps, stages, splits, use_dot in (
        (128, 4, 3, 1, True), (128, 4, 3, 2, True),
        (64, 4, 3, 1, False), (128, 4, 3, 1, False), (128, 8, 3, 1, False), (256, 8, 3, 1, False),
        (64, 2, 3, 1, False), (128, 4, 4, 2, False), (64, 4, 4, 2, False), (256, 4, 2, 1, False),
        (128, 2, 3, 1, False), (32, 2, 4, 1, False),
        (64, 4, 3, 1, True), (64, 2, 3, 1, True), (128, 8, 3, 1, True), (64, 4, 4, 2, True), (32, 2, 3, 1, True),
    )
)


def time_us(fn, iters: int = 20) -> float:
    """Microseconds per call from CUDA-graph replays: launch overhead, which eager timing would
    measure for the small shapes, is left out as in the engine's graphs."""
    return graph_us(lambda _: fn(), 1, iters)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--heads", type=int, default=20)
    p.add_argument("--keys", type=int, default=1500)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--all-configs", action="store_true", help="also every tile shape in CONFIGS_TO_TRY")
    p.add_argument("--int8-sweep", action="store_true",
                   help="int8 CUDA-core kernel over 48 tile shapes (block x warps x stages x programs per SM)")
    args = p.parse_args()
    b, h, t, dh = args.batch, args.heads, args.keys, args.head_dim
    torch.manual_seed(0)
    q = torch.randn(b, h, 1, dh, device="cuda", dtype=torch.float16)
    k = torch.randn(b, h, t, dh, device="cuda", dtype=torch.float16)
    v = torch.randn(b, h, t, dh, device="cuda", dtype=torch.float16)
    k8, ks = quantize_kv_int8(k)
    v8, vs = quantize_kv_int8(v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    fp16_bytes = 2 * k.numel() * 2
    int8_bytes = 2 * k.numel() + 2 * ks.numel() * ks.element_size()
    rows = []

    def add(name: str, fn, nbytes: int) -> None:
        out = fn()
        err = (out.float() - ref.float()).abs().max().item()
        us = time_us(fn)
        rows.append((name, us, nbytes / us / 1e3, err))

    add("SDPA fp16", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), fp16_bytes)
    configs = list(CONFIGS_TO_TRY) if args.all_configs else []
    configs += [kernels.KernelConfig(128, 4, 3, s) for s in (1, 2, 3, 4, 6, 8)]
    configs += [replace(kernels.INT8_CONFIG, min_splits=s) for s in (1, 2, 3, 4, 6, 8)]
    if args.int8_sweep:
        for block, warps, stages, per_sm in itertools.product((128, 256, 512), (2, 4), (2, 3), (1, 2, 4, 16)):
            cfg = kernels.KernelConfig(block, warps, stages, 1, False, per_sm)
            add(f"triton int8 {cfg}", lambda cfg=cfg: kernels.decode_attention(q, k8, v8, k_scale=ks, v_scale=vs,
                                                                             config=cfg), int8_bytes)
    for cfg in configs:
        add(f"triton fp16 {cfg}", lambda cfg=cfg: kernels.decode_attention(q, k, v, config=cfg), fp16_bytes)
        for widen in (True, False):  # int8 widened by bit assembly, or by conversion instructions
            c8 = replace(cfg, fast_int8=widen)
            add(f"triton int8 {c8}", lambda c8=c8: kernels.decode_attention(q, k8, v8, k_scale=ks, v_scale=vs,
                                                                           config=c8), int8_bytes)
    add("triton int8 default (AttentionTiles.int8)",
        lambda: kernels.decode_attention(q, k8, v8, k_scale=ks, v_scale=vs), int8_bytes)
    widened = replace(kernels.ATTENTION_TILES.int8(b * h), dp4a_k=False)
    add("triton int8 default, keys widened (no dp4a)",
        lambda: kernels.decode_attention(q, k8, v8, k_scale=ks, v_scale=vs, config=widened), int8_bytes)
    kv = torch.randn(b, t, 2 * h * dh, device="cuda", dtype=torch.float16)
    cache = [torch.zeros(b, h, t, dh, device="cuda", dtype=torch.int8) for _ in range(2)]
    scales = [torch.ones(b, h, t, 1, device="cuda", dtype=torch.float16) for _ in range(2)]
    rows_index = torch.arange(b, device="cuda")

    def torch_quantize() -> None:
        split = kv.view(b, t, 2, h, dh).permute(2, 0, 3, 1, 4)
        for i in range(2):
            values, scale = quantize_kv_int8(split[i])
            cache[i][:, :, :t], scales[i][:, :, :t] = values, scale

    quantize_timings = [("quantize: torch ops", time_us(torch_quantize, 10)),
                        ("quantize: fused kernel", time_us(lambda: write_cross_kv(
                            kv, heads=h, rows=rows_index, k_cache=cache[0], v_cache=cache[1], k_scale=scales[0],
                            v_scale=scales[1]), 10))]
    print(f"{torch.cuda.get_device_name()}  B={b} H={h} T={t} dh={dh}")
    for name, us in quantize_timings:
        print(f"{name:<48}{us:>9.1f}{2 * kv.numel() * 1.5 / us / 1e3:>9.0f}")
    print(f"{'kernel':<48}{'us':>9}{'GB/s':>9}{'max err':>10}")
    for name, us, gbs, err in rows:
        print(f"{name:<48}{us:>9.1f}{gbs:>9.0f}{err:>10.4f}")


if __name__ == "__main__":
    main()
