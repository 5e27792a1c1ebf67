"""Crafting hostile ``.pt`` files from real ones: rewrite a checkpoint's pickle with views,
members and values it could never have had, without torch.

:func:`rewrite` loads a file with layoutc's reader, hands the object to an edit (tensors
become :class:`View` s of their whole storage, so an edit can give any size, stride and
offset), and writes it back with the original storages: unedited, the file reads as
before. :class:`Raw` splices raw pickle opcodes into the object (a "billion laughs", a deep
nest) where no writer would put them.
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from layoutc.formats import pt


@dataclass
class View:
    """A tensor as a view of its storage: every field may be set to anything."""

    storage: pt.Tensor  # the whole storage, key kept
    offset: int
    shape: tuple[Any, ...]
    stride: tuple[Any, ...]
    storage_arg: Any = None  # set to pickle something else where the storage goes


@dataclass
class Raw:
    """Pickle opcodes that push exactly one value."""

    ops: bytes


class _Writer(pt._Writer):
    def value(self, v: Any) -> None:
        if isinstance(v, View):
            self.view(v)
        elif isinstance(v, Raw):
            self.w(v.ops)
        else:
            super().value(v)

    def view(self, v: View) -> None:
        t = v.storage
        self.storages.setdefault(t.key or "", t)
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.w(b"(")
        if v.storage_arg is not None:
            self.value(v.storage_arg)
        else:
            self.w(b"(")
            self.value("storage")
            self.global_("torch", pt.DTYPE_STORAGES[t.dtype])
            self.value(t.key)
            self.value("cpu")
            self.value(t.shape[0])
            self.w(b"tQ")
        self.value(v.offset)
        self.value(tuple(v.shape))
        self.value(tuple(v.stride))
        self.value(False)
        self.global_("collections", "OrderedDict")
        self.w(b")R")
        self.w(b"tR")


def _views(obj: Any, opener: pt.Opener) -> Any:
    if isinstance(obj, pt.TensorRef):
        s = obj.storage
        data = np.frombuffer(opener.storage(s), np.uint8).copy()
        whole = pt.Tensor(s.dtype, (s.numel,), data, key=s.key)
        return View(whole, obj.offset, obj.shape, obj.stride)
    if isinstance(obj, dict):
        return type(obj)((k, _views(v, opener)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_views(v, opener) for v in obj]
    if isinstance(obj, tuple) and not isinstance(obj, pt.Size):
        return tuple(_views(v, opener) for v in obj)
    return obj


def write(path: Path, obj: Any, archive: str | None = None) -> None:
    """``obj`` (with :class:`View` s and :class:`Raw` s) as a torch zip at ``path``."""
    w = _Writer()
    w.w(b"\x80\x02")
    w.value(obj)
    w.w(b".")
    archive = archive or path.stem
    with open(path, "wb") as f:
        zw = pt._ZipWriter(f)
        zw.add(f"{archive}/data.pkl", [w.out.getvalue()])
        zw.add(f"{archive}/byteorder", [b"little"])
        for key, t in w.storages.items():
            zw.add(f"{archive}/data/{key}", [np.asarray(t.data).tobytes()])
        zw.add(f"{archive}/version", [b"3\n"])
        zw.finish()


def rewrite(path: Path, edit: Callable[[Any], Any]) -> None:
    """Rewrite ``path`` with ``edit`` applied to its object (tensors as :class:`View` s)."""
    opener = pt.Opener()
    try:
        obj = _views(pt.load(path), opener)
    finally:
        opener.close()
    obj = edit(obj) or obj
    write(path, obj)


def laughs(levels: int) -> Raw:
    """A list DAG built through the memo: 2**levels leaves from a few hundred bytes."""
    ops = b"X\x03\x00\x00\x00lolq\x00"  # "lol", memo 0
    for i in range(levels):
        ops += b"0](h" + bytes([i]) + b"h" + bytes([i]) + b"eq" + bytes([i + 1])
    return Raw(ops)


def nest(depth: int) -> Raw:
    """Lists nested ``depth`` deep."""
    return Raw(b"]" * depth + b"a" * (depth - 1))


def member(path: Path, suffix: str) -> tuple[int, int, int]:
    """(local header offset, data offset, size) of the member whose name ends in ``suffix``."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    raw = path.read_bytes()
    h = info.header_offset
    nlen, xlen = struct.unpack_from("<HH", raw, h + 26)
    return h, h + 30 + nlen + xlen, info.file_size


def storage_of(path: Path, key: str) -> tuple[int, int, int]:
    """:func:`member` of the storage holding the tensor at ``key`` (``a/b/0``)."""
    return member(path, "/" + pt.at(pt.load(path), key).storage.member.split("/", 1)[1])


def flip(path: Path, at: int, mask: int = 0x40) -> None:
    """Flip bits of the byte at ``at``."""
    raw = bytearray(path.read_bytes())
    raw[at] ^= mask
    path.write_bytes(bytes(raw))


def raw_pickle(raw: Raw) -> bytes:
    """A whole pickle (protocol 2) of the one value ``raw`` pushes."""
    return b"\x80\x02" + raw.ops + b"."


def container_bytes(pkl: bytes, archive: str = "archive") -> bytes:
    """A torch zip container holding the pickle ``pkl`` and nothing else, as bytes (what
    ``torch.save`` of a value writes into a stream)."""
    f = io.BytesIO()
    zw = pt._ZipWriter(f)
    zw.add(f"{archive}/data.pkl", [pkl])
    zw.add(f"{archive}/byteorder", [b"little"])
    zw.add(f"{archive}/version", [b"3\n"])
    zw.finish()
    return f.getvalue()
