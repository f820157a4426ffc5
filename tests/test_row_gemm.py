"""The decode steps' few-rows GEMM (app.engine.cuda.row_gemm) runs only on the GPU; on the CPU the
model's linears are torch's layers. GPU numerics: `bench/gpu.py --smoke` and the CUDA tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fakes import cuda_only
from torch import nn

from app.engine.cuda.row_gemm import (
    LinearWeights,
    TileConfig,
    choose_tiles,
    fixed_tiles,
    row_linear,
)
from app.engine.model import TORCH_OPS, FeedForward, Int8Linear


@pytest.mark.parametrize("gelu", [False, True])
def test_torch_ops_linear_is_the_layer_itself(gelu: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(24, 40)
    x = torch.randn(5, 1, 24)
    expected = F.gelu(layer(x)) if gelu else layer(x)
    assert torch.equal(TORCH_OPS.linear(layer, x, gelu), expected)


def test_int8_layers_compute_with_their_dequantised_weights() -> None:
    torch.manual_seed(0)
    layer = Int8Linear(32, 48)
    layer.weight.copy_(torch.randint(-127, 128, (48, 32), dtype=torch.int8))
    layer.weight_scale.uniform_(0.001, 0.01)
    x = torch.randn(4, 1, 32)
    dense = layer.weight.float() * layer.weight_scale[:, None]
    assert torch.equal(TORCH_OPS.linear(layer, x), F.linear(x, dense, layer.bias))


def test_int8_weights_need_their_scale() -> None:
    with pytest.raises(ValueError, match="scale"):
        LinearWeights(torch.zeros(4, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="scale"):
        LinearWeights(torch.zeros(4, 8), scale=torch.ones(4))


def test_mlp_is_the_gelu_between_its_linears() -> None:
    torch.manual_seed(0)
    block = FeedForward(16, 64, int8=False)
    x = torch.randn(3, 1, 16)
    assert torch.equal(block.mlp(x), block.mlp2(F.gelu(block.mlp1(x))))


def test_only_the_mlp_output_gemm_splits_k() -> None:
    for rows in (1, 16, 64):
        for d in (384, 1280):
            assert choose_tiles(3 * d, d, rows).split == 1
            assert choose_tiles(d, d, rows).split == 1
            assert choose_tiles(4 * d, d, rows).split == 1
    assert choose_tiles(384, 4 * 384, 64).split == 4
    assert choose_tiles(1280, 4 * 1280, 16).split == 4
    assert choose_tiles(1280, 4 * 1280, 64).split == 2  # at 64 rows each program re-reads fewer inputs
    assert fixed_tiles(1280, 4 * 1280, 64) == TileConfig(32, 128, 4)


def test_every_split_has_whole_k_steps() -> None:
    for rows in (1, 16, 64):
        for d in (384, 512, 768, 1024, 1280):
            for n, k in ((3 * d, d), (d, d), (4 * d, d), (d, 4 * d)):
                tiles = choose_tiles(n, k, rows)
                assert k // tiles.split >= tiles.block_k


@cuda_only
@pytest.mark.parametrize(("rows", "n", "k", "split", "gelu"),
                         [(1, 1152, 384, 1, False), (64, 3072, 768, 1, True), (17, 768, 3072, 4, False),
                          (64, 1280, 5120, 4, True)])
def test_row_linear_matches_torch(rows: int, n: int, k: int, split: int, gelu: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(rows, 1, k, device="cuda", dtype=torch.float16)
    weight = torch.randn(n, k, device="cuda", dtype=torch.float16) * k**-0.5
    bias = torch.randn(n, device="cuda", dtype=torch.float16)
    expected = F.linear(x.float(), weight.float(), bias.float())
    expected = F.gelu(expected) if gelu else expected
    for _ in range(2):  # the second call finds the arrival counters reset by the first
        got = row_linear(x, LinearWeights(weight, bias), gelu=gelu, tiles=lambda n, k, m: TileConfig(32, 128, split))
        assert got.shape == (rows, 1, n) and got.dtype == torch.float16
        torch.testing.assert_close(got.float(), expected, rtol=2e-3, atol=2e-3)


@cuda_only
def test_int8_row_linear_matches_the_dequantized_weights() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 1, 1280, device="cuda", dtype=torch.float16)
    weight = torch.randint(-127, 128, (1280, 5120 // 4), device="cuda", dtype=torch.int8)
    scale = torch.rand(1280, device="cuda", dtype=torch.float16) / 2000
    bias = torch.randn(1280, device="cuda", dtype=torch.float16)
    expected = F.linear(x.float(), weight.float() * scale.float()[:, None], bias.float())
    got = row_linear(x, LinearWeights(weight, bias, scale))
    torch.testing.assert_close(got.float(), expected, rtol=2e-3, atol=2e-3)


@cuda_only
@pytest.mark.parametrize("rows", [16, 64])
@pytest.mark.parametrize("int8", [False, True])
def test_chosen_tiles_for_large_v3_match_torch(rows: int, int8: bool) -> None:
    torch.manual_seed(0)
    d = 1280
    for n, k, gelu in ((3 * d, d, False), (d, d, False), (4 * d, d, True), (d, 4 * d, False)):
        x = torch.randn(rows, 1, k, device="cuda", dtype=torch.float16)
        bias = torch.randn(n, device="cuda", dtype=torch.float16)
        if int8:
            weight = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
            scale = torch.rand(n, device="cuda", dtype=torch.float16) / (20 * k**0.5)
            dense = weight.float() * scale.float()[:, None]
        else:
            weight = torch.randn(n, k, device="cuda", dtype=torch.float16) * k**-0.5
            scale = None
            dense = weight.float()
        expected = F.linear(x.float(), dense, bias.float())
        expected = F.gelu(expected) if gelu else expected
        for _ in range(2):  # split-K counters reset
            got = row_linear(x, LinearWeights(weight, bias, scale), gelu=gelu)
            torch.testing.assert_close(got.float(), expected, rtol=2e-3, atol=2e-3)
