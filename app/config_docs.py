"""Write docs/configuration.md from the `Settings` class: one source for every setting's docs.

    python -m app.config_docs > docs/configuration.md

Each row comes from a field of `app.config.Settings`: its environment variable, its default
and its `Field(description=...)`. tests/test_docs.py regenerates the page and compares.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from app.config import Settings

HEADER = """\
# Configuration

<!-- Generated from app/config.py by `python -m app.config_docs > docs/configuration.md`;
edit the field descriptions there, not this page. -->

Every setting is an environment variable with the `WHISPER_` prefix, read once at startup
(`WHISPER_MODELS=tiny.en,base whisper-serve`). `whisper-serve` also takes `--host`, `--port`
and `--models`, which override their variables, and `--no-build`, which skips building the
bundled `engines/tiny.en` on first start. Lists are comma-separated; booleans accept
`true`/`false`, `1`/`0`, `yes`/`no`. A value that does not validate stops the service at
startup with an error naming the setting.

| variable | default | what it does |
|---|---|---|
"""

FOOTER = """
One more variable is read by the GPU kernels themselves at launch rather than through these
settings: `WHISPER_PDL=0` turns off programmatic dependent launch of the decode step's Triton
kernels on sm90+ GPUs (on by default where the GPU and Triton support it).
"""


def env_name(field: str) -> str:
    prefix = Settings.model_config.get("env_prefix", "")
    return f"{prefix}{field}".upper()


def default_text(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list | tuple):
        return f"`{','.join(map(str, value))}`" if value else "empty"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, Path):
        value = value.as_posix()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render() -> str:
    rows = []
    for name, info in Settings.model_fields.items():
        description = info.description or ""
        rows.append(f"| `{env_name(name)}` | {default_text(info)} | {cell(description)} |\n")
    return HEADER + "".join(rows) + FOOTER


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
