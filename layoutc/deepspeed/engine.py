"""layoutc as DeepSpeed's checkpoint engine (``deepspeed.runtime.checkpoint_engine``).

DeepSpeed's engine hands every file of a save to ``checkpoint_engine.save(state_dict,
path)`` and reads every file of a load with ``checkpoint_engine.load(path)``. This engine
saves through :class:`~layoutc.deepspeed.saver.Saver` and loads with
``torch.load(weights_only=True)``, allowing only the DeepSpeed classes its checkpoints
pickle: a checkpoint never runs code.

It declares itself *decoupled*, so DeepSpeed neither commits a save nor writes ``latest``
itself; :func:`attach` wraps ``engine.save_checkpoint`` so that each save begins and ends a
tag of the saver, which writes ``latest`` only once the tag is complete on disk, and
``engine.load_checkpoint`` so that it reshards a checkpoint saved at another topology.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import deepspeed
import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import (
    CheckpointCommitInfo,
    CheckpointEngine,
)

from layoutc.deepspeed.resume import load_checkpoint as resume
from layoutc.deepspeed.saver import Saver
from layoutc.formats.pt import DEEPSPEED_CLASSES

NAME = "LayoutcCheckpointEngine"


@functools.cache
def _deepspeed_classes() -> list[Any]:
    found = []
    for qualname in DEEPSPEED_CLASSES:
        module, _, name = qualname.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # a class this DeepSpeed does not have
            continue
    return found


def safe_load(path: str, map_location: Any = None) -> Any:
    """``torch.load`` with ``weights_only=True`` and the DeepSpeed classes allowed."""
    with torch.serialization.safe_globals(_deepspeed_classes()):
        return torch.load(path, map_location=map_location, weights_only=True)


class LayoutcCheckpointEngine(CheckpointEngine):
    def __init__(self, saver: Saver) -> None:
        super().__init__(None)
        self.name = NAME
        self.saver = saver
        self.deepspeed_load: Any = None  # engine.load_checkpoint before attach() wrapped it

    def create(self, info: CheckpointCommitInfo) -> None:
        pass  # a tag is begun by the wrapped save_checkpoint, with its barrier

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.saver.where(path).mkdir(parents=True, exist_ok=True)

    def save(self, state_dict: Any, path: str) -> None:
        self.saver.save(state_dict, path)

    def load(self, path: str, map_location: Any = None) -> Any:
        self.saver.wait()
        return safe_load(path, map_location)

    def commit(self, info: CheckpointCommitInfo) -> bool:
        self.saver.wait()
        return True

    def is_decoupled(self) -> bool:
        return True  # DeepSpeed then leaves the commit and `latest` to this engine

    def get_commit_info(self) -> None:
        return None  # nothing for DeepSpeed's step() to commit: the saver commits

    def cleanup(self) -> None:
        self.saver.close()

    def wait(self) -> None:
        """Block until the last save is committed; raise its failure."""
        self.saver.wait()


def attach(
    engine: Any,
    *,
    async_save: bool = True,
    workers: int | None = None,
    host_memory: int | None = None,
) -> LayoutcCheckpointEngine:
    """Make ``engine`` (a ``deepspeed.initialize`` engine) save and load its checkpoints
    through layoutc: ``engine.save_checkpoint`` saves atomically (and asynchronously),
    ``engine.load_checkpoint`` resumes from any saved topology (as
    :func:`layoutc.deepspeed.load_checkpoint`), so code that calls them (a Hugging Face
    Trainer) gets both. Call it on every rank, after ``deepspeed.initialize``."""
    saver = Saver(async_save=async_save, workers=workers, host_memory=host_memory)
    ours = LayoutcCheckpointEngine(saver)
    engine.checkpoint_engine = ours
    original = engine.save_checkpoint

    @functools.wraps(original)
    def save_checkpoint(
        save_dir: str,
        tag: Any = None,
        client_state: dict[str, Any] | None = None,
        save_latest: bool = True,
        exclude_frozen_parameters: bool = False,
    ) -> Any:
        if tag is None:
            tag = f"global_step{engine.global_steps}"  # DeepSpeed's default, fixed here
        saver.begin(save_dir, str(tag))
        try:
            result = original(
                save_dir,
                str(tag),
                client_state=client_state if client_state is not None else {},
                save_latest=save_latest,
                exclude_frozen_parameters=exclude_frozen_parameters,
            )
        except BaseException:
            saver.abort()
            raise
        saver.end(save_latest)
        return result

    engine.save_checkpoint = save_checkpoint

    deepspeed_load = ours.deepspeed_load = engine.load_checkpoint

    @functools.wraps(deepspeed_load)
    def load_checkpoint(load_dir: str, tag: Any = None, **kw: Any) -> Any:
        return resume(engine, load_dir, tag, load=deepspeed_load, **kw)

    engine.load_checkpoint = load_checkpoint
    return ours


def attach_all(**options: Any) -> None:
    """Wrap ``deepspeed.initialize`` so that it attaches every engine it makes."""
    made = deepspeed.initialize
    if getattr(made, "layoutc", False):
        return

    @functools.wraps(made)
    def initialize(*args: Any, **kw: Any) -> Any:
        out = made(*args, **kw)
        attach(out[0], **options)
        return out

    initialize.layoutc = True  # type: ignore[attr-defined]
    deepspeed.initialize = initialize
