"""Stored buffers in memory: what a placement's files hold, as numpy arrays.

``{(file, key): 1-D numpy array}`` stands for a placement's files. :func:`store` lays
logical tensors out as a placement stores them (every copy, padding zeroed), :func:`load`
reads them back from copy 0, and :func:`markers` makes logical values to move: distinct
``arange`` markers (so a wrong slice is visible) or random data. :mod:`layoutc.zero`
partitions and reassembles full tensors with these; tests run plans over them with the
executor (:mod:`layoutc.runtime.executor`) to prove a plan moves every element to its
place. Checkpoints do not pass through here: a conversion runs the executor over regions
of its files.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from layoutc.dtypes import np_dtype
from layoutc.place import Placement
from layoutc.place.shards import STEP, Slice, index
from layoutc.runtime.executor import Stored

Logical = Mapping[str, Mapping[str, np.ndarray]]  # tensor -> state -> logical array


def as_numpy(value: Any) -> np.ndarray:
    """A numpy array of ``value``: a numpy array or sequence, or a torch tensor read
    without a copy (bf16 through its bits); torch is only touched if given a tensor."""
    if hasattr(value, "detach"):
        import torch  # lazy: only a torch tensor, which means torch is loaded already

        t = value.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np_dtype("bf16"))
        return t.numpy()
    return np.asarray(value)


def slice_array(logical: np.ndarray, sl: Slice, dtype: str) -> np.ndarray:
    """The local tensor of slice ``sl`` cut from a logical tensor (padding zero)."""
    out = np.zeros(sl.shape, np_dtype(dtype))
    for seg in sl.segments:
        out[index(seg.local)] = logical[index(seg.logical)]
    return out


def store(p: Placement, values: Logical) -> Stored:
    """Stored buffers of ``p`` holding ``values`` (logical tensors per tensor and state)."""
    out: Stored = {(b.file, b.key): np.zeros(b.numel, np_dtype(b.dtype)) for b in p.buffers()}
    for t in p.tensors:
        for state in p.states(t):
            logical = values[t.name][state]
            for sl in p.slices(t, state):
                flat = slice_array(logical, sl, p.dtype(t, state)).reshape(-1)
                n = flat.size
                for c in range(p.copies(t, state)):
                    for r in p.runs(t, state, sl, c, 0, n):
                        out[(r.file, r.key)][r.offset : r.offset + r.numel] = flat[
                            r.start : r.start + r.numel
                        ]
    return out


def load(p: Placement, stored: Stored) -> dict[str, dict[str, np.ndarray]]:
    """Logical tensors read back from copy 0 of every slice."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for t in p.tensors:
        for state in p.states(t):
            dtype = np_dtype(p.dtype(t, state))
            logical = np.zeros(t.shape if state != STEP else (), dtype)
            for sl in p.slices(t, state):
                n = sl.numel
                flat = np.zeros(n, dtype)
                for r in p.runs(t, state, sl, 0, 0, n):
                    flat[r.start : r.start + r.numel] = stored[(r.file, r.key)][
                        r.offset : r.offset + r.numel
                    ]
                local = flat.reshape(sl.shape)
                for seg in sl.segments:
                    logical[index(seg.logical)] = local[index(seg.local)]
            out.setdefault(t.name, {})[state] = logical
    return out


def markers(p: Placement, seed: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Logical values for every tensor and state of ``p``: distinct ``arange`` markers
    (exact in the state's dtype for small sizes), or random data when ``seed`` is given."""
    rng = np.random.default_rng(seed) if seed is not None else None
    out: dict[str, dict[str, np.ndarray]] = {}
    base = 0
    for t in p.tensors:
        for state in p.states(t):
            shape = t.shape if state != STEP else ()
            n = int(np.prod(shape)) if shape else 1
            if state == STEP:
                v = np.array([7.0])  # one step for the whole run, as in a real checkpoint
            elif rng is not None:
                v = rng.standard_normal(n).astype(np.float32)
            else:
                v = (np.arange(n, dtype=np.float64) + base) % 251 + 1  # exact in bf16/fp16
                base += n
            dtype = np_dtype(p.dtype(t, state))
            out.setdefault(t.name, {})[state] = v.reshape(shape).astype(dtype, copy=False)
    return out
