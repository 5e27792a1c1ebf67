"""Spill files: the plan's ``swap`` ops, on disk or in memory.

A tensor whose slicing changes but which is too big to merge in memory (a ``spill`` unit)
goes through a swap file holding the whole logical tensor, row-major, in the file dtype:
each source slice is written out chunk by chunk to its logical positions, then each target
slice is read back chunk by chunk. :func:`runs` cuts one chunk of a slice into the runs of
consecutive elements that land consecutively in the logical tensor (whole rows when a
segment spans them), so a chunk moves with a few large IOs and no index arrays — memory
stays within the chunk the plan budgeted.

:class:`Spill` keeps the swap files in the swap tier — a
:class:`~layoutc.runtime.swap.SwapPool` under a folder, one pre-sized
:class:`~layoutc.runtime.swap.SwapFile` per spilled tensor, the folder removed on
:meth:`Spill.close` — or, with no folder, in memory (for plans run over in-memory buffers,
:mod:`layoutc.runtime.memory`).
:meth:`Spill.beside` chooses the folder and the pool's settings for a conversion: the
target layout's ``offload ... to nvme "DIR" { block, queue, threads }`` when it has one,
else a folder beside the output with the pool's defaults.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from layoutc import ir
from layoutc.dtypes import np_dtype
from layoutc.plan import ops as O
from layoutc.runtime.swap import SwapFile, SwapPool


def runs(op: O.Swap) -> Iterator[tuple[int, int, int]]:
    """``(offset in the chunk, logical flat offset, length)`` for the chunk's elements
    that a segment covers, in chunk order, adjacent runs merged."""
    shape = op.slice_shape
    a, b = op.start, op.start + op.numel
    if not shape:  # a scalar
        if a == 0 < b and op.segments:
            yield 0, 0, 1
        return
    last = shape[-1]
    if last == 0 or a >= b:
        return
    lstrides = _strides(op.logical_shape)
    pending: list[int] | None = None
    for r in range(a // last, (b - 1) // last + 1):
        m = _unravel(r, shape[:-1])
        c0, c1 = max(a - r * last, 0), min(b - r * last, last)
        row: list[tuple[int, int, int]] = []
        for lbox, gbox in op.segments:
            if any(not lo <= x < hi for x, (lo, hi) in zip(m, lbox[:-1], strict=True)):
                continue
            lo, hi = max(c0, lbox[-1][0]), min(c1, lbox[-1][1])
            if lo >= hi:
                continue
            logical = sum(
                (x - lb[0] + gb[0]) * st
                for x, lb, gb, st in zip(m, lbox[:-1], gbox[:-1], lstrides[:-1], strict=True)
            ) + (lo - lbox[-1][0] + gbox[-1][0])
            row.append((r * last + lo - a, logical, hi - lo))
        for run in sorted(row):
            if pending and pending[0] + pending[2] == run[0] and pending[1] + pending[2] == run[1]:
                pending[2] += run[2]
                continue
            if pending:
                yield pending[0], pending[1], pending[2]
            pending = list(run)
    if pending:
        yield pending[0], pending[1], pending[2]


def _strides(shape: tuple[int, ...]) -> list[int]:
    out = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        out[i] = out[i + 1] * shape[i + 1]
    return out


def _unravel(index: int, shape: tuple[int, ...]) -> list[int]:
    out = [0] * len(shape)
    for i in range(len(shape) - 1, -1, -1):
        index, out[i] = divmod(index, shape[i]) if shape[i] else (index, 0)
    return out


class Spill:
    """The swap files of one execution: in a swap pool under ``folder`` (made when the
    first tensor spills, with ``settings`` — ``block_size``, ``queue_depth``, ``threads``
    of :class:`~layoutc.runtime.swap.SwapPool`), or in memory when it is None."""

    def __init__(self, folder: str | os.PathLike[str] | None = None, **settings: int) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.settings = settings
        self.pool: SwapPool | None = None
        self.arrays: dict[str, np.ndarray] = {}  # in memory: path -> logical tensor (flat)
        self.files: dict[str, SwapFile] = {}
        self.lock = threading.Lock()  # units spill in parallel: one pool, one file each
        self.bytes_out = 0
        self.bytes_in = 0

    @classmethod
    def beside(cls, layout: ir.Layout, out: Path, suffix: str) -> Spill:
        """The spill of a conversion writing ``layout`` to ``out``: a folder
        ``<out name>.swap-<suffix>`` under the directory of the layout's ``offload ... to
        nvme`` (the optimizer's, else the params'), with its block size, queue depth and
        threads; without one, that folder beside ``out`` and the pool's defaults."""
        nvme = [o for o in layout.offloads if o.device == "nvme" and o.path]
        nvme.sort(key=lambda o: o.what != "optimizer")
        name = f"{out.name}.swap-{suffix}"
        if not nvme:
            return cls(out.with_name(name))
        o = nvme[0]
        return cls(
            Path(o.path) / name,  # type: ignore[arg-type]
            block_size=o.block_size,
            queue_depth=o.queue_depth,
            threads=o.threads,
        )

    def _file(self, op: O.Swap) -> Any:
        size = math.prod(op.logical_shape) if op.logical_shape else 1
        dtype = np_dtype(op.file_dtype)
        with self.lock:
            if self.folder is None:
                if op.path not in self.arrays:
                    self.arrays[op.path] = np.zeros(size, dtype)
                return self.arrays[op.path]
            if op.path not in self.files:
                if self.pool is None:
                    self.pool = SwapPool(self.folder, direct=False, **self.settings)
                name = op.path.replace("/", "_")
                self.files[op.path] = self.pool.file(name, size * dtype.itemsize)
            return self.files[op.path]

    def write(self, op: O.Swap, data: np.ndarray) -> None:
        """Swap out: the chunk ``data`` (``op.numel`` elements) to its logical places."""
        f = self._file(op)
        flat = np.ascontiguousarray(data.reshape(-1).astype(np_dtype(op.file_dtype), copy=False))
        item = flat.dtype.itemsize
        if isinstance(f, np.ndarray):
            for off, logical, n in runs(op):
                f[logical : logical + n] = flat[off : off + n]
                self.bytes_out += n * item
            return
        raw = flat.view(np.uint8).data
        self.bytes_out += f.write(
            (logical * item, raw[off * item : (off + n) * item]) for off, logical, n in runs(op)
        )

    def read(self, op: O.Swap) -> np.ndarray:
        """Swap in: the chunk's elements from their logical places (zero where no segment
        covers the slice), in ``op.dtype``."""
        f = self._file(op)
        buf = np.zeros(op.numel, np_dtype(op.file_dtype))
        item = buf.dtype.itemsize
        if isinstance(f, np.ndarray):
            for off, logical, n in runs(op):
                buf[off : off + n] = f[logical : logical + n]
                self.bytes_in += n * item
        else:
            raw = buf.view(np.uint8).data
            self.bytes_in += f.read(
                (logical * item, raw[off * item : (off + n) * item]) for off, logical, n in runs(op)
            )
        want = np_dtype(op.dtype)
        return buf if buf.dtype == want else buf.astype(want)

    @property
    def moved(self) -> int:
        """Bytes through the swap files so far, out and in."""
        return self.bytes_out + self.bytes_in

    def close(self) -> None:
        """Delete the swap files and their folder."""
        try:
            if self.pool is not None:
                self.pool.close()
        finally:
            self.pool = None
            self.files.clear()
            self.arrays.clear()
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)
