"""Syntax tree to checked :class:`~layoutc.ir.Layout`.

The checker evaluates every expression, unrolls loops, fills name templates and turns each
dim into placement facts. It collects *every* diagnostic it finds and raises once
(:class:`~layoutc.errors.LayoutError`); a user fixing a file sees all of its problems in one
run. It never decides anything about how to move bytes.

Dims. The top-level ``/`` of a dim whose right side is a mesh axis, or a tuple of mesh
axes, means "split over"; anything else is arithmetic. ``pad(n, m)`` pads a dim to a
multiple of ``m`` and is allowed only at the top of a dim; a parenthesised tuple of sizes
``(q: H, k: KV, v: KV)`` declares fused blocks, each split separately.

Limits. What a layout may expand to is bounded, and each bound is checked *before* the work
it bounds (a loop's trip count before the loop runs): :data:`MAX_TENSORS`,
:data:`MAX_EXPANDED`, :data:`MAX_ELEMENTS`, :data:`MAX_DIMS` and :data:`MAX_WORLD`. Each
is far above any real training job; past it a layout is refused (E138-E141) instead of
exhausting time or memory here or in the planner.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import math
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from layoutc import ir
from layoutc.errors import NO_SPAN, Diagnostic, LayoutError, Span
from layoutc.lang import ast
from layoutc.lang.parse import parse, read_source

_FUNCTIONS = ("pad", "grains", "min", "max", "cdiv")
_LIMIT = 2**62

# Tensors after loops are expanded: 2**18 is six times the ~45,000 tensors of a
# DeepSeek-V3-sized MoE with every expert matrix apart; checking that many takes ~4 s.
SWAP_PAGE = 4096  # swap blocks are whole pages: spills write them with O_DIRECT
MAX_TENSORS = 2**18
# Loop iterations plus the statements they run (nested loops multiplied), so loops whose
# bodies declare no tensor are bounded too; 2**20 take about a second.
MAX_EXPANDED = 2**20
# Elements of one tensor, and of all tensors together: 2**53 is thousands of times the
# largest models trained; counts stay exact as floats (JSON read by JavaScript), and bytes
# (8 an element, four copies with Adam) under 2**58, inside the int64 offsets of numpy
# and of the file formats.
MAX_ELEMENTS = 2**53
# Dims of one tensor: real tensors have at most 5; 32 is the most numpy 1.x arrays have.
MAX_DIMS = 32
# Ranks of the mesh: 2**18 = 262,144 is four times the 65,536 of specs/llama2-70b.layout and
# above the largest jobs run (~100,000 GPUs); planning visits ranks one by one (a ZeRO
# target's files), which takes minutes at a million.
MAX_WORLD = 2**18
# Close-match suggestions ("did you mean"): each compares against every known name, so a
# file with tens of thousands of mistakes stops suggesting after this many comparisons.
_GUESS_BUDGET = 200_000
_LISTED = 20  # names listed in one hint ("valid axes: ..."); more are counted, not listed

_OPTIMIZER_DEFAULTS: dict[str, tuple[tuple[str, ...], bool]] = {
    "adam": (("exp_avg", "exp_avg_sq"), True),
    "adamw": (("exp_avg", "exp_avg_sq"), True),
    "lamb": (("exp_avg", "exp_avg_sq"), True),
    "adagrad": (("sum",), True),
    "sgd": (("momentum_buffer",), False),
}

_DTYPE_ALIASES = {
    "bfloat16": "bf16",
    "float32": "fp32",
    "float": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "float64": "fp64",
    "double": "fp64",
}


class _Fail(Exception):
    """Aborts evaluating one construct after its diagnostic has been recorded."""


class _Stop(Exception):
    """Aborts expanding the whole file after a limit's diagnostic has been recorded."""


@dataclass
class _Scope:
    group: str | None = None
    stage: ast.Expr | None = None
    experts: tuple[str, str, int] | None = None  # (axis, loop variable, count) of `over`


@dataclass
class _Checker:
    file: ast.File
    source: str
    diags: list[Diagnostic] = field(default_factory=list)
    seen: dict[tuple[object, ...], int] = field(default_factory=dict)
    looping: int = 0  # loop depth, so repeats of one mistake are counted per iteration
    loops: list[tuple[ast.Loop, int]] = field(default_factory=list)  # (loop, trips left)
    expanded: int = 0  # loop iterations and the statements they ran, against MAX_EXPANDED
    guessed: int = 0  # comparisons spent on suggestions, against _GUESS_BUDGET
    names_sorted: list[str] | None = None  # known_names(), until the names change
    axis_list: list[str] = field(default_factory=list)  # axis_names()

    env: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # name -> "axis" | "let" | "loop"
    axes: list[ir.Axis] = field(default_factory=list)
    mesh_span: Span = NO_SPAN
    pipeline: str | None = None
    pipeline_span: Span = NO_SPAN
    tensors: list[ir.Tensor] = field(default_factory=list)
    declared: dict[str, ir.Tensor] = field(default_factory=dict)
    ties: list[tuple[str, str, Span, ast.Tie]] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    dtype: str = "fp32"
    overrides: dict[str, int] = field(default_factory=dict)  # --set NAME=VALUE
    zero_axes: tuple[str, ...] = ()

    # ------------------------------------------------------------ reporting

    def error(self, code: str, message: str, span: Span, hint: str = "") -> None:
        """Record a diagnostic; the same mistake at the same place (a loop body) is reported once."""
        key = (code, span.file, span.start, span.end) if span.line else (code, message)
        if key in self.seen:
            self.seen[key] += 1 if self.looping else 0
            return
        self.seen[key] = 1
        self.diags.append(Diagnostic(code, message, span, hint))

    def finish(self) -> list[Diagnostic]:
        out = []
        for d in self.diags:
            key = (
                (d.code, d.span.file, d.span.start, d.span.end)
                if d.span.line
                else (d.code, d.message)
            )
            n = self.seen.get(key, 1)
            if n > 1:
                more = f"also in {n - 1} more loop iteration{'s' if n > 2 else ''}"
                d = Diagnostic(d.code, f"{d.message} ({more})", d.span, d.hint)
            out.append(d)
        return sorted(out, key=lambda d: (d.span.file, d.span.line, d.span.column))

    def fail(self, code: str, message: str, span: Span, hint: str = "") -> _Fail:
        self.error(code, message, span, hint)
        return _Fail()

    def guess(self, word: str, options: Collection[str], cutoff: float = 0.5) -> str | None:
        """The closest of ``options`` to ``word`` (a "did you mean"), while the budget of
        comparisons lasts: each guess costs one comparison per option."""
        if self.guessed + len(options) > _GUESS_BUDGET:
            return None
        self.guessed += len(options)
        found = difflib.get_close_matches(word, list(options), n=1, cutoff=cutoff)
        return found[0] if found else None

    # ------------------------------------------------------------ expressions

    def eval(self, e: ast.Expr) -> int:
        value = self._eval(e)
        if abs(value) > _LIMIT:
            raise self.fail(
                "E133",
                f"`{_text(self.source, e.span)}` is out of range (beyond ±2**62)",
                e.span,
                "sizes, counts and indices must fit in 64 bits",
            )
        return value

    def _eval(self, e: ast.Expr) -> int:
        if isinstance(e, ast.Int | ast.Size):
            return e.value
        if isinstance(e, ast.Name):
            if e.id in self.env:
                return self.env[e.id]
            known = self.known_names()
            guess = self.guess(e.id, known)
            hint = f"did you mean `{guess}`? " if guess else ""
            hint += "known names: " + (_listing(known) if known else "none (declare with `let`)")
            raise self.fail("E110", f"unknown name `{e.id}`", e.span, hint)
        if isinstance(e, ast.Paren):
            return self.eval(e.expr)
        if isinstance(e, ast.Neg):
            return -self.eval(e.expr)
        if isinstance(e, ast.BinOp):
            a, b = self.eval(e.left), self.eval(e.right)
            if e.op in "/%" and b == 0:
                raise self.fail(
                    "E111", f"division by zero in `{_text(self.source, e.span)}`", e.span
                )
            return {
                "+": lambda: a + b,
                "-": lambda: a - b,
                "*": lambda: a * b,
                "/": lambda: a // b,
                "%": lambda: a % b,
            }[e.op]()
        if isinstance(e, ast.Call):
            if e.fn == "pad":
                raise self.fail(
                    "E118",
                    "`pad(n, m)` is allowed only at the top of a dim, e.g. [pad(V, 128) / tp, H]",
                    e.span,
                )
            if e.fn == "grains":
                raise self.fail(
                    "E136",
                    "`grains(n, g)` is allowed only at the top of a split dim, e.g. [grains(V, 64) / tp, H]",
                    e.span,
                )
            args = [self.eval(a) for a in e.args]
            if e.fn in ("min", "max") and args:
                return min(args) if e.fn == "min" else max(args)
            if e.fn == "cdiv" and len(args) == 2:
                if args[1] == 0:
                    raise self.fail("E111", "division by zero in `cdiv`", e.span)
                return -(-args[0] // args[1])
            if e.fn in ("min", "max", "cdiv"):
                wants = "two arguments" if e.fn == "cdiv" else "at least one argument"
                raise self.fail("E110", f"`{e.fn}` takes {wants}, got {len(args)}", e.span)
            raise self.fail(
                "E110",
                f"unknown function `{e.fn}`",
                e.span,
                "functions: pad(n, multiple) and grains(n, grain) at the top of a dim, "
                "min(a, ...), max(a, ...), cdiv(a, b)",
            )
        if isinstance(e, ast.Tuple):
            raise self.fail(
                "E119",
                "a tuple is not an integer",
                e.span,
                "fused blocks `(q: H, k: H)` go at the top of a dim; axis tuples `(tp, sp)` after `/`",
            )
        raise AssertionError(e)  # pragma: no cover

    def positive(self, e: ast.Expr, what: str) -> int:
        v = self.eval(e)
        if v <= 0:
            raise self.fail("E109", f"{what} is {v}; it must be positive", e.span)
        return v

    # ------------------------------------------------------------ declarations

    def declare(self, name: str, value: int, kind: str, span: Span) -> None:
        if name in self.kinds:
            raise self.fail(
                "E115",
                f"`{name}` is already defined (as a {self.kinds[name]})",
                span,
                "mesh axes, let constants and loop variables share one namespace",
            )
        self.env[name] = value
        self.kinds[name] = kind
        self.names_sorted = None

    def axis_names(self) -> list[str]:
        """The mesh axes' names (built once the mesh is read: many unknown axes must not
        each rebuild it)."""
        if len(self.axis_list) != len(self.axes):
            self.axis_list = [a.name for a in self.axes]
        return self.axis_list

    def known_names(self) -> list[str]:
        """Every name in scope, sorted; kept until a name is declared or a loop ends, so
        thousands of unknown names do not each sort them again."""
        if self.names_sorted is None:
            self.names_sorted = sorted(self.env)
        return self.names_sorted

    def require_axis(
        self, name: str, span: Span, code: str = "E101", what: str = "mesh axis"
    ) -> bool:
        if self.kinds.get(name) == "mesh axis":
            return True
        valid = self.axis_names()
        guess = self.guess(name, valid)
        hint = (f"did you mean `{guess}`? " if guess else "") + (
            "valid axes: " + _listing(valid) if valid else "declare the mesh first: mesh { dp = 8 }"
        )
        self.error(code, f"unknown {what} `{name}`", span, hint)
        return False

    def dtype_name(self, name: str, span: Span) -> str | None:
        if name in ir.DTYPES:
            return name
        canonical = _DTYPE_ALIASES.get(name)
        guess = canonical or next(
            iter(difflib.get_close_matches(name, ir.DTYPES, n=1, cutoff=0.5)), None
        )
        hint = (
            (f"did you mean `{guess}`? " if guess else "") + "valid dtypes: " + ", ".join(ir.DTYPES)
        )
        self.error("E112", f"unknown dtype `{name}`", span, hint)
        return None

    # ------------------------------------------------------------ pass 1: file-level facts

    def run(self) -> ir.Layout:
        top = self.file.body
        meshes = [s for s in top if isinstance(s, ast.Mesh)]
        for extra in meshes[1:]:
            self.error(
                "E116", "the mesh is declared twice", extra.span, "declare one `mesh { ... }`"
            )
        first_dtype = self.single(top, ast.Dtype, "dtype")
        for st in top:
            try:
                if isinstance(st, ast.Mesh) and st is meshes[0]:
                    self.mesh(st)
                elif isinstance(st, ast.Let):
                    for b in st.bindings:
                        with contextlib.suppress(_Fail):
                            value = self.overridden(b.name, b.expr, "let constant")
                            self.declare(b.name, value, "let constant", b.span)
                elif isinstance(st, ast.Dtype) and st is first_dtype:
                    self.dtype = self.dtype_name(st.name, st.span) or self.dtype
            except _Fail:
                pass
        if not meshes:
            self.error(
                "E116",
                "no mesh declared",
                Span(self.file.path, 1, 1),
                "every layout declares its device mesh, e.g. mesh { dp = 8 }",
            )
        self.unused_overrides(meshes, top)
        mesh = ir.Mesh(tuple(self.axes))
        self.pipeline_decl(top)
        zero = self.zero_decl(top)
        self.zero_axes = zero.axes
        optimizer = self.optimizer_decl(top)
        offloads = tuple(
            x for x in (self.offload_decl(s) for s in top if isinstance(s, ast.Offload)) if x
        )
        kinds = [o.what for o in offloads]
        for what in sorted({k for k in kinds if kinds.count(k) > 1}):
            dup = [x for x in top if isinstance(x, ast.Offload) and x.what == what][-1]
            self.error(
                "E115",
                f"`offload {what}` is declared twice",
                dup.span,
                "keep one offload per target",
            )
        store = self.store_decl(top)

        # pass 2: entries
        try:
            self.statements(top, _Scope())
        except _Stop:  # a limit was passed: what was expanded is incomplete, check no further
            raise LayoutError(self.finish(), self.source) from None
        tensors = self.tensors
        self.total_elements(tensors)
        ties = self.check_ties()
        self.check_groups(tensors, zero)

        if self.diags:
            raise LayoutError(self.finish(), self.source)
        name = self.file.header.name if self.file.header else Path(self.file.path).stem
        return ir.Layout(
            name=name,
            mesh=mesh,
            tensors=tuple(tensors),
            dtype=self.dtype,
            ties=ties,
            optimizer=optimizer,
            zero=zero,
            pipeline=self.pipeline,
            offloads=offloads,
            store=store,
            groups=tuple(self.groups) or ("default",),
            source=self.file.path,
        )

    def mesh(self, st: ast.Mesh) -> None:
        self.mesh_span = st.span
        if not st.axes:
            self.error("E116", "the mesh has no axes", st.span, "e.g. mesh { dp = 8 }")
        # An axis may be sized from another declared after it (`edp = dp / ep, ep = 2`):
        # sizes are evaluated once what they name is known; the axes keep their order.
        pending = list(st.axes)
        later = {b.name for b in st.axes}
        sized: dict[str, ir.Axis] = {}
        while pending:
            ready = [b for b in pending if not (_names_in(b.expr) & later) - {b.name}]
            for b in ready or pending[:1]:  # a cycle: the first reports the unknown name
                pending.remove(b)
                later.discard(b.name)
                try:
                    size = self.overridden(b.name, b.expr, "mesh axis")
                    self.declare(b.name, size, "mesh axis", b.span)
                    sized[b.name] = ir.Axis(b.name, size)
                except _Fail:
                    pass
        self.axes.extend(sized[b.name] for b in st.axes if b.name in sized)
        world = 1
        for a in self.axes:  # stops early: thousands of huge axes are never multiplied out
            world *= a.size
            if world > MAX_WORLD:
                break
        if world > MAX_WORLD:
            whole = len(self.axes) <= _LISTED
            sizes = ", ".join(f"{a.name} = {a.size}" for a in self.axes[:_LISTED])
            count = f"{math.prod(a.size for a in self.axes):,}" if whole else "more than that"
            self.error(
                "E141",
                f"the mesh has {count} ranks ({sizes}{'' if whole else ', ...'}); "
                f"a mesh has at most {MAX_WORLD:,}",
                st.span,
                "the largest training jobs run on about 100,000 devices; check the axis sizes",
            )

    def overridden(self, name: str, e: ast.Expr, kind: str) -> int:
        """The value of a mesh axis or let constant: its ``--set`` override, if any."""
        if name not in self.overrides:
            if kind != "mesh axis":
                return self.eval(e)
            if self.exact(e, name) and self.eval(e) <= 0:
                raise _Fail()  # E142 says why: dp = 6 over ep = 8 leaves no rank
            return self.positive(e, f"mesh axis `{name}`")
        v = self.overrides[name]
        if kind == "mesh axis" and v <= 0:
            self.error(  # the axis is still declared (as 1): no cascade of unknown axes
                "E109",
                f"mesh axis `{name}` is set to {v} by `--set {name}={v}`; it must be positive",
                e.span,
            )
            return 1
        return v

    def exact(self, e: ast.Expr, axis: str) -> bool:
        """Every division in a mesh axis's size divides exactly (E142): ``edp = dp / ep``
        with dp = 6 and ep = 4 would leave ranks out of the mesh. Reported once per
        division; the axis keeps the floor so that what names it is checked too. True
        when one was reported."""
        inexact = False
        for node in _nodes(e):
            if isinstance(node, ast.BinOp) and node.op == "/":
                a, b = self.eval(node.left), self.eval(node.right)
                if b and a % b:
                    inexact = True
                    left, right = (
                        _text(self.source, node.left.span),
                        _text(self.source, node.right.span),
                    )
                    self.error(  # the axis is still declared: no cascade of unknown axes
                        "E142",
                        f"mesh axis `{axis}` = {_text(self.source, e.span)}: {left} = {a} is not "
                        f"divisible by {right} = {b}",
                        node.span,
                        f"choose sizes where {right} divides {left}; the axes' sizes multiply to "
                        "the number of ranks",
                    )
        return inexact

    def unused_overrides(self, meshes: list[ast.Mesh], top: Iterable[ast.Statement]) -> None:
        settable = [b.name for m in meshes[:1] for b in m.axes]
        settable += [b.name for st in top if isinstance(st, ast.Let) for b in st.bindings]
        for name in self.overrides:
            if name in settable:
                continue
            guess = self.guess(name, settable)
            self.error(
                "E134",
                f"{self.file.path} has no mesh axis or let constant `{name}`",
                Span(f"--set {name}={self.overrides[name]}", 0, 0),
                (f"did you mean `{guess}`? " if guess else "")
                + "settable names: "
                + (_listing(settable) if settable else "none"),
            )

    def single(self, top: Iterable[ast.Statement], kind: type, what: str) -> ast.Statement | None:
        found = [s for s in top if isinstance(s, kind)]
        for extra in found[1:]:
            self.error(
                "E115", f"{what} is declared twice", extra.span, f"keep one `{what}` statement"
            )
        return found[0] if found else None

    def pipeline_decl(self, top: tuple[ast.Statement, ...]) -> None:
        st = self.single(top, ast.Pipeline, "pipeline")
        if isinstance(st, ast.Pipeline) and self.require_axis(st.axis, st.span):
            self.pipeline = st.axis
            self.pipeline_span = st.span

    def options(
        self, opts: tuple[ast.Option, ...], valid: dict[str, str], where: str
    ) -> dict[str, ast.Option]:
        """Check option names against ``valid`` (name -> what its value is)."""
        out: dict[str, ast.Option] = {}
        for o in opts:
            if o.name not in valid:
                guess = self.guess(o.name, valid)
                hint = (
                    (f"did you mean `{guess}`? " if guess else "")
                    + "valid options: "
                    + ", ".join(f"{k} {v}".strip() for k, v in valid.items())
                )
                self.error("E114", f"unknown option `{o.name}` for {where}", o.span, hint)
                continue
            if o.name in out:
                self.error("E115", f"option `{o.name}` given twice for {where}", o.span)
            wants_value = bool(valid[o.name])
            if wants_value != (o.value is not None):
                self.error(
                    "E114",
                    f"option `{o.name}` of {where} "
                    + (f"needs a value ({valid[o.name]})" if wants_value else "takes no value"),
                    o.span,
                )
                continue
            out[o.name] = o
        return out

    def int_option(self, o: ast.Option, what: str) -> int | None:
        if not isinstance(o.value, ast.Str) and o.value is not None:
            try:
                return self.positive(o.value, what)
            except _Fail:
                return None
        self.error("E114", f"{what} must be an integer", o.span)
        return None

    def zero_decl(self, top: tuple[ast.Statement, ...]) -> ir.Zero:
        st = self.single(top, ast.Zero, "zero")
        if not isinstance(st, ast.Zero):
            return ir.Zero()
        try:
            stage = self.eval(st.stage)
        except _Fail:
            return ir.Zero()
        if stage not in (0, 1, 2, 3):
            self.error(
                "E121",
                f"ZeRO stage {stage} does not exist",
                st.stage.span,
                "stages are 0, 1, 2 and 3",
            )
            return ir.Zero()
        axes_ok = True
        for a in st.axes:
            axes_ok &= self.require_axis(a, st.axes_span, "E106", "ZeRO axis")
            if a == self.pipeline:
                self.error(
                    "E106", f"ZeRO cannot partition over the pipeline axis `{a}`", st.axes_span
                )
                axes_ok = False
        if stage > 0 and not st.axes:
            self.error(
                "E106",
                f"zero {stage} needs the data-parallel axis it partitions over",
                st.span,
                f"write `zero {stage} over dp`",
            )
        opts = self.options(
            st.options,
            {"sub_group": "SIZE", "bf16_optimizer": "", "round_robin": ""},
            f"zero {stage}",
        )
        sub_group = 1_000_000_000
        if "sub_group" in opts:
            if stage != 3:
                self.error(
                    "E125", "`sub_group` applies to ZeRO stage 3 only", opts["sub_group"].span
                )
            sub_group = self.int_option(opts["sub_group"], "sub_group") or sub_group
        bf16_opt = "bf16_optimizer" in opts
        if bf16_opt and (stage > 1 or self.dtype != "bf16"):
            self.error(
                "E125",
                "`bf16_optimizer` is DeepSpeed's bf16 optimizer for ZeRO stage 0/1 with dtype bf16",
                opts["bf16_optimizer"].span,
            )
        rr = "round_robin" in opts
        if rr and stage not in (1, 2):
            self.error(
                "E125", "`round_robin` applies to ZeRO stages 1 and 2", opts["round_robin"].span
            )
        return ir.Zero(stage, st.axes if axes_ok else (), sub_group, bf16_opt, rr)

    def optimizer_decl(self, top: tuple[ast.Statement, ...]) -> ir.Optimizer | None:
        st = self.single(top, ast.Optimizer, "optimizer")
        if not isinstance(st, ast.Optimizer):
            return None
        states, step = _OPTIMIZER_DEFAULTS.get(st.name, ((), False))
        master: str | None = "fp32"
        opts = self.options(
            st.options,
            {"master": "DTYPE|none", "states": "(NAME, ...)", "step": "", "no_step": ""},
            f"optimizer {st.name}",
        )
        if "master" in opts:
            v = opts["master"].value
            if isinstance(v, ast.Name):
                master = None if v.id == "none" else self.dtype_name(v.id, v.span)
            else:
                self.error("E112", "master takes a dtype name or `none`", opts["master"].span)
        if "states" in opts:
            v = opts["states"].value
            names = _names(v)
            if names is None:
                self.error(
                    "E114",
                    "states takes a name or a tuple of names: states (exp_avg, exp_avg_sq)",
                    opts["states"].span,
                )
            else:
                states = tuple(names)
                if len(set(states)) != len(states):
                    self.error("E115", "an optimizer state is named twice", opts["states"].span)
        elif st.name not in _OPTIMIZER_DEFAULTS:
            self.error(
                "E114",
                f"optimizer `{st.name}` is not known; list its states",
                st.span,
                f"e.g. optimizer {st.name} {{ states (exp_avg), step }}; known: "
                + ", ".join(_OPTIMIZER_DEFAULTS),
            )
        if "step" in opts and "no_step" in opts:
            self.error("E115", "`step` and `no_step` contradict each other", opts["no_step"].span)
        if "step" in opts:
            step = True
        if "no_step" in opts:
            step = False
        return ir.Optimizer(st.name, master, states, step)

    def offload_decl(self, st: ast.Offload) -> ir.Offload | None:
        ok = True
        if st.what not in ("optimizer", "params"):
            self.error(
                "E128", f"cannot offload `{st.what}`", st.span, "offload `optimizer` or `params`"
            )
            ok = False
        if st.device not in ("cpu", "nvme"):
            self.error(
                "E128", f"unknown offload device `{st.device}`", st.span, "devices: cpu, nvme"
            )
            ok = False
        if st.device == "nvme" and not st.path:
            self.error(
                "E128",
                "offload to nvme needs a directory",
                st.span,
                'offload optimizer to nvme "/local_nvme"',
            )
            ok = False
        if st.device == "cpu" and st.path:
            self.error("E128", "offload to cpu takes no directory", st.span)
            ok = False
        opts = self.options(
            st.options, {"block": "SIZE", "queue": "N", "threads": "N"}, f"offload {st.what}"
        )
        values = {k: self.int_option(o, k) for k, o in opts.items()}
        block = values.get("block")
        if block is not None and block % SWAP_PAGE:
            self.error(
                "E114",
                f"option `block` of offload {st.what} is {block} bytes, not a whole number "
                f"of {SWAP_PAGE}-byte pages",
                opts["block"].span,
                "swap files are written with O_DIRECT, in whole pages: e.g. block 1MiB",
            )
            ok = False
        if not ok:
            return None
        return ir.Offload(
            st.what,
            st.device,
            st.path,
            values.get("block") or 1 << 20,
            values.get("queue") or 8,
            values.get("threads") or 1,
        )

    def store_decl(self, top: tuple[ast.Statement, ...]) -> ir.Store:
        st = self.single(top, ast.Store, "store")
        if not isinstance(st, ast.Store):
            return ir.Store()
        if st.format not in ir.FORMATS:
            guess = difflib.get_close_matches(st.format, ir.FORMATS, n=1, cutoff=0.5)
            self.error(
                "E113",
                f"unknown storage format `{st.format}`",
                st.span,
                (f"did you mean `{guess[0]}`? " if guess else "")
                + "formats: "
                + ", ".join(ir.FORMATS),
            )
        allowed = {"writers": "N", "tag": '"NAME"', "max_shard": "SIZE"}
        if st.format == "dcp":
            allowed |= {"model": '"PREFIX"', "optimizer": '"PREFIX"'}
        opts = self.options(st.options, allowed, f"store {st.format}")
        prefixes = {k: self.prefix_option(opts[k], k) for k in ("model", "optimizer") if k in opts}
        writers = self.int_option(opts["writers"], "writers") if "writers" in opts else 1
        max_shard = self.int_option(opts["max_shard"], "max_shard") if "max_shard" in opts else None
        tag = None
        if "tag" in opts:
            v = opts["tag"].value
            problem = ir.check_tag(v.value) if isinstance(v, ast.Str) else None
            if problem is not None and isinstance(v, ast.Str):
                self.error(
                    "E137",
                    f'the tag "{_shown(v.value)}" {problem}; a tag is one folder name',
                    v.span,
                    'the tag names the folder of one checkpoint inside the output, e.g. tag "global_step100"',
                )
            elif isinstance(v, ast.Str):
                tag = v.value
            else:
                self.error("E114", 'tag takes a string: tag "global_step100"', opts["tag"].span)
        return ir.Store(
            st.format if st.format in ir.FORMATS else "deepspeed",
            writers or 1,
            max_shard or 5_000_000_000,
            tag,
            "writers" in opts,
            prefixes.get("model", ir.Store.model_prefix),
            prefixes.get("optimizer", ir.Store.optimizer_prefix),
        )

    def prefix_option(self, opt: ast.Option, name: str) -> str:
        """A distributed checkpoint's key prefix: a string (``"model."``, or ``""`` for none)."""
        v = opt.value
        if isinstance(v, ast.Str):
            return v.value
        self.error(
            "E114",
            f'{name} takes a string, the prefix of its keys in the checkpoint: {name} "{name}."',
            opt.span,
        )
        return ""

    # ------------------------------------------------------------ pass 2: entries

    def statements(self, body: tuple[ast.Statement, ...], scope: _Scope) -> None:
        for st in body:
            try:
                if isinstance(st, ast.Entry):
                    self.entry(st, scope)
                elif isinstance(st, ast.Loop):
                    self.loop(st, scope)
                elif isinstance(st, ast.Group):
                    stage = st.stage if st.stage is not None else scope.stage
                    inner = _Scope(st.name, stage, scope.experts)
                    if st.name not in self.groups:
                        self.groups.append(st.name)
                    self.statements(st.body, inner)
                elif isinstance(st, ast.Tie):
                    self.ties.append(
                        (self.template(st.alias), self.template(st.source), st.span, st)
                    )
                elif body is not self.file.body:  # a file-level statement in a loop or group
                    self.error(
                        "E132",
                        "this statement belongs at the top level of the file, not inside a loop or group",
                        st.span,
                    )
            except _Fail:
                pass

    def loop(self, st: ast.Loop, scope: _Scope) -> None:
        start, stop = self.eval(st.start), self.eval(st.stop)
        if stop <= start:
            self.error(
                "E122",
                f"the loop `for {st.var} in {start}..{stop}` is empty",
                st.span,
                "ranges are half-open: `for i in 0..L` runs i = 0 .. L-1",
            )
            return
        self.expansion(st, stop - start)
        experts = scope.experts
        if st.over is not None:
            experts = (self.expert_axis(st, start, stop, scope), st.var, stop)
        self.declare(st.var, start, "loop variable", st.span)
        try:
            stage = st.stage if st.stage is not None else scope.stage
            inner = _Scope(scope.group, stage, experts)
            self.looping += 1
            self.loops.append((st, stop - start))
            for i in range(start, stop):
                self.loops[-1] = (st, stop - i)
                self.env[st.var] = i
                self.statements(st.body, inner)
        finally:
            self.loops.pop()
            self.looping -= 1
            del self.env[st.var]
            del self.kinds[st.var]
            self.names_sorted = None

    def expert_axis(self, st: ast.Loop, start: int, stop: int, scope: _Scope) -> str:
        """The axis a loop deals its experts over (``for e in 0..E over ep``): a mesh axis,
        not the pipeline's, in no other such loop, over experts numbered from 0 that share
        out equally."""
        axis = st.over
        assert axis is not None
        head = f"`for {st.var} in {start}..{stop} over {axis}`"
        if not self.require_axis(axis, st.over_span, "E143", "expert axis"):
            raise _Fail()
        if axis == self.pipeline:
            raise self.fail(
                "E143",
                f"{head} deals experts over the pipeline axis `{axis}`",
                st.over_span,
                "experts go over an expert-parallel axis; stages are given with `stage`",
            )
        if scope.experts is not None:
            raise self.fail(
                "E143",
                f"{head} is inside the expert loop over `{scope.experts[0]}`",
                st.over_span,
                "one loop deals the experts of a layer; loops inside it repeat what each expert holds",
            )
        if start != 0:
            raise self.fail(
                "E143",
                f"{head}: expert ids {start}..{stop - 1} do not start at 0",
                st.start.span,
                f"an expert loop runs over every expert id of its layer: for {st.var} in 0..{stop} over {axis}",
            )
        size = self.env[axis]
        if stop % size:
            raise self.fail(
                "E143",
                f"{head}: {stop} experts do not share out over {axis} = {size}",
                st.stop.span,
                f"each {axis} coordinate holds the same number of experts: make {axis} divide {stop}",
            )
        return axis

    def expansion(self, st: ast.Loop, trips: int) -> None:
        """Refuse (E138) a loop that would take the layout past :data:`MAX_EXPANDED` loop
        iterations and statements or :data:`MAX_TENSORS` tensors, before it runs: its trips
        times what is left of the loops around it, times what its body holds."""
        outer = math.prod(left for _, left in self.loops)
        runs = trips * outer
        statements, entries = _count(st.body)
        tensors = runs * entries
        expanded = self.expanded + runs * (1 + statements)
        if expanded <= MAX_EXPANDED and len(self.tensors) + tensors <= MAX_TENSORS:
            self.expanded += trips * (1 + statements)
            return
        span = Span(
            st.span.file,
            st.start.span.line,
            st.start.span.column,
            st.start.span.start,
            st.stop.span.end,
        )
        head = f"the loop `for {st.var} in {_text(self.source, st.start.span)}..{_text(self.source, st.stop.span)}`"
        nested = (
            f" in all ({trips:,} times in each of {outer:,} runs of the loops around it)"
            if outer > 1
            else ""
        )
        if expanded > MAX_EXPANDED:
            message = (
                f"{head} runs {runs:,} times{nested}: {runs * (1 + statements):,} loop "
                f"iterations and statements; a layout expands to at most {MAX_EXPANDED:,}"
            )
        else:
            message = (
                f"{head} declares {tensors:,} tensors{nested}; a layout has at most "
                f"{MAX_TENSORS:,} tensors"
            )
        self.error(
            "E138",
            message,
            span,
            "ranges are half-open: `for i in 0..L` runs L times; check the bounds",
        )
        raise _Stop()

    def template(self, t: ast.Template) -> str:
        out = []
        for p in t.parts:
            if isinstance(p, str):
                out.append(p)
                continue
            v = self.eval(p)
            if v < 0:
                raise self.fail(
                    "E124",
                    f"{{{_text(self.source, p.span)}}} in {t.text} is {v}; names hold non-negative numbers",
                    p.span,
                )
            out.append(str(v))
        return "".join(out)

    def entry_source(
        self, st: ast.Entry, name: str, dims: list[ir.Dim]
    ) -> tuple[tuple[str | None, str], ...]:
        """``from``: the tensor another layout holds this one's data under, or one per named
        block of its fused dim, each block named once (E144)."""
        if not st.source:
            return ()
        if st.source[0][0] is None:
            return ((None, self.template(st.source[0][1])),)
        fused = [d for d in dims if d.fused and all(b.name for b in d.blocks)]
        if len(fused) != 1:
            raise self.fail(
                "E144",
                f"{name} takes its blocks from other tensors but has "
                + ("no dim of named blocks" if not fused else f"{len(fused)} dims of named blocks"),
                st.source_span,
                "name the blocks of one dim: [E, (gate: F, up: F), H] from (gate: w1, up: w3)",
            )
        blocks = [b.name for b in fused[0].blocks]
        given = [b for b, _, _ in st.source]
        for b, _, span in st.source:
            if b not in blocks:
                raise self.fail(
                    "E144",
                    f"{name} has no block `{b}`",
                    span,
                    f"its blocks: {', '.join(str(x) for x in blocks)}",
                )
            if given.count(b) > 1:
                raise self.fail("E144", f"{name}: block `{b}` is given twice", span)
        missing = [b for b in blocks if b not in given]
        if missing:
            raise self.fail(
                "E144",
                f"{name}: `from` gives no tensor for block `{missing[0]}`",
                st.source_span,
                "give every block its tensor",
            )
        return tuple((b, self.template(t)) for b, t, _ in st.source)

    def entry_stages(self, name: str, expr: ast.Expr | None) -> tuple[int, ...]:
        """The pipeline stages of an entry: ``stage S``, or ``stage (S, T, ...)`` for a
        tensor that several stages hold (DeepSpeed's tied layers)."""
        if expr is None:
            return (0,)
        items: list[ast.Expr] = []
        if isinstance(expr, ast.Tuple):
            for item in expr.items:
                if item.name is not None:
                    self.error(
                        "E135",
                        f"{name}: a stage list holds stages, not named blocks",
                        expr.span,
                        "write stage (0, pp - 1)",
                    )
                    return (0,)
                items.append(item.expr)
        else:
            items.append(expr)
        stages = tuple(self.eval(e) for e in items)
        if self.pipeline is None:
            self.error(
                "E120",
                f"{name} has a pipeline stage but the layout has no pipeline axis",
                expr.span,
                "declare it: pipeline over pp",
            )
            return stages
        for v, e in zip(stages, items, strict=True):
            if not 0 <= v < self.env[self.pipeline]:
                self.error(
                    "E107",
                    f"{name} is on stage {v}, outside 0..{self.env[self.pipeline] - 1} "
                    f"({self.pipeline} = {self.env[self.pipeline]})",
                    e.span,
                )
        if len(set(stages)) < len(stages):
            self.error(
                "E135",
                f"{name} lists a stage twice: {stages}",
                expr.span,
                "list each stage once: stage (0, pp - 1)",
            )
        return stages

    def entry(self, st: ast.Entry, scope: _Scope) -> None:
        name = self.template(st.name)
        dtype = self.dtype
        if st.dtype is not None:
            dtype = self.dtype_name(st.dtype, st.dtype_span) or dtype
        stages = self.entry_stages(name, st.stage if st.stage is not None else scope.stage)
        expert = None
        if scope.experts is not None:
            axis, var, count = scope.experts
            expert = ir.Expert(axis, self.env[var], count)
        layer = None
        if st.layer is not None:
            layer = self.eval(st.layer)
            if layer < 0:
                self.error(
                    "E135",
                    f"{name} is stored in layer {layer}; layers count from 0",
                    st.layer.span,
                    "layer N is the file layer_NN-model_states.pt (an expert's: "
                    "layer_N_expert_E_mp_rank_XX_model_states.pt)",
                )
        if len(st.shape) > MAX_DIMS:
            raise self.fail(
                "E140",
                f"{name} has {len(st.shape)} dims; a tensor has at most {MAX_DIMS}",
                _span_of(st.shape[MAX_DIMS]),
                "real tensors have at most 5 dims; numpy 1.x arrays at most 32",
            )
        dims: list[ir.Dim] = []
        used: dict[str, int] = {}
        failed = False
        for i, d in enumerate(st.shape):
            try:
                dim = self.dim(d, name, i)
            except _Fail:
                failed = True
                continue
            for a in dim.split:
                if a in used:
                    self.error(
                        "E117",
                        f"{name} is split over `{a}` twice (dims {used[a]} and {i})",
                        _span_of(d),
                    )
                used[a] = i
            dims.append(dim)
        fused = any(a in self.zero_axes for a in used)  # experts stacked, split over ep
        if st.layer is not None and self.pipeline is None and expert is None and not fused:
            self.error(
                "E120",
                f"{name} names a layer but the layout has no pipeline axis and it is no expert",
                st.layer.span,
                "a pipeline tensor's layer needs `pipeline over pp`; an expert's, a loop "
                "`for e in 0..E over ep` or a dim split over a ZeRO axis ([E / ep, F, H])",
            )
        if expert is not None and expert.axis in used:
            self.error(
                "E143",
                f"{name} is an expert dealt over `{expert.axis}` and also split over it (dim "
                f"{used[expert.axis]})",
                _span_of(st.shape[used[expert.axis]]),
                "an expert is held whole by its coordinate: split it over another axis (tp)",
            )
            failed = True
        if failed:
            return
        group = scope.group or "default"
        if group not in self.groups:
            self.groups.append(group)
        first = self.declared.get(name)
        if first is not None:
            if first.span == st.name.span:  # the same line again: a loop without {i} in the name
                self.error(
                    "E103",
                    f"tensor {name} is declared again by every iteration of its loop",
                    st.name.span,
                    "make the name depend on the loop variable, e.g. layers.{i}.weight",
                )
            else:
                self.error(
                    "E103", f"tensor {name} is declared twice (first at {first.span})", st.name.span
                )
            return
        elements = math.prod(d.padded for d in dims)
        if elements > MAX_ELEMENTS:
            raise self.fail(
                "E139",
                f"{name} has {elements:,} elements; a tensor has at most 2**53 ({MAX_ELEMENTS:,})",
                st.name.span,
                "check the dims: the largest tensors of real models have about 2**34 elements",
            )
        if len(self.tensors) >= MAX_TENSORS:
            self.error(
                "E138",
                f"{name} is tensor number {len(self.tensors) + 1:,}; a layout has at most "
                f"{MAX_TENSORS:,} tensors",
                st.name.span,
                "check the bounds of the loops around it",
            )
            raise _Stop()
        kind = {"tensor": ir.PARAM, "frozen": ir.FROZEN, "buffer": ir.BUFFER}[st.kind]
        source = self.entry_source(st, name, dims)
        tensor = ir.Tensor(
            name,
            tuple(dims),
            dtype,
            kind,
            stages[0],
            group,
            st.name.span,
            stages[1:],
            layer,
            expert,
            source,
        )
        self.tensors.append(tensor)
        self.declared[name] = tensor

    def dim(self, d: ast.Dim, name: str, index: int) -> ir.Dim:
        total: int | None = None
        whole = _span_of(d)
        if isinstance(d, ast.Sized):
            total = self.positive(d.total, f"dim {index} of {name}")
            d = d.expr
        split: tuple[str, ...] = ()
        size_expr: ast.Expr = d
        if isinstance(d, ast.BinOp) and d.op == "/":
            if isinstance(d.right, ast.Name) and d.right.id not in self.env:
                self.require_axis(d.right.id, d.right.span)  # `H / tpp`: a misspelt axis
                raise _Fail()
            axes = self.split_axes(d.right)
            if axes is not None:
                split, size_expr = axes, d.left
        self.hidden_split(size_expr, name, index)
        parts = 1
        for a in split:
            if a == self.pipeline:
                raise self.fail(
                    "E130",
                    f"dim {index} of {name} is split over the pipeline axis `{a}`",
                    d.right.span if isinstance(d, ast.BinOp) else d.span,
                    "place tensors on pipeline stages with `stage EXPR` instead",
                )
            parts *= self.env[a]
        pad_to = 1
        grain = 0
        blocks: tuple[ir.Block, ...]
        if isinstance(size_expr, ast.Call) and size_expr.fn == "pad":
            if len(size_expr.args) != 2:
                raise self.fail(
                    "E118", "pad takes two arguments: pad(size, multiple)", size_expr.span
                )
            if any(isinstance(a, ast.Tuple) for a in size_expr.args):
                raise self.fail("E118", "fused blocks cannot be padded", size_expr.span)
            blocks = (ir.Block(None, self.positive(size_expr.args[0], f"dim {index} of {name}")),)
            pad_to = self.positive(
                size_expr.args[1], f"the padding multiple of dim {index} of {name}"
            )
        elif isinstance(size_expr, ast.Call) and size_expr.fn == "grains":
            blocks, grain = self.grains(size_expr, name, index, split)
        elif isinstance(size_expr, ast.Tuple):
            blocks = self.blocks(size_expr, name, index)
        else:
            blocks = (ir.Block(None, self.positive(size_expr, f"dim {index} of {name}")),)
        dim = ir.Dim(blocks, split, pad_to, parts, grain)
        where = f"dim {index} of {name}"
        if len(split) > 1:
            sizes = ", ".join(f"{a} = {self.env[a]}" for a in split)
            axes_text = f"{' * '.join(split)} = {parts} ({sizes})"
        else:
            axes_text = f"{split[0]} = {parts}" if split else ""
        stated = dim.padded if pad_to > 1 else dim.size
        if total is not None and total != stated:
            if dim.fused:
                self.error(
                    "E108",
                    f"the blocks of {where} sum to {dim.size}, not {total}",
                    _span_of(size_expr),
                    " + ".join(f"{b.name or '_'}: {b.size}" for b in blocks) + f" = {dim.size}",
                )
            else:
                what = f"padded to {dim.padded}" if pad_to > 1 else f"{dim.size}"
                self.error("E108", f"{where} is {what}, not {total}", _span_of(size_expr))
        if parts > 1 and not grain:
            if dim.fused:
                for b in blocks:
                    if b.size % parts:
                        raise self.fail(
                            "E102",
                            f"block `{b.name or '_'}` of {where} has {b.size} rows, not divisible by {axes_text}",
                            whole,
                            "each fused block is split separately, so every block must divide",
                        )
            elif dim.padded % parts:
                if pad_to > 1:
                    raise self.fail(
                        "E102",
                        f"{where} is padded to {dim.padded} ({dim.size} to a multiple of {pad_to}), "
                        f"not divisible by {axes_text}",
                        whole,
                        f"pad to a multiple of {pad_to * parts}",
                    )
                raise self.fail(
                    "E102",
                    f"{where} has {dim.size} elements, not divisible by {axes_text}",
                    whole,
                    "pad it, e.g. pad(V, 128 * tp) / tp; or, for DeepSpeed AutoTP's uneven "
                    "shards, cut it in grains: grains(V, 1) / tp",
                )
        return dim

    def grains(
        self, call: ast.Call, name: str, index: int, split: tuple[str, ...]
    ) -> tuple[tuple[ir.Block, ...], int]:
        """``grains(n, g) / axes``: n elements in whole grains of g, shared out unevenly."""
        if len(call.args) != 2:
            raise self.fail("E136", "grains takes two arguments: grains(size, grain)", call.span)
        if any(isinstance(a, ast.Tuple) for a in call.args):
            raise self.fail("E136", "fused blocks cannot be cut in grains", call.span)
        size = self.positive(call.args[0], f"dim {index} of {name}")
        grain = self.positive(call.args[1], f"the grain of dim {index} of {name}")
        if not split:
            raise self.fail(
                "E136",
                f"dim {index} of {name} is cut in grains but not split",
                call.span,
                f"grains say how a split dim is shared out: grains({_text(self.source, call.args[0].span)}, "
                f"{_text(self.source, call.args[1].span)}) / tp",
            )
        if grain > size:
            raise self.fail(
                "E136",
                f"dim {index} of {name} has {size} elements, fewer than one grain of {grain}",
                call.span,
                f"use grains({size}, 1): DeepSpeed cuts a dim smaller than its grain element by element",
            )
        return (ir.Block(None, size),), grain

    def hidden_split(self, e: ast.Expr, name: str, index: int) -> None:
        """``H / tp * 2`` or ``(H / tp)`` divides by the axis *size*: almost always a split
        written in the wrong place, so it is refused rather than silently not splitting."""
        if isinstance(e, ast.BinOp):
            right = e.right.expr if isinstance(e.right, ast.Paren) else e.right
            if (
                e.op == "/"
                and isinstance(right, ast.Name)
                and self.kinds.get(right.id) == "mesh axis"
            ):
                raise self.fail(
                    "E131",
                    f"dim {index} of {name} divides by the size of mesh axis `{right.id}` inside an expression",
                    e.span,
                    f"to split the dim, end it with `/ {right.id}` (e.g. [H * 2 / {right.id}]); "
                    f"to use the size as a number, name it first: let N = {right.id}",
                )
            self.hidden_split(e.left, name, index)
            self.hidden_split(e.right, name, index)
        elif isinstance(e, ast.Paren | ast.Neg):
            self.hidden_split(e.expr, name, index)
        elif isinstance(e, ast.Call):
            for a in e.args:
                self.hidden_split(a, name, index)
        elif isinstance(e, ast.Tuple):
            for it in e.items:
                self.hidden_split(it.expr, name, index)

    def split_axes(self, right: ast.Expr) -> tuple[str, ...] | None:
        """``/ tp`` or ``/ (tp, sp)`` at the top of a dim: the axes, else None (arithmetic)."""
        if isinstance(right, ast.Paren) and isinstance(right.expr, ast.Name):
            right = right.expr
        if isinstance(right, ast.Name):
            if self.kinds.get(right.id) == "mesh axis":
                return (right.id,)
            return None
        if isinstance(right, ast.Tuple):
            names = [
                it.expr.id if isinstance(it.expr, ast.Name) and it.name is None else None
                for it in right.items
            ]
            bad = False
            for it, n in zip(right.items, names, strict=True):
                if n is None:
                    self.error("E119", "a split lists mesh axes: / (tp, sp)", it.span)
                    bad = True
                elif not self.require_axis(n, it.span):
                    bad = True
            if bad:
                raise _Fail()
            if len(set(names)) != len(names):
                raise self.fail("E117", "an axis is listed twice in one split", right.span)
            return tuple(n for n in names if n is not None)
        return None

    def blocks(self, t: ast.Tuple, name: str, index: int) -> tuple[ir.Block, ...]:
        out = []
        seen: set[str] = set()
        for it in t.items:
            if isinstance(it.expr, ast.Call) and it.expr.fn == "pad":
                raise self.fail("E118", "fused blocks cannot be padded", it.expr.span)
            size = self.positive(it.expr, f"block `{it.name or '_'}` of dim {index} of {name}")
            if it.name is not None:
                if it.name in seen:
                    raise self.fail(
                        "E115", f"block `{it.name}` appears twice in dim {index} of {name}", it.span
                    )
                seen.add(it.name)
            out.append(ir.Block(it.name, size))
        return tuple(out)

    # ------------------------------------------------------------ ties and groups

    def check_ties(self) -> tuple[tuple[str, str], ...]:
        by_name = {t.name: t for t in self.tensors}
        out: list[tuple[str, str]] = []
        aliases: set[str] = set()
        tied = {a: s for a, s, _, _ in self.ties}
        roots: dict[str, str] = {}
        for alias, source, span, st in self.ties:
            if alias == source:
                self.error("E127", f"{alias} is tied to itself", span)
                continue
            if (source in tied and source not in by_name) or (
                source in tied and tied[source] in by_name
            ):
                root = _root(source, tied, roots)
                if root in tied:  # the chain closes on itself: no tensor at its end
                    self.error(
                        "E127",
                        f"tie {alias} = {source}: the ties from {source} go round in a circle "
                        "and reach no tensor",
                        st.source.span,
                        "tie every alias to a declared tensor",
                    )
                    continue
                self.error(
                    "E127",
                    f"tie {alias} = {source}: {source} is itself an alias of {root}",
                    st.source.span,
                    f"tie to the tensor itself: tie {alias} = {root}",
                )
                continue
            if source not in by_name:
                guess = self.guess(source, by_name, cutoff=0.6)
                self.error(
                    "E104",
                    f"tie {alias} = {source}: no tensor named {source}",
                    st.source.span,
                    f"did you mean `{guess}`?" if guess else "declare the source tensor first",
                )
                continue
            if alias == source:
                self.error("E127", f"{alias} is tied to itself", span)
                continue
            if alias in aliases:
                self.error("E127", f"{alias} is tied twice", span)
                continue
            src = by_name[source]
            if alias in by_name and by_name[alias].shape != src.shape:
                self.error(
                    "E105",
                    f"tie {alias} = {source}: shapes differ, {list(by_name[alias].shape)} vs {list(src.shape)}",
                    span,
                )
                continue
            aliases.add(alias)
            out.append((alias, source))
        return tuple(out)

    def total_elements(self, tensors: list[ir.Tensor]) -> None:
        """All tensors together stay within :data:`MAX_ELEMENTS` (E139), so every byte count
        the planner sums stays exact."""
        total = 0
        for t in tensors:
            total += math.prod(d.padded for d in t.dims)
            if total > MAX_ELEMENTS:
                self.error(
                    "E139",
                    f"the tensors up to {t.name} have {total:,} elements together; a layout has "
                    f"at most 2**53 ({MAX_ELEMENTS:,})",
                    t.span,
                    "the largest models trained have about 2**41 parameters; check the dims",
                )
                return

    def check_groups(self, tensors: list[ir.Tensor], zero: ir.Zero) -> None:
        """A ZeRO group is one flat buffer: its tensors must be partitioned over the same axes."""
        if zero.stage == 0:
            return
        seen: dict[str, tuple[frozenset[str], ir.Tensor]] = {}
        for t in tensors:
            if not t.trainable:
                continue
            held = (*t.split_axes, *t.pinned_axes)
            replicated = frozenset(a for a in zero.axes if a not in held)
            if t.group in seen and seen[t.group][0] != replicated:
                other = seen[t.group][1]
                self.error(
                    "E126",
                    f"group {t.group} mixes tensors ZeRO partitions differently: {other.name} over "
                    f"({', '.join(sorted(seen[t.group][0]))}), {t.name} over ({', '.join(sorted(replicated))})",
                    t.span,
                    "put tensors split over a ZeRO axis (e.g. experts over ep) in a group of their own",
                )
            seen.setdefault(t.group, (replicated, t))


def _nodes(e: object) -> Iterator[object]:
    """``e`` and every expression node inside it."""
    yield e
    if isinstance(e, ast.BinOp):
        yield from _nodes(e.left)
        yield from _nodes(e.right)
    elif isinstance(e, ast.Paren | ast.Neg):
        yield from _nodes(e.expr)
    elif isinstance(e, ast.Call):
        for a in e.args:
            yield from _nodes(a)
    elif isinstance(e, ast.Tuple):
        for i in e.items:
            yield from _nodes(i.expr)


def _names_in(e: ast.Expr) -> set[str]:
    """The names an expression refers to."""
    return {n.id for n in _nodes(e) if isinstance(n, ast.Name)}


def _count(body: tuple[ast.Statement, ...]) -> tuple[int, int]:
    """Statements and tensors one run of ``body`` holds itself (groups included; what
    nested loops expand to is counted when they start)."""
    statements = entries = 0
    for st in body:
        statements += 1
        if isinstance(st, ast.Entry):
            entries += 1
        elif isinstance(st, ast.Group):
            more, inner = _count(st.body)
            statements, entries = statements + more, entries + inner
    return statements, entries


def _names(v: ast.Expr | ast.Str | None) -> list[str] | None:
    if isinstance(v, ast.Name):
        return [v.id]
    if isinstance(v, ast.Paren) and isinstance(v.expr, ast.Name):
        return [v.expr.id]
    if isinstance(v, ast.Tuple) and all(
        isinstance(i.expr, ast.Name) and i.name is None for i in v.items
    ):
        return [i.expr.id for i in v.items if isinstance(i.expr, ast.Name)]
    return None


def _span_of(node: object) -> Span:
    span = getattr(node, "span", NO_SPAN)
    return span if isinstance(span, Span) else NO_SPAN


def _text(source: str, span: Span) -> str:
    """The source text of ``span`` for a message, cut to 60 characters."""
    if span.end <= span.start:
        return "?"
    if span.end - span.start > 60:
        return source[span.start : span.start + 59] + "…"
    return source[span.start : span.end]


def _shown(text: str) -> str:
    """``text`` for a message: at most 60 characters, control characters escaped."""
    text = text if len(text) <= 60 else text[:59] + "…"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _listing(names: list[str]) -> str:
    """Names for a hint: all of them, or the first :data:`_LISTED` and how many more."""
    if len(names) <= _LISTED:
        return ", ".join(names)
    return ", ".join(names[:_LISTED]) + f", ... ({len(names) - _LISTED:,} more)"


def _root(name: str, tied: dict[str, str], roots: dict[str, str]) -> str:
    """Where a chain of ties starting at ``name`` ends (in a cycle: where it closes).
    ``roots`` remembers every name walked, so all chains together cost one walk each."""
    path: list[str] = []
    on_path: set[str] = set()
    r = name
    while r in tied and r not in roots and r not in on_path:
        path.append(r)
        on_path.add(r)
        r = tied[r]
    end = roots.get(r, r)
    roots.update(dict.fromkeys(path, end))
    return end


def check(file: ast.File, source: str, overrides: dict[str, int] | None = None) -> ir.Layout:
    """Check a parsed file; raises LayoutError with every diagnostic found. ``overrides``
    replace the values of mesh axes and let constants (``--set NAME=VALUE``)."""
    return _Checker(file, source, overrides=dict(overrides or {})).run()


@functools.lru_cache(maxsize=8)
def _parsed(text: str, path: str) -> ast.File:
    """``parse``, once per text in a run: a layout checked again with other ``--set``
    values, or rebuilt from a saved plan's record, is not parsed again (the AST is frozen)."""
    return parse(text, path)


def load_text(
    text: str, path: str = "<string>", overrides: dict[str, int] | None = None
) -> ir.Layout:
    layout = check(_parsed(text, path), text, overrides)
    return replace(layout, text=text, overrides=tuple(sorted((overrides or {}).items())))


def load_layout(path: str | Path, overrides: dict[str, int] | None = None) -> ir.Layout:
    """Read, parse and check a ``.layout`` file."""
    return load_text(read_source(path), str(path), overrides)
