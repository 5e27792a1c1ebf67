"""Runs of elements in files, read and written with ``pread`` / ``pwrite``.

A :class:`Region` looks to the executor like a 1-D array (``size``, slicing to read,
slice assignment to write), but nothing stays mapped: a read returns a fresh array of just
the elements asked for and a write goes straight to the file at its offset. So a
conversion's memory holds what its running units read — the plan's budget — and not the
pages of every file it touched. Offsets are explicit, so threads share file descriptors.

Every write records the CRC-32 of its bytes (:class:`~layoutc.runtime.checksum.Pieces`),
so checksums of the output never need a second pass over it, and on Linux starts the
writeback of its pages (``sync_file_range``), so the disk writes while the next piece is
copied and the final ``fsync`` finds little left to do.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from layoutc.runtime.checksum import Pieces


class Region:
    def __init__(
        self,
        fd: int,
        offset: int,
        numel: int,
        dtype: np.dtype,
        path: str = "",
        pieces: Pieces | None = None,
    ) -> None:
        self.fd = fd
        self.offset = offset
        self.size = numel
        self.dtype = dtype
        self.path = path
        self.pieces = pieces

    def _range(self, s: slice) -> tuple[int, int]:
        lo, hi, step = s.indices(self.size)
        if step != 1:
            raise ValueError("regions are read and written in contiguous ranges")
        return lo, max(lo, hi)

    def __getitem__(self, s: slice) -> np.ndarray:
        lo, hi = self._range(s)
        out = np.empty(hi - lo, self.dtype)
        pread_all(
            self.fd, out.view(np.uint8).data, self.offset + lo * self.dtype.itemsize, self.path
        )
        return out

    def __setitem__(self, s: slice, value: Any) -> None:
        lo, hi = self._range(s)
        if np.isscalar(value):
            data = np.full(hi - lo, value, self.dtype)
        else:
            data = np.ascontiguousarray(np.asarray(value, self.dtype).reshape(-1))
        if data.size != hi - lo:
            raise ValueError(f"{self.path}: writing {data.size} elements into a range of {hi - lo}")
        self.write_bytes(lo * self.dtype.itemsize, data.view(np.uint8).data)

    def write_bytes(self, at: int, raw: memoryview) -> None:
        """Write ``raw`` at byte ``at`` of the region (recording its CRC)."""
        start = self.offset + at
        if self.pieces is not None:
            self.pieces.add(start, raw)
        pwrite_all(self.fd, raw, start)
        start_writeback(self.fd, start, len(raw))


def pread_all(fd: int, buf: memoryview, at: int, name: str = "") -> None:
    """Fill ``buf`` from byte ``at`` of ``fd``; a file that ends first is an error."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], at + done)
        if n <= 0:
            raise OSError(f"{name or 'file'}: short read at byte {at + done}")
        done += n


def pwrite_all(fd: int, data: memoryview, at: int) -> None:
    """Write all of ``data`` at byte ``at`` of ``fd``."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], at + done)


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_file_range() -> Any:
    try:
        import ctypes

        f = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return f


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing these bytes to disk now, without waiting for them."""
    if _SYNC_FILE_RANGE is not None and length:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class Files:
    """Open file descriptors, shared by the regions of one conversion; closed together."""

    def __init__(self, mode: int = os.O_RDONLY) -> None:
        self.mode = mode
        self.fds: dict[str, int] = {}
        self.pieces: dict[str, Pieces] = {}  # what was written, per file (write mode)

    def fd(self, path: str) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, self.mode)
        return self.fds[path]

    def region(self, path: str, offset: int, numel: int, dtype: np.dtype) -> Region:
        pieces = None
        if self.mode != os.O_RDONLY:
            pieces = self.pieces.setdefault(path, Pieces())
        return Region(self.fd(path), offset, numel, dtype, path, pieces)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
