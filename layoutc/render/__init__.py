"""Render a plan for people: jinja2 templates over ``plan.summary()``.

``text`` is the terminal dry run, ``markdown`` the same for a pull request or a wiki, and
``html`` a self-contained page that draws which rank holds which slice of the largest
tensors. Templates see plain data only; nothing here changes a plan.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import jinja2

from layoutc.plan.plan import Plan

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(n: int | float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _num(n: int) -> str:
    return f"{n:,}"


def _ljust(s: Any, width: int) -> str:
    return str(s).ljust(width)


def _rjust(s: Any, width: int) -> str:
    return str(s).rjust(width)


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("layoutc.render", "templates"),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=jinja2.select_autoescape(["html"]),
    )
    env.filters.update(size=human_size, num=_num, ljust=_ljust, rjust=_rjust)
    return env


MAX_WORKER_ROWS = 16


def render(plan: Plan, fmt: str = "text", **extra: Any) -> str:
    """The plan as ``text``, ``markdown`` or ``html``."""
    summary = plan.summary()
    workers = summary["per_worker"]
    shown = workers if len(workers) <= MAX_WORKER_ROWS else workers[:MAX_WORKER_ROWS]
    template = {"text": "plan.txt.j2", "markdown": "plan.md.j2", "html": "plan.html.j2"}[fmt]
    return (
        environment()
        .get_template(template)
        .render(summary=summary, workers=shown, hidden_workers=len(workers) - len(shown), **extra)
    )
