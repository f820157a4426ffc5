"""Recipes for checkpoints that keep q, k and v as separate linears (Hugging Face, openai-whisper).

Both use the same structure under different names, so each describes its names with a
`SplitNaming` and this module fuses them into our qkv / kv layout (k bias = zeros).
"""

from __future__ import annotations

from dataclasses import dataclass

from app.engine.convert.checkpoint import Recipe


@dataclass(frozen=True)
class SplitNaming:
    conv1: str
    conv2: str
    encoder_positions: str
    encoder_ln: str
    token_embedding: str
    decoder_positions: str
    decoder_ln: str
    encoder_layer: str  # prefix with "{i}"
    decoder_layer: str
    self_q: str
    self_k: str
    self_v: str
    self_out: str
    self_ln: str
    cross_q: str
    cross_k: str
    cross_v: str
    cross_out: str
    cross_ln: str
    mlp1: str
    mlp2: str
    mlp_ln: str


def _copy(target: str, source: str) -> dict[str, Recipe]:
    """weight + bias of a linear or layer norm stored under another name."""
    return {f"{target}.weight": (f"{source}.weight",), f"{target}.bias": (f"{source}.bias",)}


def _layer(n: SplitNaming, ours: str, theirs: str, *, cross: bool) -> dict[str, Recipe]:
    recipes: dict[str, Recipe] = {
        **_copy(f"{ours}.attn_ln", f"{theirs}.{n.self_ln}"),
        f"{ours}.attn.qkv.weight": tuple(
            f"{theirs}.{p}.weight" for p in (n.self_q, n.self_k, n.self_v)
        ),
        f"{ours}.attn.qkv.bias": (f"{theirs}.{n.self_q}.bias", None, f"{theirs}.{n.self_v}.bias"),
        **_copy(f"{ours}.attn.out", f"{theirs}.{n.self_out}"),
    }
    if cross:
        recipes |= {
            **_copy(f"{ours}.cross_ln", f"{theirs}.{n.cross_ln}"),
            **_copy(f"{ours}.cross.q", f"{theirs}.{n.cross_q}"),
            f"{ours}.cross.kv.weight": (
                f"{theirs}.{n.cross_k}.weight",
                f"{theirs}.{n.cross_v}.weight",
            ),
            f"{ours}.cross.kv.bias": (None, f"{theirs}.{n.cross_v}.bias"),
            **_copy(f"{ours}.cross.out", f"{theirs}.{n.cross_out}"),
        }
    return recipes | {
        **_copy(f"{ours}.mlp_ln", f"{theirs}.{n.mlp_ln}"),
        **_copy(f"{ours}.mlp1", f"{theirs}.{n.mlp1}"),
        **_copy(f"{ours}.mlp2", f"{theirs}.{n.mlp2}"),
    }


def split_recipes(
    naming: SplitNaming, n_encoder_layers: int, n_decoder_layers: int
) -> dict[str, Recipe]:
    recipes: dict[str, Recipe] = {
        **_copy("encoder.conv1", naming.conv1),
        **_copy("encoder.conv2", naming.conv2),
        "encoder.positional_embedding": (naming.encoder_positions,),
        **_copy("encoder.ln_post", naming.encoder_ln),
        "decoder.token_embedding.weight": (naming.token_embedding,),
        "decoder.positional_embedding": (naming.decoder_positions,),
        **_copy("decoder.ln", naming.decoder_ln),
    }
    for i in range(n_encoder_layers):
        recipes |= _layer(
            naming, f"encoder.layers.{i}", naming.encoder_layer.format(i=i), cross=False
        )
    for i in range(n_decoder_layers):
        recipes |= _layer(
            naming, f"decoder.layers.{i}", naming.decoder_layer.format(i=i), cross=True
        )
    return recipes
