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
from layoutc.units import human_size as human_size  # the filter, and for callers


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


def html_report(plan: Plan) -> str:
    """The self-contained HTML report of a plan (``layoutc plan --html``): the summary, the
    ZeRO partitions at both ends, the shard maps and routes of the tensors the text shows,
    the work per worker."""
    source, target = plan.source_placement, plan.target_placement
    names = {e["tensor"] for e in plan.largest()}
    return render(
        plan,
        "html",
        drawings=drawings(plan, source, target),
        partitions=[
            {"side": "source", "format": source.format, "groups": partitions(source, names)},
            {"side": "target", "format": target.format, "groups": partitions(target, names)},
        ],
    )


def render(plan: Plan, fmt: str = "text", **extra: Any) -> str:
    """The plan as ``text``, ``markdown`` or ``html``."""
    summary = plan.summary()
    workers = summary["per_worker"]
    shown = workers if len(workers) <= MAX_WORKER_ROWS else workers[:MAX_WORKER_ROWS]
    template = {"text": "plan.txt.j2", "markdown": "plan.md.j2", "html": "plan.html.j2"}[fmt]
    if fmt == "html":
        extra.setdefault("timeline", timeline(plan))
        extra.setdefault("drawings", [])
        extra.setdefault("partitions", [])
        extra.setdefault("modes", _MODES)
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


def drawings(plan: Plan, source: Any, target: Any, n: int = 10) -> list[dict[str, Any]]:
    """Source and target shard maps of the ``n`` tensors moving the most bytes."""
    out = []
    for entry in plan.largest(n):
        name = entry["tensor"]
        if name not in source.layout.by_name or name not in target.layout.by_name:
            out.append({"tensor": name, "shape": [], "routes": entry["routes"], "sides": []})
            continue
        st, tt = source.layout.by_name[name], target.layout.by_name[name]
        s_state = next(
            (s for s in source.states(st) if s in ("weight", "master")), source.states(st)[0]
        )
        t_state = next(
            (s for s in target.states(tt) if s in ("weight", "master")), target.states(tt)[0]
        )
        sides = [
            _side(source, st, s_state, f"source: {source.format} {s_state}"),
            _side(target, tt, t_state, f"target: {target.format} {t_state}"),
        ]
        if all(len(side["rects"]) == 1 for side in sides):
            sides = []  # whole at both ends: the routes (and the partitions) say it all
        out.append(
            {"tensor": name, "shape": list(st.shape), "routes": entry["routes"], "sides": sides}
        )
    return out


MAX_PARTITION_ROWS = 16  # ranks drawn per flat buffer; the rest are counted


def partitions(placement: Any, names: set[str], width: int = 1000) -> list[dict[str, Any]]:
    """ZeRO's flat partitions of the fp32 masters, one drawing per flat group: a row per
    rank's buffer (at most :data:`MAX_PARTITION_ROWS`), each tensor's run in it a segment,
    ``names`` (the tensors the report shows) in their colours, others grey, padding blank.
    Empty where the layout partitions nothing."""
    if not placement.layout.zero.stage:
        return []
    rows: dict[str, dict[str, list[tuple[int, int, str, int]]]] = {}
    for t in placement.trainable:
        if "master" not in placement.states(t):
            continue
        for sl in placement.slices(t, "master"):
            for run in placement.runs(t, "master", sl, 0, 0, sl.numel if sl.shape else 1):
                held = rows.setdefault(run.key, {}).setdefault(run.file, [])
                held.append((run.offset, run.numel, t.name, run.start))
    colors = {name: _PALETTE[k % len(_PALETTE)] for k, name in enumerate(sorted(names))}
    groups = []
    for key in sorted(rows):
        files = sorted(rows[key])
        size = max(o + n for f in files for o, n, _, _ in rows[key][f]) or 1
        scale = width / size
        drawn = []
        labels = _short_names(files)
        for i, f in enumerate(files[:MAX_PARTITION_ROWS]):
            segs = []
            for offset, numel, name, start in sorted(rows[key][f]):
                segs.append(
                    {
                        "x": round(offset * scale, 2),
                        "w": round(max(numel * scale, 0.5), 2),
                        "color": colors.get(name, "#cfcfcf"),
                        "label": name if name in colors else "",
                        "title": f"{name}[{start}:{start + numel}] at {offset}:{offset + numel}",
                    }
                )
            drawn.append({"file": f, "label": labels[f], "y": i * 22, "segments": segs})
        groups.append(
            {
                "key": key,
                "rows": drawn,
                "hidden": len(files) - len(drawn),
                "elements": size,
                "width": width,
                "height": len(drawn) * 22,
            }
        )
    return groups


def _short_names(files: list[str]) -> dict[str, str]:
    """Each file by what tells it from the others: ``rank 1`` for
    ``bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt`` among its dp peers."""
    if len(files) < 2:
        return {f: f for f in files}
    digits = "0123456789"
    prefix = _common_start(files).rstrip(digits)
    suffix = _common_start([f[::-1] for f in files])[::-1].lstrip(digits)
    word = prefix.rstrip("_").rsplit("_", 1)[-1]
    out = {}
    for f in files:
        middle = f[len(prefix) : len(f) - len(suffix)] if len(suffix) < len(f) else f
        out[f] = f"{word} {middle}".strip() if middle else f
    return out


def _common_start(texts: list[str]) -> str:
    """The characters every one of ``texts`` starts with."""
    first, last = min(texts), max(texts)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


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
    return {"bars": bars, "rows": len(bars), "width": width, "most": max(loads)}
