"""End-to-end A/B of one engine switch on the GPU: our engine built with the switch off and on,
in one process, timed in turn (two rounds), with the greedy tokens of both compared.

Work unit as bench/gpu.py: B windows of 30 s, N = 100 tokens, random weights, fp16, CUDA graphs.

    python bench/gpu_ab.py pdl --shapes large-v3:64,large-v3:1,tiny.en:64
    python bench/gpu_ab.py kv-write --shapes large-v3:64
    python bench/gpu_ab.py int8-attention --shapes large-v3:64,tiny.en:64
    python bench/gpu_ab.py row-gemm --shapes small:64
    python bench/gpu_ab.py chunk-tail --shapes large-v3:64,large-v3:1
    python bench/gpu_ab.py tiles --shapes large-v3:64,large-v3:16
    python bench/gpu_ab.py greedy-step --shapes tiny.en:64,tiny.en:1,large-v3:64
    python bench/gpu_ab.py prefill-graph --shapes large-v3:64,large-v3:1,tiny.en:1
    python bench/gpu_ab.py dp4a-k --shapes large-v3:64,large-v3:1,small:64,tiny.en:64
    python bench/gpu_ab.py self-attention --shapes large-v3:64,large-v3:1,tiny.en:64 --int8-kv --fp8-encoder
    python bench/gpu_ab.py greedy-chunks --shapes large-v3:64,large-v3:1,tiny.en:64 --int8-kv --fp8-encoder
    python bench/gpu_ab.py prefill-int8 --shapes large-v3:64,large-v3:1,tiny.en:64 --fp8-encoder
    python bench/gpu_ab.py fold-norms --shapes large-v3:64,large-v3:1,tiny.en:64 --int8-kv --fp8-encoder
    python bench/gpu_ab.py encoder-input --shapes large-v3:64,tiny.en:64 --int8-kv --fp8-encoder

Switches (app.engine.options: each is a field of CudaKernels or CudaGraphOptions, on by default;
"off" builds the engine with it off): `pdl` (programmatic dependent launch), `kv-write`
(full-precision cross-K/V written by app.engine.cuda.kv_cache's kernel vs torch's permuted copy),
`int8-attention` (int8 cross-K/V engines: the decode-attention tiles of AttentionTiles.int8 vs the
ones before them, with conversion instructions; the fp16 engine is timed too), `row-gemm`
(decode-step linears in app.engine.cuda.row_gemm vs cuBLAS; off also leaves the norms unfolded,
whose folded step runs in it), `chunk-tail` (a window's last tokens decoded by the one-step graph,
stopping at its token budget, vs whole 8-step chunks), `tiles` (row_gemm.choose_tiles vs the
earlier fixed 32 x 128 tiles everywhere), `greedy-step` (a graphed greedy step's token choice and
bookkeeping in app.engine.cuda.greedy_step's kernel vs torch ops), `prefill-graph` (the prompt
prefill replayed from a CUDA graph vs run eagerly), `dp4a-k` (int8 cross-K/V engines: scores by
dp4a on int8 K words vs widening every key), `fold-norms` (decode steps with the LayerNorms applied
inside the GEMMs, residual adds and the self-attention K/V append in their epilogues,
app.engine.runners.norm_fold, vs separate add + LayerNorm and append kernels), `prefill-int8`
(int8 cross-K/V engines: a prompt prefill's cross-attention reads the int8 K/V in the
decode-attention kernel vs dequantising them for SDPA), `greedy-chunks` (the greedy step kernel
scans each row's vocabulary in greedy_step.CHUNKS programs vs one), `self-attention` (decode
self-attention tiles of AttentionTiles.self_attention vs 64-key blocks of 4 warps), `encoder-input`
(the encoder's input stage in app.engine.cuda.encoder_input's kernels and its first LayerNorm in
one kernel vs torch's ops). `--int8-kv` builds int8 cross-K/V engines for any switch,
`--fp8-encoder` engines with fp8 encoder GEMMs. Both variants of a shape get the same random
weights.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine.cuda.attention import ATTENTION_TILES, KernelConfig  # noqa: E402
from app.engine.options import EngineOptions  # noqa: E402
from bench.gpu import SHAPES, build_ours, ours_options, run_ours, timed  # noqa: E402

# the int8 decode-attention config before the tile sweep of `attention.INT8_CONFIG`
INT8_BEFORE = KernelConfig(block=64, num_warps=2, num_stages=3, use_dot=False, programs_per_sm=16, fast_int8=False)
NO_DP4A = replace(ATTENTION_TILES, int8_many_pairs=replace(ATTENTION_TILES.int8_many_pairs, dp4a_k=False),
                  int8_few_pairs=replace(ATTENTION_TILES.int8_few_pairs, dp4a_k=False))


def kernels_off(**changes: object) -> Callable[[EngineOptions], EngineOptions]:
    return lambda options: replace(options, kernels=replace(options.kernels, **changes))


def graphs_off(**changes: object) -> Callable[[EngineOptions], EngineOptions]:
    return lambda options: replace(options, graphs=replace(options.graphs, **changes))


#: Each switch's "off" state (on is the shipped default), as a change of the engine's options.
OFF: dict[str, Callable[[EngineOptions], EngineOptions]] = {
    "pdl": kernels_off(pdl=False),
    "kv-write": kernels_off(write_kv_kernel=False),
    "int8-attention": kernels_off(attention_tiles=replace(ATTENTION_TILES, int8_many_pairs=INT8_BEFORE,
                                                          int8_few_pairs=INT8_BEFORE)),
    "dp4a-k": kernels_off(attention_tiles=NO_DP4A),
    "row-gemm": kernels_off(row_gemm=False),
    "chunk-tail": graphs_off(chunk_tail=False),
    "tiles": kernels_off(swept_tiles=False),
    "greedy-step": kernels_off(greedy_step_kernel=False),
    "prefill-graph": graphs_off(prefill=False),
    "self-attention": kernels_off(attention_tiles=replace(ATTENTION_TILES, self_many_pairs=KernelConfig(block=64),
                                                          self_few_pairs=KernelConfig(block=64))),
    "greedy-chunks": kernels_off(greedy_vocab_chunks=1),
    # every prompt takes the dequantising path that prompts over attention.MAX_QUERIES take
    "prefill-int8": kernels_off(int8_prefill_kernel=False),
    "fold-norms": kernels_off(fold_norms=False),
    "encoder-input": kernels_off(fused_encoder_input=False),
}


def switch(name: str, on: bool, options: EngineOptions) -> EngineOptions:
    """`options` with switch `name` on (as they are) or off."""
    return options if on else OFF[name](options)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("switch", choices=tuple(OFF))
    p.add_argument("--shapes", default="large-v3:64,large-v3:1,tiny.en:64", help="shape:B pairs")
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--int8-kv", action="store_true", help="int8 cross-K/V engines")
    p.add_argument("--fp8-encoder", action="store_true", help="fp8 encoder GEMMs")
    args = p.parse_args()
    int8_kv = args.switch in ("int8-attention", "dp4a-k", "prefill-int8") or args.int8_kv
    print(f"{torch.cuda.get_device_name()}, switch {args.switch}, N={args.tokens}, "
          f"cross-K/V {'int8' if int8_kv else 'fp16'}, encoder {'fp8' if args.fp8_encoder else 'fp16'}")
    print("| shape | B | variant | ms per batch | tokens equal to 'off' |")
    print("|---|---|---|---|---|")
    for spec in args.shapes.split(","):
        shape, b = spec.split(":")
        batch = int(b)
        mel = torch.randn(batch, SHAPES[shape][0], 3000, device="cuda", dtype=torch.float16)
        engines, tokens = {}, {}
        variants = {"off": False, "on": True}
        options = ours_options(batch, torch.float16, int8_kv, True, (1, batch), 8, args.fp8_encoder)
        for label, on in variants.items():
            engines[label] = build_ours(shape, switch(args.switch, on, options))
            tokens[label] = run_ours(engines[label], mel, args.tokens)
        if args.switch == "int8-attention":  # the fp16 engine for reference
            engines["fp16 K/V"] = build_ours(shape, ours_options(batch, torch.float16, False, True, (1, batch), 8))
            tokens["fp16 K/V"] = run_ours(engines["fp16 K/V"], mel, args.tokens)
        for _ in range(args.rounds):
            for label, ours in engines.items():
                seconds, _ = timed(lambda ours=ours, mel=mel: run_ours(ours, mel, args.tokens), 5)
                same = sum(a == b for a, b in zip(tokens[label], tokens["off"], strict=True))
                print(f"| {shape} | {batch} | {label} | {seconds * 1000:.1f} | {same}/{batch} |",
                      flush=True)
        del engines
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
