"""DeepSpeed native Mixture-of-Experts cases of the corpus: model, engine, ground truth, driver.

Run under torchrun, one process per rank (world = data-parallel size; ep divides it)::

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=/tmp/ext \\
        torchrun --nproc_per_node 4 --master_port 29711 tests/interop/ds_moe.py \\
        --case moe_z2_w4_ep2_bf16,moe_z1_w4_ep2_fp32 --out /tmp/ckpt/moe

``--case`` and ``--out`` work as in ds_make.py (several cases: ``--out/<case>``); every case
of one launch must have the same world size and the same ep. DeepSpeed keeps its expert
groups in process-global state (``deepspeed.utils.groups``), and where it needs one group for
the whole model (the ``expp_rank`` of ZeRO-0 optimizer files, overflow checks) it takes the
largest ep size ever created in the process: an ep = 4 case would leak into a later ep = 2
one. Hence ``launch`` = ``moe-ep<ep>``.

The model (``MOE_MODEL``; odd sizes so that no partition divides evenly)::

    embed   nn.Embedding(vocab, hidden)
    moe1    deepspeed.moe.layer.MoE, experts[0] experts of Linear(hidden, ffn), ReLU,
            Linear(ffn, hidden); top-1 gating
    dense   nn.Linear(hidden, hidden)
    moe2    MoE with use_residual=True (PR-MoE: a dense ``mlp`` copy of the expert and a
            ``coefficient`` Linear(hidden, 2)), experts[1] experts of Linear(hidden, hidden);
            top-2 gating
    head    nn.Linear(hidden, vocab)

MoE deep-copies one expert module into every local expert, so all experts would start equal
(and a reader confusing two experts would go unnoticed). Each expert is therefore re-drawn
from a seed of (MoE layer ordinal, global expert id) before deepspeed.initialize: the same
global expert starts equal at every ep. The optimizer is torch AdamW over two base groups,
decay (matrices) and no_decay (vectors), passed through DeepSpeed's
``split_params_into_different_moe_groups_for_optimizer``, which moves the expert parameters to
two more groups, both named ``ep_size_<ep>`` and flagged ``"moe": True``: four groups in all,
in the order [decay, no_decay, decay experts, no_decay experts]. ZeRO-1/2 partition the
first two over all ranks and the expert groups over the expert-data-parallel group
(world / ep ranks holding the same experts).

Names. An expert parameter's global name is the one DeepSpeed writes in the per-expert files,
``<module>.deepspeed_moe.experts.deepspeed_experts.<G>.<rest>`` with G = ep_rank *
num_local_experts + local id and ep_rank = rank % ep (expert-parallel groups are consecutive
ranks; checked at build time); the rank's module itself names it with the local id.

Ground truth (``ground_truth.safetensors`` / ``.json`` beside the checkpoint, as in
ds_make.py; tensors full, fp32, logical shapes, experts under global names, gathered to rank
0 from the ranks that hold them, every holder checked equal):

    fp32/<param>        fp32 master (safe_get_full_fp32_param; at ZeRO-0 the fp32 param)
    exp_avg/<param>     Adam first moment (safe_get_full_optimizer_state; ZeRO-0: the torch
                        optimizer's state)
    exp_avg_sq/<param>  Adam second moment
    weight16/<param>    the module's weight as saved (bf16 or fp32), cast to fp32

safe_get_full_* all-reduce over the parameter's own data-parallel group: all ranks for dense
parameters, the expert-data-parallel group for expert ones; every rank calls them for its own
parameters in module order, so each expert's full state lands on every rank of its group.

``ground_truth.json`` holds the scalars of ds_make (step, optimizer_steps [per optimizer
group, one per flat buffer at ZeRO-1/2, per parameter at ZeRO-0], global_steps,
global_samples, skipped_steps, lr, lr_scheduler, optimizer_class, zero_stage, losses, ...)
and:

    ep_size             the case's ep
    moe_layers          per MoE layer, in ordinal order: {"layer" (the L of
                        layer_{L}_expert_{G}_...), "module", "num_experts",
                        "num_local_experts", "k", "use_residual"}
    experts             {global expert param name: {"layer", "expert" (G), "local" (local id
                        on its ranks), "ep_rank", "key" (the name inside its file), "file"
                        (layer_{L}_expert_{G}_mp_rank_00_model_states.pt)}}
    params              per parameter (global names; dense ones in module order, then expert
                        ones by (layer, expert)): {"name", "shape", "dtype", "requires_grad",
                        "group" (index of its optimizer group), "moe" (bool)}
    param_groups        the four optimizer groups: {"name", "moe", "params" (global names),
                        "weight_decay", "lr", "betas", "eps", "partition_count" (ranks its
                        flat buffer is partitioned over at ZeRO-1/2, else null)}
    trainable           the global names of all parameters

This file imports torch and deepspeed only inside functions.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ds_make  # after the sys.path insert above

MOE_MODEL: dict[str, Any] = {"vocab": 37, "hidden": 10, "ffn": 7, "experts": [4, 8]}
AUX_LOSS = 0.01  # weight of the gates' load-balancing losses in the training loss
EXPERT_KEY = re.compile(r"^(?P<pre>.*\.deepspeed_moe\.experts\.deepspeed_experts\.)(?P<id>\d+)\.")


def _mcase(stage: int, dtype: str, world: int, ep: int) -> dict[str, Any]:
    return ds_make._case(
        stage, dtype, world, kind="moe", ep=ep, model=dict(MOE_MODEL), launch=f"moe-ep{ep}"
    )


CASES: dict[str, dict[str, Any]] = {
    f"moe_z{s}_w{w}_ep{ep}_{dt}": _mcase(s, dt, w, ep)
    for s, w, ep, dt in (
        # ZeRO-0 (fp32, no ZeRO): expp_rank_{R}_mp_rank_00_optim_states.pt per ep rank.
        (0, 2, 2, "fp32"),
        (0, 4, 2, "fp32"),
        (1, 2, 2, "bf16"),
        (1, 4, 2, "fp32"),
        (1, 4, 4, "bf16"),
        (2, 2, 2, "bf16"),
        (2, 4, 2, "bf16"),
        (2, 4, 2, "fp32"),
        # One local expert per rank in moe1; no expert data parallelism (partition_count 1).
        (2, 4, 4, "bf16"),
    )
}


def at_topology(case: dict[str, Any], world: int, ep: int | None = None) -> dict[str, Any]:
    """``case`` as built at ``world`` ranks and expert-parallel size ``ep`` (to load back)."""
    return {**case, "world": world, "ep": case["ep"] if ep is None else ep}


# --------------------------------------------------------------------------------------------
# Model, optimizer, engine
# --------------------------------------------------------------------------------------------


@functools.cache
def _model_class():
    import torch
    from deepspeed.moe.layer import MoE
    from torch import nn

    class TinyMoE(nn.Module):
        def __init__(self, vocab: int, hidden: int, ffn: int, experts: list[int], ep: int):
            super().__init__()
            self.embed = nn.Embedding(vocab, hidden)
            self.moe1 = MoE(
                hidden_size=hidden,
                expert=nn.Sequential(nn.Linear(hidden, ffn), nn.ReLU(), nn.Linear(ffn, hidden)),
                num_experts=experts[0],
                ep_size=ep,
                k=1,
            )
            self.dense = nn.Linear(hidden, hidden)
            self.moe2 = MoE(
                hidden_size=hidden,
                expert=nn.Linear(hidden, hidden),
                num_experts=experts[1],
                ep_size=ep,
                k=2,
                use_residual=True,
            )
            self.head = nn.Linear(hidden, vocab)

        def forward(self, tokens):
            h = self.embed(tokens)
            h, aux1, _ = self.moe1(h)
            h = torch.relu(self.dense(h))
            h, aux2, _ = self.moe2(h)
            return self.head(h), aux1 + aux2

    return TinyMoE


def moe_layers(module) -> list[tuple[str, Any]]:
    """[(module name, MoE)] in the order DeepSpeed numbers them (named_modules order)."""
    from deepspeed.moe.layer import MoE

    return [(n, m) for n, m in module.named_modules() if isinstance(m, MoE)]


def make_model(case: dict[str, Any], rank: int):
    """The case's model on ``rank``: seeded as a whole, then each local expert re-drawn from
    the seed of its (layer ordinal, global expert id)."""
    import torch

    cls = _model_class()
    torch.manual_seed(ds_make.SEED)
    model = cls(**case["model"], ep=case["ep"])
    ep_rank = rank % case["ep"]
    for layer, (_, moe) in enumerate(moe_layers(model)):
        for local, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            g_id = ep_rank * moe.num_local_experts + local
            g = torch.Generator().manual_seed(ds_make.SEED + 1000 * (layer + 1) + g_id)
            with torch.no_grad():
                for p in expert.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def param_groups(module) -> list[dict[str, Any]]:
    """decay (matrices) and no_decay (vectors), split by DeepSpeed into dense and expert
    groups: [decay, no_decay, decay experts, no_decay experts]."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for _, p in module.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "name": "decay", "weight_decay": ds_make.WEIGHT_DECAY[0]},
        {"params": no_decay, "name": "no_decay", "weight_decay": ds_make.WEIGHT_DECAY[1]},
    ]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def build_engine(case: dict[str, Any], world: int, universal: bool = False):
    """deepspeed.initialize the case's model at ``world`` ranks and the case's ep."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.utils import groups

    rank = dist.get_rank()
    model = make_model(case, rank)
    opt = torch.optim.AdamW(param_groups(model), lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    cfg = ds_make.ds_config(case, world, universal=universal)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    for _, moe in moe_layers(engine.module):
        got = groups._get_expert_parallel_rank(moe.expert_group_name)
        assert got == rank % case["ep"], f"rank {rank}: ep rank {got}, not rank % ep"
    return engine, cfg


def train(engine, case: dict[str, Any], rank: int, steps: int = ds_make.STEPS) -> list[float]:
    """``steps`` optimizer steps on data drawn from (step, rank); fresh data after a reload."""
    import torch

    vocab = case["model"]["vocab"]
    start = int(engine.global_steps)
    losses = []
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + 97 * step + rank)
        tokens = torch.randint(0, vocab, (ds_make.MICRO_BATCH, ds_make.SEQ), generator=g)
        targets = torch.randint(0, vocab, (ds_make.MICRO_BATCH, ds_make.SEQ), generator=g)
        logits, aux = engine(tokens)
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, vocab), targets.reshape(-1)
        )
        loss = loss + AUX_LOSS * aux.float()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------


def global_names(module, ep_rank: int) -> dict[str, dict[str, Any]]:
    """{local param name: {"name": global name, and for an expert param "layer", "expert",
    "local", "module"}} of this rank's module."""
    layers = {f"{n}.": (i, m) for i, (n, m) in enumerate(moe_layers(module))}
    out = {}
    for name, _ in module.named_parameters():
        m = EXPERT_KEY.match(name)
        if m is None:
            out[name] = {"name": name}
            continue
        prefix = next(p for p in layers if name.startswith(p))
        layer, moe = layers[prefix]
        local = int(m["id"])
        g = ep_rank * moe.num_local_experts + local
        out[name] = {
            "name": f"{m['pre']}{g}.{name[m.end() :]}",
            "layer": layer,
            "expert": g,
            "local": local,
            "module": prefix[:-1],
        }
    return out


def _hp(p, key: str, base):
    """Full fp32 master / Adam moment of ``p`` over its own data-parallel group."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if hasattr(p, "_hp_mapping"):
        if key == "fp32":
            return safe_get_full_fp32_param(p)
        return safe_get_full_optimizer_state(p, key)
    # ZeRO-0, fp32: the module's params are the masters; the torch optimizer keeps the moments.
    assert p.dtype.is_floating_point and p.element_size() == 4, p.dtype
    return p if key == "fp32" else base.state[p][key]


def capture(engine, case: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full state of the engine under global names; every rank must call, rank 0 gets it
    (the others get empty dicts). Holders of the same tensor are checked equal."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.moe.utils import is_moe_param

    module, opt = engine.module, engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # Re-link the optimizer-state fragments of every group (see ds_make.capture).
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    base = ds_make._base_optimizer(engine)
    rank = dist.get_rank()
    ep_rank = rank % case["ep"]
    gnames = global_names(module, ep_rank)
    tensors: dict[str, Any] = {}
    for name, p in module.named_parameters():
        gname = gnames[name]["name"]
        tensors[f"weight16/{gname}"] = p.detach().float().cpu().clone()
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            value = _hp(p, key, base)  # a collective over p's data-parallel group
            assert value is not None, f"no {key} for {name}"
            tensors[f"{key}/{gname}"] = value.detach().float().cpu().reshape(p.shape).clone()

    pid = {id(p): n for n, p in module.named_parameters()}
    # Membership from the same split as at build time (ZeRO's own groups hold flat buffers);
    # the hyperparameters from the optimizer as it stands.
    split = param_groups(module)
    assert [(g["name"], g.get("moe", False)) for g in split] == [
        (g.get("name"), g.get("moe", False)) for g in opt.param_groups
    ], "the optimizer's groups are not the split's"
    groups_here = [
        {
            "name": g.get("name"),
            "moe": bool(g.get("moe", False)),
            "params": [gnames[pid[id(p)]]["name"] for p in s["params"]],
            "weight_decay": float(g["weight_decay"]),
            "lr": float(g["lr"]),
            "betas": list(g["betas"]),
            "eps": float(g["eps"]),
        }
        for s, g in zip(split, opt.param_groups, strict=True)
    ]
    if case["stage"] == 0:
        steps = [[float(base.state[p]["step"]) for p in g["params"]] for g in base.param_groups]
        counts = [None] * len(groups_here)
    else:
        steps = [[float(base.state[f]["step"]) for f in g["params"]] for g in base.param_groups]
        counts = [int(c) for c in opt.partition_count]
    payload = {
        "rank": rank,
        "tensors": tensors,
        "gnames": gnames,
        "moe": {gnames[n]["name"]: is_moe_param(p) for n, p in module.named_parameters()},
        "dtype": {
            gnames[n]["name"]: str(p.dtype).replace("torch.", "")
            for n, p in module.named_parameters()
        },
        "groups": groups_here,
        "steps": steps,
        "counts": counts,
    }
    payloads: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(payloads, payload)
    if rank != 0:
        return {}, {}

    out: dict[str, Any] = {}
    held_by: dict[str, int] = {}
    for pl in payloads:
        for key, t in pl["tensors"].items():
            if key in out:
                assert torch.equal(out[key], t), (
                    f"{key}: ranks {held_by[key]} and {pl['rank']} differ"
                )
                continue
            out[key], held_by[key] = t, pl["rank"]
    for pl in payloads[1:]:
        assert pl["steps"] == payloads[0]["steps"], "ranks disagree on optimizer steps"
        assert pl["counts"] == payloads[0]["counts"], "ranks disagree on partition counts"

    layers = []
    for layer, (mname, moe) in enumerate(moe_layers(module)):
        gate = moe.deepspeed_moe.gate
        layers.append(
            {
                "layer": layer,
                "module": mname,
                "num_experts": moe.num_experts,
                "num_local_experts": moe.num_local_experts,
                "k": gate.k,
                "use_residual": bool(moe.use_residual),
            }
        )
    experts: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    moe_flag: dict[str, bool] = {}
    dtypes: dict[str, str] = {}
    for pl in payloads:
        for info in pl["gnames"].values():
            gname = info["name"]
            if gname not in order:
                order.append(gname)
            moe_flag[gname] = pl["moe"][gname]
            dtypes[gname] = pl["dtype"][gname]
            if "expert" in info:
                entry = {
                    "layer": info["layer"],
                    "expert": info["expert"],
                    "local": info["local"],
                    "ep_rank": pl["rank"] % case["ep"],
                    "key": gname,
                    "file": f"layer_{info['layer']}_expert_{info['expert']}_mp_rank_00_model_states.pt",
                }
                assert experts.setdefault(gname, entry) == entry, (gname, experts[gname], entry)
    # Dense params in module order first (as on every rank), then experts by (layer, expert).
    dense = [n for n in order if n not in experts]
    expert_order = sorted(
        experts, key=lambda n: (experts[n]["layer"], experts[n]["expert"], order.index(n))
    )
    names = [*dense, *expert_order]

    groups: list[dict[str, Any]] = []
    for gi, g in enumerate(payloads[0]["groups"]):
        members: list[str] = []
        for pl in payloads:
            members += [n for n in pl["groups"][gi]["params"] if n not in members]
        groups.append(
            {
                **g,
                "params": [n for n in names if n in members],
                "partition_count": payloads[0]["counts"][gi],
            }
        )
    group_of = {n: gi for gi, g in enumerate(groups) for n in g["params"]}

    params_meta = [
        {
            "name": n,
            "shape": list(out[f"fp32/{n}"].shape),
            "dtype": dtypes[n],
            "requires_grad": True,
            "group": group_of[n],
            "moe": moe_flag[n],
        }
        for n in names
    ]
    assert all(moe_flag[n] == (n in experts) for n in names)
    opt_steps = payloads[0]["steps"]
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
        "moe_layers": layers,
        "experts": experts,
        "params": params_meta,
        "trainable": names,
        "param_groups": groups,
        "versions": {"deepspeed": deepspeed.__version__, "torch": torch.__version__},
    }
    return out, meta


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def make_case(name: str, out: Path, rank: int, world: int) -> None:
    import torch.distributed as dist

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
        ds_make.write_truth(tensors, meta, out / "ground_truth.safetensors")
        (out / "DONE").write_text(json.dumps({"case": name, "seconds": time.time() - t0}) + "\n")
    engine.destroy()
    dist.barrier()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", required=True, help="case name(s), comma separated")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    names = [n for n in args.case.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {sorted(CASES)}")
    if len({CASES[n]["ep"] for n in names}) > 1:
        raise SystemExit("cases of different ep sizes cannot share a launch (see the docstring)")
    rank, world = ds_make.init_dist()
    import torch.distributed as dist

    def work() -> None:
        for name in names:
            out = args.out if len(names) == 1 else args.out / name
            make_case(name, out, rank, world)
            if rank == 0:
                print(f"ds_moe: {name} -> {out}", flush=True)
        dist.barrier()

    ds_make.exit_process(work)


if __name__ == "__main__":
    main()
