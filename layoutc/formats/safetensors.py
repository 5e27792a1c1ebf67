"""The safetensors format without torch or the ``safetensors`` package: a validating reader,
a planner for parallel writers, a writer, and Hugging Face's sharded-checkpoint index.

A ``.safetensors`` file is three regions: an 8-byte little-endian length ``N``; ``N`` bytes of
UTF-8 JSON, ``{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}``; then the data buffer. Offsets are relative to the start of the
buffer; tensors are row-major little-endian, contiguous, do not overlap and cover the buffer
exactly, with nothing after it.

Reading (:func:`read_header`, :func:`read`, :class:`File`). The header is validated in full
before any tensor byte is touched, with the limits the reference (Rust) reader enforces:
length at most :data:`MAX_HEADER_SIZE`, inside the file, the JSON an object starting with
``{``, no duplicate keys, no ``NaN``/``Infinity``, string-to-string metadata. Every tensor
must have a dtype layoutc supports (:data:`DTYPE_CODES`; others raise
:class:`UnsupportedDtype`), a shape of non-negative integers, and ``data_offsets`` whose size
is exactly ``numel * itemsize``; sorted by offset the tensors must tile the buffer with no
gap and no overlap, and the buffer must end where the file does. Anything else is refused
with :class:`SafetensorsError` naming the file and the problem. Data is then read through a
memory map, only the elements asked for (:func:`read` copies ``[lo, hi)`` of the flattened
tensor and never reads the rest).

Writing (:func:`plan_file`, :func:`save`). Tensors are laid out in the order given — not
sorted by name or alignment as the ``safetensors`` package does — so a file converted from a
state dict keeps the state dict's order, as Hugging Face files usually do. The header is
compact deterministic JSON (``separators=(",", ":")``, metadata keys sorted, ``__metadata__``
first and only when non-empty), padded with spaces so the buffer starts 8-byte aligned.
:func:`plan_file` returns the header bytes and each tensor's absolute offset, so a writer can
pre-size a file and write tensors at known offsets in any order, in parallel; :func:`save`
writes the same bytes sequentially, streaming tensors given as chunk producers. The
``safetensors`` package and ``torch`` read the result (proven in tests).

Sharded checkpoints. :func:`shard_names` gives Hugging Face's file names and
:func:`write_index` writes ``model.safetensors.index.json`` as ``transformers`` does
(``indent=2``, sorted keys, trailing newline).

Refused on write: dtypes outside :data:`DTYPE_CODES`, the name ``__metadata__``, duplicate
names, negative dimensions, non-string metadata, and a stream that yields the wrong number of
bytes (the partial file is removed).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from layoutc.dtypes import BYTES, np_dtype
from layoutc.dtypes import name_of as _layoutc_dtype
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


class File:
    """An open safetensors file: its validated header and a memory map for reads.

    Use as a context manager, or call :meth:`close`; arrays it returns are copies, so they
    stay valid after it is closed."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self.entries, self.metadata = read_header(self.path)
        self._map: mmap.mmap | None = None

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            try:
                with open(self.path, "rb") as f:
                    self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise SafetensorsError(f"{self.path}: cannot map: {e}") from None
        return self._map

    def read(self, name: str, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Elements ``[lo, hi)`` of the row-major flattening of tensor ``name`` (a 1-D copy)."""
        e = self.entries.get(name)
        if e is None:
            raise SafetensorsError(f"{self.path}: no tensor {name!r}")
        numel = e.numel
        hi = numel if hi is None else hi
        if not (0 <= lo <= hi <= numel):
            raise SafetensorsError(
                f"{self.path}: tensor {name!r}: range [{lo}, {hi}) is not within its "
                f"{numel} elements"
            )
        m = self._mapped()
        if len(m) < e.end:
            raise SafetensorsError(f"{self.path}: the file shrank after its header was read")
        item = ITEMSIZE[e.dtype]
        view = np.frombuffer(m, dtype=np_dtype(e.dtype), count=hi - lo, offset=e.begin + lo * item)
        out = view.copy()
        del view  # release the map's buffer so close() can unmap it
        return out

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def __enter__(self) -> File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read(path: str | os.PathLike[str], name: str, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Elements ``[lo, hi)`` of the flattened tensor ``name``, read through a memory map.

    Only that range is read (and copied). For many reads of one file, use :class:`File`,
    which validates the header once."""
    with File(path) as f:
        return f.read(name, lo, hi)


# ------------------------------------------------------------------ writing


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if not metadata:
        return {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SafetensorsError("metadata must map strings to strings")
    return {k: metadata[k] for k in sorted(metadata)}


def plan_file(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, int]]:
    """The header of a file holding ``tensors`` (name, layoutc dtype, shape), in that order.

    Returns the header bytes — 8-byte length, JSON, space padding to an 8-byte boundary — and
    each tensor's absolute data offset. The file's size is ``len(header)`` plus the tensors'
    bytes; writing each tensor's row-major bytes at its offset, in any order, completes it."""
    header: dict[str, Any] = {}
    meta = _check_metadata(metadata)
    if meta:
        header[METADATA_KEY] = meta
    relative: dict[str, int] = {}
    pos = 0
    for name, dtype, shape in tensors:
        if not isinstance(name, str):
            raise SafetensorsError(f"tensor name {name!r:.60} is not a string")
        if name == METADATA_KEY:
            raise SafetensorsError(f"{METADATA_KEY!r} is reserved and cannot name a tensor")
        if name in relative:
            raise SafetensorsError(f"tensor {name!r} is given twice")
        if dtype not in DTYPE_CODES:
            raise SafetensorsError(
                f"tensor {name!r}: dtype {dtype!r} cannot be written to safetensors "
                f"(layoutc writes {', '.join(DTYPE_CODES)})"
            )
        dims = tuple(
            int(s) if isinstance(s, np.integer) else s for s in shape
        )  # numpy integers are fine
        if not all(_is_count(s) for s in dims):
            raise SafetensorsError(
                f"tensor {name!r}: shape {dims!r:.80} is not a tuple of non-negative integers"
            )
        nbytes = _numel(dims) * ITEMSIZE[dtype]
        header[name] = {
            "dtype": DTYPE_CODES[dtype],
            "shape": list(dims),
            "data_offsets": [pos, pos + nbytes],
        }
        relative[name] = pos
        pos += nbytes
    try:
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise SafetensorsError(f"a tensor name or metadata is not valid Unicode: {e}") from None
    text += b" " * (-(8 + len(text)) % ALIGN)
    if len(text) > MAX_HEADER_SIZE:
        raise SafetensorsError(
            f"the header would be {len(text)} bytes, over the {MAX_HEADER_SIZE}-byte limit "
            "readers enforce; split the tensors over more files"
        )
    head = struct.pack("<Q", len(text)) + text
    return head, {name: len(head) + off for name, off in relative.items()}


Stream = tuple[str, tuple[int, ...], Callable[[], Iterator[bytes]]]


def save(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray | Stream],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a complete file; returns the bytes written.

    Each value is a numpy array (any byte order or memory layout; written row-major, little
    endian) or ``(dtype, shape, chunks)``, where ``chunks()`` yields the row-major bytes in
    pieces, so large tensors stream to disk. Tensors are written in the mapping's order."""
    p = str(path)
    specs: list[tuple[str, str, tuple[int, ...]]] = []
    sources: list[np.ndarray | Callable[[], Iterator[bytes]]] = []
    for name, t in tensors.items():
        if isinstance(t, np.ndarray):
            little = t.dtype.newbyteorder("<") if t.dtype.byteorder == ">" else t.dtype
            dtype = _layoutc_dtype(little)
            if dtype is None:
                raise SafetensorsError(
                    f"{p}: tensor {name!r}: numpy dtype {t.dtype} has no safetensors dtype "
                    "layoutc writes"
                )
            flat = t.reshape(-1).astype(little, copy=False)
            specs.append((name, dtype, tuple(int(s) for s in t.shape)))
            sources.append(np.ascontiguousarray(flat))
        elif isinstance(t, tuple) and len(t) == 3 and callable(t[2]):
            dtype, shape, chunks = t
            specs.append((name, dtype, tuple(shape)))
            sources.append(chunks)
        else:
            raise SafetensorsError(
                f"{p}: tensor {name!r}: expected a numpy array or (dtype, shape, chunks), "
                f"got {type(t).__name__}"
            )
    try:
        head, _ = plan_file(specs, metadata)
    except SafetensorsError as e:
        raise SafetensorsError(f"{p}: {e}") from None

    with open(p, "wb") as f:
        try:
            f.write(head)
            for (name, dtype, shape), src in zip(specs, sources, strict=True):
                need = _numel(shape) * ITEMSIZE[dtype]
                if isinstance(src, np.ndarray):
                    if need:
                        f.write(src.view(np.uint8).data)
                    continue
                got = 0
                for chunk in src():
                    got += memoryview(chunk).nbytes
                    if got > need:
                        break
                    f.write(chunk)
                if got != need:
                    more = "more than " if got > need else ""
                    raise SafetensorsError(
                        f"{p}: tensor {name!r}: its chunks gave {more}{got} bytes, "
                        f"but {dtype} {list(shape)} is {need} bytes"
                    )
        except BaseException:
            f.close()
            Path(p).unlink(missing_ok=True)  # no half-written file left behind
            raise
        return f.tell()


# ------------------------------------------------------------------ sharded checkpoints


def write_index(
    path: str | os.PathLike[str],
    weight_map: Mapping[str, str],
    total_size: int,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write Hugging Face's ``model.safetensors.index.json``.

    ``{"metadata": {"total_size": total_size, **metadata}, "weight_map": {tensor: file}}``,
    as ``transformers`` writes it: ``indent=2``, keys sorted, a trailing newline — the same
    bytes whatever the order of the mappings. ``total_size`` (the tensors' bytes, headers
    excluded) overrides a ``total_size`` in ``metadata``."""
    p = str(path)
    if not _is_count(total_size):
        raise SafetensorsError(f"{p}: total_size {total_size!r} is not a non-negative integer")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise SafetensorsError(f"{p}: the weight map must map tensor names to file names")
    meta = {**(metadata or {}), "total_size": total_size}
    if not all(isinstance(k, str) for k in meta):
        raise SafetensorsError(f"{p}: metadata keys must be strings")
    index = {"metadata": meta, "weight_map": dict(weight_map)}
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    with open(p, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def shard_names(n: int) -> list[str]:
    """Hugging Face's file names for ``n`` shards: ``model-00001-of-00003.safetensors``..."""
    if not (type(n) is int and n >= 1):
        raise SafetensorsError(f"a checkpoint needs at least one shard, not {n!r}")
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


TIES_KEY = "layoutc.ties"  # metadata: JSON {alias: source} of tensors stored once


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors checkpoint (one file, or a folder with
    ``model.safetensors`` or an index), as numpy arrays, with the tie aliases layoutc
    recorded in the metadata restored as the same array as their source."""
    p = Path(path)
    if p.is_dir():
        index = p / "model.safetensors.index.json"
        files = (
            sorted({p / f for f in json.loads(index.read_text())["weight_map"].values()})
            if index.is_file()
            else [p / "model.safetensors"]
        )
    else:
        files = [p]
    out: dict[str, np.ndarray] = {}
    ties: dict[str, str] = {}
    for f in files:
        entries, metadata = read_header(f)
        for name in entries:
            out[name] = read(f, name).reshape(entries[name].shape)
        if TIES_KEY in metadata:
            ties.update(json.loads(metadata[TIES_KEY]))
    for alias, source in ties.items():
        out[alias] = out[source]
    return out
