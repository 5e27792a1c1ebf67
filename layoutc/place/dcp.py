"""The shard map of a PyTorch distributed checkpoint (DCP, ``torch.distributed.checkpoint``).

A DCP folder holds, for each key of the saved state dict, the chunks of its global tensor
that the ranks saved (each chunk once: torch deduplicates replicas), every chunk an item
of some ``__R_N.distcp`` file. The layout says how a tensor is cut:

* ``zero 3 over dp`` is FSDP2 (``fully_shard``): every parameter (frozen ones included) is
  cut along dim 0 into ``|dp|`` pieces as ``torch.chunk`` cuts — ``ceil(n / |dp|)`` rows
  each, the last pieces shorter or empty — and the optimizer states with it; buffers are
  whole. Without ZeRO every tensor is one chunk.
* a dim split over a model axis (``H / tp``) is a tensor-parallel ``Shard(dim)``; FSDP then
  cuts each tensor-parallel slice's dim 0 further.

Keys: the weight of tensor ``NAME`` is ``<model prefix>NAME`` (``model.NAME`` by default,
as ``{"model": model_state_dict, "optim": optim_state_dict}`` saves it), an optimizer state
``<optimizer prefix>state.NAME.<state>``; ``store dcp { model "...", optimizer "..." }``
changes the prefixes. A trainable tensor stores its weight in the master's dtype when the
layout has a master (FSDP keeps the fp32 parameters; a 16-bit copy is a compute detail),
its optimizer states in the weight's dtype, and its step as an fp32 scalar.

A source's chunks lie where its metadata says (``index``: key and chunk offsets -> file);
a target's chunks are written by the rank that holds them, into ``__R_0.distcp``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import cached_property

from layoutc import ir
from layoutc.errors import Unsupported
from layoutc.place.base import Placement
from layoutc.place.shards import (
    MASTER,
    STEP,
    WEIGHT,
    Run,
    Slice,
    StoredBuffer,
    scalar_slice,
    slices_of,
)

Chunk = tuple[int, int, tuple[int, ...], int]  # rows [lo, hi) of a slice, global offsets, rank


def item_key(key: str, offsets: tuple[int, ...]) -> str:
    """How a chunk is named as a stored buffer: its state-dict key and global offsets."""
    return f"{key}@{','.join(map(str, offsets))}"


def parse_item_key(name: str) -> tuple[str, tuple[int, ...]]:
    key, _, offsets = name.rpartition("@")
    return key, tuple(int(x) for x in offsets.split(",")) if offsets else ()


def data_file(rank: int) -> str:
    return f"__{rank}_0.distcp"


class DcpPlacement(Placement):
    format = "dcp"

    def __init__(
        self, layout: ir.Layout, index: Mapping[tuple[str, tuple[int, ...]], str] | None = None
    ) -> None:
        super().__init__(layout)
        self.index = index  # (key, offsets) -> file, for a checkpoint on disk
        for t in self.tensors:
            for d in t.dims:
                if d.split and (d.fused or d.pad_to > 1 or d.grain):
                    raise Unsupported(
                        f"{layout.source}: {t.name} is split over {', '.join(d.split)} with "
                        "fused blocks, padding or grains; a distributed checkpoint stores "
                        "each saved piece as a box of the tensor, so declare it as a plain "
                        "split (N / tp)"
                    )

    # -------------------------------------------------------------- keys and dtypes

    def key(self, t: ir.Tensor, state: str) -> str:
        if state == WEIGHT:
            return self.weight_key(t.name)
        return f"{self.layout.store.optimizer_prefix}state.{t.name}.{state}"

    def weight_key(self, name: str) -> str:
        return self.layout.store.model_prefix + name

    def states(self, t: ir.Tensor) -> tuple[str, ...]:
        return (WEIGHT, *(s for s in self.optimizer_states(t) if s != MASTER))

    def dtype(self, t: ir.Tensor, state: str) -> str:
        if state == STEP:
            return "fp32"
        opt = self.layout.optimizer
        if t.trainable and opt is not None and opt.master:
            return opt.master
        return t.dtype

    # -------------------------------------------------------------- geometry

    @cached_property
    def fsdp_axes(self) -> tuple[str, ...]:
        z = self.layout.zero
        return z.axes if z.stage > 0 else ()

    def slices(self, t: ir.Tensor, state: str) -> tuple[Slice, ...]:
        if state == STEP:
            return (scalar_slice(),)
        return slices_of(t, self.mesh)

    def chunks(self, t: ir.Tensor, state: str, sl: Slice) -> list[Chunk]:
        """The saved pieces of slice ``sl``: rows ``[lo, hi)`` of its dim 0, their global
        offsets and the rank that writes them (the first holder); empty pieces are not
        saved."""
        return [c for c in self._pieces(t, state, sl) if c[1] > c[0]]

    def empty_chunks(self, t: ir.Tensor, state: str, sl: Slice) -> list[Chunk]:
        """The pieces of slice ``sl`` that FSDP's cut leaves empty: torch saves each as a
        chunk of no rows at the end of dim 0, an item of the rank holding it."""
        if not self._cut(t, state, sl):
            return []
        return [c for c in self._pieces(t, state, sl) if c[1] == c[0]]

    def _cut(self, t: ir.Tensor, state: str, sl: Slice) -> bool:
        """Whether FSDP cuts this slice (a parameter's or its states', not a step's)."""
        return bool(state != STEP and sl.shape and t.kind != ir.BUFFER and self.fsdp_axes)

    def _pieces(self, t: ir.Tensor, state: str, sl: Slice) -> list[Chunk]:
        """Every piece of slice ``sl``, as ``torch.chunk`` cuts its dim 0 over the FSDP
        axes (an empty one at ``lo = hi`` = the end of dim 0); one whole piece otherwise."""
        coords = dict(sl.coords)
        if state == STEP or not sl.shape:
            return [(0, 1, (), self.mesh.rank(coords))]
        origin = tuple(a for a, _ in sl.segments[0].logical) if sl.segments else ()
        n0 = sl.shape[0]
        if not self._cut(t, state, sl):
            return [(0, n0, origin, self.mesh.rank(coords))]
        parts = self.mesh.size(*self.fsdp_axes)
        each = -(-n0 // parts)
        out = []
        for p in range(parts):
            lo = min(p * each, n0)
            hi = min(lo + each, n0)
            at = {**coords, **self.mesh.unindex(self.fsdp_axes, p)}
            out.append((lo, hi, (origin[0] + lo, *origin[1:]), self.mesh.rank(at)))
        return out

    def file_of(self, key: str, offsets: tuple[int, ...], rank: int) -> str:
        if self.index is None:
            return data_file(rank)
        found = self.index.get((key, offsets))
        if found is None:
            raise KeyError(item_key(key, offsets))
        return found

    def runs(self, t: ir.Tensor, state: str, sl: Slice, copy: int, lo: int, hi: int) -> list[Run]:
        row = 1
        for n in sl.shape[1:]:
            row *= n
        key = self.key(t, state)
        dtype = self.dtype(t, state)
        out = []
        for a, b, offsets, rank in self.chunks(t, state, sl):
            first, last = max(lo, a * row), min(hi, b * row)
            if first < last:
                f = self.file_of(key, offsets, rank)
                out.append(
                    Run(f, item_key(key, offsets), first - a * row, first, last - first, dtype)
                )
        return out

    def buffers(self) -> Iterator[StoredBuffer]:
        for t in self.tensors:
            for s in self.states(t):
                key, dtype = self.key(t, s), self.dtype(t, s)
                for sl in self.slices(t, s):
                    for a, b, offsets, rank in self.chunks(t, s, sl):
                        shape = (b - a, *sl.shape[1:]) if sl.shape else ()
                        yield StoredBuffer(
                            self.file_of(key, offsets, rank), item_key(key, offsets), dtype, shape
                        )

    def files(self) -> Iterator[str]:
        seen: set[str] = set()
        for b in self.buffers():
            if b.file not in seen:
                seen.add(b.file)
                yield b.file

    def describe(self) -> str:
        fsdp = f", FSDP over {'×'.join(self.fsdp_axes)}" if self.fsdp_axes else ""
        return f"dcp ({self.layout.name}, {self.mesh.world} ranks{fsdp})"
