"""Canonical text of a layout: ``layoutc fmt``.

One statement per line, two-space indentation inside ``{ }`` bodies, single spaces around
binary operators and after commas, at most one blank line kept between statements, and
every comment kept where it was (own-line comments before the statement that follows them,
trailing comments after the statement they end). Parentheses are printed as written, and
added where a tree built by hand needs them, so ``parse(fmt(tree)) == tree`` for parsed
trees.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from layoutc.lang import ast

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2, "%": 2}


def expr(e: ast.Expr | ast.Sized, parent: int = 0, right: bool = False) -> str:
    """Text of an expression; ``parent`` is the precedence of the enclosing operator."""
    if isinstance(e, ast.Sized):
        return f"{expr(e.total)} = {expr(e.expr)}"
    if isinstance(e, ast.Int):
        return e.text or str(e.value)
    if isinstance(e, ast.Size):
        return e.text
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.Paren):
        return f"({expr(e.expr)})"
    if isinstance(e, ast.Neg):
        return f"-{expr(e.expr, 3)}"
    if isinstance(e, ast.Call):
        return f"{e.fn}({', '.join(expr(a) for a in e.args)})"
    if isinstance(e, ast.Tuple):
        items = ", ".join(f"{i.name}: {expr(i.expr)}" if i.name else expr(i.expr) for i in e.items)
        if len(e.items) == 1 and e.items[0].name is None:
            items += ","
        return f"({items})"
    if isinstance(e, ast.BinOp):
        p = _PRECEDENCE[e.op]
        text = f"{expr(e.left, p)} {e.op} {expr(e.right, p, right=True)}"
        if p < parent or (p == parent and right):
            return f"({text})"
        return text
    raise TypeError(e)  # pragma: no cover


def template(t: ast.Template) -> str:
    return "".join(p if isinstance(p, str) else "{" + expr(p) + "}" for p in t.parts)


def _options(opts: tuple[ast.Option, ...]) -> str:
    if not opts:
        return ""
    parts = []
    for o in opts:
        if o.value is None:
            parts.append(o.name)
        elif isinstance(o.value, ast.Str):
            parts.append(f'{o.name} "{o.value.value}"')
        else:
            parts.append(f"{o.name} {expr(o.value)}")
    return " { " + ", ".join(parts) + " }"


def _axes(axes: tuple[str, ...]) -> str:
    return axes[0] if len(axes) == 1 else "(" + ", ".join(axes) + ")"


def statement_head(st: ast.Statement) -> str:
    """The statement on one line (for loops and groups: the line that opens the body)."""
    if isinstance(st, ast.Mesh):
        return "mesh { " + ", ".join(f"{b.name} = {expr(b.expr)}" for b in st.axes) + " }"
    if isinstance(st, ast.Let):
        return "let " + ", ".join(f"{b.name} = {expr(b.expr)}" for b in st.bindings)
    if isinstance(st, ast.Dtype):
        return f"dtype {st.name}"
    if isinstance(st, ast.Pipeline):
        return f"pipeline over {st.axis}"
    if isinstance(st, ast.Optimizer):
        return f"optimizer {st.name}{_options(st.options)}"
    if isinstance(st, ast.Zero):
        over = f" over {_axes(st.axes)}" if st.axes else ""
        return f"zero {expr(st.stage)}{over}{_options(st.options)}"
    if isinstance(st, ast.Entry):
        text = f"{st.kind} {template(st.name)} [{', '.join(expr(d) for d in st.shape)}]"
        if st.dtype:
            text += f" {st.dtype}"
        if st.stage is not None:
            text += f" stage {expr(st.stage)}"
        if st.layer is not None:
            text += f" layer {expr(st.layer)}"
        if len(st.source) == 1 and st.source[0][0] is None:
            text += f" from {template(st.source[0][1])}"
        elif st.source:
            text += " from (" + ", ".join(f"{b}: {template(t)}" for b, t, _ in st.source) + ")"
        return text
    if isinstance(st, ast.Loop):
        stage = f" stage {expr(st.stage)}" if st.stage is not None else ""
        over = f" over {st.over}" if st.over is not None else ""
        return f"for {st.var} in {expr(st.start)}..{expr(st.stop)}{over}{stage} {{"
    if isinstance(st, ast.Group):
        stage = f" stage {expr(st.stage)}" if st.stage is not None else ""
        return f"group {st.name}{stage} {{"
    if isinstance(st, ast.Tie):
        return f"tie {template(st.alias)} = {template(st.source)}"
    if isinstance(st, ast.Offload):
        path = f' "{st.path}"' if st.path is not None else ""
        return f"offload {st.what} to {st.device}{path}{_options(st.options)}"
    if isinstance(st, ast.Store):
        return f"store {st.format}{_options(st.options)}"
    raise TypeError(st)  # pragma: no cover


@dataclass
class _Printer:
    """Prints statements in order, taking comments from the front of a queue sorted by
    line, so a file is printed in time linear in its statements, comments and blank lines."""

    comments: deque[ast.Comment]
    blanks: list[int]  # sorted
    out: list[str] = field(default_factory=list)
    last_line: int = 0

    def blank_since(self, line: int) -> bool:
        i = bisect.bisect_right(self.blanks, self.last_line)
        return i < len(self.blanks) and self.blanks[i] < line

    def emit(self, text: str, indent: int, line: int) -> None:
        if (
            self.out
            and line
            and self.blank_since(line)
            and self.out[-1] != ""
            and not self.out[-1].endswith("{")
        ):
            self.out.append("")
        self.out.append("  " * indent + text)
        if line:
            self.last_line = max(self.last_line, line)

    def leading(self, before: int, indent: int) -> None:
        """Own-line comments above ``before`` (and stray ones inside a printed-flat statement)."""
        while self.comments and self.comments[0].line < before:
            c = self.comments.popleft()
            self.emit(c.text, indent, c.line)

    def trailing(self, line: int) -> str:
        if self.comments and self.comments[0].line == line and not self.comments[0].own_line:
            return "  " + self.comments.popleft().text
        return ""

    def statement(self, st: ast.Statement, indent: int) -> None:
        start = st.span.line
        end = st.span.end_line or start
        self.leading(start, indent)
        if isinstance(st, ast.Loop | ast.Group):
            self.emit(statement_head(st) + self.trailing(start), indent, start)
            for inner in st.body:
                self.statement(inner, indent + 1)
            self.leading(end, indent + 1)
            self.emit("}" + self.trailing(end), indent, end)
            return
        if isinstance(st, ast.Let | ast.Mesh) and end > start and len(self._bindings(st)) > 1:
            self._multiline(st, indent, start, end)
            return
        # comments inside a multi-line statement that is printed on one line go above it;
        # leading() took those before it, so they are at the front of the queue
        while (
            self.comments
            and start <= self.comments[0].line <= end
            and not (self.comments[0].line == end and not self.comments[0].own_line)
        ):
            self.emit(self.comments.popleft().text, indent, start)
        self.emit(statement_head(st) + self.trailing(end), indent, start)
        self.last_line = max(self.last_line, end)

    @staticmethod
    def _bindings(st: ast.Let | ast.Mesh) -> tuple[ast.Binding, ...]:
        return st.bindings if isinstance(st, ast.Let) else st.axes

    def _multiline(self, st: ast.Let | ast.Mesh, indent: int, start: int, end: int) -> None:
        """A ``let`` or ``mesh`` written over several lines stays one binding per line, each
        with its own trailing comment."""
        items = self._bindings(st)
        texts = [f"{b.name} = {expr(b.expr)}" for b in items]
        if isinstance(st, ast.Let):
            head, pad, close = "let ", "    ", ""
        else:
            head, pad, close = "mesh { ", "       ", " }"
        for i, (b, text) in enumerate(zip(items, texts, strict=True)):
            line = b.span.line
            self.leading(line, indent) if i else None
            last = i == len(items) - 1
            body = (head if i == 0 else pad) + text + ("," if not last else close)
            comment = self.trailing(line) if not last else ""
            self.emit(body + comment, indent, line if i == 0 else 0)
        self.out[-1] += self.trailing(end) or self.trailing(items[-1].span.line)
        self.last_line = max(self.last_line, end)


def fmt(file: ast.File) -> str:
    """Canonical text of a parsed file (ends with one newline)."""
    p = _Printer(deque(sorted(file.comments, key=lambda c: c.line)), sorted(file.blank_before))
    if file.header is not None:
        p.leading(file.header.span.line or 1, 0)
        line = file.header.span.line
        p.emit(f"layout {file.header.name}" + p.trailing(line), 0, line)
    for st in file.body:
        p.statement(st, 0)
    p.leading(10**9, 0)
    return "\n".join(p.out).rstrip("\n") + "\n"
