"""A safetensors file's header, read and validated without numpy: what planning and the
checks of a source need (tensor names, dtypes, shapes and byte ranges). The rules are
those of :mod:`layoutc.formats.safetensors`, which reads and writes the data and
re-exports everything here.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from layoutc.dtypes import BYTES
from layoutc.errors import InputError, Unsupported

# layoutc dtype -> safetensors dtype code
DTYPE_CODES: dict[str, str] = {
    "fp32": "F32",
    "bf16": "BF16",
    "fp16": "F16",
    "fp64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "fp8_e4m3": "F8_E4M3",
    "fp8_e5m2": "F8_E5M2",
}
CODE_DTYPES: dict[str, str] = {v: k for k, v in DTYPE_CODES.items()}
ITEMSIZE: dict[str, int] = BYTES  # one table of dtype sizes: layoutc.dtypes

MAX_HEADER_SIZE = 100_000_000  # bytes of JSON; the reference reader's limit
ALIGN = 8  # the data buffer starts at a multiple of this
METADATA_KEY = "__metadata__"
TIES_KEY = "layoutc.ties"  # metadata: JSON {alias: source} of tensors stored once


class SafetensorsError(InputError):
    """A safetensors file (or a request to write or read one) is malformed."""


class UnsupportedDtype(Unsupported, SafetensorsError):
    """A well-formed safetensors file holds a dtype layoutc does not handle (``U16``, ``F4``...).
    Of kind :class:`~layoutc.errors.Unsupported` (listed first), and still a
    :class:`SafetensorsError` for callers that catch every refusal of a file."""


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: layoutc dtype, shape and its absolute byte range ``[begin, end)``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _is_count(x: Any) -> bool:
    """A JSON non-negative integer (``true`` is not one)."""
    return type(x) is int and x >= 0


# ------------------------------------------------------------------ reading


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, Entry], dict[str, str]]:
    """Entries by name (in header order) and the metadata of a file, validated in full."""
    p = str(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(
                    f"{p}: truncated: {size} bytes, too short for the 8-byte header length"
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_SIZE:
                raise SafetensorsError(
                    f"{p}: header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit "
                    "(not a safetensors file, or a corrupt one)"
                )
            if 8 + n > size:
                raise SafetensorsError(
                    f"{p}: header length {n} runs past the end of the {size}-byte file"
                )
            raw = f.read(n)
    except OSError as e:
        raise SafetensorsError(f"{p}: cannot read: {e.strerror or e}") from None
    if len(raw) != n:
        raise SafetensorsError(f"{p}: the file changed while its header was read")
    return _parse_header(p, raw, size)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


class _Duplicate(Exception):
    pass


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_header(p: str, raw: bytes, size: int) -> tuple[dict[str, Entry], dict[str, str]]:
    n = len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SafetensorsError(f"{p}: header is not UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.startswith("{"):
        raise SafetensorsError(f"{p}: header does not start with '{{': {text[:40]!r}")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _Duplicate as e:
        raise SafetensorsError(f"{p}: header repeats the key {e.args[0]!r}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise SafetensorsError(f"{p}: header is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise SafetensorsError(f"{p}: header is a JSON {type(obj).__name__}, not an object")

    meta = obj.pop(METADATA_KEY, None)
    if meta is None:
        metadata: dict[str, str] = {}
    elif isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values()):
        metadata = dict(meta)
    else:
        raise SafetensorsError(f"{p}: {METADATA_KEY} must map strings to strings")

    buffer = size - 8 - n
    base = 8 + n
    entries: dict[str, Entry] = {}
    for name, info in obj.items():
        what = f"{p}: tensor {name!r}"
        if not isinstance(info, dict):
            raise SafetensorsError(f"{what}: expected an object with dtype, shape, data_offsets")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if missing:
            raise SafetensorsError(f"{what}: no {', '.join(missing)}")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(code, str):
            raise SafetensorsError(f"{what}: dtype {code!r:.40} is not a string")
        if code not in CODE_DTYPES:
            raise UnsupportedDtype(
                f"{what} has dtype {code[:40]!r}, which layoutc does not support "
                f"(it reads {', '.join(CODE_DTYPES)})"
            )
        if not (isinstance(shape, list) and all(_is_count(s) for s in shape)):
            raise SafetensorsError(
                f"{what}: shape {shape!r:.80} is not a list of non-negative integers"
            )
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]
        ):
            raise SafetensorsError(
                f"{what}: data_offsets {offsets!r:.80} is not a pair [begin, end] of "
                "non-negative integers with begin <= end"
            )
        begin, end = offsets
        if end > buffer:
            raise SafetensorsError(
                f"{what}: data_offsets [{begin}, {end}] run past the end of the data buffer "
                f"({buffer} bytes; the file is truncated or the header wrong)"
            )
        dtype = CODE_DTYPES[code]
        need = _numel(shape) * ITEMSIZE[dtype]
        if need != end - begin:
            raise SafetensorsError(
                f"{what}: shape {shape} of {code} needs {need} bytes, but data_offsets "
                f"[{begin}, {end}] hold {end - begin}"
            )
        entries[name] = Entry(name, dtype, tuple(shape), base + begin, base + end)

    pos, prev = 0, None
    for ent in sorted(entries.values(), key=lambda x: (x.begin, x.end, x.name)):
        begin, end = ent.begin - base, ent.end - base
        if begin < pos:
            raise SafetensorsError(
                f"{p}: tensors {prev!r} and {ent.name!r} overlap "
                f"({ent.name!r} starts at {begin}, before {prev!r} ends at {pos})"
            )
        if begin > pos:
            after = f"after {prev!r} " if prev is not None else "at the start of the buffer "
            raise SafetensorsError(
                f"{p}: {begin - pos} bytes {after}belong to no tensor (a gap at {pos}..{begin})"
            )
        pos, prev = end, ent.name
    if pos != buffer:
        raise SafetensorsError(
            f"{p}: {buffer - pos} bytes after the last tensor belong to no tensor "
            f"(the data ends at {pos}, the file at {buffer} past the header)"
        )
    return entries, metadata
