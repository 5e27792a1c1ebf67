"""DeepSpeed AutoEP cases of the corpus: a Hugging Face Mixtral whose MoE blocks DeepSpeed
replaces with expert-parallel layers; model, engine, ground truth under two namings, driver.

Run under torchrun, one process per rank (world = data-parallel size; ep divides it)::

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=/tmp/ext \\
        torchrun --nproc_per_node 2 --master_port 29911 tests/interop/ds_autoep.py \\
        --case autoep_z2_w2_ep2_bf16 --out /tmp/ckpt/autoep

``--case`` and ``--out`` work as in ds_make.py. Without torchrun,
``ds_autoep.py --case NAME --hf-check DIR`` prints, as json, what
``MixtralForCausalLM(config).load_state_dict(sd, strict=True)`` says of the ``*.safetensors``
files in DIR (see :func:`hf_load_strict`).

The model is ``MixtralForCausalLM(MixtralConfig(**case["model"]))`` built from a config (no
download) after ``torch.manual_seed(SEED)``; every expert starts from its own random draw.
The config section ``"expert_parallel": {"enabled": true, "autoep_size": ep, "preset_model":
"mixtral", "use_grouped_mm": false}`` has DeepSpeed replace each ``model.layers.L.mlp`` by an
``AutoEPMoELayer``; ``use_grouped_mm`` is off because ``torch._grouped_mm`` refuses these
rows on CPU ("strides should be multiple of 16 bytes"). Two things are needed to get there:

- transformers 5.x's ``_CanRecordRegistry`` is keyed by model but DeepSpeed hands it class-name
  strings (``registry.get(key, default)``, ``registry[key] = entry``): :func:`patch_registry`
  lets a str key act as a plain dict key.
- ZeRO-1/2 refuse an optimizer built beforehand ("None of the param groups are marked as
  MoE"): the optimizer is a callable, called by DeepSpeed after the replacement, building
  torch AdamW over ``configure_moe_param_groups``: two groups, ``dense-params`` and
  ``ep_size_<ep>`` (``"moe": True``).

Expert-parallel groups are consecutive ranks, ep_rank = rank % ep (checked at build time).
Each layer ``M`` then holds, on each rank, the router ``M.router.gate.weight`` [E, H] (also
reachable as ``M.gate.gate.weight`` in the state dict: an alias, not a parameter) and the
rank's experts ``M.experts.w1`` [E/ep, F, H], ``M.experts.w2`` [E/ep, H, F] and
``M.experts.w3`` [E/ep, F, H]: global experts [ep_rank * E/ep, (ep_rank + 1) * E/ep).

Ground truth (``ground_truth.safetensors`` / ``.json`` beside the checkpoint, as in
ds_make.py; every tensor fp32 and full, gathered to rank 0, every holder checked equal),
under two namings:

(a) DeepSpeed's parameter names, with each expert tensor FULL over all experts (the ep ranks'
    slices concatenated on dim 0 in global expert order, global shape [E, ...])::

        fp32/<param>        fp32 master (safe_get_full_fp32_param)
        exp_avg/<param>     Adam first moment (safe_get_full_optimizer_state)
        exp_avg_sq/<param>  Adam second moment
        weight16/<param>    the module's weight as saved (bf16 or fp32), cast to fp32

(b) the Hugging Face model's own state-dict names and shapes
    (``MixtralForCausalLM(config).state_dict()``)::

        hf/<name>           the fp32 masters of (a) in Hugging Face layout
        hf16/<name>         the weight16 tensors of (a) in Hugging Face layout

The mapping between them, ``hf_map`` in the json, is checked at build time against the
Hugging Face model's own state dict before deepspeed.initialize (rounded to the case's dtype,
bit-exact). For each MoE block ``M`` (F = intermediate_size)::

    M.gate.weight                  = M.router.gate.weight
    M.experts.gate_up_proj[:, :F]  = M.experts.w1     (gate projection; no transpose)
    M.experts.gate_up_proj[:, F:]  = M.experts.w3     (up projection)
    M.experts.down_proj            = M.experts.w2
    any other name                 = the parameter of the same name

``ground_truth.json`` holds the scalars of ds_make (step, optimizer_steps [per base optimizer
group, a list over its flat buffers], global_steps, global_samples, skipped_steps, lr,
lr_scheduler, optimizer_class, zero_stage, losses, ...) and:

    ep_size             the case's ep
    autoep_layers       per AutoEP layer, in module order: {"layer" (ordinal, the L of
                        layer_{L}_expert_{G}_...), "module", "num_experts",
                        "num_local_experts", "ep_size", "experts" (its w1, w2, w3 names)}
    params              per parameter of naming (a), in module order: {"name", "shape"
                        (global), "local_shape" (one rank's), "dtype", "group", "expert"
                        (bool), "layer" (ordinal, or null)}
    trainable           the names of (a)
    aliases             {state-dict name: the parameter it aliases} (the router's alias)
    param_groups        the optimizer's groups: {"name", "moe", "params", "weight_decay",
                        "lr", "betas", "eps"}; ``partition_count`` as the optimizer has it
                        (per group at ZeRO-1/2, one int at ZeRO-3)
    hf_params           the Hugging Face state dict in order: [{"name", "shape"}]
    hf_map              {hf name: [{"param", "dim", "start", "stop"}]}: the hf tensor's slice
                        start:stop on dim is the (a) tensor ``param``, the pieces tile it
    hf_config           the MixtralConfig keyword arguments
    ds_autoep_layers    verbatim from the model-states file rank 0 wrote
                        (mp_rank_00_model_states.pt, at ZeRO-3 zero_pp_rank_0_...; json makes
                        the int keys of its ``ranks`` maps strings)
    ds_autoep_layers_by_rank   ZeRO-3 only: {rank: the same from that rank's file}

Files: ZeRO-1/2 write per-expert files ``layer_{L}_expert_{G}_mp_rank_00_model_states.pt``
(bf16 copies of w1/w2/w3 of global expert G under ``<param>.<G>``); ZeRO-3 writes none, its
experts live only in the optimizer's fp32 flats.

This file imports torch, deepspeed and transformers only inside functions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ds_make  # after the sys.path insert above

AUTOEP_MODEL: dict[str, Any] = {
    "vocab_size": 37,
    "hidden_size": 16,
    "intermediate_size": 12,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 32,
    "tie_word_embeddings": False,
}
EXPERTS = ("w1", "w2", "w3")


def _acase(stage: int, dtype: str, world: int, ep: int) -> dict[str, Any]:
    # One launch per case: AutoEP patches the module tree and registers process-global groups.
    return ds_make._case(
        stage,
        dtype,
        world,
        kind="autoep",
        ep=ep,
        model=dict(AUTOEP_MODEL),
        launch=f"autoep-z{stage}-ep{ep}-{dtype}",
    )


CASES: dict[str, dict[str, Any]] = {
    f"autoep_z{s}_w{w}_ep{ep}_{dt}": _acase(s, dt, w, ep)
    for s, w, ep, dt in (
        (1, 2, 2, "bf16"),
        (2, 2, 2, "bf16"),
        (3, 2, 2, "bf16"),
        # Expert data parallelism: each ep rank's expert flat split over 2 ranks.
        (2, 4, 2, "bf16"),
        (2, 4, 2, "fp32"),
    )
}


def at_topology(case: dict[str, Any], world: int, ep: int | None = None) -> dict[str, Any]:
    """``case`` as built at ``world`` ranks and expert-parallel size ``ep`` (to load back)."""
    return {**case, "world": world, "ep": case["ep"] if ep is None else ep}


# --------------------------------------------------------------------------------------------
# Model, optimizer, engine
# --------------------------------------------------------------------------------------------


def patch_registry() -> None:
    """Let transformers' output-capture registry take the class-name strings DeepSpeed
    uses as keys; a model key keeps its own behaviour."""
    from transformers.utils import output_capturing

    registry = output_capturing._CanRecordRegistry
    if getattr(registry, "_str_keys", False):
        return
    model_get, model_set = registry.get, registry.__setitem__

    def get(self, key, default=None):
        if isinstance(key, str):
            return dict.get(self, key, default)
        return model_get(self, key)

    def setitem(self, key, value):
        if isinstance(key, str):
            dict.__setitem__(self, key, value)
        else:
            model_set(self, key, value)

    registry.get, registry.__setitem__, registry._str_keys = get, setitem, True


def make_model(case: dict[str, Any]):
    """(the Hugging Face model, its state dict cloned) before DeepSpeed touches it."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(ds_make.SEED)
    model = MixtralForCausalLM(MixtralConfig(**case["model"]))
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def ds_config(case: dict[str, Any], world: int, universal: bool = False) -> dict[str, Any]:
    cfg = ds_make.ds_config(case, world, universal=universal)
    cfg["expert_parallel"] = {
        "enabled": True,
        "autoep_size": case["ep"],
        "preset_model": "mixtral",
        "use_grouped_mm": False,
    }
    return cfg


def _optimizer(params):
    import torch
    from deepspeed.moe.utils import configure_moe_param_groups

    return torch.optim.AdamW(
        configure_moe_param_groups(list(params)), lr=0.01, betas=(0.9, 0.999), eps=1e-8
    )


def autoep_layers(module) -> list[tuple[str, Any]]:
    """[(module name, AutoEPMoELayer)] in module order (DeepSpeed's layer ordinals)."""
    return [(n, m) for n, m in module.named_modules() if getattr(m, "_is_autoep_layer", False)]


def build_engine(case: dict[str, Any], world: int, universal: bool = False):
    """deepspeed.initialize the case's model at ``world`` ranks and the case's ep; the
    Hugging Face mapping is proven on the initial masters before anything trains."""
    import deepspeed
    import torch.distributed as dist

    patch_registry()
    rank = dist.get_rank()
    model, hf_init = make_model(case)
    cfg = ds_config(case, world, universal=universal)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), optimizer=_optimizer, config=cfg
    )
    layers = autoep_layers(engine.module)
    assert len(layers) == case["model"]["num_hidden_layers"], [n for n, _ in layers]
    for name, layer in layers:
        assert layer.ep_rank == rank % case["ep"], f"rank {rank}: {name} at ep rank {layer.ep_rank}"
    prove_hf_map(engine, case, hf_init)
    return engine, cfg


def train(engine, case: dict[str, Any], rank: int, steps: int = ds_make.STEPS) -> list[float]:
    """``steps`` optimizer steps on tokens drawn from (step, rank); fresh data after a reload."""
    import torch

    vocab = case["model"]["vocab_size"]
    start = int(engine.global_steps)
    losses = []
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + 97 * step + rank)
        tokens = torch.randint(0, vocab, (ds_make.MICRO_BATCH, ds_make.SEQ), generator=g)
        loss = engine(input_ids=tokens, labels=tokens).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


# --------------------------------------------------------------------------------------------
# The two namings
# --------------------------------------------------------------------------------------------


def hf_map(module, ffn: int) -> dict[str, list[dict[str, Any]]]:
    """{Hugging Face name: [pieces]} for an AutoEP module (see the module docstring), keyed
    by DeepSpeed's parameter names; ``stop`` None = the whole dim."""
    layers = {name for name, _ in autoep_layers(module)}
    out: dict[str, list[dict[str, Any]]] = {}
    for name, _ in module.named_parameters():
        owner = next((m for m in layers if name.startswith(f"{m}.")), None)
        if owner is None:
            out[name] = [{"param": name, "dim": 0, "start": 0, "stop": None}]
            continue
        leaf = name[len(owner) + 1 :]
        if leaf == "router.gate.weight":
            out[f"{owner}.gate.weight"] = [{"param": name, "dim": 0, "start": 0, "stop": None}]
        elif leaf == "experts.w1":
            out.setdefault(f"{owner}.experts.gate_up_proj", []).insert(
                0, {"param": name, "dim": 1, "start": 0, "stop": ffn}
            )
        elif leaf == "experts.w3":
            out.setdefault(f"{owner}.experts.gate_up_proj", []).append(
                {"param": name, "dim": 1, "start": ffn, "stop": 2 * ffn}
            )
        elif leaf == "experts.w2":
            out[f"{owner}.experts.down_proj"] = [
                {"param": name, "dim": 0, "start": 0, "stop": None}
            ]
        else:
            raise AssertionError(f"{name}: a parameter of {owner} with no Hugging Face name")
    return out


def to_hf(full: dict[str, Any], mapping: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Tensors of naming (a) (full, by parameter name) as the Hugging Face state dict."""
    import torch

    out = {}
    for hf_name, pieces in mapping.items():
        if len(pieces) == 1 and pieces[0]["start"] == 0 and pieces[0]["stop"] is None:
            out[hf_name] = full[pieces[0]["param"]].clone()
            continue
        dims = {p["dim"] for p in pieces}
        assert len(dims) == 1, hf_name
        out[hf_name] = torch.cat([full[p["param"]] for p in pieces], dim=dims.pop())
    return out


def _full_stops(mapping: dict[str, list[dict[str, Any]]], shapes: dict[str, list[int]]):
    """``mapping`` with every None stop resolved against the Hugging Face shapes."""
    return {
        k: [{**p, "stop": shapes[k][p["dim"]] if p["stop"] is None else p["stop"]} for p in v]
        for k, v in mapping.items()
    }


def _gather_full(module, case: dict[str, Any], local: dict[str, Any]) -> dict[str, Any] | None:
    """On rank 0: {param: tensor} full over experts from every rank's ``local`` {param:
    tensor}; other ranks get None. Holders of the same slice are checked equal."""
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    payloads: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(payloads, {"rank": rank, "ep_rank": rank % case["ep"], "t": local})
    if rank != 0:
        return None
    expert_params = {f"{m}.experts.{w}" for m, _ in autoep_layers(module) for w in EXPERTS}
    full: dict[str, Any] = {}
    for key in payloads[0]["t"]:
        name = key.split("/", 1)[1] if "/" in key else key
        by_slot: dict[int, Any] = {}
        for pl in payloads:
            slot = pl["ep_rank"] if name in expert_params else 0
            t = pl["t"][key]
            if slot in by_slot:
                assert torch.equal(by_slot[slot], t), f"{key}: rank {pl['rank']} differs"
            else:
                by_slot[slot] = t
        full[key] = torch.cat([by_slot[s] for s in sorted(by_slot)], dim=0)
    return full


def prove_hf_map(engine, case: dict[str, Any], hf_init: dict[str, Any]) -> None:
    """Assert that the initial fp32 masters, full and mapped to Hugging Face names, are the
    Hugging Face model's own initial state dict rounded to the case's dtype, bit for bit."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    local = {}
    for name, p in module.named_parameters():
        value = safe_get_full_fp32_param(p)
        assert value is not None, f"no fp32 master for {name}"
        local[name] = value.detach().float().cpu().reshape(_shape(p)).clone()
    full = _gather_full(module, case, local)
    if full is None:
        return
    hf = to_hf(full, hf_map(module, case["model"]["intermediate_size"]))
    assert list(hf) == list(hf_init), sorted(set(hf) ^ set(hf_init)) or "another order"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[case["dtype"]]
    for name, want in hf_init.items():
        want = want.to(dtype).float()
        assert hf[name].shape == want.shape, (name, hf[name].shape, want.shape)
        assert torch.equal(hf[name], want), f"{name}: the mapping does not reproduce it"


def _shape(p) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------


def capture(engine, case: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full state of the engine under both namings; every rank must call, rank 0 gets it
    (the others get empty dicts)."""
    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    module, opt = engine.module, engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # Re-link the optimizer-state fragments of every group (see ds_make.capture).
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    named = list(module.named_parameters())
    local: dict[str, Any] = {}
    for name, p in named:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            if key == "fp32":
                value = safe_get_full_fp32_param(p)
            else:
                value = safe_get_full_optimizer_state(p, key)
            assert value is not None, f"no {key} for {name}"
            local[f"{key}/{name}"] = value.detach().float().cpu().reshape(_shape(p)).clone()
    gather = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    with gather if case["stage"] == 3 else nullcontext():
        for name, p in named:
            local[f"weight16/{name}"] = p.detach().float().cpu().clone()

    base = ds_make._base_optimizer(engine)
    # The flat buffers the base optimizer steps (as in ds_make.capture).
    if case["stage"] == 3:
        flats = list(opt.fp32_partitioned_groups_flat)
        flat_group = [opt.sub_group_to_group_id[i] for i in range(len(flats))]
    else:
        flats = [f for g in base.param_groups for f in g["params"]]
        flat_group = [gi for gi, g in enumerate(base.param_groups) for _ in g["params"]]
    opt_steps: list[list[float]] = [[] for _ in base.param_groups]
    for f, gi in zip(flats, flat_group, strict=True):
        opt_steps[gi].append(float(base.state[f]["step"]))
    full = _gather_full(module, case, local)
    if full is None:
        return {}, {}

    layers = autoep_layers(module)
    layer_of = {f"{m}.experts.{w}": i for i, (m, _) in enumerate(layers) for w in EXPERTS}
    mapping = hf_map(module, case["model"]["intermediate_size"])
    tensors = dict(full)
    by_name = {k.split("/", 1)[1]: v for k, v in full.items() if k.startswith("fp32/")}
    for hf_name, t in to_hf(by_name, mapping).items():
        tensors[f"hf/{hf_name}"] = t
    w16 = {k.split("/", 1)[1]: v for k, v in full.items() if k.startswith("weight16/")}
    hf_shapes = {}
    for hf_name, t in to_hf(w16, mapping).items():
        tensors[f"hf16/{hf_name}"] = t
        hf_shapes[hf_name] = list(t.shape)

    pid = {id(p): n for n, p in named}
    aliases = {
        n: pid[id(p)] for n, p in module.named_parameters(remove_duplicate=False) if pid[id(p)] != n
    }
    # Membership from the split the optimizer was built from; names and hyperparameters as
    # the optimizer has them now (load_universal brings back the saved names: after a save
    # at ep 2, the expert group of an ep 4 engine is still called ep_size_2).
    split = _optimizer(p for _, p in named).param_groups
    assert [bool(g.get("moe")) for g in split] == [bool(g.get("moe")) for g in opt.param_groups], (
        [g.get("name") for g in split],
        [g.get("name") for g in opt.param_groups],
    )
    groups = [
        {
            "name": g.get("name"),
            "moe": bool(g.get("moe", False)),
            "params": [pid[id(p)] for p in s["params"]],
            "weight_decay": float(g["weight_decay"]),
            "lr": float(g["lr"]),
            "betas": list(g["betas"]),
            "eps": float(g["eps"]),
        }
        for s, g in zip(split, opt.param_groups, strict=True)
    ]
    group_of = {n: gi for gi, g in enumerate(groups) for n in g["params"]}
    params_meta = [
        {
            "name": n,
            "shape": list(full[f"fp32/{n}"].shape),
            "local_shape": list(_shape(p)),
            "dtype": str(p.dtype).replace("torch.", ""),
            "group": group_of[n],
            "expert": n in layer_of,
            "layer": layer_of.get(n),
        }
        for n, p in named
    ]
    flat_steps = {s for g in opt_steps for s in g}
    sched = engine.lr_scheduler
    meta = {
        "step": int(flat_steps.pop()) if len(flat_steps) == 1 else None,
        "optimizer_steps": opt_steps,
        "global_steps": int(engine.global_steps),
        "global_samples": int(engine.global_samples),
        "skipped_steps": int(engine.skipped_steps),
        "lr_scheduler": ds_make._jsonable(sched.state_dict()) if sched is not None else None,
        "lr_scheduler_class": type(sched).__name__ if sched is not None else None,
        "lr": [float(x) for x in engine.get_lr()],
        "optimizer_class": type(opt).__name__,
        "zero_stage": int(engine.zero_optimization_stage()),
        "ep_size": case["ep"],
        "autoep_layers": [
            {
                "layer": i,
                "module": m,
                "num_experts": layer.num_experts,
                "num_local_experts": layer.num_local_experts,
                "ep_size": layer.ep_size,
                "experts": [f"{m}.experts.{w}" for w in EXPERTS],
            }
            for i, (m, layer) in enumerate(layers)
        ],
        "params": params_meta,
        "trainable": [n for n, _ in named],
        "aliases": aliases,
        "param_groups": groups,
        "partition_count": ds_make._jsonable(getattr(opt, "partition_count", None)),
        "hf_params": [{"name": k, "shape": v} for k, v in hf_shapes.items()],
        "hf_map": _full_stops(mapping, hf_shapes),
        "hf_config": dict(case["model"]),
        "versions": {"deepspeed": deepspeed.__version__, "torch": torch.__version__},
    }
    return tensors, meta


def saved_autoep_layers(tag_dir: Path, stage: int, world: int) -> dict[str, Any]:
    """``ds_autoep_layers`` as DeepSpeed wrote it: rank 0's, and at ZeRO-3 every rank's."""
    import torch

    if stage < 3:
        sd = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=True)
        return {"ds_autoep_layers": sd["ds_autoep_layers"]}
    by_rank = {
        str(r): torch.load(
            tag_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt", weights_only=True
        )["ds_autoep_layers"]
        for r in range(world)
    }
    return {"ds_autoep_layers": by_rank["0"], "ds_autoep_layers_by_rank": by_rank}


# --------------------------------------------------------------------------------------------
# The Hugging Face side
# --------------------------------------------------------------------------------------------


def hf_load_strict(case: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Whether ``MixtralForCausalLM(config).load_state_dict(sd, strict=True)`` takes the
    ``*.safetensors`` files in ``directory`` (merged; a key in two files is an error):
    {"files", "missing", "unexpected" (key names against the model's state dict), "error"
    (what load_state_dict raised, e.g. a size mismatch; None if it took them)}."""
    from safetensors.torch import load_file
    from transformers import MixtralConfig, MixtralForCausalLM

    files = sorted(Path(directory).glob("*.safetensors"))
    report: dict[str, Any] = {
        "files": [f.name for f in files],
        "missing": [],
        "unexpected": [],
        "error": None,
    }
    if not files:
        report["error"] = f"no *.safetensors in {directory}"
        return report
    sd: dict[str, Any] = {}
    for f in files:
        part = load_file(str(f))
        twice = sorted(set(sd) & set(part))
        if twice:
            report["error"] = f"{f.name} repeats {twice[:5]} ({len(twice)} keys)"
            return report
        sd.update(part)
    model = MixtralForCausalLM(MixtralConfig(**case["model"]))
    want = list(model.state_dict())
    report["missing"] = [k for k in want if k not in sd]
    report["unexpected"] = sorted(set(sd) - set(want))
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as e:  # size mismatches, missing or unexpected keys
        report["error"] = f"{type(e).__name__}: {e}"
    return report


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def make_case(name: str, out: Path, rank: int, world: int) -> None:
    import tempfile

    import torch.distributed as dist
    from safetensors.torch import save_file

    case = CASES[name]
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
        tag = (out / "latest").read_text().strip()
        meta.update(saved_autoep_layers(out / tag, case["stage"], world))
        # The hf/ naming must be a state dict the Hugging Face model takes as it is.
        with tempfile.TemporaryDirectory() as tmp:
            hf = {k[3:]: v.contiguous() for k, v in tensors.items() if k.startswith("hf/")}
            save_file(hf, str(Path(tmp) / "model.safetensors"))
            report = hf_load_strict(case, Path(tmp))
        assert report["error"] is None, report
        meta.update(
            {
                "case": name,
                "case_config": case,
                "ds_config": cfg,
                "world_size": world,
                "tag": tag,
                "losses": losses,
            }
        )
        ds_make.write_truth(tensors, meta, out / "ground_truth.safetensors")
        (out / "DONE").write_text(json.dumps({"case": name, "seconds": time.time() - t0}) + "\n")
    engine.destroy()
    dist.barrier()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", required=True, help="case name(s), comma separated")
    ap.add_argument("--out", type=Path, help="checkpoint root (under torchrun)")
    ap.add_argument("--hf-check", type=Path, help="a folder of *.safetensors (no torchrun)")
    args = ap.parse_args(argv)
    names = [n for n in args.case.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {sorted(CASES)}")
    if args.hf_check is not None:
        if len(names) != 1:
            raise SystemExit("--hf-check takes one case")
        print(json.dumps(hf_load_strict(CASES[names[0]], args.hf_check)))
        return
    if args.out is None:
        raise SystemExit("--out is required under torchrun")
    if len({CASES[n]["ep"] for n in names}) > 1:
        raise SystemExit("cases of different ep sizes cannot share a launch")
    rank, world = ds_make.init_dist()
    import torch.distributed as dist

    def work() -> None:
        for name in names:
            out = args.out if len(names) == 1 else args.out / name
            make_case(name, out, rank, world)
            if rank == 0:
                print(f"ds_autoep: {name} -> {out}", flush=True)
        dist.barrier()

    ds_make.exit_process(work)


if __name__ == "__main__":
    main()
