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

Switches: `pdl` (programmatic dependent launch, WHISPER_PDL), `kv-write` (cross-K/V written by
kernels.write_kv_into vs torch's permuted copy), `int8-attention` (int8 cross-K/V engines: the
decode-attention tile config of kernels.int8_config vs the one before it, with conversion
instructions; the fp16 engine is timed too), `row-gemm` (decode-step linears in
app.engine.row_gemm vs cuBLAS), `chunk-tail` (a window's last tokens decoded by the one-step
graph, stopping at its token budget, vs whole 8-step chunks), `tiles` (row_gemm.choose_tiles vs the
earlier fixed 32 x 128 tiles everywhere), `greedy-step` (a graphed greedy step's token choice and
bookkeeping in app.engine.greedy_step's kernel vs torch ops), `prefill-graph` (the prompt prefill
replayed from a CUDA graph vs run eagerly), `dp4a-k` (int8 cross-K/V engines: scores by dp4a on
int8 K words vs widening every key), `fold-norms` (decode steps with the LayerNorms applied inside
the GEMMs, residual adds and the self-attention K/V append in their epilogues, app.engine.norm_fold,
vs separate add + LayerNorm and append kernels), `prefill-int8` (int8 cross-K/V engines: a prompt
prefill's cross-attention reads the int8 K/V in kernels.decode_attention vs dequantising them for
SDPA), `greedy-chunks` (the greedy step kernel scans each row's vocabulary in
greedy_step.CHUNKS programs vs one), `self-attention` (decode self-attention tiles of
kernels.self_attention_config vs 64-key blocks of 4 warps), `encoder-input` (the encoder's input stage
in app.engine.encoder_input's kernels and its first LayerNorm in one kernel vs torch's ops). `--int8-kv` builds int8 cross-K/V engines for any
switch, `--fp8-encoder` engines with fp8 encoder GEMMs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import app.engine.cuda_graphs as cuda_graphs  # noqa: E402
import app.engine.encoder_input as encoder_input  # noqa: E402
import app.engine.greedy_step as greedy_step  # noqa: E402
import app.engine.kernels as kernels  # noqa: E402
import app.engine.row_gemm as row_gemm  # noqa: E402
import app.engine.torch_engine as torch_engine  # noqa: E402
import app.engine.torch_model as torch_model  # noqa: E402
from bench.gpu import SHAPES, build_ours, run_ours, timed  # noqa: E402

# the int8 decode-attention config before the tile sweep of `kernels.INT8_CONFIG`
INT8_BEFORE = kernels.KernelConfig(block=64, num_warps=2, num_stages=3, use_dot=False, programs_per_sm=16,
                                   fast_int8=False)


_can_write_kv = torch_model.can_write_kv
_int8_config = kernels.int8_config
_greedy_chunk = cuda_graphs.GraphedDecoder.greedy_chunk

#: Each switch's "off" state (on is the shipped default).
OFF: dict[str, Callable[[], contextlib.AbstractContextManager[object]]] = {
    "pdl": lambda: mock.patch.dict(os.environ, {"WHISPER_PDL": "0"}),
    "kv-write": lambda: mock.patch.object(
        torch_model, "can_write_kv", lambda x, quantize: quantize and _can_write_kv(x, quantize)),
    "int8-attention": lambda: mock.patch.object(kernels, "int8_config", lambda pairs: INT8_BEFORE),
    "dp4a-k": lambda: mock.patch.object(kernels, "int8_config", lambda pairs: replace(_int8_config(pairs), dp4a_k=False)),
    "row-gemm": lambda: mock.patch.object(row_gemm, "can_row_gemm", lambda x, weight: False),
    "chunk-tail": lambda: mock.patch.object(
        cuda_graphs.GraphedDecoder, "greedy_chunk",
        lambda self, tokens, positions, done, remaining:
        _greedy_chunk(self, tokens, positions, done, [1 << 30] * len(remaining))),
    "tiles": lambda: mock.patch.object(
        row_gemm, "choose_tiles",
        lambda n, k, m=64: row_gemm.TileConfig(block_n=32, block_k=128, split=4 if k > n else 1)),
    "greedy-step": lambda: mock.patch.object(cuda_graphs, "greedy_step", greedy_step.greedy_step_reference),
    "prefill-graph": lambda: mock.patch.object(
        cuda_graphs.GraphedDecoder, "prefill", lambda self, tokens, positions: None),
    "self-attention": lambda: mock.patch.object(kernels, "self_attention_config",
                                                lambda pairs: kernels.KernelConfig(block=64)),
    "greedy-chunks": lambda: mock.patch.object(greedy_step, "CHUNKS", 1),
    # every prompt takes the dequantising path that prompts over MAX_PREFILL_QUERIES take
    "prefill-int8": lambda: mock.patch.object(torch_model, "MAX_PREFILL_QUERIES", 0),
    "fold-norms": lambda: mock.patch.object(torch_engine, "fold_decoder_norms", lambda decoder: False),
    "encoder-input": lambda: _encoder_input_off(),
}


@contextlib.contextmanager
def _encoder_input_off() -> Iterator[None]:
    """torch's ops for the encoder's input stage, and its first LayerNorm then quantisation."""
    with mock.patch.object(encoder_input, "can_fuse_input", lambda mel: False), \
            mock.patch.object(torch_model, "layer_norm_fp8", lambda x, norm: torch_model.quantize_rows(norm(x))):
        yield


def switch(name: str, on: bool) -> contextlib.AbstractContextManager[object]:
    """The state of the engine with switch `name` on or off."""
    return contextlib.nullcontext() if on else OFF[name]()


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
        for label, on in variants.items():
            with switch(args.switch, on):
                engines[label] = build_ours(shape, batch, torch.float16, int8_kv, True, (1, batch), 8,
                                            args.fp8_encoder)
                tokens[label] = run_ours(engines[label], mel, args.tokens)
        if args.switch == "int8-attention":  # the fp16 engine for reference
            engines["fp16 K/V"] = build_ours(shape, batch, torch.float16, False, True, (1, batch), 8)
            tokens["fp16 K/V"] = run_ours(engines["fp16 K/V"], mel, args.tokens)
        for _ in range(args.rounds):
            for label, ours in engines.items():
                with switch(args.switch, variants.get(label, True)):
                    seconds, _ = timed(lambda ours=ours, mel=mel: run_ours(ours, mel, args.tokens), 5)
                same = sum(a == b for a, b in zip(tokens[label], tokens["off"], strict=True))
                print(f"| {shape} | {batch} | {label} | {seconds * 1000:.1f} | {same}/{batch} |",
                      flush=True)
        del engines
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
