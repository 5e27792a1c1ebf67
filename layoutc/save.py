"""Save a state dict as a torch ``.pt`` file with parallel writes, without torch.

``layoutc.save.save(state, path, workers=4)`` writes what ``torch.save`` writes for a
state dict of tensors (numpy arrays, or torch tensors read through numpy): the file's
structure first, every storage pre-sized, then the tensor bytes in large pieces written
concurrently at their offsets by ``workers`` threads — with O_DIRECT from page-aligned
staging buffers where the filesystem allows, storages then starting on page boundaries —
each piece's CRC-32 computed while it is in cache, the zip CRCs combined from them, and the
file fsynced before it is renamed into place. ``torch.load`` (``weights_only=True``, ``mmap=True`` or not) reads the result.
The container is created by :func:`layoutc.formats.writers.torch_state_dict`, the writer of
the ``torch`` output format too: one way to write a state dict.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from layoutc.dtypes import dtype_name
from layoutc.formats import pt
from layoutc.formats.writers import torch_state_dict
from layoutc.runtime.checksum import Pieces
from layoutc.runtime.fileio import ALIGN, Files, direct_supported, fsync_path
from layoutc.runtime.memory import as_numpy

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
    files = Files(os.O_RDWR, direct=direct)
    try:
        created, regions = torch_state_dict(
            obj, tmp, files, archive=path.stem or "archive", align=ALIGN if direct else 64
        )
        jobs: list[tuple[Any, np.ndarray, int]] = []
        for key, a in arrays.items():
            raw = a.reshape(-1).view(np.uint8)
            jobs.extend((regions[key], raw, lo) for lo in range(0, raw.size, PIECE))
        _write_all(jobs, workers)
        pieces = files.pieces.get(str(tmp), Pieces())
    finally:
        files.close()
    created.finish_crcs(pieces)
    fsync_path(tmp)
    tmp.rename(path)
    return created.size


def _write_all(jobs: list[tuple[Any, np.ndarray, int]], workers: int) -> None:
    """Write every ``(region, bytes, start)`` piece, ``workers`` threads taking the next
    (the region writes whole pages directly where it can, the rest buffered)."""

    def write(job: tuple[Any, np.ndarray, int]) -> None:
        region, raw, lo = job
        region.write_bytes(lo, raw[lo : lo + PIECE].data)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for _ in pool.map(write, jobs):  # the first failure is raised here
            pass
