"""Decoder LayerNorms folded into the next linear layer (app.engine.runners.norm_fold): the folded
model is the same function on every path, and on the GPU a decode step applies the norms inside
its GEMMs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fakes import cuda_only, random_engine, random_model, tiny_config, tiny_dims
from torch import nn

from app.engine.cache import DecoderCache
from app.engine.cuda.row_gemm import KvAppend, LinearWeights, RowNorm, TileConfig, row_linear
from app.engine.model import WhisperModel
from app.engine.options import CudaGraphOptions, CudaKernels, EngineOptions
from app.engine.runners import make_runner
from app.engine.runners.norm_fold import fold_decoder_norms
from app.engine.runners.reference import ReferenceRunner


def with_random_norms(model: WhisperModel, seed: int = 3) -> WhisperModel:
    """Non-trivial LayerNorm scales and shifts (random_model leaves them at 1 and 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.decoder.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
    return model


def with_cross_kv(runner: ReferenceRunner, rows: int, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> ReferenceRunner:
    dims = runner.dims
    features = torch.randn(rows, dims.n_audio_ctx, dims.n_audio_state,
                           generator=torch.Generator().manual_seed(7)).to(device, dtype)
    runner.write_cross_kv(features, list(range(rows)))
    return runner


def cpu_runner(model: WhisperModel, rows: int) -> ReferenceRunner:
    return with_cross_kv(ReferenceRunner(model, DecoderCache(model.dims, rows, torch.device("cpu"), torch.float32)),
                         rows)


def cuda_runner(model: WhisperModel, rows: int, fold_norms: bool, int8_cross_kv: bool = False) -> ReferenceRunner:
    """A CUDA runner in float16 without graphs, the decoder's norms folded or not."""
    options = EngineOptions(device="cuda", compute_dtype="float16", max_rows=rows, int8_cross_kv=int8_cross_kv,
                            graphs=CudaGraphOptions(enabled=False), kernels=CudaKernels(fold_norms=fold_norms))
    return with_cross_kv(make_runner(model, tiny_config(), options.resolve()), rows, "cuda", torch.float16)


def decode_three_steps(runner: ReferenceRunner, rows: int, device: str = "cpu") -> list[torch.Tensor]:
    """Logits of a 3-token prompt prefill, then of two single-token steps. The tokens are fixed, so
    two runners see the same inputs even where a near-tie would make their argmax differ."""
    prompt = torch.tensor([[1, 2, 3]] * rows, device=device)
    positions = torch.zeros(rows, dtype=torch.long, device=device)
    out = [runner.decode(prompt, positions, 0, 3)]
    for step in range(2):
        token = torch.arange(rows, device=device)[:, None] * 7 + 100 + step
        out.append(runner.decode(token, positions + 3 + step, 0, 4 + step))
    return out


def test_the_folded_model_computes_the_same_logits() -> None:
    model = with_random_norms(random_model(0))
    folded = copy.deepcopy(model)
    assert fold_decoder_norms(folded.decoder) is not None
    with torch.inference_mode():
        expected = decode_three_steps(cpu_runner(model, 3), 3)
        got = decode_three_steps(cpu_runner(folded, 3), 3)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-3 * e.abs().max().item())


def test_folding_leaves_identity_norms_and_the_weight_sums() -> None:
    model = with_random_norms(random_model(0))
    folded = fold_decoder_norms(model.decoder)
    assert folded is not None and len(folded) == len(model.decoder.layers)
    for layer, weights in zip(model.decoder.layers, folded, strict=True):
        for norm, linear, bundle in ((layer.attn_ln, layer.attn.qkv, weights.qkv),
                                     (layer.cross_ln, layer.cross.q, weights.cross_q),
                                     (layer.mlp_ln, layer.mlp1, weights.mlp1)):
            assert torch.equal(norm.weight, torch.ones_like(norm.weight))
            assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
            assert bundle.weight is linear.weight and bundle.bias is linear.bias
            assert bundle.norm is not None and bundle.norm.eps == norm.eps
            assert torch.equal(bundle.norm.weight_sum, linear.weight.float().sum(dim=1))
        assert all(w.norm is None for w in (weights.out, weights.cross_out, weights.mlp2))
    # the final norm feeds the tied output projection, which is also the token embedding
    assert not torch.equal(model.decoder.ln.weight, torch.ones_like(model.decoder.ln.weight))


def test_int8_decoders_are_left_unfolded() -> None:
    model = WhisperModel(tiny_dims(), int8=True)
    before = copy.deepcopy(model.state_dict())
    assert fold_decoder_norms(model.decoder) is None
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_cpu_engines_leave_the_norms_unfolded() -> None:
    model = with_random_norms(random_model(0))
    before = copy.deepcopy(model.state_dict())
    engine = random_engine(model, 2)
    assert type(engine.runner) is ReferenceRunner
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


@cuda_only
@pytest.mark.parametrize("rows", [1, 17, 64])
def test_norm_residual_and_append_kernels_match_torch(rows: int) -> None:
    torch.manual_seed(0)
    d, heads, n_ctx = 1280, 20, 448
    dev, half = "cuda", torch.float16
    x = (torch.randn(rows, 1, d, device=dev) * 4 + 1).to(half)
    norm = nn.LayerNorm(d).to(dev)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.3)
    weight = (torch.randn(3 * d, d, device=dev) * d**-0.5).to(half)
    bias = torch.randn(3 * d, device=dev).to(half)
    expected = F.linear(norm(x.float()), weight.float(), bias.float())
    folded = (weight.float() * norm.weight[None, :]).to(half)
    folded_bias = (bias.float() + weight.float() @ norm.bias).to(half)
    k_cache = torch.zeros(rows, heads, n_ctx, d // heads, device=dev, dtype=half)
    v_cache = torch.zeros_like(k_cache)
    positions = torch.randint(0, n_ctx, (rows,), device=dev)
    got = row_linear(x, LinearWeights(folded, folded_bias, norm=RowNorm(folded.float().sum(dim=1), norm.eps)),
                     append=KvAppend(k_cache, v_cache, positions))
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2)
    for r in range(rows):
        torch.testing.assert_close(k_cache[r, :, positions[r]].reshape(-1), got[r, 0, d:2 * d])
        torch.testing.assert_close(v_cache[r, :, positions[r]].reshape(-1), got[r, 0, 2 * d:])
    assert int((k_cache != 0).sum()) <= rows * d
    residual = torch.randn(rows, 1, d, device=dev).to(half)
    for n, k, split in ((d, d, 1), (d, 4 * d, 2)):
        a = torch.randn(rows, 1, k, device=dev).to(half)
        w = (torch.randn(n, k, device=dev) * k**-0.5).to(half)
        b = torch.randn(n, device=dev).to(half)
        stream = residual.clone()
        out = row_linear(a, LinearWeights(w, b), tiles=lambda n, k, m, split=split: TileConfig(32, 128, split),
                         residual=stream)
        assert out.data_ptr() == stream.data_ptr()
        torch.testing.assert_close(stream, residual + F.linear(a, w, b), rtol=2e-3, atol=2e-3)


@cuda_only
@pytest.mark.parametrize("rows", [1, 5])
def test_folded_gpu_steps_match_the_unfolded_ones(rows: int) -> None:
    model = with_random_norms(random_model(0)).to("cuda", torch.float16)
    folded = copy.deepcopy(model)
    with torch.inference_mode():
        unfolded_runner = cuda_runner(model, rows, fold_norms=False)
        assert getattr(unfolded_runner, "folded", None) is None
        expected = decode_three_steps(unfolded_runner, rows, "cuda")
        runner = cuda_runner(folded, rows, fold_norms=True)
        assert getattr(runner, "folded", None) is not None
        got = decode_three_steps(runner, rows, "cuda")
    assert_same_logits(expected, got)


@cuda_only
@pytest.mark.parametrize(("int8_cross_kv", "tolerance"), [(False, 0.1), (True, 0.2)])
def test_the_cuda_runner_follows_the_torch_reference(int8_cross_kv: bool, tolerance: float) -> None:
    """Kernels, folded steps and int8 K/V read in place against the reference runner's torch ops
    in float32 on the same GPU.

    A wiring mistake (a wrong norm, bias, row or position) moves logits by about their own size.
    Rounding moves them less, but this random model's decoder gains amplify it step by step: on
    an H100 (2026-12-07), by the third step the reference runner in float16 was 1.6 % of the
    largest logit off, the float16 CUDA runner 4.4 %, and 9.8 % with int8 cross-K/V.
    """
    rows = 3
    model = with_random_norms(random_model(0))
    reference = copy.deepcopy(model).to("cuda", torch.float32)
    cache = DecoderCache(model.dims, rows, torch.device("cuda"), torch.float32)
    with torch.inference_mode():
        expected = decode_three_steps(with_cross_kv(ReferenceRunner(reference, cache), rows, "cuda", torch.float32),
                                      rows, "cuda")
        runner = cuda_runner(model.to("cuda", torch.float16), rows, fold_norms=True, int8_cross_kv=int8_cross_kv)
        got = decode_three_steps(runner, rows, "cuda")
    assert_same_logits(expected, [g.float() for g in got], relative=tolerance)


def assert_same_logits(expected: list[torch.Tensor], got: list[torch.Tensor], relative: float = 2e-2) -> None:
    """Logits within `relative` of the largest expected logit, and the same next token unless the
    expected logits had a near-tie for it (within twice that: each side may be off by it)."""
    for e, g in zip(expected, got, strict=True):
        tolerance = relative * e.abs().max().item()
        torch.testing.assert_close(g, e, rtol=relative, atol=tolerance)
        e_last, g_last = e[:, -1], g[:, -1]
        chosen, expected_best = g_last.argmax(-1), e_last.argmax(-1)
        gap = e_last.gather(-1, expected_best[:, None]) - e_last.gather(-1, chosen[:, None])
        assert bool(((chosen == expected_best) | (gap.squeeze(-1) <= 2 * tolerance)).all())
