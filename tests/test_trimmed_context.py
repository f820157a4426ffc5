"""Windows shorter than 30 s on GPU engines (WHISPER_CUDA_TRIMMED_CONTEXT).

Each cache row records how many encoder positions its cross-attention K/V hold
(DecoderCache.cross_len) and the GPU's cross-attention reads only those. The bookkeeping and the
masked read run here on the CPU; the GPU test (skipped without CUDA) decodes real partials, trimmed
and whole-window, and checks them against each other and against the CPU engine.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from app.engine.cache import DecoderCache, attend_cached
from app.engine.options import CudaGraphOptions, EngineOptions
from app.engine.runners import make_runner
from app.engine.runners.cuda import CudaRunner
from app.engine.runners.reference import ReferenceRunner
from tests.fakes import cuda_only, random_engine, random_model, tiny_config

REPO_ROOT = Path(__file__).resolve().parents[1]
DEV_SET = REPO_ROOT.parent / "shared" / "data" / "speech" / "dev"


def runner_with_lengths(max_rows: int = 6) -> ReferenceRunner:
    model = random_model(seed=3)
    cache = DecoderCache(
        model.dims, max_rows, torch.device("cpu"), torch.float32, cross_lengths=True
    )
    return ReferenceRunner(model, cache)


def test_rows_record_their_windows_audio_positions() -> None:
    runner = runner_with_lengths()
    full = runner.dims.n_audio_ctx
    d = runner.dims.n_audio_state
    assert runner.cache.cross_len is not None
    assert runner.cache.cross_len.tolist() == [full] * 6
    runner.write_cross_kv(torch.randn(2, 250, d), [1, 2])
    runner.write_cross_kv(torch.randn(1, 400, d), [4])
    assert runner.cache.cross_len.tolist() == [full, 250, 250, full, 400, full]
    # compaction and beam copies move the length with the K/V
    runner.cache.copy_rows([4], [0], self_len=0, cross=True)
    runner.cache.copy_rows([1], [5], self_len=0, cross=False)
    assert runner.cache.cross_len.tolist() == [400, 250, 250, full, 400, full]


def test_a_trimmed_row_reads_only_its_own_positions() -> None:
    # Stale K/V past a trimmed window's audio (left by a longer window in the same row) must not
    # leak in: the per-row-length read equals cross_runs' sliced read, which the CPU uses.
    torch.manual_seed(0)
    runner = runner_with_lengths(4)
    dims = runner.dims
    h, dh = dims.n_text_head, dims.n_text_state // dims.n_text_head
    runner.write_cross_kv(
        torch.randn(4, dims.n_audio_ctx, dims.n_audio_state), [0, 1, 2, 3]
    )  # stale
    runner.write_cross_kv(torch.randn(2, 300, dims.n_audio_state), [1, 2])
    for t in (1, 3):  # a decode step, a prompt's queries
        cq = torch.randn(4, h, t, dh)
        got = runner.cross_attention(0, cq, 0, None)  # each row to its recorded length
        runs = [(0, 1, 1, dims.n_audio_ctx), (1, 2, 1, 300), (3, 1, 1, dims.n_audio_ctx)]
        want = runner.cross_attention(0, cq, 0, runs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lengths_apply_to_every_query_of_a_row() -> None:
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 40, 8), torch.randn(2, 3, 40, 8)
    got = attend_cached(q, k, v, lengths=torch.tensor([40, 17]))
    torch.testing.assert_close(
        got[1:],
        torch.nn.functional.scaled_dot_product_attention(q[1:], k[1:, :, :17], v[1:, :, :17]),
    )


def test_the_setting_reaches_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.config import Settings
    from app.runtime import RuntimeOptions

    monkeypatch.setenv("WHISPER_CUDA_TRIMMED_CONTEXT", "1")
    assert RuntimeOptions.from_settings(Settings()).cuda_trimmed_context
    # a CPU engine trims whatever the setting says (cross_runs carry each window's length)
    assert random_engine(random_model(seed=4), 4).trims_audio_context


# ------------------------------------------------------------------------------------------- GPU


def _word_agreement(a: str, b: str) -> float:
    """Share of the longer text's words in the common prefix (case and punctuation ignored)."""
    from app.streaming.partials import _agreed_length, _key

    wa, wb = [_key(w) for w in a.split()], [_key(w) for w in b.split()]
    longest = max(len(wa), len(wb))
    return 1.0 if longest == 0 else _agreed_length(wa, wb) / longest


@cuda_only
@pytest.mark.skipif(
    not (REPO_ROOT / "engines" / "tiny.en" / "config.json").is_file(), reason="no tiny.en engine"
)
@pytest.mark.skipif(not (DEV_SET / "manifest.tsv").is_file(), reason="no dev set")
def test_gpu_trimmed_partials_agree_with_full_windows_and_the_cpu() -> None:
    from app.audio.decode import decode_audio
    from app.decoding.options import TranscribeOptions
    from app.runtime import RuntimeOptions, load_runtime
    from bench.common import load_manifest

    engine = Path(os.environ.get("TRIM_TEST_ENGINE", REPO_ROOT / "engines" / "tiny.en"))
    clips = load_manifest(DEV_SET / "manifest.tsv", limit=12)
    # turn prefixes of 2-9 s, as a partial sees them while a turn grows
    prefixes = [decode_audio(c.path)[: int(16000 * (2 + i % 8))] for i, c in enumerate(clips)]
    greedy = TranscribeOptions.greedy()
    trimmed = replace(greedy, trim_audio_context=True)

    async def sequential(runtime, options: TranscribeOptions) -> tuple[list[str], float]:  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        out = [(await runtime.transcribe(a, options)).text for a in prefixes]
        return out, (time.perf_counter() - started) / len(prefixes)

    async def on_gpu() -> tuple[list[str], list[str], list[str], float, float]:
        runtime = load_runtime(
            engine, RuntimeOptions(device="cuda", cuda_trimmed_context=True, max_batch_size=32)
        )
        assert runtime.engine.trims_audio_context
        await runtime.start()
        try:
            await sequential(runtime, trimmed)  # warm: kernels of each window length
            trimmed_texts, trimmed_s = await sequential(runtime, trimmed)
            full_texts, full_s = await sequential(runtime, greedy)
            # trimmed windows of many lengths in one batch, beside 30 s windows
            batched = await asyncio.gather(
                *(runtime.transcribe(a, trimmed) for a in prefixes),
                *(runtime.transcribe(a, greedy) for a in prefixes[:4]),
            )
            return (
                trimmed_texts,
                [r.text for r in batched[: len(prefixes)]],
                full_texts,
                trimmed_s,
                full_s,
            )
        finally:
            await runtime.stop()

    async def on_cpu() -> list[str]:
        runtime = load_runtime(engine, RuntimeOptions(device="cpu"))
        await runtime.start()
        try:
            return (await sequential(runtime, trimmed))[0]
        finally:
            await runtime.stop()

    gpu_trimmed, gpu_trimmed_batched, gpu_full, trimmed_s, full_s = asyncio.run(on_gpu())
    cpu_trimmed = asyncio.run(on_cpu())
    print(
        f"\none partial at a time on the GPU: {1000 * trimmed_s:.1f} ms trimmed, {1000 * full_s:.1f} ms whole window"
    )
    for name, other, least in (
        ("batched", gpu_trimmed_batched, 0.95),
        ("cpu fp32", cpu_trimmed, 0.9),
        ("full window", gpu_full, 0.6),  # the CPU engine: 0.73 on these prefixes
    ):
        agreement = np.mean(
            [_word_agreement(a, b) for a, b in zip(gpu_trimmed, other, strict=True)]
        )
        print(f"trimmed GPU partials vs {name}: word agreement {agreement:.3f}")
        assert agreement >= least, (name, list(zip(gpu_trimmed, other, strict=True)))
    assert all(t.strip() for t in gpu_trimmed)  # speech in every prefix: no empty partial


@cuda_only
@pytest.mark.parametrize("cross_dtype", [None, torch.int8], ids=["fp16", "int8"])
def test_trimmed_rows_read_only_their_positions_on_cuda(cross_dtype: torch.dtype | None) -> None:
    # The Triton path of the per-row-length read (fp16 K/V with the long-key tiles, int8 K/V with
    # their scales), for a decode step and a prompt's queries, against the same rows read through
    # cross_runs (sliced K/V, the CPU's way) on the same cache.
    torch.manual_seed(0)
    model = random_model(seed=3).to(device="cuda", dtype=torch.float16)
    dims = model.dims
    options = EngineOptions(device="cuda", compute_dtype="float16", max_rows=4, int8_cross_kv=cross_dtype is not None,
                            trimmed_context=True, graphs=CudaGraphOptions(enabled=False))
    runner = make_runner(model, tiny_config(), options.resolve())
    assert isinstance(runner, CudaRunner)
    cache = runner.cache
    h, dh = dims.n_text_head, dims.n_text_state // dims.n_text_head
    d = dims.n_audio_state
    runner.write_cross_kv(torch.randn(4, dims.n_audio_ctx, d, device="cuda", dtype=torch.float16),
                          [0, 1, 2, 3])  # stale K/V past the trimmed windows
    runner.write_cross_kv(torch.randn(2, 300, d, device="cuda", dtype=torch.float16), [1, 2])
    assert cache.cross_len is not None and cache.cross_len.tolist()[:3] == [dims.n_audio_ctx, 300, 300]
    for t in (1, 3):
        cq = torch.randn(4, h, t, dh, device="cuda", dtype=torch.float16)
        got = runner.cross_attention_kernel(0, cq, 0).float()
        for row, n in enumerate(cache.cross_len.tolist()):
            k, v = cache.cross_k[0, row : row + 1, :, :n], cache.cross_v[0, row : row + 1, :, :n]
            if cache.quantized_cross:
                k = k.float() * cache.cross_k_scale[0, row : row + 1, :, :n].float()
                v = v.float() * cache.cross_v_scale[0, row : row + 1, :, :n].float()
            want = torch.nn.functional.scaled_dot_product_attention(
                cq[row : row + 1].float(), k.float(), v.float()
            )
            torch.testing.assert_close(got[row : row + 1], want, rtol=2e-2, atol=2e-2)
