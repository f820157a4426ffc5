"""Settings from WHISPER_* environment variables."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import Settings
from app.runtime import RuntimeOptions


def test_defaults(clean_env) -> None:
    settings = Settings()
    assert settings.engines_dir == Path("engines")
    assert settings.models == ["tiny.en"]
    assert settings.default_model_name == "tiny.en"
    assert settings.api_key is None
    assert settings.max_upload_bytes == 25 * 1024 * 1024
    assert RuntimeOptions.from_settings(settings).max_batch_size is None  # the device's default


def test_environment(clean_env, monkeypatch) -> None:
    env = {
        "WHISPER_ENGINES_DIR": "/srv/engines",
        "WHISPER_MODELS": "tiny.en, base",
        "WHISPER_DEFAULT_MODEL": "base",
        "WHISPER_DEVICE": "cuda:1",
        "WHISPER_COMPUTE_DTYPE": "bfloat16",
        "WHISPER_MAX_BATCH_SIZE": "64",
        "WHISPER_MAX_QUEUE_WINDOWS": "99",
        "WHISPER_BATCH_WAIT_MS": "2.5",
        "WHISPER_INT8_CROSS_KV": "true",
        "WHISPER_CUDA_GRAPHS": "0",
        "WHISPER_API_KEY": "k",
        "WHISPER_MAX_UPLOAD_MB": "1",
        "WHISPER_CORS_ORIGINS": "https://a.example,https://b.example",
        "WHISPER_LOG_LEVEL": "DEBUG",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.models == ["tiny.en", "base"]
    assert settings.default_model_name == "base"
    assert settings.engine_dir("base") == Path("/srv/engines/base")
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "k"
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.log_level == "debug"
    options = RuntimeOptions.from_settings(settings)
    assert (options.device, options.compute_dtype) == ("cuda:1", "bfloat16")
    assert (options.max_batch_size, options.max_queue_windows, options.batch_wait_ms) == (
        64,
        99,
        2.5,
    )
    assert options.int8_cross_kv is True and options.cuda_graphs is False


def test_runtime_options_default_to_the_settings_defaults(clean_env) -> None:
    assert all(option.name in Settings.model_fields for option in fields(RuntimeOptions))
    assert RuntimeOptions() == RuntimeOptions.from_settings(Settings())


def test_empty_api_key_disables_auth(clean_env, monkeypatch) -> None:
    monkeypatch.setenv("WHISPER_API_KEY", "")
    assert Settings().api_key is None


@pytest.mark.parametrize(
    "env",
    [
        {"WHISPER_MODELS": "tiny.en", "WHISPER_DEFAULT_MODEL": "base"},
        {"WHISPER_MODELS": "whisper-1"},
        {"WHISPER_MODELS": "tiny.en,tiny.en"},
        {"WHISPER_MODELS": ""},
        {"WHISPER_MAX_UPLOAD_MB": "0"},
    ],
)
def test_invalid_settings(clean_env, monkeypatch, env) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError):
        Settings()


def test_configuration_page_documents_every_setting(repo_root) -> None:
    page = (repo_root / "docs" / "configuration.md").read_text()
    missing = [
        f"WHISPER_{name.upper()}"
        for name in Settings.model_fields
        if f"`WHISPER_{name.upper()}`" not in page
    ]
    assert not missing, f"{missing} not in docs/configuration.md: python -m app.config_docs --write"
