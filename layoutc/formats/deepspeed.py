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
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from layoutc.errors import LayoutcError, Unsupported
from layoutc.formats import pt

MODEL = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_?optim_states\.pt$")
LAYER = re.compile(r"^layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")
_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


class NotACheckpoint(LayoutcError):
    """The path holds no DeepSpeed checkpoint."""


@dataclass
class DeepSpeedCheckpoint:
    folder: Path  # the tag folder
    tag: str
    root: Path | None  # the folder holding `latest`, if any
    model_files: list[Path] = field(default_factory=list)
    optim_files: list[Path] = field(default_factory=list)
    layer_files: list[Path] = field(default_factory=list)
    universal: bool = False  # DeepSpeed's universal format: zero/<param>/<state>.pt

    UNIVERSAL_OPTIMIZER = "zero/optimizer_state.pt"

    @cached_property
    def model_states(self) -> dict[str, Any]:
        """The first model-states file (metadata; tensors stay unread)."""
        obj = pt.load(self.model_files[0])
        if not isinstance(obj, dict):
            raise NotACheckpoint(f"{self.model_files[0]}: not a DeepSpeed model-states dict")
        return obj

    @cached_property
    def optim_states(self) -> dict[str, Any] | None:
        if self.universal:  # the optimizer's scalars and param groups, without partitions
            path = self.folder / self.UNIVERSAL_OPTIMIZER
            if not path.is_file():
                return None
            universal = pt.load(path)
            if not isinstance(universal, dict):
                raise NotACheckpoint(f"{path}: not an optimizer state dict")
            return universal
        if not self.optim_files:
            return None
        obj = pt.load(self.optim_files[0])
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


def open_checkpoint(path: str | Path, tag: str | None = None) -> DeepSpeedCheckpoint:
    """A checkpoint from its root (with ``latest``) or a tag folder; ``tag`` picks another."""
    path = Path(path)
    if not path.is_dir():
        raise NotACheckpoint(f"{path}: no such directory")
    root: Path | None = None
    folder = path
    if tag is not None:
        root, folder = path, path / tag
    elif (path / "latest").is_file():
        root = path
        folder = path / (path / "latest").read_text().strip()
    elif (path / "latest_universal").is_file():
        root = path
        folder = path / (path / "latest_universal").read_text().strip()
    if not folder.is_dir():
        raise NotACheckpoint(f"{folder}: the tag folder does not exist")
    ckpt = DeepSpeedCheckpoint(folder, folder.name, root)
    for p in sorted(folder.iterdir()):
        if MODEL.match(p.name):
            ckpt.model_files.append(p)
        elif OPTIM.match(p.name):
            ckpt.optim_files.append(p)
        elif LAYER.match(p.name):
            ckpt.layer_files.append(p)
    if not ckpt.model_files:
        hint = "" if root else " (give the checkpoint root holding `latest`, or a tag folder)"
        raise NotACheckpoint(f"{folder}: no DeepSpeed *_model_states.pt files{hint}")
    ckpt.universal = not ckpt.optim_files and (folder / "zero").is_dir()
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
    if not _NAME.match(name):
        raise Unsupported(
            f"{ckpt.model_files[0]}: the tensor name {name!r} has characters a layout name cannot hold "
            "(letters, digits, _ and . only)"
        )
    return name


def infer(ckpt: DeepSpeedCheckpoint, name: str | None = None) -> str:
    """The ``.layout`` text describing ``ckpt`` (canonical form)."""
    from layoutc.lang.fmt import fmt
    from layoutc.lang.parse import parse

    ms = ckpt.model_states
    dims = ms.get("checkpoint_parallel_dimensions") or {}
    tp, pp = int(dims.get("tp_degree", 1)), int(dims.get("pp_degree", 1))
    mp = int(ms.get("mp_world_size") or 1)
    if tp > 1 or pp > 1 or mp > 1 or ckpt.layer_files:
        raise Unsupported(
            f"{ckpt.folder}: tensor/pipeline-parallel checkpoint (tp = {tp}, pp = {pp}, {mp} model-parallel "
            "files): infer reads data-parallel checkpoints only for now; write its layout by hand"
        )
    param_shapes = ms.get("param_shapes")
    if not isinstance(param_shapes, list):
        raise Unsupported(
            f"{ckpt.model_files[0]}: no param_shapes (not a ZeRO checkpoint); ZeRO-0 is not inferred yet"
        )
    module: dict[str, Any] = ms.get("module") or {}
    shared: dict[str, str] = dict(ms.get("shared_params") or {})
    buffer_names = list(ms.get("buffer_names") or [])
    frozen_shapes: dict[str, Any] = dict(ms.get("frozen_param_shapes") or {})
    opt = ckpt.optim_states
    cfg = ckpt.config
    zcfg = cfg.get("zero_optimization") or {}

    # ZeRO stage and variant
    if ckpt.zero3:
        stage, variant = 3, ""
    elif opt is not None and "zero_stage" in opt:
        z = opt["zero_stage"]
        stage = int(z.args[0]) if isinstance(z, pt.Record) and z.args else int(z)
        variant = ""
    elif opt is not None:
        stage = int(zcfg.get("stage", 1) or 0)
        variant = "bf16_optimizer" if stage >= 1 else ""
    else:
        stage, variant = 0, ""
    if opt is not None and any(any(p) for p in opt.get("param_alignment_paddings") or []):
        raise Unsupported(
            f"{ckpt.optim_files[0]}: parameters are aligned inside the flat buffer "
            "(param_alignment_paddings); layoutc does not place that yet"
        )

    # the trainable parameters, group by group, in flat order
    # ZeRO-3 records param_shapes per sub-group; the optimizer's param groups list them
    group_of = list(range(len(param_shapes)))
    if ckpt.zero3 and opt is not None:
        groups = (opt.get("optimizer_state_dict") or {}).get("param_groups") or []
        for g, pg in enumerate(groups):
            for s in pg.get("params", []):
                group_of[int(s)] = g
    params: list[tuple[int, str, tuple[int, ...]]] = []
    for s, shapes in enumerate(param_shapes):
        for pname, shape in shapes.items():
            params.append((group_of[s], _check_name(pname, ckpt), _shape(shape)))
    first = params[0][1] if params else None
    dtype = _dtype(module.get(first), first) if first else "fp32"

    frozen: list[tuple[str, tuple[int, ...], str]] = []
    known = {p for _, p, _ in params} | set(buffer_names) | set(shared)
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
    buffers = [
        (_check_name(b, ckpt), module[b].shape, module[b].dtype)
        for b in buffer_names
        if b in module
    ]

    # the optimizer
    states: list[str] = []
    step = False
    if opt is not None and ckpt.universal:
        first_state = _universal_states(ckpt, params[0][1]) if params else {}
        states = [k for k in first_state if k != "step"]
        step = "step" in first_state
    elif opt is not None:
        inner = opt.get("optimizer_state_dict") if ckpt.zero3 else opt.get("base_optimizer_state")
        first_state = (inner or {}).get("state", {}).get(0, {}) if isinstance(inner, dict) else {}
        states = [k for k in first_state if k != "step"]
        step = "step" in first_state
    name = name or re.sub(r"[^A-Za-z0-9_]", "_", ckpt.tag) or "checkpoint"
    if name[0].isdigit():
        name = "ckpt_" + name

    lines = [
        f"# Inferred from {ckpt.folder} (DeepSpeed {ms.get('ds_version', '?')}, tag {ckpt.tag}).",
        f"layout {name}",
        f"mesh {{ dp = {ckpt.dp} }}",
        f"dtype {dtype}",
    ]
    if opt is not None:
        if first_state:
            opts = [f"states ({', '.join(states)})" if len(states) != 1 else f"states {states[0]}"]
            opts.append("step" if step else "no_step")
            lines.append(f"optimizer adam {{ master fp32, {', '.join(opts)} }}")
        else:  # no trainable parameter, so no state to read the names from
            lines.append("optimizer adam")
        zopts = []
        if stage == 3:
            zopts.append(f"sub_group {int(zcfg.get('sub_group_size', 1_000_000_000))}")
        if variant:
            zopts.append(variant)
        lines.append(f"zero {stage} over dp" + (f" {{ {', '.join(zopts)} }}" if zopts else ""))
    for g in sorted({g for g, _, _ in params}):
        body = [
            f"tensor {p} {_dims(s)}"
            + (f" {module[p].dtype}" if _own_dtype(module, p, dtype) else "")
            for gg, p, s in params
            if gg == g
        ]
        if g == 0:
            lines.extend(body)
        else:
            lines.append(f"group group{g} {{")
            lines.extend("  " + b for b in body)
            lines.append("}")
    lines.extend(f"frozen {f} {_dims(s)}" + (f" {d}" if d != dtype else "") for f, s, d in frozen)
    lines.extend(f"buffer {b} {_dims(s)}" + (f" {d}" if d != dtype else "") for b, s, d in buffers)
    lines.extend(f"tie {alias} = {source}" for alias, source in shared.items())
    store = "universal" if ckpt.universal else "deepspeed"
    lines.append(f'store {store} {{ tag "{ckpt.tag}" }}')
    text = "\n".join(lines) + "\n"
    return fmt(parse(text, f"{ckpt.folder}.layout"))


def _universal_states(ckpt: DeepSpeedCheckpoint, param: str) -> dict[str, bool]:
    """The optimizer states a universal checkpoint keeps per parameter, in Adam's order
    (``fp32.pt`` is the master; the others are named for their state)."""
    folder = ckpt.folder / "zero" / param
    master = folder / "fp32.pt"
    if master.is_file() and not isinstance(pt.load(master), dict):
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
