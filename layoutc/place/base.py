"""What every storage format answers about a layout: the shard map's interface.

A :class:`Placement` is the shard map of one layout in one format. For each stored tensor
and state (``weight`` — the tensor in its own dtype, ``master`` — the optimizer's
high-precision copy, each optimizer state, ``step``) it says which slices exist, how many
copies of each slice are stored, and for a range of a slice's elements which runs of which
stored buffers hold them. Per-rank detail is computed on demand, so a 65,536-rank layout
costs no more to describe than its arithmetic: counts are closed forms, lists are lazy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cached_property

from layoutc import ir
from layoutc.place.shards import MASTER, STEP, WEIGHT, RankSet, Run, Slice, StoredBuffer


class Placement:
    format: str = ""

    def __init__(self, layout: ir.Layout) -> None:
        self.layout = layout
        self.mesh = layout.mesh

    # -------------------------------------------------------------- tensors and states

    @cached_property
    def tensors(self) -> tuple[ir.Tensor, ...]:
        """Tensors with storage of their own: every declared tensor except tie aliases."""
        aliases = self.layout.tie_source
        return tuple(t for t in self.layout.tensors if t.name not in aliases)

    @cached_property
    def trainable(self) -> tuple[ir.Tensor, ...]:
        return tuple(t for t in self.tensors if t.trainable)

    def optimizer_states(self, t: ir.Tensor) -> tuple[str, ...]:
        opt = self.layout.optimizer
        if opt is None or not t.trainable:
            return ()
        out: list[str] = []
        if opt.master:
            out.append(MASTER)
        out.extend(opt.states)
        if opt.step:
            out.append(STEP)
        return tuple(out)

    def states(self, t: ir.Tensor) -> tuple[str, ...]:
        """States of ``t`` stored in this format."""
        return (WEIGHT, *self.optimizer_states(t))

    def dtype(self, t: ir.Tensor, state: str) -> str:
        opt = self.layout.optimizer
        if state == WEIGHT:
            return t.dtype
        if state == STEP:
            return "fp32"
        return (opt.master if opt and opt.master else None) or "fp32"

    # -------------------------------------------------------------- geometry

    def slices(self, t: ir.Tensor, state: str) -> tuple[Slice, ...]:
        raise NotImplementedError

    def copies(self, t: ir.Tensor, state: str) -> int:
        """How many stored copies each slice has (replicas over axes it is not split over)."""
        return 1

    def runs(self, t: ir.Tensor, state: str, sl: Slice, copy: int, lo: int, hi: int) -> list[Run]:
        """Where elements ``[lo, hi)`` of slice ``sl`` (row-major) are stored in copy ``copy``."""
        raise NotImplementedError

    def count_runs(
        self, t: ir.Tensor, state: str, sl: Slice, lo: int, hi: int, copy: int = 0
    ) -> int:
        """``len(runs(...))`` of copy ``copy`` without building them."""
        return len(self.runs(t, state, sl, copy, lo, hi))

    def count_runs_all(self, t: ir.Tensor, state: str, sl: Slice, lo: int, hi: int) -> int:
        """``count_runs`` summed over every copy (copies are cut alike unless a placement
        says otherwise)."""
        return self.count_runs(t, state, sl, lo, hi) * self.copies(t, state)

    def step_counters(self, t: ir.Tensor) -> list[tuple[object, Sequence[int]]]:
        """The step counters ``t``'s copies write, as ``(counter, copies)``: tensors naming
        the same counter share it (an optimizer group keeps one per file). By default
        each copy's runs name its counter; a placement whose counters follow its groups
        answers in closed form."""
        sl = self.slices(t, STEP)[0]
        out: list[tuple[object, Sequence[int]]] = []
        for c in range(self.copies(t, STEP)):
            runs = self.runs(t, STEP, sl, c, 0, 1)
            if runs:
                out.append((tuple((r.file, r.key) for r in runs), (c,)))
        return out

    # -------------------------------------------------------------- files

    def files(self) -> Iterator[str]:
        raise NotImplementedError

    def file_count(self) -> int:
        return sum(1 for _ in self.files())

    def files_holding(self, states: set[str]) -> int:
        """How many files hold any of ``states`` (what a plan reading them opens)."""
        files: set[str] = set()
        for t in self.tensors:
            for s in set(self.states(t)) & states:
                for sl in self.slices(t, s):
                    for c in range(self.copies(t, s)):
                        files.update(
                            r.file for r in self.runs(t, s, sl, c, 0, sl.numel if sl.shape else 1)
                        )
        return len(files)

    def buffers(self) -> Iterator[StoredBuffer]:
        """Every stored buffer that holds tensor data (for coverage checks)."""
        raise NotImplementedError

    def holders(self, file: str) -> RankSet:
        """The ranks that hold ``file`` (read it at load time). Topology-free formats are
        read by every rank."""
        return RankSet()

    def pads(self) -> Iterator[Run]:
        """Ranges of stored buffers that hold padding, not data: written as zeros."""
        return iter(())

    def state_bytes(self, t: ir.Tensor, state: str) -> int:
        """Bytes of one full copy of ``state`` of ``t`` (logical elements, no padding)."""
        numel = 1 if state == STEP else t.numel
        return numel * ir.DTYPE_BYTES[self.dtype(t, state)]

    def describe(self) -> str:
        return f"{self.format} ({self.layout.name}, {self.mesh.world} ranks)"
