"""fp8 GEMMs of the encoder and the cross-attention K/V (app.engine.cuda.fp8,
app.engine.runners.fp8_audio).

On the CPU the fp8 path runs with Fp8Reference below (the kernels' quantisation in torch,
dequantised GEMMs), which checks the model wiring; the kernels and cuBLAS's fp8 GEMM run only on
CUDA (tests at the end).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from fakes import fp8_cuda_only, random_engine, random_mel, random_model, tiny_dims
from torch import nn

from app.engine.cache import quantize_kv_int8
from app.engine.cuda.fp8 import (
    FP8,
    FP8_MAX,
    Fp8Linear,
    Fp8Rows,
    fp8_linear,
    quantize_fp8,
    quantize_fp8_reference,
)
from app.engine.cuda.norms import add_layer_norm_fp8, layer_norm_fp8
from app.engine.cuda.row_gemm import choose_tiles
from app.engine.model import TORCH_OPS, Int8Linear, WhisperModel
from app.engine.options import EngineOptions
from app.engine.runners.cuda import CudaOps
from app.engine.runners.fp8_audio import Fp8AudioGemms, Fp8Kernels
from bench.reference_ops import reference_add_layer_norm


def fp8_linear_reference(x: Fp8Rows, weight: Fp8Linear, out_dtype: torch.dtype) -> torch.Tensor:
    """fp8_linear's arithmetic on dequantised operands, on any device."""
    out = (x.values.float() * x.scale) @ (weight.weight_t.float() * weight.scale)
    if weight.bias is not None:
        out = out + weight.bias.float()
    return out.to(out_dtype)


class Fp8Reference:
    """The fp8 path's functions (app.engine.runners.fp8_audio.Fp8Functions) in torch, any device."""

    def quantize(self, x: torch.Tensor, gelu: bool = False) -> Fp8Rows:
        return quantize_fp8_reference(x, gelu)

    def linear(self, x: Fp8Rows, weight: Fp8Linear, out_dtype: torch.dtype) -> torch.Tensor:
        return fp8_linear_reference(x, weight, out_dtype)

    def layer_norm(self, x: torch.Tensor, norm: nn.LayerNorm) -> Fp8Rows:
        return quantize_fp8_reference(norm(x))

    def add_layer_norm(self, x: torch.Tensor, y: torch.Tensor, norm: nn.LayerNorm) -> tuple[torch.Tensor, Fp8Rows]:
        total = x + y
        return total, quantize_fp8_reference(norm(total))


# e4m3 keeps 3 mantissa bits: a value rounds by at most half a step, 2**-4 of it
E4M3_RELATIVE_STEP = 2.0**-3


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_rows_quantise_onto_the_full_e4m3_range_with_bounded_rounding() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 40) * torch.logspace(-3, 3, 6)[:, None]  # rows of very different magnitude
    x[2] = 0.0
    q = quantize_fp8_reference(x)
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
    got = quantize_fp8_reference(x, gelu=True)
    expected = quantize_fp8_reference(F.gelu(x, approximate="tanh"))
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
    xq = quantize_fp8_reference(x)
    got = fp8_linear_reference(xq, weight, torch.float32)
    wq = quantize_fp8_reference(dense)
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
    total, q = Fp8Reference().add_layer_norm(x, y, norm)
    ref_total, ref_normed = reference_add_layer_norm(x, y, norm)
    expected = quantize_fp8_reference(ref_normed)
    assert torch.equal(total, ref_total)
    assert torch.equal(q.values.float(), expected.values.float()) and torch.equal(q.scale, expected.scale)


@pytest.fixture(scope="module")
def model() -> WhisperModel:
    return random_model(seed=4, dims=tiny_dims(n_audio_ctx=200))


def test_fp8_encoder_follows_the_float_encoder(model: WhisperModel) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp8 = Fp8AudioGemms(model, torch.float32, Fp8Reference())
    mel = random_mel(5, frames=400)[None]
    with torch.inference_mode():
        exact = model.encoder(mel)
        got = fp8.encode(model.encoder, mel, TORCH_OPS)
    assert got.shape == exact.shape and got.dtype == exact.dtype
    assert 0 < relative_l2(got, exact) < 0.1
    # the model is untouched: the fp8 copies live beside it
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fp8_encoder_runs_every_block_in_fp8(model: WhisperModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The float forward of a block never runs on the fp8 path."""
    fp8 = Fp8AudioGemms(model, torch.float32, Fp8Reference())
    block_type = type(model.encoder.layers[0])

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("float encoder block ran")

    monkeypatch.setattr(block_type, "forward", forbidden)
    with torch.inference_mode():
        fp8.encode(model.encoder, random_mel(6, frames=400)[None], TORCH_OPS)


def test_fp8_cross_kv_follows_the_float_projection(model: WhisperModel) -> None:
    fp8 = Fp8AudioGemms(model, torch.float32, Fp8Reference())
    features = torch.randn(2, 200, 64)
    projections = list(fp8.cross_kv_projections(features))
    assert len(projections) == len(model.decoder.layers)
    for layer, approx in zip(model.decoder.layers, projections, strict=True):
        exact = layer.cross.kv(features)
        assert approx.shape == exact.shape
        assert 0 < relative_l2(approx, exact) < 0.08


def test_fp8_encoder_on_the_cpu_is_refused_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        options = EngineOptions(device="cpu", fp8_encoder=True).resolve()
    assert options.fp8_encoder is False
    assert "compute capability 8.9" in caplog.text
    engine = random_engine(random_model(seed=7), 4)
    assert not hasattr(engine.runner, "fp8")


# --- CUDA: the quantising kernels against the torch reference, cuBLAS's fp8 GEMM, the encoder


@fp8_cuda_only
@pytest.mark.parametrize(("rows", "k", "gelu"), [(3, 384, False), (1500, 1280, False), (300, 5120, True)])
def test_quantising_kernel_matches_the_reference(rows: int, k: int, gelu: bool) -> None:
    torch.manual_seed(8)
    x = torch.randn(rows, k, device="cuda", dtype=torch.float16) * 3
    x[0] = 0.0
    got, ref = quantize_fp8(x, gelu), quantize_fp8_reference(x, gelu)
    # GELU: the GPU's tanh instruction (relative error ~2^-11) against torch's tanh
    torch.testing.assert_close(got.scale, ref.scale, rtol=1e-3 if gelu else 1e-6, atol=0)
    diff = (got.values.float() - ref.values.float()).abs()
    # the same roundings except where a value sits next to a rounding boundary (one e4m3 step apart)
    assert (diff > 0).float().mean().item() < (2e-2 if gelu else 1e-3)
    assert bool((diff <= ref.values.float().abs() * E4M3_RELATIVE_STEP + 2.0**-9).all())


@fp8_cuda_only
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


@fp8_cuda_only
@pytest.mark.parametrize(("rows", "d"), [(5, 384), (6000, 1280)])
def test_layer_norm_fp8_is_the_quantised_layer_norm(rows: int, d: int) -> None:
    torch.manual_seed(11)
    norm = nn.LayerNorm(d, device="cuda", dtype=torch.float16)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(rows, d, device="cuda", dtype=torch.float16) * 4
    got, ref = layer_norm_fp8(x, norm), quantize_fp8_reference(norm(x))
    torch.testing.assert_close(got.scale, ref.scale, rtol=1e-3, atol=0)  # LayerNorm's reduction order
    diff = (got.values.float() - ref.values.float()).abs()
    assert bool((diff <= ref.values.float().abs() * E4M3_RELATIVE_STEP + 2.0**-9).all())


@fp8_cuda_only
@pytest.mark.parametrize(("m", "n", "k"), [(1500, 1152, 384), (3000, 1280, 5120)])
def test_cublas_fp8_gemm_matches_the_dequantised_product(m: int, n: int, k: int) -> None:
    torch.manual_seed(10)
    layer = nn.Linear(k, n, device="cuda", dtype=torch.float16)
    weight = Fp8Linear.from_linear(layer, torch.float16)
    xq = quantize_fp8(torch.randn(m, k, device="cuda", dtype=torch.float16))
    got = fp8_linear(xq, weight, torch.float16)
    expected = (xq.values.float() * xq.scale) @ (weight.weight_t.float() * weight.scale) + layer.bias.float()
    assert got.dtype == torch.float16
    assert relative_l2(got, expected) < 2e-3  # fp16 output rounding and fp8 accumulation order


@fp8_cuda_only
def test_fp8_encoder_on_the_gpu_follows_fp16() -> None:
    dims = tiny_dims()
    model = random_model(seed=11, dims=dims).to("cuda", torch.float16)
    fp8 = Fp8AudioGemms(model, torch.float16, Fp8Kernels(pdl=False, fused_input_norm=True))
    ops = CudaOps(row_weights=None, fused_norms=True, fused_input=True, tiles=choose_tiles, pdl=False)
    mel = random_mel(12)[None].to("cuda", torch.float16)
    with torch.inference_mode():
        assert 0 < relative_l2(fp8.encode(model.encoder, mel, ops), model.encoder(mel)) < 0.1


@fp8_cuda_only
def test_int8_cache_from_fp8_projection_stays_close() -> None:
    """fp8 K/V projection feeding the int8 cache: both roundings together stay small."""
    torch.manual_seed(13)
    x = torch.randn(2, 1500, 64, device="cuda", dtype=torch.float16)
    layer = nn.Linear(64, 128, device="cuda", dtype=torch.float16)
    weight = Fp8Linear.from_linear(layer, torch.float16)
    kv = fp8_linear(quantize_fp8(x), weight, torch.float16)
    values, scale = quantize_kv_int8(kv)
    assert relative_l2(values.float() * scale.float(), layer(x).view(-1, 128)) < 0.06
