"""Join a model split into parts (plain concatenation), hashing while copying."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from app.engine.convert.progress import byte_progress
from app.errors import CheckpointError

CHUNK = 1 << 22


def join_parts(
    parts: Sequence[Path], destination: Path, expected_sha256: str | None = None
) -> dict[str, object]:
    """Concatenate parts into destination; returns the joined sha256 and each part's sha256.

    CheckpointError when a part is missing or the joined file does not hash to expected_sha256.
    """
    absent = [str(part) for part in parts if not part.is_file()]
    if absent:
        raise CheckpointError(f"model part(s) not found: {', '.join(absent)}")
    joined = hashlib.sha256()
    part_info: list[dict[str, object]] = []
    total = sum(part.stat().st_size for part in parts)
    with open(destination, "wb") as out, byte_progress(total, f"joining {len(parts)} parts") as bar:
        for part in parts:
            digest = hashlib.sha256()
            with open(part, "rb") as handle:
                while chunk := handle.read(CHUNK):
                    out.write(chunk)
                    joined.update(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            part_info.append(
                {"path": str(part), "bytes": part.stat().st_size, "sha256": digest.hexdigest()}
            )
    sha256 = joined.hexdigest()
    if expected_sha256 is not None and sha256 != expected_sha256.lower():
        raise CheckpointError(
            f"the joined model.bin ({total} bytes from {len(parts)} parts) has sha256 {sha256}, "
            f"expected {expected_sha256.lower()}: a part is corrupt, truncated, from another "
            "release, or the parts are in the wrong order"
        )
    return {"sha256": sha256, "bytes": total, "parts": part_info}
