"""CRC-32 of files written out of order, without reading them back.

The executor writes a file as many byte ranges, in any order, from several threads. Each
write computes the CRC-32 of its bytes while they are in cache (:meth:`Pieces.add`); once
the file is complete, the CRC of any range — a zip member, the whole file — is combined
from the pieces that tile it (:func:`combine`, the GF(2) arithmetic of zlib's
``crc32_combine``), and only the bytes no piece covers (headers, pickles) are read back.

The polynomial is zip's (``zlib.crc32``), so a member's CRC goes into its zip headers as it
is, and a file's CRC can be checked later by reading the file once.
"""

from __future__ import annotations

import os
import threading
import zlib
from bisect import bisect_left

_POLY = 0xEDB88320  # reflected CRC-32 polynomial (zip, gzip, PNG)


def _mult(a: int, b: int) -> int:
    """a·b modulo the polynomial, bit-reflected as CRC registers are."""
    m = 1 << 31
    p = 0
    while a:
        if a & m:
            p ^= b
            a &= m - 1
            if not a:
                break
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return p


def _powers() -> list[int]:
    """x^(2^k) modulo the polynomial, k = 0..63."""
    out = [1 << 30]  # x^1
    for _ in range(63):
        out.append(_mult(out[-1], out[-1]))
    return out


_X2N = _powers()


def _x8n(n: int) -> int:
    """x^(8n) modulo the polynomial: the operator that appends n zero bytes to a CRC."""
    p = 1 << 31  # x^0
    k = 3
    while n:
        if n & 1:
            p = _mult(_X2N[k & 63], p)
        n >>= 1
        k += 1
    return p


def combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of ``A + B`` from ``crc1 = crc32(A)``, ``crc2 = crc32(B)`` and ``len(B)``."""
    return _mult(_x8n(len2), crc1) ^ crc2


def crc_of_file_range(fd: int, lo: int, hi: int, chunk: int = 1 << 22) -> int:
    """CRC-32 of bytes ``[lo, hi)`` of an open file, read through one reused buffer."""
    buf = bytearray(min(chunk, max(hi - lo, 1)))
    view = memoryview(buf)
    crc = 0
    pos = lo
    while pos < hi:
        n = os.preadv(fd, [view[: min(len(buf), hi - pos)]], pos)
        if n <= 0:
            raise OSError(f"short read at byte {pos}")
        crc = zlib.crc32(view[:n], crc)
        pos += n
    return crc


class Pieces:
    """The byte ranges written into one file and their CRCs (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pieces: list[tuple[int, int, int]] = []  # (offset, length, crc)

    def add(self, offset: int, data: bytes | memoryview) -> None:
        self.record(offset, len(data), zlib.crc32(data))

    def record(self, offset: int, length: int, crc: int) -> None:
        """A range whose CRC is already known."""
        with self._lock:
            self._pieces.append((offset, length, crc))

    def crc(self, fd: int, lo: int, hi: int) -> int:
        """CRC-32 of ``[lo, hi)``: written pieces combined, the gaps between them read from
        the file. A range recorded twice counts once; pieces that overlap otherwise make
        it read the range."""
        return self.crcs(fd, [(lo, hi)])[0]

    def crcs(self, fd: int, ranges: list[tuple[int, int]]) -> list[int]:
        """:meth:`crc` of each ``(lo, hi)`` of ``ranges``, the pieces sorted once."""
        with self._lock:
            pieces = sorted(self._pieces)
        starts = [p[0] for p in pieces]
        # a piece may start before lo and reach into it: look back past the longest
        longest = max((p[1] for p in pieces), default=0)
        return [
            _combined(
                fd, lo, hi, pieces[bisect_left(starts, lo - longest) : bisect_left(starts, hi)]
            )
            for lo, hi in ranges
        ]

    def snapshot(self) -> list[tuple[int, int, int]]:
        """The recorded ``(offset, length, crc)`` pieces (to send to another process)."""
        with self._lock:
            return list(self._pieces)


def _combined(fd: int, lo: int, hi: int, near: list[tuple[int, int, int]]) -> int:
    """CRC-32 of ``[lo, hi)`` from the sorted pieces ``near`` it (see :meth:`Pieces.crc`)."""
    crc = 0
    pos = lo
    last = None
    for off, n, piece_crc in near:
        if off + n <= lo or off >= hi:
            continue
        if (off, n) == last:  # the same range twice (a source read twice): once counts
            continue
        last = (off, n)
        if off < pos or off + n > hi:  # overlapping or straddling a boundary
            return crc_of_file_range(fd, lo, hi)
        if off > pos:
            crc = combine(crc, crc_of_file_range(fd, pos, off), off - pos)
        crc = combine(crc, piece_crc, n)
        pos = off + n
    if pos < hi:
        crc = combine(crc, crc_of_file_range(fd, pos, hi), hi - pos)
    return crc


def file_crc(path: str | os.PathLike[str], pieces: Pieces | None = None) -> int:
    """CRC-32 of a whole file; ``pieces`` written into it spare reading those bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return (pieces or Pieces()).crc(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)
