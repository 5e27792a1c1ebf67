"""Create a target's files with their structure, ready to be filled at known offsets.

:func:`prepare` writes every output file of a target placement — pickled metadata and
pre-sized, not yet written storages (holes) — and returns writable file regions (pwrite) of the
stored buffers the plan's ``write`` ops address. Metadata a plan does not move (step
counts, lr scheduler state, loss scaler, param groups, client state) is carried over from
the source checkpoint's files. :meth:`Prepared.finish` patches the zip CRCs once the data
is in place. Markers a loader looks for (``latest``, ``latest_universal``, the safetensors
index) are returned to the caller, which writes them beside the files before the folder is
committed (see :mod:`layoutc.runtime.commit`).

:data:`WRITERS` maps each format to its writer, as :data:`layoutc.place.PLACEMENTS` maps
it to its shard map. :func:`torch_state_dict` is the one writer of a torch state dict
(``name -> tensor``): the ``torch`` format's ``pytorch_model.bin`` and
:func:`layoutc.save.save` both create theirs with it.

Every path a writer creates — the tag folder, each file of the placement, each marker — goes
through :func:`~layoutc.runtime.commit.inside`: a tag or a file name that is absolute, has a
``..`` or resolves outside ``out`` is refused, whatever let it through before.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from layoutc import ir
from layoutc.dtypes import np_dtype
from layoutc.errors import InternalError, Unsupported
from layoutc.formats import dcp_metadata as dm
from layoutc.formats import dcp_write, pt
from layoutc.formats import deepspeed_write as dw
from layoutc.formats import safetensors as st
from layoutc.formats.checkpoint import Checkpoint
from layoutc.formats.dcp import DcpCheckpoint
from layoutc.formats.dcp import carried as dcp_carried
from layoutc.formats.deepspeed import DeepSpeedCheckpoint
from layoutc.place.base import Placement
from layoutc.place.dcp import DcpPlacement, data_file, parse_item_key
from layoutc.place.deepspeed import LATEST, LATEST_UNIVERSAL, DeepSpeedPlacement
from layoutc.place.shards import STEP, WEIGHT, StoredBuffer
from layoutc.runtime.checksum import file_crc
from layoutc.runtime.fileio import Files, inside
from layoutc.runtime.reopen import new_file


@dataclass
class Prepared:
    root: Path  # where files go (the tag folder for DeepSpeed formats)
    views: dict[tuple[str, str], Any] = field(default_factory=dict)  # Regions of the output files
    created: list[pt.Created] = field(default_factory=list)
    markers: dict[Path, str] = field(default_factory=dict)  # path -> text, for the commit
    files: list[Path] = field(default_factory=list)
    io: Files = field(default_factory=lambda: Files(os.O_RDWR, direct=True))

    def finish(self) -> dict[Path, int]:
        """Patch the zip CRCs; returns the CRC-32 of every file, combined from the CRCs of
        the writes into it (only bytes no write covered are read back)."""
        self.views.clear()
        self.io.close()
        created = {c.path: c for c in self.created}
        crcs: dict[Path, int] = {}
        for path in self.files:
            pieces = self.io.pieces.get(str(path))
            if path in created:
                crcs[path] = created[path].finish_crcs(pieces)
            else:
                crcs[path] = file_crc(path, pieces)
        return crcs


def _map(
    p: Prepared, c: pt.Created, buffers: dict[str, StoredBuffer], keys: dict[str, str]
) -> None:
    """Memory-map each stored buffer of a created file (``keys``: key path -> storage key)."""
    for path, buf in buffers.items():
        storage = keys[path]
        offset, size = c.storages[storage]
        if buf.nbytes > size:
            raise InternalError(
                f"{c.path}: {path} needs {buf.nbytes} bytes but its storage holds {size}"
            )
        if buf.numel == 0:
            p.views[(buf.file, path)] = np.zeros(0, np_dtype(buf.dtype))
            continue
        p.views[(buf.file, path)] = p.io.region(str(c.path), offset, buf.numel, np_dtype(buf.dtype))


def _by_file(target: Placement) -> dict[str, dict[str, StoredBuffer]]:
    out: dict[str, dict[str, StoredBuffer]] = {}
    for b in target.buffers():
        out.setdefault(b.file, {})[b.key] = b
    return out


@dataclass(frozen=True)
class Origin:
    """What an output takes from its source: the source checkpoint, the tag to write,
    optimizer hyperparameters for fresh optimizer state, and the source's placement
    (which finds each group's by name)."""

    checkpoint: Checkpoint | None = None
    tag: str = "global_step0"
    param_groups: list[dict[str, Any]] | None = None
    placement: Placement | None = None


def prepare(
    target: Placement,
    out: Path,
    checkpoint: Checkpoint | Path | None = None,
    tag: str | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    source: Placement | None = None,
) -> Prepared:
    """Create ``target``'s files under ``out``; see the module docstring. ``checkpoint``
    is the source (or a DeepSpeed tag folder): what unsharded state is carried from;
    ``param_groups`` (optimizer hyperparameters) are used where it has none; ``source``,
    its placement, finds each group's by name."""
    writer = WRITERS.get(target.format)
    if writer is None:
        raise Unsupported(f"writing the {target.format} format is not supported yet")
    if isinstance(checkpoint, Path):
        checkpoint = DeepSpeedCheckpoint.scan(checkpoint)
    return writer(target, out, Origin(checkpoint, tag or "global_step0", param_groups, source))


def _deepspeed(target: Any, out: Path, origin: Origin) -> Prepared:
    """A native DeepSpeed checkpoint: ``OUT/<tag>/`` and ``OUT/latest``."""
    root = target.layout.store.tag or origin.tag
    p = Prepared(inside(out, root))
    p.root.mkdir(parents=True, exist_ok=True)
    by_file = _by_file(target)
    carried = dw.Carried.read(origin.checkpoint, origin.placement)
    carried.fresh_param_groups = _fresh_groups(origin)
    written: set[str] = set()
    for f, obj, holes in dw.files(target, carried, by_file):
        path = inside(p.root, f)
        c = pt.create(obj, path)
        p.created.append(c)
        p.files.append(path)
        planned = by_file.get(f, {})
        missing = set(planned) - set(holes.keys)
        if missing:
            raise InternalError(f"{f}: the placement stores {sorted(missing)[0]}, the writer not")
        _map(p, c, planned, holes.keys)
        written.add(f)
    unplaced = set(by_file) - written
    if unplaced:
        raise InternalError(f"the placement stores {sorted(unplaced)[0]}, the writer not")
    p.markers[inside(out, LATEST)] = root
    return p


def _universal(target: Any, out: Path, origin: Origin) -> Prepared:
    """DeepSpeed's universal checkpoint: ``OUT/<tag>/zero/<param>/<state>.pt``, the model
    files carried from the source, and ``OUT/latest_universal``."""
    source, tag = origin.checkpoint, origin.tag
    root = inside(out, tag)
    p = Prepared(root)
    by_file = _by_file(target)
    fresh = _fresh_model_files(target, by_file, origin)
    for f in target.model.model_files():
        path = inside(root, f)
        path.parent.mkdir(parents=True, exist_ok=True)
        planned = by_file.get(f, {})
        keys: dict[str, str] = {}
        src = source.path(f) if isinstance(source, DeepSpeedCheckpoint) else None
        if source is not None and src is not None and src.is_file():
            obj = pt.carry(source.load(src), planned, keys)
        elif f in fresh:
            obj, holes = fresh[f]
            keys = holes.keys
        else:  # whole tensors under module/ (a layout DeepSpeed's files cannot hold)
            obj = {"module": OrderedDict()}
            for key, b in planned.items():
                keys[key] = key
                obj["module"][key.split("/", 1)[1]] = pt.Tensor(b.dtype, b.shape, None, key=key)
        missing = set(planned) - set(keys)
        if missing:
            raise Unsupported(
                f"{src}: the source file has no {sorted(missing)[0]} to carry into {f}"
            )
        c = pt.create(obj, path)
        p.created.append(c)
        p.files.append(path)
        _map(p, c, planned, keys)
    for t in target.trainable:
        for state in target.optimizer_states(t):
            f, key = target.location(t, state)
            b = by_file[f][key]
            path = inside(root, f)
            path.parent.mkdir(parents=True, exist_ok=True)
            tensor = pt.Tensor(b.dtype, b.shape, None, key="0")
            slicing = _slicing(t, target.layout.zero.axes)
            c = pt.create(tensor if state == STEP else {"param": tensor, **slicing}, path)
            p.created.append(c)
            p.files.append(path)
            _map(p, c, {key: b}, {key: "0"})
    if target.layout.optimizer is not None:
        path = inside(root, target.OPTIMIZER_FILE)
        path.parent.mkdir(parents=True, exist_ok=True)
        pt.save(_optimizer_state(source, _fresh_groups(origin), target, origin), path)
        p.files.append(path)
    p.markers[inside(out, LATEST_UNIVERSAL)] = tag
    return p


def _fresh_model_files(
    target: Any, by_file: dict[str, dict[str, StoredBuffer]], origin: Origin
) -> dict[str, tuple[Any, dw.Holes]]:
    """The model-states files of a universal target whose source has none (not a DeepSpeed
    checkpoint): DeepSpeed's own, as its writer makes them for this layout, with fresh run
    state. Made only when asked for."""
    if isinstance(origin.checkpoint, DeepSpeedCheckpoint) or not isinstance(
        target.model, DeepSpeedPlacement
    ):
        return {}
    if not target.layout.zero.axes and target.layout.optimizer is not None:
        raise Unsupported(
            "a universal checkpoint made from full weights carries DeepSpeed's model files of "
            "a ZeRO-1/2/3 run; this layout declares no ZeRO stage: give --zero 1, 2 or 3"
        )
    wanted = set(target.model.model_files())
    carried = dw.Carried.read(origin.checkpoint)
    carried.fresh_param_groups = _fresh_groups(origin)
    out: dict[str, tuple[Any, dw.Holes]] = {}
    for f, obj, holes in dw.files(target.model, carried, by_file):
        if f in wanted:
            out[f] = (obj, holes)
        if len(out) == len(wanted):
            break
    return out


def _source_step(origin: Origin | None) -> float:
    """The optimizer step a distributed checkpoint saved (its first trainable tensor's),
    else 0."""
    src = origin.checkpoint if origin is not None else None
    placement = origin.placement if origin is not None else None
    if not isinstance(src, DcpCheckpoint) or not isinstance(placement, DcpPlacement):
        return 0.0
    for t in placement.trainable:
        if STEP in placement.states(t):
            ref = src.tensor_item(placement.key(t, STEP), ())
            return float(ref.numpy(src.opener))
    return 0.0


def _slicing(t: ir.Tensor, zero_axes: tuple[str, ...] = ()) -> dict[str, Any]:
    """How DeepSpeed's universal loader cuts a tensor-parallel tensor again (next to its
    ``param``): ``cat_dim``, the dim split over the model axes; ``param_n_sub_params``
    for a dim of equal fused blocks, each cut on its own; ``vocab_tensor`` for a padded
    first dim (the loader pads it to the target's size). AutoEP's fused experts, split
    over a ZeRO axis (``zero_axes``), are ``is_expert_param`` with ``ep_num_experts``: the
    loader keeps each rank's experts. Nothing for a tensor not split."""
    for i, d in enumerate(t.dims):
        if d.split and set(d.split) & set(zero_axes):
            return {"cat_dim": i, "is_expert_param": True, "ep_num_experts": d.size}
        if d.split:
            out: dict[str, Any] = {"cat_dim": i}
            if d.fused and len({b.size for b in d.blocks}) == 1:
                out["param_n_sub_params"] = len(d.blocks)
            if d.pad_to > 1 and i == 0:  # the loader pads rows
                out["vocab_tensor"] = True
            return out
    return {}


def _fresh_groups(origin: Origin) -> list[dict[str, Any]] | None:
    """The param groups given for a source without DeepSpeed's (``--param-groups``), or
    those a distributed checkpoint saved."""
    if origin.param_groups is None and isinstance(origin.checkpoint, DcpCheckpoint):
        return origin.checkpoint.param_groups()
    return origin.param_groups


def _optimizer_state(
    source: Checkpoint | None,
    fresh: list[dict[str, Any]] | None = None,
    target: Any = None,
    origin: Origin | None = None,
) -> dict[str, Any]:
    """The global optimizer state DeepSpeed's universal loader reads: rank 0's scalars and
    param groups, without the partitions (ZeRO-3 keeps only each sub-group's step); for
    another source, the ``fresh`` param groups' hyperparameters (the ZeRO-1/2 loader sets
    each of its groups' from them; ZeRO-3's takes the first group's for all, and its step
    from here: the source's, else 0)."""
    if not isinstance(source, DeepSpeedCheckpoint) or not source.optim_files:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in fresh or []]
        out: dict[str, Any] = {"param_groups": groups, "ds_version": dw.DS_VERSION}
        if target is not None and target.layout.zero.stage:  # as DeepSpeed's converter keeps it
            out["zero_stage"] = pt.Record(dw.ZERO_STAGE, (target.layout.zero.stage,))
        if target is not None and target.layout.zero.stage == 3:
            step = np.array(_source_step(origin), np.float32)
            out["optimizer_state_dict"] = {
                "state": {0: {"step": pt.Tensor("fp32", (), step)}},
                "param_groups": groups,
            }
        return out
    inner = source.load(source.optim_files[0])["optimizer_state_dict"]
    drop = {
        "base_optimizer_state",
        "param_slice_mappings",
        "single_partition_of_fp32_groups",
        "fp32_flat_groups",
    }
    out = {
        k: pt.copy_values(v)
        for k, v in inner.items()
        if k not in drop and k != "optimizer_state_dict"
    }
    if "base_optimizer_state" in inner:  # ZeRO-1/2 and the bf16 optimizer
        out["param_groups"] = pt.copy_values(inner["base_optimizer_state"]["param_groups"])
    if "optimizer_state_dict" in inner:  # ZeRO-3
        osd = inner["optimizer_state_dict"]
        steps = {
            s: {"step": pt.copy_values(v["step"])} for s, v in osd["state"].items() if "step" in v
        }
        out["optimizer_state_dict"] = {
            "state": steps,
            "param_groups": pt.copy_values(osd["param_groups"]),
        }
        out["param_groups"] = out["optimizer_state_dict"]["param_groups"]
    return out


def torch_state_dict(
    state: Mapping[str, pt.Tensor],
    path: Path,
    io: Files,
    *,
    archive: str | None = None,
    align: int = 64,
) -> tuple[pt.Created, dict[str, Any]]:
    """Create the torch state dict ``path`` — ``state`` (an ``OrderedDict`` stays one), its
    tensors holes to fill, tensors of one storage ``key`` sharing it as ties do — and
    return the container with a writable region of ``io`` for each storage, by key, in the
    storage's dtype (an empty array for an empty one). Storages start at multiples of
    ``align`` (a page lets direct IO write them from the first byte)."""
    c = pt.create(state, path, archive=archive, align=align)
    regions: dict[str, Any] = {}
    for t in state.values():
        key = t.key
        if key is None or key in regions:
            continue
        offset, size = c.storages[key]
        dtype = np_dtype(t.dtype)
        numel = size // dtype.itemsize
        regions[key] = io.region(str(path), offset, numel, dtype) if numel else np.zeros(0, dtype)
    return c, regions


def _torch(target: Placement, out: Path, origin: Origin) -> Prepared:
    """One state dict, ``pytorch_model.bin``; tie aliases share their source's storage."""
    p = Prepared(out)
    out.mkdir(parents=True, exist_ok=True)
    buffers = {b.key: b for b in target.buffers()}
    obj: OrderedDict[str, pt.Tensor] = OrderedDict()
    for t in target.layout.tensors:
        name = target.layout.tie_source.get(t.name, t.name)
        b = buffers[name]
        obj[t.name] = pt.Tensor(b.dtype, b.shape, None, key=name)
    for alias, source in target.layout.ties:
        if alias not in obj:
            b = buffers[source]
            obj[alias] = pt.Tensor(b.dtype, b.shape, None, key=source)
    path = inside(out, "pytorch_model.bin")
    c, regions = torch_state_dict(obj, path, p.io)
    p.created.append(c)
    p.files.append(path)
    for key, b in buffers.items():
        p.views[(b.file, key)] = regions[key]
    return p


def _safetensors(target: Placement, out: Path, origin: Origin) -> Prepared:
    """HF layout: shards in declaration order, an index when there are several; ties are
    stored once and recorded in the metadata (``layoutc.ties``)."""
    p = Prepared(out)
    out.mkdir(parents=True, exist_ok=True)
    ties = dict(target.layout.ties)
    meta = {"format": "pt"}
    if ties:
        meta[st.TIES_KEY] = json.dumps(ties, sort_keys=True)
    by_file = _by_file(target)
    weight_map: dict[str, str] = {}
    total = 0
    for f, buffers in by_file.items():
        entries = [(b.key, b.dtype, b.shape) for b in buffers.values()]
        header, offsets = st.plan_file(entries, meta)
        size = len(header) + sum(b.nbytes for b in buffers.values())
        path = inside(out, f)
        with new_file(path) as fh:
            fh.write(header)
            fh.truncate(size)
        p.files.append(path)
        for b in buffers.values():
            weight_map[b.key] = f
            total += b.nbytes
            if b.numel:
                p.views[(f, b.key)] = p.io.region(
                    str(path), offsets[b.key], b.numel, np_dtype(b.dtype)
                )
            else:
                p.views[(f, b.key)] = np.zeros(0, np_dtype(b.dtype))
    if len(by_file) > 1:
        for alias, source in ties.items():
            weight_map.setdefault(alias, weight_map[source])
        index = inside(out, "model.safetensors.index.json")
        p.markers[index] = (
            json.dumps(
                {
                    "metadata": {
                        "total_size": total,
                        **({st.TIES_KEY: json.dumps(ties, sort_keys=True)} if ties else {}),
                    },
                    "weight_map": dict(sorted(weight_map.items())),
                },
                indent=2,
                sort_keys=True,
            )
            + "\n"
        )
    return p


def _dcp(target: Any, out: Path, origin: Origin) -> Prepared:
    """A PyTorch distributed checkpoint: each rank's chunks in ``__R_0.distcp`` (one
    ``torch.save`` container each, holes to fill), what else it holds in rank 0's file (see
    :mod:`layoutc.formats.dcp_write`), then ``.metadata``. A tied alias is saved once and
    listed under both keys, as the model's state dict lists it."""
    assert isinstance(target, DcpPlacement)
    p = Prepared(out)
    out.mkdir(parents=True, exist_ok=True)
    by_file = _by_file(target)
    first = data_file(0)
    empty = _dcp_empty(target)
    files = sorted(set(by_file) | {first} | set(empty), key=lambda f: int(f[2:].split("_", 1)[0]))
    saved: list[dcp_write.Saved] = []
    extra = _dcp_extra(target, origin)
    for f in files:
        path = inside(out, f)
        parts: list[pt.Created] = []
        with new_file(path) as fh:
            for name, b in by_file.get(f, {}).items():
                key, offsets = parse_item_key(name)
                at = fh.tell()
                c = pt.write_container(fh, pt.Tensor(b.dtype, b.shape, None, key="0"), path)
                _map(p, c, {name: b}, {name: "0"})
                parts.append(c)
                saved.append(dcp_write.Saved(key, offsets, f, at, c.size - at))
            for key, offsets, dtype, shape in empty.get(f, []):
                nothing = pt.Tensor(dtype, shape, np.zeros(shape, np_dtype(dtype)))
                saved.append(
                    dcp_write.Saved(key, offsets, f, *dcp_write.write_value(fh, path, nothing))
                )
            if f == first:
                for key, where, write in extra.items:
                    saved.append(dcp_write.Saved(key, where, f, *write(fh, path)))
            size = fh.tell()
        p.created.append(pt.Created.joined(path, parts, size))
        p.files.append(path)
    entries = _dcp_entries(target)
    for alias, source in target.layout.ties:
        key, src = target.weight_key(alias), target.weight_key(source)
        entries[key] = entries[src]
        saved += [replace(s, key=key) for s in saved if s.key == src and s.offsets is not None]
        extra.paths[key] = dcp_write.nested_path(target.layout.store.model_prefix, alias)
    entries.update(extra.tensors)
    meta = inside(out, dm.METADATA)
    meta.write_bytes(dcp_write.metadata(entries, extra.byte_items, extra.paths, saved))
    p.files.append(meta)
    return p


def _dcp_empty(
    target: DcpPlacement,
) -> dict[str, list[tuple[str, tuple[int, ...], str, tuple[int, ...]]]]:
    """The empty chunks FSDP saves, by file: (key, offsets, dtype, shape)."""
    out: dict[str, list[tuple[str, tuple[int, ...], str, tuple[int, ...]]]] = {}
    for t in target.tensors:
        for s in target.states(t):
            for sl in target.slices(t, s):
                for _, _, offsets, rank in target.empty_chunks(t, s, sl):
                    out.setdefault(data_file(rank), []).append(
                        (target.key(t, s), offsets, target.dtype(t, s), (0, *sl.shape[1:]))
                    )
    return out


def _dcp_entries(target: DcpPlacement) -> dict[str, dcp_write.Entry]:
    """The tensor keys the plan fills, each with its chunks (the empty ones FSDP saves
    too): the model's weights first, then the optimizer's states, as torch's
    ``get_state_dict`` orders them."""
    entries: dict[str, dcp_write.Entry] = {}
    pairs = [(t, s) for t in target.tensors for s in target.states(t)]
    for t, s in sorted(pairs, key=lambda ts: ts[1] != WEIGHT):
        chunks = tuple(
            (offsets, (b - a, *sl.shape[1:]) if sl.shape else ())
            for sl in target.slices(t, s)
            for a, b, offsets, _ in (*target.chunks(t, s, sl), *target.empty_chunks(t, s, sl))
        )
        shape = () if s == STEP else t.shape
        entries[target.key(t, s)] = dcp_write.Entry(target.dtype(t, s), shape, chunks)
    return entries


@dataclass
class _Extra:
    """What a DCP output holds besides the plan's tensors: items to write into rank 0's
    file (key, chunk offsets, a writer returning (offset, length)), the tensor entries and
    byte items they make, and every key's nested path."""

    items: list[tuple[str, tuple[int, ...] | None, Callable[[Any, Path], tuple[int, int]]]] = field(
        default_factory=list
    )
    tensors: dict[str, dcp_write.Entry] = field(default_factory=dict)
    byte_items: list[str] = field(default_factory=list)
    paths: dict[str, tuple[str | int, ...]] = field(default_factory=dict)


def _dcp_extra(target: DcpPlacement, origin: Origin) -> _Extra:
    extra = _Extra()
    store = target.layout.store
    for t in target.tensors:
        for s in target.states(t):
            rest: tuple[str, ...] = (t.name,) if s == WEIGHT else ("state", t.name, s)
            prefix = store.model_prefix if s == WEIGHT else store.optimizer_prefix
            extra.paths[target.key(t, s)] = dcp_write.nested_path(prefix, *rest)
    src = origin.checkpoint
    if isinstance(src, DcpCheckpoint) and isinstance(origin.placement, DcpPlacement):
        placed = set(extra.paths)
        tensors, byte_items = dcp_carried(origin.placement, src)
        for key in (k for k in tensors if k not in placed):
            e = src.metadata.tensors[key]
            extra.tensors[key] = dcp_write.Entry(
                e.dtype, e.shape, tuple((c.offsets, c.sizes) for c in e.chunks)
            )
            for c in e.chunks:
                extra.items.append((key, c.offsets, _copier(src, key, c.offsets)))
        for key in (k for k in byte_items if k not in placed):
            extra.byte_items.append(key)
            extra.items.append((key, None, _copier(src, key, None)))
        extra.paths.update({k: v for k, v in src.metadata.flat.items() if k not in placed})
        return extra
    if target.layout.optimizer is None or not target.trainable:
        return extra
    groups = origin.param_groups
    carried = dw.Carried.read(src, origin.placement)
    names = list(dcp_write.group_members(target.layout))
    found = carried.param_groups(len(names), names) if carried.optim or carried.model else None
    if found is not None:
        groups = found
    if groups is None:
        raise Unsupported(
            f"{target.layout.source}: the source holds no optimizer hyperparameters to write "
            "as the param groups of the distributed checkpoint; give them with --param-groups "
            "FILE.json (one object per group: lr, betas, eps, weight_decay, ...)"
        )
    for key, path, value in dcp_write.group_items(target.layout, groups, store.optimizer_prefix):
        extra.byte_items.append(key)
        extra.paths[key] = path
        extra.items.append((key, None, _value_writer(value)))
    return extra


def _copier(src: DcpCheckpoint, key: str, offsets: tuple[int, ...] | None) -> Any:
    item = src.metadata.item(key, offsets)
    return lambda fh, _path: dcp_write.copy_bytes(
        src.folder / item.file, item.offset, item.length, fh
    )


def _value_writer(value: Any) -> Any:
    return lambda fh, path: dcp_write.write_value(fh, path, value)


WRITERS: dict[str, Callable[[Placement, Path, Origin], Prepared]] = {
    "dcp": _dcp,
    "deepspeed": _deepspeed,
    "universal": _universal,
    "safetensors": _safetensors,
    "torch": _torch,
}
