"""Convert a checkpoint on disk: check its layout, plan, run, commit.

The steps, each refusing to go on if the previous one found a problem:

1. the source layout is inferred from the checkpoint (or read from ``--spec``) and checked
   against the files — every buffer the layout places must be there, with its size and
   dtype — before a byte of tensor data is read; the slices it stores several times must
   agree, and its 16-bit weights must be the rounding of their masters;
2. the plan is compiled (:mod:`layoutc.plan.request`) and validated;
3. the runtime runs it (:mod:`layoutc.runtime.execute`): the target's files are created
   under a temporary folder next to the output and filled — the plan reads exactly the runs
   it needs from the source files and writes at known offsets of the output files;
4. the output is committed in one step (:mod:`layoutc.runtime.commit`): CRCs patched, the
   markers a loader looks for (``latest``, ``latest_universal``, the safetensors index) and a
   manifest of each file's size and CRC-32 (``layoutc-manifest.json``, with the plan's digest
   and layoutc's version) written beside the files, everything fsynced, and the folder
   renamed into place. The output folder is checked before step 3: not a file or a link,
   empty, outside the source, with room for what the plan writes.

A plan saved by ``layoutc plan CKPT -o`` runs later through :func:`execute_saved`, after
the checkpoint's files are found to be the ones planned. Nothing pickled runs: the source
is read with the restricted unpickler, and DeepSpeed need not be installed.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from layoutc.errors import UsageError
from layoutc.formats.checkpoint import Checkpoint
from layoutc.formats.dcp import DcpCheckpoint
from layoutc.formats.deepspeed import DeepSpeedCheckpoint
from layoutc.formats.match import check_against, check_masters, check_replicas
from layoutc.formats.sources import open_source
from layoutc.place import Placement
from layoutc.plan.plan import Plan
from layoutc.plan.request import DEFAULT_PARAM_GROUP as DEFAULT_PARAM_GROUP  # the API's
from layoutc.plan.request import default_param_groups, plan_checkpoint, source_placement
from layoutc.runtime import distributed
from layoutc.runtime.commit import MANIFEST as MANIFEST  # re-exported: the API's names
from layoutc.runtime.commit import OutputError as OutputError
from layoutc.runtime.commit import OutputExists as OutputExists
from layoutc.runtime.commit import (
    check_output,
)
from layoutc.runtime.commit import plan_digest as plan_digest
from layoutc.runtime.commit import verify as verify
from layoutc.runtime.execute import RankFailed as RankFailed
from layoutc.runtime.execute import Report, SourceFiles, prepare_output, preview, run


def convert(
    checkpoint: str | Path,
    output: str | Path,
    to: str | Path,
    *,
    spec: str | Path | None = None,
    tag: str | None = None,
    memory_budget: int | None = None,
    workers: int | None = 1,
    dtype: str | None = None,
    max_shard_size: int | None = None,
    zero: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    overrides: Mapping[str, int] | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    sha256: bool = False,
    dry_run: bool = False,
    restart: bool = False,
    tell: Callable[[str], None] | None = None,
) -> Report:
    """Convert ``checkpoint`` — a DeepSpeed checkpoint, or full weights (safetensors, a
    torch state dict, a Hugging Face folder) with ``spec`` describing the model — into
    ``output`` in format (or layout file) ``to``; ``overrides`` set mesh axes or let
    constants of the target (``--set``), ``zero`` its ZeRO stage (``--zero``);
    ``param_groups`` are the optimizer
    hyperparameters written with fresh optimizer state (a source without any);
    ``sha256``: record each output file's SHA-256 in the manifest too. ``dry_run``: plan
    and check everything the run would (see :func:`_check_and_run`), then stop: nothing is
    written and the report holds the plan and no files. A run of the same command that
    stopped short (killed, interrupted, out of disk) is gone on from, unless ``restart``;
    ``tell`` gets a line about each such folder and what is done with it."""
    start = time.perf_counter()
    handle = open_source(checkpoint, tag)
    try:
        group = distributed.current()
        plan = plan_checkpoint(
            handle,
            to,
            spec=spec,
            overrides=overrides,
            dtype=dtype,
            max_shard_size=max_shard_size,
            zero=zero,
            memory=memory_budget,
            workers=workers,
            ranks=group.world if group is not None else 1,
        )
        plan, param_groups = default_param_groups(plan, handle, param_groups)
        how = _How(progress, on_plan, param_groups, sha256, restart, tell)
        return _check_and_run(plan, handle, output, how, start, dry_run)
    finally:
        handle.close()


def execute_saved(
    plan: Plan,
    checkpoint: Checkpoint | str | Path,
    output: str | Path,
    *,
    progress: Callable[[int, int], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    sha256: bool = False,
    restart: bool = False,
    tell: Callable[[str], None] | None = None,
) -> Report:
    """Run a plan saved by ``layoutc plan CKPT -o plan.json`` (and read back with
    :meth:`Plan.from_json`) on ``checkpoint``, as ``convert`` would have run it: refused
    if the checkpoint's files are not those the plan was made from (one missing, of
    another size, or other metadata), then checked like ``convert`` checks its source."""
    start = time.perf_counter()
    if plan.layouts is None or plan.source_files is None:
        raise UsageError(
            "this plan does not record its source checkpoint (plan a checkpoint folder, not "
            "a layout file, to save a plan that can run on its own)"
        )
    folder = checkpoint.folder if isinstance(checkpoint, Checkpoint) else Path(checkpoint)
    # the tag the plan was made from, not whatever `latest` names now
    handle = open_source(folder, plan.tag if plan.tag and (folder / plan.tag).is_dir() else None)
    try:
        handle.check_identity(plan.source_files)
        if plan.source_placement is not None and not isinstance(handle, DcpCheckpoint):
            check_against(plan.source_placement, handle)  # placed as it was read back
        else:  # full weights, a DCP's chunks: placed where their files hold them
            layout = plan.layouts["source"]
            _, placed = source_placement(handle, layout=(layout["text"], layout["name"]))
            plan = replace(plan, source_placement=placed)
        how = _How(progress, on_plan, param_groups, sha256, restart, tell)
        return _check_and_run(plan, handle, output, how, start)
    finally:
        handle.close()


@dataclass(frozen=True)
class _How:
    """How a checked plan runs: what the caller is told, and what is written besides."""

    progress: Callable[[int, int], None] | None
    on_plan: Callable[[Plan], None] | None
    param_groups: list[dict[str, Any]] | None
    sha256: bool
    restart: bool
    tell: Callable[[str], None] | None


def _check_and_run(
    plan: Plan,
    handle: Checkpoint,
    output: str | Path,
    how: _How,
    start: float,
    dry_run: bool = False,
) -> Report:
    """Check the source's copies, the output folder and the plan, then run it. A dry run
    checks also the free space and what the writers need (param groups, a format they
    write), by creating the output's files in a temporary folder: their headers only,
    every tensor a hole; then it stops."""
    if isinstance(handle, DeepSpeedCheckpoint):
        check_copies(plan.source_placement, handle)
    out = Path(output)
    check_output(out, plan if dry_run else None, handle.folder)  # before the plan is shown
    plan.validate(plan.source_placement, plan.target_placement)
    if dry_run:
        check_writers(plan, handle, how.param_groups)
        if how.tell is not None:
            preview(plan, handle, out, None, how.param_groups, how.restart, how.tell)
        if how.on_plan is not None:
            how.on_plan(plan)
        return Report(out, [], 0, 0, time.perf_counter() - start, 0, plan, plan.warnings)
    if how.on_plan is not None:
        how.on_plan(plan)
    return run(
        plan,
        handle,
        output,
        None,
        how.progress,
        start,
        how.param_groups,
        how.sha256,
        how.restart,
        how.tell,
    )


def check_writers(
    plan: Plan, handle: Checkpoint, param_groups: list[dict[str, Any]] | None
) -> None:
    """What the output's writers need (param groups for fresh optimizer state, a format
    they write), checked by creating the output's files in a temporary folder: their
    headers only, every tensor a hole."""
    with tempfile.TemporaryDirectory(prefix="layoutc-dry-run-") as tmp:
        prepared = prepare_output(plan, Path(tmp), handle, None, param_groups)
        prepared.views.clear()
        prepared.io.close()


def check_copies(placement: Placement, source: Checkpoint) -> None:
    """The slices a layout stores several times hold the same values in every copy (see
    :func:`~layoutc.formats.match.check_replicas`), and low-precision weights are the
    rounding of their masters (:func:`~layoutc.formats.match.check_masters`)."""
    files = SourceFiles(source)
    try:

        def read(f: str, k: str, at: int, n: int) -> np.ndarray:
            return np.asarray(files[(f, k)][at : at + n]).reshape(-1)

        check_replicas(placement, read)
        check_masters(placement, read)
    finally:
        files.close()


def execute(
    plan: Plan,
    source: Checkpoint | str | Path,
    output: str | Path,
    *,
    tag: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    started: float | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    sha256: bool = False,
    restart: bool = False,
) -> Report:
    """Run a plan: read ``source`` (the checkpoint, or the folder holding its files, e.g.
    a DeepSpeed tag folder), write ``output`` atomically with its manifest (with
    ``sha256``, each file's SHA-256 too, read back once). A plan read back from JSON that
    records its source checkpoint runs as :func:`execute_saved` runs it; any other must
    carry its layouts (compiled here, or read back from layout files). An output that
    cannot be committed is refused before the plan runs, a failure of its filesystem
    midway raises :class:`~layoutc.runtime.commit.OutputError` and nothing is committed
    (a full disk, like an interruption, keeps what was written for the same call to go on
    from; ``restart`` starts over)."""
    if plan.builder is None and plan.source_files is not None:
        return execute_saved(
            plan,
            source,
            output,
            progress=progress,
            param_groups=param_groups,
            sha256=sha256,
            restart=restart,
        )
    return run(plan, source, output, tag, progress, started, param_groups, sha256, restart)
