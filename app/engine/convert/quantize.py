"""Weight-only int8: symmetric, one scale per output row, for the transformer linears."""

from __future__ import annotations

import torch

#: The linears whose weights are quantized. Convs, position tables and layer norms stay in
#: the engine dtype: they are small or accuracy-sensitive.
QUANTIZED_LINEARS = ("attn.qkv", "attn.out", "cross.q", "cross.kv", "cross.out", "mlp1", "mlp2")
SCALE_SUFFIX = "_scale"  # "<prefix>.weight" -> "<prefix>.weight_scale"
INT8_MAX = 127


#: The token embedding is a third of a small model's weights; stored int8 per token row it
#: halves the weight memory (it is also the output projection, quantized per output row).
QUANTIZED_EMBEDDINGS = ("decoder.token_embedding.weight",)


def is_quantized_weight(name: str) -> bool:
    if name in QUANTIZED_EMBEDDINGS:
        return True
    if not name.startswith(("encoder.layers.", "decoder.layers.")) or not name.endswith(".weight"):
        return False
    return name.removesuffix(".weight").split(".", 3)[-1] in QUANTIZED_LINEARS


def quantize_weight_int8(
    weight: torch.Tensor, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [out, in], scale [out] in scale_dtype) with weight ~ int8 * scale[:, None]."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / INT8_MAX).to(scale_dtype)
    # Quantize against the scale as stored, so dequantization uses exactly this value; an
    # all-zero (or underflowing) row gets scale 1 and quantizes to zeros.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = torch.round(w / scale.float()[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return quantized, scale


def dequantize_weight_int8(quantized: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return quantized.float() * scale.float()[:, None]


def to_stored(
    tensors: dict[str, torch.Tensor], dtype: torch.dtype, quantize: str | None
) -> dict[str, torch.Tensor]:
    """The tensors as the engine stores them; consumes `tensors` to keep peak memory low."""
    stored: dict[str, torch.Tensor] = {}
    for name in list(tensors):
        tensor = tensors.pop(name)
        if quantize == "int8" and is_quantized_weight(name):
            stored[name], stored[name + SCALE_SUFFIX] = quantize_weight_int8(tensor, dtype)
        else:
            stored[name] = tensor.to(dtype).contiguous()
    return stored
