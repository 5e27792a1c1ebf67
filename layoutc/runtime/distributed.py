"""Running one plan across the ranks of a torch.distributed process group (torchrun).

layoutc uses the group only to coordinate: rank 0 creates the output's files and, after
every rank has written its units, patches the checksums and commits; objects (the file
regions, each rank's CRC pieces, errors) go through ``broadcast_object_list`` and
``all_gather_object``. Tensor data never goes through the group: every rank reads its
sources and writes its outputs itself, at known offsets. gloo on CPU, nccl on GPU — any
backend that moves Python objects.

Nothing here imports torch unless a process group is already initialised (or
:func:`init_from_env` is asked to make one), so single-process conversions never load it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any


def _torch() -> Any:
    """torch with ``torch.distributed`` loaded; only a run over several ranks asks for it."""
    import torch.distributed  # lazy: single-process conversions never load torch

    return torch


@dataclass
class Group:
    rank: int
    world: int

    def barrier(self) -> None:
        _torch().distributed.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj``, on every rank."""
        box = [obj if self.rank == 0 else None]
        _torch().distributed.broadcast_object_list(box, src=0)
        return box[0]

    def add(self, key: str, amount: int) -> int | None:
        """Add ``amount`` to the group-wide counter ``key`` and return its new value (the
        default store's atomic add); None where the store is not reachable."""
        try:
            store = _torch().distributed.distributed_c10d._get_default_store()
            return int(store.add(key, amount))
        except (AttributeError, RuntimeError, ValueError):
            return None

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        out: list[Any] = [None] * self.world
        _torch().distributed.all_gather_object(out, obj)
        return out


def current() -> Group | None:
    """The initialised process group of more than one rank, if any."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    world = dist.get_world_size()
    return Group(dist.get_rank(), world) if world > 1 else None


def init_from_env(timeout_s: float = 1800) -> bool:
    """Under torchrun (``WORLD_SIZE`` > 1 in the environment), initialise the default
    process group (gloo, or nccl when CUDA is there); True if this call made it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    torch = _torch()
    dist = torch.distributed
    if dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def finish(made: bool) -> None:
    if made:
        _torch().distributed.destroy_process_group()
