"""Writes through :mod:`layoutc.runtime.fileio`: direct and buffered, any offsets."""

from __future__ import annotations

import itertools
import os
import threading
import zlib
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from layoutc.runtime import fileio
from layoutc.runtime.checksum import combine
from layoutc.runtime.fileio import ALIGN, DIRECT_MIN, Files, address, aligned_bytes


def _cuts(draw: st.DrawFn, size: int) -> list[tuple[int, int]]:
    """Byte ranges that tile ``[0, size)``, in a shuffled order."""
    bounds = sorted(set(draw(st.lists(st.integers(1, size - 1), max_size=8))))
    edges = [0, *bounds, size]
    ranges = list(itertools.pairwise(edges))
    return draw(st.permutations(ranges))


@st.composite
def _writes(draw: st.DrawFn) -> tuple[int, list[tuple[int, int]], bool]:
    size = draw(st.integers(1, 3 * DIRECT_MIN + 5 * ALIGN))
    return size, _cuts(draw, size) if size > 1 else [(0, 1)], draw(st.booleans())


@settings(max_examples=40, deadline=None)
@given(_writes(), st.integers(0, 4 * ALIGN))
def test_writes_at_any_offsets_land_exactly(tmp_path_factory, writes, header) -> None:
    """Ranges written in any order, from page-aligned memory or not, direct where the
    filesystem allows, give the file the bytes written and the CRC of those bytes."""
    size, ranges, aligned_source = writes
    folder: Path = tmp_path_factory.mktemp("w")
    path = folder / "f"
    total = header + size
    with open(path, "wb") as f:
        f.truncate(total)
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    if aligned_source:
        mem = aligned_bytes(size)
        src = np.frombuffer(mem, np.uint8, size)
        src[:] = data
    else:  # one byte past a page boundary: never aligned
        src = np.frombuffer(aligned_bytes(size + 1), np.uint8, size + 1)[1:]
        src[:] = data
    files = Files(os.O_RDWR, direct=True)
    try:
        region = files.region(str(path), header, size, np.dtype(np.uint8))
        for lo, hi in ranges:
            region.write_bytes(lo, src[lo:hi].data)
        pieces = files.pieces[str(path)]
    finally:
        files.close()
    got = np.fromfile(path, np.uint8)
    assert got[:header].tobytes() == bytes(header)
    assert np.array_equal(got[header:], data)
    assert _crc_from(pieces, header, size) == zlib.crc32(data.tobytes())


def _crc_from(pieces: fileio.Pieces, header: int, size: int) -> int:
    crc, at = 0, header
    for off, n, c in sorted(pieces.snapshot()):
        assert off == at, "pieces must tile the written range"
        crc = combine(crc, c, n)
        at += n
    assert at == header + size
    return crc


def test_large_writes_go_direct_where_supported(tmp_path, monkeypatch) -> None:
    """On a filesystem that takes O_DIRECT, the whole pages of a large write go through
    the direct descriptor and only the partial pages at the ends are buffered."""
    if not fileio.direct_supported(tmp_path):
        assert Files(os.O_RDWR, direct=True)._direct(str(tmp_path / "none")) is None
        return
    path = tmp_path / "f"
    size = 4 * DIRECT_MIN
    with open(path, "wb") as f:
        f.truncate(size + 100)
    calls: list[tuple[int, int, int]] = []
    real = fileio.pwrite_all

    def spy(fd: int, data: memoryview, at: int) -> None:
        calls.append((fd, at, len(data)))
        real(fd, data, at)

    monkeypatch.setattr(fileio, "pwrite_all", spy)
    files = Files(os.O_RDWR, direct=True)
    try:
        region = files.region(str(path), 100, size, np.dtype(np.uint8))
        data = np.arange(size, dtype=np.uint64).astype(np.uint8)
        region.write_bytes(0, data.data)
        direct = files.directs[str(path)]
        assert direct is not None
        through_direct = [(at, n) for fd, at, n in calls if fd == direct.dfd]
        buffered = [(at, n) for fd, at, n in calls if fd == direct.fd]
    finally:
        files.close()
    assert through_direct and all(at % ALIGN == 0 and n % ALIGN == 0 for at, n in through_direct)
    assert sum(n for _, n in through_direct) == (size + 100) // ALIGN * ALIGN - ALIGN
    assert sorted(buffered) == [
        (100, ALIGN - 100),
        ((size + 100) // ALIGN * ALIGN, (size + 100) % ALIGN),
    ]
    assert np.array_equal(np.fromfile(path, np.uint8)[100:], data)


def test_where_direct_io_is_refused_writes_are_buffered(tmp_path, monkeypatch) -> None:
    """A folder whose filesystem refuses O_DIRECT (tmpfs, some network filesystems):
    the same bytes, written through the page cache."""
    monkeypatch.setattr(fileio, "direct_supported", lambda folder: False)
    path = tmp_path / "f"
    size = 2 * DIRECT_MIN + 3
    with open(path, "wb") as f:
        f.truncate(size)
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    files = Files(os.O_RDWR, direct=True)
    try:
        region = files.region(str(path), 0, size, np.dtype(np.uint8))
        assert region.direct is None
        region.write_bytes(0, data.data)
    finally:
        files.close()
    assert np.array_equal(np.fromfile(path, np.uint8), data)


def test_the_probe_leaves_nothing_behind(tmp_path) -> None:
    fileio._DIRECT.clear()  # probed once per filesystem: make this call probe
    fileio.direct_supported(tmp_path)
    assert os.stat(tmp_path).st_dev in fileio._DIRECT
    assert list(tmp_path.iterdir()) == []


def test_threads_sharing_pages_at_their_edges(tmp_path) -> None:
    """Neighbouring writes whose ends share a page, from several threads at once."""
    path = tmp_path / "f"
    sizes = [DIRECT_MIN + 1000 * k + 7 for k in range(8)]
    total = sum(sizes)
    with open(path, "wb") as f:
        f.truncate(total)
    data = np.random.default_rng(1).integers(0, 256, total, dtype=np.uint8)
    files = Files(os.O_RDWR, direct=True)
    region = files.region(str(path), 0, total, np.dtype(np.uint8))
    starts = np.cumsum([0, *sizes[:-1]])
    threads = [
        threading.Thread(target=region.write_bytes, args=(int(s), data[s : s + n].data))
        for s, n in zip(starts, sizes, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files.close()
    assert np.array_equal(np.fromfile(path, np.uint8), data)


def test_aligned_bytes_start_on_a_page() -> None:
    for n in (1, ALIGN, 3 * ALIGN + 5):
        buf = aligned_bytes(n)
        assert address(buf) % ALIGN == 0 and len(buf) >= n


def _in_fresh_thread(fn: Any) -> None:
    """Run ``fn`` in a new thread (fresh staging buffers), re-raising what it raises."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if errors:
        raise errors[0]


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 40 * ALIGN),
    st.integers(0, 3 * ALIGN),
    st.integers(0, 3 * ALIGN),
    st.integers(1, 3),
    st.integers(2, 4),
)
def test_streamed_copies_through_many_turns_of_small_buffers(
    tmp_path_factory, size, src_at, dst_at, pages, turns
) -> None:
    """A file-to-file copy longer than all the staging buffers together (several turns
    of each), from and to any byte offsets, with direct IO where the folder allows it:
    the bytes land exactly and the recorded pieces tile the range with the right CRC."""
    from layoutc.runtime.executor import _Pending

    folder: Path = tmp_path_factory.mktemp("c")
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    src_path, dst_path = folder / "src", folder / "dst"
    src_path.write_bytes(bytes(src_at) + data.tobytes())
    with open(dst_path, "wb") as f:
        f.truncate(dst_at + size)
    reads, writes = Files(), Files(os.O_RDWR, direct=True)
    try:
        src = reads.region(str(src_path), src_at, size, np.dtype(np.uint8))
        dst = writes.region(str(dst_path), dst_at, size, np.dtype(np.uint8))
        cut = size // 3  # two runs, as a gather of two reads gives
        pending = _Pending(((src, 0, cut), (src, cut, size - cut)), (size,))
        small = {"STAGING": pages * ALIGN, "TURNS": turns, "DIRECT_MIN": ALIGN}
        with mock.patch.multiple(fileio, **small):
            _in_fresh_thread(lambda: pending.copy_to(dst, 0, 0, size))
        pieces = writes.pieces[str(dst_path)]
    finally:
        reads.close()
        writes.close()
    got = np.fromfile(dst_path, np.uint8)
    assert got[:dst_at].tobytes() == bytes(dst_at)
    assert np.array_equal(got[dst_at:], data)
    assert _crc_from(pieces, dst_at, size) == zlib.crc32(data.tobytes())


def test_unaligned_memory_goes_direct_through_many_turns(tmp_path, monkeypatch) -> None:
    """A large write from memory that is not page-aligned is staged through small buffers
    in turn: every byte lands and every piece's CRC is recorded once."""
    if not fileio.direct_supported(tmp_path):
        return
    monkeypatch.setattr(fileio, "STAGING", 2 * ALIGN)
    monkeypatch.setattr(fileio, "TURNS", 3)
    size = 23 * ALIGN + 17
    data = np.random.default_rng(2).integers(0, 256, size, dtype=np.uint8)
    src = np.frombuffer(aligned_bytes(size + 1), np.uint8, size + 1)[1:]
    src[:] = data
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.truncate(size + 5)
    files = Files(os.O_RDWR, direct=True)
    try:
        region = files.region(str(path), 5, size, np.dtype(np.uint8))
        _in_fresh_thread(lambda: region.write_bytes(0, src.data))
        pieces = files.pieces[str(path)]
    finally:
        files.close()
    assert np.array_equal(np.fromfile(path, np.uint8)[5:], data)
    assert _crc_from(pieces, 5, size) == zlib.crc32(data.tobytes())
