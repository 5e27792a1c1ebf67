"""Check a layout against the checkpoint it claims to describe, before moving a byte.

Every stored buffer the layout's shard map predicts must exist in the files with the
predicted number of elements and dtype. Mismatches are diagnostics that name the file, the
key (and so the tensor) and both values; all of them are collected and raised once. Only
metadata is read (the pickles), never tensor data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layoutc.errors import Diagnostic, LayoutError, Span
from layoutc.formats import pt
from layoutc.place.base import Placement

MAX_SHOWN = 50


def _span(layout_source: str) -> Span:
    return Span(layout_source, 0, 0)


def check_against(placement: Placement, folder: str | Path) -> None:
    """Raise LayoutError if the files under ``folder`` do not hold what ``placement`` says."""
    folder = Path(folder)
    src = placement.layout.source
    diags: list[Diagnostic] = []
    loaded: dict[str, Any] = {}

    def add(code: str, message: str, hint: str = "") -> None:
        diags.append(Diagnostic(code, message, _span(src), hint))

    for buf in placement.buffers():
        if buf.file not in loaded:
            path = folder / buf.file
            if not path.is_file():
                loaded[buf.file] = None
                add(
                    "E301",
                    f"{path}: the layout expects this file; it does not exist",
                    _hint(placement),
                )
                continue
            loaded[buf.file] = pt.load(path)
        obj = loaded[buf.file]
        if obj is None:
            continue
        try:
            ref = pt.at(obj, buf.key)
        except (KeyError, IndexError, ValueError, TypeError):
            add(
                "E302",
                f"{folder / buf.file}: no tensor at {buf.key}, which the layout places there",
            )
            continue
        if not isinstance(ref, pt.TensorRef):
            add("E302", f"{folder / buf.file}: {buf.key} is a {type(ref).__name__}, not a tensor")
            continue
        if ref.numel != buf.numel:
            add(
                "E303",
                f"{folder / buf.file}: {buf.key} has {ref.numel} elements {list(ref.shape)}; "
                f"the layout says {buf.numel} {list(buf.shape)}",
            )
        elif ref.dtype != buf.dtype:
            add(
                "E304",
                f"{folder / buf.file}: {buf.key} is {ref.dtype}; the layout says {buf.dtype}",
            )
        if len(diags) >= MAX_SHOWN:
            break
    if diags:
        raise LayoutError(diags)


def _hint(placement: Placement) -> str:
    return f"the layout is {placement.describe()}; check its mesh, zero stage and dtype"
