"""DeepSpeed AutoTP's own account of how it cut each parameter, read and written.

An AutoTP checkpoint's model-states files hold ``universal_checkpoint_info``: name patterns
of row-parallel, replicated and vocabulary parameters, and an ``affine_map`` that gives,
for every parameter, its logical shape and each tensor-parallel rank's shard as pieces
(shape, offset and strides into the logical tensor and into the shard, the ranks holding
the same piece). :func:`split_of` turns that into the dim a parameter is split on and each
rank's share of it, which :func:`dim_text` writes as a layout dim — ``N / tp`` when the
share is even, ``grains(N, G) / tp`` when AutoTP shared whole grains out unevenly — so
``layoutc infer`` states the geometry in the layout and the converter never guesses.
:func:`retarget` writes the map again for the topology of a target layout, so the
checkpoints layoutc writes describe themselves as DeepSpeed's do. Pure data; no torch.
"""

from __future__ import annotations

import math
import re
from typing import Any

from layoutc import ir
from layoutc.place.shards import slices_of

INFO = "universal_checkpoint_info"
# DeepSpeed's grain rule (module_inject/tp_shard.py): these take the tp_grain_size grain,
# every other parameter whose rows divide by the key/value head count takes a head's rows.
_GRAIN_SIZE_NAMES = ("mlp", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")
_LAST_LINEAR = ("lm_head", "embed_out")


def shares(size: int, parts: int, grain: int) -> list[int]:
    """Each part's share of ``size`` elements cut in whole grains (as :class:`ir.Dim` does)."""
    return [
        ir.Dim((ir.Block(None, size),), ("x",), 1, parts, grain).local_at(p) for p in range(parts)
    ]


def split_of(
    name: str, entry: dict[str, Any], tp: int
) -> tuple[tuple[int, ...], int | None, list[int]]:
    """``(logical shape, split dim or None, each tp rank's size along it)`` of one
    parameter's affine-map entry. Raises ValueError when the pieces are not one contiguous
    block per rank along a single dim (fused sub-parameters: declare them by hand)."""
    shape = tuple(int(n) for n in entry["logical_shape"])
    ranks = {int(r): v for r, v in entry["ranks"].items()}
    if sorted(ranks) != list(range(tp)):
        raise ValueError(f"{name}: the affine map covers tp ranks {sorted(ranks)}, not 0..{tp - 1}")
    shard = [tuple(int(n) for n in ranks[r]["shard_shape"]) for r in range(tp)]
    dims = {d for s in shard for d in range(len(shape)) if s[d] != shape[d]}
    if any(len(s) != len(shape) for s in shard) or len(dims) > 1:
        raise ValueError(f"{name}: shards {shard} are no split of {list(shape)} on one dim")
    if not dims:
        return shape, None, [shape[0] if shape else 1] * tp
    (dim,) = dims
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    at = 0
    for r in range(tp):
        pieces = ranks[r]["pieces"]
        if len(pieces) != 1 or int(pieces[0]["source"][0]) != at * strides[dim]:
            raise ValueError(
                f"{name}: tp rank {r} holds {len(pieces)} piece(s) not starting at row {at} of "
                f"dim {dim} (fused sub-parameters); declare its blocks in the layout"
            )
        at += shard[r][dim]
    if at != shape[dim]:
        raise ValueError(f"{name}: shards {shard} do not add up to {list(shape)} on dim {dim}")
    return shape, dim, [s[dim] for s in shard]


def grain_of(size: int, sizes: list[int], grain_size: int, by_grain_size: bool) -> int | None:
    """The grain that cuts ``size`` into ``sizes`` as AutoTP does: the configured
    ``tp_grain_size`` where DeepSpeed's rule uses it (``by_grain_size``) and it fits; else 0
    for an even split (the head count that decides the grain is not recorded); else the
    smallest grain that reproduces the sizes; None when no grain does."""
    parts = len(sizes)
    if by_grain_size and grain_size <= size and shares(size, parts, grain_size) == sizes:
        return grain_size
    if size % parts == 0 and all(s == size // parts for s in sizes):
        return 0
    candidates = [grain_size] if grain_size <= size else []
    candidates += sorted({abs(a - b) for a in sizes for b in sizes if a != b} | set(sizes) - {0})
    for g in candidates:
        if 0 < g <= size and shares(size, parts, g) == sizes:
            return g
    return None


def matches(params: dict[str, Any], names: list[str]) -> dict[str, list[str]]:
    """The names each pattern of the affine map's ``params`` matches in full. DeepSpeed
    writes one ``^escaped-name$`` pattern per parameter, looked up directly; other patterns
    are matched against every name."""
    known = set(names)
    out: dict[str, list[str]] = {}
    for pattern in params:
        literal = re.sub(r"\\(.)", r"\1", pattern[1:-1])
        if pattern == f"^{re.escape(literal)}$":
            out[pattern] = [literal] if literal in known else []
        else:
            out[pattern] = [n for n in names if re.fullmatch(pattern, n)]
    return out


def dim_text(size: int, grain: int, axis: str) -> str:
    return f"{size} / {axis}" if grain == 0 else f"grains({size}, {grain}) / {axis}"


def uses_grain_size(name: str) -> bool:
    """Whether DeepSpeed cuts ``name`` in ``tp_grain_size`` grains whatever the head count."""
    return any(s in name for s in _GRAIN_SIZE_NAMES) or name in _LAST_LINEAR


# ------------------------------------------------------------------ writing


def affine_entry(layout: ir.Layout, t: ir.Tensor, axis: str) -> dict[str, Any]:
    """The affine-map entry of ``t`` at the layout's topology (tp ranks over ``axis``)."""
    shape = t.shape
    logical = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    tp = layout.mesh.sizes[axis]
    ranks: dict[int, dict[str, Any]] = {}
    split = axis in t.split_axes
    for sl in slices_of(t, layout.mesh):
        coords = dict(sl.coords)
        local = [math.prod(sl.shape[d + 1 :]) for d in range(len(sl.shape))]
        where = [coords[axis]] if split else list(range(tp))
        pieces = []
        for seg in sl.segments or (None,):
            if seg is None:  # an empty shard: one empty piece where its rows would start
                sizes = layout.mesh.sizes
                lo = [d.bounds(d.part_of(coords, sizes))[0] if d.split else 0 for d in t.dims]
                box = tuple((a, a + n) for a, n in zip(lo, sl.shape, strict=True))
                local_lo: tuple[int, ...] = (0,) * len(shape)
            else:
                box = seg.logical
                local_lo = tuple(a for a, _ in seg.local)
            pieces.append(
                {
                    "shape": [b - a for a, b in box],
                    "source": [sum(a * s for (a, _), s in zip(box, logical, strict=True)), logical],
                    "dest": [sum(a * s for a, s in zip(local_lo, local, strict=True)), local],
                    "locations": where,
                }
            )
        for r in where:
            ranks[r] = {"shard_shape": list(sl.shape), "pieces": pieces}
    return {"logical_shape": list(shape), "ranks": {r: ranks[r] for r in sorted(ranks)}}


def retarget(info: Any, layout: ir.Layout, model_axes: tuple[str, ...]) -> Any:
    """The source's ``universal_checkpoint_info`` with its affine map written for
    ``layout``'s topology; None where the target has no single tensor-parallel axis (the
    map would describe another topology) or the source had none."""
    if not isinstance(info, dict):
        return None
    amap = info.get("affine_map")
    if not isinstance(amap, dict) or not isinstance(amap.get("params"), dict):
        return dict(info)
    if len(model_axes) != 1:
        return None
    (axis,) = model_axes
    found = matches(amap["params"], [t.name for t in layout.tensors])
    params = {
        pattern: affine_entry(layout, layout.tensor(names[0]), axis)
        for pattern, names in found.items()
        if len(names) == 1
    }
    return {**info, "affine_map": {**amap, "params": params}}


def unproven_cuts(info: Any, source: ir.Layout, target: ir.Layout) -> list[str]:
    """Tensors of an AutoTP checkpoint (``info`` from its model states) that ``target``, a
    DeepSpeed layout at another tp, would cut where DeepSpeed might cut them elsewhere: split
    evenly (no grain declared) in the source, and not cut by ``tp_grain_size``, so AutoTP
    cuts them in whole key/value-head groups, a count the files do not record. Even splits
    stay even at a tp dividing the source's, so only other tps are in question."""
    if (
        not (isinstance(info, dict) and info.get("affine_map"))
        or target.store.format != "deepspeed"
    ):
        return []
    tp_src = source.mesh.size(*source.model_axes)
    tp_tgt = target.mesh.size(*target.model_axes)
    if tp_tgt == tp_src or tp_src % tp_tgt == 0:
        return []
    return [
        t.name
        for t in target.tensors
        if not uses_grain_size(t.name)
        and any(d.split and not d.grain for d in t.dims)
        and t.name in source.by_name
    ]
