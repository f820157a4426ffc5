"""Per-device scratch buffers that kernels keep between calls: split partial results, arrival
counters, row statistics. Safe under CUDA graphs.

Kernels on one stream run one after another, which is how the engine thread issues all of its GPU
work, so one buffer per name and device serves every call.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Workspace:
    """Named per-device buffers of at least a given size.

    A grown buffer replaces the old one for later calls, and the old one is kept alive: CUDA graphs
    captured earlier still use it. A `zeroed` buffer (arrival counters) starts at zero, and the
    kernels that use it must leave it at zero.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}
        self._retired: list[Tensor] = []

    def get(self, name: str, device: torch.device, numel: int, dtype: torch.dtype, zeroed: bool = False) -> Tensor:
        key = (name, device, dtype)  # a name asked for in another dtype gets its own buffer
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            if buffer is not None:
                self._retired.append(buffer)
            make = torch.zeros if zeroed else torch.empty
            buffer = self._buffers[key] = make(numel, device=device, dtype=dtype)
        return buffer


WORKSPACE = Workspace()
