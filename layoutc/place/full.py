"""Shard maps of formats that store whole tensors: universal, safetensors, torch.

These formats have no topology: every tensor is one full slice (logical shape, padding and
fusing undone) stored once.

* ``universal`` — DeepSpeed's universal checkpoint: per trainable parameter
  ``zero/<name>/fp32.pt``, ``zero/<name>/<state>.pt`` and ``zero/<name>/step.pt``, each a
  dict whose ``param`` entry is the tensor; the 16-bit weights, frozen parameters and
  buffers in ``mp_rank_00_model_states.pt`` under ``module/<name>``.
* ``safetensors`` — Hugging Face layout: ``model.safetensors``, or
  ``model-0000k-of-0000N.safetensors`` when the tensors exceed the shard size, filled in
  declaration order; every parameter (frozen ones included) and buffer under its name.
* ``torch`` — one ``torch.save`` state dict, ``pytorch_model.bin``.

safetensors and torch hold one value per tensor: parameters are exported from the fp32
master when the layout has one (as DeepSpeed's zero_to_fp32 does), other tensors in their
own dtype. Tie aliases are not stored separately.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from functools import cached_property
from typing import Any

from layoutc import ir
from layoutc.errors import Unsupported
from layoutc.place.base import Placement
from layoutc.place.deepspeed import DeepSpeedPlacement, model_file_name
from layoutc.place.shards import (
    MASTER,
    STEP,
    WEIGHT,
    Run,
    Slice,
    StoredBuffer,
    full_slice,
    scalar_slice,
)

UNIVERSAL_FILES = {MASTER: "fp32"}


class FullPlacement(Placement):
    def slices(self, t: ir.Tensor, state: str) -> tuple[Slice, ...]:
        if state == STEP:
            return (scalar_slice(),)
        return (full_slice(t.shape),)

    def location(self, t: ir.Tensor, state: str) -> tuple[str, str]:
        raise NotImplementedError

    def runs(self, t: ir.Tensor, state: str, sl: Slice, copy: int, lo: int, hi: int) -> list[Run]:
        file, key = self.location(t, state)
        return [Run(file, key, lo, lo, hi - lo, self.dtype(t, state))]

    def count_runs(
        self, t: ir.Tensor, state: str, sl: Slice, lo: int, hi: int, copy: int = 0
    ) -> int:
        return 1

    def buffers(self) -> Iterator[StoredBuffer]:
        for t in self.tensors:
            for s in self.states(t):
                file, key = self.location(t, s)
                yield StoredBuffer(file, key, self.dtype(t, s), () if s == STEP else t.shape)

    def files(self) -> Iterator[str]:
        seen: set[str] = set()
        for b in self.buffers():
            if b.file not in seen:
                seen.add(b.file)
                yield b.file


class UniversalPlacement(FullPlacement):
    """DeepSpeed's universal checkpoint: optimizer states whole per parameter, and the
    model-states files as the layout's DeepSpeed placement has them (DeepSpeed reads those
    for run state — step counts, lr scheduler — and layoutc for frozen parameters and
    buffers; its converter copies them the same way)."""

    format = "universal"
    OPTIMIZER_FILE = "zero/optimizer_state.pt"  # scalars and param groups; no tensor data

    def __init__(self, layout: ir.Layout) -> None:
        super().__init__(layout)
        expert = next((t for t in layout.tensors if t.expert), None)
        if expert is not None:
            raise Unsupported(
                f"{layout.source}: {expert.name} is a native MoE expert, and DeepSpeed's "
                "universal checkpoints cannot hold those: its loader finds each parameter's "
                "folder by the parameter's name on the rank, and every expert-parallel rank "
                "names its own experts deepspeed_experts.0, 1, ... (expert 0 on one rank is "
                "expert 2 on the next). Convert to deepspeed at the new topology, or to "
                "safetensors / torch"
            )

    @cached_property
    def model(self) -> Any:
        """Where the model-states files keep weights: the DeepSpeed placement of the layout, or
        — for layouts DeepSpeed's files cannot hold (expert tensors) — whole tensors in one
        ``mp_rank_00_model_states.pt``."""
        try:
            return DeepSpeedPlacement(
                self.layout.with_store(replace(self.layout.store, format="deepspeed"))
            )
        except Unsupported:
            return _WholeModel(self.layout)

    def states(self, t: ir.Tensor) -> tuple[str, ...]:
        weight = (WEIGHT,) if WEIGHT in self.model.states(t) else ()
        return (*weight, *self.optimizer_states(t))

    def slices(self, t: ir.Tensor, state: str) -> tuple[Slice, ...]:
        return self.model.slices(t, state) if state == WEIGHT else super().slices(t, state)

    def copies(self, t: ir.Tensor, state: str) -> int:
        return self.model.copies(t, state) if state == WEIGHT else 1

    def runs(self, t: ir.Tensor, state: str, sl: Slice, copy: int, lo: int, hi: int) -> list[Run]:
        if state == WEIGHT:
            return self.model.runs(t, state, sl, copy, lo, hi)
        return super().runs(t, state, sl, copy, lo, hi)

    def count_runs(
        self, t: ir.Tensor, state: str, sl: Slice, lo: int, hi: int, copy: int = 0
    ) -> int:
        return self.model.count_runs(t, state, sl, lo, hi, copy) if state == WEIGHT else 1

    def location(self, t: ir.Tensor, state: str) -> tuple[str, str]:
        """``zero/<name>/<state>.pt``; the tensor is the file's ``param`` entry, except
        ``step.pt``, which holds the step tensor itself (key path ``""``)."""
        return (
            f"zero/{t.name}/{UNIVERSAL_FILES.get(state, state)}.pt",
            "" if state == STEP else "param",
        )

    def buffers(self) -> Iterator[StoredBuffer]:
        yield from self.model.weight_buffers()
        for t in self.trainable:
            for s in self.optimizer_states(t):
                file, key = self.location(t, s)
                yield StoredBuffer(file, key, self.dtype(t, s), () if s == STEP else t.shape)

    def pads(self) -> Iterator[Run]:
        return self.model.weight_pads()

    def files(self) -> Iterator[str]:
        yield from self.model.model_files()
        for t in self.trainable:
            for s in self.optimizer_states(t):
                yield self.location(t, s)[0]
        if self.layout.optimizer is not None:
            yield self.OPTIMIZER_FILE

    def file_count(self) -> int:
        per_param = len(self.optimizer_states(self.trainable[0])) if self.trainable else 0
        return (
            len(self.model.model_files())
            + per_param * len(self.trainable)
            + (self.layout.optimizer is not None)
        )


class _ExportPlacement(FullPlacement):
    """One value per tensor: parameters from their fp32 master when there is one."""

    def states(self, t: ir.Tensor) -> tuple[str, ...]:
        return (WEIGHT,)

    def dtype(self, t: ir.Tensor, state: str) -> str:
        opt = self.layout.optimizer
        if t.trainable and opt is not None and opt.master:
            return opt.master
        return t.dtype


class SafetensorsPlacement(_ExportPlacement):
    format = "safetensors"

    @cached_property
    def _shards(self) -> dict[str, str]:
        """Tensor name -> file: filled in declaration order up to the shard size."""
        limit = self.layout.store.max_shard_bytes
        shards: list[list[str]] = [[]]
        size = 0
        for t in self.tensors:
            n = self.state_bytes(t, WEIGHT)
            if shards[-1] and size + n > limit:
                shards.append([])
                size = 0
            shards[-1].append(t.name)
            size += n
        if len(shards) == 1:
            return {name: "model.safetensors" for name in shards[0]}
        total = len(shards)
        return {
            name: f"model-{k + 1:05d}-of-{total:05d}.safetensors"
            for k, names in enumerate(shards)
            for name in names
        }

    def location(self, t: ir.Tensor, state: str) -> tuple[str, str]:
        return self._shards[t.name], t.name

    def files(self) -> Iterator[str]:
        yield from dict.fromkeys(self._shards.values())
        if len(set(self._shards.values())) > 1:
            yield "model.safetensors.index.json"


class TorchPlacement(_ExportPlacement):
    format = "torch"

    FILE = "pytorch_model.bin"

    def location(self, t: ir.Tensor, state: str) -> tuple[str, str]:
        return self.FILE, t.name

    def file_count(self) -> int:
        return 1


class _WholeModel(FullPlacement):
    """Weights whole, in one model-states file (universal output of layouts DeepSpeed's own
    files cannot hold)."""

    FILE = model_file_name(0)

    def states(self, t: ir.Tensor) -> tuple[str, ...]:
        return (WEIGHT,)

    def location(self, t: ir.Tensor, state: str) -> tuple[str, str]:
        return self.FILE, f"module/{t.name}"

    def weight_buffers(self) -> Iterator[StoredBuffer]:
        return self.buffers()

    def weight_pads(self) -> Iterator[Run]:
        return iter(())

    def model_files(self) -> list[str]:
        return [self.FILE]


class WeightsPlacement(FullPlacement):
    """Full weights as they lie in existing files (a conversion source): every tensor whole,
    one state, ``weight``, at the file, key and dtype the files say (``entries``:
    name -> object with ``file``, ``key``, ``dtype``)."""

    def __init__(self, layout: ir.Layout, entries: Any, fmt: str) -> None:
        super().__init__(layout)
        self.entries = entries
        self.format = fmt

    def states(self, t: ir.Tensor) -> tuple[str, ...]:
        return (WEIGHT,)

    def dtype(self, t: ir.Tensor, state: str) -> str:
        return str(self.entries[t.name].dtype)

    def location(self, t: ir.Tensor, state: str) -> tuple[str, str]:
        e = self.entries[t.name]
        return e.file, e.key
