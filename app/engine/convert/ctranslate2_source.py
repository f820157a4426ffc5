"""CTranslate2 Whisper models (a directory with model.bin, config.json, tokenizer.json)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from app.engine.convert.checkpoint import Recipe, SourceCheckpoint, assemble, unused_note
from app.engine.convert.ctranslate2_reader import Ct2Index, read_index, read_scalar, read_tensors
from app.engine.convert.layout import count_layers
from app.errors import CheckpointError

MODEL_FILE = "model.bin"
SPEC_NAME = "WhisperSpec"
#: CTranslate2 4.x writes revision 3 and refuses newer ones; so do we.
MAX_SPEC_REVISION = 3
#: CTranslate2's Activation enum value for GELU (erf form), the only one Whisper uses.
GELU = 3
#: Whisper's head width; used only when a file lacks its num_heads scalars.
HEAD_DIM = 64

_ENCODER_LAYER = re.compile(r"^encoder/layer_(\d+)/")
_DECODER_LAYER = re.compile(r"^decoder/layer_(\d+)/")

#: scalar name -> (required value, what a different value would mean)
_EXPECTED_SCALARS: dict[str, tuple[int, str]] = {
    "decoder/activation": (GELU, "an activation other than GELU"),
    "decoder/pre_norm": (1, "post-norm layers"),
    "decoder/scale_embeddings": (0, "scaled token embeddings"),
    "decoder/alibi": (0, "ALiBi position biases"),
}


def _norm(target: str, source: str) -> dict[str, Recipe]:
    return {f"{target}.weight": (f"{source}/gamma",), f"{target}.bias": (f"{source}/beta",)}


def _linear(target: str, source: str) -> dict[str, Recipe]:
    return {f"{target}.weight": (f"{source}/weight",), f"{target}.bias": (f"{source}/bias",)}


def ct2_recipes(n_encoder_layers: int, n_decoder_layers: int) -> dict[str, Recipe]:
    """Our names -> CTranslate2 names (docs/weights.md; qkv is fused in both)."""
    recipes: dict[str, Recipe] = {
        **_linear("encoder.conv1", "encoder/conv1"),
        **_linear("encoder.conv2", "encoder/conv2"),
        "encoder.positional_embedding": ("encoder/position_encodings/encodings",),
        **_norm("encoder.ln_post", "encoder/layer_norm"),
        "decoder.token_embedding.weight": ("decoder/embeddings/weight",),
        "decoder.positional_embedding": ("decoder/position_encodings/encodings",),
        **_norm("decoder.ln", "decoder/layer_norm"),
    }
    for i in range(n_encoder_layers):
        ours, theirs = f"encoder.layers.{i}", f"encoder/layer_{i}"
        recipes |= _norm(f"{ours}.attn_ln", f"{theirs}/self_attention/layer_norm")
        recipes |= _linear(f"{ours}.attn.qkv", f"{theirs}/self_attention/linear_0")
        recipes |= _linear(f"{ours}.attn.out", f"{theirs}/self_attention/linear_1")
        recipes |= _norm(f"{ours}.mlp_ln", f"{theirs}/ffn/layer_norm")
        recipes |= _linear(f"{ours}.mlp1", f"{theirs}/ffn/linear_0")
        recipes |= _linear(f"{ours}.mlp2", f"{theirs}/ffn/linear_1")
    for i in range(n_decoder_layers):
        ours, theirs = f"decoder.layers.{i}", f"decoder/layer_{i}"
        recipes |= _norm(f"{ours}.attn_ln", f"{theirs}/self_attention/layer_norm")
        recipes |= _linear(f"{ours}.attn.qkv", f"{theirs}/self_attention/linear_0")
        recipes |= _linear(f"{ours}.attn.out", f"{theirs}/self_attention/linear_1")
        recipes |= _norm(f"{ours}.cross_ln", f"{theirs}/attention/layer_norm")
        recipes |= _linear(f"{ours}.cross.q", f"{theirs}/attention/linear_0")
        recipes |= _linear(f"{ours}.cross.kv", f"{theirs}/attention/linear_1")
        recipes |= _linear(f"{ours}.cross.out", f"{theirs}/attention/linear_2")
        recipes |= _norm(f"{ours}.mlp_ln", f"{theirs}/ffn/layer_norm")
        recipes |= _linear(f"{ours}.mlp1", f"{theirs}/ffn/linear_0")
        recipes |= _linear(f"{ours}.mlp2", f"{theirs}/ffn/linear_1")
    return recipes


def is_ctranslate2_dir(path: Path) -> bool:
    return path.is_dir() and (path / MODEL_FILE).is_file()


def load_ctranslate2(
    model_bin: Path, *, side_dir: Path | None, info: dict[str, object], label: str | None = None
) -> SourceCheckpoint:
    """Read a model.bin; config.json / tokenizer.json are taken from side_dir when present."""
    index = read_index(model_bin, label)
    _check_spec(index)
    n_encoder = count_layers(index.names(), _ENCODER_LAYER)
    n_decoder = count_layers(index.names(), _DECODER_LAYER)
    if not n_encoder or not n_decoder:
        raise CheckpointError(
            f"{index.label} has {n_encoder} encoder and {n_decoder} decoder layers "
            "(no 'encoder/layer_0/...' or 'decoder/layer_0/...' variables): not a Whisper model"
        )
    recipes = ct2_recipes(n_encoder, n_decoder)
    tensors = assemble(
        recipes, index.names(), lambda names: _load_dequantized(index, names), index.label
    )
    _check_tied_projection(index, tensors["decoder.token_embedding.weight"])
    notes: list[str] = []
    n_audio_head = _heads(index, "encoder", tensors["encoder.conv1.weight"].shape[0], notes)
    n_text_head = _heads(
        index, "decoder", tensors["decoder.token_embedding.weight"].shape[1], notes
    )
    known = set(_EXPECTED_SCALARS) | {
        "encoder/num_heads",
        "decoder/num_heads",
        "decoder/projection/weight",
        # generic transformer fields with no meaning for Whisper (see docs/weights.md)
        "decoder/start_from_zero_embedding",
        "decoder/alignment_layer",
        "decoder/alignment_heads",
        "decoder/alibi_use_positive_positions",
        "decoder/scale_alibi",
    }
    scales = {name for name in index.names() if name.endswith("_scale")}
    notes += unused_note(index.names() - known - scales, recipes, index.label)
    side = _read_side_config(side_dir)
    return SourceCheckpoint(
        kind="ctranslate2",
        tensors=tensors,
        n_audio_head=n_audio_head,
        n_text_head=n_text_head,
        info={**info, "binary_version": index.binary_version, "spec_revision": index.spec_revision},
        tokenizer=_side_file(side_dir, "tokenizer.json"),
        suppress_tokens=side.get("suppress_ids"),
        suppress_tokens_begin=side.get("suppress_ids_begin"),
        alignment_heads=[(int(a), int(b)) for a, b in side["alignment_heads"]]
        if side.get("alignment_heads")
        else None,
        notes=notes,
    )


def _check_spec(index: Ct2Index) -> None:
    if index.binary_version >= 2 and index.spec_name != SPEC_NAME:
        raise CheckpointError(
            f"{index.label} holds a CTranslate2 '{index.spec_name}', not a {SPEC_NAME}"
        )
    if index.spec_revision > MAX_SPEC_REVISION:
        raise CheckpointError(
            f"{index.label} has {SPEC_NAME} revision {index.spec_revision}; this reader knows "
            f"revisions up to {MAX_SPEC_REVISION}"
        )
    for name, (value, meaning) in _EXPECTED_SCALARS.items():
        actual = read_scalar(index, name)
        if actual is not None and actual != value:
            raise CheckpointError(
                f"{index.label} has {name} = {actual} ({meaning}); a Whisper model needs {value}"
            )


def _load_dequantized(index: Ct2Index, names: list[str]) -> dict[str, torch.Tensor]:
    """Tensors by name; int8/int16 weights stored with a `<name>_scale` are dequantized."""
    available = index.names()
    scale_names = [f"{name}_scale" for name in names if f"{name}_scale" in available]
    loaded = read_tensors(index, names + scale_names)
    result: dict[str, torch.Tensor] = {}
    for name in names:
        scale = loaded.get(f"{name}_scale")
        result[name] = loaded[name] if scale is None else _dequantize(loaded[name], scale)
    return result


def _dequantize(quantized: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # CTranslate2 stores the multiplier it quantized with: w ~ q / scale. int8 has one
    # scale per output row, int16 one for the whole tensor.
    scale = scale.float()
    if scale.numel() > 1:
        scale = scale.reshape(-1, *([1] * (quantized.dim() - 1)))
    return quantized.float() / scale


def _check_tied_projection(index: Ct2Index, embedding: torch.Tensor) -> None:
    # Usually an alias of the embeddings; a separate record must still hold the same values,
    # since our decoder computes logits with the embedding matrix.
    if "decoder/projection/weight" not in index.variables:
        return
    projection = _load_dequantized(index, ["decoder/projection/weight"])[
        "decoder/projection/weight"
    ]
    if projection.shape != embedding.shape or not torch.equal(
        projection.float(), embedding.float()
    ):
        raise CheckpointError(
            f"{index.label} has an output projection that differs from the token embeddings; "
            "only tied projections (as in every Whisper model) are supported"
        )


def _heads(index: Ct2Index, side: str, width: int, notes: list[str]) -> int:
    heads = read_scalar(index, f"{side}/num_heads")
    if heads is None:
        heads = width // HEAD_DIM
        notes.append(
            f"{index.label} has no {side}/num_heads; assuming {heads} ({width} / {HEAD_DIM})"
        )
    return int(heads)


def _side_file(side_dir: Path | None, name: str) -> Path | None:
    if side_dir is None or not (side_dir / name).is_file():
        return None
    return side_dir / name


def _read_side_config(side_dir: Path | None) -> dict[str, list]:
    path = _side_file(side_dir, "config.json")
    if path is None:
        return {}
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} should hold a JSON object")
    return raw
