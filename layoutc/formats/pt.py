"""The ``.pt`` container without torch: a restricted lazy reader and a writer.

A ``torch.save`` file is an uncompressed zip: ``<archive>/data.pkl`` (a protocol-2 pickle)
plus one member ``<archive>/data/<key>`` of raw little-endian bytes per storage. Tensors in
the pickle are calls of ``torch._utils._rebuild_tensor_v2`` on a *persistent id* naming a
storage member.

Reading (:func:`load`). The pickle is run by an unpickler whose ``find_class`` knows only an
allowlist: torch's tensor-rebuild functions and storage types, ``torch.Size``, torch
dtypes, ``collections.OrderedDict``, and the few DeepSpeed classes its checkpoints pickle,
which become inert :class:`Record` s. Any other global is refused with
:class:`UnsafePickle` naming the file and the global, before anything is called. Tensors
become :class:`TensorRef` s — dtype, shape, strides and a byte range of a member — and bytes
are only touched when asked for, through a memory map of the file (:meth:`TensorRef.numpy`,
:meth:`TensorRef.read_flat`).

Writing (:func:`save`). Plain containers (dict, OrderedDict, list, tuple, str, int, float,
bool, None), :class:`Tensor` s (numpy arrays or lazily produced bytes) and :class:`Record` s
are written as torch 2.x writes them, members 64-byte aligned, so
``torch.load(path, weights_only=True)`` reads the result (proven in tests). Two entries
with the same storage ``key`` share one storage, as tied weights do in torch.
"""

from __future__ import annotations

import io
import itertools
import math
import mmap
import os
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layoutc.dtypes import BYTES, np_dtype
from layoutc.errors import InputError
from layoutc.runtime.checksum import Pieces
from layoutc.runtime.reopen import new_file

if TYPE_CHECKING:  # numpy is imported where tensor bytes are touched: metadata needs none
    import numpy as np

# torch storage class name <-> layoutc dtype
STORAGE_DTYPES = {
    "FloatStorage": "fp32",
    "DoubleStorage": "fp64",
    "HalfStorage": "fp16",
    "BFloat16Storage": "bf16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "Float8_e4m3fnStorage": "fp8_e4m3",
    "Float8_e5m2Storage": "fp8_e5m2",
}
DTYPE_STORAGES = {v: k for k, v in STORAGE_DTYPES.items()}
TORCH_DTYPES = {
    "float32": "fp32",
    "float": "fp32",
    "float64": "fp64",
    "double": "fp64",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
    "int64": "int64",
    "long": "int64",
    "int32": "int32",
    "int": "int32",
    "int16": "int16",
    "int8": "int8",
    "uint8": "uint8",
    "bool": "bool",
}
ITEMSIZE: dict[str, int] = BYTES  # one table of dtype sizes: layoutc.dtypes


class UnsafePickle(InputError):
    """A checkpoint's pickle names a global layoutc will not load (it could run code)."""


class BadContainer(InputError):
    """A file is not a readable torch zip container."""


# ------------------------------------------------------------------ values


@dataclass
class Record:
    """An inert stand-in for an object of a known class: its class name and state."""

    cls: str  # "module.QualName"
    args: tuple[Any, ...] = ()
    state: Any = None

    def __setstate__(self, state: Any) -> None:
        """What pickle's BUILD calls: the record keeps the state as plain data."""
        self.state = state

    def get(self, name: str, default: Any = None) -> Any:
        if isinstance(self.state, dict):
            return self.state.get(name, default)
        return default


@dataclass(frozen=True)
class Call:
    """A value written as a call of a named global (pickle's REDUCE): ``func(*args)``.
    Writing only; layoutc's reader never calls one."""

    func: str  # "module.name"
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Pairs:
    """A dict to write whose keys are not hashable here (records): its (key, value) pairs,
    written as a dict. Writing only."""

    items: tuple[tuple[Any, Any], ...]


@dataclass(frozen=True)
class StorageRef:
    """One storage member of a container."""

    path: str
    member: str  # name inside the zip
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor in a container, not yet read: a strided view of a storage."""

    storage: StorageRef
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool = False

    @property
    def dtype(self) -> str:
        return self.storage.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def contiguous(self) -> bool:
        expected = 1
        for size, st in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and st != expected:
                return False
            expected *= size
        return True

    def numpy(self, opener: Opener | None = None) -> np.ndarray:
        """The tensor as a numpy array (a view of the memory map when contiguous)."""
        import numpy as np  # lazy: metadata needs no numpy, and planning reads metadata

        data = (opener or _default_opener()).storage(self.storage)
        arr = np.frombuffer(data, dtype=np_dtype(self.dtype), count=self.storage.numel)
        item = arr.itemsize
        view = np.lib.stride_tricks.as_strided(
            arr[self.offset :], shape=self.shape, strides=tuple(s * item for s in self.stride)
        )
        return view

    def read_flat(self, lo: int, hi: int, opener: Opener | None = None) -> np.ndarray:
        """Elements ``[lo, hi)`` of the row-major flattening, without reading the rest."""
        import numpy as np  # lazy: metadata needs no numpy, and planning reads metadata

        if self.contiguous:
            data = (opener or _default_opener()).storage(self.storage)
            arr = np.frombuffer(data, dtype=np_dtype(self.dtype), count=self.storage.numel)
            return arr[self.offset + lo : self.offset + hi]
        return np.ascontiguousarray(self.numpy(opener)).reshape(-1)[lo:hi]


# ------------------------------------------------------------------ the allowlist


def _rebuild_tensor(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False, *_: Any
) -> TensorRef:
    """A :class:`TensorRef` of plainly typed arguments; its geometry is checked against the
    storage once the whole pickle is loaded (:func:`check_view`)."""
    if not isinstance(storage, StorageRef):
        raise ValueError(f"a tensor is rebuilt from {type(storage).__name__}, not a storage")
    return TensorRef(storage, _int(offset), _ints(size), _ints(stride), bool(requires_grad))


def _int(x: Any) -> int:
    if type(x) is not int:
        raise ValueError(f"a tensor's size, stride or offset is {x!r:.40}, not an integer")
    return x


def _ints(xs: Any) -> tuple[int, ...]:
    if not isinstance(xs, tuple | list) or len(xs) > MAX_DIMS:
        raise ValueError(f"a tensor's size or stride is {xs!r:.60}, not a short tuple")
    return tuple(_int(x) for x in xs)


def _rebuild_parameter(data: TensorRef, requires_grad: bool = True, *_: Any) -> TensorRef:
    return TensorRef(data.storage, data.offset, data.shape, data.stride, bool(requires_grad))


class Size(tuple[int, ...]):
    """A ``torch.Size``: a tuple of ints that is written back as ``torch.Size``."""

    __slots__ = ()


def _size(dims: Any = ()) -> Size:
    return Size(int(x) for x in dims)


@dataclass(frozen=True)
class _TensorClass:
    """``torch.Tensor`` or ``torch.nn.Parameter`` named in a pickle: a type tag, nothing more."""

    name: str


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any = None) -> TensorRef:
    """What torch pickles for a tensor of a (sub)class: ``func(*args)`` retyped. Only the
    allowlisted rebuild functions and plain tensor classes are accepted."""
    if func not in (_rebuild_tensor, _rebuild_parameter) or not isinstance(new_type, _TensorClass):
        raise UnsafePickle(f"a tensor rebuilt by {func!r:.60} as {new_type!r:.60}")
    ref = func(*args)
    assert isinstance(ref, TensorRef)
    return ref


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class DType:
    """A torch dtype seen inside a pickle (``torch.bfloat16``)."""

    name: str

    @property
    def layoutc(self) -> str | None:
        return TORCH_DTYPES.get(self.name)


def _record_class(qualname: str) -> type:
    """A class whose instances are inert :class:`Record` s (built via NEWOBJ / REDUCE / BUILD)."""

    def new(cls: type, *args: Any, **kwargs: Any) -> Record:
        return Record(qualname, tuple(args))

    return type(qualname.rsplit(".", 1)[-1], (), {"__new__": new})


# DeepSpeed classes its checkpoints pickle: mapped to inert records, never imported.
DEEPSPEED_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.checkpoint.universal_checkpoint.SubparamShape",
)

_FUNCTIONS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): _size,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): _TensorClass("Tensor"),
    ("torch.nn.parameter", "Parameter"): _TensorClass("Parameter"),
    ("collections", "OrderedDict"): OrderedDict,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: str, archive: str) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path
        self.archive = archive
        self.storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _FUNCTIONS:
            return _FUNCTIONS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name in TORCH_DTYPES:
            return DType(name)
        qualname = f"{module}.{name}"
        if qualname in DEEPSPEED_CLASSES:
            return _RECORD_CLASSES[qualname]
        raise UnsafePickle(
            f"{self.path}: refusing to load the pickled global `{qualname}`: it is not a tensor, "
            "a container or one of the DeepSpeed classes layoutc reads as plain data, and "
            "loading it could run code"
        )

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) >= 5):
            raise BadContainer(f"{self.path}: unexpected persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid[:5]
        if not isinstance(stype, _StorageType):
            raise UnsafePickle(f"{self.path}: storage of unknown type {stype!r:.80}")
        if not isinstance(key, str | int) or type(numel) is not int or numel < 0:
            raise BadContainer(f"{self.path}: a malformed storage id {pid!r:.80}")
        key = str(key)
        ref = StorageRef(
            self.path, f"{self.archive}/data/{key}", key, STORAGE_DTYPES[stype.name], numel
        )
        if self.storages.setdefault(key, ref) != ref:
            raise BadContainer(
                f"{self.path}: storage {key} is named as {self.storages[key].numel} "
                f"{self.storages[key].dtype} elements and as {numel} {ref.dtype} elements"
            )
        return ref


_RECORD_CLASSES = {q: _record_class(q) for q in DEEPSPEED_CLASSES}


# ------------------------------------------------------------------ opening files

LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # a zip member's local file header
MAX_DEPTH = 100  # containers nested deeper are refused (DeepSpeed's go 6 deep)
MAX_VIEW_ENUMERATED = 1 << 16  # elements of an interleaved view checked one by one
MAX_DIMS = 64  # dims of one tensor view (torch allows 64)


@dataclass(frozen=True)
class Member:
    """A stored member of a zip container: where its bytes are, how many, their CRC-32."""

    name: str
    data_at: int
    size: int
    crc: int


class _Window(io.RawIOBase):
    """Bytes ``[start, start + length)`` of a mapped file as a seekable file of their own
    (a zip container stored inside a larger file), read without copying the rest."""

    def __init__(self, data: Any, start: int, length: int) -> None:
        self.data, self.start, self.length, self.pos = data, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, (0, self.pos, self.length)[whence] + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        at = self.start + self.pos
        b[:n] = self.data[at : at + n]
        self.pos += n
        return n


def members(
    path: str, data: Any, start: int = 0, length: int | None = None, prefix: str = ""
) -> dict[str, Member]:
    """Every member of the zip container ``path`` (whose bytes ``data`` maps) — or of the
    container stored at bytes ``[start, start + length)`` of it, its members named
    ``prefix`` + name, their offsets in the file — each checked against its local header:
    names unique, nothing compressed or encrypted, the local header agreeing with the
    central directory (name, flags, method, and CRC and sizes where it records them), its
    extra field well formed, and the members' bytes inside the container, before the
    central directory, one after the other without overlap. So a damaged or crafted
    header is refused instead of shifting what is read."""
    where = path if length is None else f"{path} (bytes {start} to {start + length})"
    try:
        source: Any = path if length is None else _Window(data, start, length)
        with zipfile.ZipFile(source) as z:
            infos = z.infolist()
            end = start + z.start_dir
            if length is not None and z.start_dir > length:
                raise ValueError("its central directory lies outside it")
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise BadContainer(f"{where}: not a torch zip checkpoint ({e})") from None
    out: dict[str, Member] = {}
    spans = []
    for info in infos:
        name = prefix + info.filename
        if name in out:
            raise BadContainer(f"{where}: the member {name} appears twice in the archive")
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise BadContainer(
                f"{where}: the member {name} is compressed; torch writes every member stored"
            )
        if info.flag_bits & 0x41:
            raise BadContainer(f"{where}: the member {name} is encrypted")
        h = start + info.header_offset
        if h < start or h + LOCAL_HEADER.size > end:
            raise BadContainer(f"{where}: the local header of {name} lies outside the archive")
        sig, _, flags, method, _, _, crc, csize, _, nlen, xlen = LOCAL_HEADER.unpack(
            data[h : h + LOCAL_HEADER.size]
        )
        raw = bytes(data[h + 30 : h + 30 + nlen])
        problem = ""
        if sig != 0x04034B50:
            problem = "has no local header signature"
        elif raw != info.orig_filename.encode("utf-8" if flags & 0x800 else "cp437"):
            problem = f"has the local name {raw[:80]!r}"
        elif flags != info.flag_bits or method != info.compress_type:
            problem = "has local flags or method that differ from the central directory"
        elif not flags & 0x08 and (crc, csize if csize != 0xFFFFFFFF else info.file_size) != (
            info.CRC,
            info.file_size,
        ):
            problem = "has a local CRC or size that differs from the central directory"
        elif not _extra_ok(bytes(data[h + 30 + nlen : h + 30 + nlen + xlen])):
            problem = "has a malformed extra field"
        if problem:
            raise BadContainer(f"{where}: the member {name} {problem}: the file is damaged")
        data_at = h + 30 + nlen + xlen
        if data_at + info.file_size > end:
            raise BadContainer(
                f"{where}: the member {name} ({info.file_size} bytes at byte {data_at}) runs past "
                f"the archive's data, which ends at byte {end}: the file is truncated or damaged"
            )
        out[name] = Member(name, data_at, info.file_size, info.CRC)
        spans.append((h, data_at + info.file_size, name))
    spans.sort()
    for (_, a_end, a), (b_at, _, b) in itertools.pairwise(spans):
        if b_at < a_end:
            raise BadContainer(f"{where}: the members {a} and {b} overlap: the file is crafted")
    return out


def _extra_ok(extra: bytes) -> bool:
    """A zip extra field is whole records of (id, length, data)."""
    at = 0
    while at + 4 <= len(extra):
        at += 4 + struct.unpack_from("<H", extra, at + 2)[0]
    return at == len(extra)


class Opener:
    """Memory maps of container files and their checked members (cached). A member read
    through :meth:`storage` has its CRC-32 checked once, before its bytes are used."""

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}
        self._members: dict[str, dict[str, Member]] = {}
        self._windows: dict[tuple[str, int], dict[str, Member]] = {}
        self._checked: set[tuple[str, str]] = set()

    def map(self, path: str) -> mmap.mmap:
        """The file mapped read-only (once)."""
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[path]

    def members(self, path: str) -> dict[str, Member]:
        if path not in self._members:
            self._members[path] = members(path, self.map(path))
        return self._members[path]

    def window(self, path: str, start: int, length: int) -> dict[str, Member]:
        """The members of the container stored at bytes ``[start, start + length)`` of
        ``path`` (indexed once), named ``@START/`` + their name; they join ``path``'s
        :meth:`members`, so a storage inside is found like any other."""
        if (path, start) not in self._windows:
            found = members(path, self.map(path), start, length, window_prefix(start))
            self._members.setdefault(path, {}).update(found)
            self._windows[(path, start)] = found
        return self._windows[(path, start)]

    def member(self, path: str, name: str) -> tuple[int, int]:
        """(data offset, size) of a stored member."""
        m = self.members(path).get(name)
        if m is None:
            raise BadContainer(f"{path}: no member {name}")
        return m.data_at, m.size

    def storage(self, s: StorageRef) -> memoryview:
        """The bytes of a storage, its member's CRC-32 checked."""
        m = self.members(s.path).get(s.member)
        need = s.numel * ITEMSIZE[s.dtype]
        if m is None or m.size != need:
            found = "no member" if m is None else f"{m.size} bytes"
            raise BadContainer(f"{s.path}: storage {s.key} holds {found}, {need} expected")
        view = memoryview(self.map(s.path))[m.data_at : m.data_at + need]
        if (s.path, s.member) not in self._checked:
            check_crc(s.path, m, zlib.crc32(view))
            self._checked.add((s.path, s.member))
        return view

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()


def window_prefix(start: int) -> str:
    """How the members of a container stored at byte ``start`` of a file are named."""
    return f"@{start}/"


def check_crc(path: str, m: Member, crc: int) -> None:
    """Refuse a member whose bytes do not have the CRC-32 its archive records."""
    if crc != m.crc:
        raise BadContainer(
            f"{path}: the member {m.name} fails its CRC-32 check ({crc:08x}, the archive "
            f"records {m.crc:08x}): the file is damaged"
        )


_OPENER: Opener | None = None


def _default_opener() -> Opener:
    global _OPENER
    if _OPENER is None:
        _OPENER = Opener()
    return _OPENER


def load(
    path: str | os.PathLike[str],
    opener: Opener | None = None,
    window: tuple[int, int] | None = None,
) -> Any:
    """The object in a torch zip file, tensors as :class:`TensorRef` (no data read);
    with ``opener``, through its map and member index of the file (made once for a run);
    with ``window`` ``(start, length)`` (and an opener), the container stored at those
    bytes of the file (an item of a PyTorch distributed checkpoint).

    Refused with :class:`BadContainer`, naming the file: a damaged or crafted archive (see
    :func:`members`), a pickle whose CRC-32 fails, containers nested deeper than
    :data:`MAX_DEPTH` or more objects, counted as a walk reaches them (so shared ones count
    each time), than the pickle's own size can account for — a "billion laughs" — and any
    tensor view that is not a non-overlapping view inside its storage (see :func:`check_view`)
    or whose storage's member does not hold exactly its bytes."""
    path = str(path)
    prefix = window_prefix(window[0]) if window is not None else ""
    try:
        if window is not None:
            opener = opener or _default_opener()
            found = opener.window(path, *window)
            pickled = _pickle_of(path, found, opener.map(path), prefix)
        elif opener is not None:
            found = opener.members(path)
            pickled = _pickle_of(path, found, opener.map(path))
        else:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                found = members(path, data)
                pickled = _pickle_of(path, found, data)
    except (OSError, ValueError) as e:  # unreadable, or empty (mmap refuses length 0)
        raise BadContainer(f"{path}: not a torch zip checkpoint ({e})") from None
    pkl = [n for n in found if _is_pickle(n, prefix)]
    m = found[pkl[0]]
    archive = prefix + pkl[0][len(prefix) :].split("/", 1)[0]
    check_crc(path, m, zlib.crc32(pickled))
    unpickler = _Unpickler(pickled, path, archive)
    try:
        obj = unpickler.load()
    except (UnsafePickle, BadContainer):
        raise
    except Exception as e:
        raise BadContainer(f"{path}: cannot read its pickle: {type(e).__name__}: {e}") from None
    for s in unpickler.storages.values():
        member = found.get(s.member)
        need = s.numel * ITEMSIZE[s.dtype]
        if member is None or member.size != need:
            held = "is missing" if member is None else f"holds {member.size} bytes"
            raise BadContainer(
                f"{path}: storage {s.key} ({s.numel} {s.dtype} elements, {need} bytes) "
                f"{held} in the archive"
            )
    _check_tree(obj, path, budget=10_000 + 2 * len(pickled))
    return obj


def _is_pickle(name: str, prefix: str) -> bool:
    rest = name[len(prefix) :]
    return name.startswith(prefix) and rest.endswith("/data.pkl") and rest.count("/") == 1


def _pickle_of(path: str, found: dict[str, Member], data: Any, prefix: str = "") -> bytes:
    """The bytes of the archive's one ``<archive>/data.pkl``."""
    pkl = [n for n in found if _is_pickle(n, prefix)]
    if len(pkl) != 1:
        many = "no" if not pkl else "more than one"
        raise BadContainer(f"{path}: {many} data.pkl inside")
    m = found[pkl[0]]
    return bytes(data[m.data_at : m.data_at + m.size])


def _check_tree(obj: Any, path: str, budget: int) -> None:
    """Walk a loaded object once, as a tree: bounded depth, bounded visits, every tensor
    view checked against its storage (see :func:`load`)."""
    stack: list[tuple[Any, str, int]] = [(obj, "", 0)]
    visits = 0
    while stack:
        value, key, depth = stack.pop()
        visits += 1
        if visits > budget:
            raise BadContainer(
                f"{path}: its pickle expands to more than {budget:,} objects (shared ones "
                "counted each time they are reached); a checkpoint's pickle holds about one "
                "object per byte or two, so this one is crafted to blow up"
            )
        if depth > MAX_DEPTH:
            raise BadContainer(
                f"{path}: containers nested more than {MAX_DEPTH} deep at {key[:200]!r}"
            )
        if isinstance(value, TensorRef):
            problem = check_view(value)
            if problem:
                raise BadContainer(f"{path}: the tensor {key or '(root)'} {problem}")
        elif isinstance(value, dict):
            stack.extend((v, f"{key}/{k}" if key else str(k), depth + 1) for k, v in value.items())
        elif isinstance(value, list | tuple):
            stack.extend(
                (v, f"{key}/{i}" if key else str(i), depth + 1) for i, v in enumerate(value)
            )
        elif isinstance(value, Record):
            stack.append((value.args, f"{key}/<args>", depth + 1))
            stack.append((value.state, f"{key}/<state>", depth + 1))


def check_view(t: TensorRef) -> str | None:
    """What is wrong with a tensor view, or None: every element it names must lie inside its
    storage and no two of its elements may be the same storage element (a view that repeats
    elements would multiply what is written), with no negative size, stride or offset
    (torch refuses those too) and at most :data:`MAX_DIMS` dims."""
    s = t.storage
    where = (
        f"(size {list(t.shape)}, stride {list(t.stride)}, offset {t.offset}) over storage "
        f"{s.key} of {s.numel} {s.dtype} elements"
    )
    if len(t.shape) != len(t.stride) or len(t.shape) > MAX_DIMS:
        return f"has a malformed view {where}"
    if t.offset < 0 or any(n < 0 for n in t.shape) or any(st < 0 for st in t.stride):
        return f"has a negative size, stride or offset {where}"
    if 0 in t.shape:
        return None if t.offset <= s.numel else f"starts past its storage {where}"
    last = t.offset + sum((n - 1) * st for n, st in zip(t.shape, t.stride, strict=True))
    if last >= s.numel:
        return f"reaches past its storage {where}: its last element is {last}"
    dims = sorted(
        ((n, st) for n, st in zip(t.shape, t.stride, strict=True) if n > 1), key=lambda d: d[1]
    )
    reach = 1  # elements spanned by the dims taken so far, smallest stride first
    for n, st in dims:
        if st < reach:
            break
        reach += st * (n - 1)
    else:
        return None  # each stride steps past everything the smaller ones reach
    # interleaved dims (size [2, 3], stride [3, 2]) may still be distinct: count them
    if dims[0][1] == 0:
        return f"names some storage elements more than once {where}"
    if math.prod(n for n, _ in dims) > MAX_VIEW_ENUMERATED:
        return f"interleaves its dims over more elements than layoutc checks one by one {where}"
    seen = {0}
    for n, st in dims:
        seen = {e + i * st for e in seen for i in range(n)}
    if len(seen) < math.prod(n for n, _ in dims):
        return f"names some storage elements more than once {where}"
    return None


def tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, TensorRef]]:
    """Every TensorRef inside a loaded object, with its ``/``-joined key path."""
    if isinstance(obj, TensorRef):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}/{i}" if prefix else str(i))


def at(obj: Any, key: str) -> Any:
    """The value at a ``/``-joined key path (``optimizer_state_dict/fp32_flat_groups/0``);
    the empty path is the object itself."""
    for part in key.split("/") if key else ():
        if isinstance(obj, list | tuple):
            obj = obj[int(part)]
        elif isinstance(obj, dict):
            if part in obj:
                obj = obj[part]
            elif part.isdigit() and int(part) in obj:
                obj = obj[int(part)]
            else:
                raise KeyError(key)
        elif isinstance(obj, Record) and isinstance(obj.state, dict):
            obj = obj.state[part]
        else:
            raise KeyError(key)
    return obj


# ------------------------------------------------------------------ writing


@dataclass
class Tensor:
    """A tensor to write: dtype, shape, and where its bytes come from.

    ``data`` is a numpy array (written as is) or a callable yielding the row-major bytes in
    chunks, so large tensors stream to disk. Tensors with equal ``key`` share a storage."""

    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray | Callable[[], Iterator[bytes]] | None = None
    key: str | None = None
    requires_grad: bool = False
    parameter: bool = False
    _id: int = field(default=0, repr=False)

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for s in self.shape:
            n *= s
        return n


def _view(ref: TensorRef) -> tuple[Any, ...]:
    return (ref.storage.path, ref.storage.key, ref.offset, ref.shape, ref.stride)


def carry(obj: Any, planned: Collection[str], keys: dict[str, str]) -> Any:
    """A copy of a loaded object to write again: tensors at the key paths in ``planned``
    (what a plan writes) become holes of their own (a tied alias — the same view — shares
    its source's), other tensors are copied from the source compactly (a view no longer
    drags its whole storage along); records and containers are kept as they are. ``keys``
    receives each planned key path's storage."""
    views: dict[tuple[Any, ...], str] = {}
    for path, ref in tensors(obj):
        if path in planned and _view(ref) not in views:
            views[_view(ref)] = f"p{len(views)}"
    return _rebuild(obj, views, planned, keys, "")


def copy_values(obj: Any) -> Any:
    """A loaded object to write again as it is: every tensor read into a tensor to write
    (compactly), records, ``torch.Size`` and containers kept."""
    return carry(obj, (), {})


def _rebuild(
    obj: Any,
    views: dict[tuple[Any, ...], str],
    planned: Collection[str],
    keys: dict[str, str],
    prefix: str,
) -> Any:
    def sub(k: Any, v: Any) -> Any:
        return _rebuild(v, views, planned, keys, f"{prefix}/{k}" if prefix else str(k))

    if isinstance(obj, TensorRef):
        key = views.get(_view(obj))
        if key is not None:
            if prefix in planned:
                keys[prefix] = key
            return Tensor(obj.dtype, obj.shape, None, key=key, requires_grad=obj.requires_grad)
        return Tensor(obj.dtype, obj.shape, obj.read_flat(0, obj.numel).reshape(obj.shape))
    if isinstance(obj, Size):
        return obj
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, sub(k, v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: sub(k, v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [sub(i, v) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(sub(i, v) for i, v in enumerate(obj))
    if isinstance(obj, set):
        return sorted(obj)  # sparse_tensor_module_names: written as a sorted list
    return obj


class _Writer:
    """Emits the protocol-2 opcodes torch's pickler emits for state dicts."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.storages: dict[str, Tensor] = {}
        self.next_key = 0
        self.taken: set[str] = set()  # keys given explicitly somewhere in the object

    def w(self, b: bytes) -> None:
        self.out.write(b)

    def global_(self, module: str, name: str) -> None:
        self.w(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def value(self, v: Any) -> None:
        if v is None:
            self.w(b"N")
        elif v is True:
            self.w(b"\x88")
        elif v is False:
            self.w(b"\x89")
        elif isinstance(v, int):
            self.int_(v)
        elif isinstance(v, float):
            self.w(b"G" + struct.pack(">d", v))
        elif isinstance(v, str):
            b = v.encode("utf-8")
            self.w(b"X" + struct.pack("<I", len(b)) + b)
        elif isinstance(v, Tensor):
            self.tensor(v)
        elif isinstance(v, Record):
            self.record(v)
        elif isinstance(v, Call):
            module, _, name = v.func.rpartition(".")
            self.global_(module, name)
            self.value(tuple(v.args))
            self.w(b"R")  # REDUCE
        elif isinstance(v, DType):
            self.global_("torch", v.name)
        elif isinstance(v, Pairs):
            self.w(b"}")
            self.items(dict(enumerate(v.items)), pairs=True)
        elif isinstance(v, OrderedDict):
            self.global_("collections", "OrderedDict")
            self.w(b")R")
            self.items(v)
        elif isinstance(v, dict):
            self.w(b"}")
            self.items(v)
        elif isinstance(v, list):
            self.w(b"]")
            if v:
                self.w(b"(")
                for x in v:
                    self.value(x)
                self.w(b"e")
        elif isinstance(v, Size):
            self.global_("torch", "Size")
            self.value((tuple(v),))
            self.w(b"R")
        elif isinstance(v, tuple):
            self.w(b"(")
            for x in v:
                self.value(x)
            self.w(b"t")
        else:
            raise TypeError(f"layoutc cannot write a {type(v).__name__} into a .pt file")

    def int_(self, v: int) -> None:
        if 0 <= v < 256:
            self.w(b"K" + bytes([v]))
        elif 0 <= v < 65536:
            self.w(b"M" + struct.pack("<H", v))
        elif -(2**31) <= v < 2**31:
            self.w(b"J" + struct.pack("<i", v))
        else:
            b = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            self.w(b"\x8a" + bytes([len(b)]) + b)

    def items(self, d: dict[Any, Any], pairs: bool = False) -> None:
        if d:
            self.w(b"(")
            for k, x in d.values() if pairs else d.items():
                self.value(k)
                self.value(x)
            self.w(b"u")

    def tensor(self, t: Tensor) -> None:
        key = t.key
        if key is None or key not in self.storages:
            if key is None:  # the next number no keyed tensor uses
                while str(self.next_key) in self.taken:
                    self.next_key += 1
                key = str(self.next_key)
                self.next_key += 1
            self.storages[key] = t
        storage = self.storages[key]
        numel = storage.nbytes // ITEMSIZE[storage.dtype]
        if t.parameter:
            self.global_("torch._utils", "_rebuild_parameter")
            self.w(b"(")
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.w(b"(")
        self.w(b"(")  # persistent id tuple
        self.value("storage")
        self.global_("torch", DTYPE_STORAGES[t.dtype])
        self.value(key)
        self.value("cpu")
        self.value(numel)
        self.w(b"tQ")
        self.value(0)
        self.value(tuple(t.shape))
        stride, acc = [], 1
        for s in reversed(t.shape):
            stride.append(acc)
            acc *= s
        self.value(tuple(reversed(stride)))
        self.value(False)
        self.global_("collections", "OrderedDict")
        self.w(b")R")
        self.w(b"tR")
        if t.parameter:
            self.value(t.requires_grad)
            self.global_("collections", "OrderedDict")
            self.w(b")R")
            self.w(b"tR")

    def record(self, r: Record) -> None:
        module, _, name = r.cls.rpartition(".")
        self.global_(module, name)
        self.value(tuple(r.args))
        self.w(b"\x81")  # NEWOBJ
        if r.state is not None:
            self.value(r.state)
            self.w(b"b")  # BUILD


def _explicit_keys(obj: Any) -> Iterator[str]:
    if isinstance(obj, Tensor):
        if obj.key is not None:
            yield obj.key
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _explicit_keys(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _explicit_keys(v)
    elif isinstance(obj, Record):
        yield from _explicit_keys(obj.args)
        yield from _explicit_keys(obj.state)


def dumps_pickle(obj: Any) -> tuple[bytes, dict[str, Tensor]]:
    """The data.pkl bytes of ``obj`` and the storages it refers to, by key."""
    w = _Writer()
    w.taken = set(_explicit_keys(obj))
    w.w(b"\x80\x02")
    w.value(obj)
    w.w(b".")
    return w.out.getvalue(), w.storages


_ALIGN = 64


def _chunks(t: Tensor) -> Iterator[bytes]:
    if t.data is None:
        yield bytes(t.nbytes)
    elif callable(t.data):
        yield from t.data()
    else:
        import numpy as np  # lazy: metadata needs no numpy, and planning reads metadata

        yield np.ascontiguousarray(np.asarray(t.data)).tobytes()


def save(obj: Any, path: str | os.PathLike[str], archive: str | None = None) -> int:
    """Write ``obj`` as a torch zip container; returns the bytes written."""
    return create(obj, path, archive).size


@dataclass
class Created:
    """A container written with holes: where each storage's bytes go, and what to finish."""

    path: Path
    size: int
    storages: dict[str, tuple[int, int]]  # storage key -> (data offset, bytes)
    holes: list[tuple[int, int, int, int]]
    cd_at: list[int]

    def finish_crcs(self, pieces: Pieces | None = None) -> int:
        """Patch the CRC of every member written after creation into both of its headers,
        and return the CRC-32 of the whole file. ``pieces`` (the writes into the file, with
        their CRCs) spares reading the members back; what they do not cover is read."""
        pieces = pieces or Pieces()
        fd = os.open(self.path, os.O_RDWR)
        try:
            members = Pieces()
            for header_at, data_at, size, index in self.holes:
                crc = pieces.crc(fd, data_at, data_at + size)
                packed = struct.pack("<I", crc)
                os.pwrite(fd, packed, header_at + 14)
                os.pwrite(fd, packed, self.cd_at[index] + 16)
                members.record(data_at, size, crc)
            return members.crc(fd, 0, self.size)
        finally:
            os.close(fd)

    @classmethod
    def joined(cls, path: Path, parts: list[Created], size: int) -> Created:
        """The containers ``parts``, written into ``path`` of ``size`` bytes among other
        bytes, as one: their holes to finish together, the CRC over the whole file. Their
        storages, keyed alike in each, are not kept."""
        holes: list[tuple[int, int, int, int]] = []
        cd_at: list[int] = []
        for c in parts:
            holes += [(h, d, n, i + len(cd_at)) for h, d, n, i in c.holes]
            cd_at += c.cd_at
        return cls(path, size, {}, holes, cd_at)


def create(
    obj: Any, path: str | os.PathLike[str], archive: str | None = None, align: int = _ALIGN
) -> Created:
    """Write ``obj``; tensors whose ``data`` is None become pre-sized holes to fill later
    (then call :meth:`Created.finish_crcs`). Storage data starts at multiples of ``align``
    (torch's 64, or a page for direct IO; torch's loader takes any)."""
    path = Path(path)
    with new_file(path) as f:
        return write_container(f, obj, path, archive or path.stem or "archive", align)


def write_container(
    f: Any, obj: Any, path: Path, archive: str = "archive", align: int = _ALIGN
) -> Created:
    """Write ``obj`` as a torch zip container at the current position of the open file
    ``f`` (of ``path``), its zip offsets counted from there, so the container can be one
    item of a larger file; see :func:`create`. ``size`` is where it ends in the file."""
    pkl, storages = dumps_pickle(obj)
    data = {key: (t.nbytes, None if t.data is None else _chunks(t)) for key, t in storages.items()}
    return write_pickled(f, pkl, data, path, archive, align)


def write_pickled(
    f: Any,
    pkl: bytes,
    storages: Mapping[str, tuple[int, Iterable[bytes] | None]],
    path: Path,
    archive: str = "archive",
    align: int = _ALIGN,
) -> Created:
    """Write a torch zip container whose ``data.pkl`` is ``pkl`` (pickled elsewhere, e.g.
    by torch's own pickler) and whose storages are ``key -> (bytes, chunks)``, a storage
    without chunks a hole to fill later; see :func:`write_container`."""
    zw = _ZipWriter(f, align, base=f.tell())
    zw.add(f"{archive}/data.pkl", [pkl])
    zw.add(f"{archive}/.format_version", [b"1"])
    zw.add(f"{archive}/.storage_alignment", [str(align).encode()])
    zw.add(f"{archive}/byteorder", [b"little"])
    for key, (size, chunks) in storages.items():
        zw.add(f"{archive}/data/{key}", chunks or (), size=size, hole=chunks is None)
    zw.add(f"{archive}/version", [b"3\n"])
    zw.add(f"{archive}/.data/serialization_id", [b"0" * 40])
    zw.finish()
    offsets = {key: zw.data_at[f"{archive}/data/{key}"] for key in storages}
    return Created(path, f.tell(), offsets, zw.holes, zw.cd_at)


class _ZipWriter:
    """A minimal zip writer: stored members, data aligned (64 bytes by default), CRCs, zip64
    when needed."""

    def __init__(self, f: Any, align: int = _ALIGN, base: int = 0) -> None:
        self.f = f
        self.align = align
        self.base = base  # where the container starts in the file: its offsets count from here
        self.entries: list[tuple[bytes, int, int, int]] = []  # name, crc, size, header offset
        self.data_at: dict[str, tuple[int, int]] = {}  # member -> (data offset, size)
        self.holes: list[
            tuple[int, int, int, int]
        ] = []  # (header offset, data offset, size, entry index)
        self.cd_at: list[int] = []  # central directory entry offsets

    def add(self, name: str, chunks: Any, size: int | None = None, hole: bool = False) -> None:
        bname = name.encode()
        header_at = self.f.tell()
        base = header_at + 30 + len(bname)
        zip64 = size is not None and size >= 0xFFFFFFFF
        extra_fixed = 20 if zip64 else 0
        pad = (-(base + extra_fixed + 4)) % self.align
        extra = b""
        if zip64:
            extra += struct.pack("<HHQQ", 0x0001, 16, size, size)
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB" padding, as torch writes
        self.f.write(b"\0" * (30 + len(bname) + len(extra)))  # header, rewritten below
        crc = 0
        n = 0
        data_at = self.f.tell()
        if hole:  # pre-sized, filled later at known offsets; CRC fixed by finish_crcs
            assert size is not None
            self.f.seek(size, os.SEEK_CUR)
            n = size
            self.holes.append((header_at, data_at, size, len(self.entries)))
        else:
            for c in chunks:
                crc = zlib.crc32(c, crc)
                n += len(c)
                self.f.write(c)
        self.data_at[name] = (data_at, n)
        if size is not None and n != size:
            raise ValueError(f"{name}: wrote {n} bytes, expected {size}")
        end = self.f.tell()
        small = n < 0xFFFFFFFF
        self.f.seek(header_at)
        self.f.write(
            struct.pack(
                "<IHHHHHIIIHH",
                0x04034B50,
                45 if not small else 20,
                0,
                0,
                0,
                0x21,
                crc,
                n if small else 0xFFFFFFFF,
                n if small else 0xFFFFFFFF,
                len(bname),
                len(extra),
            )
        )
        self.f.write(bname)
        self.f.write(extra)
        self.f.seek(end)
        self.entries.append((bname, crc, n, header_at - self.base))

    def finish(self) -> None:
        cd_at = self.f.tell() - self.base
        for bname, crc, n, off in self.entries:
            self.cd_at.append(self.f.tell())
            big = n >= 0xFFFFFFFF or off >= 0xFFFFFFFF
            extra = b""
            if big:
                extra = struct.pack("<HHQQQ", 0x0001, 24, n, n, off)
            self.f.write(
                struct.pack(
                    "<IHHHHHHIIIHHHHHII",
                    0x02014B50,
                    45 if big else 20,
                    45 if big else 20,
                    0,
                    0,
                    0,
                    0x21,
                    crc,
                    0xFFFFFFFF if big else n,
                    0xFFFFFFFF if big else n,
                    len(bname),
                    len(extra),
                    0,
                    0,
                    0,
                    0,
                    0xFFFFFFFF if big else off,
                )
            )
            self.f.write(bname)
            self.f.write(extra)
        cd_end = self.f.tell() - self.base
        count = len(self.entries)
        cd_size = cd_end - cd_at
        if cd_at >= 0xFFFFFFFF or count >= 0xFFFF:
            self.f.write(
                struct.pack(
                    "<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, cd_size, cd_at
                )
            )
            self.f.write(struct.pack("<IIQI", 0x07064B50, 0, cd_end, 1))
            self.f.write(
                struct.pack(
                    "<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0
                )
            )
        else:
            self.f.write(
                struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, cd_size, cd_at, 0)
            )
