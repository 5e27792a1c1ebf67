"""A plan: units of work with their statistics, and the ops each unit runs.

A :class:`Unit` moves one state of one tensor (or writes the padding of the target) and
carries closed-form statistics — ops by kind, bytes read / written / swapped, peak memory —
so a plan for 65,536 ranks is summarised without building its ops. Ops are built on demand
(:meth:`Plan.ops`) from the placements the plan was compiled from; a plan loaded from JSON
carries them explicitly. Workers run their units one at a time; a runtime holds a unit's
``peak_bytes`` from a memory budget while the unit runs, so the plan's peak never exceeds
the budget.

JSON is versioned and deterministic (sorted keys, no floats from timing, no pickle).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from layoutc import ir
from layoutc.errors import InternalError, PlanError
from layoutc.ir import DTYPE_BYTES
from layoutc.place import place
from layoutc.place.full import WeightsPlacement
from layoutc.plan import layouts
from layoutc.plan import ops as O
from layoutc.plan.validate import validate

IO_SUMMARY_MAX_OPS = 20_000  # per-file / per-rank detail in summaries up to this many ops
PLAN_VERSION = 2


@dataclass(frozen=True)
class Stats:
    reads: int = 0
    gathers: int = 0
    merges: int = 0
    splits: int = 0
    swaps: int = 0
    writes: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    swap_bytes: int = 0
    peak_bytes: int = 0

    def ops_by_kind(self) -> dict[str, int]:
        return {
            "read": self.reads,
            "gather": self.gathers,
            "merge": self.merges,
            "split": self.splits,
            "swap": self.swaps,
            "write": self.writes,
        }

    def __add__(self, o: Stats) -> Stats:
        return Stats(
            reads=self.reads + o.reads,
            gathers=self.gathers + o.gathers,
            merges=self.merges + o.merges,
            splits=self.splits + o.splits,
            swaps=self.swaps + o.swaps,
            writes=self.writes + o.writes,
            read_bytes=self.read_bytes + o.read_bytes,
            write_bytes=self.write_bytes + o.write_bytes,
            swap_bytes=self.swap_bytes + o.swap_bytes,
            peak_bytes=max(self.peak_bytes, o.peak_bytes),
        )


def _dealing(axis: str, count: int, layout: ir.Layout) -> str:
    """``ep 4: 2 per rank``, or ``whole`` where the format keeps no topology."""
    if layout.store.format in ("safetensors", "torch", "universal"):
        return "whole"
    size = layout.mesh.sizes[axis]
    return f"{axis} {size}: {count // size} per rank"


@dataclass(frozen=True)
class Unit:
    id: int
    tensor: str
    state: str  # target state ("pad" for the target's padding)
    source_state: str | None  # None: written from zeros (fresh state, padding)
    mode: str  # "ram" | "direct" | "spill" | "fill"
    stats: Stats
    worker: int = 0
    cast: str | None = None
    route: str = ""  # one line: where the bytes come from and go
    ops: tuple[O.Op, ...] | None = field(default=None, compare=False, repr=False)
    part: int = 0  # which of the target's sources (``from``, one per block) it moves

    @property
    def bytes(self) -> int:
        return self.stats.read_bytes + self.stats.write_bytes + self.stats.swap_bytes

    def to_dict(self, ops: tuple[O.Op, ...] | None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "tensor": self.tensor,
            "state": self.state,
            "source_state": self.source_state,
            "mode": self.mode,
            "worker": self.worker,
            "cast": self.cast,
            "route": self.route,
            "stats": self.stats.__dict__.copy(),
        }
        if self.part:
            d["part"] = self.part
        if ops is not None:
            d["ops"] = [O.to_dict(o) for o in ops]
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Unit:
        ops = tuple(O.from_dict(o) for o in d["ops"]) if "ops" in d else None
        return Unit(
            d["id"],
            d["tensor"],
            d["state"],
            d["source_state"],
            d["mode"],
            Stats(**d["stats"]),
            d["worker"],
            d["cast"],
            d["route"],
            ops,
            int(d.get("part", 0)),
        )


@dataclass(frozen=True)
class Endpoint:
    """One side of a plan: which layout, in which format, on how many ranks."""

    layout: str
    format: str
    world: int
    files: int
    mesh: tuple[tuple[str, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "format": self.format,
            "world": self.world,
            "files": self.files,
            "mesh": [[name, size] for name, size in self.mesh],
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Endpoint:
        return Endpoint(
            d["layout"], d["format"], d["world"], d["files"], tuple((n, s) for n, s in d["mesh"])
        )


@dataclass(frozen=True)
class Plan:
    source: Endpoint
    target: Endpoint
    units: tuple[Unit, ...]
    workers: int = 1  # in all: ``workers // ranks`` threads on each rank
    budget: int | None = None  # bytes each rank holds at most
    warnings: tuple[str, ...] = ()
    ranks: int = 1  # processes running the plan (torchrun's world); unit -> rank: rank_of
    tag: str | None = None  # the tag a DeepSpeed or universal output is written under
    # what rebuilds both layouts (see layoutc.plan.layouts.record), and the source's files
    # as the plan saw them (see layoutc.formats.checkpoint.Checkpoint.identity)
    layouts: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    source_files: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    builder: Callable[[Unit], tuple[O.Op, ...]] | None = field(
        default=None, compare=False, repr=False
    )
    # the shard maps a compiled plan came from (not serialised): what execution creates files from
    source_placement: Any = field(default=None, compare=False, repr=False)
    target_placement: Any = field(default=None, compare=False, repr=False)
    _built: dict[int, tuple[O.Op, ...]] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    # -------------------------------------------------------------- ops

    def unit_ops(self, unit: Unit) -> tuple[O.Op, ...]:
        """The unit's ops: read back, or built by the planner once per plan (validation,
        the summary and the executor all ask)."""
        if unit.ops is not None:
            return unit.ops
        if self.builder is None:
            raise InternalError(f"unit {unit.id} has no ops and the plan has no builder")
        ops = self._built.get(unit.id)
        if ops is None:
            ops = self._built[unit.id] = self.builder(unit)
        return ops

    def ops(self) -> Iterator[tuple[Unit, O.Op]]:
        for u in self.units:
            for op in self.unit_ops(u):
                yield u, op

    def materialized(self) -> Plan:
        """The same plan with every unit's ops built (what JSON holds)."""
        return replace(self, units=tuple(replace(u, ops=self.unit_ops(u)) for u in self.units))

    # -------------------------------------------------------------- summary

    @property
    def totals(self) -> Stats:
        total = Stats()
        for u in self.units:
            total = total + u.stats
        return total

    def rank_of(self, unit: Unit) -> int:
        """The rank that runs ``unit``: workers are dealt to ranks round-robin."""
        return unit.worker % self.ranks

    def peak_per_rank(self) -> list[int]:
        """Each rank runs at most one unit per thread at a time: its ``workers // ranks``
        largest unit peaks, capped by the budget (which each rank holds on its own)."""
        threads = max(1, self.workers // self.ranks)
        peaks: list[list[int]] = [[] for _ in range(self.ranks)]
        for u in self.units:
            peaks[self.rank_of(u)].append(u.stats.peak_bytes)
        out = []
        for mine in peaks:
            peak = sum(sorted(mine, reverse=True)[:threads])
            out.append(min(peak, self.budget) if self.budget is not None else peak)
        return out

    @property
    def peak_memory_bytes(self) -> int:
        """The most memory one rank holds at once (see :meth:`peak_per_rank`)."""
        return max(self.peak_per_rank())

    def per_worker(self) -> list[dict[str, int]]:
        rows = [
            {"worker": w, "units": 0, "bytes_read": 0, "bytes_written": 0, "bytes_swapped": 0}
            for w in range(self.workers)
        ]
        for u in self.units:
            r = rows[u.worker]
            r["units"] += 1
            r["bytes_read"] += u.stats.read_bytes
            r["bytes_written"] += u.stats.write_bytes
            r["bytes_swapped"] += u.stats.swap_bytes
        return rows

    def largest(self, n: int = 10) -> list[dict[str, Any]]:
        """The ``n`` tensors moving the most bytes, with the route of each of their states."""
        by_tensor: dict[str, list[Unit]] = {}
        for u in self.units:
            if u.state != "pad":
                by_tensor.setdefault(u.tensor, []).append(u)
        ranked = sorted(by_tensor.items(), key=lambda kv: (-sum(u.bytes for u in kv[1]), kv[0]))[:n]
        return [
            {
                "tensor": name,
                "bytes": sum(u.bytes for u in units),
                "routes": [
                    {"state": u.state, "mode": u.mode, "route": u.route, "cast": u.cast}
                    for u in units
                ],
            }
            for name, units in ranked
        ]

    def experts(self) -> list[dict[str, Any]]:
        """Per mixture-of-experts layer of the target: its experts, how each end deals them
        over its expert axis, and the bytes the plan writes for them."""
        if self.target_placement is None:
            return []
        written: dict[str, int] = {}
        for u in self.units:
            written[u.tensor] = written.get(u.tensor, 0) + u.stats.write_bytes
        source = self.source_placement.layout if self.source_placement is not None else None
        out: dict[int, dict[str, Any]] = {}
        for t in self.target_placement.layout.tensors:
            dealt = self.target_placement.layout.experts_of(t)
            if dealt is None or t.layer is None:
                continue
            layer = out.setdefault(
                t.layer,
                {"layer": t.layer, "experts": dealt[1], "tensors": 0, "bytes_written": 0},
            )
            layer["target"] = _dealing(dealt[0], dealt[1], self.target_placement.layout)
            layer["source"] = "whole"
            st = source.by_name.get(t.name) if source is not None else None
            if st is not None and source is not None:
                from_ = source.experts_of(st)
                if from_ is not None:
                    layer["source"] = _dealing(from_[0], from_[1], source)
            layer["tensors"] += 1
            layer["bytes_written"] += written.get(t.name, 0)
        return [out[k] for k in sorted(out)]

    def by_file(self, n: int = 10, max_ops: int = IO_SUMMARY_MAX_OPS) -> dict[str, Any] | None:
        """Bytes read per source file and written per target rank (the ranks that hold each
        written file, as the target format assigns them), the ``n`` largest of each; None
        for plans of more than ``max_ops`` ops: counting them means building every op
        (about 6 µs each), which a summary of a plan for thousands of ranks must not do."""
        if sum(self.totals.ops_by_kind().values()) > max_ops:
            return None
        read: Counter[str] = Counter()
        written: Counter[str] = Counter()
        for _, op in self.ops():
            if isinstance(op, O.Read):
                read[op.file] += op.numel * DTYPE_BYTES[op.dtype]
            elif isinstance(op, O.Write):
                written[op.file] += op.numel * DTYPE_BYTES[op.dtype]
        ranks: Counter[str] = Counter()
        files: Counter[str] = Counter()
        for f, b in written.items():
            holder = str(self.target_placement.holders(f)) if self.target_placement else "?"
            holder = "every rank" if holder == "{all}" else holder
            ranks[holder] += b
            files[holder] += 1
        return {
            "read_by_file": [{"file": f, "bytes": b} for f, b in _top(read, n)],
            "source_files_read": len(read),
            "written_by_rank": [
                {"ranks": r, "files": files[r], "bytes": b} for r, b in _top(ranks, n)
            ],
            "target_rank_sets": len(ranks),
        }

    def summary(self) -> dict[str, Any]:
        t = self.totals
        modes = Counter(u.mode for u in self.units)
        io = self.by_file()
        return {
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
            "units": len(self.units),
            "units_by_mode": dict(sorted(modes.items())),
            "ops_by_kind": t.ops_by_kind(),
            "ops": sum(t.ops_by_kind().values()),
            "bytes_read": t.read_bytes,
            "bytes_written": t.write_bytes,
            "bytes_swapped": t.swap_bytes,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_memory_bytes_all_ranks": sum(self.peak_per_rank()),
            "memory_budget_bytes": self.budget,
            "ranks": self.ranks,
            # counted from the ops when they are listed, else the closed form (an upper bound)
            "files_read": io["source_files_read"] if io else self.source.files,
            "files_written": self.target.files,
            "workers": self.workers,
            "per_worker": self.per_worker(),
            "largest": self.largest(),
            "experts": self.experts(),
            "io": io,
            "warnings": list(self.warnings),
        }

    # -------------------------------------------------------------- JSON

    def to_dict(self, with_ops: bool = True) -> dict[str, Any]:
        return {
            "layoutc_plan": PLAN_VERSION,
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
            "workers": self.workers,
            "budget": self.budget,
            "ranks": self.ranks,
            "tag": self.tag,
            "warnings": list(self.warnings),
            "layouts": self.layouts if self.layouts is not None else self._record(),
            "source_files": self.source_files,
            "units": [u.to_dict(self.unit_ops(u) if with_ops else None) for u in self.units],
        }

    def _record(self) -> dict[str, Any] | None:
        """What rebuilds the plan's layouts (None unless both were read from text)."""
        if self.source_placement is None or self.target_placement is None:
            return None
        source = layouts.record(self.source_placement.layout)
        target = layouts.record(self.target_placement.layout)
        if source is None or target is None:
            return None
        weights = isinstance(self.source_placement, WeightsPlacement)
        return {"source": source, "target": target, "source_is_weights": weights}

    def to_json(self, with_ops: bool = True, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(with_ops), sort_keys=True, indent=indent)

    @staticmethod
    def from_dict(d: dict[str, Any], where: str = "the plan") -> Plan:
        """The plan ``d`` holds (:meth:`to_dict`), with its layouts rebuilt and placed;
        ``where`` names it in a refusal (:class:`~layoutc.errors.PlanError`)."""
        version = d.get("layoutc_plan") if isinstance(d, dict) else None
        if version != PLAN_VERSION:
            raise PlanError(
                f"{where}: plan format version {version!r} is not {PLAN_VERSION} (this "
                f"layoutc reads {PLAN_VERSION}; plan again)"
            )
        try:
            plan = Plan(
                Endpoint.from_dict(d["source"]),
                Endpoint.from_dict(d["target"]),
                tuple(Unit.from_dict(u) for u in d["units"]),
                d["workers"],
                d["budget"],
                tuple(d["warnings"]),
                d["ranks"],
                d["tag"],
                d["layouts"],
                d["source_files"],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"{where}: not a layoutc plan ({type(e).__name__}: {e})") from None
        recorded = d["layouts"]
        if recorded is None:
            return plan
        source = layouts.rebuild(recorded["source"])
        target = place(layouts.rebuild(recorded["target"]))
        # full weights are placed as their files hold them: by the executor, from the files
        placed = None if recorded["source_is_weights"] else place(source)
        return replace(plan, source_placement=placed, target_placement=target)

    @staticmethod
    def from_json(text: str, where: str = "the plan") -> Plan:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{where}: not JSON ({e})") from None
        return Plan.from_dict(doc, where)

    def validate(self, source: Any = None, target: Any = None) -> None:
        """Check the plan; see :func:`layoutc.plan.validate.validate`. A plan read back from
        JSON that fails raises :class:`~layoutc.errors.PlanError` (the plan file is wrong); a
        plan compiled in this process (it has its op builder) that fails raises
        :class:`~layoutc.errors.InternalError`: the planner built it, so it is layoutc's bug."""
        try:
            validate(self, source, target)
        except PlanError as e:
            if self.builder is None:  # read back from JSON: the file is wrong
                raise
            raise InternalError(f"the compiled plan is invalid: {e}") from None


def _top(counts: Counter[str], n: int) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
