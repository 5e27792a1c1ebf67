"""The swap tier: arrays of any size and dtype go out to files and come back bit for bit,
synchronously or with a prefetch, through direct IO where the filesystem has it and
buffered IO where it does not."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layoutc.runtime.swap import ALIGN, SwapError, SwapPool, aligned_empty

DTYPES = [np.float32, np.float16, np.int8, np.int64, ml_dtypes.bfloat16, np.bool_]


@pytest.fixture(params=[None, False], ids=["auto-direct", "buffered"])
def pool(request, tmp_path):
    with SwapPool(
        tmp_path / "swap", block_size=2 * ALIGN, queue_depth=3, threads=2, direct=request.param
    ) as p:
        yield p


def _array(n: int, dtype, seed: int) -> np.ndarray:
    """Random values of ``dtype`` (every bit pattern matters, not the values)."""
    raw = np.random.default_rng(seed).integers(0, 256, n * np.dtype(dtype).itemsize, np.uint8)
    return (raw % 2).astype(np.bool_) if np.dtype(dtype) == np.bool_ else raw.view(dtype)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 5 * ALIGN + 3), min_size=1, max_size=5),
    dtype=st.sampled_from(DTYPES),
    prefetch=st.booleans(),
)
def test_arrays_of_odd_sizes_come_back_bit_for_bit(tmp_path_factory, sizes, dtype, prefetch):
    folder = tmp_path_factory.mktemp("swap")
    for direct in (None, False):
        with SwapPool(
            folder / str(direct), block_size=2 * ALIGN, queue_depth=2, threads=2, direct=direct
        ) as pool:
            arrays = [_array(n, dtype, i) for i, n in enumerate(sizes)]
            handles = [pool.swap_out(a) for a in arrays]  # all in flight at once
            if prefetch:
                for h in handles:
                    h.prefetch()
            for h, a in zip(handles, arrays, strict=True):
                back = h.swap_in()
                assert back.dtype == a.dtype and back.shape == a.shape
                assert back.tobytes() == a.tobytes()


def test_shapes_out_buffers_and_freeing(pool):
    a = np.arange(3 * 5 * 7, dtype=np.float32).reshape(3, 5, 7)
    h = pool.swap_out(a)
    h.wait()
    assert h.path.is_file() and h.nbytes == a.nbytes
    out = np.zeros_like(a)
    assert h.swap_in(out=out) is out and np.array_equal(out, a)
    with pytest.raises(ValueError, match="out must be C-contiguous float32"):
        h.swap_in(out=np.zeros((3, 5, 7), np.float64))
    h.prefetch()
    assert np.array_equal(h.swap_in(out=out), a)
    h.free()
    assert not h.path.exists()
    with pytest.raises(SwapError, match="was freed"):
        h.swap_in()
    s = pool.swap_out(np.float32(2.5))
    assert s.swap_in().shape == () and float(s.swap_in()) == 2.5


def test_close_frees_every_file_and_counts_traffic(tmp_path):
    pool = SwapPool(tmp_path / "s", block_size=ALIGN)
    for i in range(3):
        pool.swap_out(np.full(1000 + i, i, np.int32)).swap_in()
    assert pool.bytes_out == pool.bytes_in == 4 * (1000 + 1001 + 1002)
    pool.close()
    assert list((tmp_path / "s").iterdir()) == []


def test_direct_files_are_padded_to_the_block_and_read_back_exactly(tmp_path):
    pool = SwapPool(tmp_path / "s", block_size=ALIGN, direct=None)
    a = np.arange(1000, dtype=np.int8)
    h = pool.swap_out(a)
    h.wait()
    size = h.path.stat().st_size
    assert size == (ALIGN if pool.direct else 1000)
    assert np.array_equal(h.swap_in(), a)
    pool.close()


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="multiple of 4096"):
        SwapPool(tmp_path, block_size=1000)
    with pytest.raises(ValueError, match="queue_depth and threads must be >= 1"):
        SwapPool(tmp_path, queue_depth=0)


def test_page_aligned_arrays_move_without_staging_and_come_back_aligned(pool):
    a = aligned_empty((3, ALIGN + 5), np.float32)  # whole blocks and a ragged tail
    a[:] = np.arange(a.size, dtype=np.float32).reshape(a.shape)
    assert a.ctypes.data % ALIGN == 0
    h = pool.swap_out(a)
    back = h.swap_in()
    assert back.ctypes.data % ALIGN == 0 and np.array_equal(back, a)
    out = aligned_empty(a.shape, a.dtype)
    assert np.array_equal(h.swap_in(out=out), a)


def test_a_swap_file_moves_scattered_pieces_and_reads_zeros_where_nothing_was_written(tmp_path):
    with SwapPool(tmp_path / "s", block_size=ALIGN, queue_depth=2, threads=2) as pool:
        f = pool.file("t.bin", 5 * ALIGN + 7)
        data = _array(5 * ALIGN + 7, np.uint8, 1)
        pieces = [(0, 10), (ALIGN - 3, 2 * ALIGN + 5), (4 * ALIGN, ALIGN + 7)]  # across blocks
        written = f.write((at, data[at : at + n].data) for at, n in pieces)
        assert written == sum(n for _, n in pieces) == pool.bytes_out
        back = np.full(data.size, 0xFF, np.uint8)
        assert f.read([(0, back.data)]) == data.size
        want = np.zeros_like(data)
        for at, n in pieces:
            want[at : at + n] = data[at : at + n]
        assert back.tobytes() == want.tobytes()
        with pytest.raises(SwapError, match="beyond its"):
            f.write([(5 * ALIGN, memoryview(bytes(ALIGN)))])
        f.close()
        assert not f.path.exists()
        with pytest.raises(SwapError, match="was closed"):
            f.read([(0, back[:1].data)])
        g = pool.file("u.bin", 100)
    assert not g.path.exists()  # closing the pool deletes the files it still holds
