"""ZeRO partitioning of full tensors, exactly as DeepSpeed saves it, for any layout.

:func:`partition` takes a layout stored as ``deepspeed`` and the full (or, with tensor
parallelism, logical) tensors of every state, and returns each stored buffer of each file:
ZeRO-1/2 flat groups padded to a multiple of 2·dp and cut into equal partitions (the fp32
masters with their padding stripped, as DeepSpeed strips it), the bf16 optimizer's whole
partitions, ZeRO-3 per-parameter pieces of ceil(n / dp) elements grouped in sub-groups,
frozen fragments and replicated buffers. :func:`reassemble` is its inverse. The
arithmetic is :mod:`layoutc.place.zero` (re-exported here): the same code plans every
conversion, so what this module produces is what a conversion writes.

The tensor-facing half needs numpy (torch tensors are accepted and read through numpy);
nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from layoutc import ir
from layoutc.dtypes import np_dtype
from layoutc.place import place
from layoutc.place.zero import NCCL_START_ALIGNMENT, FlatGroup, Fragment, Stage3Group
from layoutc.runtime import memory


def partition(
    layout: ir.Layout, values: Mapping[str, Mapping[str, Any]]
) -> dict[tuple[str, str], Any]:
    """``{(file, key): 1-D array}`` of every buffer ``layout`` stores, filled from
    ``values[tensor][state]`` (states: ``weight``, ``master``, ``exp_avg``, ``exp_avg_sq``,
    ``step``; each the logical tensor, cast to the layout's dtype for that state)."""
    p = place(layout)
    arrays = {
        t.name: {
            s: memory.as_numpy(values[t.name][s]).astype(np_dtype(p.dtype(t, s)))
            for s in p.states(t)
        }
        for t in p.tensors
    }
    return memory.store(p, arrays)


def reassemble(
    layout: ir.Layout, stored: Mapping[tuple[str, str], Any]
) -> dict[str, dict[str, Any]]:
    """The logical tensors of every state, read back from the buffers :func:`partition`
    makes (or a checkpoint's, read into arrays)."""
    return memory.load(place(layout), {k: memory.as_numpy(v) for k, v in stored.items()})


__all__ = [
    "NCCL_START_ALIGNMENT",
    "FlatGroup",
    "Fragment",
    "Stage3Group",
    "partition",
    "reassemble",
]
