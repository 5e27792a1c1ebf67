"""Make real DeepSpeed checkpoints plus the ground truth they must hold (the test oracle).

Run under torchrun, one process per data-parallel rank, on CPU::

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=/tmp/ext \\
        torchrun --nproc_per_node 2 --master_port 29511 tests/interop/ds_make.py \\
        --case z2_w2_bf16 --out /tmp/ckpt/z2_w2_bf16

``--case`` takes one name or several, comma separated, all with the same world size (the
number of torchrun processes). With one case the checkpoint root is ``--out`` itself; with
several, each case gets ``--out/<case>``. A case's root holds, when complete:

    latest, global_step2/...           what ``engine.save_checkpoint(root)`` wrote
                                       (minus DeepSpeed's zero_to_fp32.py/zero_to_torch.py)
    ground_truth.safetensors           name -> fp32 tensor (keys below)
    ground_truth.json                  scalars and metadata (see ``ground_truth_meta``)
    DONE                               written last, by rank 0

Ground-truth tensor keys (all full, unpartitioned, unpadded, fp32, logical shapes):

    fp32/<param>        fp32 master weight     (deepspeed.utils.safe_get_full_fp32_param)
    exp_avg/<param>     Adam first moment      (safe_get_full_optimizer_state(p, "exp_avg"))
    exp_avg_sq/<param>  Adam second moment     (safe_get_full_optimizer_state(p, "exp_avg_sq"))
    weight16/<name>     the module's own (bf16/fp16/fp32) trainable weight, cast to fp32; one
                        entry per module name, tied aliases included (head.weight)
    frozen/<name>       requires_grad=False parameters, cast to fp32
    buffer/<name>       persistent buffers, cast to fp32

``<param>`` is DeepSpeed's parameter name (``engine.param_names``: the first module name of a
tied parameter). This file is also imported (without torch) by corpus.py and ds_load.py for
CASES and the shared helpers; torch and deepspeed are imported lazily.

Pipeline and tensor-parallel cases (``PARALLEL_CASES``, built by ds_parallel.py; torchrun
world = pp * tp * dp) use the same keys, with every tensor full: unsharded over data, pipeline
and tensor parallelism, in the module's logical shape.

    pipe     ``<param>`` is the PipelineModule's own parameter name, as in the ``param_shapes``
             of the ``mp_rank_XX_model_states.pt`` files and in universal checkpoints:
             ``<layer index>.<name inside the layer>`` (``1.fc1.weight``), and
             ``tied_modules.<key>.<name>`` (``tied_modules.embed.weight``) for a TiedLayerSpec
             module, recorded once although every stage using it holds (and trains) a copy.
             ``<layer index>.<name>`` lives under key ``<name>`` in
             ``layer_<index:02d>[-model_<tp rank:02d>]-model_states.pt``; the tied module in
             the file of its first position (the head position, which has a forward_fn,
             writes no file). The json's ``layer_files`` maps every parameter and buffer to
             its {"layer", "key"}.
    autotp   ``<param>`` is the Hugging Face name (``model.layers.0.self_attn.q_proj.weight``).

``ground_truth.json`` of these cases adds, per parameter (``params``; ``tp_layout`` also covers
buffers), how the TP ranks' slices make the full tensor, ``"tp"``: ``{"dim": d, "sizes": [the
extent on d of each tp rank's slice]}`` (concatenate the slices on ``d`` in tp-rank order;
sizes may be uneven, or 0) or ``{"dim": null, "sizes": null}`` (replicated: every tp rank
holds the full tensor), and the ``stages`` holding it. ``mp_ranks`` lists, per checkpoint
``mp_rank`` (= stage * tp + tp rank), its stage, tp rank, layer range, parameter names and the
optimizer's flat groups in order (ZeRO-1: ``param_shapes`` order; ZeRO-0: the torch
optimizer's param order); ``pipe_tied`` names the parameters several stages hold;
``topology`` is {pp, tp, dp}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

SEED = 1234
STEPS = 2
MICRO_BATCH = 2
SEQ = 5

# --------------------------------------------------------------------------------------------
# Cases. Each case = model options + DeepSpeed config options + world size.
#   stage      ZeRO stage (1, 2, 3)
#   dtype      "bf16" | "fp16" | "fp32" (module / 16-bit weight dtype)
#   world      data-parallel world size the checkpoint is saved at
#   model      TinyLM keyword arguments
#   sched      "warmup" (DeepSpeed WarmupLR from the config) | "steplr" (torch StepLR object)
#   zero       extra keys merged into "zero_optimization"
#   extra      extra top-level config keys (deep-merged)
# --------------------------------------------------------------------------------------------

DEFAULT_MODEL: dict[str, Any] = {"vocab": 37, "hidden": 10, "ffn": 6}


def _case(stage: int, dtype: str, world: int, **kw: Any) -> dict[str, Any]:
    case: dict[str, Any] = {
        "stage": stage,
        "dtype": dtype,
        "world": world,
        "model": dict(DEFAULT_MODEL),
        "sched": "warmup",
        "zero": {},
        "extra": {},
    }
    case.update(kw)
    return case


CASES: dict[str, dict[str, Any]] = {}
for _stage in (1, 2, 3):
    for _world in (2, 3):
        for _dtype in ("bf16", "fp32"):
            CASES[f"z{_stage}_w{_world}_{_dtype}"] = _case(_stage, _dtype, _world)
# fp16 needs the accelerator patch (see build_engine) and runs a dynamic loss scaler.
CASES["z2_w2_fp16"] = _case(2, "fp16", 2)
# bf16 with fp32 gradient accumulation at ZeRO-1: DeepSpeed's BF16_Optimizer.
CASES["bf16opt_w2"] = _case(1, "bf16", 2, extra={"data_types": {"grad_accum_dtype": "fp32"}})
# ZeRO-3 with a tiny sub_group_size: at world 2, five sub-groups (embed.weight | fc1.weight |
# fc2.weight in decay, scale+fc1.bias+fc2.bias | norm.* in no_decay); a torch StepLR scheduler
# instead of WarmupLR.
CASES["z3_w2_subgroups"] = _case(3, "bf16", 2, zero={"sub_group_size": 8}, sched="steplr")

del _stage, _world, _dtype

# --------------------------------------------------------------------------------------------
# Pipeline / tensor-parallel cases (ds_parallel.py). Beyond the keys above:
#   kind       "pipe" (deepspeed.pipe.PipelineModule, hand-written TP when tp > 1) |
#              "autotp" (Hugging Face Llama sharded by DeepSpeed's AutoTP)
#   pp, tp, dp pipeline stages, tensor-parallel ranks, data-parallel ranks (world = pp*tp*dp)
#   launch     cases sharing (world, launch) share one torchrun (process-global DeepSpeed
#              state such as AutoTP's groups must not leak from one case into the next)
# --------------------------------------------------------------------------------------------

PIPE_MODEL: dict[str, Any] = {"vocab": 37, "hidden": 10, "ffn": 6, "blocks": 3}
# GQA: 4 query heads share 2 key/value heads; a vocabulary that does not split evenly.
LLAMA_MODEL: dict[str, Any] = {
    "vocab_size": 101,
    "hidden_size": 16,
    "intermediate_size": 12,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
}


def _pcase(kind: str, stage: int, dtype: str, pp: int, tp: int, dp: int) -> dict[str, Any]:
    model = PIPE_MODEL if kind == "pipe" else LLAMA_MODEL
    launch = kind if kind == "pipe" else f"{kind}{tp}x{dp}"
    return _case(
        stage, dtype, pp * tp * dp, kind=kind, pp=pp, tp=tp, dp=dp, model=dict(model), launch=launch
    )


PARALLEL_CASES: dict[str, dict[str, Any]] = {
    # ZeRO-0 fp32: no optimizer files, the torch optimizer state sits in the mp_rank files.
    "pp2_dp1_z0_fp32": _pcase("pipe", 0, "fp32", pp=2, tp=1, dp=1),
    "pp2_dp2_z0_fp32": _pcase("pipe", 0, "fp32", pp=2, tp=1, dp=2),
    "pp2_dp1_z1_bf16": _pcase("pipe", 1, "bf16", pp=2, tp=1, dp=1),
    "pp2_dp2_z1_bf16": _pcase("pipe", 1, "bf16", pp=2, tp=1, dp=2),
    # One stage: what a pp = 2 checkpoint resumes as when the pipeline degree changes.
    "pp1_dp2_z1_bf16": _pcase("pipe", 1, "bf16", pp=1, tp=1, dp=2),
    # Hand-written column/row-parallel Blocks: layer_XX-model_YY files; mp_rank = 2*stage+tp.
    "pp2_tp2_dp1_z1_bf16": _pcase("pipe", 1, "bf16", pp=2, tp=2, dp=1),
    "autotp2_dp1_z1_bf16": _pcase("autotp", 1, "bf16", pp=1, tp=2, dp=1),
    "autotp2_dp2_z1_bf16": _pcase("autotp", 1, "bf16", pp=1, tp=2, dp=2),
    # More TP ranks than key/value heads: some ranks hold empty (0, hidden) k/v slices.
    "autotp4_dp1_z1_bf16": _pcase("autotp", 1, "bf16", pp=1, tp=4, dp=1),
    # ZeRO-2 records the empty slices with the frozen parameters.
    "autotp2_dp1_z2_bf16": _pcase("autotp", 2, "bf16", pp=1, tp=2, dp=1),
    "autotp2_dp2_z2_bf16": _pcase("autotp", 2, "bf16", pp=1, tp=2, dp=2),
    "autotp4_dp1_z2_bf16": _pcase("autotp", 2, "bf16", pp=1, tp=4, dp=1),
    # ZeRO-3 partitions each TP slice over data parallelism. (With tp = 4, DeepSpeed 0.19.8
    # cannot train this model: its first forward finds an empty slice NOT_AVAILABLE.)
    "autotp2_dp2_z3_bf16": _pcase("autotp", 3, "bf16", pp=1, tp=2, dp=2),
    "autotp2_dp1_z3_bf16": _pcase("autotp", 3, "bf16", pp=1, tp=2, dp=1),
}
ALL_CASES: dict[str, dict[str, Any]] = {**CASES, **PARALLEL_CASES}


def case_names(spec: str) -> list[str]:
    names = [n for n in spec.split(",") if n]
    unknown = [n for n in names if n not in ALL_CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {sorted(ALL_CASES)}")
    return names


def _parallel():  # -> the ds_parallel module
    import ds_parallel  # beside this file; imports ds_make itself

    return ds_parallel


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def ds_config(case: dict[str, Any], world: int, universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of ``case`` at data-parallel size ``world``."""
    zero: dict[str, Any] = {"stage": case["stage"]}
    if case["stage"] == 3:
        # Keep every parameter partitioned (the default threshold of 1e5 elements would make
        # all of this tiny model's params "persistent", unlike a real model's big matrices).
        zero["stage3_param_persistence_threshold"] = 0
    zero.update(case["zero"])
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "train_batch_size": MICRO_BATCH * world,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if case["dtype"] == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif case["dtype"] == "fp16":
        # Dynamic loss scaling (loss_scale 0); a small initial scale so no step overflows.
        cfg["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 8,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    if case["sched"] == "warmup":
        cfg["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                # WarmupLR runs both of the first two steps at warmup_min_lr (iterations -1
                # and 0): keep it non-zero, or the fp32 masters never move.
                "warmup_min_lr": 0.01,
                "warmup_max_lr": 0.05,
                "warmup_num_steps": 4,
                "warmup_type": "linear",
            },
        }
    _merge(cfg, case["extra"])
    if universal:
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    return cfg


# --------------------------------------------------------------------------------------------
# Model, optimizer, engine (torch and deepspeed imported here, not at module import)
# --------------------------------------------------------------------------------------------


def make_model(vocab: int, hidden: int, ffn: int):  # -> torch.nn.Module
    import torch
    from torch import nn

    class TinyLM(nn.Module):
        """Tied embedding/head, a frozen param, persistent and non-persistent buffers."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, hidden)
            self.fc1 = nn.Linear(hidden, ffn)
            self.fc2 = nn.Linear(ffn, hidden)
            self.norm = nn.LayerNorm(hidden)
            self.scale = nn.Parameter(torch.ones(1))  # shape (1,): 0-dim params crash ZeRO
            self.head = nn.Linear(hidden, vocab, bias=False)
            self.head.weight = self.embed.weight  # tied
            self.logit_bias = nn.Parameter(torch.randn(vocab) * 0.1, requires_grad=False)
            self.register_buffer("counter", torch.zeros(1))
            self.register_buffer("table", torch.linspace(0.5, 1.5, hidden))
            self.register_buffer("scratch", torch.zeros(3), persistent=False)

        def forward(self, tokens):
            h = self.embed(tokens)
            # DeepSpeed keeps fp32 buffers fp32 in bf16/fp16 runs (it casts params only).
            h = h * self.table.to(h.dtype)
            h = h + self.fc2(torch.relu(self.fc1(h)))
            h = self.norm(h) * self.scale
            logits = self.head(h) + self.logit_bias
            if self.training:
                with torch.no_grad():
                    self.counter.add_(1)
            return logits

    torch.manual_seed(SEED)
    return TinyLM()


DECAY = ("embed.weight", "fc1.weight", "fc2.weight")
WEIGHT_DECAY = (0.1, 0.0)


def param_groups(model) -> list[dict[str, Any]]:
    """Two groups (decay, no_decay) of trainable params; group order fixes ZeRO's flat order."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if name in DECAY else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": WEIGHT_DECAY[0]},
        {"params": no_decay, "weight_decay": WEIGHT_DECAY[1]},
    ]


def build_engine(case: dict[str, Any], world: int, universal: bool = False):
    """deepspeed.initialize the case's model at data-parallel size ``world`` (a parallel
    case: at ``world`` ranks in all)."""
    if "kind" in case:
        return _parallel().build_engine(case, world, universal=universal)
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    if case["dtype"] == "fp16":
        # The CPU accelerator refuses fp16 unless mkldnn says it supports it.
        get_accelerator().is_fp16_supported = lambda: True
    model = make_model(**case["model"])
    groups = param_groups(model)
    opt = torch.optim.AdamW(groups, lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    sched = None
    if case["sched"] == "steplr":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    cfg = ds_config(case, world, universal=universal)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=cfg
    )
    return engine, cfg


def train(engine, case: dict[str, Any], rank: int, steps: int = STEPS) -> list[float]:
    if "kind" in case:
        return _parallel().train(engine, case, rank, steps=steps)
    import torch

    vocab = case["model"]["vocab"]
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 + 97 * step + rank)
        tokens = torch.randint(0, vocab, (MICRO_BATCH, SEQ), generator=g)
        targets = torch.randint(0, vocab, (MICRO_BATCH, SEQ), generator=g)
        logits = engine(tokens)
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, vocab), targets.reshape(-1)
        )
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


# --------------------------------------------------------------------------------------------
# Ground truth (every rank must call: the safe_get_* helpers all-reduce)
# --------------------------------------------------------------------------------------------


def _persistent_buffers(module) -> list[str]:
    names = []
    for name, _ in module.named_buffers():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf not in owner._non_persistent_buffers_set:
            names.append(name)
    return names


def _jsonable(x: Any) -> Any:
    import torch

    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    return repr(x)


def _base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def capture(engine, case: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full state of ``engine`` as (fp32 tensors by key, json-able metadata). For a parallel
    case only rank 0 gets it (the others get empty dicts)."""
    if "kind" in case:
        return _parallel().capture(engine, case)
    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    module = engine.module
    opt = engine.optimizer
    # ZeRO-1/2 and BF16_Optimizer link optimizer-state fragments lazily; with more than one
    # param group, groups >= 1 raise "exp_avg not found in optimizer state fragment" unless
    # they are re-linked now. This only touches in-memory views.
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()

    names = engine.param_names  # {param: name}, first module name of a tied param
    tensors: dict[str, Any] = {}
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    for name, p in trainable:
        assert names[p] == name, (names[p], name)
        for key, value in (
            ("fp32", safe_get_full_fp32_param(p)),
            ("exp_avg", safe_get_full_optimizer_state(p, "exp_avg")),
            ("exp_avg_sq", safe_get_full_optimizer_state(p, "exp_avg_sq")),
        ):
            assert value is not None, f"no {key} for {name}"
            shape = tuple(getattr(p, "ds_shape", p.shape))
            tensors[f"{key}/{name}"] = value.detach().float().cpu().reshape(shape).clone()

    all_params = list(module.named_parameters(remove_duplicate=False))
    gather = (
        deepspeed.zero.GatheredParameters([p for _, p in all_params], modifier_rank=None)
        if case["stage"] == 3
        else nullcontext()
    )
    canonical: dict[int, str] = {}
    params_meta = []
    with gather:
        for name, p in all_params:
            first = canonical.setdefault(id(p), name)
            prefix = "weight16" if p.requires_grad else "frozen"
            tensors[f"{prefix}/{name}"] = p.detach().float().cpu().clone()
            params_meta.append(
                {
                    "name": name,
                    "shape": list(tensors[f"{prefix}/{name}"].shape),
                    "dtype": str(p.dtype).replace("torch.", ""),
                    "requires_grad": bool(p.requires_grad),
                    "tied_to": None if first == name else first,
                }
            )
    persistent = _persistent_buffers(module)
    bufs = dict(module.named_buffers())
    for name in persistent:
        tensors[f"buffer/{name}"] = bufs[name].detach().float().cpu().clone()

    groups_meta = []
    group_of = {}
    for gi, g in enumerate(param_groups(module)):
        gnames = [names[p] for p in g["params"]]
        for n in gnames:
            group_of[n] = gi
        groups_meta.append({"params": gnames, "weight_decay": g["weight_decay"]})
    for gi, g in enumerate(opt.param_groups):
        if gi < len(groups_meta):
            groups_meta[gi].update(
                {
                    "lr": float(g["lr"]),
                    "weight_decay_loaded": float(g["weight_decay"]),
                    "betas": list(g["betas"]),
                    "eps": float(g["eps"]),
                }
            )
    for meta in params_meta:
        canon = meta["tied_to"] or meta["name"]
        meta["group"] = group_of.get(canon)

    base = _base_optimizer(engine)
    # The flat buffers the base optimizer steps: one per param group at ZeRO-1/2 and with the
    # BF16_Optimizer, one per sub-group at ZeRO-3 (these are param_shapes' groups on disk).
    if case["stage"] == 3:
        flats = list(opt.fp32_partitioned_groups_flat)
        flat_group = [opt.sub_group_to_group_id[i] for i in range(len(flats))]
        flat_params = [[names[p] for p in g] for g in opt.fp16_groups]
    else:
        flats = [p for g in base.param_groups for p in g["params"]]
        flat_group = [gi for gi, g in enumerate(base.param_groups) for _ in g["params"]]
        lp_groups = getattr(opt, "round_robin_bit16_groups", None) or opt.bf16_groups
        flat_params = [[names[p] for p in g] for g in lp_groups]
    opt_steps: list[list[float | None]] = [[] for _ in base.param_groups]
    for f, gi in zip(flats, flat_group, strict=True):
        st = base.state.get(f, {})
        opt_steps[gi].append(float(st["step"]) if "step" in st else None)
    flat_steps = {s for g in opt_steps for s in g if s is not None}
    scaler = getattr(opt, "loss_scaler", None)
    loss_scaler = None
    if scaler is not None:
        loss_scaler = {
            "class": type(scaler).__name__,
            **{
                k: v
                for k, v in vars(scaler).items()
                if isinstance(v, (bool, int, float)) and not k.startswith("_")
            },
        }
    sched = engine.lr_scheduler
    meta = {
        "step": int(flat_steps.pop()) if len(flat_steps) == 1 else None,
        "optimizer_steps": opt_steps,
        "flat_groups": [
            {"param_group": gi, "params": ps}
            for gi, ps in zip(flat_group, flat_params, strict=True)
        ],
        "global_steps": int(engine.global_steps),
        "global_samples": int(engine.global_samples),
        "skipped_steps": int(engine.skipped_steps),
        "lr_scheduler": _jsonable(sched.state_dict()) if sched is not None else None,
        "lr_scheduler_class": type(sched).__name__ if sched is not None else None,
        "lr": [float(x) for x in engine.get_lr()],
        "loss_scaler": loss_scaler,
        "optimizer_class": type(opt).__name__,
        "zero_stage": int(engine.zero_optimization_stage()),
        "params": params_meta,
        "trainable": [n for n, _ in trainable],
        "frozen": [m["name"] for m in params_meta if not m["requires_grad"]],
        "tied": {m["name"]: m["tied_to"] for m in params_meta if m["tied_to"]},
        "param_groups": groups_meta,
        "buffers": persistent,
        "non_persistent_buffers": [n for n in bufs if n not in persistent],
        "versions": {"deepspeed": deepspeed.__version__, "torch": torch.__version__},
    }
    return tensors, meta


def write_truth(tensors: dict[str, Any], meta: dict[str, Any], st_path: Path) -> None:
    """Write ``st_path`` (safetensors) and its ``.json`` sibling, atomically each."""
    from safetensors.torch import save_file

    st_path = Path(st_path)
    tmp = st_path.with_name(st_path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(tmp))
    os.replace(tmp, st_path)
    js = st_path.with_suffix(".json")
    tmpj = js.with_name(js.name + ".tmp")
    tmpj.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    os.replace(tmpj, js)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def init_dist():
    import deepspeed
    import torch.distributed as dist

    # A short collective timeout: a rank that died leaves the others failing in minutes, not
    # after gloo's default 30.
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(minutes=3))
    return dist.get_rank(), dist.get_world_size()


def make_case(name: str, out: Path, rank: int, world: int) -> None:
    import torch.distributed as dist

    case = ALL_CASES[name]
    if case["world"] != world:
        raise SystemExit(f"case {name} wants world {case['world']}, torchrun gave {world}")
    t0 = time.time()
    if rank == 0:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
    dist.barrier()
    engine, cfg = build_engine(case, world)
    losses = train(engine, case, rank)
    engine.save_checkpoint(str(out))
    tensors, meta = capture(engine, case)
    dist.barrier()
    if rank == 0:
        for script in ("zero_to_fp32.py", "zero_to_torch.py"):
            (out / script).unlink(missing_ok=True)
        meta.update(
            {
                "case": name,
                "case_config": case,
                "ds_config": cfg,
                "world_size": world,
                "tag": (out / "latest").read_text().strip(),
                "losses": losses,
            }
        )
        write_truth(tensors, meta, out / "ground_truth.safetensors")
        (out / "DONE").write_text(json.dumps({"case": name, "seconds": time.time() - t0}) + "\n")
    engine.destroy()
    dist.barrier()


def exit_process(work: Callable[[], None]) -> NoReturn:
    """Run a torchrun worker's ``work``, then leave through ``os._exit``: DeepSpeed/gloo
    sometimes abort at interpreter exit after all work is done; a failure exits 1 after
    printing its traceback."""
    try:
        work()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", required=True, help="case name(s), comma separated")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    names = case_names(args.case)
    rank, world = init_dist()
    import torch.distributed as dist

    def work() -> None:
        for name in names:
            out = args.out if len(names) == 1 else args.out / name
            make_case(name, out, rank, world)
            if rank == 0:
                print(f"ds_make: {name} -> {out}", flush=True)
        dist.barrier()

    exit_process(work)


if __name__ == "__main__":
    main()
