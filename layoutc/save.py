"""Save a state dict as a torch ``.pt`` file with parallel writes, without torch.

``layoutc.save.save(state, path, workers=4)`` writes what ``torch.save`` writes for a
state dict of tensors (numpy arrays, or torch tensors read through numpy): the file's
structure first, every storage pre-sized, then the tensor bytes in large pieces written
concurrently at their offsets by ``workers`` threads — with O_DIRECT from page-aligned
staging buffers where the filesystem allows, storages then starting on page boundaries —
each piece's CRC-32 computed while it is in cache, the zip CRCs combined from them, and the
file fsynced before it is renamed into place. ``torch.load`` (``weights_only=True``, ``mmap=True`` or not) reads the result.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from layoutc.formats import pt
from layoutc.runtime.checksum import Pieces
from layoutc.runtime.fileio import Files, fsync_path, pwrite_all
from layoutc.runtime.memory import as_numpy, dtype_name
from layoutc.swap import ALIGN, aligned_empty, direct_supported

PIECE = 64 << 20  # bytes per write


def save(
    state: Mapping[str, Any],
    path: str | os.PathLike[str],
    workers: int = 4,
    direct: bool | None = None,
) -> int:
    """Write ``state`` (name -> tensor) to ``path`` as a torch zip container; returns the
    file's size. Tensors that are the same object share one storage, as ties do.
    ``direct`` (default: where the filesystem supports it) writes whole pages of tensor
    data with O_DIRECT, storages page-aligned, bypassing the page cache."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    keys: dict[int, str] = {}
    obj: dict[str, pt.Tensor] = {}
    for name, value in state.items():
        key = keys.setdefault(id(value), str(len(keys)))
        if key not in arrays:
            arrays[key] = np.ascontiguousarray(as_numpy(value))
        a = arrays[key]
        obj[name] = pt.Tensor(dtype_name(a.dtype), tuple(a.shape), None, key=key)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    direct = direct_supported(tmp.parent) if direct is None else direct
    created = pt.create(obj, tmp, archive=path.stem or "archive", align=ALIGN if direct else 64)
    files = Files(os.O_RDWR)
    pieces = Pieces()
    dfd = os.open(tmp, os.O_RDWR | os.O_DIRECT) if direct else -1
    try:
        jobs: list[tuple[Any, np.ndarray, int]] = []
        for key, a in arrays.items():
            offset, _ = created.storages[key]
            raw = a.reshape(-1).view(np.uint8)
            region = files.region(str(tmp), offset, raw.size, np.dtype(np.uint8))
            jobs.extend((region, raw, lo) for lo in range(0, raw.size, PIECE))
        _write_all(jobs, workers, dfd, pieces)
        for written in files.pieces.values():  # the buffered tails
            for off, n, crc in written.snapshot():
                pieces.record(off, n, crc)
    finally:
        files.close()
        if dfd >= 0:
            os.close(dfd)
    created.finish_crcs(pieces)
    fsync_path(tmp)
    tmp.rename(path)
    return created.size


def _write_all(
    jobs: list[tuple[Any, np.ndarray, int]], workers: int, dfd: int, pieces: Pieces
) -> None:
    """Write every ``(region, bytes, start)`` piece, ``workers`` threads taking the next:
    with a direct fd ``dfd``, the whole pages of a piece through a page-aligned staging
    buffer (their CRCs into ``pieces``) and its tail through the region (buffered)."""
    it = iter(jobs)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        staging = aligned_empty(PIECE, np.uint8) if dfd >= 0 else None
        while not errors:
            with lock:
                job = next(it, None)
            if job is None:
                return
            region, raw, lo = job
            data = raw[lo : lo + PIECE]
            try:
                whole = data.size // ALIGN * ALIGN if staging is not None else 0
                if whole:
                    assert staging is not None
                    staging[:whole] = data[:whole]
                    at = region.offset + lo
                    pwrite_all(dfd, staging[:whole].data, at)
                    pieces.record(at, whole, zlib.crc32(staging[:whole].data))
                if whole < data.size:
                    region.write_bytes(lo + whole, data[whole:].data)
            except BaseException as e:
                errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(max(1, workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
