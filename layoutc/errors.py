"""Diagnostics and the three kinds of failure layoutc reports.

Exceptions are split by what the caller should do about them:

* :class:`LayoutError` — the layout (or checkpoint) is wrong; fix the input. Carries one or
  more :class:`Diagnostic` s, each with a code, a source span and a message.
* :class:`Unsupported` — the input is valid but layoutc cannot do this yet.
* :class:`InternalError` — an invariant of layoutc itself broke; a bug to report.

Diagnostics render as ``file:line:col: error[E123]: message`` followed by the source line
and a caret under the offending span, so a terminal user can see exactly where to look.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Span:
    """A region of one source text: 1-based line/column of the start, 0-based offsets."""

    file: str
    line: int
    column: int
    start: int = 0
    end: int = 0
    end_line: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


NO_SPAN = Span("<none>", 0, 0)


@dataclass(frozen=True, slots=True)
class Diagnostic:
    code: str
    message: str
    span: Span = NO_SPAN
    hint: str = ""
    severity: str = "error"

    def render(self, source: str | None = None) -> str:
        """The diagnostic as a terminal user reads it, with the line and a caret."""
        head = f"{self.span}: {self.severity}[{self.code}]: {self.message}"
        if self.span is NO_SPAN:
            head = f"{self.severity}[{self.code}]: {self.message}"
        lines = [head]
        if source is not None and self.span.line > 0:
            text_lines = source.split("\n")  # lines as the parser counts them
            if self.span.line <= len(text_lines):
                text = text_lines[self.span.line - 1].rstrip("\r")
                width = max(
                    1, min(self.span.end - self.span.start, len(text) - self.span.column + 1)
                )
                gutter = f"{self.span.line:>4} | "
                lines.append(gutter + text)
                lines.append(" " * (len(gutter) + self.span.column - 1) + "^" * width)
        if self.hint:
            lines.append(f"  = help: {self.hint}")
        return "\n".join(lines)


class LayoutcError(Exception):
    """Base class of everything layoutc raises on purpose."""


@dataclass
class LayoutError(LayoutcError):
    """The input is wrong. Holds every diagnostic found, not just the first."""

    diagnostics: list[Diagnostic]
    source: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        super().__init__(self.render(limit=5))

    def render(self, limit: int | None = None) -> str:
        shown = self.diagnostics if limit is None else self.diagnostics[:limit]
        parts = [d.render(self.source) for d in shown]
        rest = len(self.diagnostics) - len(shown)
        if rest > 0:
            parts.append(f"... and {rest} more")
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.render(limit=5)

    @property
    def codes(self) -> list[str]:
        return [d.code for d in self.diagnostics]


class Unsupported(LayoutcError):
    """The input is valid, but layoutc does not support it (yet)."""


class InternalError(LayoutcError):
    """An invariant of layoutc broke. Please report it with the input that caused it."""


class PlanError(LayoutcError):
    """A plan failed validation; the message names the offending op, buffer or piece."""
