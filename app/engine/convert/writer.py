"""Write an engine directory atomically: build it in a hidden sibling, then rename into place.

A failed or interrupted build therefore never leaves a half engine under the final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from app.engine.checksum import sha256_file
from app.engine.config import (
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    EngineConfig,
    load_engine_config,
    save_engine_config,
)
from app.engine.convert.safetensors_writer import write_safetensors


def write_engine(
    output: Path,
    tensors: Mapping[str, torch.Tensor],
    tokenizer: Path,
    make_config: Callable[[str], EngineConfig],
    metadata: Mapping[str, str],
) -> EngineConfig:
    """Write weights, tokenizer and config (from make_config(weights_sha256)) to output."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.building-", dir=output.parent))
    try:
        write_safetensors(staging / WEIGHTS_FILE, tensors, metadata)
        config = make_config(sha256_file(staging / WEIGHTS_FILE))
        shutil.copyfile(tokenizer, staging / TOKENIZER_FILE)
        save_engine_config(staging, config)
        # Read the config back as the service will (the hash was just taken from the file).
        load_engine_config(staging)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; an engine is shared data
        _replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return config


def _replace(staging: Path, output: Path) -> None:
    if not output.exists():
        staging.rename(output)
        return
    # Move the old one aside first so the final name is never missing an engine for long,
    # and restore it if the swap fails.
    retired = output.with_name(f".{output.name}.old-{os.getpid()}")
    output.rename(retired)
    try:
        staging.rename(output)
    except BaseException:
        retired.rename(output)
        raise
    shutil.rmtree(retired, ignore_errors=True)
