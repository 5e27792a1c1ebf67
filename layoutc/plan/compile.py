"""Compile two shard maps into a plan. The only place layoutc makes decisions.

For every state of every stored tensor of the target the planner picks a source (the same
state; else the fp32 master for an fp32 export; else a cast of the other copy; else zeros
for a fresh optimizer state, with a warning), then a mode:

* ``direct`` — source and target slice the tensor the same way: each slice is gathered
  from its source runs and written to its target runs, no merge.
* ``ram``    — slices are gathered, merged into the logical tensor, split into the target's
  slices and written.
* ``spill``  — the tensor does not fit the memory budget: source slices stream through the
  swap tier in chunks (swap out places each chunk in the logical tensor on disk), then the
  target slices stream back (swap in) and are written. Memory stays within the budget.
* ``fill``   — no source: zeros are written.

A last unit writes zeros over the target's padding (flat-buffer alignment, ZeRO-3 tails).
Replicated source data is read from one copy, chosen round-robin so reads spread across
files; replicated target data is written to every copy. Units are assigned to workers
largest-first onto the least-loaded worker (by bytes moved).
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property

from layoutc import ir
from layoutc.errors import Diagnostic, LayoutError, Unsupported, UsageError
from layoutc.place import Placement, place
from layoutc.place.full import WeightsPlacement
from layoutc.place.shards import MASTER, STEP, WEIGHT, Box, Slice, box_ranges
from layoutc.plan import ops as O
from layoutc.plan.layouts import target_layout
from layoutc.plan.plan import Endpoint, Plan, Stats, Unit

MIN_BUDGET = 2 * max(ir.DTYPE_BYTES.values())  # one element read and one converted


@dataclass(frozen=True)
class _Route:
    src: ir.Tensor
    dst: ir.Tensor
    state: str
    source_state: str | None
    src_dtype: str
    dst_dtype: str
    part: int = 0  # which of dst's sources (its `from` blocks)
    block: tuple[int, int, int] | None = None  # (dim, lo, hi) of dst that src fills

    @property
    def cast(self) -> str | None:
        if self.source_state is None or self.src_dtype == self.dst_dtype:
            return None
        return f"{self.src_dtype}->{self.dst_dtype}"


def _isz(dtype: str) -> int:
    return ir.DTYPE_BYTES[dtype]


def _row_len(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape[1:]:
        n *= s
    return n


def _data_rows(sl: Slice) -> list[tuple[int, int]]:
    """Local row intervals of a slice that hold data (merged)."""
    if not sl.shape:
        return [(0, 1)]
    out: list[tuple[int, int]] = []
    for a, b in sorted(seg.local[0] for seg in sl.segments):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _pad_rows(sl: Slice) -> list[tuple[int, int]]:
    """Element ranges of the rows of a slice that hold no data (padding rows)."""
    if not sl.shape:
        return []
    rl = _row_len(sl.shape)
    out, pos = [], 0
    for a, b in _data_rows(sl):
        if a > pos:
            out.append((pos * rl, a * rl))
        pos = b
    if pos < sl.shape[0]:
        out.append((pos * rl, sl.shape[0] * rl))
    return out


def _shift(box: Box, dim0: int) -> Box:
    if not box:
        return box
    return ((box[0][0] - dim0, box[0][1] - dim0), *box[1:])


def _block_boxes(d: Slice, block: tuple[int, int, int] | None) -> list[tuple[Box, Box]]:
    """The parts of slice ``d`` inside ``block`` (``dim, lo, hi`` of the target tensor), as
    (box of the slice, box of the block's own tensor)."""
    if block is None:
        return []
    dim, lo, hi = block
    out: list[tuple[Box, Box]] = []
    for seg in d.segments:
        a, b = seg.logical[dim]
        x, y = max(a, lo), min(b, hi)
        if x >= y:
            continue
        start = seg.local[dim][0] + x - a
        local = (*seg.local[:dim], (start, start + y - x), *seg.local[dim + 1 :])
        logical = (*seg.logical[:dim], (x - lo, y - lo), *seg.logical[dim + 1 :])
        out.append((local, logical))
    return out


def _ram_unit(
    uid: int,
    r: _Route,
    src: tuple[Slice, ...],
    route: str,
    counts: tuple[int, int, int],
    sizes: tuple[int, int, int],
) -> Unit:
    """A unit merging its source in memory: ``counts`` (reads, splits, writes) and ``sizes``
    (bytes read, bytes written, peak bytes)."""
    reads, splits, writes = counts
    read_bytes, write_bytes, peak = sizes
    stats = Stats(
        reads=reads,
        gathers=sum(len(_data_rows(s)) for s in src),
        merges=1,
        splits=splits,
        writes=writes,
        read_bytes=read_bytes,
        write_bytes=write_bytes,
        peak_bytes=peak,
    )
    return _routed(uid, r, "ram", stats, route)


def _routed(uid: int, r: _Route, mode: str, stats: Stats, route: str) -> Unit:
    """The unit moving route ``r`` in ``mode``."""
    return Unit(
        uid, r.dst.name, r.state, r.source_state, mode, stats, cast=r.cast, route=route, part=r.part
    )


def _same_geometry(a: tuple[Slice, ...], b: tuple[Slice, ...]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.segments == y.segments for x, y in zip(a, b, strict=True)
    )


def _pattern(file: str) -> str:
    """A file name with its rank numbers as ``*``: the name of all its peers."""
    return re.sub(r"(?<=_)\d+", "*", file)


class Compiler:
    def __init__(
        self, source: Placement, target: Placement, budget: int | None, workers: int
    ) -> None:
        self.S = source
        self.T = target
        if budget is not None and budget < MIN_BUDGET:
            raise UsageError(
                f"a memory budget of {budget} bytes is too small to move any tensor; give at least {MIN_BUDGET}"
            )
        self.budget = budget
        self.workers = max(1, workers)
        self._patterns: dict[int, dict[str, int]] = {}  # placement -> file name pattern -> files
        self.warnings: list[str] = []
        self.upcast_masters: list[tuple[str, str, str]] = []  # (tensor, from, to)

    # -------------------------------------------------------------- routes

    @cached_property
    def _step_copies(self) -> dict[str, tuple[int, ...]]:
        """The copies of the target's step counters each tensor writes. An optimizer group
        (a ZeRO-3 sub-group) keeps one counter per file, shared by its tensors, so each
        counter is written once, by the first tensor holding it. Groups need not line up
        across files: a tied layer's group spans its stages, and ZeRO-3 closes a sub-group
        by the size of each rank's slices, so with uneven grains two tensors can share a
        counter on one model-parallel rank and keep their own on another. Tensors holding
        most counters go first (those on more stages, then those with a slice on more
        ranks), which keeps step units few; tensors left no counter write none."""
        T = self.T
        held = {t.name: T.step_counters(t) for t in T.tensors if STEP in T.states(t)}
        size = {name: sum(len(c) for _, c in counters) for name, counters in held.items()}
        ranked = sorted(
            (t for t in T.tensors if t.name in held),
            key=lambda t: (-len(t.stages), -size[t.name]),
        )
        written: set[object] = set()
        out: dict[str, tuple[int, ...]] = {}
        for t in ranked:
            mine = tuple(c for k, copies in held[t.name] if k not in written for c in copies)
            written.update(k for k, _ in held[t.name])
            if mine:
                out[t.name] = mine
        return out

    def _dst_copies(self, t: ir.Tensor, state: str) -> Sequence[int]:
        """The target copies a unit writes: every copy, but of a step counter only those
        no earlier tensor of its group wrote."""
        if state == STEP:
            return self._step_copies.get(t.name, ())
        return range(self.T.copies(t, state))

    def _count_writes(self, t: ir.Tensor, state: str, sl: Slice, lo: int, hi: int) -> int:
        if state == STEP:  # the copies listed hold the counter: one run each
            return len(self._dst_copies(t, state))
        return self.T.count_runs_all(t, state, sl, lo, hi)

    def routes(self) -> list[_Route]:
        S, T = self.S, self.T
        diags: list[Diagnostic] = []
        out: list[_Route] = []
        fresh: dict[str, int] = {}
        for tt in T.tensors:
            for part, (wanted, block) in enumerate(tt.sources()):
                st = self._source_tensor(wanted)
                if st is None:
                    what = tt.name if wanted == tt.name else f"{tt.name} from {wanted}"
                    diags.append(
                        Diagnostic(
                            "E201",
                            f"the target declares {what}, which the source layout {S.layout.name} does not have",
                            tt.span,
                        )
                    )
                    continue
                shape = list(tt.shape)
                if block is not None:
                    shape[block[0]] = block[2] - block[1]
                if list(st.shape) != shape:
                    where = "" if block is None else f" (block of {tt.name} from {st.name})"
                    diags.append(
                        Diagnostic(
                            "E202",
                            f"{st.name} has shape {list(st.shape)} in {S.layout.name} but {shape} in {T.layout.name}{where}",
                            tt.span,
                        )
                    )
                    continue
                have = S.states(st)
                for state in T.states(tt):
                    if state == STEP and (tt.name not in self._step_copies or part):
                        continue  # one step per optimizer group in the target
                    ss = self._source_state(st, tt, state, have)
                    if ss is None:
                        fresh[state] = fresh.get(state, 0) + 1
                    out.append(
                        _Route(
                            st,
                            tt,
                            state,
                            ss,
                            S.dtype(st, ss) if ss else T.dtype(tt, state),
                            T.dtype(tt, state),
                            part,
                            block if state != STEP else None,
                        )
                    )
        if diags:
            raise LayoutError(diags)
        if self.upcast_masters:
            names = [n for n, _, _ in self.upcast_masters]
            kinds = sorted({f"{a} -> {b}" for _, a, b in self.upcast_masters})
            self.warnings.append(
                f"the source has no master copy of {len(names)} tensor(s) ("
                + ", ".join(names[:3])
                + (" ..." if len(names) > 3 else "")
                + f"): their masters are cast up from the weights ({', '.join(kinds)})"
            )
        for state, n in sorted(fresh.items()):
            what = "0" if state == STEP else "zeros"
            self.warnings.append(
                f"the source has no {state} for {n} tensor(s): the target gets a fresh {state} ({what})"
            )
        taken = {name for t in T.tensors for name, _ in t.sources()}
        dropped = [
            t.name for t in S.tensors if t.name not in taken and t.name not in T.layout.tie_source
        ]
        if dropped:
            self.warnings.append(
                f"{len(dropped)} source tensor(s) are not in the target and are not copied: "
                + ", ".join(dropped[:5])
                + (" ..." if len(dropped) > 5 else "")
            )
        return out

    def _source_tensor(self, name: str) -> ir.Tensor | None:
        """The source tensor of this name, or the one a tie of this name aliases."""
        stored = self._stored
        return stored.get(name) or stored.get(self.S.layout.tie_source.get(name, name))

    @cached_property
    def _stored(self) -> dict[str, ir.Tensor]:
        return {t.name: t for t in self.S.tensors}

    def _source_state(
        self, st: ir.Tensor, tt: ir.Tensor, state: str, have: tuple[str, ...]
    ) -> str | None:
        want = self.T.dtype(tt, state)
        if state == WEIGHT:
            keeps_master = MASTER in self.T.states(tt)
            if MASTER in have and self.S.dtype(st, MASTER) == want and not keeps_master:
                return MASTER  # export the fp32 master, not a cast of the 16-bit copy
            if (
                MASTER in have
                and WEIGHT in have
                and self.S.dtype(st, WEIGHT) != want
                and _isz(self.S.dtype(st, MASTER)) >= _isz(want)
            ):
                return MASTER  # weights in another dtype: the master rounded, as DeepSpeed does
            if WEIGHT in have:
                return WEIGHT
            return MASTER if MASTER in have else None
        if state == MASTER:
            if MASTER in have:
                return MASTER
            if WEIGHT in have:
                if _isz(self.S.dtype(st, WEIGHT)) < _isz(want):
                    self.upcast_masters.append((st.name, self.S.dtype(st, WEIGHT), want))
                return WEIGHT
            return None
        return state if state in have else None

    # -------------------------------------------------------------- units

    def units(self) -> list[Unit]:
        units = [self._unit(i, r) for i, r in enumerate(self.routes())]
        pad = self._pad_unit(len(units))
        if pad is not None:
            units.append(pad)
        return self._assign(units)

    def _copy(self, uid: int, t: ir.Tensor, state: str) -> int:
        """The source copy a unit reads (spread over the replicas)."""
        n = self.S.copies(t, state)
        if state == STEP and t.uneven:  # ranks whose slice is empty keep no step
            sl = self.S.slices(t, state)[0]
            held = [c for c in range(n) if self.S.runs(t, state, sl, c, 0, 1)]
            return held[uid % len(held)]
        return uid % n

    def _unit(self, uid: int, r: _Route) -> Unit:
        S, T = self.S, self.T
        dst = T.slices(r.dst, r.state)
        copies = len(self._dst_copies(r.dst, r.state))
        out_bytes = _isz(r.dst_dtype)
        write_bytes = sum(s.numel for s in dst) * copies * out_bytes
        writes = sum(self._count_writes(r.dst, r.state, s, 0, s.numel) for s in dst)
        where = self._where(T, r.dst, r.state, dst[0])
        if r.block is not None:  # one block of the target, from its own tensor
            boxes = [(d, _block_boxes(d, r.block)) for d in dst]
            ranges = [
                (d, rg) for d, bx in boxes for local, _ in bx for rg in box_ranges(d.shape, local)
            ]
            write_bytes = sum(b - a for _, (a, b) in ranges) * copies * out_bytes
            writes = sum(self._count_writes(r.dst, r.state, d, a, b) for d, (a, b) in ranges)
            where += f" (block from {r.src.name})"
        if r.source_state is None:
            stats = Stats(writes=writes, write_bytes=write_bytes)
            return Unit(
                uid,
                r.dst.name,
                r.state,
                None,
                "fill",
                stats,
                route=f"zeros -> {where}",
                part=r.part,
            )
        src = S.slices(r.src, r.source_state)
        in_bytes = _isz(r.src_dtype)
        reads = 0
        read_elems = 0
        for s in src:
            for a, b in _data_rows(s):
                rl = _row_len(s.shape)
                reads += S.count_runs(r.src, r.source_state, s, a * rl, b * rl)
                read_elems += (b - a) * rl
        read_bytes = read_elems * in_bytes
        came = self._where(S, r.src, r.source_state, src[0])
        route = f"{r.source_state}: {came} -> {where}"
        logical = r.src.numel if r.state != STEP else 1
        fits = self.budget is None
        if r.block is not None:
            io = (reads, writes, read_bytes, write_bytes)
            return self._block_unit(uid, r, (src, dst), route, io)
        if _same_geometry(src, dst):
            # slice by slice, in chunks that fit the budget: read, gather, write; no swap needed
            chunk = self._direct_chunk(r)
            reads = gathers = writes = largest = 0
            for sl, d in zip(src, dst, strict=True):
                for lo, hi in self._direct_ranges(sl, chunk):
                    reads += S.count_runs(r.src, r.source_state, sl, lo, hi)
                    writes += self._count_writes(r.dst, r.state, d, lo, hi)
                    gathers += 1
                    largest = max(largest, hi - lo)
                writes += sum(
                    self._count_writes(r.dst, r.state, d, lo, hi) for lo, hi in _pad_rows(d)
                )
            stats = Stats(
                reads=reads,
                gathers=gathers,
                writes=writes,
                read_bytes=read_bytes,
                write_bytes=write_bytes,
                peak_bytes=largest * (in_bytes + out_bytes),
            )
            return _routed(uid, r, "direct", stats, route)
        sum_src = sum(s.numel for s in src) * in_bytes
        max_src = max(s.numel for s in src) * in_bytes
        band = logical * out_bytes
        sum_dst = sum(s.numel for s in dst) * out_bytes
        peak = max(sum_src + max_src, sum_src + band, band + sum_dst)
        if fits or peak <= (self.budget or 0):
            return _ram_unit(
                uid, r, src, route, (reads, 1, writes), (read_bytes, write_bytes, peak)
            )
        return self._spill_unit(uid, r, src, dst, route, write_bytes, copies, peak)

    def _block_unit(
        self,
        uid: int,
        r: _Route,
        slices: tuple[tuple[Slice, ...], ...],
        route: str,
        io: tuple[int, ...],
    ) -> Unit:
        """A block of a target tensor from its own source tensor (``from (a: x, b: y)``):
        the source merged whole in memory, its block of each target slice written.
        ``slices``: (source slices, target slices); ``io``: (reads, writes, bytes read,
        bytes written)."""
        src, dst = slices
        reads, writes, read_bytes, write_bytes = io
        in_bytes, out_bytes = _isz(r.src_dtype), _isz(r.dst_dtype)
        peak = (
            sum(s.numel for s in src) * in_bytes
            + r.src.numel * out_bytes
            + sum(d.numel for d in dst) * out_bytes
        )
        if self.budget is not None and peak > self.budget:
            raise Unsupported(
                f"{r.dst.name} takes a block from {r.src.name}, which is assembled in memory: "
                f"{peak} bytes, over the {self.budget}-byte budget; give --memory {peak} or more"
            )
        splits = sum(1 for d in dst if _block_boxes(d, r.block))
        return _ram_unit(
            uid, r, src, route, (reads, splits, writes), (read_bytes, write_bytes, peak)
        )

    def _direct_chunk(self, r: _Route) -> int | None:
        """Elements per chunk of a direct copy: read and converted buffers must fit together."""
        if self.budget is None:
            return None
        return max(1, self.budget // (_isz(r.src_dtype) + _isz(r.dst_dtype)))

    def _direct_ranges(self, sl: Slice, chunk: int | None) -> list[tuple[int, int]]:
        rl = _row_len(sl.shape)
        out = []
        for a, b in _data_rows(sl):
            lo, hi = a * rl, b * rl
            out.extend([(lo, hi)] if chunk is None else self._chunks(lo, hi, chunk))
        return out

    def _chunk(self, r: _Route) -> int:
        assert self.budget is not None
        per = 2 * max(_isz(r.src_dtype), _isz(r.dst_dtype))
        return max(1, self.budget // per)

    def _chunks(self, lo: int, hi: int, chunk: int) -> list[tuple[int, int]]:
        return [(a, min(hi, a + chunk)) for a in range(lo, hi, chunk)]

    def _spill_unit(
        self,
        uid: int,
        r: _Route,
        src: tuple[Slice, ...],
        dst: tuple[Slice, ...],
        route: str,
        write_bytes: int,
        copies: int,
        need: int,
    ) -> Unit:
        S = self.S
        assert r.source_state is not None
        chunk = self._chunk(r)
        reads = gathers = swaps = writes = 0
        read_bytes = 0
        swap_bytes = 0
        for s in src:
            rl = _row_len(s.shape)
            for a, b in _data_rows(s):
                for lo, hi in self._chunks(a * rl, b * rl, chunk):
                    n = S.count_runs(r.src, r.source_state, s, lo, hi)
                    reads += n
                    gathers += 1 if n > 1 else 0
                    swaps += 1
                    read_bytes += (hi - lo) * _isz(r.src_dtype)
                    swap_bytes += (hi - lo) * _isz(r.dst_dtype)
        for s in dst:
            for lo, hi in self._chunks(0, s.numel, chunk):
                swaps += 1
                swap_bytes += (hi - lo) * _isz(r.dst_dtype)
                writes += self._count_writes(r.dst, r.state, s, lo, hi)
        peak = chunk * 2 * max(_isz(r.src_dtype), _isz(r.dst_dtype))
        self.warnings.append(
            f"{r.dst.name} {r.state}: merging its slices in memory needs {need} bytes, over the "
            f"{self.budget}-byte budget; it streams through the swap tier in chunks of {chunk} elements"
        )
        stats = Stats(
            reads=reads,
            gathers=gathers,
            swaps=swaps,
            writes=writes,
            read_bytes=read_bytes,
            write_bytes=write_bytes,
            swap_bytes=swap_bytes,
            peak_bytes=min(peak, self.budget or peak),
        )
        return _routed(uid, r, "spill", stats, route + " via swap")

    def _pad_unit(self, uid: int) -> Unit | None:
        count = numel = nbytes = 0
        for p in self.T.pads():
            count += 1
            numel += p.numel
            nbytes += p.numel * _isz(p.dtype)
        if not count:
            return None
        stats = Stats(writes=count, write_bytes=nbytes)
        return Unit(
            uid,
            "(padding)",
            "pad",
            None,
            "fill",
            stats,
            route=f"zeros -> {count} padding ranges of {self.T.format}",
        )

    def _of_pattern(self, placement: Placement, pattern: str) -> int:
        """How many of ``placement``'s files a name pattern (ranks as ``*``) stands for."""
        key = id(placement)
        if key not in self._patterns:
            counts: dict[str, int] = {}
            for f in placement.files():
                counts[_pattern(f)] = counts.get(_pattern(f), 0) + 1
            self._patterns[key] = counts
        return self._patterns[key].get(pattern, 0)

    def _where(self, placement: Placement, t: ir.Tensor, state: str, sl: Slice) -> str:
        """``4 slices (tp) in bf16_zero_pp_rank_*_mp_rank_*_optim_states.pt``: where a state
        lives (``whole, cut in 3 pieces over dp``: one slice in ZeRO's or FSDP's pieces)."""
        slices = placement.slices(t, state)
        runs = placement.runs(t, state, sl, 0, 0, sl.numel if sl.shape else 1)
        pattern = _pattern(runs[0].file) if runs else "?"
        axes = sorted({a for s in slices for a, _ in s.coords})
        if len(slices) > 1:
            what = f"{len(slices)} slices ({', '.join(axes)})"
        elif len(runs) > 1:  # one slice cut across files: ZeRO partitions, FSDP's chunks
            over = "×".join(placement.layout.zero.axes) or "files"
            what = f"whole, cut in {len(runs)} pieces over {over}"
        elif self._of_pattern(placement, pattern) > 1 and placement.copies(t, state) == 1:
            # in one file of many: one ZeRO partition (or one rank's chunk) holds it all
            return f"whole, all in {runs[0].file} (one of {pattern})"
        else:
            what = "whole"
        copies = placement.copies(t, state)
        if copies > 1:
            what += f" x{copies} copies"
        return f"{what} in {pattern}"

    def _assign(self, units: list[Unit]) -> list[Unit]:
        heap = [(0, w) for w in range(self.workers)]
        assigned: dict[int, int] = {}
        for u in sorted(units, key=lambda u: (-u.bytes, u.id)):
            load, w = heapq.heappop(heap)
            assigned[u.id] = w
            heapq.heappush(heap, (load + u.bytes, w))
        return [replace(u, worker=assigned[u.id]) for u in units]

    # -------------------------------------------------------------- ops

    def build(self, unit: Unit) -> tuple[O.Op, ...]:
        """The ops of one unit, regenerated deterministically from the placements."""
        b = _OpBuilder(unit.id)
        if unit.state == "pad":
            for p in self.T.pads():
                b.write(None, 0, p.file, p.key, p.offset, p.numel, p.dtype)
            return tuple(b.ops)
        tt = self.T.layout.by_name[unit.tensor]
        wanted, block = tt.sources()[unit.part]
        st = self._source_tensor(wanted)
        assert st is not None, wanted
        if unit.state == STEP:
            block = None
        dst_dtype = self.T.dtype(tt, unit.state)
        dst = self.T.slices(tt, unit.state)
        copies = self._dst_copies(tt, unit.state)
        if unit.mode == "fill":
            for s in dst:
                spans = (
                    [(0, s.numel if s.shape else 1)]
                    if block is None
                    else [
                        r for local, _ in _block_boxes(s, block) for r in box_ranges(s.shape, local)
                    ]
                )
                for lo, hi in spans:
                    for c in copies:
                        for run in self.T.runs(tt, unit.state, s, c, lo, hi):
                            b.write(None, 0, run.file, run.key, run.offset, run.numel, dst_dtype)
            return tuple(b.ops)
        ss = unit.source_state
        assert ss is not None
        src = self.S.slices(st, ss)
        src_dtype = self.S.dtype(st, ss)
        cast = f"{src_dtype}->{dst_dtype}" if src_dtype != dst_dtype else None
        copy = self._copy(unit.id, st, ss)
        if unit.mode == "spill":
            return self._build_spill(
                b, unit, st, tt, ss, src, dst, src_dtype, dst_dtype, cast, copy, copies
            )
        if unit.mode == "direct":
            # slice by slice, chunk by chunk: gathered, written to every copy, then dropped
            chunk = self._direct_chunk(_Route(st, tt, unit.state, ss, src_dtype, dst_dtype))
            for s, d in zip(src, dst, strict=True):
                for lo, hi in self._direct_ranges(s, chunk):
                    parts = [
                        b.read(run.file, run.key, run.offset, run.numel, src_dtype)
                        for run in self.S.runs(st, ss, s, copy, lo, hi)
                    ]
                    buf = b.gather(parts, (hi - lo,), dst_dtype, cast)
                    for c in copies:
                        for run in self.T.runs(tt, unit.state, d, c, lo, hi):
                            b.write(
                                buf,
                                run.start - lo,
                                run.file,
                                run.key,
                                run.offset,
                                run.numel,
                                dst_dtype,
                            )
                for lo, hi in _pad_rows(d):
                    for c in copies:
                        for run in self.T.runs(tt, unit.state, d, c, lo, hi):
                            b.write(None, 0, run.file, run.key, run.offset, run.numel, dst_dtype)
            return tuple(b.ops)
        regions: list[tuple[Slice, int, str]] = []  # (slice, first row, buffer)
        for s in src:
            rl = _row_len(s.shape)
            for a, bb in _data_rows(s):
                parts = [
                    b.read(run.file, run.key, run.offset, run.numel, src_dtype)
                    for run in self.S.runs(st, ss, s, copy, a * rl, bb * rl)
                ]
                shape = (bb - a, *s.shape[1:]) if s.shape else ()
                regions.append((s, a, b.gather(parts, shape, src_dtype, None)))
        # ram: merge into the logical tensor, split into the target slices
        copies_in: list[tuple[str, Box, Box]] = []
        for s, a, buf in regions:
            rows = _region_rows(s, a)
            for seg in s.segments:
                if not s.shape:
                    copies_in.append((buf, (), ()))
                    continue
                lo0, hi0 = seg.local[0]
                if lo0 >= a and hi0 <= a + rows:
                    copies_in.append((buf, _shift(seg.local, a), seg.logical))
        logical = b.merge(copies_in, st.shape if unit.state != STEP else (), dst_dtype, cast)
        if block is not None:  # one block of each target slice: write only its parts
            for d in dst:
                pieces = _block_boxes(d, block)
                if not pieces:
                    continue
                (piece,) = b.split(
                    logical, [(d.shape, tuple((lg, lc) for lc, lg in pieces))], dst_dtype
                )
                for local, _ in pieces:
                    for lo, hi in box_ranges(d.shape, local):
                        for c in copies:
                            for run in self.T.runs(tt, unit.state, d, c, lo, hi):
                                b.write(
                                    piece,
                                    run.start,
                                    run.file,
                                    run.key,
                                    run.offset,
                                    run.numel,
                                    dst_dtype,
                                )
            return tuple(b.ops)
        outs = []
        for d in dst:
            outs.append((d, tuple((seg.logical, seg.local) for seg in d.segments)))
        names = b.split(logical, [(d.shape, segs) for d, segs in outs], dst_dtype)
        for (d, _), name in zip(outs, names, strict=True):
            for c in copies:
                for run in self.T.runs(tt, unit.state, d, c, 0, d.numel if d.shape else 1):
                    b.write(name, run.start, run.file, run.key, run.offset, run.numel, dst_dtype)
        return tuple(b.ops)

    def _build_spill(
        self,
        b: _OpBuilder,
        unit: Unit,
        st: ir.Tensor,
        tt: ir.Tensor,
        ss: str,
        src: tuple[Slice, ...],
        dst: tuple[Slice, ...],
        src_dtype: str,
        dst_dtype: str,
        cast: str | None,
        copy: int,
        copies: Sequence[int],
    ) -> tuple[O.Op, ...]:
        chunk = self._chunk(_Route(st, tt, unit.state, ss, src_dtype, dst_dtype))
        path = f"swap/u{unit.id}"
        shape = st.shape if unit.state != STEP else ()
        for s in src:
            rl = _row_len(s.shape)
            segs = tuple((seg.local, seg.logical) for seg in s.segments)
            for a, bb in _data_rows(s):
                for lo, hi in self._chunks(a * rl, bb * rl, chunk):
                    parts = [
                        b.read(run.file, run.key, run.offset, run.numel, src_dtype)
                        for run in self.S.runs(st, ss, s, copy, lo, hi)
                    ]
                    buf = (
                        parts[0]
                        if len(parts) == 1
                        else b.gather(parts, (hi - lo,), src_dtype, None)
                    )
                    b.swap(
                        buf,
                        "out",
                        path,
                        s.shape,
                        segs,
                        shape,
                        lo,
                        hi - lo,
                        src_dtype,
                        dst_dtype,
                        cast,
                    )
        for d in dst:
            segs = tuple((seg.local, seg.logical) for seg in d.segments)
            for lo, hi in self._chunks(0, d.numel, chunk):
                buf = b.swap(
                    None, "in", path, d.shape, segs, shape, lo, hi - lo, dst_dtype, dst_dtype, None
                )
                for c in copies:
                    for run in self.T.runs(tt, unit.state, d, c, lo, hi):
                        b.write(
                            buf, run.start - lo, run.file, run.key, run.offset, run.numel, dst_dtype
                        )
        return tuple(b.ops)


def _region_rows(s: Slice, a: int) -> int:
    for lo, hi in _data_rows(s):
        if lo == a:
            return hi - lo
    raise AssertionError((s, a))  # pragma: no cover


class _OpBuilder:
    def __init__(self, unit: int) -> None:
        self.unit = unit
        self.ops: list[O.Op] = []
        self.n = 0

    def _name(self, prefix: str) -> str:
        self.n += 1
        return f"u{self.unit}.{prefix}{self.n}"

    def read(self, file: str, key: str, offset: int, numel: int, dtype: str) -> str:
        out = self._name("r")
        self.ops.append(O.Read(len(self.ops), out, file, key, offset, numel, dtype))
        return out

    def gather(self, parts: list[str], shape: tuple[int, ...], dtype: str, cast: str | None) -> str:
        out = self._name("g")
        self.ops.append(O.Gather(len(self.ops), out, tuple(parts), shape, dtype, cast))
        return out

    def merge(
        self,
        copies: list[tuple[str, Box, Box]],
        shape: tuple[int, ...],
        dtype: str,
        cast: str | None,
    ) -> str:
        out = self._name("m")
        self.ops.append(O.Merge(len(self.ops), out, tuple(copies), shape, dtype, cast))
        return out

    def split(
        self, src: str, outs: list[tuple[tuple[int, ...], tuple[tuple[Box, Box], ...]]], dtype: str
    ) -> list[str]:
        names = [self._name("s") for _ in outs]
        self.ops.append(
            O.Split(
                len(self.ops),
                src,
                tuple((n, shape, segs) for n, (shape, segs) in zip(names, outs, strict=True)),
                dtype,
            )
        )
        return names

    def swap(
        self,
        buf: str | None,
        direction: str,
        path: str,
        slice_shape: tuple[int, ...],
        segments: tuple[tuple[Box, Box], ...],
        logical_shape: tuple[int, ...],
        start: int,
        numel: int,
        dtype: str,
        file_dtype: str,
        cast: str | None,
    ) -> str:
        name = buf if buf is not None else self._name("w")
        self.ops.append(
            O.Swap(
                len(self.ops),
                name,
                direction,
                path,
                slice_shape,
                segments,
                logical_shape,
                start,
                numel,
                dtype,
                file_dtype,
                cast,
            )
        )
        return name

    def write(
        self,
        src: str | None,
        src_offset: int,
        file: str,
        key: str,
        offset: int,
        numel: int,
        dtype: str,
    ) -> None:
        self.ops.append(O.Write(len(self.ops), src, src_offset, file, key, offset, numel, dtype))


def compile_plan(
    source: ir.Layout | Placement,
    target: ir.Layout | str,
    *,
    memory: int | None = None,
    workers: int = 1,
    ranks: int = 1,
    tag: str | None = None,
) -> Plan:
    """Plan moving a checkpoint stored as ``source`` into ``target`` (a layout or a format
    name). ``source`` may be a placement of its own (files as they are, e.g. full weights).
    ``ranks`` processes run the plan (torchrun's world), each with ``workers`` threads and
    a ``memory`` budget of its own; ``tag``: the source's DeepSpeed tag, which a DeepSpeed
    or universal output keeps (else the target's; full weights have none: ``global_step0``;
    else the executor takes the name of the folder it reads)."""
    S = source if isinstance(source, Placement) else place(source)
    tgt = target_layout(S.layout, target)
    T = place(tgt)
    ranks = max(1, ranks)
    c = Compiler(S, T, memory, max(1, workers) * ranks)
    units = c.units()
    warnings = list(c.warnings)
    if isinstance(S, WeightsPlacement) and T.format == "deepspeed":
        warnings.append(
            "the weights carry no run state: the checkpoint starts at step 0 with no lr "
            "scheduler state; an engine with an lr scheduler loads it with "
            "load_checkpoint(OUT, load_lr_scheduler_states=False)"
        )

    def endpoint(p: Placement, files: int) -> Endpoint:
        return Endpoint(p.layout.name, p.format, p.mesh.world, files, tuple(p.mesh.sizes.items()))

    read_states = {u.source_state for u in units if u.source_state is not None}
    return Plan(
        endpoint(S, S.files_holding(read_states)),
        endpoint(T, T.file_count()),
        tuple(units),
        c.workers,
        memory,
        tuple(warnings),
        ranks,
        tag or T.layout.store.tag or ("global_step0" if isinstance(S, WeightsPlacement) else None),
        builder=c.build,
        source_placement=S,
        target_placement=T,
    )
