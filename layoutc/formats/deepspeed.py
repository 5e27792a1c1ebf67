"""Open a DeepSpeed checkpoint folder and describe it as a layout (``layoutc infer``).

A checkpoint is found from its root (the folder holding ``latest``) or from a tag folder.
Only metadata is read: the model-states file's ``param_shapes``, ``frozen_param_shapes``,
``shared_params``, ``buffer_names`` and tensor dtypes, the first optimizer file's keys and
``ds_config``; no tensor data. Files are read with the restricted unpickler of
:mod:`layoutc.formats.pt`, so DeepSpeed need not be installed and no pickled code runs.

:func:`infer` writes the ``.layout`` text that describes the checkpoint exactly: the
mesh (data-parallel size from the files), the ZeRO stage (or DeepSpeed's bf16 optimizer),
every tensor in flat-buffer order per optimizer param group, frozen parameters, persistent
buffers and ties. Tensor- and pipeline-parallel checkpoints are refused here for now.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any

from layoutc.errors import InputError, Unsupported
from layoutc.formats import autotp, pt, unknown
from layoutc.formats.checkpoint import Checkpoint, layout_tensor_name
from layoutc.ir import check_tag
from layoutc.lang.check import load_text
from layoutc.lang.fmt import fmt
from layoutc.lang.parse import parse
from layoutc.place.deepspeed import (
    EXPERT,
    EXPP,
    LATEST,
    LATEST_UNIVERSAL,
    LAYER,
    MODEL,
    OPTIM,
    expert_file_name,
    layer_of,
    tied_key,
)


class NotACheckpoint(InputError):
    """The path holds no DeepSpeed checkpoint."""


class DeepSpeedCheckpoint(Checkpoint):
    """A DeepSpeed checkpoint's tag folder (``root``: the folder holding ``latest``, if
    any): its model-states, optimizer and layer files, each file's metadata checked
    against the types DeepSpeed writes (:func:`load_checked`) as it is loaded."""

    format = "deepspeed"
    UNIVERSAL_OPTIMIZER = "zero/optimizer_state.pt"

    def __init__(self, folder: Path, tag: str, root: Path | None = None) -> None:
        super().__init__(folder, tag)
        self.root = root
        self.model_files: list[Path] = []
        self.optim_files: list[Path] = []
        self.layer_files: list[Path] = []
        self.expert_files: list[Path] = []  # MoE: layer_{L}_expert_{id}_mp_rank_XX_...
        self.expp_files: list[Path] = []  # MoE at ZeRO-0: expp_rank_{ep}_mp_rank_XX_optim_...
        self.universal = False  # DeepSpeed's universal format: zero/<param>/<state>.pt

    @classmethod
    def scan(cls, folder: Path, root: Path | None = None) -> DeepSpeedCheckpoint:
        """The DeepSpeed files in the tag folder ``folder``, by kind (none required)."""
        ckpt = cls(folder, folder.name, root)
        for p in sorted(folder.iterdir()):
            if MODEL.match(p.name):
                ckpt.model_files.append(p)
            elif OPTIM.match(p.name):
                ckpt.optim_files.append(p)
            elif LAYER.match(p.name):
                ckpt.layer_files.append(p)
            elif EXPERT.match(p.name):
                ckpt.expert_files.append(p)
            elif EXPP.match(p.name):
                ckpt.expp_files.append(p)
        ckpt.universal = not ckpt.optim_files and (folder / "zero").is_dir()
        return ckpt

    def _load(self, path: Path) -> Any:
        return load_checked(path, self.opener)

    def data_files(self) -> list[str]:
        """Model-states, optimizer and layer files; a universal checkpoint's ``zero/``."""
        files = [
            *self.model_files,
            *self.optim_files,
            *self.layer_files,
            *self.expert_files,
            *self.expp_files,
        ]
        if self.universal:
            files.extend((self.folder / "zero").rglob("*.pt"))
        return sorted(str(p.relative_to(self.folder)) for p in files)

    def state_files(self) -> list[str]:
        """Every ``.pt`` file of the tag folder: DeepSpeed keeps nothing else there (a
        universal checkpoint's ``zero/`` tree is checked folder by folder)."""
        if self.universal:
            return self.data_files()
        return sorted(p.name for p in self.folder.glob("*.pt") if p.is_file())

    @cached_property
    def model_states(self) -> dict[str, Any]:
        """The first model-states file (metadata; tensors stay unread)."""
        return self.model_states_of(self.model_files[0])

    def model_states_of(self, path: Path) -> dict[str, Any]:
        """A model-states file (see :func:`load_checked`)."""
        obj = self.load(path)
        if not isinstance(obj, dict):
            raise NotACheckpoint(f"{path}: not a DeepSpeed model-states dict")
        return obj

    @cached_property
    def optim_states(self) -> dict[str, Any] | None:
        if self.universal:  # the optimizer's scalars and param groups, without partitions
            path = self.folder / self.UNIVERSAL_OPTIMIZER
            if not path.is_file():
                return None
            universal = self.load(path)
            if not isinstance(universal, dict):
                raise NotACheckpoint(f"{path}: not an optimizer state dict")
            return universal
        if not self.optim_files:
            return None
        obj = self.load(self.optim_files[0])
        if not isinstance(obj, dict) or "optimizer_state_dict" not in obj:
            raise NotACheckpoint(f"{self.optim_files[0]}: no optimizer_state_dict")
        inner: dict[str, Any] = obj["optimizer_state_dict"]
        return inner

    @property
    def zero3(self) -> bool:
        """ZeRO-3 writes one model-states file per data-parallel rank."""
        return any((m := MODEL.match(p.name)) and m.group(1) is not None for p in self.model_files)

    @property
    def dp(self) -> int:
        ranks = {int(m.group(2)) for p in self.optim_files if (m := OPTIM.match(p.name))}
        return len(ranks) or int(self.model_states.get("dp_world_size") or 1)

    @property
    def bf16_prefix(self) -> bool:
        return any(p.name.startswith("bf16_") for p in self.optim_files)

    @property
    def config(self) -> dict[str, Any]:
        cfg = self.model_states.get("ds_config")
        return cfg if isinstance(cfg, dict) else {}


def _shape_ok(v: Any) -> bool:
    return isinstance(v, tuple | list) and all(type(x) is int and x >= 0 for x in v)


def _all(check: Any) -> Any:
    """A dict (name -> x) or list whose every value passes ``check``."""

    def ok(v: Any) -> bool:
        if isinstance(v, dict):
            return all(isinstance(k, str | int) and check(x) for k, x in v.items())
        return isinstance(v, list | tuple) and all(check(x) for x in v)

    return ok


def _names(check: Any) -> Any:
    """A dict whose every value passes ``check``."""
    return lambda v: isinstance(v, dict) and _all(check)(v)


def _or_none(check: Any) -> Any:
    return lambda v: v is None or check(v)


def _is(*types: type) -> Any:
    return lambda v: isinstance(v, types) and not (isinstance(v, bool) and bool not in types)


_TENSOR = _is(pt.TensorRef)
_INT = _is(int)
_POSITIVE = lambda v: type(v) is int and v >= 1  # noqa: E731
_DICT, _LIST = _is(dict), _is(list, tuple)
_OPT = ("optimizer_state_dict",)

# What each metadata entry layoutc reads must be where present, by key path, with the words
# a user reads it in. None passes only where DeepSpeed writes None (a pipeline's `module`,
# ZeRO-0's `param_shapes`).
_SCHEMA: dict[tuple[str, ...], tuple[Any, str]] = {
    ("module",): (_or_none(_names(_TENSOR)), "name -> tensor"),
    ("param_shapes",): (_or_none(_all(_names(_shape_ok))), "a list of {name: shape}"),
    ("frozen_param_shapes",): (_or_none(_names(_shape_ok)), "name -> shape"),
    ("frozen_param_fragments",): (_or_none(_names(_TENSOR)), "name -> tensor"),
    ("shared_params",): (_or_none(_names(_is(str))), "name -> name"),
    ("buffer_names",): (_or_none(_all(_is(str))), "a list of names"),
    ("checkpoint_parallel_dimensions",): (_names(_POSITIVE), "axis -> a positive integer"),
    ("mp_world_size",): (_POSITIVE, "a positive integer"),
    ("dp_world_size",): (_POSITIVE, "a positive integer"),
    ("ds_config",): (_DICT, "a dict"),
    ("ds_config", "zero_optimization"): (_DICT, "a dict"),
    ("ds_config", "tensor_parallel"): (_DICT, "a dict"),
    _OPT: (_DICT, "a dict"),
    (*_OPT, "zero_stage"): (lambda v: _INT(v) or isinstance(v, pt.Record), "the ZeRO stage"),
    (*_OPT, "single_partition_of_fp32_groups"): (_all(_TENSOR), "a list of tensors"),
    (*_OPT, "fp32_flat_groups"): (_all(_TENSOR), "a list of tensors"),
    (*_OPT, "group_paddings"): (_all(_INT), "a list of integers"),
    (*_OPT, "param_alignment_paddings"): (_all(_all(_INT)), "a list of lists of integers"),
    (*_OPT, "partition_count"): (lambda v: _INT(v) or _all(_INT)(v), "integers"),
    (*_OPT, "param_slice_mappings"): (_all(_DICT), "a list of dicts"),
    (*_OPT, "base_optimizer_state"): (lambda v: _DICT(v) or _LIST(v), "an optimizer state"),
    (*_OPT, "base_optimizer_state", "state"): (_all(_DICT), "param index -> states"),
    (*_OPT, "base_optimizer_state", "param_groups"): (_all(_DICT), "a list of dicts"),
    (*_OPT, "optimizer_state_dict"): (_DICT, "an optimizer state"),
    (*_OPT, "optimizer_state_dict", "state"): (_all(_DICT), "param index -> states"),
    (*_OPT, "optimizer_state_dict", "param_groups"): (_all(_DICT), "a list of dicts"),
    (*_OPT, "param_groups"): (_all(_DICT), "a list of dicts"),
    (*_OPT, "state"): (_all(_DICT), "param index -> states"),
}


_MISSING = object()


def _value_at(obj: Any, path: tuple[str, ...]) -> Any:
    """The value at ``path`` through nested dicts, or :data:`_MISSING`."""
    for part in path:
        if not isinstance(obj, dict) or part not in obj:
            return _MISSING
        obj = obj[part]
    return obj


def load_checked(path: Path, opener: pt.Opener | None = None) -> Any:
    """A DeepSpeed file, its metadata checked against the types DeepSpeed writes: each
    entry layoutc reads (``param_shapes``, ``module``, the optimizer's flat groups and
    paddings, world sizes, ...) is absent, None, or what DeepSpeed writes there; anything
    else is refused naming the file, the entry and what it holds, instead of failing later
    somewhere deep in a conversion."""
    obj = pt.load(path, opener)
    if not isinstance(obj, dict):
        return obj
    for where, (ok, what) in _SCHEMA.items():
        value = _value_at(obj, where)
        if value is not _MISSING and not ok(value):
            raise NotACheckpoint(
                f"{path}: `{'/'.join(where)}` holds {type(value).__name__} {value!r:.80}; "
                f"DeepSpeed writes {what} there"
            )
    return obj


def is_deepspeed(path: str | Path, files: str = "model") -> bool:
    """A DeepSpeed checkpoint root (``latest``) or a tag folder (model-states or layer
    files; with ``files="any"``, optimizer files do too)."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / LATEST).is_file():
        return True
    names = (MODEL, LAYER, OPTIM) if files == "any" else (MODEL, LAYER)
    return any(any(n.match(f.name) for n in names) for f in p.iterdir())


def _tag_in(root: Path, marker: str) -> Path:
    """The tag folder a ``latest``-style marker names: one folder name inside ``root``."""
    raw = (root / marker).read_bytes()
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise NotACheckpoint(f"{root / marker}: not UTF-8 text ({raw[:40]!r})") from None
    problem = check_tag(tag)
    if problem:
        raise NotACheckpoint(
            f"{root / marker}: names the tag {tag[:80]!r}, which {problem}; a tag is one "
            "folder inside the checkpoint"
        )
    return root / tag


def open_checkpoint(path: str | Path, tag: str | None = None) -> DeepSpeedCheckpoint:
    """A checkpoint from its root (with ``latest``) or a tag folder; ``tag`` picks another."""
    path = Path(path)
    if not path.is_dir():
        raise NotACheckpoint(f"{path}: no such directory")
    root: Path | None = None
    folder = path
    if tag is not None:
        problem = check_tag(tag)
        if problem:
            raise NotACheckpoint(
                f"--tag {tag[:80]!r}: {problem}; a tag is one folder inside {path}"
            )
        root, folder = path, path / tag
    elif (path / LATEST).is_file():
        root, folder = path, _tag_in(path, LATEST)
    elif (path / LATEST_UNIVERSAL).is_file():
        root, folder = path, _tag_in(path, LATEST_UNIVERSAL)
    if not folder.is_dir():
        raise NotACheckpoint(f"{folder}: the tag folder does not exist")
    ckpt = DeepSpeedCheckpoint.scan(folder, root)
    if not ckpt.model_files:
        if root is None:  # not a DeepSpeed folder at all, perhaps: say what it is
            raise NotACheckpoint(f"{folder}: {unknown.describe(folder)}")
        raise NotACheckpoint(f"{folder}: no DeepSpeed *_model_states.pt files")
    return ckpt


# ------------------------------------------------------------------ infer


_DTYPES = {"fp32", "bf16", "fp16", "fp64", "int64", "int32", "int16", "int8", "uint8", "bool"}


def _dtype(ref: Any, what: str) -> str:
    if isinstance(ref, pt.TensorRef):
        return ref.dtype
    raise NotACheckpoint(f"{what} is not a tensor in the model states")


def _shape(s: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in s)


def _dims(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def _check_name(name: str, ckpt: DeepSpeedCheckpoint) -> str:
    return layout_tensor_name(name, ckpt.model_files[0])


def infer(ckpt: DeepSpeedCheckpoint, name: str | None = None) -> str:
    """The ``.layout`` text describing ``ckpt``, in canonical form (what ``layoutc infer``
    prints)."""
    return fmt(parse(infer_text(ckpt, name), f"{ckpt.folder}.layout"))


def infer_text(ckpt: DeepSpeedCheckpoint, name: str | None = None) -> str:
    """The ``.layout`` text describing ``ckpt``, as made: one statement a line, not laid
    out for reading (a run checks it once; :func:`infer` formats it)."""
    ms = ckpt.model_states
    dims = ms.get("checkpoint_parallel_dimensions") or {}
    tp, pp = int(dims.get("tp_degree", 1)), int(dims.get("pp_degree", 1))
    mp = int(ms.get("mp_world_size") or 1)
    if tp > 1 and not ckpt.layer_files and pp == 1:
        return _infer_autotp(ckpt, tp, name)
    if tp > 1 or (mp > 1 and not ckpt.layer_files):
        raise Unsupported(
            f"{ckpt.folder}: tensor-parallel checkpoint (tp = {tp}, pp = {pp}, {mp} model-parallel "
            "files) without DeepSpeed AutoTP's record of how each tensor is cut: infer cannot "
            "tell which dim each tensor is split on; declare the layout (e.g. [H, F / tp] for a "
            "row-parallel weight) and pass --spec" + _undeclared(ckpt)
        )
    if ckpt.layer_files:
        return _infer_pipeline(ckpt, pp, name)
    if ckpt.expert_files or ms.get("num_experts"):
        return _infer_moe(ckpt, name)
    param_shapes = ms.get("param_shapes")
    if not isinstance(param_shapes, list):
        raise Unsupported(
            f"{ckpt.model_files[0]}: no param_shapes (not a ZeRO checkpoint); ZeRO-0 is not inferred yet"
        )
    module: dict[str, Any] = ms.get("module") or {}
    opt = ckpt.optim_states
    if opt is not None and any(any(p) for p in opt.get("param_alignment_paddings") or []):
        raise Unsupported(
            f"{ckpt.optim_files[0]}: parameters are aligned inside the flat buffer "
            "(param_alignment_paddings); layoutc does not place that yet"
        )

    params = _trainable(ckpt, param_shapes)
    first = params[0][1] if params else None
    dtype = _dtype(module.get(first), first) if first else "fp32"
    lines = _header(ckpt, name, f"mesh {{ dp = {ckpt.dp} }}", dtype)
    lines += _optimizer_lines(ckpt, first)
    lines += _param_lines([(g, p, _dims(s)) for g, p, s in params], module, dtype)
    lines += _untrained_lines(ckpt, {p for _, p, _ in params}, dtype)
    store = "universal" if ckpt.universal else "deepspeed"
    lines.append(f'store {store} {{ tag "{ckpt.tag}" }}')
    text = "\n".join(lines) + "\n"
    return text


def _untrained_lines(
    ckpt: DeepSpeedCheckpoint, trained: set[str], dtype: str, aliases: dict[str, str] | None = None
) -> list[str]:
    """The model states' frozen parameters, persistent buffers and ties (``aliases``: more
    module entries that name another parameter), as entries."""
    ms = ckpt.model_states
    module: dict[str, Any] = ms.get("module") or {}
    shared: dict[str, str] = dict(ms.get("shared_params") or {})
    shared.update(aliases or {})
    buffer_names = list(ms.get("buffer_names") or [])
    frozen_shapes: dict[str, Any] = dict(ms.get("frozen_param_shapes") or {})
    frozen: list[tuple[str, tuple[int, ...], str]] = []
    known = trained | set(buffer_names) | set(shared)
    if frozen_shapes:
        fragments = ms.get("frozen_param_fragments") or {}
        for fname, shape in frozen_shapes.items():
            ref = module.get(fname, fragments.get(fname))
            frozen.append((_check_name(fname, ckpt), _shape(shape), _dtype(ref, fname)))
    elif not ckpt.zero3:
        # ZeRO-1 records no frozen parameters: they are the module's other entries
        for key, ref in module.items():
            if key not in known and isinstance(ref, pt.TensorRef):
                frozen.append((_check_name(key, ckpt), ref.shape, ref.dtype))
    lines = [_entry("frozen", f, s, d, dtype) for f, s, d in frozen]
    lines.extend(
        _entry("buffer", _check_name(b, ckpt), module[b].shape, module[b].dtype, dtype)
        for b in buffer_names
        if b in module
    )
    lines.extend(f"tie {alias} = {source}" for alias, source in shared.items())
    return lines


def _trainable(
    ckpt: DeepSpeedCheckpoint, param_shapes: list[Any]
) -> list[tuple[int, str, tuple[int, ...]]]:
    """``(param group, name, shape)`` of the trainable parameters, group by group in flat
    order. ZeRO-3 records param_shapes per sub-group; the optimizer's param groups list
    the sub-groups of each."""
    group_of = list(range(len(param_shapes)))
    opt = ckpt.optim_states
    if ckpt.zero3 and opt is not None:
        groups = (opt.get("optimizer_state_dict") or {}).get("param_groups") or []
        for g, pg in enumerate(groups):
            for s in pg.get("params", []):
                group_of[int(s)] = g
    return [
        (group_of[s], _check_name(pname, ckpt), _shape(shape))
        for s, shapes in enumerate(param_shapes)
        for pname, shape in shapes.items()
    ]


_EXPERTS = re.compile(r"^(.*\.deepspeed_moe\.experts\.deepspeed_experts)\.(\d+)\.(.+)$")


def _infer_moe(ckpt: DeepSpeedCheckpoint, name: str | None) -> str:
    """A native DeepSpeed MoE checkpoint (ZeRO-1/2): dense parameters in the model states,
    each expert of each MoE layer in its own file under its global id, expert param groups
    partitioned over the expert-data-parallel ranks. The model states list rank 0's experts
    under their local ids; the expert files say which MoE layer each belongs to."""
    ms = ckpt.model_states
    where = ckpt.model_files[0]
    if ms.get("ds_autoep_layers"):
        return _infer_autoep(ckpt, name)
    if ckpt.zero3:
        raise Unsupported(f"{where}: a mixture-of-experts checkpoint at ZeRO-3")
    if not ckpt.expert_files:
        raise NotACheckpoint(
            f"{ckpt.folder}: the model states name experts (num_experts) but the folder holds "
            "no layer_*_expert_*_mp_rank_*_model_states.pt files"
        )
    # which MoE layer each expert module is, from the files' own keys
    layer_of_module: dict[str, int | None] = {}
    dtypes: dict[str, str] = {}
    seen: set[tuple[int | None, int]] = set()
    held: dict[tuple[int | None, int], list[tuple[str, tuple[int, ...]]]] = {}  # (L, id) -> keys
    # DeepSpeed before 0.6 kept expert G of every layer in one expert_G_... file
    legacy = {EXPERT.match(p.name).group(1) is None for p in ckpt.expert_files}  # type: ignore[union-attr]
    if len(legacy) > 1:
        raise NotACheckpoint(f"{ckpt.folder}: both layer_L_expert_G and older expert_G files")
    if legacy == {True} and ckpt.expp_files:
        raise Unsupported(f"{ckpt.folder}: expert_G files (DeepSpeed before 0.6) without ZeRO")
    for path in ckpt.expert_files:
        m = EXPERT.match(path.name)
        assert m is not None
        layer, expert = (None if m.group(1) is None else int(m.group(1))), int(m.group(2))
        if int(m.group(3)) != 0:
            raise Unsupported(f"{path}: experts with model parallelism (mp_rank > 0)")
        seen.add((layer, expert))
        obj = ckpt.load(path)
        if not isinstance(obj, dict) or not obj:
            raise NotACheckpoint(f"{path}: not a dict of expert tensors")
        for key, ref in obj.items():
            km = _EXPERTS.match(str(key))
            if km is None or int(km.group(2)) != expert or not isinstance(ref, pt.TensorRef):
                raise NotACheckpoint(
                    f"{path}: holds {key!r}; an expert file holds expert {expert}'s tensors, "
                    f"named …deepspeed_moe.experts.deepspeed_experts.{expert}.<name>"
                )
            held.setdefault((layer, expert), []).append((str(key), ref.shape))
            if layer_of_module.setdefault(km.group(1), layer) != layer:
                raise NotACheckpoint(
                    f"{path}: {km.group(1)} is also in MoE layer {layer_of_module[km.group(1)]}"
                )
            dtypes[f"{km.group(1)}.{{e}}.{km.group(3)}"] = ref.dtype
    raw = ms.get("num_experts")
    counts = [int(n) for n in raw] if isinstance(raw, list) else []  # an int before 0.6
    if ckpt.expp_files:
        param_shapes, moe_groups, ep = _zero0_groups(ckpt, held)
    else:
        param_shapes, moe_groups, ep = _zero_groups(ckpt)
    module: dict[str, Any] = ms.get("module") or {}
    lines: list[str] = []
    dense = [
        _check_name(p, ckpt) for g, ps in enumerate(param_shapes) if g not in moe_groups for p in ps
    ]
    first = dense[0] if dense else None
    dense_dtype = _dtype(module.get(first), first) if first else None
    for g, shapes in enumerate(param_shapes):
        if g not in moe_groups:
            lines += _group(g, [f"tensor {p} {_dims(_shape(s))}" for p, s in shapes.items()])
            continue
        body = []
        runs: list[tuple[str, list[tuple[int, str, tuple[int, ...]]]]] = []
        for pname, shape in shapes.items():
            km = _EXPERTS.match(pname)
            if km is None:
                raise Unsupported(
                    f"{where}: {pname} is in expert param group {g} but is no native MoE expert"
                )
            module_name, local, rest = km.group(1), int(km.group(2)), km.group(3)
            if not runs or runs[-1][0] != module_name:
                runs.append((module_name, []))
            runs[-1][1].append((local, rest, _shape(shape)))
        for module_name, entries in runs:
            if module_name not in layer_of_module:
                raise NotACheckpoint(f"{ckpt.folder}: no expert file holds {module_name}")
            layer = layer_of_module[module_name]
            locals_ = sorted({lo for lo, _, _ in entries})
            per = [(r, s) for lo, r, s in entries if lo == 0]
            if locals_ != list(range(len(locals_))) or any(
                [(r, s) for lo, r, s in entries if lo == k] != per for k in locals_
            ):
                raise Unsupported(f"{where}: the experts of {module_name} differ in their tensors")
            count = len(locals_) * ep
            if layer is not None and layer < len(counts) and counts[layer] != count:
                raise NotACheckpoint(
                    f"{where}: num_experts says {counts[layer]} experts in MoE layer {layer}; "
                    f"{len(locals_)} per rank at ep = {ep} make {count}"
                )
            missing = [e for e in range(count) if (layer, e) not in seen]
            if missing:
                raise NotACheckpoint(
                    f"{ckpt.folder}: {expert_file_name(layer, missing[0], 0)} is missing "
                    f"({module_name}, {count} experts)"
                )
            inner = []
            for rest, shape in per:
                template = f"{module_name}.{{e}}.{rest}"
                _check_name(template.replace("{e}", "0"), ckpt)
                dt = dtypes.get(template)
                own = f" {dt}" if dt and dense_dtype and dt != dense_dtype else ""
                named = "" if layer is None else f" layer {layer}"
                inner.append(f"  tensor {template} {_dims(shape)}{own}{named}")
            body.append(f"for e in 0..{count} over ep {{")
            body += inner
            body.append("}")
        lines += _group(g, body)
    dtype = dense_dtype or "fp32"
    mesh = f"let dp = {ckpt.dp}\nmesh {{ edp = dp / ep, ep = {ep} }}"
    if ckpt.expp_files:  # a torch optimizer per expert-parallel rank
        state = _expp(ckpt, ckpt.expp_files[0])["state"]
        first_state: dict[str, Any] = (
            next(iter(state.values()), {}) if isinstance(state, dict) else {}
        )
        states = [k for k in first_state if k != "step"]
        step = "step" if "step" in first_state else "no_step"
        zero = [
            f"optimizer adam {{ master fp32, states ({', '.join(states)}), {step} }}",
            "zero 0 over (edp, ep)",
        ]
    else:
        zero = _optimizer_lines(ckpt, first, "(edp, ep)")
    out = _header(ckpt, name, mesh, dtype) + zero
    out += lines
    out += _untrained_lines(ckpt, set(dense), dtype)
    out.append(f'store deepspeed {{ tag "{ckpt.tag}" }}')
    return "\n".join(out) + "\n"


def _infer_autoep(ckpt: DeepSpeedCheckpoint, name: str | None) -> str:
    """A DeepSpeed AutoEP checkpoint at ZeRO 1/2: each MoE layer's experts fused in
    ``experts.w1/w2/w3`` tensors ``[E / ep, ...]`` (the rank's local experts, in the
    optimizer's expert group, partitioned over the expert-data-parallel ranks), stored
    one expert per file (``<name>.<G>`` in ``layer_L_expert_G``); ``ds_autoep_layers``
    says each layer's module, ordinal, expert count and ep."""
    ms = ckpt.model_states
    where = ckpt.model_files[0]
    layers = ms.get("ds_autoep_layers")
    if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        raise NotACheckpoint(f"{where}: `ds_autoep_layers` is not a list of dicts")
    formats = {str(x.get("checkpoint_format")) for x in layers}
    want = "zero3_partitioned" if ckpt.zero3 else "per_expert_files"
    if formats != {want}:
        raise Unsupported(
            f"{where}: AutoEP experts stored as {', '.join(sorted(formats))} in a "
            f"{'ZeRO-3' if ckpt.zero3 else 'ZeRO-1/2'} checkpoint, which stores them as {want}"
        )
    eps = {int(x.get("ep_size") or 0) for x in layers}
    if len(eps) != 1:
        raise Unsupported(f"{where}: AutoEP layers of several expert-parallel sizes {sorted(eps)}")
    ep = eps.pop()
    if ckpt.zero3:  # experts only in the ZeRO partitions: no expert files
        param_shapes, moe_groups, ep_files = _zero3_groups(ckpt)
    else:
        param_shapes, moe_groups, ep_files = _zero_groups(ckpt)
    if ep_files != ep:
        raise NotACheckpoint(
            f"{ckpt.optim_files[0]}: the expert groups' partition count makes ep = {ep_files}; "
            f"ds_autoep_layers says {ep}"
        )
    of_module = {f"{x.get('expert_key_prefix')}": x for x in layers}
    have = {p.name for p in ckpt.expert_files}
    module: dict[str, Any] = ms.get("module") or {}
    dense = [
        _check_name(p, ckpt) for g, ps in enumerate(param_shapes) if g not in moe_groups for p in ps
    ]
    first = dense[0] if dense else None
    dtype = _dtype(module.get(first), first) if first else "fp32"
    lines: list[str] = []
    for g, shapes in enumerate(param_shapes):
        body = []
        for pname, shape in shapes.items():
            pname = _check_name(pname, ckpt)
            dims = _shape(shape)
            if g not in moe_groups:
                body.append(f"tensor {pname} {_dims(dims)}")
                continue
            layer = of_module.get(pname.rsplit(".", 1)[0])
            if layer is None or not dims:
                raise NotACheckpoint(
                    f"{where}: {pname} is in the expert group but in no ds_autoep_layers entry"
                )
            count, lid = int(layer.get("num_experts") or 0), int(layer.get("moe_layer_id") or 0)
            if dims[0] * ep != count:
                raise NotACheckpoint(
                    f"{where}: {pname} holds {dims[0]} experts per rank; {count} experts at ep = {ep} "
                    f"make {count // max(ep, 1)}"
                )
            missing = [
                e
                for e in range(count)
                if expert_file_name(lid, e, 0) not in have and not ckpt.zero3
            ]
            if missing:
                raise NotACheckpoint(
                    f"{ckpt.folder}: {expert_file_name(lid, missing[0], 0)} is missing ({pname})"
                )
            body.append(
                f"tensor {pname} [{count} / ep, {', '.join(map(str, dims[1:]))}] layer {lid}"
            )
        lines += _group(g, body)
    mesh = f"let dp = {ckpt.dp}\nmesh {{ edp = dp / ep, ep = {ep} }}"
    out = _header(ckpt, name, mesh, dtype) + _optimizer_lines(ckpt, first, "(edp, ep)")
    # AutoEP names its router a second time, as the attribute the model had (`gate`):
    # <module>.gate.<rest> is <module>.router.<rest>
    aliases: dict[str, str] = {}
    for layer in layers:
        path = f"{layer.get('module_path')}."
        for key in module:
            head, _, rest = key[len(path) :].partition(".")
            source = f"{path}router.{rest}"
            if key.startswith(path) and head != "router" and source in dense:
                aliases[key] = source
    out += lines
    out += _untrained_lines(ckpt, set(dense), dtype, aliases)
    out.append(f'store {"universal" if ckpt.universal else "deepspeed"} {{ tag "{ckpt.tag}" }}')
    return "\n".join(out) + "\n"


# AutoEP presets whose Hugging Face model layout is known: the names of the fused expert
# tensors and how the checkpoint's w1/w2/w3 make them (transformers >= 5, where
# MixtralForCausalLM keeps its experts fused: gate_up_proj [E, 2F, H], down_proj [E, H, F])
HF_PRESETS = {"mixtral": {"router": "gate", "gate_up": "gate_up_proj", "down": "down_proj"}}


def infer_hf(ckpt: DeepSpeedCheckpoint, name: str | None = None) -> str:
    """The ``.layout`` of the Hugging Face model an AutoEP checkpoint was made from, every
    tensor taken ``from`` the checkpoint's: its router under the model's own name, each
    layer's experts fused as the model fuses them; stored as safetensors."""
    cfg = (ckpt.config.get("expert_parallel") or {}) if ckpt.config else {}
    preset = cfg.get("preset_model") if isinstance(cfg, dict) else None
    if not ckpt.model_states.get("ds_autoep_layers"):
        raise Unsupported(
            f"{ckpt.folder}: not an AutoEP checkpoint; its layout (layoutc infer) already "
            "names every tensor as the model does"
        )
    if preset not in HF_PRESETS:
        raise Unsupported(
            f"{ckpt.model_files[0]}: AutoEP preset {preset!r}, whose Hugging Face layout layoutc "
            f"does not know (it knows {', '.join(sorted(HF_PRESETS))}); write the target layout "
            "with `from` (docs/language.md)"
        )
    names = HF_PRESETS[preset]
    source = load_text(infer_text(ckpt, name), f"{ckpt.folder}.layout")
    experts = {
        str(layer.get("module_path")): str(layer.get("expert_key_prefix"))
        for layer in ckpt.model_states["ds_autoep_layers"]
    }
    lines = [
        f"# The Hugging Face layout of {ckpt.folder} (AutoEP preset {preset}), from its tensors.",
        f"layout {source.name}_hf",
        "mesh { dp = 1 }",
        "dtype fp32",
    ]
    for t in source.tensors:
        if t.dims and t.dims[0].split:  # fused experts: written with their layer's router
            continue
        path = next((m for m in experts if t.name == f"{m}.router.gate.weight"), None)
        if path is None:
            lines.append(f"tensor {t.name} {_dims(t.shape)}")
            continue
        lines.append(f"tensor {path}.{names['router']}.weight {_dims(t.shape)} from {t.name}")
        prefix = experts[path]
        w1, w2 = source.tensor(f"{prefix}.w1"), source.tensor(f"{prefix}.w2")
        count, ffn, hidden = w1.shape
        lines.append(
            f"tensor {prefix}.{names['gate_up']} [{count}, (gate: {ffn}, up: {ffn}), {hidden}] "
            f"from (gate: {prefix}.w1, up: {prefix}.w3)"
        )
        lines.append(f"tensor {prefix}.{names['down']} {_dims(w2.shape)} from {prefix}.w2")
    lines.append("store safetensors")
    return fmt(parse("\n".join(lines) + "\n", f"{ckpt.folder}.hf.layout"))


def _zero3_groups(ckpt: DeepSpeedCheckpoint) -> tuple[list[Any], list[int], int]:
    """ZeRO-3 MoE: ``param_shapes`` lists each optimizer sub-group; the param groups name
    their sub-groups; ``ds_zero_partition_groups`` says over how many ranks each
    sub-group is partitioned, which for the experts' is dp / ep."""
    param_shapes = ckpt.model_states.get("param_shapes")
    opt = ckpt.optim_states or {}
    inner = opt.get("optimizer_state_dict")
    parts = opt.get("ds_zero_partition_groups")
    where = ckpt.optim_files[0] if ckpt.optim_files else ckpt.folder
    if (
        not isinstance(param_shapes, list)
        or not isinstance(inner, dict)
        or not isinstance(parts, list)
    ):
        raise NotACheckpoint(
            f"{where}: a ZeRO-3 MoE checkpoint without param_shapes, param groups and "
            "ds_zero_partition_groups"
        )
    groups = inner.get("param_groups") or []
    merged: list[dict[str, Any]] = []
    for pg in groups:
        shapes: dict[str, Any] = {}
        for sub in pg.get("params") or []:
            if not (isinstance(sub, int) and 0 <= sub < len(param_shapes)):
                raise NotACheckpoint(f"{where}: a param group names sub-group {sub!r}")
            shapes.update(param_shapes[sub])
        merged.append(shapes)
    moe_groups = [g for g, pg in enumerate(groups) if pg.get("moe")]
    counts = {
        int(p.get("partition_count") or 0)
        for g in moe_groups
        for sub in groups[g].get("params") or []
        for p in parts
        if isinstance(p, dict) and p.get("sub_group") == sub
    }
    if len(counts) != 1 or not counts or ckpt.dp % max(counts):
        raise Unsupported(
            f"{where}: expert sub-groups partitioned {sorted(counts)} ways at dp = {ckpt.dp}"
        )
    return merged, moe_groups, ckpt.dp // counts.pop()


def _zero_groups(ckpt: DeepSpeedCheckpoint) -> tuple[list[Any], list[int], int]:
    """ZeRO-1/2 MoE: the param groups of the model states' ``param_shapes`` (rank 0's
    experts), which of them hold experts, and ep: the data-parallel size over the expert
    groups' partition count."""
    param_shapes = ckpt.model_states.get("param_shapes")
    opt = ckpt.optim_states
    where = ckpt.model_files[0]
    if not isinstance(param_shapes, list) or opt is None:
        raise NotACheckpoint(
            f"{where}: an MoE checkpoint with neither ZeRO partitions (param_shapes and "
            "*_optim_states.pt files) nor ZeRO-0's expp_rank_*_optim_states.pt files"
        )
    # a universal checkpoint keeps the param groups whole, beside the source's counts
    groups = (opt.get("base_optimizer_state") or {}).get("param_groups") or opt.get("param_groups")
    groups = groups if isinstance(groups, list) else []
    parts = [int(x) for x in opt.get("partition_count") or []]
    moe_groups = [g for g, pg in enumerate(groups) if isinstance(pg, dict) and pg.get("moe")]
    where = ckpt.optim_files[0] if ckpt.optim_files else ckpt.folder / ckpt.UNIVERSAL_OPTIMIZER
    if not moe_groups or len(parts) != len(groups):
        raise NotACheckpoint(
            f"{where}: no expert param groups ('moe': True) with a partition count"
        )
    edp = parts[moe_groups[0]]
    if any(parts[g] != edp for g in moe_groups) or ckpt.dp % edp:
        raise Unsupported(
            f"{where}: expert groups partitioned {[parts[g] for g in moe_groups]} "
            f"ways at dp = {ckpt.dp}: experts of several expert-parallel sizes"
        )
    return param_shapes, moe_groups, ckpt.dp // edp


def _expp(ckpt: DeepSpeedCheckpoint, path: Path) -> dict[str, Any]:
    """The torch optimizer state dict of an ``expp_rank`` file."""
    obj = ckpt.load(path)
    inner = obj.get("optimizer") if isinstance(obj, dict) else None
    if not isinstance(inner, dict) or not isinstance(inner.get("param_groups"), list):
        raise NotACheckpoint(f"{path}: no torch optimizer state under `optimizer`")
    return inner


MAX_ORDERINGS = 4_000_000  # states of the search that matches parameters to their groups


def _zero0_groups(
    ckpt: DeepSpeedCheckpoint,
    held: dict[tuple[int | None, int], list[tuple[str, tuple[int, ...]]]],
) -> tuple[list[Any], list[int], int]:
    """ZeRO-0 MoE: a torch optimizer per expert-parallel rank, whose state names no
    parameter. Each param group holds its parameters in model order, so which parameter is
    which follows from the model's order (the model states' ``module`` for dense ones,
    expert 0..n of each MoE layer's files for rank 0's experts) and each state's shape —
    where exactly one assignment fits; otherwise the layout must be declared."""
    ep = len(ckpt.expp_files)
    inner = _expp(ckpt, ckpt.expp_files[0])
    groups, state = inner["param_groups"], inner.get("state") or {}
    moe_groups = [g for g, pg in enumerate(groups) if isinstance(pg, dict) and pg.get("moe")]
    names = {g.get("name") for g in (groups[i] for i in moe_groups)}
    if names - {f"ep_size_{ep}"}:
        raise NotACheckpoint(
            f"{ckpt.expp_files[0]}: expert groups named {sorted(map(str, names))} with "
            f"{ep} expp_rank files"
        )

    def shapes(g: int) -> list[tuple[int, ...]]:
        out = []
        for i in groups[g].get("params") or []:
            ref = (state.get(i) or {}).get("exp_avg")
            if not isinstance(ref, pt.TensorRef):
                raise NotACheckpoint(f"{ckpt.expp_files[0]}: param {i} has no exp_avg state")
            out.append(tuple(ref.shape))
        return out

    ms = ckpt.model_states
    module: dict[str, Any] = ms.get("module") or {}
    buffers = set(ms.get("buffer_names") or [])
    dense = [
        (k, tuple(v.shape))
        for k, v in module.items()
        if k not in buffers and isinstance(v, pt.TensorRef)
    ]
    per_layer: dict[int | None, int] = {}
    for layer, _ in held:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    experts = [
        kv
        for layer in sorted(per_layer, key=lambda x: -1 if x is None else x)
        for e in range(per_layer[layer] // ep)
        for kv in held[layer, e]
    ]
    out: list[Any] = [None] * len(groups)
    for kind, model in (("dense", dense), ("expert", experts)):
        which = [g for g in range(len(groups)) if (g in moe_groups) == (kind == "expert")]
        assigned = _assign(model, [shapes(g) for g in which])
        if assigned is None:
            raise Unsupported(
                f"{ckpt.expp_files[0]}: a ZeRO-0 optimizer's state names no parameter, and "
                f"more than one way (or none) fits its {kind} param groups to the model's "
                "parameters by order and shape: declare the layout (layoutc infer of a "
                "ZeRO-1 checkpoint of the model shows its form) and pass --spec"
            )
        for g, members in zip(which, assigned, strict=True):
            out[g] = dict(members)
    return out, moe_groups, ep


def _assign(
    model: list[tuple[str, tuple[int, ...]]], groups: list[list[tuple[int, ...]]]
) -> list[list[tuple[str, tuple[int, ...]]]] | None:
    """The one way to deal ``model``'s parameters (in order) into ``groups`` (each a list of
    shapes, in order) with every group in model order and every shape matching; None
    where none or several fit. A breadth-first walk over how far each group has got,
    counting the ways to each point (capped at 2) and the step that made a unique one."""
    if sum(map(len, groups)) != len(model):
        return None
    start = (0,) * len(groups)
    layer: dict[tuple[int, ...], int] = {start: 1}
    came: dict[tuple[int, ...], tuple[tuple[int, ...], int]] = {}
    seen = 0
    for _, shape in model:
        nxt: dict[tuple[int, ...], int] = {}
        for pos, ways in layer.items():
            for g, group in enumerate(groups):
                if pos[g] < len(group) and group[pos[g]] == shape:
                    step = (*pos[:g], pos[g] + 1, *pos[g + 1 :])
                    nxt[step] = min(2, nxt.get(step, 0) + ways)
                    came[step] = (pos, g)
        seen += len(nxt)
        if not nxt or seen > MAX_ORDERINGS:
            return None
        layer = nxt
    (end, ways), *more = layer.items()
    if more or ways != 1:
        return None
    out: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in groups]
    pos = end
    for param in reversed(model):  # one way in: each point on it was reached once
        pos, g = came[pos]
        out[g].append(param)
    return [list(reversed(members)) for members in out]


def _infer_autotp(ckpt: DeepSpeedCheckpoint, tp: int, name: str | None) -> str:
    """An AutoTP checkpoint (ZeRO-1/2, no pipeline): one ``mp_rank`` file per tp rank, each
    holding DeepSpeed's affine map of every parameter's cut, which becomes the dims."""
    if len(ckpt.model_files) != tp * (ckpt.dp if ckpt.zero3 else 1):
        raise NotACheckpoint(
            f"{ckpt.folder}: {len(ckpt.model_files)} model-states files for tp = {tp}, dp = {ckpt.dp}"
        )
    ms = ckpt.model_states
    info = ms.get(autotp.INFO) or {}
    amap = (info.get("affine_map") or {}).get("params") if isinstance(info, dict) else None
    if not isinstance(amap, dict):
        raise Unsupported(
            f"{ckpt.model_files[0]}: a tensor-parallel checkpoint without AutoTP's affine map "
            f"({autotp.INFO}): infer cannot tell which dim each tensor is split on; declare the "
            "layout and pass --spec"
        )
    odd = info.get("parameter_with_sub_params") or info.get("autotp_unsupported_parameter_patterns")
    if odd:
        raise Unsupported(
            f"{ckpt.model_files[0]}: AutoTP cut some parameters in fused sub-parameters ({odd}); "
            "declare their blocks in a layout and pass --spec"
        )
    param_shapes = ms.get("param_shapes")
    if not isinstance(param_shapes, list):
        raise Unsupported(f"{ckpt.model_files[0]}: no param_shapes (not a ZeRO checkpoint)")
    module: dict[str, Any] = ms.get("module") or {}
    grain_size = int((ckpt.config.get("tensor_parallel") or {}).get("tp_grain_size", 1) or 1)
    entry_of: dict[str, Any] = {}  # the first pattern that names a tensor describes it
    for pattern, names in autotp.matches(amap, list(module)).items():
        for n in names:
            entry_of.setdefault(n, amap[pattern])
    even: list[str] = []  # cut evenly here, by a grain the files do not record

    def dims(pname: str) -> str:
        entry = entry_of.get(pname)
        if entry is None:
            raise Unsupported(
                f"{ckpt.model_files[0]}: AutoTP's affine map does not describe {pname}; declare "
                "the layout and pass --spec"
            )
        try:
            shape, dim, sizes = autotp.split_of(pname, entry, tp)
        except ValueError as e:
            raise Unsupported(f"{ckpt.model_files[0]}: {e}") from None
        out = [str(n) for n in shape]
        if dim is not None:
            grain = autotp.grain_of(shape[dim], sizes, grain_size, autotp.uses_grain_size(pname))
            if grain is None:
                raise Unsupported(
                    f"{ckpt.model_files[0]}: {pname} is cut {sizes} along dim {dim} of "
                    f"{list(shape)}, in no whole grains; declare the layout and pass --spec"
                )
            out[dim] = autotp.dim_text(shape[dim], grain, "tp")
            if grain == 0:
                even.append(pname)
        return "[" + ", ".join(out) + "]"

    params = [(g, p) for g, p, _ in _trainable(ckpt, param_shapes)]
    known = {p for _, p in params} | set(ms.get("buffer_names") or [])
    first = params[0][1] if params else None
    dtype = _dtype(module.get(first), first) if first else "fp32"
    body = _param_lines([(g, p, dims(p)) for g, p in params], module, dtype)
    shared = ms.get("shared_params") or {}
    for key, ref in module.items():  # the module's other parameters are frozen
        if key not in known and key not in shared and isinstance(ref, pt.TensorRef):
            body.append(f"frozen {_check_name(key, ckpt)} {dims(key)}")
    for b in ms.get("buffer_names") or []:
        if b in module:
            body.append(
                _entry("buffer", _check_name(b, ckpt), module[b].shape, module[b].dtype, dtype)
            )
    body.extend(f"tie {alias} = {source}" for alias, source in shared.items())
    lines = _header(ckpt, name, f"mesh {{ dp = {ckpt.dp}, tp = {tp} }}", dtype)
    if even:
        lines.append(
            "# AutoTP cuts attention rows in whole key/value-head groups: where such a dim is "
            f"cut evenly here (N / tp; {len(even)} tensors, e.g. {even[0]}), another tp may "
            "cut it unevenly; declare grains(N, N / num_key_value_heads) / tp to change tp "
            "(docs/language.md)"
        )
    lines += _optimizer_lines(ckpt, first)
    lines += [*body, f'store deepspeed {{ tag "{ckpt.tag}" }}']
    return "\n".join(lines) + "\n"


def _undeclared(ckpt: DeepSpeedCheckpoint, shown: int = 12) -> str:
    """What a tensor-parallel pipeline's layer files hold, tensor by tensor: each tp rank's
    shape, for the declarations the files leave out."""
    shapes: dict[str, dict[int, tuple[int, ...]]] = {}
    for path in ckpt.layer_files:
        m = LAYER.match(path.name)
        assert m is not None
        obj = ckpt.load(path)
        if not isinstance(obj, dict):
            continue
        for key, ref in obj.items():
            if isinstance(ref, pt.TensorRef):
                shapes.setdefault(f"{int(m.group(1))}.{key}", {})[int(m.group(2) or 0)] = ref.shape
    if not shapes:
        return ""
    lines = []
    for name, per_rank in list(shapes.items())[:shown]:
        seen = sorted(set(per_rank.values()))
        what = (
            f"{_dims(seen[0])} on each of {len(per_rank)} tp ranks (replicated, or split evenly)"
            if len(seen) == 1
            else ", ".join(f"tp {r}: {_dims(s)}" for r, s in sorted(per_rank.items()))
        )
        lines.append(f"\n  {name}: {what}")
    more = len(shapes) - shown
    return (
        f"\nthe {len(shapes)} tensors of its layer files, as stored (a tied module's under its "
        "first layer):" + "".join(lines) + (f"\n  ... and {more} more" if more > 0 else "")
    )


def _zero_stage(ckpt: DeepSpeedCheckpoint) -> tuple[int, str]:
    """The ZeRO stage, and ``bf16_optimizer`` for DeepSpeed's BF16_Optimizer."""
    opt = ckpt.optim_states
    if ckpt.zero3:
        return 3, ""
    if opt is not None and "zero_stage" in opt:
        z = opt["zero_stage"]
        return (int(z.args[0]) if isinstance(z, pt.Record) and z.args else int(z)), ""
    if opt is not None:
        stage = int((ckpt.config.get("zero_optimization") or {}).get("stage", 1) or 0)
        return stage, "bf16_optimizer" if stage >= 1 else ""
    return 0, ""


def _first_state(ckpt: DeepSpeedCheckpoint, first: str | None) -> dict[str, Any]:
    """One parameter's optimizer state (its keys name the states): the first flat group's,
    or the first parameter's universal files; empty when nothing is trainable."""
    opt = ckpt.optim_states or {}
    if ckpt.universal:
        return _universal_states(ckpt, first) if first else {}
    inner = opt.get("optimizer_state_dict") if ckpt.zero3 else opt.get("base_optimizer_state")
    state: dict[str, Any] = (
        (inner or {}).get("state", {}).get(0, {}) if isinstance(inner, dict) else {}
    )
    return state


def _header(ckpt: DeepSpeedCheckpoint, name: str | None, mesh: str, dtype: str) -> list[str]:
    name = name or re.sub(r"[^A-Za-z0-9_]", "_", ckpt.tag or "") or "checkpoint"
    if name[0].isdigit():
        name = "ckpt_" + name
    version = ckpt.model_states.get("ds_version", "?")
    return [
        f"# Inferred from {ckpt.folder} (DeepSpeed {version}, tag {ckpt.tag}).",
        f"layout {name}",
        mesh,
        f"dtype {dtype}",
    ]


def _optimizer_lines(ckpt: DeepSpeedCheckpoint, first: str | None, over: str = "dp") -> list[str]:
    """``optimizer`` and ``zero`` statements (none without optimizer files); the state
    names are read from ``first``, the first trainable parameter; ZeRO partitions ``over``
    these axes."""
    if ckpt.optim_states is None:
        return []
    first_state = _first_state(ckpt, first)
    stage, variant = _zero_stage(ckpt)
    zcfg = ckpt.config.get("zero_optimization") or {}
    states = [k for k in first_state if k != "step"]
    if first_state:
        opts = [f"states ({', '.join(states)})" if len(states) != 1 else f"states {states[0]}"]
        opts.append("step" if "step" in first_state else "no_step")
        lines = [f"optimizer adam {{ master fp32, {', '.join(opts)} }}"]
    else:  # no trainable parameter, so no state to read the names from
        lines = ["optimizer adam"]
    zopts = []
    if stage == 3:
        zopts.append(f"sub_group {int(zcfg.get('sub_group_size', 1_000_000_000))}")
    if variant:
        zopts.append(variant)
    lines.append(f"zero {stage} over {over}" + (f" {{ {', '.join(zopts)} }}" if zopts else ""))
    return lines


def _param_lines(
    params: list[tuple[int, str, str]], module: dict[str, Any], dtype: str
) -> list[str]:
    """``tensor`` entries of ``(param group, name, dims text)``, group by group."""
    lines: list[str] = []
    for g in sorted({g for g, _, _ in params}):
        body = [
            f"tensor {p} {d}" + (f" {module[p].dtype}" if _own_dtype(module, p, dtype) else "")
            for gg, p, d in params
            if gg == g
        ]
        lines += _group(g, body)
    return lines


def _group(g: int, body: list[str]) -> list[str]:
    """Entries of param group ``g``: the first at the top level, others in a group block."""
    return body if g == 0 else [f"group group{g} {{", *("  " + b for b in body), "}"]


def _entry(kind: str, name: str, shape: tuple[int, ...], dtype: str, default: str) -> str:
    return f"{kind} {name} {_dims(shape)}" + (f" {dtype}" if dtype != default else "")


def _infer_pipeline(ckpt: DeepSpeedCheckpoint, pp: int, name: str | None) -> str:
    """A ``PipelineModule`` checkpoint (tp = 1): one ``mp_rank`` file per stage, weights in
    ``layer_XX`` files, the tied modules (``tied_modules.<key>.<param>``) on every stage that
    uses them, stored once in the file of their first layer."""
    stages = [ckpt.model_states_of(p) for p in ckpt.model_files]
    if len(stages) != pp:
        raise Unsupported(
            f"{ckpt.folder}: {len(stages)} mp_rank files for pp = {pp}; with tensor parallelism "
            "inside a pipeline, infer cannot tell the slices apart yet: write the layout by hand"
        )
    layers: dict[int, dict[str, Any]] = {}
    for path in ckpt.layer_files:
        m = LAYER.match(path.name)
        assert m is not None
        if m.group(2) is not None:  # even -model_00: which tensors are split is not recorded
            raise Unsupported(
                f"{path}: a model-parallel layer file; infer reads pipelines without a "
                "model-parallel axis: write the layout with its tp axis and pass --spec"
            )
        obj = ckpt.load(path)
        if not isinstance(obj, dict):
            raise NotACheckpoint(f"{path}: not a layer state dict")
        layers[int(m.group(1))] = obj
    shapes = [st.get("param_shapes") for st in stages]
    if not all(isinstance(s, list) for s in shapes):
        raise Unsupported(
            f"{ckpt.model_files[0]}: a ZeRO-0 pipeline checkpoint records neither parameter names "
            "nor which layers each stage holds (only the optimizer's state by position), so "
            "infer cannot prove its layout; declare it and pass --spec (docs/converting.md)"
        )
    # trainable parameters: per stage, group by group in flat order
    order: list[str] = []
    info: dict[str, tuple[int, tuple[int, ...], list[int]]] = {}  # group, shape, stages
    numbering = _stage_groups(ckpt, [len(g or []) for g in shapes])
    for s, groups in enumerate(shapes):
        assert isinstance(groups, list)
        for local, group in enumerate(groups):
            g = numbering[s][local]
            for pname, shape in group.items():
                pname = _check_name(pname, ckpt)
                if pname in info:
                    info[pname][2].append(s)
                    if info[pname][0] != g:
                        raise Unsupported(
                            f"{pname}: in param group {info[pname][0]} on one stage, {g} on another"
                        )
                else:
                    info[pname] = (g, _shape(shape), [s])
                    order.append(pname)
    for s, groups in enumerate(shapes):
        assert isinstance(groups, list)
        for local, group in enumerate(groups):
            g = numbering[s][local]
            mine = [p for p in order if info[p][0] == g and s in info[p][2]]
            if mine != list(group):
                raise Unsupported(
                    f"{ckpt.model_files[s]}: the stages order their shared parameters differently; "
                    "write the layout by hand"
                )
    # which stage holds each layer: the stage of its parameters and buffers
    layer_stage: dict[int, int] = {}
    buffers: list[tuple[str, int]] = []
    for s, st in enumerate(stages):
        names = [p for p in order if s in info[p][2]] + list(st.get("buffer_names") or [])
        for n in names:
            if (lk := layer_of(n)) is not None:
                layer_stage.setdefault(lk[0], s)
        buffers.extend((b, s) for b in st.get("buffer_names") or [])
    # tied modules: the layer file that holds them under their own key
    where = {p: lk for p in order if (lk := layer_of(p)) is not None}  # name -> (layer, key)
    for p in order:
        if p in where:
            continue
        key = tied_key(p)
        if key is None:
            raise Unsupported(
                f"{ckpt.model_files[0]}: {p} neither starts with a layer index nor is a tied module"
            )
        owned = {layer for layer, _ in where.values()}
        found = [
            layer
            for layer, obj in sorted(layers.items())
            if key in obj and layer not in owned and _shape(obj[key].shape) == info[p][1]
        ]
        if len(found) != 1:
            raise Unsupported(
                f"{ckpt.folder}: {p} is stored in {len(found)} layer files "
                f"({', '.join(f'layer_{x:02d}' for x in found) or 'none'}); infer handles a tied "
                "module stored once"
            )
        where[p] = (found[0], key)
    known = set(where.values()) | {lk for b, _ in buffers if (lk := layer_of(b)) is not None}
    frozen: list[tuple[str, int]] = []
    for layer, obj in sorted(layers.items()):
        for key in obj:
            if (layer, key) not in known:
                if layer not in layer_stage:
                    raise Unsupported(
                        f"layer_{layer:02d}: holds only frozen parameters; infer cannot tell its stage"
                    )
                frozen.append((f"{layer}.{key}", layer_stage[layer]))

    def ref(n: str) -> Any:
        found = where.get(n) or layer_of(n)
        assert found is not None, n  # every name here is a tied module's or <layer>.<key>
        return layers[found[0]][found[1]]

    dtype = ref(order[0]).dtype if order else "fp32"
    lines = _header(ckpt, name, f"mesh {{ pp = {pp}, dp = {ckpt.dp} }}", dtype)
    lines.append("pipeline over pp")
    lines += _optimizer_lines(ckpt, order[0] if order else None)

    def placed(n: str, owner: list[int]) -> str:
        where_ = (
            f" stage {owner[0]}" if len(owner) == 1 else f" stage ({', '.join(map(str, owner))})"
        )
        if layer_of(n) is None:
            where_ += f" layer {where[n][0]}"
        return where_

    for g in sorted({info[p][0] for p in order}):
        body = [
            _entry("tensor", p, info[p][1], ref(p).dtype, dtype) + placed(p, info[p][2])
            for p in order
            if info[p][0] == g
        ]
        lines.extend(_group(g, body))
    for f, s in frozen:
        r = ref(f)
        lines.append(_entry("frozen", f, _shape(r.shape), r.dtype, dtype) + f" stage {s}")
    for b, s in buffers:
        r = ref(b)
        lines.append(_entry("buffer", b, _shape(r.shape), r.dtype, dtype) + f" stage {s}")
    store = "universal" if ckpt.universal else "deepspeed"
    lines.append(f'store {store} {{ tag "{ckpt.tag}" }}')
    return "\n".join(lines) + "\n"


def _stage_groups(ckpt: DeepSpeedCheckpoint, counts: list[int]) -> list[list[int]]:
    """The layout's group number of each stage's param groups. DeepSpeed numbers a stage's
    non-empty groups from 0 and records no names; when the stages hold different numbers
    of groups, each stage's groups are matched in order with earlier stages' groups of the
    same hyperparameters (each stage's first optimizer file), or become groups of their own."""
    if len(set(counts)) == 1:
        return [list(range(n)) for n in counts]
    saved: list[list[dict[str, Any]]] = []
    for s, n in enumerate(counts):
        files = [p for p in ckpt.optim_files if (m := OPTIM.match(p.name)) and int(m.group(3)) == s]
        inner = (ckpt.load(files[0]).get("optimizer_state_dict") or {}) if files else {}
        groups = (inner.get("base_optimizer_state") or {}).get("param_groups") or []
        if len(groups) != n:
            raise Unsupported(
                f"{ckpt.folder}: stage {s} has {n} param groups and no optimizer file that "
                "names their hyperparameters; infer cannot match them with the other stages'"
            )
        saved.append([{k: v for k, v in g.items() if k != "params"} for g in groups])
    known: list[dict[str, Any]] = []
    out: list[list[int]] = []
    for groups in saved:
        numbers: list[int] = []
        for hp in groups:
            after = numbers[-1] + 1 if numbers else 0
            match = next((i for i in range(after, len(known)) if known[i] == hp), None)
            if match is None:  # a group of its own (stages may order alike groups apart)
                known.append(hp)
                match = len(known) - 1
            numbers.append(match)
        out.append(numbers)
    return out


def _universal_states(ckpt: DeepSpeedCheckpoint, param: str) -> dict[str, bool]:
    """The optimizer states a universal checkpoint keeps per parameter, in Adam's order
    (``fp32.pt`` is the master; the others are named for their state)."""
    folder = ckpt.folder / "zero" / param
    master = folder / "fp32.pt"
    if master.is_file() and not isinstance(ckpt.load(master), dict):
        raise Unsupported(
            f"{master}: a bare tensor, not a dict with `param` — what ds_to_universal writes "
            "for ZeRO-3 (flattened, without step.pt); layoutc reads universal checkpoints that "
            "keep each state's shape under `param`"
        )
    found = {p.stem for p in folder.glob("*.pt")} - {"fp32"}
    order = ["exp_avg", "exp_avg_sq"]
    names = [s for s in order if s in found] + sorted(found - {*order, "step"})
    return dict.fromkeys([*names, *(["step"] if "step" in found else [])], True)


def _own_dtype(module: dict[str, Any], name: str, default: str) -> bool:
    ref = module.get(name)
    return isinstance(ref, pt.TensorRef) and ref.dtype != default and ref.numel > 0
