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

Files opened for writing with ``direct=True`` also get an ``O_DIRECT`` descriptor where the
filesystem allows one: the whole pages of a large write go straight to the device
(from a page-aligned staging buffer when the bytes are not page-aligned in memory), and only
the partial pages at either end go through the page cache. A page is written directly only
by the one write that covers all of it, so direct and buffered writes never share a page.
Where buffered writeback is expensive (many virtual disks) this is several times faster
and leaves the page cache to the source being read.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from layoutc.errors import InputError
from layoutc.runtime.checksum import Pieces


class OutputError(InputError):
    """The output folder cannot be written, committed or trusted; the message names the
    path and what is wrong. An input error: the folder is an argument of the command, and
    whether it exists, is full or read-only, the caller fixes it (or picks another)."""


# ------------------------------------------------------------------ paths


def path_components(rel: str) -> list[str] | str:
    """The components of a relative path inside a folder, or why it is not one."""
    if not rel:
        return "an empty path"
    if "\0" in rel:
        return "a path with a NUL byte"
    if rel.startswith("/"):
        return "an absolute path"
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "a path with an empty, '.' or '..' component"
    return parts


def inside(base: Path, rel: str | Path) -> Path:
    """``base / rel``, refused unless it stays inside ``base``: ``rel`` is relative, has no
    ``..``, ``.`` or empty component, and resolves (symbolic links followed) under ``base``.
    Every path a writer creates goes through here."""
    parts = path_components(str(rel))
    if isinstance(parts, str):
        raise OutputError(f"{base}: refusing to write {str(rel)!r}, {parts}")
    path = base.joinpath(*parts)
    if not path.resolve().is_relative_to(base.resolve()):
        raise OutputError(f"{base}: refusing to write {rel!r}, it resolves outside the folder")
    return path


ALIGN = 4096  # O_DIRECT offsets, lengths and buffer addresses are multiples of this
DIRECT_MIN = 256 << 10  # smaller writes are buffered: direct IO pays off on large ones
STAGING = 8 << 20  # bytes of each of a thread's page-aligned staging buffers
TURNS = 3  # staging buffers per thread: one is filled while the writes of the others run


def aligned_bytes(n: int) -> memoryview:
    """``n`` (rounded up to whole pages) writable bytes starting on a page boundary."""
    return memoryview(mmap.mmap(-1, max(ALIGN, -(-n // ALIGN) * ALIGN)))


_local = threading.local()


def staging() -> tuple[memoryview, ...]:
    """This thread's :data:`TURNS` page-aligned staging buffers (:data:`STAGING` bytes each)."""
    bufs = getattr(_local, "staging", None)
    if bufs is None:
        bufs = _local.staging = tuple(aligned_bytes(STAGING) for _ in range(TURNS))
    return bufs


def address(raw: memoryview) -> int:
    """Where ``raw``'s first byte is in memory."""
    return int(np.frombuffer(raw, np.uint8).ctypes.data) if len(raw) else 0


class Region:
    def __init__(
        self,
        fd: int,
        offset: int,
        numel: int,
        dtype: np.dtype,
        path: str = "",
        pieces: Pieces | None = None,
        direct: Direct | None = None,
        reads: Pieces | None = None,
    ) -> None:
        self.fd = fd
        self.direct = direct
        self.offset = offset
        self.size = numel
        self.dtype = dtype
        self.path = path
        self.pieces = pieces  # what was written, with CRCs
        self.reads = reads  # what was read, with CRCs (a source checked against its own)

    def _range(self, s: slice) -> tuple[int, int]:
        lo, hi, step = s.indices(self.size)
        if step != 1:
            raise ValueError("regions are read and written in contiguous ranges")
        return lo, max(lo, hi)

    def __getitem__(self, s: slice) -> np.ndarray:
        lo, hi = self._range(s)
        out = np.empty(hi - lo, self.dtype)
        at = self.offset + lo * self.dtype.itemsize
        pread_all(self.fd, out.view(np.uint8).data, at, self.path)
        if self.reads is not None:
            self.reads.add(at, out.view(np.uint8).data)
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

    def write_bytes(self, at: int, raw: memoryview, crc: int | None = None) -> None:
        """Write ``raw`` at byte ``at`` of the region, recording its CRC-32 (``crc`` when
        the caller has taken it already)."""
        start = self.offset + at
        pieces = self.pieces
        if pieces is not None and crc is not None:
            pieces.record(start, len(raw), crc)
            pieces = None
        if self.direct is not None and len(raw) >= DIRECT_MIN:
            self.direct.write(raw, start, pieces)
            return
        if pieces is not None:
            pieces.add(start, raw)
        pwrite_all(self.fd, raw, start)
        start_writeback(self.fd, start, len(raw))


class Direct:
    """The ``O_DIRECT`` descriptor of one output file next to its buffered one ``fd``."""

    def __init__(self, fd: int, dfd: int) -> None:
        self.fd = fd
        self.dfd = dfd

    def write(self, raw: memoryview, start: int, pieces: Pieces | None) -> None:
        """Write ``raw`` at byte ``start``: partial pages at the ends buffered, whole pages
        direct; each piece's CRC-32 into ``pieces``."""
        head = min(len(raw), -start % ALIGN)
        body = (len(raw) - head) // ALIGN * ALIGN
        self._pages(raw[head : head + body], start + head, pieces)
        for lo, hi in ((0, head), (head + body, len(raw))):
            if hi > lo:
                if pieces is not None:
                    pieces.add(start + lo, raw[lo:hi])
                pwrite_all(self.fd, raw[lo:hi], start + lo)
                start_writeback(self.fd, start + lo, hi - lo)

    def _pages(self, raw: memoryview, at: int, pieces: Pieces | None) -> None:
        if not len(raw):
            return
        if address(raw) % ALIGN == 0:
            if pieces is not None:
                pieces.add(at, raw)
            pwrite_all(self.dfd, raw, at)
            return
        # Not page-aligned in memory: copy through the staging buffers, taking each CRC
        # while the copy is in cache.
        with InTurn("direct") as turns:
            for lo in range(0, len(raw), STAGING):
                n = min(STAGING, len(raw) - lo)
                buf = turns.next()[:n]
                buf[:] = raw[lo : lo + n]
                if pieces is not None:
                    pieces.add(at + lo, buf)
                turns.submit(pwrite_all, self.dfd, buf, at + lo)


class InTurn:
    """This thread's staging buffers used in turn: one is filled while the writes of the
    others run on a pool of threads (``pool`` names it: a writer that itself stages uses
    another pool than its callers), so two writes can be in flight per thread. Leaving the
    block waits for every write and raises the first failure."""

    def __init__(self, pool: str) -> None:
        self.buffers = staging()
        self.pool = _pool(pool)
        self.pending: list[Future[Any] | None] = [None] * len(self.buffers)
        self.turn = 0

    def __enter__(self) -> InTurn:
        return self

    def next(self) -> memoryview:
        """The buffer to fill next, once its last write is done."""
        _wait(self.pending[self.turn])
        return self.buffers[self.turn]

    def submit(self, write: Any, *args: Any) -> None:
        """Run ``write(*args)`` (on the buffer just filled) while the next is filled."""
        self.pending[self.turn] = self.pool.submit(write, *args)
        self.turn = (self.turn + 1) % len(self.buffers)

    def __exit__(self, *exc: object) -> None:
        for f in self.pending:
            _wait(f)


def _wait(f: Future[Any] | None) -> None:
    if f is not None:
        f.result()


@cache
def _pool(name: str) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=16, thread_name_prefix=f"layoutc-{name}")


_DIRECT: dict[int, bool] = {}  # st_dev -> whether it takes O_DIRECT writes


def direct_supported(folder: str | os.PathLike[str]) -> bool:
    """Whether files in ``folder`` take page-aligned O_DIRECT writes: probed once per
    filesystem (a universal output has a folder per tensor, all on one device)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    folder = Path(folder)
    dev = os.stat(folder).st_dev
    if dev not in _DIRECT:
        _DIRECT[dev] = _probe_direct(folder, flag)
    return _DIRECT[dev]


def _probe_direct(folder: Path, flag: int) -> bool:
    probe = folder / f".direct-probe-{os.getpid()}-{threading.get_ident()}"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | flag, 0o600)
    except OSError:
        return False
    try:
        os.pwrite(fd, aligned_bytes(ALIGN), 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def pread_all(
    fd: int,
    buf: memoryview,
    at: int,
    name: str = "",
    want: int | None = None,
    error: type[Exception] = OSError,
) -> None:
    """Fill ``buf`` from byte ``at`` of ``fd``; with ``want``, only that many bytes must
    exist (an aligned read past the end of a padded file returns less). A file that ends
    first raises ``error``."""
    need = len(buf) if want is None else want
    done = 0
    while done < need:
        n = os.preadv(fd, [buf[done:]], at + done)
        if n <= 0:
            raise error(f"{name or 'file'}: short read at byte {at + done}, wanted {need}")
        done += n


def pwrite_all(
    fd: int, data: memoryview, at: int, name: str = "", error: type[Exception] = OSError
) -> None:
    """Write all of ``data`` at byte ``at`` of ``fd``; a write that stops raises ``error``."""
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], at + done)
        if n <= 0:
            raise error(f"{name or 'file'}: short write at byte {at + done}")
        done += n


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_file_range() -> Any:
    try:
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

    def __init__(
        self, mode: int = os.O_RDONLY, direct: bool = False, record_reads: bool = False
    ) -> None:
        self.mode = mode
        self.fds: dict[str, int] = {}
        self.direct = direct and bool(getattr(os, "O_DIRECT", 0)) and mode != os.O_RDONLY
        self.directs: dict[str, Direct | None] = {}
        self.pieces: dict[str, Pieces] = {}  # what was written, per file (write mode)
        self.record_reads = record_reads
        self.reads: dict[str, Pieces] = {}  # what was read, per file (with record_reads)

    def fd(self, path: str) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, self.mode)
        return self.fds[path]

    def region(self, path: str, offset: int, numel: int, dtype: np.dtype) -> Region:
        pieces = None
        if self.mode != os.O_RDONLY:
            pieces = self.pieces.setdefault(path, Pieces())
        return Region(
            self.fd(path),
            offset,
            numel,
            dtype,
            path,
            pieces,
            self._direct(path) if self.direct else None,
            self.reads.setdefault(path, Pieces()) if self.record_reads else None,
        )

    def _direct(self, path: str) -> Direct | None:
        if path not in self.directs:
            self.directs[path] = None
            if direct_supported(Path(path).parent.resolve()):  # not tmpfs and the like
                self.directs[path] = Direct(self.fd(path), os.open(path, os.O_WRONLY | os.O_DIRECT))
        return self.directs[path]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        for d in self.directs.values():
            if d is not None:
                os.close(d.dfd)
        self.fds.clear()
        self.directs.clear()
