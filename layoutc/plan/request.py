"""A checkpoint and a target, planned: what ``layoutc plan CKPT`` and ``layoutc convert``
decide before a byte of tensor data is read.

The source's layout is given (``--spec``) or inferred, and checked against the
checkpoint's files through its handle (full weights are placed as their files hold
them); the target is resolved (:func:`~layoutc.plan.layouts.target_for`); the plan is
compiled for the ranks and workers that will run it, and carries what it needs to run
later on its own: both layouts and the source's identity (each file's size and a digest
of the metadata the plan relied on). Metadata only: nothing here imports numpy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from layoutc import ir
from layoutc.errors import UsageError
from layoutc.formats.checkpoint import Checkpoint
from layoutc.formats.dcp import DcpCheckpoint
from layoutc.formats.dcp import check as check_dcp
from layoutc.formats.deepspeed import DeepSpeedCheckpoint
from layoutc.formats.match import check_against
from layoutc.formats.weights import Weights, check_weights
from layoutc.formats.weights import infer_text as infer_weights
from layoutc.lang.check import load_text
from layoutc.lang.parse import read_source
from layoutc.place import Placement, place
from layoutc.place.dcp import DcpPlacement
from layoutc.place.full import WeightsPlacement
from layoutc.plan.compile import compile_plan
from layoutc.plan.layouts import source_text, target_for
from layoutc.plan.plan import Plan

DEFAULT_ZERO = 2  # the ZeRO stage of a DeepSpeed target made from full weights (--zero)


def default_workers() -> int:
    """One worker per CPU this process may run on (at most 16)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 16))


def workers_for(target: ir.Layout, workers: int | None) -> int:
    """``workers`` if given, else the target's ``store { writers N }``, else one per CPU."""
    if workers is not None:
        return workers
    return target.store.writers if target.store.writers_given else default_workers()


def source_placement(
    source: Checkpoint, spec: str | Path | None = None, layout: tuple[str, str] | None = None
) -> tuple[ir.Layout, Placement]:
    """The layout of ``source`` — the text ``layout`` (text, name), else ``spec``, else
    inferred — and its shard map, checked against the files; full weights need a layout
    and are placed as their files hold them."""
    if isinstance(source, Weights):
        if layout is None and spec is None:  # every tensor trainable, one rank, ZeRO-2
            layout = (infer_weights(source), f"{source.folder} (inferred)")
        if layout is None:
            assert spec is not None
            layout = (read_source(spec), str(spec))
        src = load_text(*layout)
        check_weights(src, source)
        held = src.with_store(replace(src.store, format=source.format))
        return src, WeightsPlacement(held, source.entries, source.format)
    if isinstance(source, DcpCheckpoint):
        src = load_text(*(layout or source_text(source, spec)))
        if src.store.format != "dcp":
            raise UsageError(
                f"{source.folder}: a distributed checkpoint; the layout {src.source} stores "
                f"{src.store.format} (declare store dcp)"
            )
        placed_dcp = DcpPlacement(src, source.index)
        check_dcp(placed_dcp, source)
        return src, placed_dcp
    assert isinstance(source, DeepSpeedCheckpoint)
    src = load_text(*(layout or source_text(source, spec)))
    placed = place(src)
    check_against(placed, source)
    return src, placed


def plan_checkpoint(
    source: Checkpoint,
    to: str | Path,
    *,
    spec: str | Path | None = None,
    overrides: Mapping[str, int] | None = None,
    dtype: str | None = None,
    max_shard_size: int | None = None,
    zero: int | None = None,
    memory: int | None = None,
    workers: int | None = None,
    ranks: int = 1,
) -> Plan:
    """The plan converting ``source`` to ``to`` (a format name or a ``.layout`` file) with
    the command line's options, for ``ranks`` processes of ``workers`` threads each (by
    default: :func:`workers_for` the target)."""
    layout, S = source_placement(source, spec)
    ckpt = source if isinstance(source, DeepSpeedCheckpoint) else None
    assert layout.text is not None
    chosen = None
    weights = isinstance(source, Weights)
    if weights and spec is None:
        chosen = (
            "no --spec: the layout is inferred from the weights (every tensor trainable, Adam "
            f"with fp32 masters, ZeRO-{DEFAULT_ZERO} over dp); `layoutc infer "
            f"{source.folder}` prints it, to edit and give as --spec"
        )
    elif (
        weights
        and zero is None
        and str(to) in ("deepspeed", "universal")
        and not layout.zero.axes  # a spec that declares no ZeRO stage
        and "dp" in layout.mesh.names
    ):
        zero = DEFAULT_ZERO
        chosen = (
            f"the target is ZeRO-{zero} over dp: the default for full weights whose layout "
            "declares no ZeRO stage (--zero K chooses another)"
        )
    target = target_for(
        layout,
        (layout.text, layout.source),
        to,
        overrides,
        dtype=dtype,
        max_shard_size=max_shard_size,
        checkpoint=ckpt,
        zero=zero,
    )
    plan = compile_plan(
        S, target, memory=memory, workers=workers_for(target, workers), ranks=ranks, tag=source.tag
    )
    warnings = (chosen, *plan.warnings) if chosen else plan.warnings
    return replace(plan, source_files=source.identity(), warnings=warnings)


# torch.optim.AdamW's defaults: the param group of fresh optimizer state nobody gave
DEFAULT_PARAM_GROUP: dict[str, Any] = {
    "lr": 0.001,
    "betas": [0.9, 0.999],
    "eps": 1e-08,
    "weight_decay": 0.01,
    "amsgrad": False,
}


def _default_param_groups(plan: Plan) -> tuple[Plan, list[dict[str, Any]] | None]:
    """For full weights going to a target with optimizer state (DeepSpeed, DCP) in one
    param group, and no ``param_groups`` given: that group with AdamW's defaults, and a
    warning saying so. Several groups are the user's to give (the writer says so)."""
    layout = plan.target_placement.layout
    groups = {t.group for t in layout.tensors if t.trainable}
    if layout.optimizer is None or layout.store.format not in ("deepspeed", "dcp"):
        return plan, None
    if len(groups) != 1:
        return plan, None
    shown = ", ".join(f"{k} {v}" for k, v in DEFAULT_PARAM_GROUP.items())
    warning = (
        f"no --param-groups: one param group with torch.optim.AdamW's defaults ({shown}); "
        "the job that loads the checkpoint takes them into its optimizer: give --param-groups "
        "FILE.json to choose"
    )
    return replace(plan, warnings=(*plan.warnings, warning)), [dict(DEFAULT_PARAM_GROUP)]


def default_param_groups(
    plan: Plan, handle: Checkpoint, param_groups: list[dict[str, Any]] | None
) -> tuple[Plan, list[dict[str, Any]] | None]:
    """The param groups a conversion of ``handle`` writes: those given, else for full
    weights into one group AdamW's defaults (with a warning in the plan)."""
    if param_groups is None and isinstance(handle, Weights):
        return _default_param_groups(plan)
    return plan, param_groups
