"""The layouts at both ends of a plan, resolved from what the command line names.

The source: a checkpoint's layout — given (``--spec``) or inferred from its metadata — and
checked against its files before anything is planned
(:func:`layoutc.plan.request.source_placement`).

The target (:func:`target_for`): a ``.layout`` file, or a format name, which means the
source layout stored in that format (:func:`target_layout`, the one place that rule is
written; a distributed checkpoint holds every tensor whole, :func:`whole_tensors`).
``--set`` overrides change mesh axes and let constants of whichever it is; an optimizer
without masters (FSDP's) gets fp32 ones in a DeepSpeed or universal output; ``--zero``
sets a DeepSpeed output's ZeRO stage (a universal output's: the model files its loader
reads); ``--dtype`` stores every floating tensor of a safetensors or torch output in that
dtype, and a DeepSpeed output's parameters (its masters stay fp32); ``--max-shard-size``
caps a safetensors output's shards. ``layoutc plan`` and ``layoutc convert`` resolve
their target here, so the dry run shows what the conversion would do.

Planning only: nothing here imports numpy or torch or reads a tensor's bytes (the check
against a checkpoint's files reads their metadata). Refused: a target that is neither a
layout nor a format (E203); ``--dtype`` for a universal or dcp output, ``--zero`` for
any but deepspeed and universal, and ``--max-shard-size`` for any but safetensors (usage
errors); an AutoTP checkpoint resharded at a tp whose cuts the layout does not prove
(:class:`Unsupported`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from layoutc import ir
from layoutc.errors import Diagnostic, LayoutError, Span, Unsupported, UsageError
from layoutc.formats import autotp, dcp
from layoutc.formats.dcp import DcpCheckpoint
from layoutc.formats.deepspeed import DeepSpeedCheckpoint, infer_text
from layoutc.lang.check import load_layout, load_text
from layoutc.lang.parse import read_source

FLOATS = frozenset({"fp32", "fp16", "bf16", "fp64"})  # what --dtype converts


def source_text(
    ckpt: DeepSpeedCheckpoint | DcpCheckpoint, spec: str | Path | None = None
) -> tuple[str, str]:
    """The text of ``ckpt``'s layout and the name diagnostics use: ``spec``, or inferred."""
    if spec is not None:
        return read_source(spec), str(spec)
    if isinstance(ckpt, DcpCheckpoint):
        return dcp.infer_text(ckpt), f"{ckpt.folder} (inferred)"
    return infer_text(ckpt), f"{ckpt.folder} (inferred)"


def target_layout(source: ir.Layout, target: ir.Layout | str) -> ir.Layout:
    """``target`` itself, or for a format name, the source layout stored in that format."""
    if isinstance(target, ir.Layout):
        return target
    if target not in ir.FORMATS:
        raise LayoutError(
            [
                Diagnostic(
                    "E203",
                    f"unknown target `{target}`",
                    Span(f"--to {target}", 0, 0),
                    "a .layout file or one of: " + ", ".join(ir.FORMATS),
                )
            ]
        )
    if target == "dcp":
        source = whole_tensors(source)
    return source.with_store(replace(source.store, format=target))


def whole_tensors(layout: ir.Layout) -> ir.Layout:
    """``layout`` with every tensor whole on each rank of its mesh: no dim split over an
    axis, padded or cut in grains. A distributed checkpoint stores each tensor under its
    logical shape, and the job that loads it cuts it as it runs (FSDP's ``zero`` cut
    along dim 0 stays)."""
    tensors = tuple(
        replace(t, dims=tuple(replace(d, split=(), pad_to=1, parts=1, grain=0) for d in t.dims))
        for t in layout.tensors
    )
    return replace(layout, tensors=tensors)


def target_for(
    source: ir.Layout,
    source_text: tuple[str, str],
    to: str | Path,
    overrides: Mapping[str, int] | None = None,
    *,
    dtype: str | None = None,
    max_shard_size: int | None = None,
    checkpoint: DeepSpeedCheckpoint | None = None,
    zero: int | None = None,
) -> ir.Layout:
    """The target layout: the ``.layout`` file ``to``, or the source layout (its text
    ``source_text`` checked again with ``overrides``, if any) stored in format ``to``;
    ``overrides`` (``--set``) change mesh axes and let constants of whichever it is, then
    ``zero``, ``dtype`` and ``max_shard_size`` apply. With the source ``checkpoint``, an AutoTP
    reshard the layout does not prove is refused (:func:`check_autotp_cuts`)."""
    if str(to) not in ir.FORMATS:
        target = load_layout(to, dict(overrides or {}))
    else:
        base = load_text(*source_text, dict(overrides)) if overrides else source
        target = target_layout(base, str(to))
    if checkpoint is not None:
        check_autotp_cuts(checkpoint, source, target)
    fmt = target.store.format
    if fmt in ("deepspeed", "universal"):
        target = with_master(target)
    if zero is not None:
        if fmt not in ("deepspeed", "universal"):
            raise UsageError(f"--zero applies to deepspeed and universal output, not {fmt}")
        target = with_zero(target, zero)
    if fmt in ("safetensors", "torch"):
        target = with_dtype(target, dtype)
    elif fmt == "deepspeed" and dtype is not None:
        target = with_weights_dtype(target, dtype)
    elif dtype is not None:
        raise UsageError(f"--dtype applies to safetensors, torch and deepspeed outputs, not {fmt}")
    if max_shard_size is not None:
        if target.store.format != "safetensors":
            raise UsageError(
                f"--max-shard-size applies to safetensors output, not {target.store.format}"
            )
        target = target.with_store(replace(target.store, max_shard_bytes=max_shard_size))
    return target


def record(layout: ir.Layout) -> dict[str, Any] | None:
    """What rebuilds ``layout`` (:func:`rebuild`) as plain data: the text it was read from,
    its name and ``--set`` overrides, and what resolving a target changed — the format,
    the shard size and ``--dtype``. None for a layout not read from text, or changed in a
    way this does not record."""
    if layout.text is None:
        return None
    rec: dict[str, Any] = {
        "text": layout.text,
        "name": layout.source,
        "overrides": [[name, value] for name, value in layout.overrides],
        "format": layout.store.format,
        "max_shard_bytes": layout.store.max_shard_bytes,
        "dtype": None,
    }
    for dtype in (None, layout.dtype):
        rec["dtype"] = dtype
        if rebuild(rec) == layout:
            return rec
    return None


def rebuild(rec: dict[str, Any]) -> ir.Layout:
    """The layout :func:`record` describes."""
    base = load_text(rec["text"], rec["name"], {name: value for name, value in rec["overrides"]})
    store = replace(base.store, format=rec["format"], max_shard_bytes=rec["max_shard_bytes"])
    return with_dtype(base.with_store(store), rec["dtype"])


def with_dtype(layout: ir.Layout, dtype: str | None) -> ir.Layout:
    """The layout with every floating tensor stored as ``dtype`` (for safetensors / torch)."""
    if dtype is None:
        return layout
    tensors = tuple(replace(t, dtype=dtype) if t.dtype in FLOATS else t for t in layout.tensors)
    opt = layout.optimizer
    return replace(
        layout, tensors=tensors, dtype=dtype, optimizer=replace(opt, master=dtype) if opt else None
    )


def with_master(layout: ir.Layout) -> ir.Layout:
    """``layout`` with an fp32 master for an optimizer that keeps none (FSDP trains the fp32
    weights themselves): DeepSpeed's optimizer always holds one, which the weights give."""
    opt = layout.optimizer
    if opt is None or opt.master:
        return layout
    return replace(layout, optimizer=replace(opt, master="fp32"))


def with_weights_dtype(layout: ir.Layout, dtype: str) -> ir.Layout:
    """``layout`` with its parameters (trainable and frozen) in ``dtype`` and the masters
    kept: the low-precision weights of a DeepSpeed output (``--dtype``). Buffers keep
    theirs, as DeepSpeed casts parameters only."""
    tensors = tuple(
        replace(t, dtype=dtype) if t.dtype in FLOATS and t.kind != ir.BUFFER else t
        for t in layout.tensors
    )
    return replace(layout, tensors=tensors, dtype=dtype)


def with_zero(layout: ir.Layout, stage: int) -> ir.Layout:
    """``layout`` partitioned by ZeRO stage ``stage`` (``--zero``) over its ZeRO axes, or
    the data-parallel axis ``dp`` when it declares none."""
    if stage not in (0, 1, 2, 3):
        raise UsageError(f"--zero {stage}: a ZeRO stage is 0, 1, 2 or 3")
    axes = layout.zero.axes
    if not axes and stage:
        if "dp" not in layout.mesh.sizes:
            raise UsageError(
                f"--zero {stage}: {layout.source} declares no ZeRO axes and no dp axis to "
                "partition over; write the target layout (zero N over AXIS)"
            )
        axes = ("dp",)
    return replace(layout, zero=replace(layout.zero, stage=stage, axes=axes))


def check_autotp_cuts(ckpt: DeepSpeedCheckpoint, source: ir.Layout, target: ir.Layout) -> None:
    """Refuse to write an AutoTP checkpoint at a tp whose cut of some tensor the layout
    does not prove (see :func:`layoutc.formats.autotp.unproven_cuts`)."""
    unproven = autotp.unproven_cuts(ckpt.model_states.get(autotp.INFO), source, target)
    if unproven:
        raise Unsupported(
            f"{ckpt.folder}: AutoTP cuts {len(unproven)} tensor(s) in whole key/value-head "
            f"groups ({', '.join(unproven[:3])}{' ...' if len(unproven) > 3 else ''}); the "
            f"layout splits them evenly, which tp = {source.mesh.size(*source.model_axes)} "
            "proves but tp = "
            f"{target.mesh.size(*target.model_axes)} may not be: write the layout (layoutc "
            "infer CKPT -o model.layout), declare each as grains(N, N / num_key_value_heads) / "
            "tp, and pass --spec model.layout"
        )
