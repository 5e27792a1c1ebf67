"""CRC-32 of files written piecewise, out of order: combined equals computed over the bytes."""

from __future__ import annotations

import os
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from layoutc.runtime.checksum import Pieces, combine, file_crc


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_combining_two_crcs_gives_the_crc_of_the_concatenation(a, b):
    assert combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_combining_over_long_zero_runs_matches_zlib():
    a, b = os.urandom(1000), bytes(5 << 20)
    assert combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@st.composite
def writes(draw):
    """A file's bytes and a set of writes into it: pieces of a random cut, some left out
    (gaps, read back), some written twice (overlaps), in random order."""
    data = draw(st.binary(min_size=1, max_size=2000))
    cuts = sorted(
        draw(st.sets(st.integers(1, len(data) - 1), max_size=12)) if len(data) > 1 else []
    )
    bounds = list(zip([0, *cuts], [*cuts, len(data)], strict=True))
    written = [b for b in bounds if draw(st.booleans())]
    twice = [b for b in written if draw(st.integers(0, 9)) == 0]
    order = draw(st.permutations(written + twice))
    lo = draw(st.integers(0, len(data) - 1))
    hi = draw(st.integers(lo, len(data)))
    return data, order, lo, hi


@settings(max_examples=200)
@given(writes())
def test_the_crc_of_any_range_equals_the_crc_of_its_bytes(tmp_path_factory, case):
    data, order, lo, hi = case
    path = tmp_path_factory.mktemp("crc") / "f"
    path.write_bytes(data)
    pieces = Pieces()
    for a, b in order:
        pieces.add(a, data[a:b])
    fd = os.open(path, os.O_RDONLY)
    try:
        assert pieces.crc(fd, lo, hi) == zlib.crc32(data[lo:hi])
    finally:
        os.close(fd)
    assert file_crc(path, pieces) == zlib.crc32(data)
