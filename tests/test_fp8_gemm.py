"""fp8 GEMMs of the encoder and the cross-attention K/V (app.engine.fp8_gemm).

On the CPU the fp8 path runs its torch reference (the same quantisation, dequantised GEMMs), which
checks the model wiring; the kernels and cuBLAS's fp8 GEMM run only on CUDA (tests at the end).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fakes import random_mel, random_model, tiny_config, tiny_dims
from torch import nn

from app.engine.fp8_gemm import (
    FP8,
    FP8_MAX,
    Fp8Linear,
    fp8_linear,
    fp8_supported,
    quantize_rows,
    quantize_rows_reference,
)
from app.engine.fused_norm import add_layer_norm_fp8, layer_norm_fp8, reference_add_layer_norm
from app.engine.torch_engine import TorchEngine
from app.engine.torch_model import Int8Linear, enable_fp8_audio_gemms, quantize_rows_int8

cuda_only = pytest.mark.skipif(not (torch.cuda.is_available() and fp8_supported(torch.device("cuda"))),
                               reason="needs a CUDA GPU with fp8 (compute capability 8.9+)")

# e4m3 keeps 3 mantissa bits: a value rounds by at most half a step, 2**-4 of it
E4M3_RELATIVE_STEP = 2.0**-3


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_rows_quantise_onto_the_full_e4m3_range_with_bounded_rounding() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 40) * torch.logspace(-3, 3, 6)[:, None]  # rows of very different magnitude
    x[2] = 0.0
    q = quantize_rows_reference(x)
    assert q.values.dtype == FP8 and q.values.shape == (6, 40) and q.scale.shape == (6, 1)
    assert q.scale.dtype == torch.float32
    nonzero = [0, 1, 3, 4, 5]
    # each row's largest magnitude lands on e4m3's largest finite value
    assert torch.equal(q.values[nonzero].float().abs().amax(dim=1), torch.full((5,), FP8_MAX))
    assert torch.count_nonzero(q.values[2].float()) == 0  # a zero row stays zero (no 0/0)
    restored = q.values.float() * q.scale
    error = (restored - x).abs()
    # normal values round within half a step; the smallest ones within e4m3's subnormal spacing
    bound = torch.maximum(x.abs() * E4M3_RELATIVE_STEP / 2, q.scale * 2.0**-9)
    assert bool((error <= bound * 1.0001).all())


def test_gelu_quantisation_is_gelu_then_quantisation() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 5, 64)
    got = quantize_rows_reference(x, gelu=True)
    expected = quantize_rows_reference(F.gelu(x, approximate="tanh"))
    assert torch.equal(got.values.float(), expected.values.float()) and torch.equal(got.scale, expected.scale)
    assert got.values.shape == (15, 64)  # leading dimensions flattened into rows


@pytest.mark.parametrize("int8_weights", [False, True])
def test_fp8_linear_is_the_gemm_of_the_quantised_operands(int8_weights: bool) -> None:
    torch.manual_seed(2)
    if int8_weights:
        layer: nn.Module = Int8Linear(48, 32)
        layer.weight.copy_(torch.randint(-127, 128, (32, 48), dtype=torch.int8))
        layer.weight_scale.uniform_(0.001, 0.01)
        layer.bias.data.normal_()
        dense = layer.weight.float() * layer.weight_scale[:, None]
    else:
        layer = nn.Linear(48, 32)
        dense = layer.weight.detach()
    weight = Fp8Linear.from_linear(layer, torch.float32)
    assert weight.weight_t.shape == (48, 32) and weight.weight_t.stride() == (1, 48)  # column-major
    # no autograd graph from the layer's parameters: it would keep float32 copies alive
    assert all(t is not None and t.grad_fn is None and not t.requires_grad
               for t in (weight.weight_t, weight.scale, weight.bias))
    x = torch.randn(10, 48)
    xq = quantize_rows(x)  # the CPU takes the reference
    got = fp8_linear(xq, weight, torch.float32)
    wq = quantize_rows_reference(dense)
    expected = (xq.values.float() * xq.scale) @ (wq.values.float() * wq.scale).t() + layer.bias.detach()
    torch.testing.assert_close(got, expected)
    exact = F.linear(x, dense, layer.bias.detach())
    assert 0 < relative_l2(got, exact) < 0.08  # fp8 rounding of both operands, nothing worse


def test_add_layer_norm_fp8_is_the_sum_and_the_quantised_norm() -> None:
    torch.manual_seed(3)
    norm = nn.LayerNorm(64)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x, y = torch.randn(2, 7, 64), torch.randn(2, 7, 64)
    total, q = add_layer_norm_fp8(x, y, norm)
    ref_total, ref_normed = reference_add_layer_norm(x, y, norm)
    expected = quantize_rows_reference(ref_normed)
    assert torch.equal(total, ref_total)
    assert torch.equal(q.values.float(), expected.values.float()) and torch.equal(q.scale, expected.scale)


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    dims = tiny_dims(n_audio_ctx=200)
    model = random_model(seed=4, dims=dims)
    fp8 = copy.deepcopy(model)
    enable_fp8_audio_gemms(fp8, torch.float32)
    return model, fp8


def test_fp8_encoder_follows_the_float_encoder(models: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    model, fp8 = models
    mel = random_mel(5, frames=400)[None]
    with torch.inference_mode():
        exact = model.encoder(mel)
        got = fp8.encoder(mel)
    assert got.shape == exact.shape and got.dtype == exact.dtype
    assert 0 < relative_l2(got, exact) < 0.1
    # the float layers are untouched: only the attached fp8 copies differ
    assert fp8.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fp8.state_dict().values(), model.state_dict().values(), strict=True))


def test_fp8_encoder_runs_every_block_in_fp8(models: tuple[torch.nn.Module, torch.nn.Module],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The float forward of a block never runs once fp8 weights are attached."""
    _, fp8 = models
    block_type = type(fp8.encoder.layers[0])

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("float encoder block ran")

    monkeypatch.setattr(block_type, "forward", forbidden)
    with torch.inference_mode():
        fp8.encoder(random_mel(6, frames=400)[None])


def test_fp8_cross_kv_follows_the_float_projection(models: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    model, fp8 = models
    config = tiny_config(dims=tiny_dims(n_audio_ctx=200))
    exact = TorchEngine(Path("."), config, torch.device("cpu"), torch.float32, 4, model=model)
    approx = TorchEngine(Path("."), config, torch.device("cpu"), torch.float32, 4, model=fp8)
    features = torch.randn(2, 200, 64)
    exact.features_into_rows(features, [1, 3])
    approx.features_into_rows(features, [1, 3])
    for a, b in ((approx.runner.cache.cross_k, exact.runner.cache.cross_k),
                 (approx.runner.cache.cross_v, exact.runner.cache.cross_v)):
        assert 0 < relative_l2(a[:, [1, 3], :, :200], b[:, [1, 3], :, :200]) < 0.08
        assert torch.count_nonzero(a[:, [0, 2]]) == 0  # other rows untouched


def test_fp8_encoder_on_the_cpu_is_refused_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = random_model(seed=7, dims=tiny_dims(n_audio_ctx=200))
    config = tiny_config(dims=tiny_dims(n_audio_ctx=200))
    with caplog.at_level(logging.WARNING):
        engine = TorchEngine(Path("."), config, torch.device("cpu"), torch.float32, 4,
                             model=model, fp8_encoder=True)
    assert engine.fp8_encoder is False
    assert all(block.fp8 is None for block in engine.model.encoder.layers)
    assert "compute capability 8.9" in caplog.text


# --- CUDA: the quantising kernels against the torch reference, cuBLAS's fp8 GEMM, the encoder


@cuda_only
@pytest.mark.parametrize(("rows", "k", "gelu"), [(3, 384, False), (1500, 1280, False), (300, 5120, True)])
def test_quantising_kernel_matches_the_reference(rows: int, k: int, gelu: bool) -> None:
    torch.manual_seed(8)
    x = torch.randn(rows, k, device="cuda", dtype=torch.float16) * 3
    x[0] = 0.0
    got, ref = quantize_rows(x, gelu), quantize_rows_reference(x, gelu)
    # GELU: the GPU's tanh instruction (relative error ~2^-11) against torch's tanh
    torch.testing.assert_close(got.scale, ref.scale, rtol=1e-3 if gelu else 1e-6, atol=0)
    diff = (got.values.float() - ref.values.float()).abs()
    # the same roundings except where a value sits next to a rounding boundary (one e4m3 step apart)
    assert (diff > 0).float().mean().item() < (2e-2 if gelu else 1e-3)
    assert bool((diff <= ref.values.float().abs() * E4M3_RELATIVE_STEP + 2.0**-9).all())


@cuda_only
@pytest.mark.parametrize(("rows", "d"), [(1, 384), (1500, 1280), (200, 768)])
def test_fused_add_layer_norm_fp8_matches_the_reference(rows: int, d: int) -> None:
    torch.manual_seed(9)
    norm = nn.LayerNorm(d, device="cuda", dtype=torch.float16)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(rows, 1, d, device="cuda", dtype=torch.float16) * 4
    y = torch.randn_like(x)
    total, got = add_layer_norm_fp8(x, y, norm)
    ref_total, ref_normed = reference_add_layer_norm(x, y, norm)
    assert torch.equal(total, ref_total)
    restored = got.values.float() * got.scale
    assert relative_l2(restored.view_as(ref_normed), ref_normed) < 0.04  # fp8 rounding only


@cuda_only
@pytest.mark.parametrize(("rows", "d"), [(5, 384), (6000, 1280)])
def test_layer_norm_fp8_is_the_quantised_layer_norm(rows: int, d: int) -> None:
    torch.manual_seed(11)
    norm = nn.LayerNorm(d, device="cuda", dtype=torch.float16)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(rows, d, device="cuda", dtype=torch.float16) * 4
    got, ref = layer_norm_fp8(x, norm), quantize_rows_reference(norm(x))
    torch.testing.assert_close(got.scale, ref.scale, rtol=1e-3, atol=0)  # LayerNorm's reduction order
    diff = (got.values.float() - ref.values.float()).abs()
    assert bool((diff <= ref.values.float().abs() * E4M3_RELATIVE_STEP + 2.0**-9).all())


@cuda_only
@pytest.mark.parametrize(("m", "n", "k"), [(1500, 1152, 384), (3000, 1280, 5120)])
def test_cublas_fp8_gemm_matches_the_dequantised_product(m: int, n: int, k: int) -> None:
    torch.manual_seed(10)
    layer = nn.Linear(k, n, device="cuda", dtype=torch.float16)
    weight = Fp8Linear.from_linear(layer, torch.float16)
    xq = quantize_rows(torch.randn(m, k, device="cuda", dtype=torch.float16))
    got = fp8_linear(xq, weight, torch.float16)
    expected = (xq.values.float() * xq.scale) @ (weight.weight_t.float() * weight.scale) + layer.bias.float()
    assert got.dtype == torch.float16
    assert relative_l2(got, expected) < 2e-3  # fp16 output rounding and fp8 accumulation order


@cuda_only
def test_fp8_encoder_on_the_gpu_follows_fp16() -> None:
    dims = tiny_dims()
    model = random_model(seed=11, dims=dims).to("cuda", torch.float16)
    fp8 = copy.deepcopy(model)
    enable_fp8_audio_gemms(fp8, torch.float16)
    mel = random_mel(12)[None].to("cuda", torch.float16)
    with torch.inference_mode():
        assert 0 < relative_l2(fp8.encoder(mel), model.encoder(mel)) < 0.1


@cuda_only
def test_int8_cache_from_fp8_projection_stays_close() -> None:
    """fp8 K/V projection feeding the int8 cache: both roundings together stay small."""
    torch.manual_seed(13)
    x = torch.randn(2, 1500, 64, device="cuda", dtype=torch.float16)
    layer = nn.Linear(64, 128, device="cuda", dtype=torch.float16)
    weight = Fp8Linear.from_linear(layer, torch.float16)
    kv = fp8_linear(quantize_rows(x), weight, torch.float16)
    values, scale = quantize_rows_int8(kv)
    assert relative_l2(values.float() * scale.float(), layer(x).view(-1, 128)) < 0.06
