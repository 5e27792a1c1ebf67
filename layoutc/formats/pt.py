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
import mmap
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from layoutc.errors import LayoutcError
from layoutc.ir import DTYPE_BYTES
from layoutc.runtime.checksum import Pieces

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
ITEMSIZE: dict[str, int] = DTYPE_BYTES  # one table of dtype sizes: the IR's


class UnsafePickle(LayoutcError):
    """A checkpoint's pickle names a global layoutc will not load (it could run code)."""


class BadContainer(LayoutcError):
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
        from layoutc.runtime.memory import np_dtype

        data = (opener or _default_opener()).storage(self.storage)
        arr = np.frombuffer(data, dtype=np_dtype(self.dtype), count=self.storage.numel)
        item = arr.itemsize
        view = np.lib.stride_tricks.as_strided(
            arr[self.offset :], shape=self.shape, strides=tuple(s * item for s in self.stride)
        )
        return view

    def read_flat(self, lo: int, hi: int, opener: Opener | None = None) -> np.ndarray:
        """Elements ``[lo, hi)`` of the row-major flattening, without reading the rest."""
        if self.contiguous:
            from layoutc.runtime.memory import np_dtype

            data = (opener or _default_opener()).storage(self.storage)
            arr = np.frombuffer(data, dtype=np_dtype(self.dtype), count=self.storage.numel)
            return arr[self.offset + lo : self.offset + hi]
        return np.ascontiguousarray(self.numpy(opener)).reshape(-1)[lo:hi]


# ------------------------------------------------------------------ the allowlist


def _rebuild_tensor(
    storage: StorageRef, offset: int, size: Any, stride: Any, requires_grad: bool = False, *_: Any
) -> TensorRef:
    return TensorRef(
        storage,
        int(offset),
        tuple(int(x) for x in size),
        tuple(int(x) for x in stride),
        bool(requires_grad),
    )


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
        key = str(key)
        if key not in self.storages:
            self.storages[key] = StorageRef(
                self.path, f"{self.archive}/data/{key}", key, STORAGE_DTYPES[stype.name], int(numel)
            )
        return self.storages[key]


_RECORD_CLASSES = {q: _record_class(q) for q in DEEPSPEED_CLASSES}


# ------------------------------------------------------------------ opening files


class Opener:
    """Memory maps of container files and the data offsets of their members (cached)."""

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}
        self._offsets: dict[tuple[str, str], tuple[int, int]] = {}

    def _map(self, path: str) -> mmap.mmap:
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[path]

    def member(self, path: str, name: str) -> tuple[int, int]:
        """(data offset, size) of a stored member, read from its local header."""
        key = (path, name)
        if key not in self._offsets:
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise BadContainer(f"{path}: member {info.filename} is compressed")
                    m = self._map(path)
                    h = info.header_offset
                    if m[h : h + 4] != b"PK\x03\x04":
                        raise BadContainer(f"{path}: bad local header for {info.filename}")
                    name_len, extra_len = struct.unpack("<HH", m[h + 26 : h + 30])
                    self._offsets[(path, info.filename)] = (
                        h + 30 + name_len + extra_len,
                        info.file_size,
                    )
        if key not in self._offsets:
            raise BadContainer(f"{path}: no member {name}")
        return self._offsets[key]

    def storage(self, s: StorageRef) -> memoryview:
        offset, size = self.member(s.path, s.member)
        need = s.numel * ITEMSIZE[s.dtype]
        if size < need:
            raise BadContainer(f"{s.path}: storage {s.key} holds {size} bytes, {need} expected")
        return memoryview(self._map(s.path))[offset : offset + need]

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()


_OPENER: Opener | None = None


def _default_opener() -> Opener:
    global _OPENER
    if _OPENER is None:
        _OPENER = Opener()
    return _OPENER


def load(path: str | os.PathLike[str]) -> Any:
    """The object in a torch zip file, tensors as :class:`TensorRef` (no data read)."""
    path = str(path)
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise BadContainer(f"{path}: not a torch zip checkpoint ({e})") from None
    with z:
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            raise BadContainer(f"{path}: no data.pkl inside")
        archive = pkl[0].split("/", 1)[0]
        data = z.read(pkl[0])
    try:
        return _Unpickler(data, path, archive).load()
    except (UnsafePickle, BadContainer):
        raise
    except Exception as e:
        raise BadContainer(f"{path}: cannot read its pickle: {type(e).__name__}: {e}") from None


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
        elif isinstance(v, DType):
            self.global_("torch", v.name)
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

    def items(self, d: dict[Any, Any]) -> None:
        if d:
            self.w(b"(")
            for k, x in d.items():
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


def create(
    obj: Any, path: str | os.PathLike[str], archive: str | None = None, align: int = _ALIGN
) -> Created:
    """Write ``obj``; tensors whose ``data`` is None become pre-sized holes to fill later
    (then call :meth:`Created.finish_crcs`). Storage data starts at multiples of ``align``
    (torch's 64, or a page for direct IO; torch's loader takes any)."""
    path = Path(path)
    archive = archive or path.stem or "archive"
    pkl, storages = dumps_pickle(obj)
    with open(path, "wb") as f:
        zw = _ZipWriter(f, align)
        zw.add(f"{archive}/data.pkl", [pkl])
        zw.add(f"{archive}/.format_version", [b"1"])
        zw.add(f"{archive}/.storage_alignment", [str(align).encode()])
        zw.add(f"{archive}/byteorder", [b"little"])
        for key, t in storages.items():
            zw.add(f"{archive}/data/{key}", _chunks(t), size=t.nbytes, hole=t.data is None)
        zw.add(f"{archive}/version", [b"3\n"])
        zw.add(f"{archive}/.data/serialization_id", [b"0" * 40])
        zw.finish()
        size = f.tell()
    offsets = {key: zw.data_at[f"{archive}/data/{key}"] for key in storages}
    return Created(path, size, offsets, zw.holes, zw.cd_at)


class _ZipWriter:
    """A minimal zip writer: stored members, data aligned (64 bytes by default), CRCs, zip64
    when needed."""

    def __init__(self, f: Any, align: int = _ALIGN) -> None:
        self.f = f
        self.align = align
        self.entries: list[tuple[bytes, int, int, int]] = []  # name, crc, size, header offset
        self.data_at: dict[str, tuple[int, int]] = {}  # member -> (data offset, size)
        self.holes: list[
            tuple[int, int, int, int]
        ] = []  # (header offset, data offset, size, entry index)
        self.cd_at: list[int] = []  # central directory entry offsets

    def add(self, name: str, chunks: Any, size: int | None = None, hole: bool = False) -> None:
        import zlib

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
        self.entries.append((bname, crc, n, header_at))

    def finish(self) -> None:
        cd_at = self.f.tell()
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
        cd_end = self.f.tell()
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
