"""Pipeline- and tensor-parallel cases of the DeepSpeed corpus: models, engines, ground truth.

ds_make.py defines the cases (``PARALLEL_CASES``) and dispatches here for any case with a
``kind``:

    pipe    deepspeed.pipe.PipelineModule of LayerSpecs, pp stages, optional hand-written
            tensor parallelism (tp > 1: PipeModelDataParallelTopology, column-/row-parallel
            linears with their all-reduces over the tensor-slicing group)
    autotp  a Hugging Face LlamaForCausalLM built from a config (no download), sharded by
            DeepSpeed's AutoTP (``"tensor_parallel": {"autotp_size": tp}``)

Ground truth is written in ds_make's format (see its docstring, "Pipeline and tensor-parallel
cases") with every tensor full: gathered over data parallelism by DeepSpeed's
safe_get_full_* accessors (or read from the torch optimizer at ZeRO-0, where they return
None), over pipeline stages and tensor-parallel ranks by an all_gather to rank 0, and
joined along each parameter's split dimension. The split dimensions are not declared by
hand: they are read off the shard shapes against an unsharded reference model built from
the same seeds, and checked value by value against that reference right after
deepspeed.initialize (``check_tp_layout``), before any training.

This file imports torch, deepspeed and transformers only inside functions.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import ds_make

GAS_PIPE = 2  # micro-batches per pipeline step, so the schedule interleaves


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def data_parallel(case: dict[str, Any], world: int) -> int:
    """The data-parallel size of ``case`` at ``world`` ranks (world = pp * tp * dp)."""
    model_parallel = case.get("pp", 1) * case.get("tp", 1)
    if world % model_parallel:
        raise SystemExit(f"world {world} is no multiple of pp*tp = {model_parallel}")
    return world // model_parallel


def ds_config(case: dict[str, Any], world: int, universal: bool = False) -> dict[str, Any]:
    """ds_make's config for the case's data-parallel size, plus the parallel settings."""
    dp = data_parallel(case, world)
    cfg = ds_make.ds_config(case, dp, universal=universal)
    if case["kind"] == "pipe":
        cfg["gradient_accumulation_steps"] = GAS_PIPE
        cfg["train_batch_size"] = ds_make.MICRO_BATCH * GAS_PIPE * dp
    else:
        cfg["tensor_parallel"] = {"autotp_size": case["tp"]}
        # DeepSpeed checks train_batch_size against the whole world before AutoTP sets up its
        # groups (so it would ask for micro * tp * dp); leave it to DeepSpeed to derive.
        del cfg["train_batch_size"]
    return cfg


def param_groups(module) -> list[dict[str, Any]]:
    """Two groups: matrices decay, vectors do not (the rule of ds_make.DECAY, by shape)."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": ds_make.WEIGHT_DECAY[0]},
        {"params": no_decay, "weight_decay": ds_make.WEIGHT_DECAY[1]},
    ]


# --------------------------------------------------------------------------------------------
# The pipeline model: [embed (tied), Block x blocks, Final, head (tied to embed)]
# --------------------------------------------------------------------------------------------


@functools.cache
def _pipe_classes() -> dict[str, Any]:
    """The layer classes (defined lazily: torch is imported only here)."""
    import torch
    import torch.distributed as dist
    from torch import nn

    class CopyToTP(torch.autograd.Function):
        """Identity forward; backward sums the input gradient over the TP group."""

        @staticmethod
        def forward(ctx, x, group):
            ctx.group = group
            return x

        @staticmethod
        def backward(ctx, grad):
            grad = grad.clone()
            dist.all_reduce(grad, group=ctx.group)
            return grad, None

    class ReduceFromTP(torch.autograd.Function):
        """Forward sums the partial outputs over the TP group; identity backward."""

        @staticmethod
        def forward(ctx, x, group):
            x = x.clone()
            dist.all_reduce(x, group=group)
            return x

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    def split(t, dim: int, rank: int, size: int):
        return nn.Parameter(t.detach().chunk(size, dim)[rank].clone())

    class ColumnParallelLinear(nn.Module):
        """Rows of ``full`` (weight and bias split on dim 0): the output is TP-sharded."""

        def __init__(self, full: nn.Linear, tp_rank: int, tp: int) -> None:
            super().__init__()
            self.tp = tp
            self.tp_group = None  # set by build_pipe once the grid exists
            self.weight = split(full.weight, 0, tp_rank, tp)
            self.bias = split(full.bias, 0, tp_rank, tp)
            for p in (self.weight, self.bias):
                p.tensor_model_parallel = tp > 1

        def forward(self, x):
            if self.tp > 1:
                x = CopyToTP.apply(x, self.tp_group)
            return nn.functional.linear(x, self.weight, self.bias)

    class RowParallelLinear(nn.Module):
        """Columns of ``full`` (weight split on dim 1, bias replicated): sums over TP."""

        def __init__(self, full: nn.Linear, tp_rank: int, tp: int) -> None:
            super().__init__()
            self.tp = tp
            self.tp_group = None
            self.weight = split(full.weight, 1, tp_rank, tp)
            self.bias = nn.Parameter(full.bias.detach().clone())
            self.weight.tensor_model_parallel = tp > 1

        def forward(self, x):
            y = nn.functional.linear(x, self.weight)
            if self.tp > 1:
                y = ReduceFromTP.apply(y, self.tp_group)
            return y + self.bias

    class Block(nn.Module):
        """x * table + fc2(relu(fc1(x))); fc1 column-, fc2 row-parallel. The full linears
        are drawn first at any tp, so every tp slices the same seeded weights."""

        def __init__(self, hidden: int, ffn: int, tp_rank: int = 0, tp: int = 1) -> None:
            super().__init__()
            full1, full2 = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)
            self.fc1 = ColumnParallelLinear(full1, tp_rank, tp)
            self.fc2 = RowParallelLinear(full2, tp_rank, tp)
            self.register_buffer("table", torch.linspace(0.5, 1.5, hidden))

        def forward(self, x):
            return x * self.table.to(x.dtype) + self.fc2(torch.relu(self.fc1(x)))

    class Final(nn.Module):
        """LayerNorm, a (1,)-shaped scale, a frozen shift and a step-counting buffer."""

        def __init__(self, hidden: int) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(hidden)
            self.scale = nn.Parameter(torch.ones(1))
            self.shift = nn.Parameter(torch.randn(hidden) * 0.1, requires_grad=False)
            self.register_buffer("counter", torch.zeros(1))

        def forward(self, x):
            if self.training:
                with torch.no_grad():
                    self.counter.add_(1)
            return self.norm(x) * self.scale + self.shift

    return {"Block": Block, "Final": Final, "TP_LINEARS": (ColumnParallelLinear, RowParallelLinear)}


def _tied_head(embed, x):
    """The output projection: the tied embedding's weight as a linear layer."""
    from torch import nn

    return nn.functional.linear(x, embed.weight)


def _pipe_loss(vocab: int, logits, labels):
    from torch import nn

    return nn.functional.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1))


def pipe_specs(model: dict[str, Any], tp_rank: int = 0, tp: int = 1) -> list[Any]:
    """The layer specs: index 0 and the last index share the "embed" module."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec
    from torch import nn

    c = _pipe_classes()
    vocab, hidden, ffn = model["vocab"], model["hidden"], model["ffn"]
    return [
        TiedLayerSpec("embed", nn.Embedding, vocab, hidden),
        *[LayerSpec(c["Block"], hidden, ffn, tp_rank, tp) for _ in range(model["blocks"])],
        LayerSpec(c["Final"], hidden),
        TiedLayerSpec("embed", nn.Embedding, vocab, hidden, forward_fn=_tied_head),
    ]


def _seed(seed: int) -> None:
    # PipelineModule's default seeding passes a numpy int to random.seed: a TypeError on
    # Python 3.11.
    from deepspeed.runtime.utils import set_random_seed

    set_random_seed(int(seed))


def pipe_topology(case: dict[str, Any], dp: int):
    from deepspeed.runtime.pipe.topology import (
        PipeDataParallelTopology,
        PipeModelDataParallelTopology,
    )

    if case["tp"] > 1:
        return PipeModelDataParallelTopology(num_pp=case["pp"], num_mp=case["tp"], num_dp=dp)
    return PipeDataParallelTopology(num_pp=case["pp"], num_dp=dp)


def build_pipe(case: dict[str, Any], dp: int):
    """The PipelineModule of ``case`` on this rank (its stage's layers, its TP slices)."""
    import torch.distributed as dist
    from deepspeed.pipe import PipelineModule

    topo = pipe_topology(case, dp)
    coord = topo.get_coord(dist.get_rank())
    tp_rank = coord.model if case["tp"] > 1 else 0
    model = PipelineModule(
        pipe_specs(case["model"], tp_rank, case["tp"]),
        topology=topo,
        loss_fn=functools.partial(_pipe_loss, case["model"]["vocab"]),
        partition_method="uniform",
        seed_layers=True,
        seed_fn=_seed,
        base_seed=ds_make.SEED,
    )
    group = model.mpu().get_slice_parallel_group()
    for m in model.modules():
        if isinstance(m, _pipe_classes()["TP_LINEARS"]):
            m.tp_group = group
    return model


def pipe_reference(case: dict[str, Any]) -> dict[str, Any]:
    """The unsharded pipeline model's initial state under PipelineModule names.

    Each layer is built at tp=1 after the seed PipelineModule sets for its index; a tied
    module keeps the value built at its first index (PipelineModule broadcasts that one).
    """
    from deepspeed.pipe import TiedLayerSpec

    state: dict[str, Any] = {}
    for idx, spec in enumerate(pipe_specs(case["model"])):
        if isinstance(spec, TiedLayerSpec):
            prefix = f"tied_modules.{spec.key}."
            if any(k.startswith(prefix) for k in state):
                continue
        else:
            prefix = f"{idx}."
        _seed(ds_make.SEED + idx)
        for k, v in spec.build().state_dict().items():
            state[prefix + k] = v.detach().clone()
    return state


def pipe_layer_files(case: dict[str, Any]) -> dict[str, int]:
    """{module prefix: layer index of the ``layer_XX-*`` file holding it}.

    A tied module is saved under the index of each of its positions whose forward is the
    module itself; a position with a ``forward_fn`` saves nothing (so: its first index).
    """
    from deepspeed.pipe import TiedLayerSpec

    out: dict[str, int] = {}
    for idx, spec in enumerate(pipe_specs(case["model"])):
        if isinstance(spec, TiedLayerSpec):
            if spec.forward_fn is None:
                out.setdefault(f"tied_modules.{spec.key}.", idx)
        else:
            out[f"{idx}."] = idx
    return out


# --------------------------------------------------------------------------------------------
# The AutoTP model: a tiny LlamaForCausalLM (GQA) from a config
# --------------------------------------------------------------------------------------------


def build_llama(case: dict[str, Any]):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(ds_make.SEED)
    return LlamaForCausalLM(LlamaConfig(**case["model"]))


# --------------------------------------------------------------------------------------------
# Engine, coordinates, training
# --------------------------------------------------------------------------------------------


def build_engine(case: dict[str, Any], world: int, universal: bool = False):
    """deepspeed.initialize the case's model at ``world`` ranks; checks the TP layout."""
    import deepspeed
    import torch

    dp = data_parallel(case, world)
    if case["kind"] == "pipe":
        model = build_pipe(case, dp)
        reference = pipe_reference(case)
    else:
        model = build_llama(case)
        reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(param_groups(model), lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    cfg = ds_config(case, world, universal=universal)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    check_tp_layout(engine, case, reference)
    return engine, cfg


def coord(engine, case: dict[str, Any]) -> dict[str, int]:
    """This rank's stage, tp rank, dp rank and checkpoint mp rank (stage * tp + tp rank)."""
    if case["kind"] == "pipe":
        grid = engine.grid
        c = {
            "stage": grid.get_stage_id(),
            "tp_rank": grid.get_slice_parallel_rank(),
            "dp_rank": grid.get_data_parallel_rank(),
            "mp_rank": grid.get_model_parallel_rank(),
        }
    else:
        mpu = engine.mpu
        tp_rank = mpu.get_tensor_model_parallel_rank()
        c = {
            "stage": 0,
            "tp_rank": tp_rank,
            "dp_rank": mpu.get_data_parallel_rank(),
            "mp_rank": tp_rank,
        }
    assert c["mp_rank"] == c["stage"] * case["tp"] + c["tp_rank"], c
    return c


def _batch(case: dict[str, Any], step: int, micro: int, dp_rank: int):
    """Tokens and targets of one micro-batch: a function of the data-parallel rank only
    (TP ranks must see the same data; DeepSpeed checks that for AutoTP)."""
    import torch

    vocab = case["model"]["vocab"] if case["kind"] == "pipe" else case["model"]["vocab_size"]
    g = torch.Generator().manual_seed(1000 + 97 * step + 13 * micro + dp_rank)
    tokens = torch.randint(0, vocab, (ds_make.MICRO_BATCH, ds_make.SEQ), generator=g)
    targets = torch.randint(0, vocab, (ds_make.MICRO_BATCH, ds_make.SEQ), generator=g)
    return tokens, targets


def train(engine, case: dict[str, Any], rank: int, steps: int = ds_make.STEPS) -> list[float]:
    """``steps`` optimizer steps (a pipeline step runs GAS_PIPE micro-batches)."""
    dp_rank = coord(engine, case)["dp_rank"]
    start = int(engine.global_steps)  # fresh data after a reload, too
    losses = []
    for step in range(start, start + steps):
        if case["kind"] == "pipe":
            batches = iter([_batch(case, step, m, dp_rank) for m in range(GAS_PIPE)])
            loss = engine.train_batch(data_iter=batches)
        else:
            tokens, targets = _batch(case, step, 0, dp_rank)
            loss = engine(input_ids=tokens, labels=targets).loss
            engine.backward(loss)
            engine.step()
        losses.append(float(loss.detach()))
    return losses


# --------------------------------------------------------------------------------------------
# Gathering shards to rank 0 and joining them
# --------------------------------------------------------------------------------------------


def _gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (all ranks must call)."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def split_dim(full: tuple[int, ...], shards: list[tuple[int, ...]]) -> int | None:
    """The dimension the TP shards split ``full`` on; None when every shard is the full
    shape (replicated). Raises when the shapes fit no single-dimension split."""
    if all(s == full for s in shards):
        return None
    dims = {d for s in shards for d in range(len(full)) if len(s) == len(full) and s[d] != full[d]}
    if len(dims) != 1 or any(len(s) != len(full) for s in shards):
        raise AssertionError(f"shards {shards} are no split of {full}")
    (dim,) = dims
    if sum(s[dim] for s in shards) != full[dim]:
        raise AssertionError(f"shards {shards} do not add up to {full} on dim {dim}")
    return dim


def join(shards: list[Any], dim: int | None):
    """The full tensor from TP shards in tp-rank order: concatenated on ``dim``, or, when
    replicated, the first one (all must be equal)."""
    import torch

    if dim is None:
        for s in shards[1:]:
            assert torch.equal(s, shards[0]), "replicated shards differ across TP ranks"
        return shards[0]
    return torch.cat(shards, dim=dim)


def _collect(payloads: list[dict[str, Any]], tp: int) -> dict[str, dict[int, Any]]:
    """{key: {tp_rank: shard}} from data-parallel rank 0 of every (stage, tp rank); a key
    held by several stages (a tied module) must be equal in all of them."""
    import torch

    out: dict[str, dict[int, Any]] = {}
    owner: dict[tuple[str, int], int] = {}
    for pl in sorted(payloads, key=lambda p: (p["coord"]["stage"], p["coord"]["tp_rank"])):
        c = pl["coord"]
        if c["dp_rank"] != 0:
            continue
        for key, t in pl["tensors"].items():
            got = out.setdefault(key, {})
            if c["tp_rank"] in got:
                assert torch.equal(got[c["tp_rank"]], t), (
                    f"{key} differs between stages {owner[key, c['tp_rank']]} and {c['stage']}"
                )
                continue
            got[c["tp_rank"]] = t
            owner[key, c["tp_rank"]] = c["stage"]
    for key, got in out.items():
        assert sorted(got) == list(range(tp)), (key, sorted(got))
    return out


def _shape(p) -> tuple[int, ...]:
    """A parameter's (TP-local) shape, also when ZeRO-3 has partitioned it away."""
    return tuple(getattr(p, "ds_shape", p.shape))


def _local_state(module) -> dict[str, Any]:
    """This rank's module tensors in ground-truth keys (weight16/, frozen/, buffer/); a
    collective under ZeRO-3, which gathers each TP-local parameter over data parallelism."""
    from contextlib import nullcontext

    import deepspeed

    params = list(module.parameters())
    zero3 = any(hasattr(p, "ds_shape") for p in params)
    gather = (
        deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else nullcontext()
    )
    tensors = {}
    with gather:
        for name, p in module.named_parameters():
            kind = "weight16" if p.requires_grad else "frozen"
            tensors[f"{kind}/{name}"] = p.detach().float().cpu().reshape(_shape(p)).clone()
    for name in ds_make._persistent_buffers(module):
        tensors[f"buffer/{name}"] = module.get_buffer(name).detach().float().cpu().clone()
    return tensors


def _tp_layout(shards: dict[str, dict[int, Any]], full_shapes: dict[str, tuple[int, ...]]):
    """{name: {"dim": split dim or None, "sizes": per-tp-rank extent on dim}}."""
    layout: dict[str, dict[str, Any]] = {}
    for key, got in shards.items():
        name = key.split("/", 1)[1]
        shapes = [tuple(got[r].shape) for r in sorted(got)]
        dim = split_dim(full_shapes[name], shapes)
        entry = {"dim": dim, "sizes": None if dim is None else [s[dim] for s in shapes]}
        assert layout.setdefault(name, entry) == entry, (name, layout[name], entry)
    return layout


def check_tp_layout(engine, case: dict[str, Any], reference: dict[str, Any]) -> None:
    """Right after initialize: every module tensor, joined over TP ranks by the split read
    off its shapes, equals the unsharded reference (cast to the engine's dtype)."""
    import torch

    c = coord(engine, case)
    payloads = _gather({"coord": c, "tensors": _local_state(engine.module)})
    shards = _collect(payloads, case["tp"])
    full_shapes = {k: tuple(v.shape) for k, v in reference.items()}
    layout = _tp_layout(shards, full_shapes)
    assert set(layout) == set(reference), sorted(set(layout) ^ set(reference))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[case["dtype"]]
    for key, got in shards.items():
        name = key.split("/", 1)[1]
        # DeepSpeed casts parameters, frozen ones included, to the 16-bit dtype; buffers stay.
        want = reference[name] if key.startswith("buffer/") else reference[name].to(dtype)
        want = want.float()
        joined = join([got[r] for r in range(case["tp"])], layout[name]["dim"])
        assert torch.equal(joined, want), f"TP shards of {name} do not join to the reference"
    engine._corpus_tp_layout = layout
    engine._corpus_full_shapes = full_shapes


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------


def _hp(p, key: str, base):
    """The fp32 master / Adam moment of ``p``'s TP shard, full over data parallelism."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if math.prod(_shape(p)) == 0:
        # An empty TP slice (AutoTP with more TP ranks than key/value heads): ZeRO gives it
        # no fragment, so there is nothing to read.
        return torch.zeros(_shape(p), dtype=torch.float32)
    if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):  # ZeRO-1/2 fragments, ZeRO-3 pieces
        if key == "fp32":
            return safe_get_full_fp32_param(p)
        return safe_get_full_optimizer_state(p, key)
    # ZeRO-0 without a 16-bit wrapper: the module's fp32 params are the masters and the torch
    # optimizer keeps the moments per param (the accessors return None here).
    assert p.dtype.is_floating_point and p.element_size() == 4, p.dtype
    return p if key == "fp32" else base.state[p][key]


def _rank_meta(engine, case: dict[str, Any]) -> dict[str, Any]:
    """What one rank knows: its params in order, optimizer groups, scalars to agree on."""
    module, opt = engine.module, engine.optimizer
    base = ds_make._base_optimizer(engine)
    names = {id(p): n for n, p in module.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in param_groups(module)]
    if case["stage"] == 0:
        flat = [[names[id(p)] for p in g["params"]] for g in base.param_groups]
        steps = [[float(base.state[p]["step"]) for p in g["params"]] for g in base.param_groups]
    else:
        lp = (
            getattr(opt, "round_robin_bit16_groups", None)
            or getattr(opt, "bf16_groups", None)
            or opt.fp16_groups  # ZeRO-3: its sub-groups
        )
        flat = [[names[id(p)] for p in g] for g in lp]
        if case["stage"] == 3:  # the base optimizer steps one flat fp32 sub-group at a time
            flats = list(opt.fp32_partitioned_groups_flat)
            group_of = [opt.sub_group_to_group_id[i] for i in range(len(flats))]
        else:
            flats = [f for g in base.param_groups for f in g["params"]]
            group_of = [gi for gi, g in enumerate(base.param_groups) for _ in g["params"]]
        steps = [[] for _ in base.param_groups]
        for f, gi in zip(flats, group_of, strict=True):
            if "step" in base.state.get(f, {}):
                steps[gi].append(float(base.state[f]["step"]))
    scaler = getattr(opt, "loss_scaler", None)
    sched = engine.lr_scheduler
    persistent = ds_make._persistent_buffers(module)
    layers = None
    if case["kind"] == "pipe":
        layers = [module._local_start, module._local_stop]
    return {
        "coord": coord(engine, case),
        "layers": layers,
        "params": [
            {
                "name": n,
                "shape": list(_shape(p)),
                "dtype": str(p.dtype).replace("torch.", ""),
                "requires_grad": bool(p.requires_grad),
            }
            for n, p in module.named_parameters()
        ],
        "param_groups": groups,
        "flat_groups": flat,
        "optimizer_steps": steps,
        "buffers": persistent,
        "non_persistent_buffers": [n for n, _ in module.named_buffers() if n not in persistent],
        "hyper": [
            {
                "lr": float(g["lr"]),
                "weight_decay_loaded": float(g["weight_decay"]),
                "betas": list(g["betas"]),
                "eps": float(g["eps"]),
            }
            for g in opt.param_groups
        ],
        "scalars": {
            "global_steps": int(engine.global_steps),
            "global_samples": int(engine.global_samples),
            "skipped_steps": int(engine.skipped_steps),
            "lr_scheduler": ds_make._jsonable(sched.state_dict()) if sched is not None else None,
            "lr_scheduler_class": type(sched).__name__ if sched is not None else None,
            "lr": [float(x) for x in engine.get_lr()],
            "optimizer_class": type(opt).__name__,
            "zero_stage": int(engine.zero_optimization_stage()),
            "loss_scaler": None
            if scaler is None
            else {
                "class": type(scaler).__name__,
                **{
                    k: v
                    for k, v in vars(scaler).items()
                    if isinstance(v, (bool, int, float)) and not k.startswith("_")
                },
            },
        },
    }


def capture(engine, case: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full state of a pipeline / TP engine as (fp32 tensors by key, json-able metadata);
    every rank must call, rank 0 gets the result (the others get empty dicts)."""
    import deepspeed
    import torch
    import torch.distributed as dist

    module, opt = engine.module, engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # Re-link the optimizer-state fragments of every group (see ds_make.capture).
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    base = ds_make._base_optimizer(engine)
    tensors = _local_state(module)
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            value = _hp(p, key, base)  # collective over the dp group at ZeRO-1
            assert value is not None, f"no {key} for {name}"
            tensors[f"{key}/{name}"] = value.detach().float().cpu().reshape(_shape(p)).clone()
    c = coord(engine, case)
    rank_meta = _rank_meta(engine, case)
    payloads = _gather({"coord": c, "tensors": tensors if c["dp_rank"] == 0 else {}})
    metas = _gather(rank_meta)
    if dist.get_rank() != 0:
        return {}, {}

    layout, full_shapes = engine._corpus_tp_layout, engine._corpus_full_shapes
    shards = _collect(payloads, case["tp"])
    out = {}
    for key, got in shards.items():
        name = key.split("/", 1)[1]
        out[key] = join([got[r] for r in range(case["tp"])], layout[name]["dim"])
        assert tuple(out[key].shape) == full_shapes[name], (key, out[key].shape)
    return out, _meta(case, metas, layout, full_shapes, deepspeed.__version__, torch.__version__)


def _meta(case, metas, layout, full_shapes, ds_version: str, torch_version: str):
    """The json half of the ground truth from every rank's ``_rank_meta``."""
    pp = case.get("pp", 1)
    scalars = metas[0]["scalars"]
    for m in metas[1:]:
        assert m["scalars"] == scalars, (m["coord"], m["scalars"], scalars)
    steps = {s for m in metas for g in m["optimizer_steps"] for s in g}
    mp_ranks: dict[int, dict[str, Any]] = {}
    for m in sorted(metas, key=lambda m: m["coord"]["mp_rank"]):
        c = m["coord"]
        entry = {
            "mp_rank": c["mp_rank"],
            "stage": c["stage"],
            "tp_rank": c["tp_rank"],
            "layers": m["layers"],
            "params": [p["name"] for p in m["params"]],
            "flat_groups": m["flat_groups"],
            "optimizer_steps": m["optimizer_steps"],
        }
        assert mp_ranks.setdefault(c["mp_rank"], entry) == entry, "dp ranks disagree"
    first: dict[str, dict[str, Any]] = {}  # name -> its entry on the first rank holding it
    stages: dict[str, list[int]] = {}
    for m in metas:
        for p in m["params"]:
            first.setdefault(p["name"], p)
            st = stages.setdefault(p["name"], [])
            if m["coord"]["stage"] not in st:
                st.append(m["coord"]["stage"])
    groups: list[list[str]] = [[], []]
    for m in metas:
        for gi, g in enumerate(m["param_groups"]):
            groups[gi] += [n for n in g if n not in groups[gi]]
    group_of = {n: gi for gi, g in enumerate(groups) for n in g}
    files = pipe_layer_files(case) if case["kind"] == "pipe" else {}
    params_meta = []
    for name, p in first.items():
        entry = {
            "name": name,
            "shape": list(full_shapes[name]),
            "dtype": p["dtype"],
            "requires_grad": p["requires_grad"],
            "tied_to": None,
            "group": group_of.get(name),
            "tp": layout[name],
            "stages": sorted(stages[name]),
        }
        params_meta.append(entry)
    buffers = []
    for m in metas:
        buffers += [b for b in m["buffers"] if b not in buffers]
    layer_files = {}
    for name in [*first, *buffers] if files else []:
        prefix = next(pre for pre in files if name.startswith(pre))
        layer_files[name] = {"layer": files[prefix], "key": name[len(prefix) :]}
    hyper = metas[0]["hyper"]
    param_groups_meta = [
        {"params": g, "weight_decay": ds_make.WEIGHT_DECAY[gi], **hyper[gi]}
        for gi, g in enumerate(groups)
    ]
    return {
        **scalars,
        "step": int(steps.pop()) if len(steps) == 1 else None,
        "topology": {"pp": pp, "tp": case["tp"], "dp": len(metas) // (pp * case["tp"])},
        "mp_ranks": list(mp_ranks.values()),
        "params": params_meta,
        "trainable": [p["name"] for p in params_meta if p["requires_grad"]],
        "frozen": [p["name"] for p in params_meta if not p["requires_grad"]],
        "tied": {},
        "pipe_tied": {p["name"]: p["stages"] for p in params_meta if len(p["stages"]) > 1},
        "tp_layout": layout,
        "layer_files": layer_files,
        "param_groups": param_groups_meta,
        "buffers": buffers,
        "non_persistent_buffers": sorted({b for m in metas for b in m["non_persistent_buffers"]}),
        "versions": {"deepspeed": ds_version, "torch": torch_version},
    }
