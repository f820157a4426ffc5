"""The fp32-logits GEMM (app.engine.logits_gemm) runs only on the GPU; the CPU model keeps torch's
GEMMs. Its GPU numerics are checked by `bench/gpu.py --smoke` and the CUDA test below."""

from __future__ import annotations

import pytest
import torch

from app.engine.logits_gemm import can_logits_fp32, logits_fp32

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cpu_tensors_take_the_torch_path() -> None:
    assert not can_logits_fp32(torch.randn(3, 8).half(), torch.randn(100, 8).half())
    assert not can_logits_fp32(torch.randn(3, 8), torch.randn(100, 8))


@cuda_only
def test_logits_match_an_fp32_matmul() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 1, 384, device="cuda", dtype=torch.float16)
    weight = torch.randn(51864, 384, device="cuda", dtype=torch.float16) * 384**-0.5
    logits = logits_fp32(x, weight)
    assert logits.dtype == torch.float32 and logits.shape == (64, 1, 51864)
    torch.testing.assert_close(logits, x.float() @ weight.float().t(), rtol=1e-5, atol=1e-4)
    assert torch.equal(logits.argmax(-1), (x.float() @ weight.float().t()).argmax(-1))


@cuda_only
def test_int8_embedding_logits_match_the_dequantized_matmul() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 1, 384, device="cuda", dtype=torch.float16)
    weight = torch.randint(-127, 128, (51864, 384), device="cuda", dtype=torch.int8)
    scale = torch.rand(51864, device="cuda", dtype=torch.float16) / 2000
    expected = x.float() @ (weight.float() * scale.float()[:, None]).t()
    torch.testing.assert_close(logits_fp32(x, weight, scale), expected, rtol=1e-5, atol=1e-4)
