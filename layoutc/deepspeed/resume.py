"""Resume a DeepSpeed job from a checkpoint saved at another topology.

The running job's topology is read from the engine (data-parallel size, tensor- and
pipeline-parallel sizes, ZeRO stage, dtype), the checkpoint's from its files. Where they
agree, this is DeepSpeed's own ``load_checkpoint``. Where they do not, every rank of the job
runs one layoutc conversion of the checkpoint to the job's topology together (each rank
reads the runs it writes; rank 0 commits, as ``torchrun -m layoutc convert`` does) into a
scratch folder (:func:`_scratch`: in shared memory where the job runs on one host and it
fits, else beside the checkpoint); DeepSpeed's own ``load_checkpoint`` then loads it — the
loader that is proven to restore the state exactly — and the scratch folder is removed (in
the background: training goes on meanwhile). The checkpoint itself is only read.

Why a scratch folder rather than handing each rank its tensors in memory: DeepSpeed's
loader reads files (and checks them: versions, partition counts, param groups); writing the
files it expects keeps one loading code path for both cases, and the conversion is the same
plan ``layoutc plan CKPT --to deepspeed --set dp=N --zero K`` shows before a job starts. It
costs one copy of the checkpoint's bytes, in memory or on disk, for the time of the load.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
import shutil
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from layoutc.conversion import convert
from layoutc.errors import UsageError
from layoutc.formats.deepspeed import _zero_stage, open_checkpoint
from layoutc.runtime import distributed
from layoutc.runtime.leftovers import process_alive

SCRATCH = ".layoutc-resume"
_removed = itertools.count()


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
    scratch: str | os.PathLike[str] | None = None,
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
    folder = _scratch(root, tag, scratch, group)
    out = folder / tag
    if rank == 0:
        print(
            f"layoutc: {root}/{tag} was saved at {saved}; this job is {running}: "
            f"resharding into {out}",
            flush=True,
        )
        for old in _left_behind(folder.parent, root.name):
            shutil.rmtree(old, ignore_errors=True)
        folder.mkdir(parents=True)
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
            _remove_behind(folder)
    if isinstance(load_path, str) and load_path.startswith(str(out)):
        load_path = str(root) + load_path[len(str(out)) :]  # the file it was made from
    return load_path, client_state


def _remove_behind(scratch: Path) -> None:
    """Remove ``scratch`` while training goes on: renamed aside at once (a next resume may
    make it again), deleted by a thread the interpreter waits for at exit."""
    aside = scratch.with_name(f"{scratch.name}.old-{os.getpid()}-{next(_removed)}")
    try:
        os.rename(scratch, aside)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
        return
    threading.Thread(
        target=shutil.rmtree, args=(aside,), kwargs={"ignore_errors": True}, name="layoutc-rm"
    ).start()


SHM = Path("/dev/shm")


def _scratch(root: Path, tag: str, where: Any, group: Any) -> Path:
    """The scratch folder (rank 0 decides): in ``where`` if given; else in shared memory
    (``/dev/shm``) when every rank runs on this host and a reshard of the tag takes at most
    a quarter of the memory available and fits there (no disk write and read back); else
    beside the checkpoint, which every rank sees."""
    hosts = group.gather(socket.gethostname()) if group is not None else ["."]
    path = None
    if group is None or group.rank == 0:
        if where is None and len(set(hosts)) == 1 and _fits_in_memory(root / tag):
            where = SHM
        if where is None:
            path = str(root.parent / f".{root.name}{SCRATCH}")
        else:
            path = str(Path(where).absolute() / f".{root.name}-{os.getpid()}{SCRATCH}")
    chosen = group.broadcast(path) if group is not None else path
    assert isinstance(chosen, str)
    return Path(chosen)


def _fits_in_memory(tag: Path) -> bool:
    if not SHM.is_dir():
        return False
    need = 1.5 * sum(p.stat().st_size for p in tag.rglob("*") if p.is_file())
    try:
        free = shutil.disk_usage(SHM).free
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return False
    return need <= free and need <= available / 4


def _left_behind(folder: Path, name: str) -> list[Path]:
    """Scratch folders for checkpoint ``name`` in ``folder`` that no live process is using:
    a reshard's scratch is named for the process that made it (``.NAME-PID.layoutc-resume``;
    beside the checkpoint, ``.NAME.layoutc-resume``) and renamed aside when done
    (``….old-PID-N``, deleted by that process in the background)."""
    found = []
    shape = re.compile(rf"(?:-(\d+))?{re.escape(SCRATCH)}(?:\.old-(\d+)-\d+)?")
    for p in folder.glob(f".{glob.escape(name)}*{SCRATCH}*"):
        m = shape.fullmatch(p.name[len(name) + 1 :])
        if m and not any(process_alive(int(pid)) for pid in m.groups() if pid):
            found.append(p)
    return found
