"""Hugging Face `WhisperForConditionalGeneration` directories (config.json with model_type whisper)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from app.engine.checksum import sha256_file
from app.engine.convert.checkpoint import SourceCheckpoint, assemble, unused_note
from app.engine.convert.split_naming import SplitNaming, split_recipes
from app.errors import CheckpointError

SAFETENSORS = "model.safetensors"
TORCH_BIN = "pytorch_model.bin"
INDEX_SUFFIX = ".index.json"


def _naming(prefix: str) -> SplitNaming:
    return SplitNaming(
        conv1=f"{prefix}encoder.conv1",
        conv2=f"{prefix}encoder.conv2",
        encoder_positions=f"{prefix}encoder.embed_positions.weight",
        encoder_ln=f"{prefix}encoder.layer_norm",
        token_embedding=f"{prefix}decoder.embed_tokens.weight",
        decoder_positions=f"{prefix}decoder.embed_positions.weight",
        decoder_ln=f"{prefix}decoder.layer_norm",
        encoder_layer=prefix + "encoder.layers.{i}",
        decoder_layer=prefix + "decoder.layers.{i}",
        self_q="self_attn.q_proj",
        self_k="self_attn.k_proj",
        self_v="self_attn.v_proj",
        self_out="self_attn.out_proj",
        self_ln="self_attn_layer_norm",
        cross_q="encoder_attn.q_proj",
        cross_k="encoder_attn.k_proj",
        cross_v="encoder_attn.v_proj",
        cross_out="encoder_attn.out_proj",
        cross_ln="encoder_attn_layer_norm",
        mlp1="fc1",
        mlp2="fc2",
        mlp_ln="final_layer_norm",
    )


def read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} should hold a JSON object")
    return raw


def is_hf_whisper_dir(path: Path) -> bool:
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "whisper"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def load_huggingface(path: Path) -> SourceCheckpoint:
    config = read_json(path / "config.json")
    files = _weight_files(path)
    names, load = _open_weights(files)
    prefix = "model." if "model.encoder.conv1.weight" in names else ""
    try:
        n_encoder, n_decoder = int(config["encoder_layers"]), int(config["decoder_layers"])
        n_audio_head = int(config["encoder_attention_heads"])
        n_text_head = int(config["decoder_attention_heads"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path / 'config.json'} lacks a usable Whisper field: {exc}"
        ) from exc
    recipes = split_recipes(_naming(prefix), n_encoder, n_decoder)
    label = f"Hugging Face checkpoint {path}"
    tensors = assemble(recipes, names, load, label)
    _check_tied_projection(names, load, tensors["decoder.token_embedding.weight"], label)
    generation = (
        read_json(path / "generation_config.json")
        if (path / "generation_config.json").is_file()
        else {}
    )
    heads = generation.get("alignment_heads")
    return SourceCheckpoint(
        kind="huggingface",
        tensors=tensors,
        n_audio_head=n_audio_head,
        n_text_head=n_text_head,
        info={
            "kind": "huggingface",
            "path": str(path),
            "sha256": {file.name: sha256_file(file) for file in files},
        },
        tokenizer=path / "tokenizer.json" if (path / "tokenizer.json").is_file() else None,
        suppress_tokens=generation.get("suppress_tokens"),
        suppress_tokens_begin=generation.get("begin_suppress_tokens"),
        alignment_heads=[(int(a), int(b)) for a, b in heads] if heads else None,
        declared_dims=_declared_dims(config),
        notes=unused_note(names - {"proj_out.weight"}, recipes, label),
    )


def _declared_dims(config: dict) -> dict[str, int]:
    fields = {
        "n_mels": "num_mel_bins",
        "n_vocab": "vocab_size",
        "n_audio_state": "d_model",
        "n_text_state": "d_model",
        "n_audio_layer": "encoder_layers",
        "n_text_layer": "decoder_layers",
        "n_audio_ctx": "max_source_positions",
        "n_text_ctx": "max_target_positions",
        "ffn_dim": "encoder_ffn_dim",
    }
    return {
        ours: int(config[theirs])
        for ours, theirs in fields.items()
        if isinstance(config.get(theirs), int)
    }


def _weight_files(path: Path) -> list[Path]:
    """The weight files of the directory: single or sharded, safetensors preferred."""
    for base in (SAFETENSORS, TORCH_BIN):
        if (path / base).is_file():
            return [path / base]
        index = path / (base + INDEX_SUFFIX)
        if index.is_file():
            weight_map = read_json(index).get("weight_map", {})
            shards = sorted({path / str(name) for name in weight_map.values()})
            absent = [shard.name for shard in shards if not shard.is_file()]
            if absent or not shards:
                raise CheckpointError(
                    f"{index} lists shard(s) that are missing: {', '.join(absent) or 'none listed'}"
                )
            return shards
    raise CheckpointError(
        f"Hugging Face checkpoint {path} has no weights: expected {SAFETENSORS} or {TORCH_BIN} "
        "(or their sharded .index.json)"
    )


def _open_weights(
    files: list[Path],
) -> tuple[set[str], Callable[[list[str]], dict[str, torch.Tensor]]]:
    """All tensor names across the files, and a loader of tensors by name."""
    where: dict[str, Path] = {}
    state_dicts: dict[Path, dict[str, torch.Tensor]] = {}
    for file in files:
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt") as handle:
                    keys = list(handle.keys())
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{file} is not a readable safetensors file: {exc}") from exc
        else:
            state_dicts[file] = _torch_load(file)
            keys = list(state_dicts[file])
        where |= dict.fromkeys(keys, file)

    def load(names: list[str]) -> dict[str, torch.Tensor]:
        result: dict[str, torch.Tensor] = {}
        for file in dict.fromkeys(where[name] for name in names):
            wanted = [name for name in names if where[name] == file]
            if file in state_dicts:
                result |= {name: state_dicts[file][name] for name in wanted}
                continue
            with safe_open(str(file), framework="pt") as handle:
                result |= {name: handle.get_tensor(name) for name in wanted}
        return result

    return set(where), load


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; all mean "unreadable"
        raise CheckpointError(f"{file} is not a readable PyTorch weights file: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} should hold a state dict, not {type(state).__name__}")
    return state


def _check_tied_projection(
    names: set[str],
    load: Callable[[list[str]], dict[str, torch.Tensor]],
    embedding: torch.Tensor,
    label: str,
) -> None:
    # Our decoder computes logits with the embedding matrix, as every Whisper model does.
    if "proj_out.weight" not in names:
        return
    projection = load(["proj_out.weight"])["proj_out.weight"]
    if projection.shape != embedding.shape or not torch.equal(projection, embedding):
        raise CheckpointError(
            f"{label} has a proj_out.weight that differs from the token embeddings; only tied "
            "output projections (tie_word_embeddings) are supported"
        )
