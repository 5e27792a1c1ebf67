"""The checked layout: facts only, no decisions.

A :class:`Layout` is what the checker produces from a ``.layout`` file: the mesh, every
tensor expanded (loops unrolled, templates and expressions evaluated) with its logical
shape, dtype and per-dim placement, the optimizer, the ZeRO stage, offload targets and the
storage format. It states what is true of a training job; the planner decides what to do.

Geometry of one dim. A dim is a sequence of *blocks* (one block for an ordinary dim;
several for a fused tensor such as QKV or gate/up). The dim may be padded to a multiple
(vocabulary padding) and split over mesh axes, major to minor. Splitting is block by
block: part ``c`` of a split dim holds, for each block in order, that block's ``c``-th
equal piece, followed by its share of the padding. A dim cut in *grains* (DeepSpeed's
AutoTP) is split unevenly instead: part ``c`` holds a contiguous run of whole grains, the
first parts one grain more than the rest, and the last part also the elements that fill no
whole grain; parts may be empty. Pure data; no torch, no IO.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from layoutc import dtypes
from layoutc.errors import NO_SPAN, Span

DTYPE_BYTES: dict[str, int] = dtypes.BYTES  # one table of dtypes: layoutc.dtypes
DTYPES = dtypes.NAMES

FORMATS = ("deepspeed", "universal", "safetensors", "torch", "dcp")  # stored, read and written

# Kinds of tensor entries.
PARAM, FROZEN, BUFFER = "param", "frozen", "buffer"


@dataclass(frozen=True, slots=True)
class Axis:
    name: str
    size: int


@dataclass(frozen=True)
class Mesh:
    """Named axes, slowest to fastest: rank = ((a0 * |a1|) + a1) * |a2| + a2 ..."""

    axes: tuple[Axis, ...]

    @cached_property
    def sizes(self) -> dict[str, int]:
        return {a.name: a.size for a in self.axes}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.axes)

    @property
    def world(self) -> int:
        return math.prod(a.size for a in self.axes)

    def size(self, *names: str) -> int:
        return math.prod(self.sizes[n] for n in names)

    def rank(self, coords: dict[str, int]) -> int:
        """Global rank of a full coordinate assignment."""
        r = 0
        for a in self.axes:
            r = r * a.size + coords.get(a.name, 0)
        return r

    def coords(self, rank: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in reversed(self.axes):
            out[a.name] = rank % a.size
            rank //= a.size
        return dict(reversed(list(out.items())))

    def index(self, axes: tuple[str, ...], coords: dict[str, int]) -> int:
        """Mixed-radix index of ``coords`` over ``axes`` (major to minor)."""
        r = 0
        for n in axes:
            r = r * self.sizes[n] + coords.get(n, 0)
        return r

    def unindex(self, axes: tuple[str, ...], index: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in reversed(axes):
            out[n] = index % self.sizes[n]
            index //= self.sizes[n]
        return {n: out[n] for n in axes}

    def to_dict(self) -> dict[str, int]:
        return {a.name: a.size for a in self.axes}


@dataclass(frozen=True, slots=True)
class Block:
    """One block of a (possibly fused) dim: a name (``q``) or None, and its logical size."""

    name: str | None
    size: int


@dataclass(frozen=True)
class Dim:
    blocks: tuple[Block, ...]
    split: tuple[str, ...] = ()  # mesh axes, major -> minor
    pad_to: int = 1  # padded size is a multiple of this
    parts: int = 1  # product of the split axes' sizes
    grain: int = 0  # > 0: split in whole grains of this many elements, unevenly

    @property
    def size(self) -> int:
        """Logical (unpadded) size."""
        return sum(b.size for b in self.blocks)

    @property
    def padded(self) -> int:
        return -(-self.size // self.pad_to) * self.pad_to

    @property
    def local(self) -> int:
        """Size of one part along this dim (what one rank holds); the largest part when the
        dim is cut in grains."""
        if self.grain:
            return max(self.local_at(p) for p in range(self.parts))
        return self.padded // self.parts

    @property
    def uneven(self) -> bool:
        return self.grain > 0 and len({self.local_at(p) for p in range(self.parts)}) > 1

    def part_of(self, coords: dict[str, int], sizes: dict[str, int]) -> int:
        """The part of this dim that the rank at ``coords`` holds (mixed radix over the
        split axes, major to minor; axes missing from ``coords`` count as 0)."""
        part = 0
        for a in self.split:
            part = part * sizes[a] + coords.get(a, 0)
        return part

    def bounds(self, part: int) -> tuple[int, int]:
        """``[lo, hi)`` of the (unpadded, unfused) dim that part ``part`` holds."""
        if not self.grain:
            lo = part * self.local
            return lo, max(lo, min(lo + self.local, self.size))
        count, rest = divmod(self.size, self.grain)
        each, more = divmod(count, self.parts)
        lo = (part * each + min(part, more)) * self.grain
        hi = lo + (each + (part < more)) * self.grain
        return lo, hi + (rest if part == self.parts - 1 else 0)

    def local_at(self, part: int) -> int:
        """Size of part ``part`` along this dim."""
        if not self.grain:
            return self.local
        lo, hi = self.bounds(part)
        return hi - lo

    @property
    def fused(self) -> bool:
        return len(self.blocks) > 1

    def segments(self, part: int) -> list[tuple[int, int, int]]:
        """Where part ``part`` of this dim comes from: ``(logical_start, local_start, length)``.

        Local positions not covered by any segment are padding (zero)."""
        if self.parts == 1 and self.pad_to == 1:
            return [(0, 0, self.size)]
        if self.fused:
            out: list[tuple[int, int, int]] = []
            logical = local = 0
            for b in self.blocks:
                piece = b.size // self.parts
                if piece:
                    out.append((logical + part * piece, local, piece))
                logical += b.size
                local += piece
            return out
        lo, hi = self.bounds(part)
        return [(lo, 0, hi - lo)] if hi > lo else []

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"size": self.size}
        if self.fused:
            d["blocks"] = [{"name": b.name, "size": b.size} for b in self.blocks]
        if self.pad_to != 1:
            d["pad_to"] = self.pad_to
            d["padded"] = self.padded
        if self.split:
            d["split"] = list(self.split)
            if self.grain:
                d["grain"] = self.grain
                d["local"] = [self.local_at(p) for p in range(self.parts)]
            else:
                d["local"] = self.local
        return d


@dataclass(frozen=True, slots=True)
class Expert:
    """A tensor of one expert of a mixture-of-experts layer: expert ``id`` of ``count``,
    the experts dealt out over mesh axis ``axis`` in equal runs (coordinate ``c`` holds
    experts ``c * count / |axis|`` up to the next run), as ``for e in 0..count over axis``
    declares them."""

    axis: str
    id: int
    count: int

    def coord(self, size: int) -> int:
        """The coordinate on ``axis`` (of ``size``) whose ranks hold this expert."""
        return self.id // (self.count // size)

    def local(self, size: int) -> int:
        """The expert's index among those its coordinate holds."""
        return self.id % (self.count // size)

    def to_dict(self) -> dict[str, Any]:
        return {"axis": self.axis, "id": self.id, "count": self.count}


@dataclass(frozen=True)
class Tensor:
    """One tensor of the model as declared: a parameter, a frozen parameter or a buffer."""

    name: str
    dims: tuple[Dim, ...]
    dtype: str
    kind: str = PARAM
    stage: int = 0
    group: str = "default"
    span: Span = field(default=NO_SPAN, compare=False)
    also: tuple[int, ...] = ()  # further pipeline stages holding a copy (DeepSpeed's tied layers)
    layer: int | None = None  # the layer whose file stores it (pipeline or MoE), if not its name's
    expert: Expert | None = None  # one expert's tensor, held only where its expert is
    # from: where a target's data comes from, (None, tensor) or (block, tensor) per block
    source: tuple[tuple[str | None, str], ...] = ()

    @property
    def stages(self) -> tuple[int, ...]:
        """Every pipeline stage holding this tensor: its own, then the others."""
        return (self.stage, *self.also)

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape: blocks fused, padding stripped, no split."""
        return tuple(d.size for d in self.dims)

    @property
    def padded_shape(self) -> tuple[int, ...]:
        return tuple(d.padded for d in self.dims)

    @property
    def local_shape(self) -> tuple[int, ...]:
        return tuple(d.local for d in self.dims)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def uneven(self) -> bool:
        """Some dim is cut in grains that do not share out equally: slices differ in shape."""
        return any(d.uneven for d in self.dims)

    def local_shape_at(self, coords: dict[str, int], sizes: dict[str, int]) -> tuple[int, ...]:
        """The shape of the slice held at ``coords`` (mesh axis sizes ``sizes``)."""
        return tuple(d.local_at(d.part_of(coords, sizes)) for d in self.dims)

    @property
    def local_numel(self) -> int:
        return math.prod(self.local_shape)

    @property
    def split_axes(self) -> tuple[str, ...]:
        """Mesh axes this tensor is split over, in dim order then major -> minor."""
        out: list[str] = []
        for d in self.dims:
            out.extend(d.split)
        return tuple(out)

    def sources(self) -> list[tuple[str, tuple[int, int, int] | None]]:
        """Where this tensor's data comes from when it is a plan's target: ``(tensor,
        None)`` for the whole (by default the tensor of its own name), or per named block
        of its fused dim ``(tensor, (dim, lo, hi))``, the block's range of that dim."""
        if not self.source:
            return [(self.name, None)]
        if self.source[0][0] is None:
            return [(self.source[0][1], None)]
        d = next(i for i, dim in enumerate(self.dims) if dim.fused)
        starts: dict[str | None, tuple[int, int]] = {}
        lo = 0
        for b in self.dims[d].blocks:
            starts[b.name] = (lo, lo + b.size)
            lo += b.size
        return [(name, (d, *starts[block])) for block, name in self.source]

    @property
    def pinned_axes(self) -> tuple[str, ...]:
        """Mesh axes on which only one coordinate holds this tensor (an expert's axis)."""
        return (self.expert.axis,) if self.expert else ()

    def pinned(self, sizes: dict[str, int]) -> dict[str, int]:
        """The coordinates that hold this tensor on its pinned axes."""
        e = self.expert
        return {e.axis: e.coord(sizes[e.axis])} if e else {}

    @property
    def trainable(self) -> bool:
        return self.kind == PARAM

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "dims": [d.to_dict() for d in self.dims],
            "dtype": self.dtype,
            "stage": self.stage,
            "group": self.group,
            **({"also_on_stages": list(self.also)} if self.also else {}),
            **({"layer": self.layer} if self.layer is not None else {}),
            **({"expert": self.expert.to_dict()} if self.expert else {}),
            **(
                {"from": [{"block": b, "tensor": n} for b, n in self.source]} if self.source else {}
            ),
        }


@dataclass(frozen=True)
class Optimizer:
    name: str = "adam"
    master: str | None = "fp32"
    states: tuple[str, ...] = ("exp_avg", "exp_avg_sq")
    step: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "master": self.master,
            "states": list(self.states),
            "step": self.step,
        }


@dataclass(frozen=True)
class Zero:
    """ZeRO stage and the mesh axes it partitions over (the data-parallel axes)."""

    stage: int = 0
    axes: tuple[str, ...] = ()
    sub_group_size: int = 1_000_000_000
    bf16_optimizer: bool = False
    round_robin: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "over": list(self.axes),
            "sub_group_size": self.sub_group_size,
            "bf16_optimizer": self.bf16_optimizer,
            "round_robin": self.round_robin,
        }


@dataclass(frozen=True)
class Offload:
    what: str  # "optimizer" | "params"
    device: str  # "cpu" | "nvme"
    path: str | None = None
    block_size: int = 1 << 20
    queue_depth: int = 8
    threads: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "device": self.device,
            "path": self.path,
            "block_size": self.block_size,
            "queue_depth": self.queue_depth,
            "threads": self.threads,
        }


MAX_TAG_BYTES = 255  # the longest file name Linux, macOS and Windows file systems all accept


def check_tag(tag: str) -> str | None:
    """What makes ``tag`` unusable as a checkpoint tag, or None if it is fine.

    A tag names one folder inside a checkpoint (DeepSpeed's ``global_step100``); the
    readers join it to the checkpoint folder and the writers to their output folder. So it
    must be a single path component: a ``/``, a ``\\``, ``.`` or ``..`` would reach outside
    that folder, a NUL ends the name early in the operating system; a `"` or a line break
    cannot be written in a layout's string (which has no escapes), so ``infer`` could not
    describe the checkpoint. The layout language (E137), the checkpoint readers and the
    writers all apply this one rule.
    """
    if not tag:
        return "is empty"
    for ch, name in (("/", "`/`"), ("\\", "`\\`"), ("\0", "a NUL character")):
        if ch in tag:
            return f"contains {name}"
    for ch, name in (('"', '`"`'), ("\n", "a line break"), ("\r", "a carriage return")):
        if ch in tag:  # a layout's string has no escapes: its tag could not be written
            return f"contains {name}, which a layout cannot write in its tag"
    if tag in (".", ".."):
        return (
            f"is `{tag}`, which means {'the folder itself' if tag == '.' else 'the parent folder'}"
        )
    size = len(tag.encode("utf-8", "surrogatepass"))
    if size > MAX_TAG_BYTES:
        return f"is {size} bytes long in UTF-8; a folder name has at most {MAX_TAG_BYTES}"
    return None


@dataclass(frozen=True)
class Store:
    format: str = "deepspeed"
    writers: int = 1
    max_shard_bytes: int = 5_000_000_000
    tag: str | None = None
    # `writers N` was written (not the default): a conversion's workers unless --workers.
    # Not compared: whether a value was spelt out does not change the store.
    writers_given: bool = field(default=False, compare=False)
    # dcp: the prefixes of the model's and the optimizer's keys in the checkpoint
    model_prefix: str = "model."
    optimizer_prefix: str = "optim."

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "writers": self.writers,
            "max_shard_bytes": self.max_shard_bytes,
            "tag": self.tag,
            **(
                {"model": self.model_prefix, "optimizer": self.optimizer_prefix}
                if self.format == "dcp"
                else {}
            ),
        }


@dataclass(frozen=True)
class Layout:
    name: str
    mesh: Mesh
    tensors: tuple[Tensor, ...]
    dtype: str = "fp32"
    ties: tuple[tuple[str, str], ...] = ()  # (alias, source)
    optimizer: Optimizer | None = None
    zero: Zero = Zero()
    pipeline: str | None = None  # the pipeline axis, if any
    offloads: tuple[Offload, ...] = ()
    store: Store = Store()
    groups: tuple[str, ...] = ("default",)
    source: str = field(default="<string>", compare=False)
    # what it was read from (lang.check.load_text): its text and the --set overrides
    text: str | None = field(default=None, compare=False, repr=False)
    overrides: tuple[tuple[str, int], ...] = field(default=(), compare=False, repr=False)

    @cached_property
    def by_name(self) -> dict[str, Tensor]:
        return {t.name: t for t in self.tensors}

    def tensor(self, name: str) -> Tensor:
        return self.by_name[name]

    @cached_property
    def tie_source(self) -> dict[str, str]:
        """alias -> source"""
        return dict(self.ties)

    @property
    def stages(self) -> int:
        return self.mesh.sizes[self.pipeline] if self.pipeline else 1

    @property
    def dp_axes(self) -> tuple[str, ...]:
        return self.zero.axes

    @cached_property
    def model_axes(self) -> tuple[str, ...]:
        """Model-parallel axes (tensor / expert parallel): axes some tensor is split over
        (or held at one coordinate of: an expert's), other than the ZeRO and pipeline axes. An axis no tensor is split over only holds
        replicas: it is data-parallel whether or not ZeRO partitions over it."""
        skip = {self.pipeline, *self.zero.axes}
        split = {a for t in self.tensors for a in (*t.split_axes, *t.pinned_axes)}
        return tuple(a for a in self.mesh.names if a not in skip and a in split)

    def experts_of(self, t: Tensor) -> tuple[str, int] | None:
        """(axis, expert count) of an expert's tensor: one expert dealt over an axis
        (DeepSpeed's native MoE), or all of a layer's experts stacked in dim 0 split over a
        ZeRO axis (AutoEP); None for any other tensor."""
        if t.expert is not None:
            return t.expert.axis, t.expert.count
        d0 = t.dims[0] if t.dims else None
        if d0 is not None and len(d0.split) == 1 and d0.split[0] in self.zero.axes:
            return d0.split[0], d0.size
        return None

    def params(self) -> Iterator[Tensor]:
        return (t for t in self.tensors if t.kind == PARAM)

    def with_store(self, store: Store) -> Layout:
        return replace(self, store=store)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.name,
            "version": 1,
            "mesh": self.mesh.to_dict(),
            "pipeline": self.pipeline,
            "dtype": self.dtype,
            "optimizer": self.optimizer.to_dict() if self.optimizer else None,
            "zero": self.zero.to_dict(),
            "offload": [o.to_dict() for o in self.offloads],
            "store": self.store.to_dict(),
            "groups": list(self.groups),
            "tensors": [t.to_dict() for t in self.tensors],
            "ties": [{"alias": a, "source": s} for a, s in self.ties],
        }
