"""Text to syntax tree, with syntax errors a person can act on.

``parse(text, path)`` returns an :class:`~layoutc.lang.ast.File` or raises
:class:`~layoutc.errors.LayoutError` with one diagnostic: ``file:line:col: error[E0xx]``,
the line, a caret, and what was expected. Common mistakes are recognised by matching the
failing parser state against a table of known-bad snippets (lark's ``match_examples``),
so a missing ``}`` or a ``:`` written for ``=`` gets a human label rather than a token list.

Hostile text is refused, never crashed on: a file that is not UTF-8 (E010), nesting deeper
than :data:`MAX_DEPTH` (E011, before any recursive pass walks the tree), a file larger than
:data:`MAX_SOURCE_BYTES` (E012). A number literal too large for 64 bits is read as
:data:`OUT_OF_RANGE` without computing it, and the checker refuses it (E133).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import lark
from lark import Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from layoutc.errors import Diagnostic, LayoutError, Span
from layoutc.lang import ast
from layoutc.lang.grammar import parser

# Nesting of the syntax tree (a loop body, a parenthesis, one `+` of a chain each count one
# level): real layouts nest under 10; 100 keeps lark's transformer (about three Python
# frames a level) and the checker's recursion far inside Python's 1,000-frame limit.
MAX_DEPTH = 100
# Bytes in one layout file: lark reads about 1 MiB in 6 s with 200 MiB of memory; 8 MiB is
# twice a DeepSpeed-V3-sized model written out one tensor per line as `layoutc infer` does.
MAX_SOURCE_BYTES = 8 << 20
# Characters in one number literal: 2**62 has 19 digits, so 64 leaves room for `_`
# separators and a fraction, and no literal is long enough to be slow to convert.
MAX_LITERAL = 64
# What a size like `1e999999999` reads as, so the number is never computed; it is beyond
# the checker's ±2**62 and refused there (E133).
OUT_OF_RANGE = 2**63

_UNITS = {
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}

KEYWORDS = (
    "layout",
    "mesh",
    "let",
    "dtype",
    "pipeline",
    "optimizer",
    "zero",
    "tensor",
    "frozen",
    "buffer",
    "for",
    "group",
    "tie",
    "offload",
    "store",
)


def size_value(text: str) -> int:
    """Value of a size literal: ``1MiB`` -> 1048576, ``1e9`` -> 10**9, ``1.5GB`` (rounded
    down). One whose leading digit stands at 10**19 or above is :data:`OUT_OF_RANGE`, known
    from where its digits stand, so ``1e999999999`` costs nothing."""
    t = text.replace("_", "")
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(?:e([0-9]+)|([KMGT]i?B))", t)
    if not m:
        raise ValueError(text)
    mantissa, exp, unit = m.groups()
    whole, _, frac = mantissa.partition(".")
    whole, frac = whole.lstrip("0"), frac.rstrip("0")
    if not (whole + frac).strip("0"):
        return 0
    if exp is not None:
        if len(exp.lstrip("0")) > 18:  # 10**exp dwarfs any fraction a text can hold
            return OUT_OF_RANGE
        e = int(exp)
        lead = len(whole) - 1 if whole else -(len(frac) - len(frac.lstrip("0")) + 1)
        if lead + e >= 19:
            return OUT_OF_RANGE
        scale = 10**e
    else:
        scale = _UNITS[unit]
    return (int(whole + frac) * scale) // 10 ** len(frac)


def _span(path: str, meta: Any) -> Span:
    if getattr(meta, "empty", True):
        return Span(path, 0, 0)
    return Span(path, meta.line, meta.column, meta.start_pos, meta.end_pos, meta.end_line)


def _tok_span(path: str, tok: Token) -> Span:
    return Span(
        path,
        tok.line or 0,
        tok.column or 0,
        tok.start_pos or 0,
        tok.end_pos or 0,
        tok.end_line or 0,
    )


@v_args(meta=True)
class _Build(Transformer):
    """Builds AST nodes only; every semantic rule is left to the checker."""

    def __init__(self, path: str, text: str, tok: Token | None = None) -> None:
        super().__init__()
        self.path = path
        self.text = text
        self.tok = tok  # the name token a template's sub-expression is parsed from

    def _s(self, meta: Any) -> Span:
        return _span(self.path, meta)

    # expressions
    def integer(self, meta: Any, c: list[Token]) -> ast.Int:
        self._short(meta, c[0])
        return ast.Int(int(str(c[0]).replace("_", "")), str(c[0]), self._s(meta))

    def size(self, meta: Any, c: list[Token]) -> ast.Size:
        self._short(meta, c[0])
        return ast.Size(size_value(str(c[0])), str(c[0]), self._s(meta))

    def _short(self, meta: Any, tok: Token) -> None:
        """A literal longer than :data:`MAX_LITERAL` is refused before it is converted
        (Python refuses to convert more than 4,300 digits, and takes quadratic time)."""
        if len(tok) > MAX_LITERAL:
            span = self._s(meta)
            if self.tok is not None:  # parsed alone: place it on the name token's line
                column = (self.tok.column or 0) + span.start - (self.tok.start_pos or 0)
                span = Span(self.path, self.tok.line or 0, column, span.start, span.end)
            raise LayoutError(
                [
                    Diagnostic(
                        "E133",
                        f"`{tok[:20]}…` is a number of {len(tok):,} characters; a number is at "
                        f"most {MAX_LITERAL} characters long and within ±2**62",
                        span,
                        "sizes, counts and indices must fit in 64 bits",
                    )
                ],
                self.text,
            )

    def name(self, meta: Any, c: list[Token]) -> ast.Name:
        return ast.Name(str(c[0]), self._s(meta))

    def call(self, meta: Any, c: list[Any]) -> ast.Call:
        args = tuple(a for a in c[1:] if a is not None)
        return ast.Call(str(c[0]), args, self._s(meta))

    def paren(self, meta: Any, c: list[Any]) -> ast.Paren:
        return ast.Paren(c[0], self._s(meta))

    def add(self, meta: Any, c: list[Any]) -> ast.BinOp:
        return ast.BinOp("+", c[0], c[1], self._s(meta))

    def sub(self, meta: Any, c: list[Any]) -> ast.BinOp:
        return ast.BinOp("-", c[0], c[1], self._s(meta))

    def mul(self, meta: Any, c: list[Any]) -> ast.BinOp:
        return ast.BinOp("*", c[0], c[1], self._s(meta))

    def div(self, meta: Any, c: list[Any]) -> ast.BinOp:
        return ast.BinOp("/", c[0], c[1], self._s(meta))

    def mod(self, meta: Any, c: list[Any]) -> ast.BinOp:
        return ast.BinOp("%", c[0], c[1], self._s(meta))

    def neg(self, meta: Any, c: list[Any]) -> ast.Neg:
        return ast.Neg(c[0], self._s(meta))

    def named_item(self, meta: Any, c: list[Any]) -> ast.Item:
        return ast.Item(str(c[0]), c[1], self._s(meta))

    def plain_item(self, meta: Any, c: list[Any]) -> ast.Item:
        return ast.Item(None, c[0], self._s(meta))

    def tuple_expr(self, meta: Any, c: list[Any]) -> ast.Tuple:
        return ast.Tuple(tuple(c), self._s(meta))

    def single_block(self, meta: Any, c: list[Any]) -> ast.Tuple:
        return ast.Tuple((ast.Item(str(c[0]), c[1], self._s(meta)),), self._s(meta))

    def sized(self, meta: Any, c: list[Any]) -> ast.Sized:
        return ast.Sized(c[0], c[1], self._s(meta))

    def string(self, meta: Any, c: list[Token]) -> ast.Str:
        return ast.Str(str(c[0])[1:-1], self._s(meta))

    # statements
    def header(self, meta: Any, c: list[Token]) -> ast.Header:
        return ast.Header(str(c[0]), self._s(meta))

    def axis(self, meta: Any, c: list[Any]) -> ast.Binding:
        return ast.Binding(str(c[0]), c[1], self._s(meta))

    binding = axis

    def mesh(self, meta: Any, c: list[Any]) -> ast.Mesh:
        return ast.Mesh(tuple(x for x in c if x is not None), self._s(meta))

    def let(self, meta: Any, c: list[Any]) -> ast.Let:
        return ast.Let(tuple(c), self._s(meta))

    def dtype(self, meta: Any, c: list[Token]) -> ast.Dtype:
        return ast.Dtype(str(c[0]), _tok_span(self.path, c[0]))

    def pipeline(self, meta: Any, c: list[Token]) -> ast.Pipeline:
        return ast.Pipeline(str(c[0]), _tok_span(self.path, c[0]))

    def option(self, meta: Any, c: list[Any]) -> ast.Option:
        return ast.Option(str(c[0]), c[1], self._s(meta))

    def options(self, meta: Any, c: list[Any]) -> tuple[ast.Option, ...]:
        return tuple(x for x in c if x is not None)

    def optimizer(self, meta: Any, c: list[Any]) -> ast.Optimizer:
        return ast.Optimizer(str(c[0]), c[1] or (), self._s(meta))

    def axes(self, meta: Any, c: list[Token]) -> tuple[tuple[str, ...], Span]:
        return tuple(str(t) for t in c), self._s(meta)

    def zero(self, meta: Any, c: list[Any]) -> ast.Zero:
        axes, axes_span = c[1] if c[1] is not None else ((), Span(self.path, 0, 0))
        return ast.Zero(c[0], axes, c[2] or (), self._s(meta), axes_span)

    def kind(self, meta: Any, c: list[Token]) -> str:
        return str(c[0])

    def shape(self, meta: Any, c: list[Any]) -> tuple[Any, ...]:
        return tuple(x for x in c if x is not None)

    def stage(self, meta: Any, c: list[Any]) -> tuple[str, Any, Span]:
        return ("stage", c[0], self._s(meta))

    def layer(self, meta: Any, c: list[Any]) -> tuple[str, Any, Span]:
        return ("layer", c[0], self._s(meta))

    def entry_dtype(self, meta: Any, c: list[Token]) -> tuple[str, Any, Span]:
        return ("dtype", c[0], _tok_span(self.path, c[0]))

    def entry(self, meta: Any, c: list[Any]) -> ast.Entry:
        kind, path, shape, *attrs = c
        dtype: str | None = None
        dtype_span = Span(self.path, 0, 0)
        stage = layer = None
        source: tuple[tuple[str | None, ast.Template, Span], ...] = ()
        source_span = Span(self.path, 0, 0)
        seen: set[str] = set()
        for key, value, span in attrs:
            if key in seen:
                raise LayoutError(
                    [
                        Diagnostic(
                            "E009", f"`{key}` is given twice for {path}", span, f"give one {key}"
                        )
                    ],
                    self.text,
                )
            seen.add(key)
            if key == "dtype":
                dtype, dtype_span = str(value), span
            elif key == "layer":
                layer = value
            elif key == "from":
                source, source_span = value, span
            else:
                stage = value
        return ast.Entry(
            kind,
            self._template(path),
            shape,
            dtype,
            stage,
            self._s(meta),
            dtype_span,
            layer,
            source,
            source_span,
        )

    def source_one(self, meta: Any, c: list[Token]) -> tuple[str, Any, Span]:
        return ("from", ((None, self._template(c[0]), _tok_span(self.path, c[0])),), self._s(meta))

    def source_blocks(self, meta: Any, c: list[Any]) -> tuple[str, Any, Span]:
        return ("from", tuple(c), self._s(meta))

    def source_block(self, meta: Any, c: list[Token]) -> tuple[str, ast.Template, Span]:
        return (str(c[0]), self._template(c[1]), _tok_span(self.path, c[0]))

    def body(self, meta: Any, c: list[Any]) -> tuple[Any, ...]:
        return tuple(c)

    def loop(self, meta: Any, c: list[Any]) -> ast.Loop:
        var, start, stop, over, stage, body = c
        return ast.Loop(
            str(var),
            start,
            stop,
            stage[1] if stage else None,
            body,
            self._s(meta),
            over[0] if over else None,
            over[1] if over else Span(self.path, 0, 0),
        )

    def over(self, meta: Any, c: list[Token]) -> tuple[str, Span]:
        return str(c[0]), _tok_span(self.path, c[0])

    def group(self, meta: Any, c: list[Any]) -> ast.Group:
        name, stage, body = c
        return ast.Group(str(name), stage[1] if stage else None, body, self._s(meta))

    def tie(self, meta: Any, c: list[Token]) -> ast.Tie:
        return ast.Tie(self._template(c[0]), self._template(c[1]), self._s(meta))

    def offload(self, meta: Any, c: list[Any]) -> ast.Offload:
        what, device, path, options = c
        return ast.Offload(
            str(what), str(device), str(path)[1:-1] if path else None, options or (), self._s(meta)
        )

    def store(self, meta: Any, c: list[Any]) -> ast.Store:
        return ast.Store(str(c[0]), c[1] or (), self._s(meta))

    def start(self, meta: Any, c: list[Any]) -> ast.File:
        header = c[0] if c and isinstance(c[0], ast.Header) else None
        body = tuple(c[1:] if header is not None or (c and c[0] is None) else c)
        return ast.File(header, tuple(x for x in body if x is not None), self.path)

    # names with {expr} templates
    def _template(self, tok: Token) -> ast.Template:
        text = str(tok)
        parts: list[str | ast.Expr] = []
        pos = 0
        for m in re.finditer(r"\{([^{}]*)\}", text):
            if m.start() > pos:
                parts.append(text[pos : m.start()])
            parts.append(self._sub_expr(tok, m.start(1), m.group(1)))
            pos = m.end()
        if pos < len(text):
            parts.append(text[pos:])
        return ast.Template(tuple(parts), text, _tok_span(self.path, tok))

    def _sub_expr(self, tok: Token, offset: int, text: str) -> ast.Expr:
        start = (tok.start_pos or 0) + offset
        padded = " " * start + text  # keep offsets; lines do not matter inside one token
        try:
            tree = parser().parse(padded, start="expr")
            _refuse_deep(tree, self.path, self.text, tok)
        except UnexpectedInput as e:
            col = (tok.column or 0) + offset + max(0, (e.column or 1) - 1 - start)
            raise LayoutError(
                [
                    Diagnostic(
                        "E007",
                        f"bad expression in name template: {{{text}}}",
                        Span(self.path, tok.line or 0, col, start, start + len(text)),
                        hint="a template holds an integer expression, e.g. layers.{i + 1}.weight",
                    )
                ],
                self.text,
            ) from None
        try:
            built = _Build(self.path, self.text, tok).transform(tree)
        except lark.exceptions.VisitError as e:
            if isinstance(e.orig_exc, LayoutError):
                raise e.orig_exc from None
            raise
        result: ast.Expr = _fix_line(built, tok)
        return result


def _fix_line(node: Any, tok: Token) -> Any:
    """Sub-expressions of a template were parsed alone: move their spans onto the token's line."""
    if isinstance(node, tuple):
        return tuple(_fix_line(x, tok) for x in node)
    if not is_dataclass(node):
        return node
    changes: dict[str, Any] = {}
    for f in fields(node):
        v = getattr(node, f.name)
        if isinstance(v, Span):
            delta = v.start - (tok.start_pos or 0)
            changes[f.name] = Span(v.file, tok.line or 0, (tok.column or 0) + delta, v.start, v.end)
        elif is_dataclass(v) or isinstance(v, tuple):
            changes[f.name] = _fix_line(v, tok)
    return replace(node, **changes)  # type: ignore[type-var]


# ---------------------------------------------------------------- syntax errors

# Known mistakes, matched against the parser state where the error happened.
_EXAMPLES: dict[str, tuple[str, list[str]]] = {
    "E002": (
        "missing closing `}`",
        [
            "mesh { dp = 2",
            "for i in 0..2 { tensor a [1]",
            "group g { tensor a [1]",
            "store deepspeed { writers 4",
            "for i in 0..2 { for j in 0..2 { tensor a [1] }",
        ],
    ),
    "E003": (
        "`:` where `=` is expected (mesh axes, let constants and ties use `=`)",
        ["mesh { dp: 2 }", "mesh { pp = 1, dp: 2 }", "let a: 1", "let a = 1, b: 2"],
    ),
    "E004": (
        "`=` where `:` is expected (fused blocks are written `(q: H, k: H)`)",
        ["tensor a [(q = 1, k = 2)]", "tensor a [(q: 1, k = 2)]"],
    ),
    "E005": (
        "unknown statement",
        ["mesh { dp = 1 } tensr a [1]", "tensr a [1]", "mesh { dp = 1 } meshes { }", "lets a = 1"],
    ),
    "E006": (
        "missing closing `]` of a shape",
        ["tensor a [1, 2 tensor b [1]", "tensor a [1, 2 stage 0"],
    ),
}


_STATEMENT_TOKENS = {k.upper() for k in KEYWORDS}


def _allowed(e: UnexpectedInput) -> set[str]:
    """Tokens that can follow where parsing stopped: lark's exact ``accepts`` when it has
    them (its LALR ``expected`` set merges lookaheads of other contexts)."""
    for attr in ("accepts", "allowed", "expected"):
        value = getattr(e, attr, None)
        if value:
            return set(value)
    return set()


def _classify(e: UnexpectedInput) -> str | None:
    """Label a common mistake from the failing token and what the parser expected there.

    Example matching (above) only recognises a mistake in the parser state of its example,
    i.e. at the same nesting depth; these rules catch the same mistakes anywhere."""
    allowed = _allowed(e)
    if isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type == "$END"):
        if "RBRACE" in allowed:
            return "E002"
        if "RSQB" in allowed:
            return "E006"
        return None
    if not isinstance(e, UnexpectedToken):
        return None
    tok = e.token.type
    if tok == "COLON" and "EQUAL" in allowed:
        return "E003"
    if tok == "EQUAL" and "COLON" in allowed:
        return "E004"
    if "RSQB" in allowed and (tok in _STATEMENT_TOKENS or tok in ("STAGE", "RBRACE")):
        return "E006"
    if (
        "RBRACE" in allowed
        and tok in _STATEMENT_TOKENS | {"$END"}
        and allowed & _STATEMENT_TOKENS == set()
    ):
        return "E002"
    if tok in ("NAME", "PATH") and allowed & _STATEMENT_TOKENS:
        return "E005"
    return None


def _syntax_diagnostic(e: UnexpectedInput, text: str, path: str) -> Diagnostic:
    label = None
    try:
        label = e.match_examples(
            lambda s: parser().parse(s, start="start"),
            {code: ex for code, (_, ex) in _EXAMPLES.items()},
            use_accepts=True,
        )
    except Exception:  # matching is best effort; the plain message is still right
        label = None
    if label is None:
        label = _classify(e)
    line = getattr(e, "line", 0) or 0
    column = getattr(e, "column", 0) or 0
    expected = _expected(e)
    if isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type == "$END"):
        lines = text.rstrip("\r\n").split("\n")
        line, column = len(lines), len(lines[-1].rstrip("\r")) + 1
        found = "end of file"
    elif isinstance(e, UnexpectedToken):
        found = f"`{e.token}`"
    elif isinstance(e, UnexpectedCharacters):
        pos = e.pos_in_stream or 0
        found = f"`{text[pos]}`" if pos < len(text) else "end of file"
    else:
        found = "input"
    start = _offset(text, line, column)
    width = len(str(e.token)) if isinstance(e, UnexpectedToken) and e.token.type != "$END" else 1
    span = Span(path, line, column, start, start + width)
    if isinstance(e, UnexpectedToken) and e.token.type == "LAYOUT":
        return Diagnostic(
            "E008",
            "`layout NAME` must be the first statement of the file",
            span,
            "move the header to the top (comments may come before it)",
        )
    if label is not None:
        code = label
        message = f"{_EXAMPLES[label][0]}; found {found}"
        if label == "E005" and isinstance(e, UnexpectedToken):
            message = f"unknown statement `{e.token}`"
            hint = "statements start with one of: " + ", ".join(KEYWORDS)
            guess = _closest(str(e.token), KEYWORDS)
            if guess:
                hint = f"did you mean `{guess}`? " + hint
            return Diagnostic(code, message, span, hint)
        hint = {
            "E002": _unclosed_brace(text),
            "E003": "write `name = value`",
            "E004": "name each block with a colon: (q: H, k: KV, v: KV)",
            "E006": "close the shape with `]` before the tensor's attributes",
        }.get(code) or (f"expected {expected}" if expected else "")
        return Diagnostic(code, message, span, hint)
    return Diagnostic(
        "E001", f"unexpected {found}", span, f"expected {expected}" if expected else ""
    )


_TOKEN_WORDS = {
    "RBRACE": "`}`",
    "LBRACE": "`{`",
    "RSQB": "`]`",
    "LSQB": "`[`",
    "RPAR": "`)`",
    "LPAR": "`(`",
    "COMMA": "`,`",
    "EQUAL": "`=`",
    "COLON": "`:`",
    "NAME": "a name",
    "PATH": "a tensor name",
    "INT": "an integer",
    "SIZE": "a size",
    "STRING": "a string",
    "PLUS": "`+`",
    "MINUS": "`-`",
    "STAR": "`*`",
    "SLASH": "`/`",
    "PERCENT": "`%`",
    "$END": "end of file",
}


def _expected(e: UnexpectedInput) -> str:
    allowed = _allowed(e)
    words = []
    for name in sorted(allowed):
        if name in _TOKEN_WORDS:
            words.append(_TOKEN_WORDS[name])
        elif name.isupper() and name.lower() in (*KEYWORDS, "over", "in", "stage", "to"):
            words.append(f"`{name.lower()}`")
        elif name == "__ANON_0":
            words.append("`..`")
    first = ["`}`", "`]`", "`)`", "`,`", "`=`", "`:`"]
    words = sorted(set(words), key=lambda w: (first.index(w) if w in first else len(first), w))
    if not words:
        return ""
    if len(words) > 8:
        words = [*words[:8], "..."]
    return "one of " + ", ".join(words) if len(words) > 1 else words[0]


def _unclosed_brace(text: str) -> str:
    """Where the innermost ``{`` that is never closed was opened (comments and strings skipped)."""
    stack: list[tuple[int, int]] = []
    for number, line in enumerate(text.split("\n"), start=1):
        in_string = False
        for col, ch in enumerate(line, start=1):
            if ch == '"':
                in_string = not in_string
            elif in_string:
                continue
            elif ch == "#":
                break
            elif ch == "{":
                stack.append((number, col))
            elif ch == "}" and stack:
                stack.pop()
    if not stack:
        return ""
    opened_line, opened_col = stack[-1]
    return f"the `{{` opened at line {opened_line}, column {opened_col} is never closed"


def _offset(text: str, line: int, column: int) -> int:
    if line <= 0:
        return 0
    lines = text.split("\n")
    return sum(len(x) + 1 for x in lines[: line - 1]) + max(0, column - 1)


def _closest(word: str, options: tuple[str, ...] | list[str]) -> str | None:
    m = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return m[0] if m else None


# ---------------------------------------------------------------- comments and layout


def _comments(text: str) -> tuple[tuple[ast.Comment, ...], frozenset[int]]:
    """``#`` comments (outside strings) with their line, and the blank lines, for ``fmt``."""
    comments: list[ast.Comment] = []
    blanks: set[int] = set()
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            blanks.add(number)
            continue
        in_string = False
        for i, ch in enumerate(line):
            if ch == '"':
                in_string = not in_string
            elif ch == "#" and not in_string:
                comments.append(ast.Comment(line[i:].rstrip(), number, not line[:i].strip()))
                break
    return tuple(comments), frozenset(blanks)


def _refuse_deep(tree: lark.Tree[Any], path: str, text: str, tok: Token | None = None) -> None:
    """Refuse (E011) a tree nested deeper than :data:`MAX_DEPTH`, walked with a list rather
    than recursion, so no later pass can exceed Python's recursion limit. ``tok``: the name
    token a template's sub-expression came from (its spans are on that token's line)."""
    stack: list[tuple[lark.Tree[Any], int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            meta = node.meta
            if tok is not None:
                col = (tok.column or 0) + meta.start_pos - (tok.start_pos or 0)
                span = Span(path, tok.line or 0, col, meta.start_pos, meta.start_pos + 1)
            else:
                span = Span(path, meta.line, meta.column, meta.start_pos, meta.start_pos + 1)
            raise LayoutError(
                [
                    Diagnostic(
                        "E011",
                        f"nested more than {MAX_DEPTH} levels deep",
                        span,
                        "each loop, group, parenthesis and operator of a chain is a level; "
                        "name parts of a long expression with `let`",
                    )
                ],
                text,
            )
        stack.extend((c, depth + 1) for c in node.children if isinstance(c, lark.Tree))


def read_source(path: str | Path) -> str:
    """The text of a layout file. Refuses a file larger than :data:`MAX_SOURCE_BYTES`
    (E012) without reading it all, and one that is not UTF-8 (E010) at its first bad byte."""
    name = str(path)
    with open(path, "rb") as f:
        data = f.read(MAX_SOURCE_BYTES + 1)
    if len(data) > MAX_SOURCE_BYTES:
        raise LayoutError(
            [
                Diagnostic(
                    "E012",
                    f"the file is larger than {MAX_SOURCE_BYTES >> 20} MiB, the most a layout may be",
                    Span(name, 1, 1),
                    "is this a layout file? write repeated tensors with a `for` loop",
                )
            ]
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        column = len(data[line_start : e.start].decode("utf-8")) + 1
        shown = data.decode("utf-8", "replace")  # the line with U+FFFD for the bad bytes
        start = len(data[: e.start].decode("utf-8"))
        raise LayoutError(
            [
                Diagnostic(
                    "E010",
                    f"the file is not UTF-8 text: byte 0x{data[e.start]:02x} cannot be decoded",
                    Span(name, line, column, start, start + 1),
                    "a layout is UTF-8 text; is this a checkpoint or another binary file?",
                )
            ],
            shown,
        ) from None


def parse(text: str, path: str = "<string>") -> ast.File:
    """Parse layout text. Raises LayoutError with a located diagnostic on a syntax error."""
    try:
        tree = parser().parse(text, start="start")
    except UnexpectedInput as e:
        raise LayoutError([_syntax_diagnostic(e, text, path)], text) from None
    except lark.exceptions.LarkError as e:  # pragma: no cover - lark internals
        raise LayoutError([Diagnostic("E001", str(e), Span(path, 1, 1))], text) from None
    _refuse_deep(tree, path, text)
    try:
        file: ast.File = _Build(path, text).transform(tree)
    except lark.exceptions.VisitError as e:
        if isinstance(e.orig_exc, LayoutError):
            raise e.orig_exc from None
        raise
    comments, blanks = _comments(text)
    return replace(file, comments=comments, blank_before=blanks)
