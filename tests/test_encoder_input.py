"""The encoder's input stage (app.engine.cuda.encoder_input): the GPU kernels against torch's ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fakes import cuda_only
from torch import nn

from app.engine.cuda.encoder_input import fused_encoder_input
from app.engine.model import TORCH_OPS


def torch_input(mel: torch.Tensor, conv1: nn.Conv1d, conv2: nn.Conv1d, pos: torch.Tensor) -> torch.Tensor:
    x = F.gelu(conv2(F.gelu(conv1(mel)))).transpose(1, 2)
    return x + pos[: x.shape[1]]


def test_cpu_input_is_torchs_ops() -> None:
    torch.manual_seed(0)
    conv1, conv2 = nn.Conv1d(8, 32, 3, padding=1), nn.Conv1d(32, 32, 3, stride=2, padding=1)
    pos = torch.randn(50, 32)
    mel = torch.randn(2, 8, 100)
    assert torch.equal(TORCH_OPS.encoder_input(mel, conv1, conv2, pos), torch_input(mel, conv1, conv2, pos))


@cuda_only
@pytest.mark.parametrize(("batch", "n_mels", "d", "frames"), [(2, 80, 384, 3000), (3, 128, 1280, 3000), (1, 80, 96, 250)])
def test_fused_input_matches_torch(batch: int, n_mels: int, d: int, frames: int) -> None:
    torch.manual_seed(1)
    with torch.device("cuda"):
        conv1 = nn.Conv1d(n_mels, d, 3, padding=1).half()
        conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1).half()
        pos = torch.randn(1500, d).half() * 0.1
        mel = torch.randn(batch, n_mels, frames).half()
    got = fused_encoder_input(mel, conv1, conv2, pos)
    ref = torch_input(mel, conv1, conv2, pos)
    assert got.shape == ref.shape and got.is_contiguous()
    # cuDNN's convolution without its bias, then the bias in float32: one fp16 rounding apart at most
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)
