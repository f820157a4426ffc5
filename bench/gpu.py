"""GPU throughput: our engine vs Hugging Face transformers vs openai-whisper, side by side.

Method (docs/performance.md): B windows of 30 s (log-mel 3000 frames), each decoded for exactly
N new tokens, greedy, end-of-text suppressed so all implementations do the same work; random
weights of the real shapes; RTFx = B x 30 s / wall of the whole batch (encoder + decode), median
of >= 3 timed runs after a warm-up; peak GPU memory per implementation. All implementations of
a shape are loaded together and timed in turn at each batch size (ours, HF, openai-whisper, then
the next B), so drifts of the GPU's speed during a run hit every column alike.

With --engines, the same command then transcribes the dev set with real weights (tiny.en, base)
on the GPU (fp16, fp16 + int8 cross-K/V, the fp8 encoder with and without int8 cross-K/V, int8
weights) and on the CPU (fp32), and prints WER, agreement with CPU fp32 and RTFx per variant
(bench/gpu_accuracy.py; WER needs jiwer and whisper-normalizer, else it prints the command that
computes it from the saved transcripts). The random-weight table runs large-v3 also with int8
cross-K/V (--int8-kv-shapes) and with the fp8 encoder (--fp8-shapes; GPUs of compute capability
8.9+).

    python bench/gpu.py                       # full table (a few minutes on one H100/H200)
    python bench/gpu.py --engines engines/tiny.en,engines/base --json run.json   # + the dev set
    python bench/gpu.py --smoke               # correctness checks of graphs / int8 kernel only
    python bench/gpu.py --shapes tiny.en --batches 1,64 --peers hf
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.decoding.options import WindowOptions  # noqa: E402
from app.decoding.tokenizer import WhisperTokenizer  # noqa: E402
from app.decoding.window import WindowTask  # noqa: E402
from app.engine.config import EngineConfig, ModelDims  # noqa: E402
from app.engine.convert.tokenizer_info import expected_special_tokens  # noqa: E402
from app.engine.cuda.fp8 import fp8_supported  # noqa: E402
from app.engine.model import WhisperModel  # noqa: E402
from app.engine.options import CudaGraphOptions, EngineOptions  # noqa: E402
from app.engine.torch_engine import TorchEngine  # noqa: E402
from app.scheduler.decode_loop import DecodeLoop  # noqa: E402

# name: (n_mels, d_model, heads, encoder layers, decoder layers, vocab)
SHAPES = {
    "tiny.en": (80, 384, 6, 4, 4, 51864),
    "base": (80, 512, 8, 6, 6, 51865),
    "small": (80, 768, 12, 12, 12, 51865),
    "large-v3": (128, 1280, 20, 32, 32, 51866),
    "large-v3-turbo": (128, 1280, 20, 32, 4, 51866),
}


def dims_for(shape: str) -> ModelDims:
    n_mels, d, h, enc, dec, vocab = SHAPES[shape]
    return ModelDims(n_mels=n_mels, n_audio_state=d, n_audio_head=h, n_audio_layer=enc, n_text_state=d,
                     n_text_head=h, n_text_layer=dec, n_vocab=vocab, ffn_dim=4 * d)


def config_for(shape: str, dims: ModelDims) -> EngineConfig:
    special = expected_special_tokens(dims.n_vocab)
    return EngineConfig(name=shape, dims=dims, multilingual=dims.n_vocab >= 51865, dtype="float16",
                        special_tokens=special, suppress_tokens=[special.eot], suppress_tokens_begin=[],
                        alignment_heads=[], weights_sha256="random")


@dataclass
class Ours:
    engine: TorchEngine
    loop: DecodeLoop
    options: WindowOptions


def ours_options(max_rows: int, dtype: torch.dtype, int8_kv: bool, graphs: bool, batch_buckets: tuple[int, ...],
                 chunk_steps: int, fp8_encoder: bool = False) -> EngineOptions:
    """Our engine's options for this benchmark: CUDA graphs of `batch_buckets` and 128-token
    self-attention buckets."""
    return EngineOptions(device="cuda", compute_dtype=str(dtype).removeprefix("torch."), max_rows=max_rows,
                         int8_cross_kv=int8_kv, fp8_encoder=fp8_encoder,
                         graphs=CudaGraphOptions(enabled=graphs, chunk_steps=chunk_steps, batch_buckets=batch_buckets,
                                                 kv_buckets=(128,)))


def random_whisper(shape: str, dtype: torch.dtype, seed: int = 0) -> WhisperModel:
    """Random weights of `shape` on the GPU, the same for the same seed."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]), torch.device("cuda"):
        torch.manual_seed(seed)
        model = WhisperModel(dims_for(shape))
        # non-degenerate random weights: position tables are zeros until an engine is loaded
        model.encoder.positional_embedding.normal_(0, 0.02)
        model.decoder.positional_embedding.data.normal_(0, 0.02)
    return model.to(dtype).eval()


def build_ours(shape: str, options: EngineOptions, seed: int = 0) -> Ours:
    config = config_for(shape, dims_for(shape))
    engine = TorchEngine(config, random_whisper(shape, options.torch_dtype, seed), options)
    tokenizer = WhisperTokenizer(None, config.special_tokens, config.multilingual)  # type: ignore[arg-type]
    options = WindowOptions(language="en" if config.multilingual else None, beam_size=1,
                            without_timestamps=True, suppress_blank=False,
                            suppress_tokens=(config.special_tokens.eot,), max_new_tokens=0)
    return Ours(engine, DecodeLoop(engine, tokenizer), options)


def run_ours(ours: Ours, mel: torch.Tensor, n_tokens: int) -> list[list[int]]:
    from dataclasses import replace

    options = replace(ours.options, max_new_tokens=n_tokens)
    loop = ours.loop
    done = loop.admit([WindowTask(mel[i], options) for i in range(mel.shape[0])])
    while loop.active:
        done += loop.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return [r.tokens for _, r in done]


def collect(out: list[list[int]], ours: Ours, mel: torch.Tensor, n_tokens: int) -> None:
    out[:] = run_ours(ours, mel, n_tokens)


def build_hf(shape: str) -> Callable[[torch.Tensor, int], object]:
    from transformers.generation.utils import GenerationMixin
    from transformers.models.whisper.configuration_whisper import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperForConditionalGeneration

    dims = dims_for(shape)
    special = expected_special_tokens(dims.n_vocab)
    cfg = WhisperConfig(vocab_size=dims.n_vocab, num_mel_bins=dims.n_mels, d_model=dims.n_audio_state,
                        encoder_layers=dims.n_audio_layer, decoder_layers=dims.n_text_layer,
                        encoder_attention_heads=dims.n_audio_head, decoder_attention_heads=dims.n_text_head,
                        encoder_ffn_dim=dims.ffn_dim, decoder_ffn_dim=dims.ffn_dim,
                        max_source_positions=1500, max_target_positions=448,
                        decoder_start_token_id=special.sot, eos_token_id=special.eot,
                        pad_token_id=special.eot, bos_token_id=special.eot)
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = WhisperForConditionalGeneration(cfg).half().eval()
    prompt = [special.sot] + ([special.languages["en"], special.transcribe] if dims.n_vocab >= 51865 else [])
    prompt.append(special.no_timestamps)

    def run(mel: torch.Tensor, n_tokens: int) -> object:
        ids = torch.tensor([prompt], device="cuda").repeat(mel.shape[0], 1)
        with torch.inference_mode():
            out = GenerationMixin.generate(model, input_features=mel, decoder_input_ids=ids, do_sample=False,
                                           num_beams=1, min_new_tokens=n_tokens, max_new_tokens=n_tokens,
                                           suppress_tokens=[special.eot])
        torch.cuda.synchronize()
        return out

    return run


def build_openai(shape: str) -> Callable[[torch.Tensor, int], object]:
    # openai-whisper imports numba only for word timings, which this benchmark never calls.
    if "numba" not in sys.modules:
        try:
            import numba  # noqa: F401
        except ImportError:
            stub = types.ModuleType("numba")
            stub.jit = lambda *a, **k: (lambda f: f)  # type: ignore[attr-defined]
            sys.modules["numba"] = stub
    import whisper
    from whisper.model import ModelDimensions, Whisper

    dims = dims_for(shape)
    odims = ModelDimensions(n_mels=dims.n_mels, n_audio_ctx=1500, n_audio_state=dims.n_audio_state,
                            n_audio_head=dims.n_audio_head, n_audio_layer=dims.n_audio_layer,
                            n_vocab=dims.n_vocab, n_text_ctx=448, n_text_state=dims.n_text_state,
                            n_text_head=dims.n_text_head, n_text_layer=dims.n_text_layer)
    with torch.device("cuda"):
        model = Whisper(odims).eval()  # fp32 weights, fp16 activations: how that library runs
    eot = expected_special_tokens(dims.n_vocab).eot

    def run(mel: torch.Tensor, n_tokens: int) -> object:
        options = whisper.DecodingOptions(task="transcribe", language="en", temperature=0.0, sample_len=n_tokens,
                                          suppress_tokens=[eot], suppress_blank=False, without_timestamps=True,
                                          fp16=True)
        with torch.inference_mode():
            out = whisper.decode(model, mel, options)
        torch.cuda.synchronize()
        return out

    return run


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median seconds, peak GiB) after one warm-up."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def smoke() -> None:
    """Graph replay == eager; chunked greedy == stepwise greedy; int8 kernel == dequantized SDPA;
    fused int8 quantization == the torch reference; fused residual add + LayerNorm == torch;
    the fp32-logits GEMM == an fp32 matmul; the decode steps' few-rows GEMM == torch's."""
    from app.engine.cache import quantize_kv_int8
    from app.engine.cuda.attention import decode_attention
    from app.engine.cuda.kv_cache import append_kv, write_cross_kv
    from app.engine.cuda.logits_gemm import logits_fp32
    from app.engine.cuda.norms import add_layer_norm
    from app.engine.cuda.row_gemm import LinearWeights, choose_tiles, row_linear
    from bench.reference_ops import reference_add_layer_norm, reference_linear

    for rows, d in ((1, 384), (64, 1280), (200, 768)):
        norm = torch.nn.LayerNorm(d, device="cuda", dtype=torch.float16)
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
        x = torch.randn(rows, 1, d, device="cuda", dtype=torch.float16) * 4
        y = torch.randn_like(x)
        (total, out), (ref_total, ref_out) = add_layer_norm(x, y, norm), reference_add_layer_norm(x, y, norm)
        worst = ((out.float() - ref_out.float()).abs().max() / ref_out.float().abs().max()).item()
        print(f"add_layer_norm rows={rows} d={d}: sum equal {torch.equal(total, ref_total)}, "
              f"LN max diff / max value {worst:.1e}")
        assert torch.equal(total, ref_total) and worst < 2e-3, worst  # fp16 rounding, reduction order

    for rows, d, vocab in ((1, 384, 51864), (64, 1280, 51866), (200, 768, 51865)):
        x = torch.randn(rows, 1, d, device="cuda", dtype=torch.float16)
        w = torch.randn(vocab, d, device="cuda", dtype=torch.float16) * d**-0.5
        got, ref = logits_fp32(x, w), x.float() @ w.float().t()
        rel = ((got - ref).abs().max() / ref.abs().max()).item()
        same_argmax = torch.equal(got.argmax(-1), ref.argmax(-1))
        print(f"logits_fp32 rows={rows} d={d}: max diff / max value {rel:.1e}, argmax equal {same_argmax}")
        assert got.dtype == torch.float32 and rel < 1e-5 and same_argmax, rel  # fp32 sums, other order

    for rows, n, k, gelu in ((1, 1152, 384, False), (64, 5120, 1280, True), (37, 768, 3072, False)):
        x = torch.randn(rows, 1, k, device="cuda", dtype=torch.float16)
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) * k**-0.5
        bias = torch.randn(n, device="cuda", dtype=torch.float16)
        got = [row_linear(x, LinearWeights(w, bias), gelu=gelu) for _ in range(2)]  # 2nd: counters were reset
        ref = reference_linear(x.float(), w.float(), bias.float(), gelu)
        rel = max(((g.float() - ref).abs().max() / ref.abs().max()).item() for g in got)
        print(f"row_linear rows={rows} {n}x{k} gelu={gelu} split={choose_tiles(n, k, rows).split}: "
              f"max diff / max value {rel:.1e}, repeat equal {torch.equal(got[0], got[1])}")
        assert rel < 2e-3 and torch.equal(got[0], got[1]), rel  # fp16 output rounding
        q, scale = quantize_kv_int8(w)  # int8 weights, one scale per output row
        got_q = row_linear(x, LinearWeights(q, bias, scale.squeeze(1)), gelu=gelu)
        ref_q = reference_linear(x.float(), q.float() * scale.float(), bias.float(), gelu)
        rel = ((got_q.float() - ref_q).abs().max() / ref_q.abs().max()).item()
        print(f"row_linear int8 weights rows={rows} {n}x{k}: max diff / max value {rel:.1e}")
        assert rel < 2e-3, rel

    for b, heads, dh in ((1, 20, 64), (64, 6, 64)):
        qkv = torch.randn(b, 1, 3 * heads * dh, device="cuda", dtype=torch.float16)
        cache_k = torch.randn(b + 2, heads, 448, dh, device="cuda", dtype=torch.float16)
        cache_v = torch.randn_like(cache_k)
        expected_k, expected_v = cache_k.clone(), cache_v.clone()
        positions = torch.randint(0, 448, (b,), device="cuda")
        _, k, v = qkv.view(b, 1, 3, heads, dh).unbind(2)
        for row in range(b):
            expected_k[1 + row, :, positions[row]] = k[row, 0]
            expected_v[1 + row, :, positions[row]] = v[row, 0]
        append_kv(qkv, cache_k[1 : 1 + b], cache_v[1 : 1 + b], positions)
        same = torch.equal(cache_k, expected_k) and torch.equal(cache_v, expected_v)
        print(f"append_kv B={b} H={heads}: caches equal the reference: {same}")
        assert same

    for b, t, heads, dh in ((3, 1500, 6, 64), (2, 700, 20, 64)):
        kv = torch.randn(b, t, 2 * heads * dh, device="cuda", dtype=torch.float16) * 3
        rows = [4, 1, 6][:b]
        shape = (8, heads, 1500, dh)
        k = torch.zeros(shape, device="cuda", dtype=torch.int8)
        v = torch.zeros_like(k)
        ks = torch.ones(*shape[:3], 1, device="cuda", dtype=torch.float16)
        vs = torch.ones_like(ks)
        index = torch.tensor(rows, device="cuda")
        write_cross_kv(kv, heads=heads, rows=index, k_cache=k, v_cache=v, k_scale=ks, v_scale=vs)
        split = kv.view(b, t, 2, heads, dh).permute(2, 0, 3, 1, 4)
        for got, got_scale, ref_src in ((k, ks, split[0]), (v, vs, split[1])):
            ref, ref_scale = quantize_kv_int8(ref_src)
            diff = (got[index, :, :t].int() - ref.int()).abs()
            print(f"write_cross_kv B={b} T={t} H={heads}: {int((diff > 0).sum())} of {diff.numel()} values "
                  f"differ (max {int(diff.max())}); scales equal: {torch.equal(got_scale[index, :, :t], ref_scale)}")
            assert int(diff.max()) == 0  # the same arithmetic as the torch reference, bit for bit
        # the fp16 cache: the same kernel copies the values as they are
        kh = torch.zeros(shape, device="cuda", dtype=torch.float16)
        vh = torch.zeros_like(kh)
        write_cross_kv(kv, heads=heads, rows=index, k_cache=kh, v_cache=vh)
        exact = torch.equal(kh[index, :, :t], split[0]) and torch.equal(vh[index, :, :t], split[1])
        untouched = int(kh[:, :, t:].count_nonzero()) + int(kh[[r for r in range(8) if r not in rows]].count_nonzero())
        print(f"write_cross_kv fp16 B={b} T={t} H={heads}: exact copy {exact}, other cache entries written {untouched}")
        assert exact and untouched == 0

    for b, h, n in ((1, 20, 1500), (8, 6, 1500), (64, 20, 1500), (3, 6, 128)):
        q = torch.randn(b, h, 1, 64, device="cuda", dtype=torch.float16)
        kf = torch.randn(b, h, n, 64, device="cuda", dtype=torch.float16)
        vf = torch.randn_like(kf)
        k8, ks = quantize_kv_int8(kf)
        v8, vs = quantize_kv_int8(vf)
        lengths = torch.randint(1, n + 1, (b,), device="cuda")
        keys = torch.arange(n, device="cuda")
        mask = (keys[None, :] < lengths[:, None])[:, None, None, :]
        sdpa = torch.nn.functional.scaled_dot_product_attention
        checks = {
            "fp16": (decode_attention(q, kf, vf), sdpa(q.float(), kf.float(), vf.float())),
            "fp16+len": (decode_attention(q, kf, vf, lengths=lengths), sdpa(q.float(), kf.float(), vf.float(), attn_mask=mask)),
            "int8": (decode_attention(q, k8, v8, k_scale=ks, v_scale=vs),
                     sdpa(q.float(), k8.float() * ks.float(), v8.float() * vs.float())),
        }
        for name, (got, ref) in checks.items():
            rel = ((got.float() - ref).norm() / ref.norm()).item()
            print(f"decode_attention {name} B={b} H={h} T={n}: rel err {rel:.2e}")
            assert rel < 5e-3, rel
    for int8_kv in (False, True):
        # 4 windows: a whole batch bucket, so the prompt prefill replays its graph too
        mel = torch.randn(4, 80, 3000, device="cuda", dtype=torch.float16)
        # the same random weights in both engines
        eager = build_ours("tiny.en", ours_options(8, torch.float16, int8_kv, False, (1, 2, 4, 8), 8))
        graphed = build_ours("tiny.en", ours_options(8, torch.float16, int8_kv, True, (1, 2, 4, 8), 8))
        a = run_ours(eager, mel, 40)
        b = run_ours(graphed, mel, 40)
        same = sum(x == y for x, y in zip(sorted(a), sorted(b), strict=True))
        print(f"int8_kv={int8_kv}: graphed greedy == eager greedy on {same}/{len(a)} windows; lengths {[len(x) for x in b]}")
        assert all(len(x) == 40 for x in b)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny.en,small,large-v3")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--extra-batches", default="tiny.en:256", help="shape:B pairs measured for us and HF only")
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peers", default="hf,openai")
    p.add_argument("--int8-kv-shapes", default="large-v3")
    p.add_argument("--fp8-shapes", default="large-v3", help="shapes also run with the fp8 encoder (GPUs of 8.9+)")
    p.add_argument("--chunk-steps", type=int, default=8)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--engines", default=None, help="engine dirs (comma-separated): also run the dev set")
    p.add_argument("--manifest", type=Path, default=Path("../shared/data/speech/dev/manifest.tsv"))
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        smoke()
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    gpu = torch.cuda.get_device_name()
    rows: list[dict[str, object]] = []
    peers = [x for x in args.peers.split(",") if x]
    extra = {}
    for item in filter(None, args.extra_batches.split(",")):
        name, b = item.split(":")
        extra.setdefault(name, []).append(int(b))
    for shape in args.shapes.split(","):
        rows += measure_shape(shape, [int(b) for b in args.batches.split(",")], extra.get(shape, []), peers, args)
    print_table(rows, gpu, args)
    if args.json:
        args.json.write_text(json.dumps(dict(gpu=gpu, args=vars(args) | {"json": str(args.json), "manifest": str(args.manifest)},
                                             rows=rows), indent=1))
    if args.engines:
        dev_set(args)


#: bench/gpu_accuracy.py's variants that the acceptance items read (GPU greedy is left out)
DEV_SET_VARIANTS = "cuda fp16 defaults,int8-cross-kv,fp8-encoder,int8-weights,cpu fp32"


def dev_set(args: argparse.Namespace) -> None:
    """Real weights on the dev set: bench/gpu_accuracy.py's run, then its WER table."""
    import asyncio

    from bench import gpu_accuracy

    out = args.json.with_name(f"{args.json.stem}-dev-set.json") if args.json else Path("gpu_dev_set.json")
    accuracy_args = argparse.Namespace(engines=args.engines, manifest=args.manifest, out=out, limit=None,
                                       concurrency=64, cpu_threads=torch.get_num_threads(), only=DEV_SET_VARIANTS)
    print(f"\ndev set, real weights ({args.engines}): transcripts in {out}", flush=True)
    asyncio.run(gpu_accuracy.main_async(accuracy_args))
    try:
        gpu_accuracy.report(out)
    except ImportError as exc:
        print(f"WER not computed here ({exc.name} is missing): python -m bench.gpu_accuracy --report {out}")


@dataclass
class Implementation:
    label: str
    run: Callable[[torch.Tensor], object]  # one batch of mels -> (ignored) output
    resident_gib: float  # GPU memory it holds between runs (weights, caches, graphs)
    batches: list[int]
    check: Callable[[], None] = lambda: None


def build_all(shape: str, batches: list[int], peer_batches: dict[str, list[int]], peers: list[str],
              args: argparse.Namespace) -> list[Implementation]:
    """Every implementation of one shape, loaded at once so their timings can be interleaved."""
    impls: list[Implementation] = []
    max_rows = max(batches)
    variants = [("ours fp16", False, False)]
    if shape in args.int8_kv_shapes.split(","):
        variants.append(("ours fp16 + int8 cross-K/V", True, False))
    if shape in args.fp8_shapes.split(",") and fp8_supported(torch.device("cuda")):  # else they'd run fp16
        variants += [("ours fp16 + fp8 encoder", False, True), ("ours int8 cross-K/V + fp8 encoder", True, True)]
    for label, int8_kv, fp8_encoder in variants:
        before = torch.cuda.memory_allocated()
        try:  # an engine holds its K/V caches for max(batches) rows from the start
            ours = build_ours(shape, ours_options(max_rows, torch.float16, int8_kv, True, tuple(batches),
                                                  args.chunk_steps, fp8_encoder))
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"{label} unavailable for {shape}: out of GPU memory beside the {len(impls)} "
                  f"implementation(s) loaded before it (--int8-kv-shapes/--fp8-shapes load fewer)", flush=True)
            continue
        out: list[list[int]] = []

        def check(out: list[list[int]] = out) -> None:
            assert all(len(t) == args.tokens for t in out), "every window must decode exactly N tokens"

        impls.append(Implementation(label, functools.partial(collect, out, ours, n_tokens=args.tokens),
                                    (torch.cuda.memory_allocated() - before) / 2**30, batches, check))
    names = {"hf": "HF transformers", "openai": "openai-whisper"}
    for peer in peers:
        before = torch.cuda.memory_allocated()
        try:
            run = build_hf(shape) if peer == "hf" else build_openai(shape)
        except Exception as exc:  # noqa: BLE001 - report and continue with the others
            print(f"{peer} unavailable for {shape}: {exc!r}", flush=True)
            continue
        impls.append(Implementation(names[peer], functools.partial(run, n_tokens=args.tokens),
                                    (torch.cuda.memory_allocated() - before) / 2**30, peer_batches[peer]))
    return impls


def measure_shape(shape: str, batches: list[int], extra: list[int], peers: list[str],
                  args: argparse.Namespace) -> list[dict[str, object]]:
    """Time every implementation at each batch size in turn (ours, HF, openai, then the next B),
    so that all see the GPU in the same state; peak memory = its resident memory + the peak
    allocated during its own runs above what was allocated before them."""
    all_batches = batches + extra
    n_mels = SHAPES[shape][0]
    mels = {b: torch.randn(b, n_mels, 3000, device="cuda", dtype=torch.float16) for b in all_batches}
    impls = build_all(shape, all_batches, {"hf": all_batches, "openai": batches}, peers, args)
    rows: list[dict[str, object]] = []
    for b in all_batches:
        for impl in impls:
            if b not in impl.batches:
                continue
            try:
                before = torch.cuda.memory_allocated()
                sec, peak = timed(functools.partial(impl.run, mels[b]), args.repeats)
                impl.check()
                peak_gib = impl.resident_gib + peak - before / 2**30
            except torch.OutOfMemoryError:
                rows.append(dict(shape=shape, impl=impl.label, B=b, rtfx=None, seconds=None, peak_gib=None))
                torch.cuda.empty_cache()
                continue
            rows.append(dict(shape=shape, impl=impl.label, B=b, rtfx=b * 30 / sec, seconds=sec, peak_gib=peak_gib))
            print(json.dumps(rows[-1]), flush=True)
    del impls
    torch.cuda.empty_cache()
    order = {label: i for i, label in enumerate(dict.fromkeys(r["impl"] for r in rows))}
    return sorted(rows, key=lambda r: (order[r["impl"]], r["B"]))  # table grouped by implementation


def print_table(rows: list[dict[str, object]], gpu: str, args: argparse.Namespace) -> None:
    print(f"\n{gpu}, torch {torch.__version__}, N={args.tokens} tokens, fp16, median of {args.repeats}")
    print("| shape | B | implementation | RTFx | x HF | wall s | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    hf = {(r["shape"], r["B"]): r["rtfx"] for r in rows if r["impl"] == "HF transformers"}
    for r in rows:
        base = hf.get((r["shape"], r["B"]))
        ratio = f"{r['rtfx'] / base:.2f}" if base and r["rtfx"] else "-"
        rtfx = f"{r['rtfx']:,.0f}" if r["rtfx"] else "OOM"
        wall = f"{r['seconds']:.3f}" if r["seconds"] else "-"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] else "-"
        print(f"| {r['shape']} | {r['B']} | {r['impl']} | {rtfx} | {ratio} | {wall} | {peak} |")


if __name__ == "__main__":
    main()
