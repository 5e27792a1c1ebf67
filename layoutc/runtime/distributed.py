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


@dataclass
class Group:
    rank: int
    world: int

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj``, on every rank."""
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def add(self, key: str, amount: int) -> int | None:
        """Add ``amount`` to the group-wide counter ``key`` and return its new value (the
        default store's atomic add); None where the store is not reachable."""
        import torch.distributed as dist

        try:
            store = dist.distributed_c10d._get_default_store()
            return int(store.add(key, amount))
        except (AttributeError, RuntimeError, ValueError):
            return None

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
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
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def finish(made: bool) -> None:
    if made:
        import torch.distributed as dist

        dist.destroy_process_group()
