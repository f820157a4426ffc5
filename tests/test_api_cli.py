"""whisper-serve's first-run engine build (subprocess mocked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app import cli
from app.config import Settings


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    recorded: list[list[str]] = []

    def fake_run(command: list[str], check: bool = False) -> subprocess.CompletedProcess:
        recorded.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    return recorded


def test_builds_missing_bundled_engine(clean_env, tmp_path: Path, calls) -> None:
    cli.ensure_bundled_engine(Settings(engines_dir=tmp_path))
    assert calls == [[sys.executable, "-m", "build_engines", "--output", str(tmp_path / "tiny.en")]]


def test_existing_engine_is_left_alone(clean_env, tmp_path: Path, calls) -> None:
    (tmp_path / "tiny.en").mkdir()
    (tmp_path / "tiny.en" / "config.json").write_text("{}")
    cli.ensure_bundled_engine(Settings(engines_dir=tmp_path))
    assert calls == []


def test_other_models_are_never_built(clean_env, tmp_path: Path, calls) -> None:
    cli.ensure_bundled_engine(Settings(engines_dir=tmp_path, models=["base"]))
    assert calls == []


def test_failed_build_exits_nonzero(clean_env, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(
        cli.subprocess, "run", lambda command, check=False: subprocess.CompletedProcess(command, 2)
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.ensure_bundled_engine(Settings(engines_dir=tmp_path))
    assert exit_info.value.code == 2
