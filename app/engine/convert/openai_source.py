"""openai-whisper checkpoints: a `.pt` holding {"dims": {...}, "model_state_dict": {...}}."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from app.engine.checksum import sha256_file
from app.engine.convert.checkpoint import SourceCheckpoint, assemble, unused_note
from app.engine.convert.layout import count_layers
from app.engine.convert.split_naming import SplitNaming, split_recipes
from app.errors import CheckpointError

#: Whisper's head width; used only for a bare state dict that comes without its dims.
HEAD_DIM = 64

NAMING = SplitNaming(
    conv1="encoder.conv1",
    conv2="encoder.conv2",
    encoder_positions="encoder.positional_embedding",
    encoder_ln="encoder.ln_post",
    token_embedding="decoder.token_embedding.weight",
    decoder_positions="decoder.positional_embedding",
    decoder_ln="decoder.ln",
    encoder_layer="encoder.blocks.{i}",
    decoder_layer="decoder.blocks.{i}",
    self_q="attn.query",
    self_k="attn.key",
    self_v="attn.value",
    self_out="attn.out",
    self_ln="attn_ln",
    cross_q="cross_attn.query",
    cross_k="cross_attn.key",
    cross_v="cross_attn.value",
    cross_out="cross_attn.out",
    cross_ln="cross_attn_ln",
    mlp1="mlp.0",
    mlp2="mlp.2",
    mlp_ln="mlp_ln",
)

_ENCODER_BLOCK = re.compile(r"^encoder\.blocks\.(\d+)\.")
_DECODER_BLOCK = re.compile(r"^decoder\.blocks\.(\d+)\.")
_DIM_FIELDS = (
    "n_mels",
    "n_vocab",
    "n_audio_ctx",
    "n_audio_state",
    "n_audio_head",
    "n_audio_layer",
    "n_text_ctx",
    "n_text_state",
    "n_text_head",
    "n_text_layer",
)


def is_openai_checkpoint(path: Path) -> bool:
    return path.is_file() and path.suffix == ".pt"


def load_openai(path: Path) -> SourceCheckpoint:
    raw = _torch_load(path)
    notes: list[str] = []
    if isinstance(raw, dict) and "model_state_dict" in raw:
        state, dims = raw["model_state_dict"], raw.get("dims")
        if not isinstance(state, dict) or not isinstance(dims, dict):
            raise CheckpointError(f"{path} has a 'model_state_dict' but no usable 'dims' dict")
        declared = {key: int(dims[key]) for key in _DIM_FIELDS if isinstance(dims.get(key), int)}
    elif isinstance(raw, dict) and "encoder.conv1.weight" in raw:
        # A bare state dict: layer counts come from the names and heads from the width.
        state, declared = raw, {}
        width = int(raw["encoder.conv1.weight"].shape[0])
        notes.append(
            f"{path.name} has no dims; assuming {width // HEAD_DIM} heads ({width} / {HEAD_DIM})"
        )
    else:
        found = (
            ", ".join(sorted(map(str, raw))[:6]) if isinstance(raw, dict) else type(raw).__name__
        )
        raise CheckpointError(
            f"{path} is a PyTorch file but not an openai-whisper checkpoint: expected the keys "
            f"'dims' and 'model_state_dict', found {found or 'nothing'}"
        )
    n_encoder = declared.get("n_audio_layer", count_layers(state, _ENCODER_BLOCK))
    n_decoder = declared.get("n_text_layer", count_layers(state, _DECODER_BLOCK))
    recipes = split_recipes(NAMING, n_encoder, n_decoder)
    label = f"openai-whisper checkpoint {path.name}"
    tensors = assemble(recipes, state.keys(), lambda names: {n: state[n] for n in names}, label)
    width = tensors["encoder.conv1.weight"].shape[0]
    return SourceCheckpoint(
        kind="openai",
        tensors=tensors,
        n_audio_head=declared.get("n_audio_head", width // HEAD_DIM),
        n_text_head=declared.get("n_text_head", width // HEAD_DIM),
        info={"kind": "openai", "path": str(path), "sha256": sha256_file(path)},
        alignment_heads=_alignment_heads(state.get("alignment_heads")),
        declared_dims={
            k: v for k, v in declared.items() if k not in ("n_audio_head", "n_text_head")
        },
        notes=notes + unused_note(set(state) - {"alignment_heads"}, recipes, label),
    )


def _torch_load(path: Path) -> object:
    try:
        # weights_only: a checkpoint is data; never run code from a pickle.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; all mean "unreadable"
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc


def _alignment_heads(mask: object) -> list[tuple[int, int]] | None:
    """(layer, head) pairs from an `alignment_heads` boolean mask, if the checkpoint has one."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    dense = mask.to_dense() if mask.is_sparse else mask
    pairs = [(int(layer), int(head)) for layer, head in dense.nonzero().tolist()]
    return pairs or None
