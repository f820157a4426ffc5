"""The GPU-only GEMM paths (app.engine.gpu_gemm) stay off the CPU model, and their references match
what they replace. Their GPU numerics are checked by `bench/gpu.py --smoke` (and the CUDA test below)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from app.engine.gpu_gemm import (
    can_fuse_gelu,
    can_logits_fp32,
    linear_gelu,
    logits_fp32,
    reference_linear_gelu,
)
from app.engine.torch_model import FeedForward

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cpu_tensors_take_the_torch_paths() -> None:
    linear = nn.Linear(8, 32)
    x = torch.randn(3, 8)
    assert not can_fuse_gelu(x, linear)
    assert not can_fuse_gelu(x.half(), linear.half())  # half precision, but not on a GPU
    assert not can_logits_fp32(x.half(), torch.randn(100, 8).half())


def test_cpu_feed_forward_keeps_the_exact_gelu() -> None:
    torch.manual_seed(0)
    block = FeedForward(16, 64, int8=False)
    x = torch.randn(2, 5, 16)
    expected = block.mlp2(F.gelu(block.mlp1(x)))  # erf form
    torch.testing.assert_close(block.mlp(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(reference_linear_gelu(x, block.mlp1), F.gelu(block.mlp1(x)), rtol=0, atol=0)


@cuda_only
def test_gpu_gemms_match_their_references() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 1, 384, device="cuda", dtype=torch.float16)
    weight = torch.randn(51864, 384, device="cuda", dtype=torch.float16) * 384**-0.5
    logits = logits_fp32(x, weight)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, x.float() @ weight.float().t(), rtol=1e-5, atol=1e-4)
    linear = nn.Linear(384, 1536, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(linear_gelu(x, linear).float(), reference_linear_gelu(x, linear).float(),
                               rtol=2e-3, atol=2e-3)
