"""The fp32-logits GEMM (app.engine.cuda.logits_gemm) runs only on the GPU; the CPU model keeps
torch's GEMMs. Its GPU numerics are checked by `bench/gpu.py --smoke` and the CUDA tests below."""

from __future__ import annotations

import torch
from fakes import cuda_only

from app.engine.cuda.logits_gemm import logits_fp32
from app.engine.options import EngineOptions


def test_cpu_engines_keep_torchs_gemms() -> None:
    for dtype in ("float32", "float16"):
        assert not EngineOptions(device="cpu", compute_dtype=dtype).resolve().kernels.logits_kernel


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
