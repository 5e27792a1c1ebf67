"""Render a plan for people: jinja2 templates over ``plan.summary()``.

``text`` is the terminal dry run, ``markdown`` the same for a pull request or a wiki, and
``html`` a self-contained page that draws which rank holds which slice of the largest
tensors. Templates see plain data only; nothing here changes a plan.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
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


def _bytecode_cache() -> jinja2.BytecodeCache | None:
    """Compiled templates under the user's cache folder, so a run does not compile them
    again (tens of milliseconds); none where that folder cannot be written."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    folder = Path(root) / "layoutc" / "templates"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return jinja2.FileSystemBytecodeCache(str(folder))


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("layoutc.render", "templates"),
        bytecode_cache=_bytecode_cache(),
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
    if fmt == "html":
        extra.setdefault("timeline", timeline(plan))
        extra.setdefault("drawings", [])
    page = environment().get_template(template)
    return page.render(
        summary=summary, workers=shown, hidden_workers=len(workers) - len(shown), **extra
    )


_PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
)
_MODES = {"direct": "#59a14f", "ram": "#4e79a7", "spill": "#e15759", "fill": "#bab0ac"}


def _side(
    placement: Any, tensor: Any, state: str, title: str, width: int = 360, height: int = 180
) -> dict[str, Any]:
    """Rectangles of each slice's segments over the logical tensor, scaled to a box."""
    shape: tuple[int, ...] = tensor.shape or (1,)
    rows = shape[0]
    slices = placement.slices(tensor, state)
    rects = []
    for k, sl in enumerate(slices):
        color = _PALETTE[k % len(_PALETTE)]
        label = sl.label()
        for seg in sl.segments:
            r0, r1 = seg.logical[0] if seg.logical else (0, 1)
            c0, c1 = seg.logical[1] if len(seg.logical) > 1 else (0, 1)
            ncols = shape[1] if len(shape) > 1 else 1
            x0, x1 = c0 / ncols * width, c1 / ncols * width
            rects.append(
                {
                    "x": round(x0, 2),
                    "y": round(r0 / rows * height, 2),
                    "w": round(max(x1 - x0, 0.5), 2),
                    "h": round(max((r1 - r0) / rows * height, 0.5), 2),
                    "color": color,
                    "label": label,
                    "title": f"{label}: rows {r0}:{r1}"
                    + (f", cols {c0}:{c1}" if len(shape) > 1 else ""),
                }
            )
    copies = placement.copies(tensor, state)
    caption = f"{len(slices)} slice{'s' if len(slices) != 1 else ''}" + (
        f", each stored {copies}x" if copies > 1 else ""
    )
    return {"title": title, "caption": caption, "rects": rects, "width": width, "height": height}


def drawings(plan: Plan, source: Any, target: Any, n: int = 5) -> list[dict[str, Any]]:
    """Source and target shard maps of the ``n`` tensors moving the most bytes."""
    out = []
    for entry in plan.largest(n):
        name = entry["tensor"]
        if name not in source.layout.by_name or name not in target.layout.by_name:
            continue
        st, tt = source.layout.by_name[name], target.layout.by_name[name]
        s_state = next(
            (s for s in source.states(st) if s in ("weight", "master")), source.states(st)[0]
        )
        t_state = next(
            (s for s in target.states(tt) if s in ("weight", "master")), target.states(tt)[0]
        )
        out.append(
            {
                "tensor": name,
                "shape": list(st.shape),
                "routes": entry["routes"],
                "sides": [
                    _side(source, st, s_state, f"source: {source.format} {s_state}"),
                    _side(target, tt, t_state, f"target: {target.format} {t_state}"),
                ],
            }
        )
    return out


def timeline(plan: Plan, width: int = 900, max_workers: int = 16) -> dict[str, Any]:
    """Per worker, its units in order, widths proportional to bytes."""
    loads = [0] * plan.workers
    for u in plan.units:
        loads[u.worker] += u.bytes
    scale = width / max(max(loads), 1)
    bars = []
    for w in range(min(plan.workers, max_workers)):
        x = 0.0
        units = []
        for u in plan.units:
            if u.worker != w:
                continue
            wpx = u.bytes * scale
            units.append(
                {
                    "x": round(x, 2),
                    "w": round(max(wpx, 0.3), 2),
                    "color": _MODES.get(u.mode, "#999"),
                    "title": f"{u.tensor} {u.state} ({u.mode}, {human_size(u.bytes)})",
                }
            )
            x += wpx
        bars.append({"worker": w, "y": w * 18, "units": units})
    return {"bars": bars, "rows": len(bars), "width": width}
