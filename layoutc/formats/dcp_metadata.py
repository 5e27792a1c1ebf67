"""A PyTorch distributed checkpoint's ``.metadata``, read without running its pickle.

torch writes ``.metadata`` as a plain pickle of its ``Metadata`` dataclass and reads it with
``pickle.load``, so any code planted in it runs. Here an unpickler that knows only the
classes a clean file names — the dataclasses of ``torch.distributed.checkpoint.metadata``,
``_StorageInfo``, ``torch.Size``, torch dtypes and ``torch.serialization._get_layout``,
``pathlib`` paths — builds inert records of them; any other global is refused with
:class:`~layoutc.formats.pt.UnsafePickle`, naming the file and the global, before anything
is called. The records are then checked and turned into :class:`Metadata`: every tensor's
dtype, global shape and chunks (each inside the shape, none overlapping, together covering
it), every byte item, and where each item's bytes are (file, offset, length).

Without collectives each rank writes ``__R.metadata`` for its own items; :func:`read` joins
those when there is no ``.metadata``.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layoutc.errors import InputError
from layoutc.formats import pt
from layoutc.formats import safetensors_header as sth

METADATA = ".metadata"
HF_SHARDING = "DCP_SHARDING_INFO"  # the Hugging Face storage writer's header key
HF_NAMES = "shard-*-model-*-of-*.safetensors"  # its file names
MAX_BYTES = 1 << 31  # a .metadata larger than this is refused unread


class BadMetadata(InputError):
    """A ``.metadata`` file that is not what torch writes."""


@dataclass(frozen=True)
class Chunk:
    """One saved piece of a tensor: where it starts in the global tensor, and its size."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True)
class TensorEntry:
    fqn: str
    dtype: str  # layoutc's name (fp32, bf16, ...)
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class Item:
    """Where one saved item's bytes are: a file of the folder, an offset, a length."""

    file: str
    offset: int
    length: int


@dataclass
class Metadata:
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    byte_items: list[str] = field(default_factory=list)  # non-tensor state, in saved order
    items: dict[tuple[str, tuple[int, ...] | None], Item] = field(default_factory=dict)
    flat: dict[str, tuple[str | int, ...]] = field(default_factory=dict)  # key -> nested path
    version: str | None = None
    order: list[str] = field(default_factory=list)  # every key as saved

    def item(self, fqn: str, offsets: tuple[int, ...] | None) -> Item:
        return self.items[(fqn, offsets)]


# ------------------------------------------------------------------ the unpickler


class _Obj:
    """An inert record of an allowed class: its name, the arguments it was called with,
    and the state pickle's BUILD gave it."""

    def __init__(self, cls: str, args: tuple[Any, ...] = ()) -> None:
        self.cls = cls
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def get(self, name: str, default: Any = None) -> Any:
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict, slots)
        return state.get(name, default) if isinstance(state, dict) else default


def _record(qualname: str) -> type:
    def new(cls: type, *args: Any, **kwargs: Any) -> _Obj:
        return _Obj(qualname, tuple(args))

    return type(qualname.rsplit(".", 1)[-1], (), {"__new__": new})


_DCP = "torch.distributed.checkpoint"
_CLASSES = {
    q: _record(q)
    for q in (
        f"{_DCP}.metadata.Metadata",
        f"{_DCP}.metadata.TensorStorageMetadata",
        f"{_DCP}.metadata.BytesStorageMetadata",
        f"{_DCP}.metadata.ChunkStorageMetadata",
        f"{_DCP}.metadata.TensorProperties",
        f"{_DCP}.metadata.MetadataIndex",
        f"{_DCP}.metadata.StorageMeta",
        f"{_DCP}.metadata._MEM_FORMAT_ENCODING",
        f"{_DCP}.filesystem._StorageInfo",
    )
}


def _path(*parts: Any) -> str:
    return "/".join(str(p) for p in parts)


def _layout(name: Any) -> str:
    return str(name)


_FUNCTIONS: dict[tuple[str, str], Any] = {
    ("torch", "Size"): pt._size,
    ("torch.serialization", "_get_layout"): _layout,
    ("pathlib", "PosixPath"): _path,
    ("pathlib", "PurePosixPath"): _path,
    ("pathlib", "WindowsPath"): _path,
    ("pathlib", "PureWindowsPath"): _path,
    ("pathlib", "Path"): _path,
    ("collections", "OrderedDict"): OrderedDict,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: str) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _FUNCTIONS:
            return _FUNCTIONS[(module, name)]
        if module == "torch" and name in pt.TORCH_DTYPES:
            return pt.DType(name)
        qualname = f"{module}.{name}"
        if qualname in _CLASSES:
            return _CLASSES[qualname]
        raise pt.UnsafePickle(
            f"{self.path}: refusing to load the pickled global `{qualname}`: a distributed "
            "checkpoint's metadata names only torch's checkpoint metadata classes, sizes, "
            "dtypes and paths, and loading anything else could run code (torch's own "
            "dcp.load would run it)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise BadMetadata(f"{self.path}: a persistent id in its pickle ({pid!r:.80})")


# ------------------------------------------------------------------ checking


class _Checker:
    def __init__(self, path: str, budget: int) -> None:
        self.path = path
        self.budget = budget

    def spend(self, n: int = 1) -> None:
        self.budget -= n
        if self.budget < 0:
            raise BadMetadata(
                f"{self.path}: its pickle expands to far more entries than its size holds; "
                "it is crafted to blow up"
            )

    def fail(self, what: str) -> BadMetadata:
        return BadMetadata(f"{self.path}: {what}")

    def obj(self, v: Any, cls: str, where: str) -> _Obj:
        if not (isinstance(v, _Obj) and v.cls.endswith("." + cls)):
            raise self.fail(f"{where} is a {_kind(v)}, not a {cls}")
        return v

    def ints(self, v: Any, where: str) -> tuple[int, ...]:
        if not isinstance(v, tuple | list):
            raise self.fail(f"{where} is a {_kind(v)}, not a size")
        self.spend(len(v))
        if len(v) > pt.MAX_DIMS or not all(type(x) is int and x >= 0 for x in v):
            raise self.fail(f"{where} is not a list of at most {pt.MAX_DIMS} sizes ≥ 0: {v!r:.80}")
        return tuple(v)

    def str_(self, v: Any, where: str) -> str:
        if not isinstance(v, str):
            raise self.fail(f"{where} is a {_kind(v)}, not a string")
        return v

    def tensor(self, fqn: str, md: _Obj) -> TensorEntry:
        props = self.obj(md.get("properties"), "TensorProperties", f"{fqn}'s properties")
        state = props.state
        dtype_v = state[0] if isinstance(state, tuple) and state else props.get("dtype")
        if not isinstance(dtype_v, pt.DType) or dtype_v.layoutc is None:
            raise self.fail(f"{fqn} has dtype {dtype_v!r:.60}, which layoutc does not read")
        shape = self.ints(md.get("size"), f"{fqn}'s size")
        raw = md.get("chunks")
        if not isinstance(raw, list):
            raise self.fail(f"{fqn}'s chunks are a {_kind(raw)}, not a list")
        chunks = []
        for i, c in enumerate(raw):
            self.spend()
            c = self.obj(c, "ChunkStorageMetadata", f"chunk {i} of {fqn}")
            offsets = self.ints(c.get("offsets"), f"chunk {i} of {fqn}: offsets")
            sizes = self.ints(c.get("sizes"), f"chunk {i} of {fqn}: sizes")
            if len(offsets) != len(shape) or len(sizes) != len(shape):
                raise self.fail(
                    f"chunk {i} of {fqn} has {len(offsets)} offsets and {len(sizes)} sizes; "
                    f"the tensor has {len(shape)} dims"
                )
            if any(o + n > d for o, n, d in zip(offsets, sizes, shape, strict=True)):
                raise self.fail(
                    f"chunk {i} of {fqn} (offsets {list(offsets)}, sizes {list(sizes)}) reaches "
                    f"past the tensor's shape {list(shape)}"
                )
            chunks.append(Chunk(offsets, sizes))
        _check_cover(self, fqn, shape, chunks)
        return TensorEntry(fqn, dtype_v.layoutc, shape, tuple(chunks))


def _kind(v: Any) -> str:
    return v.cls.rsplit(".", 1)[-1] if isinstance(v, _Obj) else type(v).__name__


def _check_cover(c: _Checker, fqn: str, shape: tuple[int, ...], chunks: list[Chunk]) -> None:
    """The non-empty chunks of a tensor do not overlap and together hold every element."""
    full = [ch for ch in chunks if ch.numel]
    total = sum(ch.numel for ch in full)
    if total != math.prod(shape):
        raise c.fail(
            f"the chunks of {fqn} hold {total} elements; its shape {list(shape)} has "
            f"{math.prod(shape)}: some part is missing or saved twice"
        )
    rows = [ch for ch in full if ch.sizes[1:] == shape[1:]]
    if len(rows) == len(full):  # the common cut, along dim 0 only: sort and step
        rows.sort(key=lambda ch: ch.offsets[0] if ch.offsets else 0)
        for a, b in itertools.pairwise(rows):
            if a.offsets[0] + a.sizes[0] > b.offsets[0]:
                raise c.fail(f"two chunks of {fqn} overlap at row {b.offsets[0]}")
        return
    c.spend(len(full) * len(full))
    for i, a in enumerate(full):
        for b in full[i + 1 :]:
            if all(
                ao < bo + bn and bo < ao + an
                for ao, an, bo, bn in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)
            ):
                raise c.fail(
                    f"two chunks of {fqn} overlap (at offsets {list(a.offsets)} and "
                    f"{list(b.offsets)})"
                )


def parse(data: bytes, path: str) -> Metadata:
    """The metadata in ``data`` (the bytes of ``path``); see the module docstring."""
    try:
        root = _Unpickler(data, path).load()
    except (pt.UnsafePickle, BadMetadata):
        raise
    except Exception as e:
        raise BadMetadata(f"{path}: cannot read its pickle: {type(e).__name__}: {e}") from None
    c = _Checker(path, 10_000 + 2 * len(data))
    root = c.obj(root, "Metadata", "the pickled object")
    out = Metadata()
    sdm = root.get("state_dict_metadata")
    if not isinstance(sdm, dict):
        raise c.fail(f"its state_dict_metadata is a {_kind(sdm)}, not a dict")
    for fqn, md in sdm.items():
        c.spend()
        fqn = c.str_(fqn, "a state dict key")
        out.order.append(fqn)
        if isinstance(md, _Obj) and md.cls.endswith(".BytesStorageMetadata"):
            out.byte_items.append(fqn)
        else:
            out.tensors[fqn] = c.tensor(fqn, c.obj(md, "TensorStorageMetadata", fqn))
    storage = root.get("storage_data")
    if not isinstance(storage, dict):
        raise c.fail(f"its storage_data is a {_kind(storage)}, not a dict")
    for index, info in storage.items():
        c.spend()
        index = c.obj(index, "MetadataIndex", "a storage_data key")
        fqn = c.str_(index.get("fqn"), "a storage_data key's fqn")
        offset = index.get("offset")
        key = (fqn, None if offset is None else c.ints(offset, f"{fqn}'s storage offset"))
        info = c.obj(info, "_StorageInfo", f"the storage of {fqn}")
        if info.get("transform_descriptors"):
            raise c.fail(
                f"{fqn} is stored through transforms {info.get('transform_descriptors')!r:.80} "
                "(compressed or encoded), which layoutc does not read"
            )
        file = c.str_(info.get("relative_path"), f"the file of {fqn}")
        at, length = info.get("offset"), info.get("length")
        if not (type(at) is int and type(length) is int and at >= 0 and length >= 0):
            raise c.fail(f"{fqn} is stored at offset {at!r:.40}, length {length!r:.40}")
        out.items[key] = Item(file, at, length)
    planner = root.get("planner_data")
    if isinstance(planner, dict):
        for k, v in planner.items():
            c.spend()
            if isinstance(k, str) and isinstance(v, tuple | list):
                c.spend(len(v))
                out.flat[k] = tuple(p for p in v if isinstance(p, str | int))
    version = root.get("version")
    out.version = version if isinstance(version, str) else None
    _check_items(c, out)
    return out


def _check_items(c: _Checker, md: Metadata) -> None:
    """Every saved chunk and byte item has its bytes somewhere, and nothing else is named."""
    for fqn, t in md.tensors.items():
        for ch in t.chunks:
            if (fqn, ch.offsets) not in md.items:
                raise c.fail(f"the chunk of {fqn} at offsets {list(ch.offsets)} is stored nowhere")
    for fqn in md.byte_items:
        if (fqn, None) not in md.items:
            raise c.fail(f"the byte item {fqn} is stored nowhere")


def read(folder: Path) -> tuple[Metadata, list[str]]:
    """The metadata of the distributed checkpoint in ``folder`` and the metadata files it
    came from: ``.metadata``, else every ``__R.metadata`` joined, else the sharding the
    safetensors files of the Hugging Face storage writer record (:func:`read_hf`)."""
    files = [METADATA] if (folder / METADATA).is_file() else per_rank_files(folder)
    if not files:
        hf = read_hf(folder)
        if hf.items:
            return hf, []
        raise BadMetadata(f"{folder}: no .metadata (nor __R.metadata) file")
    parts = [parse(_read_bytes(folder / f), str(folder / f)) for f in files]
    return (parts[0] if len(parts) == 1 else _join(parts, folder)), files


def is_hf(folder: Path) -> bool:
    """Whether ``folder`` holds safetensors files of torch's Hugging Face storage writer
    (named ``shard-0000R-model-0000K-of-0000N.safetensors``, the DCP sharding
    :data:`HF_SHARDING` in their headers): the first such file's header decides."""
    for p in sorted(folder.glob(HF_NAMES)):
        try:
            return HF_SHARDING in sth.read_header(p)[1]
        except sth.SafetensorsError:
            return False
    return False


def read_hf(folder: Path) -> Metadata:
    """The metadata of a distributed checkpoint in torch's Hugging Face layout: in each
    safetensors file, every tensor is one chunk, where it starts in the global tensor
    recorded in the header's ``DCP_SHARDING_INFO`` (``{name: {"saved_offsets": [...]}}``);
    the global shape is where the chunks end. Checked like ``.metadata``: offsets for every
    tensor and dim, chunks that cover their tensor without overlapping."""
    md = Metadata()
    chunks: dict[str, list[Chunk]] = {}
    dtypes: dict[str, str] = {}
    c = _Checker(str(folder), 0)
    for path in sorted(folder.glob(HF_NAMES)):
        name = path.name
        try:
            entries, meta = sth.read_header(path)
        except sth.SafetensorsError:
            continue  # not the storage writer's
        if HF_SHARDING not in meta:
            continue
        md.version = meta.get("DCP_VERSION", md.version)
        try:
            info = json.loads(meta[HF_SHARDING])
        except ValueError:
            raise BadMetadata(f"{path}: {HF_SHARDING} in its header is not JSON") from None
        if not isinstance(info, dict):
            raise BadMetadata(f"{path}: {HF_SHARDING} in its header is not a JSON object")
        for key, e in entries.items():
            saved = info.get(key)
            offsets = saved.get("saved_offsets") if isinstance(saved, dict) else None
            if not (
                isinstance(offsets, list)
                and len(offsets) == len(e.shape)
                and all(type(o) is int and o >= 0 for o in offsets)
            ):
                raise BadMetadata(
                    f"{path}: {HF_SHARDING} gives {key} no saved_offsets of {len(e.shape)} "
                    "whole numbers (one per dim)"
                )
            if dtypes.setdefault(key, e.dtype) != e.dtype:
                raise BadMetadata(f"{path}: {key} is {e.dtype} here and {dtypes[key]} elsewhere")
            chunk = Chunk(tuple(offsets), e.shape)
            if (key, chunk.offsets) in md.items:
                raise BadMetadata(f"{path}: {key} at offsets {offsets} is saved twice")
            chunks.setdefault(key, []).append(chunk)
            md.items[(key, chunk.offsets)] = Item(name, e.begin, e.end - e.begin)
            if key not in md.flat:
                md.flat[key] = (key,)
                md.order.append(key)
        c.budget += 10_000 + len(entries) ** 2
    for key, cs in chunks.items():
        shape = tuple(
            max(ch.offsets[d] + ch.sizes[d] for ch in cs) for d in range(len(cs[0].sizes))
        )
        _check_cover(c, key, shape, cs)
        md.tensors[key] = TensorEntry(key, dtypes[key], shape, tuple(cs))
    return md


def per_rank_files(folder: Path) -> list[str]:
    found = []
    for p in folder.glob("__*.metadata"):
        rank = p.name[2 : -len(METADATA)]
        if rank.isdigit():
            found.append((int(rank), p.name))
    return [name for _, name in sorted(found)]


def _read_bytes(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise BadMetadata(f"{path}: {size} bytes, more than the {MAX_BYTES} layoutc reads")
    return path.read_bytes()


def _join(parts: list[Metadata], folder: Path) -> Metadata:
    """Per-rank metadata as one: each tensor's chunks from every rank."""
    out = Metadata(version=parts[0].version)
    chunks: dict[str, list[Chunk]] = {}
    for md in parts:
        for fqn in md.order:
            if fqn not in out.order:
                out.order.append(fqn)
        for fqn, t in md.tensors.items():
            have = out.tensors.setdefault(fqn, t)
            if (have.dtype, have.shape) != (t.dtype, t.shape):
                raise BadMetadata(
                    f"{folder}: {fqn} is {have.dtype} {list(have.shape)} in one rank's metadata "
                    f"and {t.dtype} {list(t.shape)} in another's"
                )
            seen = chunks.setdefault(fqn, [])
            seen.extend(ch for ch in t.chunks if ch not in seen)
        out.byte_items.extend(b for b in md.byte_items if b not in out.byte_items)
        out.items.update(md.items)
        out.flat.update(md.flat)
    c = _Checker(str(folder), 10_000 + sum(len(ch) for ch in chunks.values()) ** 2)
    for fqn, cs in chunks.items():
        _check_cover(c, fqn, out.tensors[fqn].shape, cs)
        t = out.tensors[fqn]
        out.tensors[fqn] = TensorEntry(fqn, t.dtype, t.shape, tuple(cs))
    return out


__all__ = ["METADATA", "BadMetadata", "Chunk", "Item", "Metadata", "TensorEntry", "parse", "read"]
