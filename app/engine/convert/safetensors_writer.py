"""Stream tensors into a .safetensors file, one tensor at a time, with a progress bar.

safetensors' own save_file serializes the whole file in memory first; the format is simple
(u64 header length, JSON header, raw little-endian data), so we write it directly.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from app.engine.convert.progress import byte_progress

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int8: "I8",
    torch.int32: "I32",
}
#: The header is padded so tensor data starts 8-byte aligned (as safetensors itself does).
HEADER_ALIGNMENT = 8


def write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    # Widest items first, so every tensor starts at a multiple of its item size when mapped.
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in order:
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % HEADER_ALIGNMENT)
    with open(path, "wb") as out, byte_progress(offset, f"writing {path.name}") as bar:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name in order:
            # Raw bytes of the contiguous tensor (little-endian, as on every torch host here).
            data = tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy()
            out.write(data)
            bar.update(data.nbytes)
