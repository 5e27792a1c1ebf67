"""Check a layout against the checkpoint it claims to describe, before moving a byte.

Every stored buffer the layout's shard map predicts must exist in the files with the
predicted number of elements and dtype. Mismatches are diagnostics that name the file, the
key (and so the tensor) and both values; all of them are collected and raised once. Only
metadata is read (the pickles), never tensor data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layoutc.errors import Diagnostic, LayoutError, Span
from layoutc.formats import pt
from layoutc.formats.checkpoint import Checkpoint
from layoutc.formats.sources import as_checkpoint
from layoutc.place.base import Placement
from layoutc.place.shards import MASTER, WEIGHT

if TYPE_CHECKING:  # numpy is imported by the checks that compare values, not by check_against
    import numpy as np

MAX_SHOWN = 50


def _span(layout_source: str) -> Span:
    return Span(layout_source, 0, 0)


def check_against(placement: Placement, source: Checkpoint | str | Path) -> None:
    """Raise LayoutError if the files of ``source`` (a checkpoint, or its folder) do not
    hold what ``placement`` says."""
    ckpt = as_checkpoint(source)
    folder = ckpt.folder
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
            loaded[buf.file] = ckpt.load(buf.file)
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
        elif len(buf.shape) > 1 and tuple(ref.shape) != tuple(buf.shape):
            add(
                "E303",
                f"{folder / buf.file}: {buf.key} has shape {list(ref.shape)}; the layout says "
                f"{list(buf.shape)} (as many elements, cut another way: check which dim is split)",
            )
        elif ref.dtype != buf.dtype:
            add(
                "E304",
                f"{folder / buf.file}: {buf.key} is {ref.dtype}; the layout says {buf.dtype}",
            )
        if len(diags) >= MAX_SHOWN:
            break
    if len(diags) < MAX_SHOWN:
        for where in _undeclared(placement, folder, loaded):
            add(
                "E306",
                f"{where}, which the layout does not declare",
                "declare every tensor the checkpoint holds (layoutc infer shows them); "
                "a converter that left it out would lose it",
            )
            if len(diags) >= MAX_SHOWN:
                break
    if len(diags) < MAX_SHOWN and placement.format == ckpt.format:
        placed = set(placement.files())
        for f in (f for f in ckpt.state_files() if f not in placed):
            add(
                "E308",
                f"{folder / f}: the checkpoint holds this file, which the layout does not place",
                "declare what it holds (layoutc infer shows it); a converter that left it out "
                "would lose it",
            )
            if len(diags) >= MAX_SHOWN:
                break
    if diags:
        raise LayoutError(diags)


def _undeclared(placement: Placement, folder: Path, loaded: dict[str, Any]) -> list[str]:
    """Tensors stored in the model-state and layer files (or a universal checkpoint's
    ``zero/<param>`` folders) that no declared tensor or tie accounts for."""
    expected = {(b.file, b.key) for b in placement.buffers()}
    known = set(placement.layout.tie_source) | set(placement.layout.by_name)
    out: list[str] = []
    for file, obj in loaded.items():
        if not isinstance(obj, dict):
            continue
        if file.startswith("layer_"):
            stored, prefix = obj, ""
        elif isinstance(obj.get("module"), dict):
            stored, prefix = obj["module"], "module/"
        else:
            continue
        for key in (k for k, v in stored.items() if isinstance(v, pt.TensorRef)):
            # a module key names its tensor (ZeRO-3 keeps a stub of each parameter there)
            if (file, prefix + key) not in expected and not (prefix and key in known):
                out.append(f"{folder / file}: holds {prefix}{key}")
    zero = folder / "zero"
    if zero.is_dir() and any(f.startswith("zero/") for f, _ in expected):
        # (ds_to_universal also writes folders for buffers, which the module holds too)
        for d in sorted(zero.iterdir()):
            if d.is_dir() and (d / "fp32.pt").is_file() and d.name not in known:
                out.append(f"{d}: holds the states of {d.name}")
    return out


CHUNK = 1 << 24  # elements compared at a time


def check_replicas(placement: Placement, read: Callable[[str, str, int, int], np.ndarray]) -> None:
    """Raise LayoutError if the copies of a slice the layout says are the same — replicas
    over a tensor-parallel axis, the stages of a tied layer, each partition's step — hold
    different values. ``read(file, key, offset, count)`` returns stored elements. A wrong
    split (a row-parallel weight declared column-parallel, a split tensor declared
    replicated) shows up here when the shapes alone agree."""
    diags: list[Diagnostic] = []
    for t in placement.tensors:
        for state in placement.states(t):
            copies = placement.copies(t, state)
            if copies < 2:
                continue
            for sl in placement.slices(t, state):
                n = sl.numel if sl.shape else 1
                bad = _first_difference(placement, read, t, state, sl, copies, n)
                if bad is not None:
                    diags.append(
                        Diagnostic(
                            "E305",
                            f"{t.name} {state}: {bad}",
                            _span(placement.layout.source),
                            "the layout stores these as copies of one slice; declare the dim the "
                            "tensor is split on (e.g. [H, F / tp] for a row-parallel weight)",
                        )
                    )
                    break
            if len(diags) >= MAX_SHOWN:
                raise LayoutError(diags)
    if diags:
        raise LayoutError(diags)


def _first_difference(
    placement: Placement,
    read: Callable[[str, str, int, int], np.ndarray],
    t: Any,
    state: str,
    sl: Any,
    copies: int,
    n: int,
) -> str | None:
    import numpy as np  # lazy: planning from a checkpoint imports this module, not numpy

    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        first = None
        for c in range(copies):
            runs = placement.runs(t, state, sl, c, lo, hi)
            if not runs:  # no copy here: the rank's own slice of the tensor is empty
                continue
            got = np.concatenate([read(r.file, r.key, r.offset, r.numel) for r in runs])
            where = ", ".join(sorted({r.file for r in runs}))
            if first is None:
                first = (got, where)
                continue
            same = got.view(np.uint8) == first[0].view(np.uint8)
            if not same.all():
                i = int(np.argmin(same)) // got.itemsize
                return (
                    f"declared the same in {first[1]} and {where}, but element {lo + i} of "
                    f"{sl.label()} is {first[0][i]!r} in one and {got[i]!r} in the other"
                )
    return None


SAMPLE = 1024  # elements compared at each end of a slice by check_masters

# How far a 16-bit weight may be from its fp32 master: the rounding of the master (half a
# unit in the last place) with room to spare, relative, and the smallest normal number
# absolute (a master too small for the 16-bit type becomes 0 or a subnormal there).
_ROUNDING = {"bf16": (2.0**-7, 2.0**-126), "fp16": (2.0**-10, 2.0**-14), "fp32": (0.0, 0.0)}


def check_masters(placement: Placement, read: Callable[[str, str, int, int], np.ndarray]) -> None:
    """Raise LayoutError if a tensor's low-precision weights are not the rounding of its
    fp32 master. A native DeepSpeed checkpoint stores both (the module's 16-bit copy, the
    optimizer's flat partitions) and DeepSpeed writes one from the other, so metadata that
    points the masters at the wrong bytes — two equal-sized parameters swapped in
    ``param_shapes`` — shows up here. The first and last :data:`SAMPLE` elements of each
    slice are compared."""
    diags: list[Diagnostic] = []
    if placement.layout.store.format != "deepspeed":  # written by DeepSpeed's own save
        return
    for t in placement.tensors:
        states = placement.states(t)
        if WEIGHT not in states or MASTER not in states:
            continue
        rounding = _ROUNDING.get(placement.dtype(t, WEIGHT))
        if rounding is None:
            continue
        rel, tiny = rounding
        for sl in placement.slices(t, WEIGHT):
            bad = _unrounded(placement, read, t, sl, rel, tiny)
            if bad is not None:
                diags.append(
                    Diagnostic(
                        "E307",
                        f"{t.name}: {bad}",
                        _span(placement.layout.source),
                        "the checkpoint's metadata (param_shapes, the flat partitions) does "
                        "not describe its own data: it is damaged or crafted",
                    )
                )
                break
        if len(diags) >= MAX_SHOWN:
            break
    if diags:
        raise LayoutError(diags)


def _unrounded(
    placement: Placement,
    read: Callable[[str, str, int, int], np.ndarray],
    t: Any,
    sl: Any,
    rel: float,
    tiny: float,
) -> str | None:
    import numpy as np  # lazy: planning from a checkpoint imports this module, not numpy

    n = sl.numel if sl.shape else 1
    for lo, hi in sorted({(0, min(n, SAMPLE)), (max(0, n - SAMPLE), n)}):
        weight_runs = placement.runs(t, WEIGHT, sl, 0, lo, hi)
        master_runs = placement.runs(t, MASTER, sl, 0, lo, hi)
        if not weight_runs or not master_runs:  # a ZeRO-3 stub, or an empty slice
            return None
        w = np.concatenate([read(r.file, r.key, r.offset, r.numel) for r in weight_runs])
        m = np.concatenate([read(r.file, r.key, r.offset, r.numel) for r in master_runs])
        if w.size != m.size:
            return None
        w64, m64 = w.astype(np.float64), m.astype(np.float64)
        with np.errstate(invalid="ignore"):
            off = np.abs(w64 - m64) > rel * np.abs(m64) + tiny
        off &= ~(np.isnan(w64) & np.isnan(m64))
        if off.any():
            i = int(np.argmax(off))
            where = ", ".join(sorted({r.file for r in master_runs}))
            return (
                f"element {lo + i} of {sl.label()} is {w[i]!r} in the model states' "
                f"{placement.dtype(t, WEIGHT)} copy but {m[i]!r} in its fp32 master ({where}): "
                "the weights are not the rounding of their masters"
            )
    return None


def _hint(placement: Placement) -> str:
    return f"the layout is {placement.describe()}; check its mesh, zero stage and dtype"
