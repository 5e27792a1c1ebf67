"""The executor: runs a plan's ops over stored buffers, in threads, within its budget.

A source or a target is a mapping ``{(file, key): 1-D buffer}`` whose buffers are numpy
arrays or file regions (:class:`~layoutc.runtime.fileio.Region`): a conversion maps the
checkpoint's files and the output's (:mod:`layoutc.conversion`); tests pass arrays
(:mod:`layoutc.runtime.memory`). :func:`execute` runs each unit's ops in order on the
worker the plan gave it, frees each buffer after its last use, holds the unit's declared
peak of the budget while it runs and records the peak of live bytes per unit. A read that
is only copied into a write streams from file to file through a small buffer
(:class:`_Pending`) instead of becoming an array.

It decides nothing: which replica is read, in which order, on which worker, what spills —
all of that is in the plan (:mod:`layoutc.plan`), and an op it cannot run as written (a
read or a write out of bounds) is an error, never repaired.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from layoutc.dtypes import np_dtype
from layoutc.place import Placement
from layoutc.place.shards import index
from layoutc.plan import ops as O
from layoutc.plan.plan import Plan
from layoutc.runtime.fileio import ALIGN, InTurn, Region
from layoutc.runtime.spill import Spill

Stored = dict[tuple[str, str], np.ndarray]  # buffers by (file, key)


def _cast(a: np.ndarray, dtype: str) -> np.ndarray:
    target = np_dtype(dtype)
    return a if a.dtype == target else a.astype(target)


@dataclass
class Result:
    stored: Stored
    peaks: dict[int, int] = field(default_factory=dict)  # unit id -> peak live bytes
    spill: Spill = field(default_factory=Spill)  # the swap files of spill units


def _last_uses(unit_ops: tuple[O.Op, ...]) -> dict[str, int]:
    last: dict[str, int] = {}
    for i, op in enumerate(unit_ops):
        for name in (*O.inputs(op), *O.outputs(op)):
            last[name] = i
    return last


def execute(
    plan: Plan,
    source: Mapping[tuple[str, str], np.ndarray],
    target: Placement | Mapping[tuple[str, str], np.ndarray],
    on_unit: Any = None,
    threads: int | None = None,
    spill: Spill | None = None,
    units: Any = None,
) -> Result:
    """Run ``plan`` over ``source`` buffers into ``target``: a placement (fresh arrays are
    made for its buffers) or a mapping of writable 1-D arrays (e.g. maps of output files).
    Spill units swap through ``spill`` (default: swap files in memory). ``units`` runs a
    subset of the plan's units (this rank's share under torch.distributed).

    Each of the plan's workers is a thread running its units in plan order (``threads=1``
    runs everything in one thread, in plan order). A unit holds its declared peak bytes of
    the plan's budget while it runs, so concurrent units never exceed the budget. Units
    write disjoint ranges (validation proves it), so threads need no other coordination.
    ``on_unit(unit)`` is called after each unit (progress), from the thread that ran it."""
    if isinstance(target, Placement):
        out: Any = {(b.file, b.key): np.zeros(b.numel, np_dtype(b.dtype)) for b in target.buffers()}
    else:
        out = target
    result = Result(out, spill=spill if spill is not None else Spill())
    budget = _Budget(plan.budget)
    lock = threading.Lock()

    def run_unit(unit: Any) -> None:
        unit_ops = plan.unit_ops(unit)
        last = _last_uses(unit_ops)
        live = _Live()
        peak = 0
        swap = result.spill
        with budget.hold(unit.stats.peak_bytes):
            for i, op in enumerate(unit_ops):
                _run(op, live, source, out, swap)
                peak = max(peak, sum(a.nbytes for a in live.values()))
                for name in [n for n in live if last.get(n, -1) <= i]:
                    del live[name]
        with lock:
            result.peaks[unit.id] = peak
            if on_unit is not None:
                on_unit(unit)

    todo = plan.units if units is None else units
    workers = plan.workers if threads is None else threads
    if workers <= 1:
        for unit in todo:
            run_unit(unit)
        return result
    queues: list[list[Any]] = [[] for _ in range(workers)]
    for unit in todo:
        queues[unit.worker % workers].append(unit)
    errors: list[BaseException] = []

    def worker(units: list[Any]) -> None:
        try:
            for unit in units:
                if errors:
                    return
                run_unit(unit)
        except BaseException as e:  # the first failure stops the others and is re-raised
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(q,), daemon=True) for q in queues if q]
    for t in pool:
        t.start()
    try:
        for t in pool:
            t.join()
    except BaseException as e:  # Ctrl-C: each worker stops after the unit it is in
        errors.append(e)
        for t in pool:
            t.join()
        raise
    if errors:
        raise errors[0]
    return result


class _Budget:
    """Bytes of the memory budget held by running units (a counting semaphore)."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.used = 0
        self.cond = threading.Condition()

    def hold(self, n: int) -> Any:
        @contextmanager
        def held() -> Any:
            if self.total is None:
                yield
                return
            want = min(n, self.total)
            with self.cond:
                self.cond.wait_for(lambda: self.used + want <= self.total)  # type: ignore[operator]
                self.used += want
            try:
                yield
            finally:
                with self.cond:
                    self.used -= want
                    self.cond.notify_all()

        return held()


class _Pending:
    """Runs of file elements not read yet, one after the other (a read, or a gather of
    reads). A write that only copies them streams them from file to file through a small
    buffer; anything else reads them into an array (:class:`_Live`)."""

    def __init__(self, runs: tuple[tuple[Region, int, int], ...], shape: tuple[int, ...]) -> None:
        self.runs = runs  # (region, first element, elements)
        self.shape = shape
        self.dtype = runs[0][0].dtype
        self.numel = sum(n for _, _, n in runs)
        self.nbytes = self.numel * self.dtype.itemsize

    def load(self) -> np.ndarray:
        parts = [region[lo : lo + n] for region, lo, n in self.runs]
        flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return flat.reshape(self.shape)

    def copy_to(self, dst: Region, dst_start: int, start: int, numel: int) -> None:
        """Elements ``[start, start + numel)`` of these into ``dst`` at element ``dst_start``.

        Staged in turn (:class:`~layoutc.runtime.fileio.InTurn`): each chunk is read into a
        buffer and checksummed here while the writes of the chunks before it run on writer
        threads. Each chunk lands in its buffer at the same offset within a page as in the
        output file, so the whole pages of a direct write leave from it without another
        copy."""
        size = self.dtype.itemsize
        at = dst_start * size
        with InTurn("write") as turns:
            for region, lo, n in self.runs:
                if start >= n:
                    start -= n
                    continue
                take = min(n - start, numel)
                src_at = region.offset + (lo + start) * size
                done, total = 0, take * size
                while done < total:
                    view = turns.next()
                    shift = (dst.offset + at) % ALIGN
                    chunk = view[shift : shift + min(len(view) - shift, total - done)]
                    got = os.preadv(region.fd, [chunk], src_at + done)
                    if got <= 0:
                        raise OSError(f"{region.path}: short read at byte {src_at + done}")
                    # The CRC here, while the chunk is in cache and the last one's write
                    # is in flight; the writer thread only writes. The same CRC checks
                    # the source against its own record of it.
                    crc = None
                    if dst.pieces is not None or region.reads is not None:
                        crc = zlib.crc32(chunk[:got])
                    if region.reads is not None and crc is not None:
                        region.reads.record(src_at + done, got, crc)
                    turns.submit(dst.write_bytes, at, chunk[:got], crc)
                    done += got
                    at += got
                numel -= take
                start = 0
                if not numel:
                    break


class _Live(dict[str, Any]):
    """A unit's live buffers by name; a pending region is read when first used as an array."""

    def __getitem__(self, name: str) -> Any:
        value = super().__getitem__(name)
        if isinstance(value, _Pending):
            value = value.load()
            self[name] = value
        return value

    def peek(self, name: str) -> Any:
        return super().__getitem__(name)


def _run(op: O.Op, live: _Live, source: Any, out: Any, swap: Spill) -> None:
    if isinstance(op, O.Read):
        buf = source[(op.file, op.key)]
        if op.offset < 0 or op.offset + op.numel > buf.size:
            raise IndexError(
                f"read {op.file}:{op.key}[{op.offset}:{op.offset + op.numel}] beyond {buf.size}"
            )
        if isinstance(buf, Region) and buf.dtype == np_dtype(op.dtype) and op.numel:
            live[op.out] = _Pending(((buf, op.offset, op.numel),), (op.numel,))
        else:  # arrays are read-only sources here, so a view needs no copy
            live[op.out] = _cast(buf[op.offset : op.offset + op.numel], op.dtype)
    elif isinstance(op, O.Gather):
        parts = [live.peek(p) for p in op.parts]
        if parts and all(isinstance(p, _Pending) and p.dtype == np_dtype(op.dtype) for p in parts):
            live[op.out] = _Pending(tuple(r for p in parts for r in p.runs), op.shape)
        else:
            if len(op.parts) == 1:  # one run: the read itself, no copy
                flat = live[op.parts[0]].reshape(-1)
            else:
                flat = (
                    np.concatenate([live[p].reshape(-1) for p in op.parts])
                    if op.parts
                    else np.zeros(0)
                )
            live[op.out] = _cast(flat, op.dtype).reshape(op.shape)
    elif isinstance(op, O.Merge):
        m = np.zeros(op.shape, np_dtype(op.dtype))
        for name, src_box, dst_box in op.copies:
            m[index(dst_box)] = live[name][index(src_box)]
        live[op.out] = m
    elif isinstance(op, O.Split):
        src = live[op.src]
        for name, shape, segs in op.outs:
            a = np.zeros(shape, np_dtype(op.dtype))
            for src_box, dst_box in segs:
                a[index(dst_box)] = src[index(src_box)]
            live[name] = a
    elif isinstance(op, O.Swap):
        if op.direction == "out":
            swap.write(op, live[op.buf])
        else:
            live[op.buf] = swap.read(op)
    elif isinstance(op, O.Write):
        dst = out[(op.file, op.key)]
        if op.offset < 0 or op.offset + op.numel > dst.size:
            raise IndexError(
                f"write {op.file}:{op.key}[{op.offset}:{op.offset + op.numel}] beyond {dst.size}"
            )
        src = live.peek(op.src) if op.src is not None else None
        if op.src is None:
            dst[op.offset : op.offset + op.numel] = 0
        elif (
            isinstance(src, _Pending)
            and isinstance(dst, Region)
            and src.dtype == dst.dtype == np_dtype(op.dtype)
        ):
            src.copy_to(dst, op.offset, op.src_offset, op.numel)
        else:
            data = live[op.src].reshape(-1)[op.src_offset : op.src_offset + op.numel]
            dst[op.offset : op.offset + op.numel] = _cast(data, op.dtype)
