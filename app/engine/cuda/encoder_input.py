"""The encoder's input stage on the GPU: two convolutions, then the first block's LayerNorm.

torch runs it as conv1, bias add, GELU, conv2, bias add, GELU, transpose, positional add (whose
output keeps the transposed layout), a copy to make it contiguous, LayerNorm and, for fp8 GEMMs,
quantisation: ten passes over tensors of up to 64 windows x 1,280 channels x 3,000 frames, about
5.7 ms of kernel time in a large-v3 batch of 64 windows on an H200 (0.7 ms here; 1-4 ms a batch
end to end, python bench/gpu_ab.py encoder-input). Here cuDNN runs the two convolutions without bias, one kernel
adds conv1's bias and applies GELU in place, and one kernel takes conv2's output through bias,
GELU, the transpose and the positional add into the contiguous residual stream; the LayerNorm
(fp8 rows where asked) is app.engine.cuda.norms' kernel. torch's form is
app.engine.model.Ops.encoder_input.

Every value is rounded to the activation dtype where torch's ops round it, so only the order of
the arithmetic inside each op differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.engine.cuda.common import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from app.engine.cuda.common import gelu_erf

    @triton.jit
    def _bias_gelu_(x_ptr, bias_ptr, channels, frames, BLOCK: tl.constexpr):
        # x [B, C, frames] in place: gelu(x + bias[c]), one (window, channel) row per program axis 0
        row = tl.program_id(0).to(tl.int64)
        t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = t < frames
        ptrs = x_ptr + row * frames + t
        x = tl.load(ptrs, mask=valid, other=0.0)
        biased = (x.to(tl.float32) + tl.load(bias_ptr + row % channels).to(tl.float32)).to(x.dtype)
        tl.store(ptrs, gelu_erf(biased.to(tl.float32)).to(x.dtype), mask=valid)

    @triton.jit
    def _frames_to_positions(c_ptr, bias_ptr, pos_ptr, x_ptr, channels, frames,
                             BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
        # c [B, C, T] -> x [B, T, C] = gelu(c + bias[:, None]).T + pos[:T]: a [BLOCK_C, BLOCK_T] tile
        # read along frames and written along channels
        b = tl.program_id(0).to(tl.int64)
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        inside = (c[:, None] < channels) & (t[None, :] < frames)
        tile = tl.load(c_ptr + b * channels * frames + c[:, None] * frames + t[None, :], mask=inside, other=0.0)
        bias = tl.load(bias_ptr + c, mask=c < channels, other=0.0).to(tl.float32)
        biased = (tile.to(tl.float32) + bias[:, None]).to(tile.dtype)
        activated = tl.trans(gelu_erf(biased.to(tl.float32)).to(tile.dtype))  # [BLOCK_T, BLOCK_C]
        outside = tl.trans(inside)
        pos = tl.load(pos_ptr + t[:, None] * channels + c[None, :], mask=outside, other=0.0)
        out = (activated.to(tl.float32) + pos.to(tl.float32)).to(tile.dtype)
        tl.store(x_ptr + b * frames * channels + t[:, None] * channels + c[None, :], out, mask=outside)


def fused_encoder_input(mel: Tensor, conv1: nn.Conv1d, conv2: nn.Conv1d, positional_embedding: Tensor) -> Tensor:
    """[B, n_mels, frames] log-mel (fp16/bf16 on the GPU) -> the residual stream [B, frames / 2, d]
    entering the first block, contiguous: gelu(conv2(gelu(conv1(mel)))) transposed, plus the
    positional embedding."""
    h = F.conv1d(mel, conv1.weight, None, conv1.stride, conv1.padding)
    b, channels, frames = h.shape
    _bias_gelu_[(b * channels, triton.cdiv(frames, 1024))](x_ptr=h, bias_ptr=conv1.bias, channels=channels,
                                                          frames=frames, BLOCK=1024, num_warps=4)
    c = F.conv1d(h, conv2.weight, None, conv2.stride, conv2.padding)
    frames = c.shape[2]
    x = torch.empty(b, frames, channels, device=c.device, dtype=c.dtype)
    block_c, block_t = 64, 64
    _frames_to_positions[(b, triton.cdiv(frames, block_t), triton.cdiv(channels, block_c))](
        c_ptr=c, bias_ptr=conv2.bias, pos_ptr=positional_embedding, x_ptr=x, channels=channels, frames=frames,
        BLOCK_C=block_c, BLOCK_T=block_t, num_warps=4)
    return x
