"""Plan validation: named properties, each failure naming the unit, op and piece.

* **dataflow** — every buffer is produced before it is consumed, within its unit.
* **dtypes** — an op whose output dtype differs from its input's declares ``cast``
  ("fp32->bf16"), and only then.
* **bounds** — every read lies inside a stored buffer of the source, with its dtype.
* **coverage** — every element of every stored buffer of the target is written exactly
  once (checked with sorted intervals, not per element).
* **memory** — each unit's live bytes never exceed its declared peak, and no declared peak
  exceeds the budget.

``validate(plan)`` checks what the plan alone can show (dataflow, dtypes, memory);
with the placements it was compiled from it also checks bounds and coverage.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from layoutc import ir
from layoutc.errors import PlanError
from layoutc.plan import ops as O

if TYPE_CHECKING:  # annotations only: plan.py imports this module to validate itself
    from layoutc.plan.plan import Plan, Unit


def _where(u: Unit, op: O.Op) -> str:
    return f"unit {u.id} ({u.tensor} {u.state}) op {op.id} ({op.kind})"


def _out_dtype(op: O.Op) -> str | None:
    return getattr(op, "dtype", None)


def _check_unit(u: Unit, unit_ops: tuple[O.Op, ...], budget: int | None) -> None:
    dtypes: dict[str, str] = {}
    sizes: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, op in enumerate(unit_ops):
        for name in (*O.inputs(op), *O.outputs(op)):
            last[name] = i
    live: dict[str, int] = {}
    peak = 0
    for i, op in enumerate(unit_ops):
        ins = O.inputs(op)
        for name in ins:
            if name not in dtypes:
                raise PlanError(
                    f"{_where(u, op)} consumes {name}, which no earlier op of the unit produces"
                )
        in_dtypes = {dtypes[n] for n in ins}
        if isinstance(op, O.Swap) and op.direction == "in":
            in_dtypes = {op.file_dtype}
        if isinstance(op, O.Swap) and op.direction == "out":
            in_dtypes, produced = {dtypes[op.buf]}, op.file_dtype
        else:
            produced = _out_dtype(op) or ""
        if isinstance(op, O.Write):
            if op.src is not None and dtypes[op.src] != op.dtype:
                raise PlanError(
                    f"{_where(u, op)} writes {dtypes[op.src]} data as {op.dtype} without a cast"
                )
        elif not isinstance(op, O.Read):
            cast = getattr(op, "cast", None)
            if len(in_dtypes) > 1:
                raise PlanError(f"{_where(u, op)} mixes input dtypes {sorted(in_dtypes)}")
            (src,) = in_dtypes
            expected = f"{src}->{produced}" if src != produced else None
            if cast != expected:
                raise PlanError(
                    f"{_where(u, op)} turns {src} into {produced} but declares cast {cast!r} (expected {expected!r})"
                )
        for name in O.outputs(op):
            dtypes[name] = produced if not isinstance(op, O.Swap) else op.dtype
            sizes[name] = _numel(op, name) * ir.DTYPE_BYTES[dtypes[name]]
            live[name] = sizes[name]
        peak = max(peak, sum(live.values()))
        for name in [n for n in live if last[n] <= i]:
            del live[name]
    if peak > u.stats.peak_bytes and u.mode != "fill":
        raise PlanError(
            f"unit {u.id} ({u.tensor} {u.state}) holds {peak} bytes, more than its declared peak {u.stats.peak_bytes}"
        )
    if budget is not None and u.stats.peak_bytes > budget:
        raise PlanError(
            f"unit {u.id} ({u.tensor} {u.state}) needs {u.stats.peak_bytes} bytes, over the budget of {budget}"
        )


def _numel(op: O.Op, name: str) -> int:
    if isinstance(op, O.Read | O.Swap):
        return op.numel
    if isinstance(op, O.Gather | O.Merge):
        return math.prod(op.shape)
    if isinstance(op, O.Split):
        for n, shape, _ in op.outs:
            if n == name:
                return math.prod(shape)
    return 0


def validate(plan: Plan, source: Any = None, target: Any = None) -> None:
    """Raise :class:`PlanError` naming the first broken property."""
    writes: dict[tuple[str, str], list[tuple[int, int, int, int]]] = defaultdict(list)
    src_buffers = {(b.file, b.key): b for b in source.buffers()} if source is not None else None
    for u in plan.units:
        unit_ops = plan.unit_ops(u)
        _check_unit(u, unit_ops, plan.budget)
        for op in unit_ops:
            if isinstance(op, O.Read) and src_buffers is not None:
                b = src_buffers.get((op.file, op.key))
                if b is None:
                    raise PlanError(
                        f"{_where(u, op)} reads {op.file}:{op.key}, which the source does not store"
                    )
                if op.offset < 0 or op.offset + op.numel > b.numel:
                    raise PlanError(
                        f"{_where(u, op)} reads {op.file}:{op.key}[{op.offset}:{op.offset + op.numel}], "
                        f"out of bounds of its {b.numel} elements"
                    )
                if op.dtype != b.dtype:
                    raise PlanError(
                        f"{_where(u, op)} reads {op.file}:{op.key} as {op.dtype}; it holds {b.dtype}"
                    )
            if isinstance(op, O.Write):
                writes[(op.file, op.key)].append((op.offset, op.offset + op.numel, u.id, op.id))
    if target is None:
        return
    dst = {(b.file, b.key): b for b in target.buffers()}
    for key, spans in writes.items():
        if key not in dst:
            u_id, op_id = spans[0][2], spans[0][3]
            raise PlanError(
                f"unit {u_id} op {op_id} writes {key[0]}:{key[1]}, which the target does not store"
            )
    for key, b in dst.items():
        spans = sorted(writes.get(key, []))
        pos = 0
        for lo, hi, u_id, op_id in spans:
            if lo < pos:
                raise PlanError(
                    f"{key[0]}:{key[1]}[{lo}:{min(hi, pos)}] is written twice (again by unit {u_id} op {op_id})"
                )
            if lo > pos:
                raise PlanError(f"{key[0]}:{key[1]}[{pos}:{lo}] is never written")
            pos = hi
        if pos < b.numel:
            raise PlanError(f"{key[0]}:{key[1]}[{pos}:{b.numel}] is never written")
        if pos > b.numel:
            raise PlanError(
                f"{key[0]}:{key[1]} is written up to {pos}, beyond its {b.numel} elements"
            )
