"""The shard map of a layout stored as a DeepSpeed checkpoint.

File names and keys follow DeepSpeed 0.19 (see docs/formats.md):

* model states: ``mp_rank_{MP:02d}_model_states.pt`` (ZeRO 0/1/2) or
  ``zero_pp_rank_{DP}_mp_rank_{MP:02d}_model_states.pt`` (ZeRO-3, one per data-parallel
  rank); weights under ``module/<name>``. With a pipeline, weights live in
  ``layer_{L:02d}[-model_{TP:02d}]-model_states.pt`` under ``<param>``, where a parameter is
  named ``<L>.<param>``.
* optimizer states: ``[bf16_]zero_pp_rank_{DP}_mp_rank_{MP:02d}_optim_states.pt``: ZeRO 1/2
  (and the bf16 optimizer) keep one flat buffer per param group and partition it over the
  data-parallel ranks (:class:`~layoutc.place.zero.FlatGroup`); ZeRO-3 partitions each
  parameter and groups the pieces in sub-groups (:class:`~layoutc.place.zero.Stage3Group`).
  ZeRO-0 keeps a plain torch optimizer state inside the model-states file.

MP is the pp-major index over the pipeline axis and the model-parallel axes; DP is the
index over the ZeRO axes. Keys are ``/``-joined paths into the pickled dict. Tie aliases
are not stored separately (DeepSpeed shares the storage); frozen parameters are stored
where DeepSpeed stores them for the ZeRO stage (ZeRO-2 also in
``frozen_param_fragments``; ZeRO-3 only there, partitioned). Refused, as
:class:`~layoutc.errors.Unsupported`: fp16 without ZeRO, ZeRO-2/3 with a pipeline,
tensors split over a ZeRO axis (DeepSpeed's expert files), pipeline parameter names that
do not start with a layer index.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

from layoutc import ir
from layoutc.errors import Unsupported
from layoutc.place.base import Placement
from layoutc.place.shards import (
    MASTER,
    STEP,
    WEIGHT,
    RankSet,
    Run,
    Slice,
    StoredBuffer,
    iter_coords,
    scalar_slice,
    slices_of,
)
from layoutc.place.zero import FlatGroup, Stage3Group

_LAYER = re.compile(r"^(\d+)\.(.+)$")

# DeepSpeed's file names, as the methods below make them and as a folder is read back
MODEL = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_?optim_states\.pt$")
LAYER = re.compile(r"^layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")
# MoE experts: layer_{L}_expert_{id}_mp_rank_{MP}_… (before DeepSpeed 0.5: expert_{id}_mp_rank_…)
NATIVE_EXPERTS = ".deepspeed_moe.experts.deepspeed_experts"
EXPP = re.compile(
    r"^expp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$"
)  # ZeRO-0 MoE optimizer  # + .{id}.<name>: an expert's tensor
EXPERT = re.compile(r"^(?:layer_(\d+)_)?expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
LATEST = "latest"  # the root's marker: the tag folder of the checkpoint
LATEST_UNIVERSAL = "latest_universal"  # the same, of a universal checkpoint


Pin = tuple[tuple[str, int], ...]  # the coordinates holding an expert (none: every rank)


@dataclass(frozen=True)
class Member:
    """Where one trainable tensor sits in the optimizer of its stage."""

    group: int  # flat group (ZeRO 1/2) or param group (ZeRO-3) index on its stage
    index: int  # position inside that group
    flat: FlatGroup | None
    stage3: Stage3Group | None
    first_sub_group: int  # ZeRO-3: global index of the group's first sub-group
    param_index: int  # ZeRO-0: index in the torch optimizer's state


class DeepSpeedPlacement(Placement):
    format = "deepspeed"

    def __init__(self, layout: ir.Layout) -> None:
        super().__init__(layout)
        z = layout.zero
        self.dp_axes = z.axes
        self.mp_axes = ((layout.pipeline,) if layout.pipeline else ()) + layout.model_axes
        self.model_axes = layout.model_axes
        self.bf16 = layout.dtype == "bf16"
        opt = layout.optimizer
        # Which optimizer DeepSpeed builds for this configuration.
        if z.round_robin:
            raise Unsupported(
                f"{layout.source}: zero {z.stage} with round_robin: DeepSpeed's own slice mappings disagree "
                "with its flat buffers under round-robin gradients, so layoutc does not place it"
            )
        if opt is None:
            if z.stage == 3:
                raise Unsupported(
                    f"{layout.source}: zero 3 without an optimizer does not describe a DeepSpeed checkpoint"
                )
            self.mode = "none"
        elif z.stage == 3:
            self.mode = "stage3"
        elif z.stage in (1, 2) or z.bf16_optimizer or (z.stage == 0 and self.bf16):
            self.mode = "flat"
        elif layout.dtype == "fp16":
            raise Unsupported(
                f"{layout.source}: fp16 without ZeRO uses DeepSpeed's FP16_Optimizer, whose "
                "checkpoint layout layoutc does not place yet; use zero 1 or higher"
            )
        else:
            self.mode = "plain"
        if layout.pipeline and z.stage >= 2:
            raise Unsupported(
                f"{layout.source}: DeepSpeed refuses ZeRO-{z.stage} with pipeline parallelism; use zero 0 or 1"
            )
        # AutoEP's fused experts: dim 0 (the expert) split over a ZeRO axis
        self.fused = tuple(t for t in self.tensors if set(t.split_axes) & set(self.dp_axes))
        if self.fused:
            self._check_fused(layout)
        self.experts = tuple(t for t in self.tensors if t.expert)
        self.expert_axes = tuple(
            dict.fromkeys(
                [t.expert.axis for t in self.experts if t.expert]
                + [t.dims[0].split[0] for t in self.fused]
            )
        )
        # ZeRO-0 MoE: each expert-parallel rank's torch optimizer in its expp_rank file
        self.expp = self.mode == "plain" and bool(self.experts)
        if self.experts:
            self._check_experts(layout)
        # DeepSpeed's pipeline engine writes layer files whatever the number of stages.
        self.layer_files = layout.pipeline is not None
        if self.layer_files:
            bad = [t.name for t in self.tensors if layer_of(t.name) is None and t.layer is None]
            if bad:
                raise Unsupported(
                    f"{layout.source}: a DeepSpeed pipeline names parameters <layer>.<param>; "
                    f"{bad[0]}"
                    + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
                    + " do not start with a layer index (a tied module's tensor names its layer: "
                    "tensor tied_modules.embed.weight [V, H] stage (0, pp - 1) layer 0)"
                )
        self.prefix = "bf16_" if self.bf16 and self.mode in ("flat", "stage3") else ""
        # Tensors cut in uneven grains (AutoTP) give each model-parallel coordinate its own
        # flat groups: other numels, and no place at all for a slice with no elements.
        self.uneven = any(t.uneven for t in self.tensors)

    def _check_fused(self, layout: ir.Layout) -> None:
        """What DeepSpeed's AutoEP stores: each layer's experts fused in tensors whose dim 0
        is the expert, split over one ZeRO axis and nothing else, at ZeRO 1 or 2, each
        naming its MoE layer (its experts' files ``layer_L_expert_G``)."""
        for t in self.fused:
            d0 = t.dims[0]
            where = f"{layout.source}: {t.name} is split over a ZeRO axis"
            if not t.trainable:
                raise Unsupported(f"{where} but is not trained; AutoEP's experts are parameters")
            if len(d0.split) != 1 or d0.fused or d0.pad_to != 1 or d0.grain:
                raise Unsupported(
                    f"{where}; DeepSpeed stores experts fused in one tensor (AutoEP) with dim 0 "
                    "the expert, split over the expert-parallel axis alone: [E / ep, F, H]"
                )
            if any(a in self.dp_axes for d in t.dims[1:] for a in d.split) or any(
                d.split for d in t.dims[1:]
            ):
                raise Unsupported(
                    f"{where} in dims other than the expert's, which AutoEP does not do"
                )
            if self.mode not in ("flat", "stage3") or layout.zero.stage == 0:
                raise Unsupported(
                    f"{where} (AutoEP's fused experts), which layoutc places at ZeRO 1, 2 and 3"
                )
            if t.layer is None:
                raise Unsupported(
                    f"{layout.source}: {t.name} (AutoEP's fused experts) names no MoE layer; "
                    "DeepSpeed stores expert G of it in layer_<L>_expert_<G>_mp_rank_XX_"
                    "model_states.pt: write `layer L` on it"
                )

    def _check_experts(self, layout: ir.Layout) -> None:
        """What DeepSpeed's native MoE can store: experts over a ZeRO axis (its expert
        groups cut the data-parallel group), each naming its MoE layer, at ZeRO 1 or 2,
        without a pipeline."""
        first = self.experts[0]
        assert first.expert is not None
        where = f"{layout.source}: {first.name} is an expert"
        if layout.pipeline:
            raise Unsupported(f"{where}; layoutc does not place experts in a DeepSpeed pipeline")
        bf16_optimizer = layout.zero.bf16_optimizer or (
            self.mode == "flat" and not layout.zero.stage
        )
        if self.mode not in ("flat", "plain") or bf16_optimizer:
            what = "ZeRO-3" if layout.zero.stage == 3 else "DeepSpeed's bf16 optimizer"
            raise Unsupported(
                f"{where}; DeepSpeed's native MoE is placed at ZeRO 0, 1 and 2, not with {what} "
                "(DeepSpeed refuses native MoE with ZeRO-3)"
            )
        axes = {t.expert.axis for t in self.experts if t.expert}
        off = sorted(axes - set(self.dp_axes))
        if off:
            raise Unsupported(
                f"{where} dealt over `{off[0]}`, which ZeRO does not partition over: DeepSpeed's "
                f"expert-parallel ranks are part of its data-parallel group (zero N over (edp, {off[0]}))"
            )
        named = {t.layer is not None for t in self.experts}
        if len(named) > 1:
            raise Unsupported(
                f"{layout.source}: some experts name their MoE layer and some do not: DeepSpeed "
                "keeps them all in layer_<L>_expert_<id> files, or (before DeepSpeed 0.6) all "
                "in expert_<id> files, one per expert of every layer"
            )

    # -------------------------------------------------------------- states

    def states(self, t: ir.Tensor) -> tuple[str, ...]:
        opt = self.optimizer_states(t)
        if self.mode == "plain":
            opt = tuple(s for s in opt if s != MASTER)  # the fp32 weights are the master
        weight = () if (self.mode == "stage3" and t.trainable) else (WEIGHT,)
        return (*weight, *opt)

    # -------------------------------------------------------------- names

    def _mp(self, coords: dict[str, int]) -> int:
        return self.mesh.index(self.mp_axes, coords)

    def _dp(self, coords: dict[str, int]) -> int:
        return self.mesh.index(self.dp_axes, coords)

    def model_file(self, coords: dict[str, int]) -> str:
        dp = self._dp(coords) if self.mode == "stage3" or self.layout.zero.stage == 3 else None
        return model_file_name(self._mp(coords), dp)

    def expp_file(self, coords: dict[str, int]) -> str:
        """ZeRO-0 MoE: the torch optimizer of the expert-parallel rank at ``coords``."""
        ep = self.mesh.index(self.expert_axes, coords)
        return f"expp_rank_{ep}_mp_rank_{self._mp(coords):02d}_optim_states.pt"

    def optim_file(self, coords: dict[str, int]) -> str:
        return f"{self.prefix}zero_pp_rank_{self._dp(coords)}_mp_rank_{self._mp(coords):02d}_optim_states.pt"

    def local_name(self, t: ir.Tensor) -> str:
        """The name the ranks holding ``t`` give it: an expert's with its local id (what
        DeepSpeed's optimizer files and ``param_shapes`` record), others their own."""
        e = t.expert
        if e is None:
            return t.name
        size = self.mesh.sizes[e.axis]
        return t.name.replace(f"{NATIVE_EXPERTS}.{e.id}.", f"{NATIVE_EXPERTS}.{e.local(size)}.", 1)

    def expert_file(self, t: ir.Tensor, coords: dict[str, int]) -> str:
        """The file of one expert of one MoE layer (its global id) at a model-parallel rank."""
        assert t.expert is not None
        return expert_file_name(t.layer, t.expert.id, self._mp(coords))

    def layer_file(self, t: ir.Tensor, coords: dict[str, int]) -> tuple[str, str]:
        """The layer file and key of a tensor: ``<L>.<key>``, or a tied module's
        ``tied_modules.<module>.<key>`` in the file of the layer it names."""
        layer, key = _layer_and_key(t)
        model = ""
        if self.model_axes:
            model = f"-model_{self.mesh.index(self.model_axes, coords):02d}"
        return f"layer_{layer:02d}{model}-model_states.pt", key

    # -------------------------------------------------------------- optimizer groups

    def _stage_of(self, t: ir.Tensor) -> int:
        return t.stage if self.layout.pipeline else 0

    def _stages_of(self, t: ir.Tensor) -> tuple[int, ...]:
        return t.stages if self.layout.pipeline else (0,)

    def model_index(self, coords: dict[str, int]) -> int:
        """The model-parallel coordinate whose flat groups the rank at ``coords`` holds
        (0 for every rank unless some tensor is cut in uneven grains)."""
        return self.mesh.index(self.model_axes, coords) if self.uneven else 0

    def local_shape(self, t: ir.Tensor, model: int = 0) -> tuple[int, ...]:
        """The shape of ``t``'s slice at model-parallel coordinate ``model``."""
        if not t.uneven:
            return t.local_shape
        return t.local_shape_at(self.mesh.unindex(self.model_axes, model), self.mesh.sizes)

    def member(self, t: ir.Tensor, stage: int | None = None, model: int = 0) -> Member:
        """Where ``t`` sits in the optimizer of pipeline stage ``stage`` (default: its own)
        at model-parallel coordinate ``model``; KeyError where its slice there is empty."""
        if not self.layout.pipeline:
            return self._members[t.name, 0, model]
        return self._members[t.name, t.stage if stage is None else stage, model]

    def _member(self, t: ir.Tensor, coords: dict[str, int]) -> Member | None:
        """``member`` on the stage and model-parallel coordinate of the rank at ``coords``;
        None where that rank's slice of ``t`` is empty (DeepSpeed's optimizer skips it)."""
        stage = coords.get(self.layout.pipeline) if self.layout.pipeline else None
        try:
            return self.member(t, stage, self.model_index(coords))
        except KeyError:
            if self.uneven:
                return None
            raise

    @cached_property
    def _members(self) -> dict[tuple[str, int, int], Member]:
        """Flat groups per pipeline stage (and model-parallel coordinate, when slices
        differ): the trainable tensors of each param group, in order. A tensor several
        stages hold (a tied layer) is a member on each of them.

        DeepSpeed's optimizer leaves out parameters with no elements and drops param groups
        with no parameters, so group numbers count only the non-empty groups of the stage."""
        out: dict[tuple[str, int, int], Member] = {}
        stages = sorted({s for t in self.trainable for s in self._stages_of(t)})
        models = range(self.mesh.size(*self.model_axes)) if self.uneven else range(1)
        keep_empty = self.mode not in ("flat", "stage3")  # a torch optimizer keeps them
        for stage, model in ((s, m) for s in stages for m in models):
            on_stage = [t for t in self.trainable if stage in self._stages_of(t)]
            shapes = {t.name: self.local_shape(t, model) for t in on_stage}
            param_index = 0
            g = 0
            sub_group_base = 0
            for name in self.layout.groups:
                members = [
                    t
                    for t in on_stage
                    if t.group == name and (keep_empty or 0 not in shapes[t.name])
                ]
                if not members:
                    continue
                # experts: each coordinate of their axis has a flat buffer of its own experts
                pinned: dict[Pin, list[ir.Tensor]] = {}
                for t in members:
                    pinned.setdefault(self.pin(t), []).append(t)
                parts = self.mesh.size(*self.partition_axes(members[0]))
                base = param_index
                for on in pinned.values():
                    param_index = base
                    numels = tuple(math.prod(shapes[t.name]) for t in on)
                    flat = FlatGroup(numels, parts) if self.mode == "flat" else None
                    s3 = (
                        Stage3Group(numels, parts, self.layout.zero.sub_group_size)
                        if self.mode == "stage3"
                        else None
                    )
                    for i, t in enumerate(on):
                        out[t.name, stage, model] = Member(
                            g, i, flat, s3, sub_group_base, param_index
                        )
                        param_index += 1
                if s3 is not None:
                    sub_group_base += len(s3.sub_groups)
                g += 1
        return out

    def optimizer_groups(
        self, stage: int = 0, model: int = 0, coords: dict[str, int] | None = None
    ) -> list[tuple[int, list[ir.Tensor], Member]]:
        """The optimizer's flat groups (ZeRO-1/2, bf16 optimizer) or param groups (ZeRO-3)
        on one pipeline stage and model-parallel coordinate, in DeepSpeed's order: (index,
        trainable tensors, member of the first) — the member carries the group's
        :class:`FlatGroup` or :class:`Stage3Group`. Experts are those held at ``coords``
        (default: at coordinate 0 of their axis)."""
        out: dict[int, tuple[int, list[ir.Tensor], Member]] = {}
        for t in self.trainable:
            if stage not in self._stages_of(t):
                continue
            if t.expert and any((coords or {}).get(a, 0) != c for a, c in self.pin(t)):
                continue
            m = self._members.get((t.name, stage, model))
            if m is not None:
                out.setdefault(m.group, (m.group, [], m))[1].append(t)
        return [out[g] for g in sorted(out)]

    def _mp_coords_at(self, stage: int, model: int) -> Iterator[dict[str, int]]:
        """The model-parallel coordinates of one stage whose flat groups are ``model``'s."""
        for mp in self._mp_coords():
            if self.layout.pipeline and mp[self.layout.pipeline] != stage:
                continue
            if self.model_index(mp) == model:
                yield mp

    def partition_rank(self, t: ir.Tensor, coords: dict[str, int]) -> int:
        """The ZeRO partition that the rank at ``coords`` holds of ``t``'s group."""
        return self.mesh.index(self.partition_axes(t), coords)

    def _frozen_partition(
        self, t: ir.Tensor, coords: dict[str, int] | None = None
    ) -> tuple[tuple[str, ...], int, int]:
        """ZeRO-3 frozen parameter: (partition axes, partition count, elements per partition)."""
        axes = self.partition_axes(t)
        parts = self.mesh.size(*axes)
        numel = (
            t.local_numel
            if coords is None
            else math.prod(t.local_shape_at(coords, self.mesh.sizes))
        )
        return axes, parts, -(-numel // parts)

    def partition_axes(self, t: ir.Tensor) -> tuple[str, ...]:
        """The ZeRO axes partitioning ``t``'s group: those it is neither split nor dealt over."""
        held = (*t.split_axes, *t.pinned_axes)
        return tuple(a for a in self.dp_axes if a not in held)

    def pin(self, t: ir.Tensor) -> Pin:
        """The coordinates an expert is held at (empty for every other tensor)."""
        return tuple(t.pinned(self.mesh.sizes).items())

    # -------------------------------------------------------------- geometry

    def slices(self, t: ir.Tensor, state: str) -> tuple[Slice, ...]:
        if state == STEP:
            return (scalar_slice(),)
        return slices_of(t, self.mesh)

    def copy_axes(self, t: ir.Tensor, state: str) -> tuple[str, ...]:
        """Axes over which each slice is stored again (replicas); an expert is stored only
        at its coordinate."""
        axes = self._copy_axes(t, state)
        return tuple(a for a in axes if a not in t.pinned_axes) if t.expert else axes

    def _copy_axes(self, t: ir.Tensor, state: str) -> tuple[str, ...]:
        split = set(t.split_axes)
        model = tuple(a for a in self.model_axes if a not in split)
        if state == STEP:
            model = self.model_axes
            if self.mode in ("flat", "stage3"):
                return model + self.dp_axes  # every partition's file records the step
            return model + self.expert_axes if self.expp else model
        if state == WEIGHT and self.layout.zero.stage == 3 and t.kind == ir.BUFFER:
            return model + tuple(a for a in self.dp_axes if a not in split)
        if self.expp and state != WEIGHT:  # one torch optimizer per expert-parallel rank
            return model + self.expert_axes
        return model

    def _rank0_copies(self, t: ir.Tensor, state: str) -> int:
        """ZeRO-0 MoE: the model-states file also holds rank 0's optimizer (a copy of
        ``expp_rank_0``'s), one per model-parallel slice of what expert coordinate 0 holds."""
        if not self.expp or state == WEIGHT or not t.trainable:
            return 0
        if any(c for _, c in self.pin(t)):
            return 0
        axes = self._copy_axes(t, state)
        return self.mesh.size(*(a for a in axes if a not in self.expert_axes))

    def _in_model_file(self, t: ir.Tensor, state: str, copy: int) -> bool:
        """Copy ``copy`` is one of :meth:`_rank0_copies` (numbered after the others)."""
        per_stage = self._copies_per_stage(t, state)
        return copy % per_stage >= per_stage - self._rank0_copies(t, state)

    def _variants(self, t: ir.Tensor, state: str) -> int:
        """Keys a slice is stored under in one file: ZeRO-2 keeps frozen parameters both in
        ``module`` and in ``frozen_param_fragments``."""
        return 2 if state == WEIGHT and t.kind == ir.FROZEN and self.layout.zero.stage == 2 else 1

    def _stage_copies(self, t: ir.Tensor, state: str) -> int:
        """Stages holding their own copy: every stage of a tied layer keeps its optimizer
        state; its weights are stored once, in the layer file."""
        if state == WEIGHT and self.layer_files:
            return 1
        return len(self._stages_of(t))

    def _copies_per_stage(self, t: ir.Tensor, state: str) -> int:
        replicas = self.mesh.size(*self.copy_axes(t, state)) * self._variants(t, state)
        return replicas + self._rank0_copies(t, state)

    def copies(self, t: ir.Tensor, state: str) -> int:
        return self._copies_per_stage(t, state) * self._stage_copies(t, state)

    def _coords(self, t: ir.Tensor, state: str, sl: Slice, copy: int) -> dict[str, int]:
        """Copies are numbered stage-major: (stage, replica, variant), then ZeRO-0 MoE's
        copies in the model-states file (at expert coordinate 0)."""
        per_stage = self._copies_per_stage(t, state)
        stage, inner = divmod(copy, per_stage)
        coords = dict(sl.coords)
        extra = self._rank0_copies(t, state)
        if inner >= per_stage - extra:
            axes = self._copy_axes(t, state)
            inner -= per_stage - extra
            coords.update(
                self.mesh.unindex(tuple(a for a in axes if a not in self.expert_axes), inner)
            )
            coords.update(dict.fromkeys(self.expert_axes, 0))
        else:
            coords.update(
                self.mesh.unindex(self.copy_axes(t, state), inner // self._variants(t, state))
            )
        coords.update(self.pin(t))
        if self.layout.pipeline:
            coords[self.layout.pipeline] = self._stages_of(t)[stage]
        return coords

    def runs(self, t: ir.Tensor, state: str, sl: Slice, copy: int, lo: int, hi: int) -> list[Run]:
        coords = self._coords(t, state, sl, copy)
        dtype = self.dtype(t, state)
        if state == WEIGHT:
            if t.kind == ir.FROZEN and self.layout.zero.stage == 3:
                return self._stage3_frozen(t, coords, lo, hi, dtype)
            if t in self.fused:
                return self._fused_runs(t, coords, lo, hi, dtype)
            file, key = self._weight_location(t, coords, copy % self._variants(t, state))
            return [Run(file, key, lo, lo, hi - lo, dtype)]
        m = self._member(t, coords)
        if m is None:
            return []
        if self.mode == "plain":
            file = self._plain_file(t, state, copy, coords)
            if state == STEP:
                return [Run(file, self._state_key(m, STEP), 0, 0, 1, dtype)]
            return [Run(file, self._state_key(m, state), lo, lo, hi - lo, dtype)]
        if state == STEP:
            return [Run(self.optim_file(coords), self._state_key(m, STEP), 0, 0, 1, dtype)]
        part_axes = self.partition_axes(t)
        key = self._state_key(m, state)
        out = []
        if self.mode == "flat":
            assert m.flat is not None
            frags = m.flat.locate(m.index, lo, hi)
        else:
            assert m.stage3 is not None
            frags = m.stage3.locate(m.index, lo, hi)
        for f in frags:
            fc = dict(coords)
            fc.update(self.mesh.unindex(part_axes, f.rank))
            out.append(
                Run(self.optim_file(fc), key, f.buffer_offset, f.param_offset, f.numel, dtype)
            )
        return out

    def _fused_runs(
        self, t: ir.Tensor, coords: dict[str, int], lo: int, hi: int, dtype: str
    ) -> list[Run]:
        """AutoEP: the slice ``[E / ep, ...]`` of fused experts at ``coords`` is stored one
        expert per file, ``<name>.<G>`` under the expert's global id ``G``."""
        assert t.layer is not None
        d0 = t.dims[0]
        inner = math.prod(t.local_shape[1:])
        first = d0.part_of(coords, self.mesh.sizes) * d0.local
        out: list[Run] = []
        e = lo // inner if inner else 0
        while inner and e * inner < hi:
            a, b = max(lo, e * inner), min(hi, (e + 1) * inner)
            g = first + e
            file = expert_file_name(t.layer, g, self._mp(coords))
            out.append(Run(file, f"{t.name}.{g}", a - e * inner, a, b - a, dtype))
            e += 1
        return out

    def _plain_file(self, t: ir.Tensor, state: str, copy: int, coords: dict[str, int]) -> str:
        """Where a torch optimizer (ZeRO-0) keeps a state: the model-states file, or with
        experts the expert-parallel rank's ``expp_rank`` file (and rank 0's in both)."""
        if self.expp and not self._in_model_file(t, state, copy):
            return self.expp_file(coords)
        return self.model_file(coords)

    def step_counters(self, t: ir.Tensor) -> list[tuple[object, Sequence[int]]]:
        """A stage's ranks all hold one counter per optimizer group (a ZeRO-3 sub-group),
        in files no other stage has: a counter is (stage, its key), its copies the stage's.
        With uneven grains groups differ by model-parallel rank: counted copy by copy."""
        if self.uneven or self.expp:
            return super().step_counters(t)
        per_stage = self._copies_per_stage(t, STEP)
        out: list[tuple[object, Sequence[int]]] = []
        for k, stage in enumerate(self._stages_of(t)):
            try:
                m = self.member(t, stage if self.layout.pipeline else None)
            except KeyError:  # no elements: the optimizer leaves it out
                continue
            copies = range(k * per_stage, (k + 1) * per_stage)
            out.append(((stage, self.pin(t), self._state_key(m, STEP)), copies))
        return out

    def count_runs_all(self, t: ir.Tensor, state: str, sl: Slice, lo: int, hi: int) -> int:
        """A tied layer's stages cut their flat buffers differently: count each stage."""
        per_stage = self._copies_per_stage(t, state)
        return sum(
            self.count_runs(t, state, sl, lo, hi, k * per_stage) * per_stage
            for k in range(self._stage_copies(t, state))
        )

    def count_runs(
        self, t: ir.Tensor, state: str, sl: Slice, lo: int, hi: int, copy: int = 0
    ) -> int:
        if state == WEIGHT:
            if t.kind == ir.FROZEN and self.layout.zero.stage == 3:
                _, _, pn = self._frozen_partition(t, self._coords(t, state, sl, copy))
                return (hi - 1) // pn - lo // pn + 1 if hi > lo else 0
            if t in self.fused:
                inner = math.prod(t.local_shape[1:])
                return (hi - 1) // inner - lo // inner + 1 if hi > lo and inner else 0
            return 1
        m = self._member(t, self._coords(t, state, sl, copy))
        if m is None:
            return 0
        if state == STEP or self.mode == "plain":
            return 1
        group = m.flat if self.mode == "flat" else m.stage3
        assert group is not None
        return group.count(m.index, lo, hi)

    def _weight_location(
        self, t: ir.Tensor, coords: dict[str, int], variant: int = 0
    ) -> tuple[str, str]:
        if self.layer_files:
            return self.layer_file(t, coords)
        if t.expert:
            return self.expert_file(t, coords), t.name
        if variant == 1:
            return self.model_file(coords), f"frozen_param_fragments/{t.name}"
        return self.model_file(coords), f"module/{t.name}"

    def _state_key(self, m: Member, state: str) -> str:
        if self.mode == "plain":
            return f"optimizer/state/{m.param_index}/{state}"
        if self.mode == "stage3":
            assert m.stage3 is not None
            s = m.first_sub_group + m.stage3.sub_group_of(m.index)
            if state == MASTER:
                return f"optimizer_state_dict/fp32_flat_groups/{s}"
            return f"optimizer_state_dict/optimizer_state_dict/state/{s}/{state}"
        if state == MASTER:
            return f"optimizer_state_dict/single_partition_of_fp32_groups/{m.group}"
        return f"optimizer_state_dict/base_optimizer_state/state/{m.group}/{state}"

    def _stage3_frozen(
        self, t: ir.Tensor, coords: dict[str, int], lo: int, hi: int, dtype: str
    ) -> list[Run]:
        axes, _, pn = self._frozen_partition(t, coords)
        out: list[Run] = []
        if hi <= lo:
            return out
        r = lo // pn
        while r * pn < hi:
            a, b = max(lo, r * pn), min(hi, (r + 1) * pn)
            fc = dict(coords)
            fc.update(self.mesh.unindex(axes, r))
            out.append(
                Run(
                    self.model_file(fc),
                    f"frozen_param_fragments/{t.name}",
                    a - r * pn,
                    a,
                    b - a,
                    dtype,
                )
            )
            r += 1
        return out

    # -------------------------------------------------------------- files and buffers

    def _mp_coords(self) -> Iterator[dict[str, int]]:
        return iter_coords(self.mesh, self.mp_axes)

    def _dp_coords(self, t: ir.Tensor) -> Iterator[dict[str, int]]:
        """The data-parallel coordinates of the ranks whose optimizer holds ``t``'s group:
        all of them, or for an expert those at its coordinate."""
        pin = dict(self.pin(t))
        free = tuple(a for a in self.dp_axes if a not in pin)
        for dp in iter_coords(self.mesh, free):
            yield {a: pin[a] if a in pin else dp[a] for a in self.dp_axes}

    def files(self) -> Iterator[str]:
        for mp in self._mp_coords():
            if self.layout.zero.stage == 3:
                for dp in iter_coords(self.mesh, self.dp_axes):
                    yield self.model_file({**mp, **dp})
            else:
                yield self.model_file(mp)
        if self.mode in ("flat", "stage3"):
            for mp in self._mp_coords():
                for dp in iter_coords(self.mesh, self.dp_axes):
                    yield self.optim_file({**mp, **dp})
        yield from self.expert_files()
        if self.expp:
            for mp in self._mp_coords():
                for ep in iter_coords(self.mesh, self.expert_axes):
                    yield self.expp_file({**mp, **ep})
        if self.layer_files:
            seen: set[str] = set()
            for t in self.tensors:
                for sl in self.slices(t, WEIGHT):
                    for c in range(self.copies(t, WEIGHT)):
                        f, _ = self._weight_location(t, self._coords(t, WEIGHT, sl, c))
                        if f not in seen:
                            seen.add(f)
                            yield f

    @cached_property
    def _expert_ids(self) -> dict[tuple[int | None, int], Pin]:
        """(MoE layer, expert id) of every expert, in order -> the coordinates holding it
        (layer None: DeepSpeed's older files, one per expert id for all layers)."""
        out: dict[tuple[int | None, int], Pin] = {}
        for t in self.experts:
            assert t.expert is not None
            out.setdefault((t.layer, t.expert.id), self.pin(t))
        for t in self.fused:
            if WEIGHT not in self.states(t):  # ZeRO-3: the experts live in its partitions
                continue
            assert t.layer is not None
            d0 = t.dims[0]
            for e in range(d0.size):
                out.setdefault((t.layer, e), ((d0.split[0], e // d0.local),))
        return out

    def expert_files(self) -> Iterator[str]:
        """One file per expert of each MoE layer and model-parallel rank."""
        for mp in self._mp_coords():
            for layer, e in self._expert_ids:
                yield expert_file_name(layer, e, self._mp(mp))

    def file_count(self) -> int:
        mp = self.mesh.size(*self.mp_axes)
        dp = self.mesh.size(*self.dp_axes)
        n = mp * dp if self.layout.zero.stage == 3 else mp
        if self.mode in ("flat", "stage3"):
            n += mp * dp
        if self.layer_files:
            layers = {_layer_and_key(t)[0] for t in self.tensors}
            n += len(layers) * self.mesh.size(*self.model_axes)
        if self.expp:
            n += mp * self.mesh.size(*self.expert_axes)
        return n + len(self._expert_ids) * mp

    def files_holding(self, states: set[str]) -> int:
        """Closed form: optimizer files if any optimizer state is wanted, weight files
        (layer, model-state) if weights are. Slices of uneven grains make each rank's
        share its own: those are counted from the runs."""
        if self.uneven or self.experts or self.fused:  # expert groups' files: from the runs
            return super().files_holding(states)
        mp = self.mesh.size(*self.mp_axes)
        dp = self.mesh.size(*self.dp_axes)
        n = 0
        states = states & {s for t in self.tensors for s in self.states(t)}  # only what is stored
        opt = states - {WEIGHT}
        if opt and self.mode in ("flat", "stage3"):
            # every partition's file records the step; other states only where data lies
            n += self._optim_files_with_data(every_partition=STEP in opt)
        per_stage = mp // max(1, self.layout.stages)
        if self.layout.zero.stage == 3:
            # ZeRO-3 weights: buffers in every rank's file, frozen params partitioned
            held = 0
            for t in self.tensors:
                if t.kind == ir.BUFFER:
                    held = dp
                elif t.kind == ir.FROZEN:
                    _, _, pn = self._frozen_partition(t)
                    held = max(held, -(-t.local_numel // pn) if pn else 0)
            n += mp * held if WEIGHT in states else 0
        else:
            stages: set[int] = set()
            if WEIGHT in states and not self.layer_files:
                stages |= {self._stage_of(t) for t in self.tensors if WEIGHT in self.states(t)}
            if opt and self.mode == "plain":
                stages |= {s for t in self.trainable for s in self._stages_of(t)}
            n += per_stage * len(stages)
        if WEIGHT in states and self.layer_files:
            layers = {_layer_and_key(t)[0] for t in self.tensors}
            n += len(layers) * self.mesh.size(*self.model_axes)
        return n

    def _optim_files_with_data(self, every_partition: bool = False) -> int:
        """Optimizer files holding at least one element of data: trailing partitions of a
        tiny model can hold padding only (data always fills partitions from rank 0 up)."""
        ranks: dict[int, int] = {}
        for (name, stage, _model), m in self._members.items():
            t = self.layout.tensor(name)
            if m.flat is not None:
                g = m.flat
                held = -(-g.total // g.partition_size) if g.partition_size else 0
            else:
                assert m.stage3 is not None
                pn = m.stage3.partition_numel(m.index)
                held = -(-m.stage3.numels[m.index] // pn) if pn else 0
            if every_partition:
                held = self.mesh.size(*self.partition_axes(t))
            ranks[stage] = max(ranks.get(stage, 0), held)
        per_stage = self.mesh.size(*self.mp_axes) // max(1, self.layout.stages)
        return sum(per_stage * held for held in ranks.values())

    def buffers(self) -> Iterator[StoredBuffer]:
        yield from self.weight_buffers()
        yield from self._optimizer_buffers()

    def model_files(self) -> list[str]:
        """The model-states files (weights, buffers, frozen parameters, run metadata), the
        experts' files included."""
        out: list[str] = []
        for mp in self._mp_coords():
            if self.layout.zero.stage == 3:
                out.extend(
                    self.model_file({**mp, **dp}) for dp in iter_coords(self.mesh, self.dp_axes)
                )
            else:
                out.append(self.model_file(mp))
        if self.layer_files:
            out.extend(
                dict.fromkeys(b.file for b in self.weight_buffers() if b.file.startswith("layer_"))
            )
        out.extend(self.expert_files())
        return out

    def weight_pads(self) -> Iterator[Run]:
        """Padding inside model-states files (ZeRO-3 frozen fragments)."""
        for t in self.tensors:
            if t.kind == ir.FROZEN and self.layout.zero.stage == 3:
                yield from self._frozen_pads(t)

    def weight_buffers(self) -> Iterator[StoredBuffer]:
        """Buffers holding the ``weight`` state: 16-bit weights, frozen parameters, buffers."""
        for t in self.tensors:
            if WEIGHT not in self.states(t):
                continue
            dtype = self.dtype(t, WEIGHT)
            for sl in self.slices(t, WEIGHT):
                for c in range(self.copies(t, WEIGHT)):
                    coords = self._coords(t, WEIGHT, sl, c)
                    if t.kind == ir.FROZEN and self.layout.zero.stage == 3:
                        axes, parts, pn = self._frozen_partition(t, coords)
                        for r in range(parts):
                            fc = {**coords, **self.mesh.unindex(axes, r)}
                            yield StoredBuffer(
                                self.model_file(fc),
                                f"frozen_param_fragments/{t.name}",
                                dtype,
                                (pn,),
                            )
                        continue
                    if t in self.fused:
                        for run in self._fused_runs(t, coords, 0, sl.numel, dtype):
                            yield StoredBuffer(run.file, run.key, dtype, sl.shape[1:])
                        continue
                    f, k = self._weight_location(t, coords, c % self._variants(t, WEIGHT))
                    yield StoredBuffer(f, k, dtype, sl.shape)

    def _optimizer_buffers(self) -> Iterator[StoredBuffer]:
        if self.mode == "none":
            return
        opt = self.layout.optimizer
        assert opt is not None
        state_names = [s for s in (MASTER, *opt.states) if s != MASTER or opt.master]
        if self.expp:  # every copy of every state, one run each
            for t in self.trainable:
                for s in (s for s in self.states(t) if s != WEIGHT):
                    for sl in self.slices(t, s):
                        for c in range(self.copies(t, s)):
                            (r,) = self.runs(t, s, sl, c, 0, sl.numel if sl.shape else 1)
                            yield StoredBuffer(r.file, r.key, r.dtype, sl.shape)
            return
        if self.mode == "plain":
            for t in self.trainable:
                for sl in self.slices(t, WEIGHT):
                    for c in range(self.copies(t, WEIGHT)):
                        coords = self._coords(t, WEIGHT, sl, c)
                        for stage in self._stages_of(t):
                            if self.layout.pipeline:
                                coords = {**coords, self.layout.pipeline: stage}
                            yield from self._plain_buffers(t, sl, coords)
            return
        # one flat buffer per (group or sub-group, state) in every optimizer file
        seen: dict[tuple[int, int, int, Pin], list[tuple[Member, ir.Tensor]]] = {}
        for (name, stage, model), m in self._members.items():
            t = self.layout.tensor(name)
            seen.setdefault((stage, model, m.group, self.pin(t)), []).append((m, t))
        for (stage, model, _g, _pin), members in seen.items():
            m, t = members[0]
            for mp in self._mp_coords_at(stage, model):
                for dp in self._dp_coords(t):
                    coords = {**mp, **dp}
                    file = self.optim_file(coords)
                    rank = self.mesh.index(self.partition_axes(t), coords)
                    if m.flat is not None:
                        for s in state_names:
                            strip = s == MASTER and not self._keeps_padding()
                            n = m.flat.saved_numel(rank, strip) if strip else m.flat.partition_size
                            yield StoredBuffer(file, self._state_key(m, s), self.dtype(t, s), (n,))
                        if opt.step:
                            yield StoredBuffer(file, self._state_key(m, STEP), "fp32", ())
                    else:
                        assert m.stage3 is not None
                        for sg in range(len(m.stage3.sub_groups)):
                            probe = Member(
                                m.group,
                                m.stage3.sub_groups[sg][0],
                                None,
                                m.stage3,
                                m.first_sub_group,
                                0,
                            )
                            n = m.stage3.sub_group_numel(sg)
                            for s in state_names:
                                yield StoredBuffer(
                                    file, self._state_key(probe, s), self.dtype(t, s), (n,)
                                )
                            if opt.step:
                                yield StoredBuffer(file, self._state_key(probe, STEP), "fp32", ())

    def _plain_buffers(
        self, t: ir.Tensor, sl: Slice, coords: dict[str, int]
    ) -> Iterator[StoredBuffer]:
        """ZeRO-0: a torch optimizer's state of ``t`` in the model-states file at ``coords``."""
        opt = self.layout.optimizer
        assert opt is not None
        m = self._member(t, coords)
        assert m is not None  # a torch optimizer keeps empty slices too
        for s in opt.states:
            yield StoredBuffer(
                self.model_file(coords), self._state_key(m, s), self.dtype(t, s), sl.shape
            )
        if opt.step:
            yield StoredBuffer(self.model_file(coords), self._state_key(m, STEP), "fp32", ())

    def _keeps_padding(self) -> bool:
        """The bf16 optimizer saves its fp32 partitions whole; ZeRO 1/2 strip the padding."""
        z = self.layout.zero
        return z.bf16_optimizer or (z.stage == 0 and self.bf16)

    def pads(self) -> Iterator[Run]:
        """Stored elements outside every slice: flat-buffer alignment padding and the tails of
        ZeRO-3 partitions. (Padding inside a slice, e.g. vocabulary rows, is part of the slice.)"""
        yield from self.weight_pads()
        if self.mode not in ("flat", "stage3"):
            return
        opt = self.layout.optimizer
        assert opt is not None
        flat_states = [s for s in (MASTER, *opt.states) if s != MASTER or opt.master]
        done: set[tuple[int, int, int, Pin]] = set()
        for (name, stage, model), m in self._members.items():
            t = self.layout.tensor(name)
            key = (stage, model, m.group, self.pin(t))
            if m.flat is not None and key in done:
                continue
            done.add(key)
            for mp in self._mp_coords_at(stage, model):
                for dp in self._dp_coords(t):
                    coords = {**mp, **dp}
                    rank = self.mesh.index(self.partition_axes(t), coords)
                    file = self.optim_file(coords)
                    if m.flat is not None:
                        pad = m.flat.padding(rank)
                        if pad:
                            size = m.flat.partition_size
                            for s in flat_states:
                                if s == MASTER and not self._keeps_padding():
                                    continue
                                yield Run(
                                    file,
                                    self._state_key(m, s),
                                    size - pad,
                                    0,
                                    pad,
                                    self.dtype(t, s),
                                )
                    else:
                        assert m.stage3 is not None
                        pad = m.stage3.padding(m.index, rank)
                        if pad:
                            pn = m.stage3.partition_numel(m.index)
                            off = m.stage3.offset_in_sub_group(m.index) + pn - pad
                            for s in flat_states:
                                yield Run(
                                    file, self._state_key(m, s), off, 0, pad, self.dtype(t, s)
                                )

    def _frozen_pads(self, t: ir.Tensor) -> Iterator[Run]:
        for sl in self.slices(t, WEIGHT):
            for c in range(self.copies(t, WEIGHT)):
                coords = self._coords(t, WEIGHT, sl, c)
                axes, parts, pn = self._frozen_partition(t, coords)
                for r in range(parts):
                    have = max(0, min(pn, sl.numel - r * pn))
                    if have < pn:
                        fc = {**coords, **self.mesh.unindex(axes, r)}
                        key = f"frozen_param_fragments/{t.name}"
                        yield Run(
                            self.model_file(fc), key, have, 0, pn - have, self.dtype(t, WEIGHT)
                        )

    def holders(self, file: str) -> RankSet:
        """Ranks that hold a file: an optimizer (or ZeRO-3 model-state) file belongs to one
        rank; an ``mp_rank`` or ``layer`` file to every data-parallel rank of its model-parallel
        coordinate (DeepSpeed writes it from data-parallel rank 0); an expert's file to those
        of its expert coordinate."""
        m = re.search(r"zero_pp_rank_(\d+)_mp_rank_(\d+)", file)
        fixed: list[tuple[str, int]] = []
        expert = EXPERT.match(file)
        expp = EXPP.match(file)
        if expp:  # the ranks of its expert-parallel coordinate load it
            fixed += list(self.mesh.unindex(self.expert_axes, int(expp.group(1))).items())
            fixed += list(self.mesh.unindex(self.mp_axes, int(expp.group(2))).items())
        elif expert:  # the ranks of the expert's coordinate load it
            layer = None if expert.group(1) is None else int(expert.group(1))
            fixed += list(self._expert_ids[layer, int(expert.group(2))])
            fixed += list(self.mesh.unindex(self.mp_axes, int(expert.group(3))).items())
        elif m:
            fixed += list(self.mesh.unindex(self.dp_axes, int(m.group(1))).items())
            fixed += list(self.mesh.unindex(self.mp_axes, int(m.group(2))).items())
        elif m := re.search(r"mp_rank_(\d+)", file):
            fixed += list(self.mesh.unindex(self.mp_axes, int(m.group(1))).items())
        elif m := re.match(r"layer_(\d+)(?:-model_(\d+))?-model_states\.pt$", file):
            stage = next(
                self._stage_of(t) for t in self.tensors if _layer_and_key(t)[0] == int(m.group(1))
            )
            if self.layout.pipeline:
                fixed.append((self.layout.pipeline, stage))
            if m.group(2) is not None:
                fixed += list(self.mesh.unindex(self.model_axes, int(m.group(2))).items())
        return RankSet(tuple(fixed))


def model_file_name(mp: int, dp: int | None = None) -> str:
    """The model-states file of model-parallel rank ``mp`` (ZeRO-3: one per data-parallel
    rank ``dp`` too)."""
    if dp is not None:
        return f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt"
    return f"mp_rank_{mp:02d}_model_states.pt"


def expert_file_name(layer: int | None, expert: int, mp: int) -> str:
    """The file of expert ``expert`` (its global id) of MoE layer ``layer`` (the MoE
    layers' ordinal in model order) at model-parallel rank ``mp``; without a layer,
    DeepSpeed's older name, one file per expert id holding it in every layer."""
    if layer is None:
        return f"expert_{expert}_mp_rank_{mp:02d}_model_states.pt"
    return f"layer_{layer}_expert_{expert}_mp_rank_{mp:02d}_model_states.pt"


def layer_of(name: str) -> tuple[int, str] | None:
    """``(layer, key)`` of a pipeline parameter named ``<layer>.<key>``; None otherwise."""
    m = _LAYER.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def tied_key(name: str) -> str | None:
    """The layer-file key of a tied module's tensor ``tied_modules.<module>.<key>``."""
    parts = name.split(".", 2)
    return parts[2] if parts[0] == "tied_modules" and len(parts) == 3 else None


def _layer_and_key(t: ir.Tensor) -> tuple[int, str]:
    """A pipeline tensor's layer and its key in the layer file: ``<L>.<key>``, or with a
    ``layer`` attribute the name without a tied module's ``tied_modules.<module>.`` prefix."""
    if t.layer is not None:
        return t.layer, tied_key(t.name) or t.name
    found = layer_of(t.name)
    assert found is not None, t.name
    return found
