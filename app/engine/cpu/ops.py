"""The CPU runner's operators: oneDNN-packed float32 GEMMs with each MLP's GELU inside its first
GEMM (app.engine.cpu.packed_gemm), and torch's int8-weight kernel for int8 engines in float32."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from app.engine.cpu.packed_gemm import (
    int8_matmul,
    onednn_available,
    pack_linears,
    pack_weight,
    packed_linear,
)
from app.engine.model import Int8Embedding, Int8Linear, Ops, WhisperModel


class CpuOps(Ops):
    """Ops with the model's GEMMs in their CPU forms, chosen when the model loads: `packed`
    float32 weights by layer (with the tied output projection's as `packed_logits`), and
    `int8_kernel` for int8 layers with float32 activations."""

    def __init__(self, packed: dict[nn.Module, Tensor], packed_logits: Tensor | None, int8_kernel: bool) -> None:
        self.packed = packed
        self.packed_logits = packed_logits
        self.int8_kernel = int8_kernel

    @classmethod
    def for_model(cls, model: WhisperModel, dtype: torch.dtype) -> CpuOps:
        """Packed GEMMs for a float32 model with a float embedding where oneDNN is available; torch's
        int8 kernel for an int8 model run in float32; torch's layers otherwise."""
        embedding = model.decoder.token_embedding
        if isinstance(embedding, nn.Embedding) and dtype == torch.float32 and onednn_available():
            return cls(pack_linears(model), pack_weight(embedding.weight), int8_kernel=False)
        return cls({}, None, int8_kernel=dtype == torch.float32)

    def linear(self, layer: nn.Module, x: Tensor, gelu: bool = False) -> Tensor:
        packed = self.packed.get(layer)
        if packed is not None:
            return packed_linear(x, packed, layer.bias, gelu)
        if self.int8_kernel and isinstance(layer, Int8Linear):
            out = int8_matmul(x, layer.weight, layer.weight_scale)
            y = out + layer.bias if layer.bias is not None else out
            return torch.nn.functional.gelu(y) if gelu else y
        return super().linear(layer, x, gelu)

    def logits(self, x: Tensor, embedding: nn.Module) -> Tensor:
        if self.packed_logits is not None:
            return packed_linear(x, self.packed_logits, None)
        if self.int8_kernel and isinstance(embedding, Int8Embedding):
            return int8_matmul(x, embedding.weight, embedding.weight_scale)
        return super().logits(x, embedding)
