"""The engine's tensor names and shapes (our torch module's state_dict), and dims derived from them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from app.engine.config import ModelDims
from app.errors import CheckpointError

_ENCODER_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")
_DECODER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _linear(prefix: str, rows: int, cols: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (rows, cols), f"{prefix}.bias": (rows,)}


def _norm(prefix: str, d: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (d,), f"{prefix}.bias": (d,)}


def expected_shapes(dims: ModelDims) -> dict[str, tuple[int, ...]]:
    """Every tensor an engine's model.safetensors holds (before quantization), with its shape."""
    d, f = dims.n_audio_state, dims.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.conv1.weight": (d, dims.n_mels, 3),
        "encoder.conv1.bias": (d,),
        "encoder.conv2.weight": (d, d, 3),
        "encoder.conv2.bias": (d,),
        "encoder.positional_embedding": (dims.n_audio_ctx, d),
        **_norm("encoder.ln_post", d),
    }
    for i in range(dims.n_audio_layer):
        p = f"encoder.layers.{i}"
        shapes |= _norm(f"{p}.attn_ln", d) | _linear(f"{p}.attn.qkv", 3 * d, d)
        shapes |= _linear(f"{p}.attn.out", d, d) | _norm(f"{p}.mlp_ln", d)
        shapes |= _linear(f"{p}.mlp1", f, d) | _linear(f"{p}.mlp2", d, f)
    t = dims.n_text_state
    shapes |= {
        "decoder.token_embedding.weight": (dims.n_vocab, t),
        "decoder.positional_embedding": (dims.n_text_ctx, t),
        **_norm("decoder.ln", t),
    }
    for i in range(dims.n_text_layer):
        p = f"decoder.layers.{i}"
        shapes |= _norm(f"{p}.attn_ln", t) | _linear(f"{p}.attn.qkv", 3 * t, t)
        shapes |= _linear(f"{p}.attn.out", t, t) | _norm(f"{p}.cross_ln", t)
        shapes |= _linear(f"{p}.cross.q", t, t) | _linear(f"{p}.cross.kv", 2 * t, d)
        shapes |= _linear(f"{p}.cross.out", t, t) | _norm(f"{p}.mlp_ln", t)
        shapes |= _linear(f"{p}.mlp1", f, t) | _linear(f"{p}.mlp2", t, f)
    return shapes


def count_layers(names: Iterable[str], pattern: re.Pattern[str]) -> int:
    """1 + the highest layer index among names matching pattern (group 1 is the index)."""
    indices = [int(m.group(1)) for name in names if (m := pattern.match(name))]
    return max(indices) + 1 if indices else 0


def _shape(tensors: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    if name not in tensors:
        raise CheckpointError(f"the checkpoint has no tensor for '{name}'")
    return tuple(tensors[name].shape)


def derive_dims(
    tensors: Mapping[str, torch.Tensor], n_audio_head: int, n_text_head: int
) -> ModelDims:
    """ModelDims from the tensor shapes (only the head counts are not stored in shapes)."""
    conv1 = _shape(tensors, "encoder.conv1.weight")
    if len(conv1) != 3:
        raise CheckpointError(f"encoder.conv1.weight should be (d, n_mels, 3) but is {list(conv1)}")
    embedding = _shape(tensors, "decoder.token_embedding.weight")
    dims = ModelDims(
        n_mels=conv1[1],
        n_audio_ctx=_shape(tensors, "encoder.positional_embedding")[0],
        n_audio_state=conv1[0],
        n_audio_head=n_audio_head,
        n_audio_layer=count_layers(tensors, _ENCODER_LAYER),
        n_text_ctx=_shape(tensors, "decoder.positional_embedding")[0],
        n_text_state=embedding[1],
        n_text_head=n_text_head,
        n_text_layer=count_layers(tensors, _DECODER_LAYER),
        n_vocab=embedding[0],
        ffn_dim=_shape(tensors, "encoder.layers.0.mlp1.weight")[0],
    )
    for state, heads, side in (
        (dims.n_audio_state, n_audio_head, "encoder"),
        (dims.n_text_state, n_text_head, "decoder"),
    ):
        if heads <= 0 or state % heads:
            raise CheckpointError(
                f"the {side} width {state} is not divisible by its {heads} attention heads"
            )
    if dims.n_audio_state != dims.n_text_state:
        raise CheckpointError(
            f"encoder width {dims.n_audio_state} differs from decoder width {dims.n_text_state}; "
            "Whisper uses one width for both"
        )
    return dims


def check_tensors(tensors: Mapping[str, torch.Tensor], dims: ModelDims) -> None:
    """Raise CheckpointError unless tensors hold exactly the expected names and shapes."""
    expected = expected_shapes(dims)
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected]
    wrong = [
        f"'{name}' is {list(tensors[name].shape)}, expected {list(shape)}"
        for name, shape in expected.items()
        if name in tensors and tuple(tensors[name].shape) != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s): {_some(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape inconsistencies: {_some(wrong)}")
    if problems:
        raise CheckpointError("the checkpoint does not fit a Whisper model: " + "; ".join(problems))


def _some(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")
