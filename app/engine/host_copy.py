"""Small host lists onto the device without waiting for the GPU.

torch's blocking host-to-device copy (what `torch.tensor(values, device=cuda)` and
`.to(cuda)` do) synchronizes the stream after the copy, so the engine thread waited for every
queued kernel several times a decode step (row indices, rule masks, tokens) instead of
preparing the next work while the GPU ran. A copy from pageable host memory with
non_blocking=True is still safe: CUDA reads the source before the call returns.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(x: Tensor, device: torch.device | str) -> Tensor:
    """x on `device`; from the host without a stream synchronization."""
    return x.to(device, non_blocking=True)


def device_tensor(values: object, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
    """torch.tensor(values) on `device`, copied without a stream synchronization."""
    return to_device(torch.tensor(values, dtype=dtype), device)
