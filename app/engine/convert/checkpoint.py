"""What every source reader returns, and the shared step that maps source tensors to ours.

A reader describes each of our tensors as a recipe: the source tensor names to stack along
dim 0 (q, k, v for a fused projection), where None stands for a block of zeros shaped like
its neighbour (Whisper's key projection has no bias).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from app.errors import CheckpointError

Recipe = tuple[str | None, ...]


@dataclass
class SourceCheckpoint:
    kind: str  # "ctranslate2" | "huggingface" | "openai"
    tensors: dict[str, torch.Tensor]  # our names, source dtype
    n_audio_head: int
    n_text_head: int
    #: recorded in the engine config as `source`: kind, path, sha256 of the weight file(s), ...
    info: dict[str, object]
    tokenizer: Path | None = None  # the source's own tokenizer.json, if it has one
    suppress_tokens: list[int] | None = None
    suppress_tokens_begin: list[int] | None = None
    alignment_heads: list[tuple[int, int]] | None = None
    #: dims the source states outright (HF config, openai dims), cross-checked against the shapes
    declared_dims: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # things the build log should mention


def require(available: Collection[str], needed: Iterable[str], label: str) -> None:
    """CheckpointError naming the first few missing source tensors, if any."""
    missing = sorted({name for name in needed if name not in available})
    if missing:
        shown = ", ".join(f"'{name}'" for name in missing[:8])
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise CheckpointError(
            f"{label} is missing {len(missing)} required variable(s): {shown}{more}"
        )


def assemble(
    recipes: Mapping[str, Recipe],
    available: Collection[str],
    load: Callable[[list[str]], dict[str, torch.Tensor]],
    label: str,
) -> dict[str, torch.Tensor]:
    """Our tensors from source tensors, following the recipes (all sources are checked first)."""
    needed = [name for recipe in recipes.values() for name in recipe if name is not None]
    require(available, needed, label)
    source = load(list(dict.fromkeys(needed)))
    tensors: dict[str, torch.Tensor] = {}
    for target, recipe in recipes.items():
        parts = [source[name] if name is not None else None for name in recipe]
        template = next(part for part in parts if part is not None)
        blocks = [part if part is not None else torch.zeros_like(template) for part in parts]
        if len(blocks) == 1:
            tensors[target] = blocks[0]
            continue
        if len({(b.shape[1:], b.dtype) for b in blocks}) != 1:
            shapes = ", ".join(
                f"{n or 'zeros'} {list(b.shape)}" for n, b in zip(recipe, blocks, strict=True)
            )
            raise CheckpointError(f"{label}: cannot stack {shapes} into '{target}'")
        tensors[target] = torch.cat(blocks, dim=0)
    return tensors


def unused_note(available: Collection[str], recipes: Mapping[str, Recipe], label: str) -> list[str]:
    """A log line naming source tensors no recipe uses (a sign of an unexpected variant)."""
    used = {name for recipe in recipes.values() for name in recipe}
    unused = sorted(set(available) - used)
    if not unused:
        return []
    shown = ", ".join(unused[:5]) + (f" (and {len(unused) - 5} more)" if len(unused) > 5 else "")
    return [f"{label}: ignored {len(unused)} tensor(s) not used by the engine: {shown}"]
