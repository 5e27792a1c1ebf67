"""The vocabulary of a shard map: slices, segments, runs and stored buffers.

Two sides meet here. A :class:`Slice` is what one model-parallel coordinate holds of a
tensor: a local tensor whose :class:`Segment` s are boxes of the logical tensor (fused
blocks give several, padding gives none). A :class:`Run` is where a contiguous range of a
slice's row-major elements lives: an element range of one stored buffer (a key inside a
file). ZeRO flat partitions are runs that cut across tensors; a replicated slice has
several copies, each a list of runs. Pure arithmetic; no torch, no IO.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from layoutc import ir

Box = tuple[tuple[int, int], ...]  # (start, stop) per dim


def index(box: Box) -> tuple[slice, ...]:
    """The index that cuts ``box`` out of an array: ``a[index(box)]``."""
    return tuple(slice(a, b) for a, b in box)


WEIGHT, MASTER, STEP = "weight", "master", "step"


@dataclass(frozen=True, slots=True)
class Segment:
    """A box of the logical tensor and the box of the local slice that holds it."""

    logical: Box
    local: Box

    @property
    def numel(self) -> int:
        return math.prod(b - a for a, b in self.local)


@dataclass(frozen=True, slots=True)
class Slice:
    """The local tensor held at one coordinate of the axes a tensor is split over."""

    coords: tuple[tuple[str, int], ...]
    shape: tuple[int, ...]
    segments: tuple[Segment, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def data_numel(self) -> int:
        """Elements that hold data (the rest is padding)."""
        return sum(s.numel for s in self.segments)

    def label(self) -> str:
        return ",".join(f"{a}{c}" for a, c in self.coords) or "full"


@dataclass(frozen=True, slots=True)
class RankSet:
    """Ranks whose coordinates match ``fixed``; axes not named range over all values."""

    fixed: tuple[tuple[str, int], ...] = ()

    def size(self, mesh: ir.Mesh) -> int:
        named = {a for a, _ in self.fixed}
        return math.prod(a.size for a in mesh.axes if a.name not in named)

    def __str__(self) -> str:
        return "{" + ", ".join(f"{a}={c}" for a, c in self.fixed) + "}" if self.fixed else "{all}"


@dataclass(frozen=True, slots=True)
class Run:
    """Slice elements ``[start, start + numel)`` stored at ``[offset, offset + numel)`` of a buffer."""

    file: str
    key: str
    offset: int
    start: int
    numel: int
    dtype: str


@dataclass(frozen=True, slots=True)
class StoredBuffer:
    """One tensor inside one file, as the format stores it (1-D view of ``numel`` elements)."""

    file: str
    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ir.DTYPE_BYTES[self.dtype]


def full_slice(shape: tuple[int, ...]) -> Slice:
    box = tuple((0, n) for n in shape)
    return Slice((), shape, (Segment(box, box),))


@lru_cache(maxsize=4096)
def tensor_slices(
    dims: tuple[ir.Dim, ...], mesh_sizes: tuple[tuple[str, int], ...]
) -> tuple[Slice, ...]:
    """Every slice of a tensor with these dims, in mixed-radix order of its split axes."""
    sizes = dict(mesh_sizes)
    axes = [a for d in dims for a in d.split]
    out = []
    for values in itertools.product(*(range(sizes[a]) for a in axes)):
        coords = dict(zip(axes, values, strict=True))
        parts = [d.part_of(coords, sizes) for d in dims]
        per_dim = [d.segments(p) for d, p in zip(dims, parts, strict=True)]
        shape = [d.local_at(p) for d, p in zip(dims, parts, strict=True)]
        segments = tuple(
            Segment(
                tuple((lo, lo + n) for lo, _, n in combo),
                tuple((lc, lc + n) for _, lc, n in combo),
            )
            for combo in itertools.product(*per_dim)
        )
        out.append(Slice(tuple(coords.items()), tuple(shape), segments))
    return tuple(out)


def slices_of(tensor: ir.Tensor, mesh: ir.Mesh) -> tuple[Slice, ...]:
    return tensor_slices(tensor.dims, tuple(mesh.sizes.items()))


def scalar_slice() -> Slice:
    return Slice((), (), (Segment((), ()),))


def iter_coords(mesh: ir.Mesh, axes: tuple[str, ...]) -> Iterator[dict[str, int]]:
    for values in itertools.product(*(range(mesh.sizes[a]) for a in axes)):
        yield dict(zip(axes, values, strict=True))


def box_ranges(shape: tuple[int, ...], box: Box) -> Iterator[tuple[int, int]]:
    """Row-major element ranges ``[lo, hi)`` of ``box`` inside a tensor of ``shape``.

    Trailing dims the box covers whole are merged, so a box of whole rows is one range."""
    nd = len(shape)
    if nd == 0:
        yield (0, 1)
        return
    if any(b <= a for a, b in box):
        return
    k = nd - 1
    while k > 0 and box[k] == (0, shape[k]):
        k -= 1
    inner = math.prod(shape[k + 1 :])
    strides = [math.prod(shape[i + 1 :]) for i in range(nd)]
    for idx in itertools.product(*(range(a, b) for a, b in box[:k])):
        base = sum(i * strides[d] for d, i in enumerate(idx))
        yield (base + box[k][0] * inner, base + box[k][1] * inner)


def _merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def pad_boxes(sl: Slice) -> list[Box]:
    """Disjoint boxes of a slice that hold padding (no segment covers them)."""
    nd = len(sl.shape)
    covered = [_merge([seg.local[d] for seg in sl.segments]) for d in range(nd)]
    out: list[Box] = []
    for d in range(nd):
        gaps, pos = [], 0
        for a, b in covered[d]:
            if a > pos:
                gaps.append((pos, a))
            pos = b
        if pos < sl.shape[d]:
            gaps.append((pos, sl.shape[d]))
        for gap in gaps:
            for head in itertools.product(*covered[:d]):
                out.append((*head, gap, *((0, n) for n in sl.shape[d + 1 :])))
    return out


def pad_ranges(sl: Slice) -> list[tuple[int, int]]:
    """Row-major element ranges of a slice that hold padding."""
    return [r for box in pad_boxes(sl) for r in box_ranges(sl.shape, box)]
