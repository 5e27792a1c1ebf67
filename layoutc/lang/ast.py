"""The syntax tree of a ``.layout`` file: frozen dataclasses, each with a source span.

The tree is exactly what was written (parentheses and all), so formatting a tree and
parsing the result gives an equal tree. Spans never take part in equality. Nothing here
knows what a mesh axis or a ZeRO stage means; that is the checker's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from layoutc.errors import NO_SPAN, Span


def _span() -> Span:
    return field(default=NO_SPAN, compare=False, repr=False)


# ---------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Int:
    value: int
    text: str = ""
    span: Span = _span()


@dataclass(frozen=True)
class Size:
    """A size literal with a unit or exponent: ``1MiB``, ``5GB``, ``1e9``."""

    value: int
    text: str
    span: Span = _span()


@dataclass(frozen=True)
class Name:
    id: str
    span: Span = _span()


@dataclass(frozen=True)
class Call:
    fn: str
    args: tuple[Expr, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Paren:
    expr: Expr
    span: Span = _span()


@dataclass(frozen=True)
class BinOp:
    op: str  # + - * / %
    left: Expr
    right: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Neg:
    expr: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Item:
    """One element of a parenthesised tuple: ``q: H`` (named) or ``H``."""

    name: str | None
    expr: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Tuple:
    """``(q: H, k: KV, v: KV)`` — fused blocks — or ``(tp, sp)`` — a list of axes."""

    items: tuple[Item, ...]
    span: Span = _span()


Expr = Int | Size | Name | Call | Paren | BinOp | Neg | Tuple


@dataclass(frozen=True)
class Sized:
    """``6144 = (q: 4096, k: 1024, v: 1024) / tp``: a dim with its total stated."""

    total: Expr
    expr: Expr
    span: Span = _span()


Dim = Expr | Sized


# ---------------------------------------------------------------- names


@dataclass(frozen=True)
class Template:
    """A dotted tensor name whose ``{expr}`` parts are filled in by the checker."""

    parts: tuple[str | Expr, ...]
    text: str = field(default="", compare=False)
    span: Span = _span()


# ---------------------------------------------------------------- statements


@dataclass(frozen=True)
class Header:
    name: str
    span: Span = _span()


@dataclass(frozen=True)
class Binding:
    """``name = expr``: a mesh axis or a ``let`` constant."""

    name: str
    expr: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Mesh:
    axes: tuple[Binding, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Let:
    bindings: tuple[Binding, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Dtype:
    name: str
    span: Span = _span()


@dataclass(frozen=True)
class Pipeline:
    axis: str
    span: Span = _span()


@dataclass(frozen=True)
class Option:
    """``name``, ``name expr`` or ``name "string"`` inside ``{ ... }`` of a statement."""

    name: str
    value: Expr | Str | None = None
    span: Span = _span()


@dataclass(frozen=True)
class Str:
    value: str
    span: Span = _span()


@dataclass(frozen=True)
class Optimizer:
    name: str
    options: tuple[Option, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class Zero:
    stage: Expr
    axes: tuple[str, ...] = ()
    options: tuple[Option, ...] = ()
    span: Span = _span()
    axes_span: Span = _span()


@dataclass(frozen=True)
class Entry:
    """``tensor|frozen|buffer NAME [dims] [dtype] [stage EXPR | stage (EXPR, ...)] [layer EXPR]
    [from SOURCE | from (BLOCK: SOURCE, ...)]``."""

    kind: str
    name: Template
    shape: tuple[Dim, ...]
    dtype: str | None = None
    stage: Expr | None = None
    span: Span = _span()
    dtype_span: Span = _span()
    layer: Expr | None = None
    # from: (None, source) for the whole tensor, else (block name, source) per named block
    source: tuple[tuple[str | None, Template, Span], ...] = ()
    source_span: Span = _span()


@dataclass(frozen=True)
class Loop:
    """``for VAR in START..STOP [over AXIS] [stage EXPR] { ... }``: with ``over``, each
    iteration is one expert, the experts dealt out over the mesh axis in equal runs."""

    var: str
    start: Expr
    stop: Expr
    stage: Expr | None
    body: tuple[Statement, ...]
    span: Span = _span()
    over: str | None = None
    over_span: Span = _span()


@dataclass(frozen=True)
class Group:
    name: str
    stage: Expr | None
    body: tuple[Statement, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Tie:
    alias: Template
    source: Template
    span: Span = _span()


@dataclass(frozen=True)
class Offload:
    what: str
    device: str
    path: str | None = None
    options: tuple[Option, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class Store:
    format: str
    options: tuple[Option, ...] = ()
    span: Span = _span()


Statement = (
    Mesh | Let | Dtype | Pipeline | Optimizer | Zero | Entry | Loop | Group | Tie | Offload | Store
)


@dataclass(frozen=True)
class Comment:
    text: str
    line: int
    own_line: bool


@dataclass(frozen=True)
class File:
    header: Header | None
    body: tuple[Statement, ...]
    path: str = field(default="<string>", compare=False)
    comments: tuple[Comment, ...] = field(default=(), compare=False, repr=False)
    blank_before: frozenset[int] = field(default=frozenset(), compare=False, repr=False)
