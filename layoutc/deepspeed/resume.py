"""Resume a DeepSpeed job from a checkpoint saved at another topology.

The running job's topology is read from the engine (data-parallel size, tensor- and
pipeline-parallel sizes, ZeRO stage, dtype), the checkpoint's from its files. Where they
agree, this is DeepSpeed's own ``load_checkpoint``. Where they do not, every rank of the job
runs one layoutc conversion of the checkpoint to the job's topology together (each rank
reads the runs it writes; rank 0 commits, as ``torchrun -m layoutc convert`` does) into a
scratch folder beside the checkpoint, ``.<name>.layoutc-resume/<tag>``; DeepSpeed's own
``load_checkpoint`` then loads it — the loader that is proven to restore the state exactly —
and the scratch folder is removed. The checkpoint itself is only read.

Why a scratch folder rather than handing each rank its tensors in memory: DeepSpeed's
loader reads files (and checks them: versions, partition counts, param groups); writing the
files it expects keeps one loading code path for both cases, and the conversion is the same
plan ``layoutc plan CKPT --to deepspeed --set dp=N --zero K`` shows before a job starts. It
costs one copy of the checkpoint's bytes on disk for the time of the load.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from layoutc.conversion import convert
from layoutc.errors import UsageError
from layoutc.formats.deepspeed import _zero_stage, open_checkpoint
from layoutc.runtime import distributed

SCRATCH = ".layoutc-resume"


@dataclass(frozen=True)
class Topology:
    dp: int
    tp: int
    pp: int
    zero: int
    dtype: str

    def __str__(self) -> str:
        return f"dp={self.dp} tp={self.tp} pp={self.pp} ZeRO-{self.zero} {self.dtype}"


def of_engine(engine: Any) -> Topology:
    dtype = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    return Topology(
        dp=int(engine.dp_world_size),
        tp=int(getattr(engine, "mp_world_size", 1) or 1),
        pp=int(getattr(engine, "num_stages", 1) or 1),
        zero=int(engine.zero_optimization_stage()),
        dtype=dtype,
    )


def of_checkpoint(load_dir: str | Path, tag: str | None) -> tuple[Topology, str]:
    """The saved topology and the tag (``latest``'s where not given)."""
    ckpt = open_checkpoint(load_dir, tag)
    try:
        states = ckpt.model_states
        cfg = ckpt.config
        dtype = (
            "bf16"
            if (cfg.get("bf16") or {}).get("enabled")
            else "fp16"
            if (cfg.get("fp16") or {}).get("enabled")
            else "fp32"
        )
        pp = len({p.name.split("_")[1] for p in ckpt.model_files if p.name.startswith("mp_")})
        top = Topology(
            dp=ckpt.dp,
            tp=int(states.get("mp_world_size") or 1),
            pp=int(states.get("pp_world_size") or 1) if pp else 1,
            zero=_zero_stage(ckpt)[0],
            dtype=dtype,
        )
        return top, ckpt.folder.name
    finally:
        ckpt.close()


def load_checkpoint(
    engine: Any,
    load_dir: str,
    tag: str | None = None,
    *,
    load: Callable[..., Any] | None = None,
    **kw: Any,
) -> Any:
    """See :func:`layoutc.deepspeed.load_checkpoint`; ``load`` is DeepSpeed's own
    ``engine.load_checkpoint`` (where :func:`~layoutc.deepspeed.attach` replaced it)."""
    # DeepSpeed's own load, also where attach() replaced engine.load_checkpoint by this
    load = load or getattr(engine.checkpoint_engine, "deepspeed_load", engine.load_checkpoint)
    wait = getattr(engine.checkpoint_engine, "wait", None)
    if wait is not None:
        wait()  # a save still being written must land before anything reads the folder
    root = Path(load_dir).absolute()
    saved, tag = of_checkpoint(root, tag)
    running = of_engine(engine)
    if saved == running:
        return load(str(root), tag, **kw)
    if saved.pp != running.pp:
        raise UsageError(
            f"{root}/{tag}: saved at pipeline-parallel size {saved.pp}, this job runs "
            f"{running.pp}; convert it first (`layoutc convert {root} --to deepspeed --set "
            f"pp={running.pp} ...`)"
        )
    group = distributed.current()
    rank = group.rank if group is not None else 0
    scratch = root.parent / f".{root.name}{SCRATCH}"
    out = scratch / tag
    if rank == 0:
        print(
            f"layoutc: {root}/{tag} was saved at {saved}; this job is {running}: "
            f"resharding into {out}",
            flush=True,
        )
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    if group is not None:
        group.barrier()
    overrides = {"dp": running.dp}
    if running.tp > 1 or saved.tp > 1:
        overrides["tp"] = running.tp
    try:
        convert(
            root,
            out,
            "deepspeed",
            tag=tag,
            overrides=overrides,
            zero=running.zero,
            dtype=running.dtype,
            workers=min(4, os.cpu_count() or 1),
        )
        if group is not None:
            group.barrier()
        load_path, client_state = load(str(out), tag, **kw)
    finally:
        if group is not None and dist.is_initialized():
            group.barrier()
        if rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
    if isinstance(load_path, str) and load_path.startswith(str(out)):
        load_path = str(root) + load_path[len(str(out)) :]  # the file it was made from
    return load_path, client_state
