"""Runs of elements in files, read and written with ``pread`` / ``pwrite``.

A :class:`Region` looks to the executor like a 1-D array (``size``, slicing to read,
slice assignment to write), but nothing stays mapped: a read returns a fresh array of just
the elements asked for and a write goes straight to the file at its offset. So a
conversion's memory holds what its running units read — the plan's budget — and not the
pages of every file it touched. Offsets are explicit, so threads share file descriptors.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


class Region:
    def __init__(self, fd: int, offset: int, numel: int, dtype: np.dtype, path: str = "") -> None:
        self.fd = fd
        self.offset = offset
        self.size = numel
        self.dtype = dtype
        self.path = path

    def _range(self, s: slice) -> tuple[int, int]:
        lo, hi, step = s.indices(self.size)
        if step != 1:
            raise ValueError("regions are read and written in contiguous ranges")
        return lo, max(lo, hi)

    def __getitem__(self, s: slice) -> np.ndarray:
        lo, hi = self._range(s)
        out = np.empty(hi - lo, self.dtype)
        raw = out.view(np.uint8)
        pos, want = 0, raw.size
        while pos < want:
            n = os.preadv(self.fd, [raw[pos:].data], self.offset + lo * self.dtype.itemsize + pos)
            if n <= 0:
                raise OSError(
                    f"{self.path}: short read at byte {self.offset + lo * self.dtype.itemsize + pos}"
                )
            pos += n
        return out

    def __setitem__(self, s: slice, value: Any) -> None:
        lo, hi = self._range(s)
        if np.isscalar(value):
            data = np.full(hi - lo, value, self.dtype)
        else:
            data = np.ascontiguousarray(np.asarray(value, self.dtype).reshape(-1))
        if data.size != hi - lo:
            raise ValueError(f"{self.path}: writing {data.size} elements into a range of {hi - lo}")
        raw = data.view(np.uint8).data
        pos = 0
        start = self.offset + lo * self.dtype.itemsize
        while pos < len(raw):
            pos += os.pwrite(self.fd, raw[pos:], start + pos)


class Files:
    """Open file descriptors, shared by the regions of one conversion; closed together."""

    def __init__(self, mode: int = os.O_RDONLY) -> None:
        self.mode = mode
        self.fds: dict[str, int] = {}

    def fd(self, path: str) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, self.mode)
        return self.fds[path]

    def region(self, path: str, offset: int, numel: int, dtype: np.dtype) -> Region:
        return Region(self.fd(path), offset, numel, dtype, path)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
