"""Loading an engine directory: every broken engine fails with a clear, actionable EngineError.

A valid engine is written once per module from a random tiny model (config.json +
model.safetensors + tokenizer.json); each test breaks its own copy of it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fakes import random_model, tiny_config, tiny_dims, torch_threads
from safetensors.torch import save_file

from app.engine.checksum import sha256_file
from app.engine.config import (
    CONFIG_FILE,
    FORMAT_VERSION,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    load_engine_config,
    save_engine_config,
)
from app.engine.options import EngineOptions
from app.engine.torch_engine import TorchEngine, load_engine
from app.errors import BackendUnavailableError, EngineError, EngineNotFoundError
from app.runtime import RuntimeOptions, load_runtime

AUDIO_CTX = 100
BUILD_HINT = "build_engines.py"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def valid_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("engines") / "tiny-random"
    directory.mkdir()
    dims = tiny_dims(n_audio_ctx=AUDIO_CTX)
    state = {k: v.contiguous() for k, v in random_model(0, dims).state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / TOKENIZER_FILE).write_text("{}")  # loading an engine only checks it exists
    config = tiny_config("tiny-random", dims=dims, weights_sha256=sha256_file(directory / WEIGHTS_FILE))
    save_engine_config(directory, config)
    return directory


@pytest.fixture
def engine_dir(valid_engine: Path, tmp_path: Path) -> Path:
    """A private copy of the valid engine (weights linked, not copied) to break."""
    directory = tmp_path / "tiny-random"
    directory.mkdir()
    shutil.copy(valid_engine / CONFIG_FILE, directory / CONFIG_FILE)
    shutil.copy(valid_engine / TOKENIZER_FILE, directory / TOKENIZER_FILE)
    (directory / WEIGHTS_FILE).symlink_to(valid_engine / WEIGHTS_FILE)
    return directory


def edit_config(directory: Path, **changes: object) -> None:
    path = directory / CONFIG_FILE
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "dims":
            raw["dims"].update(value)  # type: ignore[call-overload]
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


def load(directory: Path) -> TorchEngine:
    return load_engine(directory, EngineOptions(device="cpu", max_rows=2))


def assert_actionable(error: pytest.ExceptionInfo[EngineError], *fragments: str) -> str:
    message = str(error.value)
    for fragment in (*fragments, BUILD_HINT):
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert error.value.message == message
    return message


# --- the happy path --------------------------------------------------------------------------


def test_valid_engine_loads(engine_dir: Path, valid_engine: Path) -> None:
    config = load_engine_config(engine_dir, verify_checksum=True)
    assert config.name == "tiny-random" and config.format_version == FORMAT_VERSION
    engine = load(engine_dir)
    assert engine.device == torch.device("cpu") and engine.dtype == torch.float32
    assert engine.max_rows == 2 and not engine.greedy_chunks
    expected = random_model(0, tiny_dims(n_audio_ctx=AUDIO_CTX)).state_dict()
    loaded = engine.model.state_dict()
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


# --- missing pieces ------------------------------------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(EngineNotFoundError) as error:
        load(tmp_path / "nowhere")
    assert_actionable(error, str(tmp_path / "nowhere"), CONFIG_FILE)


def test_missing_tiny_en_points_at_the_default_build(tmp_path: Path) -> None:
    with pytest.raises(EngineNotFoundError) as error:
        load_engine_config(tmp_path / "tiny.en")
    assert_actionable(error, "tiny.en")


def test_missing_config(engine_dir: Path) -> None:
    (engine_dir / CONFIG_FILE).unlink()
    with pytest.raises(EngineNotFoundError) as error:
        load(engine_dir)
    assert_actionable(error, CONFIG_FILE, f"--output {engine_dir}")


@pytest.mark.parametrize("name", [WEIGHTS_FILE, TOKENIZER_FILE])
def test_missing_file(engine_dir: Path, name: str) -> None:
    (engine_dir / name).unlink()
    with pytest.raises(EngineError) as error:
        load(engine_dir)
    assert_actionable(error, f"{name} is missing")


# --- a broken config ---------------------------------------------------------------------------


def test_config_not_json(engine_dir: Path) -> None:
    (engine_dir / CONFIG_FILE).write_text('{"name": "tiny-random", ')
    with pytest.raises(EngineError) as error:
        load(engine_dir)
    assert_actionable(error, "invalid", str(engine_dir / CONFIG_FILE))


def test_config_missing_fields(engine_dir: Path) -> None:
    raw = json.loads((engine_dir / CONFIG_FILE).read_text())
    del raw["dims"]
    (engine_dir / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(EngineError) as error:
        load(engine_dir)
    assert_actionable(error, "invalid", "dims")


def test_wrong_format_version(engine_dir: Path) -> None:
    edit_config(engine_dir, format_version=FORMAT_VERSION + 1)
    with pytest.raises(EngineError) as error:
        load(engine_dir)
    assert_actionable(error, f"format_version {FORMAT_VERSION + 1}", "Rebuild")


# --- weights that disagree with the config -----------------------------------------------------

MISSING_HINT = (
    "app/engine/torch_engine.py load_model(): the weights/config mismatch and unreadable-weights "
    "EngineErrors carry no build_engines.py hint, unlike every other engine error"
)


def test_weights_with_other_shapes_than_the_config(engine_dir: Path) -> None:
    edit_config(engine_dir, dims={"ffn_dim": 128})  # the weights have 256
    with pytest.raises(EngineError) as error:
        load(engine_dir)
    assert_actionable(error, "mlp1", "config implies")


def test_weights_with_other_layers_than_the_config(engine_dir: Path) -> None:
    edit_config(engine_dir, dims={"n_text_layer": 3})  # the weights have 2 decoder layers
    with pytest.raises(EngineError) as error:
        load(engine_dir)
    assert_actionable(error, "does not match its config", "decoder.layers.2")


def test_unreadable_weights(engine_dir: Path) -> None:
    (engine_dir / WEIGHTS_FILE).unlink()
    (engine_dir / WEIGHTS_FILE).write_bytes(b"not a safetensors file at all")
    with pytest.raises(EngineError) as error:
        load(engine_dir)
    assert_actionable(error, str(engine_dir / WEIGHTS_FILE))


def test_weights_mismatch_is_an_engine_error_naming_the_tensor(engine_dir: Path) -> None:
    """What already holds without the hint: the right error type and the offending tensor."""
    edit_config(engine_dir, dims={"ffn_dim": 128})
    with pytest.raises(EngineError, match=r"mlp1\.(weight|bias) has shape \(256,.*config implies \(128,"):
        load(engine_dir)
    edit_config(engine_dir, dims={"ffn_dim": 256, "n_text_layer": 3})
    with pytest.raises(EngineError, match=r"does not match its config: missing \['decoder\.layers\.2"):
        load(engine_dir)


def test_checksum_mismatch_with_verification(engine_dir: Path) -> None:
    edit_config(engine_dir, weights_sha256="ab" * 32)
    load_engine_config(engine_dir)  # not verified: fine
    with pytest.raises(EngineError) as error:
        load_engine_config(engine_dir, verify_checksum=True)
    message = assert_actionable(error, "sha256", "does not match", "abababababab")
    assert sha256_file(engine_dir / WEIGHTS_FILE)[:12] in message


# --- backends and options ----------------------------------------------------------------------


def test_trtllm_backend_is_unavailable(engine_dir: Path) -> None:
    edit_config(engine_dir, backend="trtllm")
    with pytest.raises(BackendUnavailableError) as error:
        load(engine_dir)
    assert isinstance(error.value, EngineError)
    assert_actionable(error, "TensorRT-LLM", str(engine_dir))


def test_unknown_compute_dtype(engine_dir: Path) -> None:
    with pytest.raises(EngineError, match="Unknown compute dtype 'float8'"):
        load_engine(engine_dir, EngineOptions(device="cpu", compute_dtype="float8"))


def test_load_runtime_surfaces_engine_errors(tmp_path: Path) -> None:
    with pytest.raises(EngineNotFoundError, match=BUILD_HINT):
        load_runtime(tmp_path / "absent", RuntimeOptions(device="cpu", warmup=False))
