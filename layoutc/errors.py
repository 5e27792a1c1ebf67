"""Diagnostics and the kinds of failure layoutc reports.

Every exception layoutc raises on purpose is a :class:`LayoutcError` of exactly one kind,
chosen by what the caller should do about it (the command line maps each kind to one exit
code, in one table in :mod:`layoutc.cli`):

* :class:`InputError` — the input is wrong: a layout, a checkpoint or another file layoutc
  reads, or the output folder it is asked to write (exists, not empty, on a full or
  read-only filesystem, a swap folder that fails). Fix the input and run again.
  :class:`LayoutError` is the input error that carries :class:`Diagnostic` s, each with a
  code, a source span and a message. A failure of the filesystem under the output is an
  input error too, not a kind of its own: what the caller does is the same (fix the folder
  or the disk it names, run again), and so is the exit code of an ``OSError``.
* :class:`Unsupported` — the input is valid but layoutc cannot do this yet.
* :class:`UsageError` — the request does not apply as asked (a flag for another kind of
  output, a budget too small to move anything); fix the command.
* :class:`InternalError` — an invariant of layoutc itself broke; a bug to report. Anything
  else that escapes (a ``ValueError``, ``KeyError``, ``AssertionError``) is a bug too.

A class of one module (``UnsafePickle``, ``OutputError``, ...) names where it comes from and
derives from its kind; :func:`kind` finds the kind of any exception.

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
SHOWN_COLUMNS = 120  # the most of one source line a diagnostic shows


@dataclass(frozen=True, slots=True)
class Diagnostic:
    code: str
    message: str
    span: Span = NO_SPAN
    hint: str = ""
    severity: str = "error"

    def render(self, source: str | None = None) -> str:
        """The diagnostic as a terminal user reads it, with the line and a caret."""
        return self.render_lines(None if source is None else source.split("\n"))

    def render_lines(self, lines: list[str] | None) -> str:
        """:meth:`render` with the source already cut into lines (as the parser counts them),
        so many diagnostics of one file cost one split, not one each. A line longer than
        :data:`SHOWN_COLUMNS` is shown as a window around the span, so a huge one-line file
        does not print itself once per diagnostic."""
        head = f"{self.span}: {self.severity}[{self.code}]: {self.message}"
        if self.span is NO_SPAN:
            head = f"{self.severity}[{self.code}]: {self.message}"
        elif not self.span.line:  # a place with no line: a flag of the command line
            head = f"{self.span.file}: {self.severity}[{self.code}]: {self.message}"
        out = [head]
        if lines is not None and 0 < self.span.line <= len(lines):
            text = lines[self.span.line - 1].rstrip("\r")
            column = self.span.column
            if len(text) > SHOWN_COLUMNS:
                first = max(0, min(column - 1 - SHOWN_COLUMNS // 3, len(text) - SHOWN_COLUMNS))
                window = text[first : first + SHOWN_COLUMNS]
                text = (
                    ("…" if first else "")
                    + window
                    + ("…" if first + SHOWN_COLUMNS < len(text) else "")
                )
                column += 1 - first if first else 0
            width = max(1, min(self.span.end - self.span.start, len(text) - column + 1))
            gutter = f"{self.span.line:>4} | "
            out.append(gutter + text)
            out.append(" " * (len(gutter) + column - 1) + "^" * width)
        if self.hint:
            out.append(f"  = help: {self.hint}")
        return "\n".join(out)


class LayoutcError(Exception):
    """Base class of everything layoutc raises on purpose; raise one of its kinds."""


class InputError(LayoutcError):
    """The input is wrong: a file layoutc reads or the folder it writes; the message names
    it and what is wrong."""


@dataclass
class LayoutError(InputError):
    """The input is wrong. Holds every diagnostic found, not just the first."""

    diagnostics: list[Diagnostic]
    source: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        super().__init__(self.render(limit=5))

    def render(self, limit: int | None = None) -> str:
        shown = self.diagnostics if limit is None else self.diagnostics[:limit]
        lines = None if self.source is None else self.source.split("\n")
        parts = [d.render_lines(lines) for d in shown]
        rest = len(self.diagnostics) - len(shown)
        if rest > 0:
            parts.append(f"... and {rest} more")
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.render(limit=5)

    @property
    def codes(self) -> list[str]:
        return [d.code for d in self.diagnostics]


class UsageError(LayoutcError, ValueError):
    """The request does not apply as asked: a flag for another kind of output, a budget
    too small to move anything, a missing argument. The command line exits 2 (usage)."""


class Unsupported(LayoutcError):
    """The input is valid, but layoutc does not support it (yet)."""


class InternalError(LayoutcError):
    """An invariant of layoutc broke. Please report it with the input that caused it."""


class PlanError(InputError):
    """A plan read back from JSON failed validation; the message names the offending op,
    buffer or piece. A plan compiled in this process that fails is layoutc's bug and raises
    :class:`InternalError` instead (see :meth:`layoutc.plan.plan.Plan.validate`)."""


KINDS = (InputError, Unsupported, UsageError, InternalError)


def kind(e: BaseException) -> type[LayoutcError] | None:
    """The kind (one of :data:`KINDS`) of ``e``: the first in its class's method resolution
    order, so a class that narrows its module's error (a safetensors dtype layoutc does not
    read is :class:`Unsupported` before it is a malformed file) is of the narrower kind.
    None for an exception layoutc did not raise on purpose."""
    for cls in type(e).__mro__:
        if cls in KINDS:
            return cls
    return None
