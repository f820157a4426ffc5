"""Cross-attention K/V writes (app.engine.cuda.kv_cache), decode attention over int8 K/V
(app.engine.cuda.attention) and programmatic dependent launch (app.engine.cuda.common). The kernels
run on CUDA devices only; a CPU engine resolves every kernel off and keeps torch's path."""

from __future__ import annotations

import pytest
import torch
from fakes import cuda_only

from app.engine import options as engine_options
from app.engine.cache import attend_cached, quantize_kv_int8
from app.engine.cuda.attention import ATTENTION_TILES, MAX_QUERIES, decode_attention
from app.engine.cuda.common import launch_args
from app.engine.cuda.kv_cache import write_cross_kv
from app.engine.options import NO_KERNELS, CudaKernels, EngineOptions, resolve_kernels


def test_cpu_engines_run_no_kernels() -> None:
    options = EngineOptions(device="cpu").resolve()
    assert options.kernels == NO_KERNELS and not options.graphs.enabled
    assert launch_args(False) == {"PDL": False}


def test_pdl_is_decided_when_the_engine_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_options, "HAVE_TRITON", True)
    monkeypatch.setattr(engine_options, "pdl_supported", lambda device: True)
    cuda = torch.device("cuda", 0)
    assert resolve_kernels(CudaKernels(), cuda, torch.float16).pdl
    assert not resolve_kernels(CudaKernels(pdl=False), cuda, torch.float16).pdl
    monkeypatch.setenv("WHISPER_PDL", "0")
    assert not resolve_kernels(CudaKernels(), cuda, torch.float16).pdl


def test_kernels_follow_triton_and_the_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_options, "HAVE_TRITON", True)
    monkeypatch.setattr(engine_options, "pdl_supported", lambda device: False)
    cuda = torch.device("cuda", 0)
    half = resolve_kernels(CudaKernels(), cuda, torch.float16)
    assert half.row_gemm and half.fold_norms and half.fused_norms and half.logits_kernel and half.triton
    fp32 = resolve_kernels(CudaKernels(), cuda, torch.float32)
    assert fp32.triton and not (fp32.row_gemm or fp32.fold_norms or fp32.fused_norms or fp32.logits_kernel)
    assert not resolve_kernels(CudaKernels(row_gemm=False), cuda, torch.float16).fold_norms  # folded steps need it
    monkeypatch.setattr(engine_options, "HAVE_TRITON", False)
    assert resolve_kernels(CudaKernels(), cuda, torch.float16) == NO_KERNELS


def test_int8_cached_attention_reads_dequantised_keys() -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 3, 5, 64)
    k8, ks = quantize_kv_int8(torch.randn(2, 3, 40, 64))
    v8, vs = quantize_kv_int8(torch.randn(2, 3, 40, 64))
    got = attend_cached(q, k8, v8, k_scale=ks, v_scale=vs)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k8.float() * ks, v8.float() * vs)
    assert got.shape == (2, 3, 5, 64)
    assert torch.equal(got, expected)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_write_kv_copies_head_major_into_the_given_rows(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    b, t, heads, dh = 3, 700, 6, 64
    kv = torch.randn(b, t, 2 * heads * dh, device="cuda", dtype=dtype)
    rows = [4, 1, 6]
    k = torch.zeros(8, heads, 1500, dh, device="cuda", dtype=dtype)
    v = torch.zeros_like(k)
    write_cross_kv(kv, heads=heads, rows=torch.tensor(rows, device="cuda"), k_cache=k, v_cache=v)
    split = kv.view(b, t, 2, heads, dh).permute(2, 0, 3, 1, 4)
    index = torch.tensor(rows, device="cuda")
    assert torch.equal(k[index, :, :t], split[0])
    assert torch.equal(v[index, :, :t], split[1])
    others = [r for r in range(8) if r not in rows]
    assert k[others].count_nonzero() == 0 and k[:, :, t:].count_nonzero() == 0


@cuda_only
def test_int8_write_kv_is_the_torch_quantisation_bit_for_bit() -> None:
    torch.manual_seed(1)
    b, t, heads, dh = 2, 1500, 20, 64
    kv = torch.randn(b, t, 2 * heads * dh, device="cuda", dtype=torch.float16) * 3
    kv[0, :5] = torch.randint(-4, 5, (5, 2 * heads * dh), device="cuda").half()  # exact ties at .5 steps
    rows = torch.tensor([2, 0], device="cuda")
    k = torch.zeros(3, heads, t, dh, device="cuda", dtype=torch.int8)
    v = torch.zeros_like(k)
    ks = torch.zeros(3, heads, t, 1, device="cuda", dtype=torch.float16)
    vs = torch.zeros_like(ks)
    write_cross_kv(kv, heads=heads, rows=rows, k_cache=k, v_cache=v, k_scale=ks, v_scale=vs)
    split = kv.view(b, t, 2, heads, dh).permute(2, 0, 3, 1, 4)
    for got, got_scale, src in ((k, ks, split[0]), (v, vs, split[1])):
        values, scale = quantize_kv_int8(src)
        assert torch.equal(got[rows], values) and torch.equal(got_scale[rows], scale)


@cuda_only
@pytest.mark.parametrize(("batch", "heads", "splits"), [(64, 20, 1), (1, 20, 4), (5, 6, 2)])
def test_int8_scores_by_dp4a_match_widened_keys(batch: int, heads: int, splits: int) -> None:
    """int8 K read as words and scored by dp4a against q in 16-bit fixed point gives the
    attention of widening every key, within fp16 output rounding, across key splits."""
    from dataclasses import replace

    torch.manual_seed(0)
    q = torch.randn(batch, heads, 1, 64, device="cuda", dtype=torch.float16)
    cache_k = torch.randn(batch + 2, heads, 1500, 64, device="cuda", dtype=torch.float16)
    cache_k[:, :, :8] *= 4  # a few dominant keys, as in real cross-attention
    k8, ks = quantize_kv_int8(cache_k)
    v8, vs = quantize_kv_int8(torch.randn_like(cache_k))
    rows = slice(1, batch + 1)  # a slice of the cache, as the decoder passes it
    config = replace(ATTENTION_TILES.int8(batch * heads), min_splits=splits)
    by_dp4a = decode_attention(q, k8[rows], v8[rows], k_scale=ks[rows], v_scale=vs[rows], config=config)
    widened = decode_attention(q, k8[rows], v8[rows], k_scale=ks[rows], v_scale=vs[rows],
                               config=replace(config, dp4a_k=False))
    assert config.dp4a_k
    assert (by_dp4a.float() - widened.float()).abs().max().item() <= 2e-3


@cuda_only
@pytest.mark.parametrize(("batch", "queries"), [(64, 4), (1, 3), (3, 20), (2, 70)])
def test_prompt_queries_attend_to_int8_keys_in_one_kernel(batch: int, queries: int) -> None:
    """A prefill's queries (up to 16 per pass) against int8 cross-K/V: the dequantised reference,
    within fp16 rounding; more than MAX_QUERIES take the reference itself."""
    torch.manual_seed(0)
    heads = 20
    q = torch.randn(batch, heads, queries, 64, device="cuda", dtype=torch.float16)
    cache_k = torch.randn(batch + 1, heads, 1500, 64, device="cuda", dtype=torch.float16)
    cache_k[:, :, :8] *= 4
    k8, ks = quantize_kv_int8(cache_k)
    v8, vs = quantize_kv_int8(torch.randn_like(cache_k))
    rows = slice(1, batch + 1)
    got = decode_attention(q, k8[rows], v8[rows], k_scale=ks[rows], v_scale=vs[rows])
    expected = attend_cached(q.float(), k8[rows], v8[rows], k_scale=ks[rows].float(), v_scale=vs[rows].float())
    assert got.shape == q.shape
    if queries > MAX_QUERIES:
        assert torch.equal(got, attend_cached(q, k8[rows], v8[rows], k_scale=ks[rows], v_scale=vs[rows]))
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=5e-3 * expected.abs().max().item())
