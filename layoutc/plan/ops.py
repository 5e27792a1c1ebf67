"""Plan operations: plain frozen records over named buffers.

Every op names the buffers it consumes and produces; buffers are 1-D or N-D arrays of one
dtype, alive from the op that produces them to the last op that consumes them. An op that
changes dtype says so in ``cast`` ("fp32->bf16"); no conversion is implicit.

* ``read``   — elements ``[offset, offset + numel)`` of a stored buffer (``file``/``key``)
  into a new 1-D buffer.
* ``gather`` — 1-D buffers laid end to end into one buffer of ``shape`` (a slice, or a
  range of one, of the local tensor).
* ``merge``  — boxes of slice buffers copied into one buffer of the logical tensor: TP
  slices concatenated, fused blocks put back in place, padding dropped.
* ``split``  — the inverse: boxes of the logical tensor copied into slice buffers, padding
  zero-filled.
* ``swap``   — move elements between RAM and a file on the swap tier (``direction`` "out"
  to the file, "in" from it). Swap files hold a logical tensor row-major; ``segments``
  map the slice range ``[start, start + numel)`` to it.
* ``write``  — elements of a buffer (or zeros, when ``src`` is None) to
  ``[offset, offset + numel)`` of a stored buffer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

Box = tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Read:
    id: int
    out: str
    file: str
    key: str
    offset: int
    numel: int
    dtype: str
    kind: str = "read"


@dataclass(frozen=True, slots=True)
class Gather:
    id: int
    out: str
    parts: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    cast: str | None = None
    kind: str = "gather"


@dataclass(frozen=True, slots=True)
class Merge:
    """``copies``: (src buffer, box in src, box in out)."""

    id: int
    out: str
    copies: tuple[tuple[str, Box, Box], ...]
    shape: tuple[int, ...]
    dtype: str
    cast: str | None = None
    kind: str = "merge"


@dataclass(frozen=True, slots=True)
class Split:
    """``outs``: (out buffer, shape, ((box in src, box in out), ...)); the rest of each out is zero."""

    id: int
    src: str
    outs: tuple[tuple[str, tuple[int, ...], tuple[tuple[Box, Box], ...]], ...]
    dtype: str
    cast: str | None = None
    kind: str = "split"


@dataclass(frozen=True, slots=True)
class Swap:
    """Move slice elements ``[start, start + numel)`` between ``buf`` and swap file ``path``.

    ``segments`` (slice box, logical box) place the slice in the logical tensor stored
    row-major in the file (``logical_shape``, ``file_dtype``); on the way in, slice
    positions no segment covers are zero."""

    id: int
    buf: str
    direction: str  # "out" | "in"
    path: str
    slice_shape: tuple[int, ...]
    segments: tuple[tuple[Box, Box], ...]
    logical_shape: tuple[int, ...]
    start: int
    numel: int
    dtype: str
    file_dtype: str
    cast: str | None = None
    kind: str = "swap"


@dataclass(frozen=True, slots=True)
class Write:
    id: int
    src: str | None
    src_offset: int
    file: str
    key: str
    offset: int
    numel: int
    dtype: str
    kind: str = "write"


Op = Read | Gather | Merge | Split | Swap | Write
KINDS: dict[str, type] = {
    "read": Read,
    "gather": Gather,
    "merge": Merge,
    "split": Split,
    "swap": Swap,
    "write": Write,
}
OP_KINDS = tuple(KINDS)


def inputs(op: Op) -> tuple[str, ...]:
    if isinstance(op, Gather):
        return op.parts
    if isinstance(op, Merge):
        return tuple(dict.fromkeys(c[0] for c in op.copies))
    if isinstance(op, Split):
        return (op.src,)
    if isinstance(op, Swap):
        return (op.buf,) if op.direction == "out" else ()
    if isinstance(op, Write):
        return (op.src,) if op.src is not None else ()
    return ()


def outputs(op: Op) -> tuple[str, ...]:
    if isinstance(op, Read | Gather | Merge):
        return (op.out,)
    if isinstance(op, Split):
        return tuple(o[0] for o in op.outs)
    if isinstance(op, Swap) and op.direction == "in":
        return (op.buf,)
    return ()


def to_dict(op: Op) -> dict[str, Any]:
    return _lists(asdict(op))


def from_dict(d: dict[str, Any]) -> Op:
    cls = KINDS[d["kind"]]
    values = {f.name: _tuples(d[f.name]) for f in fields(cls) if f.name in d}
    op: Op = cls(**values)
    return op


def _lists(x: Any) -> Any:
    if isinstance(x, tuple | list):
        return [_lists(v) for v in x]
    if isinstance(x, dict):
        return {k: _lists(v) for k, v in x.items()}
    return x


def _tuples(x: Any) -> Any:
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x
