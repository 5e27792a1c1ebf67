"""The objects DeepSpeed's ``load_checkpoint`` reads, for any layout DeepSpeed can run.

:func:`files` builds, for every file of a DeepSpeed target placement, the dict DeepSpeed
0.19 pickles into it (``docs/formats.md``): the model-states files with their run metadata
and the optimizer files with the partition bookkeeping of the target topology
(``partition_count``, ``group_paddings``, ``param_slice_mappings`` from
:mod:`layoutc.place.zero`). Every tensor the plan fills is a hole (:class:`Holes`); the
DeepSpeed classes the files pickle (``ZeroStageEnum``, ``fragment_address``, loss scalers)
are written as :class:`~layoutc.formats.pt.Record` s, so DeepSpeed need not be installed.

What is not sharded — loss scaler, gradient clipping, param-group hyperparameters, lr
scheduler, step counters, ``ds_config``, client state — is carried over from the source
checkpoint (:class:`Carried`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from layoutc import ir
from layoutc.dtypes import np_dtype
from layoutc.errors import Unsupported
from layoutc.formats import autotp, pt
from layoutc.formats.checkpoint import Checkpoint
from layoutc.formats.deepspeed import DeepSpeedCheckpoint
from layoutc.place.deepspeed import NATIVE_EXPERTS, DeepSpeedPlacement
from layoutc.place.shards import STEP, StoredBuffer, iter_coords

DS_VERSION = "0.19.8"
"""The DeepSpeed version whose format layoutc writes, recorded when the source has none."""
FRAGMENT = "deepspeed.utils.tensor_fragment.fragment_address"
ZERO_STAGE = "deepspeed.runtime.zero.config.ZeroStageEnum"
LOSS_SCALER = "deepspeed.runtime.fp16.loss_scaler.LossScaler"

# Model-state keys DeepSpeed writes itself; anything else in a source file is client state.
_ENGINE_KEYS = (
    "module",
    "buffer_names",
    "optimizer",
    "param_shapes",
    "frozen_param_shapes",
    "shared_params",
    "frozen_param_fragments",
    "lr_scheduler",
    "data_sampler",
    "random_ltd",
    "sparse_tensor_module_names",
    "skipped_steps",
    "global_steps",
    "global_samples",
    "dp_world_size",
    "mp_world_size",
    "checkpoint_parallel_dimensions",
    "ds_config",
    "ds_version",
    "num_experts",
    "ds_autoep_layers",
)
# The optimizer scalars DeepSpeed's ZeRO-1/2 loader restores from the file when present.
_OPTIM_SCALARS = ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad")


@dataclass
class Carried:
    """The unsharded state of a source DeepSpeed checkpoint (its first model-states and
    optimizer files); empty when the source is not a DeepSpeed checkpoint."""

    model: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)  # the inner optimizer_state_dict
    optim_outer: dict[str, Any] = field(default_factory=dict)
    fresh_param_groups: list[dict[str, Any]] | None = None  # given, for a source without
    named: dict[str, Any] = field(default_factory=dict)  # layout group -> the source's groups
    source: DeepSpeedCheckpoint | None = None

    @classmethod
    def read(cls, source: Checkpoint | None, placement: Any = None) -> Carried:
        """The unsharded state of ``source`` (nothing unless it is a DeepSpeed
        checkpoint); with its placement, also each stage's param groups by the layout's
        group names (a target with other stages may have other groups on each)."""
        if not isinstance(source, DeepSpeedCheckpoint):
            return cls()
        carried = cls._read(source)
        carried.source = source
        if isinstance(placement, DeepSpeedPlacement):
            carried.named = _named_groups(placement, source)
        return carried

    def layer_order(self, name: str) -> list[str]:
        """The keys of the source's layer file ``name``, in its order (none if absent)."""
        if self.source is None or not self.source.path(name).is_file():
            return []
        obj = self.source.load(name)
        return list(obj) if isinstance(obj, dict) else []

    @classmethod
    def _read(cls, source: DeepSpeedCheckpoint) -> Carried:
        models, optims = source.model_files, source.optim_files
        model = source.load(models[0]) if models else {}
        universal = source.path(source.UNIVERSAL_OPTIMIZER)  # DeepSpeed's universal format
        if not optims and universal.is_file():
            return cls(model, source.load(universal), {})
        outer = source.load(optims[0]) if optims else {}
        return cls(model, outer.get("optimizer_state_dict", {}), outer)

    def param_groups(self, count: int, names: list[str] | None = None) -> list[Any] | None:
        """The source's param groups (hyperparameters) for the target's groups ``names``
        (by name where the source's stages give them all; else the source's first
        ``count`` groups), or the ones given for fresh optimizer state."""
        if names and all(n in self.named for n in names):
            return [pt.copy_values(self.named[n]) for n in names]
        if not self.optim and self.fresh_param_groups is not None:
            if len(self.fresh_param_groups) != count:
                raise Unsupported(
                    f"--param-groups gives {len(self.fresh_param_groups)} param groups; the "
                    f"target's optimizer has {count}"
                )
            return [{**pt.copy_values(g), "params": []} for g in self.fresh_param_groups]
        base = self.optim.get("base_optimizer_state")
        plain = self.model.get("optimizer")  # ZeRO-0: the torch optimizer's own state dict
        if isinstance(base, dict):
            groups = base.get("param_groups")
        elif not self.optim and isinstance(plain, dict):
            groups = plain.get("param_groups")
        elif "param_groups" in self.optim:  # a universal checkpoint's optimizer_state.pt
            groups = self.optim["param_groups"]
        else:
            groups = self.optim.get("optimizer_state_dict", {}).get("param_groups")
        if isinstance(groups, list) and len(groups) == count:
            return [pt.copy_values(g) for g in groups]
        return None


class Holes:
    """Tensors a plan fills, one storage each, recorded by the key path the placement
    gives their buffer."""

    def __init__(self, buffers: dict[str, StoredBuffer]) -> None:
        self.buffers = buffers
        self.keys: dict[str, str] = {}  # buffer key path -> storage key

    def __call__(self, path: str) -> pt.Tensor:
        b = self.buffers.get(path)
        if b is None:
            raise Unsupported(f"the target placement stores nothing under {path}")
        key = self.keys.setdefault(path, str(len(self.keys)))
        return pt.Tensor(b.dtype, b.shape, None, key=key)


def files(
    target: DeepSpeedPlacement, carried: Carried, by_file: dict[str, dict[str, StoredBuffer]]
) -> Iterator[tuple[str, Any, Holes]]:
    """``(file, object to pickle, its holes)`` for every file of ``target``."""
    layout = target.layout
    if target.fused and not carried.model.get("ds_autoep_layers"):
        raise Unsupported(
            f"{layout.source}: {target.fused[0].name} holds AutoEP's fused experts, and the "
            "source has no ds_autoep_layers (each MoE layer's module, ordinal and expert "
            "prefix, which DeepSpeed's loader checks): write an AutoEP checkpoint from an AutoEP "
            "checkpoint, or from its universal output"
        )
    first = True
    run = _run_state(target, carried)  # the same in every model-states file
    dps = list(iter_coords(target.mesh, target.dp_axes))
    for mp in iter_coords(target.mesh, target.mp_axes):
        stage = mp.get(layout.pipeline, 0) if layout.pipeline else 0
        model = target.model_index(mp)
        for dp in dps if layout.zero.stage == 3 else dps[:1]:  # ZeRO-3: one per rank
            f = target.model_file({**mp, **dp})
            holes = Holes(by_file.get(f, {}))
            obj = _model_states(target, carried, run, holes, first, stage, model)
            if target.fused:  # ZeRO-3: each rank's account of its own experts
                _account_experts(obj, target, carried, {**mp, **dp})
            yield f, obj, holes
            first = False
    if target.layer_files:
        for f in dict.fromkeys(b.file for b in target.weight_buffers()):
            holes = Holes(by_file.get(f, {}))
            yield f, _layer_states(holes, carried.layer_order(f)), holes
    if target.experts or target.fused:
        _check_expert_names(target)
        for f in target.expert_files():  # an expert's state dict, under its global id
            holes = Holes(by_file.get(f, {}))
            yield f, _layer_states(holes, carried.layer_order(f)), holes
    if target.expp:  # ZeRO-0: each expert-parallel rank's torch optimizer
        for mp in iter_coords(target.mesh, target.mp_axes):
            for ep in iter_coords(target.mesh, target.expert_axes):
                coords = {**mp, **ep}
                f = target.expp_file(coords)
                holes = Holes(by_file.get(f, {}))
                model = target.model_index(coords)
                optimizer = _plain_optimizer(target, carried, holes, 0, model, coords)
                yield f, {"optimizer": optimizer}, holes
    optim = {"flat": _flat_optim, "stage3": _stage3_optim}.get(target.mode)
    if optim is not None:
        for mp in iter_coords(target.mesh, target.mp_axes):
            for dp in iter_coords(target.mesh, target.dp_axes):
                coords = {**mp, **dp}
                f = target.optim_file(coords)
                holes = Holes(by_file.get(f, {}))
                yield f, optim(target, carried, coords, holes), holes


def _check_expert_names(target: DeepSpeedPlacement) -> None:
    """DeepSpeed's loader finds an expert's tensors by ``….deepspeed_experts.<id>.`` in
    their names (and renumbers them to the rank's local ids): a target must name them so."""
    for t in target.experts:
        assert t.expert is not None
        if f"{NATIVE_EXPERTS}.{t.expert.id}." not in t.name:
            raise Unsupported(
                f"{target.layout.source}: expert {t.expert.id}'s tensor {t.name} has no "
                f"`{NATIVE_EXPERTS[1:]}.{t.expert.id}.` in its name, which DeepSpeed's native "
                "MoE loader finds experts by"
            )


def _index(names: list[str], name: str) -> int:
    return names.index(name) if name in names else 0


def _layer_states(holes: Holes, order: list[str]) -> OrderedDict[str, Any]:
    """A pipeline layer's file: its state dict (in the source's key order where known)."""
    keys = sorted(holes.buffers, key=lambda k: (k not in order, _index(order, k)))
    return OrderedDict((k, holes(k)) for k in keys)


def _plain_optimizer(
    target: DeepSpeedPlacement,
    carried: Carried,
    holes: Holes,
    stage: int,
    model: int,
    coords: dict[str, int] | None = None,
) -> dict[str, Any]:
    """ZeRO-0: the torch optimizer's ``state_dict()`` of one stage (with experts: of the
    expert-parallel rank at ``coords``), as DeepSpeed saves it in the model-states file
    (with experts: also in the rank's ``expp_rank`` file)."""
    opt = target.layout.optimizer
    assert opt is not None
    groups = target.optimizer_groups(stage, model, coords)
    state: dict[int, dict[str, Any]] = {}
    params: list[list[int]] = []
    for _, members, _m in groups:
        indices = []
        for t in members:
            i = target.member(t, stage, model).param_index
            state[i] = _optimizer_state(holes, f"optimizer/state/{i}", opt)
            indices.append(i)
        params.append(indices)
    param_groups = _param_groups(target, carried, params, stage, model)
    return {"state": state, "param_groups": _name_expert_groups(target, param_groups, groups)}


def _model_states(
    target: DeepSpeedPlacement,
    carried: Carried,
    run: dict[str, Any],
    holes: Holes,
    first_rank: bool,
    stage: int = 0,
    model: int = 0,
) -> dict[str, Any]:
    layout = target.layout
    src = carried.model
    stage3 = target.mode == "stage3"
    if target.layer_files:  # a pipeline keeps its weights in the layer files
        return _stage_states(target, carried, run, holes, stage, model)
    module: OrderedDict[str, Any] = OrderedDict()
    for t in layout.tensors:
        if t.expert or t in target.fused:  # in the experts' own files
            continue
        if stage3 and t.kind != ir.BUFFER:  # partitioned parameters leave a 0-element stub
            module[t.name] = pt.Tensor(t.dtype, (0,), np.zeros(0, np_dtype(t.dtype)))
        else:
            module[t.name] = holes(f"module/{t.name}")
    for alias, source in layout.ties:  # the same storage, as a tied module saves it
        module.setdefault(alias, module[source])
    before = list(src.get("module") or ())  # the source module's order (registration order)
    module = OrderedDict(
        (k, module[k]) for k in sorted(module, key=lambda k: (k not in before, _index(before, k)))
    )
    zero = layout.zero.stage > 0 or target.mode == "flat"
    stage2 = layout.zero.stage >= 2
    # "Frozen" to DeepSpeed: every parameter its optimizer does not own, which includes a
    # trainable one whose slice here is empty (it keeps the shape, with nothing to store).
    owned = {t.name for members in _flat_members(target, model) for t in members}
    frozen = [
        t
        for t in layout.tensors
        if not t.expert and (t.kind == ir.FROZEN or (zero and t.trainable and t.name not in owned))
    ]

    def fragment(t: ir.Tensor) -> pt.Tensor:
        if t.kind == ir.FROZEN:
            return holes(f"frozen_param_fragments/{t.name}")
        shape = target.local_shape(t, model)  # an empty slice: the parameter itself
        return pt.Tensor(t.dtype, shape, np.zeros(0, np_dtype(t.dtype)))

    obj: dict[str, Any] = {
        "module": module,
        "buffer_names": [t.name for t in layout.tensors if t.kind == ir.BUFFER],
        "optimizer": _plain_optimizer(target, carried, holes, 0, model)
        if target.mode == "plain"
        else None,
        "param_shapes": [
            OrderedDict(
                (target.local_name(t), pt.Size(target.local_shape(t, model))) for t in members
            )
            for members in _flat_members(target, model)
        ]
        if zero
        else None,
        "frozen_param_shapes": OrderedDict(
            (t.name, pt.Size(target.local_shape(t, model))) for t in frozen
        )
        if stage2
        else None,
        # DeepSpeed records ties on global rank 0 only
        "shared_params": (_shared_params(layout, carried) if first_rank else {}) if zero else None,
        "frozen_param_fragments": OrderedDict((t.name, fragment(t)) for t in frozen)
        if stage2
        else None,
        **run,
    }
    if target.experts or target.fused:  # per MoE layer, in order
        layers = sorted(
            {(t.layer, t.expert.count) for t in target.experts if t.expert}
            | {(t.layer, t.dims[0].size) for t in target.fused}
        )
        obj["num_experts"] = [count for _, count in layers]
        if any(t.layer is None for t in target.experts):  # before DeepSpeed 0.6: one count
            obj["num_experts"] = max(obj["num_experts"])
        obj["ds_autoep_layers"] = None
    return obj


def _account_experts(
    obj: dict[str, Any], target: DeepSpeedPlacement, carried: Carried, coords: dict[str, int]
) -> None:
    """AutoEP's ``ds_autoep_layers`` in a model-states file, also inside
    ``universal_checkpoint_info``: written by the rank at ``coords``."""
    layers = _autoep_layers(target, carried, coords)
    obj["ds_autoep_layers"] = layers
    info = obj.get(autotp.INFO)
    if isinstance(info, dict) and "ds_autoep_layers" in info:
        obj[autotp.INFO] = {**info, "ds_autoep_layers": pt.copy_values(layers)}


def _autoep_layers(
    target: DeepSpeedPlacement, carried: Carried, coords: dict[str, int]
) -> list[dict[str, Any]]:
    """AutoEP's account of each MoE layer at the target's topology, as the rank at
    ``coords`` writes it: the source's layers (module, ordinal, key prefix) with the
    target's expert-parallel size, expert placement, the affine map of each fused tensor's
    per-rank shard, and the writer's own expert-parallel coordinates (at ZeRO-3, where
    every rank writes its file, with the partition-native format)."""
    out = []
    for layer in carried.model.get("ds_autoep_layers") or []:
        prefix = layer.get("expert_key_prefix")
        fused = [t for t in target.fused if t.name.rsplit(".", 1)[0] == prefix]
        if not fused:
            raise Unsupported(
                f"the target has no fused experts under {prefix}, which the source's AutoEP layer names"
            )
        axis = fused[0].dims[0].split[0]
        ep = target.mesh.sizes[axis]
        count = fused[0].dims[0].size
        local = count // ep
        rank = coords.get(axis, 0)
        edp = target.partition_axes(fused[0])
        entry = pt.copy_values(layer)
        entry.update(
            {
                "num_experts": count,
                "num_local_experts": local,
                "ep_size": ep,
                "expert_placement": {
                    "version": 1,
                    "num_experts": count,
                    "ep_size": ep,
                    "ranks": [
                        {"rank": r, "experts": list(range(r * local, (r + 1) * local))}
                        for r in range(ep)
                    ],
                },
                "affine_maps": {
                    "version": 1,
                    "params": {t.name: _expert_affine_map(t, ep) for t in fused},
                },
                "ep_group_name": f"ep_size_{ep}",
                "ep_rank": rank,
                "expert_data_parallel_rank": target.mesh.index(edp, coords),
                "expert_data_parallel_world_size": target.mesh.size(*edp),
                "global_expert_start": rank * local,
                "global_expert_end": (rank + 1) * local,
            }
        )
        if target.mode == "stage3":
            entry["checkpoint_format"] = "zero3_partitioned"
            entry["checkpoint_format_version"] = 1
        out.append(entry)
    return out


def _expert_affine_map(t: ir.Tensor, ep: int) -> dict[str, Any]:
    """Where each expert-parallel rank's shard ``[E / ep, ...]`` of fused experts sits in
    the whole tensor: one piece, at its first expert, with row-major strides."""
    shard = list(t.local_shape)
    strides = [math.prod(shard[i + 1 :]) for i in range(len(shard))]
    size = math.prod(shard)
    return {
        "logical_shape": list(t.shape),
        "ranks": {
            r: {
                "shard_shape": shard,
                "pieces": [
                    {
                        "shape": shard,
                        "source": [r * size, strides],
                        "dest": [0, strides],
                        "locations": [r],
                    }
                ],
            }
            for r in range(ep)
        },
    }


def _shared_params(layout: ir.Layout, carried: Carried) -> dict[str, str]:
    """The ties DeepSpeed records: parameters two modules share. A second name of a whole
    module (AutoEP's router, also under the model's own attribute) is a tie of the layout
    that DeepSpeed does not record; a DeepSpeed source says which of its ties it recorded."""
    ties = dict(layout.ties)
    recorded = carried.model.get("shared_params")
    if isinstance(recorded, dict) and carried.model.get("ds_autoep_layers"):
        return {a: s for a, s in ties.items() if a in recorded}
    return ties


def _stage_states(
    target: DeepSpeedPlacement,
    carried: Carried,
    run: dict[str, Any],
    holes: Holes,
    stage: int,
    model: int,
) -> dict[str, Any]:
    """A pipeline stage's ``mp_rank`` file: no module (the layer files hold the weights),
    the stage's buffers and param shapes, and (ZeRO-0) its torch optimizer."""
    layout = target.layout
    on_stage = [t for t in layout.tensors if stage in t.stages]
    flat = target.mode == "flat"
    return {
        "module": None,
        "buffer_names": [t.name for t in on_stage if t.kind == ir.BUFFER],
        "optimizer": _plain_optimizer(target, carried, holes, stage, model)
        if target.mode == "plain"
        else None,
        "param_shapes": [
            OrderedDict((t.name, pt.Size(target.local_shape(t, model))) for t in members)
            for _, members, _m in target.optimizer_groups(stage, model)
        ]
        if flat
        else None,
        "frozen_param_shapes": None,
        "shared_params": {} if flat else None,
        "frozen_param_fragments": None,
        **run,
    }


def _run_state(target: DeepSpeedPlacement, carried: Carried) -> dict[str, Any]:
    """The model-states entries that are the run's, not the model's: scheduler, step
    counters, topology, config, version, then the client state the source had."""
    layout = target.layout
    src = carried.model
    obj: dict[str, Any] = {
        "lr_scheduler": pt.copy_values(src.get("lr_scheduler")),
        "data_sampler": pt.copy_values(src.get("data_sampler")),
        "random_ltd": pt.copy_values(src.get("random_ltd")),
        "skipped_steps": src.get("skipped_steps", 0),
        "global_steps": src.get("global_steps", 0),
        "global_samples": src.get("global_samples", 0),
        "dp_world_size": target.mesh.size(*target.dp_axes),
        "mp_world_size": target.mesh.size(*target.mp_axes),
        "checkpoint_parallel_dimensions": {
            "pp_degree": layout.stages,
            "tp_degree": target.mesh.size(*target.model_axes),
        },
        "ds_config": _ds_config(target, carried),
        "ds_version": src.get("ds_version", DS_VERSION),
    }
    if "sparse_tensor_module_names" in src:
        obj["sparse_tensor_module_names"] = pt.copy_values(src["sparse_tensor_module_names"])
    for key, value in src.items():  # client state, as the source had it
        if key not in _ENGINE_KEYS:
            obj[key] = pt.copy_values(value)
    if autotp.INFO in obj:  # AutoTP's account of its cuts, for the target's topology
        info = autotp.retarget(obj[autotp.INFO], layout, target.model_axes)
        if info is None:
            del obj[autotp.INFO]
        else:
            obj[autotp.INFO] = info
    return obj


def _flat_members(target: DeepSpeedPlacement, model: int = 0) -> list[list[ir.Tensor]]:
    """The tensors of each flat buffer, in order: ZeRO-1/2 param groups, ZeRO-3 sub-groups."""
    out = []
    for _, members, m in target.optimizer_groups(0, model):
        if m.stage3 is None:
            out.append(members)
        else:
            out.extend([members[i] for i in sub] for sub in m.stage3.sub_groups)
    return out


def _named_groups(source: DeepSpeedPlacement, checkpoint: DeepSpeedCheckpoint) -> dict[str, Any]:
    """Layout group name -> param group (hyperparameters) as each stage of ``source``
    saved it (the first stage holding a group gives it)."""
    out: dict[str, Any] = {}
    layout = source.layout
    for stage in range(max(1, layout.stages)):
        groups = source.optimizer_groups(stage)
        coords = dict.fromkeys(source.mesh.names, 0)
        if layout.pipeline:
            coords[layout.pipeline] = stage
        plain = source.mode == "plain"
        path = checkpoint.path(source.model_file(coords) if plain else source.optim_file(coords))
        if not groups or not path.is_file():
            continue
        obj = checkpoint.load(path)
        inner = obj.get("optimizer") if plain else obj.get("optimizer_state_dict")
        if not isinstance(inner, dict):
            continue
        if "base_optimizer_state" in inner:
            inner = inner["base_optimizer_state"]
        elif "optimizer_state_dict" in inner:
            inner = inner["optimizer_state_dict"]
        saved = inner.get("param_groups") if isinstance(inner, dict) else None
        if isinstance(saved, list) and len(saved) == len(groups):
            for (_, members, _m), pg in zip(groups, saved, strict=True):
                out.setdefault(members[0].group, pg)
    return out


def _param_groups(
    target: DeepSpeedPlacement,
    carried: Carried,
    params: list[list[int]],
    stage: int = 0,
    model: int = 0,
) -> Any:
    """The source's param groups (hyperparameters) with the target's flat-param indices."""
    names = [members[0].group for _, members, _m in target.optimizer_groups(stage, model)]
    groups = carried.param_groups(len(params), names if len(names) == len(params) else None)
    if groups is None:
        raise Unsupported(
            f"the source has no optimizer param groups to carry for the target's {len(params)} "
            "group(s), and DeepSpeed's loader replaces the optimizer's hyperparameters with the "
            "checkpoint's: give them with --param-groups FILE.json (a JSON list, one object "
            "per group: lr, betas, eps, weight_decay, ... as torch's optimizer.param_groups "
            "has them)"
        )
    for g, indices in zip(groups, params, strict=True):
        g["params"] = indices
    return groups


def _name_expert_groups(
    target: DeepSpeedPlacement, param_groups: Any, groups: list[tuple[int, list[ir.Tensor], Any]]
) -> Any:
    """DeepSpeed names an expert param group by its expert-parallel size (``ep_size_4``)
    and marks it ``moe``: the target's, whatever the source's was."""
    for pg, (_, members, _m) in zip(param_groups, groups, strict=True):
        e = members[0].expert
        if e is not None and isinstance(pg, dict):
            pg["name"] = f"ep_size_{target.mesh.sizes[e.axis]}"
            pg["moe"] = True
    return param_groups


def _stage3_optim(
    target: DeepSpeedPlacement, carried: Carried, coords: dict[str, int], holes: Holes
) -> dict[str, Any]:
    """A ZeRO-3 file: the rank's piece of every sub-group, padded, with its Adam state."""
    opt = target.layout.optimizer
    assert opt is not None
    src = carried.optim
    state: dict[int, dict[str, Any]] = {}
    masters = []
    params = []
    model = target.model_index(coords)
    for _, _, m in target.optimizer_groups(0, model):
        assert m.stage3 is not None
        indices = []
        for sg in range(len(m.stage3.sub_groups)):
            s = m.first_sub_group + sg
            indices.append(s)
            state[s] = _optimizer_state(
                holes, f"optimizer_state_dict/optimizer_state_dict/state/{s}", opt
            )
            if opt.master:
                masters.append(holes(f"optimizer_state_dict/fp32_flat_groups/{s}"))
        params.append(indices)
    inner: dict[str, Any] = {"zero_stage": pt.Record(ZERO_STAGE, (3,))}
    inner.update(_zero3_scaler(target, src))
    inner["partition_count"] = target.mesh.size(*target.dp_axes)
    if target.fused:
        inner["ds_zero_partition_groups"] = _partition_groups(target, coords, model)
    inner["optimizer_state_dict"] = {
        "state": state,
        "param_groups": _param_groups(target, carried, params, 0, model),
    }
    inner["fp32_flat_groups"] = masters
    return _outer(target, inner, carried)


def _partition_groups(
    target: DeepSpeedPlacement, coords: dict[str, int], model: int
) -> list[dict[str, Any]]:
    """ZeRO-3 with AutoEP: over which ranks each sub-group is partitioned, as DeepSpeed
    records it (and checks on load): all data-parallel ranks for the replicated
    parameters, the expert-data-parallel ranks holding the same experts for the experts'."""
    out = []
    for _, members, m in target.optimizer_groups(0, model):
        assert m.stage3 is not None
        axes = target.partition_axes(members[0])
        e = target.layout.experts_of(members[0])
        ranks = sorted(
            target.mesh.rank({**coords, **target.mesh.unindex(axes, i)})
            for i in range(target.mesh.size(*axes))
        )
        family = "autoep_expert" if e else "replicated"
        name = f"ep_size_{target.mesh.sizes[e[0]]}" if e else "replicated"
        for sg in range(len(m.stage3.sub_groups)):
            out.append(
                {
                    "sub_group": m.first_sub_group + sg,
                    "partition_count": len(ranks),
                    "partition_rank": target.mesh.index(axes, coords),
                    "partition_ranks": ranks,
                    "families": [family],
                    "group_names": [name],
                }
            )
    return out


def _optimizer_state(holes: Holes, key: str, opt: ir.Optimizer) -> dict[str, Any]:
    """One flat param's torch optimizer state (``step``, then the moments), as holes."""
    entry: dict[str, Any] = {}
    if opt.step:
        entry[STEP] = holes(f"{key}/{STEP}")
    for name in opt.states:
        entry[name] = holes(f"{key}/{name}")
    return entry


def _zero3_scaler(target: DeepSpeedPlacement, src: dict[str, Any]) -> dict[str, Any]:
    """The loss-scaler state ZeRO-3's loader requires: the source's, or for a fresh state
    the static scale of 1 that bf16 and fp32 training run with."""
    keys = ("loss_scaler", "dynamic_loss_scale", "overflow")
    if all(k in src for k in keys):
        return {k: pt.copy_values(src[k]) for k in keys}
    if target.layout.dtype == "fp16":
        raise Unsupported(
            f"{target.layout.source}: the source has no loss-scaler state, and ZeRO-3 replaces "
            "its own with the checkpoint's; an fp16 scaler's settings (initial scale, window, "
            "hysteresis) are the training config's, which layoutc cannot know. Write ZeRO-1/2 "
            "(whose loader keeps its own scaler) or convert from a checkpoint that has one"
        )
    return {
        "loss_scaler": pt.Record(LOSS_SCALER, (), {"cur_scale": 1.0, "dynamic": False}),
        "dynamic_loss_scale": False,
        "overflow": False,
    }


def _outer(target: DeepSpeedPlacement, inner: dict[str, Any], carried: Carried) -> dict[str, Any]:
    return {
        "optimizer_state_dict": inner,
        "ds_config": _ds_config(target, carried),
        "ds_version": carried.optim_outer.get(
            "ds_version", carried.model.get("ds_version", DS_VERSION)
        ),
    }


def _ds_config(target: DeepSpeedPlacement, carried: Carried) -> dict[str, Any]:
    """The source's DeepSpeed config, with the ZeRO settings of the target (DeepSpeed runs
    with its live config; readers of the files, ``layoutc infer`` among them, use this)."""
    cfg = pt.copy_values(carried.optim_outer.get("ds_config", carried.model.get("ds_config"))) or {}
    zero = target.layout.zero
    if isinstance(cfg.get("tensor_parallel"), dict) and "autotp_size" in cfg["tensor_parallel"]:
        cfg["tensor_parallel"]["autotp_size"] = target.mesh.size(*target.model_axes)
    zcfg = cfg.setdefault("zero_optimization", {})
    zcfg["stage"] = zero.stage
    if zero.stage != 3:
        zcfg.pop("sub_group_size", None)
    elif "sub_group_size" in zcfg or zero.sub_group_size != ir.Zero().sub_group_size:
        zcfg["sub_group_size"] = zero.sub_group_size
    return cfg


def _flat_optim(
    target: DeepSpeedPlacement, carried: Carried, coords: dict[str, int], holes: Holes
) -> dict[str, Any]:
    """A ZeRO-1/2 or bf16-optimizer file: the rank's flat partitions and their bookkeeping."""
    layout = target.layout
    opt = layout.optimizer
    assert opt is not None
    bf16_optimizer = layout.zero.bf16_optimizer or (layout.zero.stage == 0 and target.bf16)
    stage = coords.get(layout.pipeline, 0) if layout.pipeline else 0
    model = target.model_index(coords)
    groups = target.optimizer_groups(stage, model, coords)
    src = carried.optim
    state: dict[int, dict[str, Any]] = {}
    masters = []
    paddings = []
    mappings = []
    counts = []
    for g, members, m in groups:
        assert m.flat is not None
        rank = target.partition_rank(members[0], coords)
        state[g] = _optimizer_state(
            holes, f"optimizer_state_dict/base_optimizer_state/state/{g}", opt
        )
        if opt.master:
            masters.append(holes(f"optimizer_state_dict/single_partition_of_fp32_groups/{g}"))
        paddings.append(m.flat.padding(rank))
        counts.append(m.flat.dp)
        mappings.append(
            OrderedDict(
                (
                    target.local_name(members[i]),
                    pt.Record(FRAGMENT, (), {"numel": f.numel, "start": f.buffer_offset}),
                )
                for i, f in m.flat.rank_mapping(rank)
            )
        )
    param_groups = _param_groups(target, carried, [[g] for g, _, _ in groups], stage, model)
    param_groups = _name_expert_groups(target, param_groups, groups)
    inner: dict[str, Any] = {}
    if not bf16_optimizer:
        for k in _OPTIM_SCALARS:
            if k in src:
                inner[k] = pt.copy_values(src[k])
    elif "clip_grad" in src:
        inner["clip_grad"] = src["clip_grad"]
    inner["base_optimizer_state"] = {"state": state, "param_groups": param_groups}
    inner["single_partition_of_fp32_groups"] = masters
    if not bf16_optimizer:
        inner["zero_stage"] = pt.Record(ZERO_STAGE, (layout.zero.stage,))
    inner["group_paddings"] = paddings
    if not bf16_optimizer:
        inner["param_alignment_paddings"] = [[0] * len(members) for _, members, _ in groups]
    inner["partition_count"] = counts
    inner["ds_version"] = src.get("ds_version", DS_VERSION)
    inner["param_slice_mappings"] = mappings
    return _outer(target, inner, carried)
