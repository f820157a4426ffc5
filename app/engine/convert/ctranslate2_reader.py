"""Reader for CTranslate2's `model.bin` (docs/weights.md has the grammar).

The file is walked once to build an index (name, shape, dtype, byte offset) without reading
tensor data, so truncation and trailing bytes are reported before any work is done. Tensors
are then read by name. Records are unpadded, so data sits at arbitrary offsets: every
tensor is copied into a fresh (aligned) buffer instead of being viewed in place.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from app.engine.convert.progress import byte_progress
from app.errors import CheckpointError

#: The newest layout this reader knows; CTranslate2 4.x writes 6 and refuses anything newer.
MAX_BINARY_VERSION = 6

#: dtype_id of binary version >= 4 (`_dtype_to_type_id` / C++ `DataType`).
DTYPE_IDS: dict[int, torch.dtype] = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}

#: item_size of binary versions < 4, which had no float16/bfloat16 yet.
LEGACY_ITEM_SIZES: dict[int, torch.dtype] = {4: torch.float32, 2: torch.int16, 1: torch.int8}

#: Guards that turn a random file into a clear "not a model.bin" instead of a huge allocation.
MAX_VARIABLES = 1_000_000
MAX_RANK = 8


@dataclass(frozen=True)
class VariableRecord:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # of the first data byte
    nbytes: int


@dataclass
class Ct2Index:
    path: Path
    label: str  # how messages name the file, e.g. "model.bin (joined from 2 parts)"
    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict[str, VariableRecord] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def names(self) -> set[str]:
        return set(self.variables) | set(self.aliases)

    def resolve(self, name: str) -> VariableRecord:
        """The record behind a name, following aliases (e.g. the tied output projection)."""
        seen: set[str] = set()
        while name in self.aliases and name not in seen:
            seen.add(name)
            name = self.aliases[name]
        try:
            return self.variables[name]
        except KeyError:
            raise CheckpointError(f"{self.label} has no variable '{name}'") from None


class _Cursor:
    """Sequential reads over the header fields, with truncation reported in context."""

    def __init__(self, handle: BinaryIO, size: int, label: str) -> None:
        self.handle = handle
        self.size = size
        self.label = label

    def tell(self) -> int:
        return self.handle.tell()

    def read(self, n: int, what: str) -> bytes:
        data = self.handle.read(n)
        if len(data) < n:
            raise CheckpointError(
                f"{self.label} ends at byte {self.size} while reading {what}, which needs "
                f"{n - len(data)} more bytes: the file is truncated or incomplete (a missing part?)"
            )
        return data

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.unpack("H", f"the length of {what}")
        raw = self.read(length, what)
        # The stored length counts a trailing NUL.
        if length == 0 or raw[-1] != 0:
            raise CheckpointError(f"{self.label} is corrupt: {what} is not a NUL-terminated string")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.label} is corrupt: {what} is not UTF-8 text") from None


def read_index(path: Path, label: str | None = None) -> Ct2Index:
    """Walk the whole file and index its records; CheckpointError for anything malformed."""
    label = label or path.name
    size = path.stat().st_size
    with open(path, "rb") as handle:
        cursor = _Cursor(handle, size, label)
        if size < 4:
            raise CheckpointError(
                f"{label} is not a CTranslate2 model.bin: it is only {size} bytes long"
            )
        version = cursor.unpack("I", "the binary version")
        if not 1 <= version <= MAX_BINARY_VERSION:
            raise CheckpointError(
                f"{label} is not a CTranslate2 model.bin this reader knows: it starts with binary "
                f"version {version} (known versions are 1 to {MAX_BINARY_VERSION})"
            )
        spec_name, revision = "", 1
        if version >= 2:
            spec_name = cursor.string("the spec name")
            revision = cursor.unpack("I", "the spec revision")
        index = Ct2Index(path, label, version, spec_name, revision)
        count = cursor.unpack("I", "the variable count")
        if count > MAX_VARIABLES:
            raise CheckpointError(
                f"{label} is not a CTranslate2 model.bin: it declares {count} variables"
            )
        for number in range(1, count + 1):
            record = _read_record(cursor, version, number, count)
            index.variables[record.name] = record
        if version >= 3:
            n_aliases = cursor.unpack("I", "the alias count")
            for number in range(1, n_aliases + 1):
                alias = cursor.string(f"the name of alias {number} of {n_aliases}")
                index.aliases[alias] = cursor.string(f"the target of alias '{alias}'")
        trailing = size - cursor.tell()
        if trailing:
            raise CheckpointError(
                f"{label} has {trailing} unexpected bytes after its last record (at byte "
                f"{cursor.tell()} of {size}): trailing garbage, or parts joined in the wrong order?"
            )
    for alias, target in index.aliases.items():
        if target not in index.variables and target not in index.aliases:
            raise CheckpointError(
                f"{label} is corrupt: alias '{alias}' points to missing '{target}'"
            )
    return index


def _read_record(cursor: _Cursor, version: int, number: int, count: int) -> VariableRecord:
    where = f"variable {number} of {count}"
    name = cursor.string(f"the name of {where}")
    where = f"variable '{name}' ({number} of {count})"
    rank = cursor.unpack("B", f"the rank of {where}")
    if rank > MAX_RANK:
        raise CheckpointError(f"{cursor.label} is corrupt: {where} has rank {rank}")
    shape = tuple(cursor.unpack("I", f"the shape of {where}") for _ in range(rank))
    if version >= 4:
        dtype_id = cursor.unpack("B", f"the dtype of {where}")
        if dtype_id not in DTYPE_IDS:
            raise CheckpointError(
                f"{cursor.label} is corrupt: {where} has unknown dtype id {dtype_id}"
            )
        dtype = DTYPE_IDS[dtype_id]
        nbytes = cursor.unpack("I", f"the byte count of {where}")
    else:
        item_size = cursor.unpack("B", f"the item size of {where}")
        if item_size not in LEGACY_ITEM_SIZES:
            raise CheckpointError(f"{cursor.label} is corrupt: {where} has item size {item_size}")
        dtype = LEGACY_ITEM_SIZES[item_size]
        # Before version 4 the count is of elements, not bytes.
        nbytes = cursor.unpack("I", f"the element count of {where}") * item_size
    expected = math.prod(shape) * dtype.itemsize
    if nbytes != expected:
        raise CheckpointError(
            f"{cursor.label} is corrupt: {where} has shape {list(shape)} of {dtype} "
            f"({expected} bytes) but a payload of {nbytes} bytes"
        )
    offset = cursor.tell()
    missing = offset + nbytes - cursor.size
    if missing > 0:
        raise CheckpointError(
            f"{cursor.label} ends at byte {cursor.size} inside {where}, which needs {missing} more "
            f"bytes: the file is incomplete (a missing part?)"
        )
    cursor.handle.seek(nbytes, 1)
    return VariableRecord(name, shape, dtype, offset, nbytes)


def read_tensors(index: Ct2Index, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read the named variables (aliases resolved), in file order for sequential IO."""
    wanted = {name: index.resolve(name) for name in names}
    records = sorted(set(wanted.values()), key=lambda record: record.offset)
    loaded: dict[str, torch.Tensor] = {}
    with (
        open(index.path, "rb") as handle,
        byte_progress(sum(r.nbytes for r in records), f"reading {index.label}") as bar,
    ):
        for record in records:
            handle.seek(record.offset)
            # bytearray: a writable, freshly allocated (so aligned) copy of the unaligned data.
            data = bytearray(handle.read(record.nbytes))
            loaded[record.name] = _to_tensor(data, record)
            bar.update(record.nbytes)
    return {name: loaded[record.name] for name, record in wanted.items()}


def _to_tensor(data: bytearray, record: VariableRecord) -> torch.Tensor:
    if not data:
        return torch.empty(record.shape, dtype=record.dtype)
    # The format is little-endian, as is every host torch runs on here.
    return torch.frombuffer(data, dtype=record.dtype).reshape(record.shape)


def read_scalar(index: Ct2Index, name: str) -> int | float | None:
    """A rank-0 variable's value, or None when the file does not have it."""
    if name not in index.names():
        return None
    tensor = read_tensors(index, [name])[name]
    if tensor.numel() != 1:
        raise CheckpointError(
            f"{index.label}: '{name}' should be a scalar but has shape {list(tensor.shape)}"
        )
    return tensor.reshape(()).item()
