"""Which fused SDPA kernel runs, by how often a shape repeats.

On Hopper torch picks cuDNN's attention first. cuDNN builds an execution plan for every new
shape: about 30 ms each on an H200 (measured 2026-11-22), against ~0.1 ms for the
flash and memory-efficient kernels, which need no plan. Encoder batches
repeat a few shapes, so cuDNN's faster kernel (1.94 vs 2.65 ms a large-v3 layer at 64 windows)
pays its plans back there. Prompt prefills, beam groups and ragged runs have a new shape almost
every call (the prompt grows with the previous window's text), and a plan per call stalled the
engine thread for seconds on the dev set.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

#: every backend but cuDNN, in torch's order; MATH keeps CPUs and odd shapes working
WITHOUT_PLANS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, *,
              repeated_shape: bool = False) -> Tensor:
    """F.scaled_dot_product_attention on the GPU; cuDNN only where `repeated_shape` says the shape
    comes from a small fixed set (encoder batches), so its per-shape plans are built once."""
    if repeated_shape:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    with sdpa_kernel(WITHOUT_PLANS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
