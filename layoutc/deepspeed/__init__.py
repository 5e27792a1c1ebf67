"""layoutc inside a DeepSpeed training job: saving that never stalls training or leaves a
half-written tag, and resuming at another topology.

::

    engine, *_ = deepspeed.initialize(...)
    layoutc.deepspeed.attach(engine)                    # one line: saves go through layoutc
    layoutc.deepspeed.load_checkpoint(engine, "ckpt")   # resume, whatever the saved topology
    ...
    engine.save_checkpoint("ckpt")                      # returns once the tensors are copied

See docs/training.md. torch and DeepSpeed are imported on first use: importing this module
costs nothing, and neither is a dependency of layoutc (``pip install layoutc[deepspeed]``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from layoutc.deepspeed.errors import SaveFailed

if TYPE_CHECKING:
    from layoutc.deepspeed.engine import LayoutcCheckpointEngine


def _engine() -> Any:
    try:
        from layoutc.deepspeed import engine  # lazy: torch and DeepSpeed, loaded on first use
    except ModuleNotFoundError as e:
        if e.name not in ("torch", "deepspeed"):
            raise
        raise ModuleNotFoundError(
            f"layoutc.deepspeed runs inside a DeepSpeed job and needs {e.name}, which is not "
            "installed here: pip install 'layoutc[deepspeed]'",
            name=e.name,
        ) from None
    return engine


def attach(
    engine: Any,
    *,
    async_save: bool = True,
    workers: int | None = None,
    host_memory: int | None = None,
) -> LayoutcCheckpointEngine:
    """Install layoutc's checkpoint engine on a live DeepSpeed ``engine`` (every rank).

    ``async_save``: ``save_checkpoint`` returns once the tensors are copied to host memory,
    and the files are written and committed while training goes on; the next save, a
    load, ``engine.checkpoint_engine.wait()`` or ``engine.destroy()`` waits for it and
    raises its failure. ``workers``: writer threads per rank (default 4). ``host_memory``:
    bytes of host buffers an asynchronous save may hold (default: as much as one save's
    tensors); beyond it, the copy waits for writes to finish. ``engine.load_checkpoint``
    then resumes from any saved topology, as :func:`load_checkpoint` does."""
    options = {"async_save": async_save, "workers": workers, "host_memory": host_memory}
    return _engine().attach(engine, **options)


def attach_all(
    *,
    async_save: bool = True,
    workers: int | None = None,
    host_memory: int | None = None,
) -> None:
    """From now on, :func:`attach` every engine ``deepspeed.initialize`` makes: for code
    that makes the engine itself (a Hugging Face ``Trainer``, ``accelerate``). Call it on
    every rank before the engine is made; the options are :func:`attach`'s."""
    options = {"async_save": async_save, "workers": workers, "host_memory": host_memory}
    _engine().attach_all(**options)


def load_checkpoint(
    engine: Any,
    load_dir: str,
    tag: str | None = None,
    *,
    scratch: str | None = None,
    **kw: Any,
) -> Any:
    """``engine.load_checkpoint(load_dir, tag, **kw)`` from a checkpoint saved at any
    data-parallel size, ZeRO stage, dtype or AutoTP size: where the saved topology is not
    the running job's, the ranks first reshard it (natively, in parallel) into a scratch
    folder, which DeepSpeed then loads: in ``scratch`` if given (every rank must see it),
    else in ``/dev/shm`` when all ranks run on one host and it fits in a quarter of the
    memory available, else beside the checkpoint. Returns what DeepSpeed's
    ``load_checkpoint`` returns."""
    return _engine().resume(engine, load_dir, tag, scratch=scratch, **kw)


__all__ = ["SaveFailed", "attach", "attach_all", "load_checkpoint"]
