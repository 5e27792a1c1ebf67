"""What a PyTorch distributed checkpoint (DCP) holds besides its tensors' bytes: the items
written beside them and the ``.metadata`` that finds them all.

Each saved item — a chunk of a tensor, or a non-tensor value — is a ``torch.save``
container of its own inside a ``__R_0.distcp`` file, found by (file, offset, length).
``.metadata`` is the pickle torch's loader reads first: every key's global size, dtype
and chunks, the nested path of every key in the state dict (``planner_data``) and where
each item lies. It is written here with layoutc's pickle writer, naming only the classes a
clean file names (the dataclasses of ``torch.distributed.checkpoint.metadata``,
``_StorageInfo``, ``torch.Size``, dtypes, ``torch.serialization._get_layout``).

Besides the tensors a plan fills, a DCP output holds:

* what a DCP source holds and its layout does not place (:func:`~layoutc.formats.dcp.carried`):
  tensors and byte items (a train state, a data loader's position, the param groups) copied
  byte for byte, never unpickled;
* for any other source, the optimizer's param groups, one byte item per hyperparameter as
  ``get_state_dict`` flattens them (``optim.param_groups.<i>.<field>``, ``params`` the list
  of the group's parameter names): the source's values, or ``--param-groups``, with torch
  AdamW's defaults for a field neither gives — ``set_state_dict`` wants every field.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from layoutc import ir
from layoutc.errors import Unsupported
from layoutc.formats import pt

MD = "torch.distributed.checkpoint.metadata"
VERSION = "1.0.0"  # the Metadata version torch 2.13 writes
TORCH_NAMES = {v: k for k, v in reversed(pt.TORCH_DTYPES.items())}  # fp32 -> float32
ADAMW: dict[str, Any] = {  # torch.optim.AdamW's param-group fields and defaults (torch 2.13)
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 1e-2,
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": None,
    "decoupled_weight_decay": True,
}
COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class Saved:
    """One item written: its key, chunk offsets (None for a byte item) and bytes."""

    key: str
    offsets: tuple[int, ...] | None
    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class Entry:
    """A tensor key of the metadata: dtype, global shape, chunks as (offsets, sizes)."""

    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]


def nested_path(prefix: str, *rest: str | int) -> tuple[str | int, ...]:
    """The nested path of a flattened key: ``model.`` + ``a.b`` -> ("model", "a.b")."""
    head: tuple[str | int, ...] = tuple(prefix.rstrip(".").split(".")) if prefix else ()
    return (*head, *rest)


def write_value(f: BinaryIO, path: Path, value: Any) -> tuple[int, int]:
    """``value`` as ``torch.save`` writes it, at the current position of ``f``; returns its
    (offset, length)."""
    at = f.tell()
    c = pt.write_container(f, value, path)
    return at, c.size - at


def copy_bytes(src: Path, offset: int, length: int, f: BinaryIO) -> tuple[int, int]:
    """Bytes ``[offset, offset + length)`` of ``src`` appended to ``f``, in pieces; returns
    where they landed (offset, length)."""
    at = f.tell()
    with open(src, "rb") as s:
        s.seek(offset)
        left = length
        while left:
            piece = s.read(min(left, COPY_CHUNK))
            if not piece:
                raise Unsupported(f"{src}: ended {left} bytes early while copying an item")
            f.write(piece)
            left -= len(piece)
    return at, length


def group_items(
    layout: ir.Layout, groups: list[dict[str, Any]], prefix: str
) -> Iterator[tuple[str, tuple[str | int, ...], Any]]:
    """The byte items of the optimizer's param groups: (key, nested path, value), one per
    field of each group, AdamW's defaults filling what ``groups`` lacks, ``params`` the
    names of the group's trainable tensors in layout order."""
    members = group_members(layout)
    if len(groups) != len(members):
        raise Unsupported(
            f"{len(groups)} param group(s) given for the {len(members)} group(s) of trainable "
            f"tensors in {layout.source} ({', '.join(members)})"
        )
    for i, (given, names) in enumerate(zip(groups, members.values(), strict=True)):
        fields = {**ADAMW, **{k: v for k, v in given.items() if k != "params"}}
        for name, value in (*fields.items(), ("params", list(names))):
            yield (
                f"{prefix}param_groups.{i}.{name}",
                nested_path(prefix, "param_groups", i, name),
                value,
            )


def group_members(layout: ir.Layout) -> dict[str, list[str]]:
    """Each param group holding trainable tensors, in the layout's group order: their names."""
    out: dict[str, list[str]] = {g: [] for g in layout.groups}
    for t in layout.tensors:
        if t.trainable:
            out.setdefault(t.group, []).append(t.name)
    return {g: names for g, names in out.items() if names}


def _size(shape: tuple[int, ...]) -> pt.Size:
    return pt.Size(shape)


def _record(cls: str, state: Any = None) -> pt.Record:
    return pt.Record(cls, (), state)


def _properties(dtype: str) -> pt.Record:
    name = TORCH_NAMES.get(dtype)
    if name is None:
        raise Unsupported(f"a distributed checkpoint cannot hold {dtype} tensors here")
    return _record(
        f"{MD}.TensorProperties",
        (
            pt.DType(name),
            pt.Call("torch.serialization._get_layout", ("torch.strided",)),
            False,
            pt.Call(f"{MD}._MEM_FORMAT_ENCODING", (0,)),
            False,
        ),
    )


def metadata(
    tensors: dict[str, Entry],
    byte_items: list[str],
    paths: dict[str, tuple[str | int, ...]],
    saved: list[Saved],
) -> bytes:
    """The ``.metadata`` pickle: ``tensors`` and ``byte_items`` in order, each key's nested
    path, and where each saved item lies."""
    sdm: dict[str, Any] = {}
    for key, e in tensors.items():
        chunks = [
            _record(f"{MD}.ChunkStorageMetadata", {"offsets": _size(o), "sizes": _size(s)})
            for o, s in e.chunks
        ]
        sdm[key] = _record(
            f"{MD}.TensorStorageMetadata",
            {"properties": _properties(e.dtype), "size": _size(e.shape), "chunks": chunks},
        )
    for key in byte_items:
        sdm[key] = _record(f"{MD}.BytesStorageMetadata")
    index: dict[tuple[str, tuple[int, ...]], int] = {
        (key, o): i for key, e in tensors.items() for i, (o, _) in enumerate(e.chunks)
    }
    storage = []
    for s in saved:
        at = None if s.offsets is None else index[(s.key, s.offsets)]
        where = _record(
            f"{MD}.MetadataIndex",
            {"fqn": s.key, "offset": None if s.offsets is None else _size(s.offsets), "index": at},
        )
        info = _record(
            "torch.distributed.checkpoint.filesystem._StorageInfo",
            {"relative_path": s.file, "offset": s.offset, "length": s.length},
        )
        storage.append((where, info))
    obj = _record(
        f"{MD}.Metadata",
        {
            "state_dict_metadata": sdm,
            "planner_data": {k: paths[k] for k in (*tensors, *byte_items) if k in paths},
            "storage_data": pt.Pairs(tuple(storage)),
            "storage_meta": None,
            "version": VERSION,
        },
    )
    data, storages = pt.dumps_pickle(obj)
    assert not storages
    return data
