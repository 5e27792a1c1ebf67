"""layoutc convert of a real >= 1 GB DeepSpeed native Mixture-of-Experts checkpoint, against
the disk's floor for the same output bytes and against DeepSpeed's own converters.

One run builds (or reuses) the checkpoint, then times and measures, side by side:

    build             torchrun (world 4, CPU, gloo) of a model with two native MoE layers
                      (``deepspeed.moe.layer.MoE``, 4 experts each, Sequential(Linear(2048,
                      4096), ReLU, Linear(4096, 2048)), top-1 gating, ep 2) between dense
                      Linear(2048, 2048) layers; bf16, ZeRO-2, torch AdamW over the groups of
                      ``split_params_into_different_moe_groups_for_optimizer``; 2 steps,
                      engine.save_checkpoint -> ~2.0 GB; cached under
                      ~/.cache/layoutc-bench/<key> (key: generator source + versions)
    imports           ``python -c IMPORT_PROBE`` (convert_vs_deepspeed.py's): the interpreter
                      start and the imports every conversion pays before moving a byte
    plan (X)          layoutc plan CKPT --to X --json: reading the checkpoint's metadata,
                      inferring its layout and planning, no data moved
    layoutc st        layoutc convert CKPT --to safetensors -o OUT -q      (+ --memory 256MiB)
    layoutc ep=4      layoutc convert CKPT --to deepspeed --set dp=4 --set ep=4 -o OUT -q
                      (a native expert-parallel reshard, ep 2 -> 4)     (+ --memory 256MiB)
    dd (X)            every file of the first layoutc X output, copied at once, each by its
                      own ``dd bs=32M oflag=direct conv=fsync`` from the page cache: the same
                      bytes in files of the same sizes made durable at the disk's direct-IO
                      speed, nothing computed on them -- the floor for writing that output
    zero_to_fp32      deepspeed.utils.zero_to_fp32.convert_zero_checkpoint_to_fp32_state_dict(
                      CKPT, OUT, safe_serialization=True, max_shard_size=None)
    ds_to_universal   python -m deepspeed.checkpoint.ds_to_universal --input_folder CKPT/<tag>
                      --output_folder OUT/<tag> --inject_missing_state

The commands run round-robin, ``--repeat`` rounds (default 2), so that each layoutc row and
its dd floor are measured within the same minutes. DeepSpeed's converters are not expected
to handle native MoE: a failure is a row of the table (its time to failure and the error
line it printed), not a failure of the benchmark. Measurements are harness.measure's (wall,
CPU, the ``sync`` after, max-process RSS, sampled process-tree PSS); the source is read once
before anything is measured and stays in the page cache.

Checked, outside the timings (the benchmark fails if any check fails):

- ``layoutc verify OUT`` passes for the output of every layoutc run, and runs of the same
  conversion write the same manifest (same files, sizes and checksums);
- the safetensors output holds every parameter, each equal to its fp32 master as
  ``safe_get_full_fp32_param`` returned it at save time (``truth_ep<R>.pt`` beside the
  checkpoint), and cast to bf16 equal to the bf16 weight DeepSpeed saved in the model-states
  or expert file (read with torch.load by the --ds-python interpreter);
- the ep = 4 output's expert files and dense module weights hold the source's tensors.

Run (the main process needs only the standard library)::

    LAYOUTC_DS_PYTHON=/tmp/dsvenv/bin/python /tmp/v/bin/python benchmarks/convert_moe_vs_deepspeed.py

``--ds-python`` (default ``$LAYOUTC_DS_PYTHON``, else this interpreter) needs torch and
deepspeed; ``--layoutc`` (default: the ``layoutc`` next to this interpreter, else on PATH);
``--layoutc-python`` (default: the ``python`` beside ``--layoutc``, else this interpreter)
runs the imports probe. The script launches itself under torchrun with ``--worker`` to build
the checkpoint, and with ``--check`` (in --ds-python) to compare the outputs with it.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, beside this script

# The same DeepSpeed config (ZeRO-2, bf16, torch AdamW) and imports probe as the dense one.
from convert_vs_deepspeed import IMPORT_PROBE, MICRO_BATCH, ds_config
from harness import (
    OUTDIR,
    Job,
    arguments,
    checkpoint,
    conversion_jobs,
    ds_env,
    ds_to_universal,
    finish_check,
    keep_floor,
    layoutc_python,
    machine_line,
    mib,
    note_error,
    parse,
    plan_prediction,
    print_runs,
    round_robin,
    run_check,
    same_manifest,
    verify_output,
    versions,
    warm,
    zero_to_fp32,
)

HERE = Path(__file__).resolve()

# Per expert 2 x 2048 x 4096 weights + biases: 16,783,360 params; 8 experts; with the dense
# layers and gates ~143M params, 14 bytes each in the checkpoint (bf16 weight, fp32 master,
# two fp32 Adam moments): ~2.0 GB.
MODEL = {"hidden": 2048, "ffn": 4096, "experts": 4, "moe_layers": 2, "k": 1, "head": 16}
WORLD = 4
EP = 2
STEPS = 2
SEQ = 8
SEED = 1234
AUX_LOSS = 0.01
MEMORY_BUDGET = "256MiB"
BUDGET_SLACK = 128 * 2**20  # a --memory run's peak RSS may exceed the budget by this much
EXPERT_KEY = re.compile(r"^(?P<pre>.*\.deepspeed_moe\.experts\.deepspeed_experts\.)(?P<id>\d+)\.")

# The conversions measured: name -> (--to, --set values).
TARGETS = {
    "safetensors": ("safetensors", ()),
    f"deepspeed dp={WORLD} ep={2 * EP}": ("deepspeed", (f"dp={WORLD}", f"ep={2 * EP}")),
}


# ------------------------------------------------------------------------------------------
# The checkpoint generator (runs under torchrun, one process per rank; torch and deepspeed
# are imported here only)
# ------------------------------------------------------------------------------------------


def worker(out: Path) -> None:
    """Train the MoE model ``STEPS`` steps with ZeRO-2 at ep = ``EP``, save a checkpoint to
    ``out``, and the fp32 masters beside it: ``truth_ep<R>.pt`` from the first
    expert-data-parallel rank of each expert-parallel coordinate R (the dense parameters in
    R = 0's), every expert under the global name its expert file uses."""
    from datetime import timedelta

    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    from deepspeed.utils import safe_get_full_fp32_param
    from torch import nn

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    ep_rank = rank % EP  # expert-parallel groups are consecutive ranks
    h, f = MODEL["hidden"], MODEL["ffn"]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense_in = nn.Linear(h, h)
            self.moes = nn.ModuleList()
            self.denses = nn.ModuleList()
            for _ in range(MODEL["moe_layers"]):
                expert = nn.Sequential(nn.Linear(h, f), nn.ReLU(), nn.Linear(f, h))
                self.moes.append(
                    MoE(h, expert, num_experts=MODEL["experts"], ep_size=EP, k=MODEL["k"])
                )
                self.denses.append(nn.Linear(h, h))
            self.head = nn.Linear(h, MODEL["head"])

        def forward(self, x):
            x = torch.relu(self.dense_in(x))
            aux = 0.0
            for moe, dense in zip(self.moes, self.denses, strict=True):
                x, a, _ = moe(x)
                x = torch.relu(dense(x))
                aux = aux + a
            return self.head(x), aux

    torch.manual_seed(SEED)
    model = Net()
    # MoE deep-copies one expert into every local slot: redraw each from a seed of its
    # (layer, global id), so that no two experts are equal and a mix-up would show.
    for layer, moe in enumerate(model.moes):
        for local, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            g = torch.Generator().manual_seed(SEED + 1000 * (layer + 1) + ep_rank * 100 + local)
            with torch.no_grad():
                for p in expert.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = split_params_into_different_moe_groups_for_optimizer(
        [
            {"params": decay, "name": "decay", "weight_decay": 0.01},
            {"params": no_decay, "name": "no_decay", "weight_decay": 0.0},
        ]
    )
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(world))
    for step in range(STEPS):
        g = torch.Generator().manual_seed(1000 + 97 * step + rank)
        x = torch.randn(MICRO_BATCH, SEQ, h, generator=g).to(torch.bfloat16)
        y, aux = engine(x)
        loss = y.float().pow(2).mean() + AUX_LOSS * aux
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(str(out))

    truth: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)  # a collective over p's data-parallel group
        m = EXPERT_KEY.match(name)
        if m is not None:
            local = int(m["id"])
            n_local = MODEL["experts"] // EP
            name = f"{m['pre']}{ep_rank * n_local + local}.{name[m.end() :]}"
        elif ep_rank != 0:
            continue
        truth[name] = full.detach().float().reshape(p.shape).clone()
    if rank < EP:  # the first expert-data-parallel rank of each coordinate
        torch.save(truth, out.parent / f"truth_ep{ep_rank}.pt")
    dist.barrier()
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        experts = sum(p.numel() for n, p in model.named_parameters() if EXPERT_KEY.match(n))
        (out / "GENERATED").write_text(
            json.dumps({"params_rank0": params, "expert_params_rank0": experts, "world": world})
            + "\n"
        )
    dist.barrier()


# ------------------------------------------------------------------------------------------
# The content check (runs in --ds-python: torch.load of DeepSpeed's files)
# ------------------------------------------------------------------------------------------


def check(ckpt: Path, st_out: Path, ds_out: Path) -> None:
    """Compare the outputs with the checkpoint and the masters saved beside it; print a JSON
    summary and exit 1 on any difference."""
    import torch
    from safetensors.torch import load_file

    def load(path: Path) -> dict:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        return sd.get("module", sd)

    tag = (ckpt / "latest").read_text().strip()
    truth: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.parent.glob("truth_ep*.pt")):
        truth.update(torch.load(f, weights_only=True))
    experts = sorted((ckpt / tag).glob("layer_*_expert_*_model_states.pt"))
    saved = load(ckpt / tag / "mp_rank_00_model_states.pt")
    for f in experts:
        saved.update(load(f))
    got: dict[str, torch.Tensor] = {}
    for f in sorted(st_out.glob("*.safetensors")):
        got.update(load_file(f))
    problems: list[str] = []
    if set(got) != set(truth):
        problems.append(
            f"safetensors names: missing {sorted(set(truth) - set(got))[:5]}, "
            f"extra {sorted(set(got) - set(truth))[:5]}"
        )
    masters = weights = 0
    for n in sorted(set(got) & set(truth)):
        if got[n].dtype == torch.float32 and torch.equal(got[n], truth[n]):
            masters += 1
        else:
            problems.append(f"{n}: safetensors {got[n].dtype} differs from the fp32 master")
        if n not in saved:
            problems.append(f"{n}: not among the weights DeepSpeed saved")
        elif torch.equal(got[n].to(saved[n].dtype), saved[n]):
            weights += 1
        else:
            problems.append(f"{n}: cast to {saved[n].dtype}, not the weight DeepSpeed saved")
    same = files = 0
    for f in [ckpt / tag / "mp_rank_00_model_states.pt", *experts]:
        files += 1
        a, b = load(f), load(ds_out / tag / f.name)
        keys = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
        if sorted(keys) != sorted(k for k, v in b.items() if isinstance(v, torch.Tensor)):
            problems.append(f"{f.name}: the ep={2 * EP} output holds other tensors")
            continue
        bad = [k for k in keys if not torch.equal(a[k], b[k])]
        problems += [f"{f.name}: {k} differs in the ep={2 * EP} output" for k in bad]
        same += len(keys) - len(bad)
    summary = {
        "params": len(truth),
        "safetensors_equal_fp32_master": masters,
        "safetensors_bf16_equal_saved_weight": weights,
        "reshard_files_checked": files,
        "reshard_tensors_equal": same,
    }
    finish_check(summary, problems)


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------


def cache_key(vers: dict[str, str]) -> str:
    h = hashlib.sha256()
    for fn in (ds_config, worker):
        h.update(inspect.getsource(fn).encode())
    h.update(
        json.dumps(
            [MODEL, WORLD, EP, STEPS, MICRO_BATCH, SEQ, SEED, AUX_LOSS, vers], sort_keys=True
        ).encode()
    )
    return f"moe_z2_w{WORLD}_ep{EP}_bf16_{MODEL['moe_layers']}x{MODEL['experts']}x{MODEL['hidden']}-ds{vers['deepspeed']}-{h.hexdigest()[:12]}"


def main() -> None:
    ap = arguments(__doc__.splitlines()[0])
    ap.add_argument("--check", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parse(ap, worker)
    if args.check:
        check(*args.check)
        return
    lc_py, lc_ver = layoutc_python(args)
    vers = versions(args.ds_python)
    load_start = os.getloadavg()
    date = time.strftime("%Y-%m-%d")

    bench = checkpoint(args, cache_key(vers), HERE, WORLD, "layoutc-bench-moe-")
    with bench as (tmp, ckpt, build_res):
        tag = (ckpt / "latest").read_text().strip()
        warm(ckpt)

        env_lc = dict(os.environ)
        env_ds = ds_env()
        floors = {t: tmp / f"floor-{i}" for i, t in enumerate(TARGETS)}
        jobs = [Job("layoutc start + imports", [lc_py, "-c", IMPORT_PROBE], env_lc)]
        for t, (to, settings) in TARGETS.items():
            flags = ["--to", to, *(x for v in settings for x in ("--set", v))]
            plan_cmd = [args.layoutc, "plan", str(ckpt), *flags, "--json"]
            convert = [args.layoutc, "convert", str(ckpt), *flags, "-o", OUTDIR, "-q"]
            jobs.append(Job(f"layoutc plan → {t} (no data moved)", plan_cmd, env_lc))
            jobs += conversion_jobs(t, convert, env_lc, MEMORY_BUDGET)
        jobs += [
            Job(
                "DeepSpeed zero_to_fp32 (safetensors)",
                zero_to_fp32(args.ds_python, ckpt),
                env_ds,
                ds=True,
            ),
            Job(
                "DeepSpeed ds_to_universal --inject_missing_state",
                ds_to_universal(args.ds_python, ckpt, tag),
                env_ds,
                ds=True,
            ),
        ]
        predictions = {
            t: plan_prediction(args.layoutc, ckpt, to, None, *settings)
            for t, (to, settings) in TARGETS.items()
        }
        manifests: dict[str, str] = {}
        checks: list[str] = []
        for k, job, run, out in round_robin(jobs, args.repeat, tmp, floors):
            if run.rc != 0 and job.ds:
                note_error(job.result, run.log, ckpt)
            if job.target and not job.dd and run.rc == 0:
                job.result.note = run.log.strip().splitlines()[-1][:300]
                v = verify_output(args.layoutc, job, k, out, checks)
                if v.returncode != 0:
                    raise SystemExit(f"layoutc verify {out} failed:\n{v.stdout}{v.stderr}")
                if not same_manifest(out, manifests, job.target):
                    raise SystemExit(f"{job.name}: run {k + 1} wrote another manifest")
                keep_floor(out, floors[job.target])
        if all(f.exists() for f in floors.values()):
            c, content = run_check(args.ds_python, HERE, [ckpt, *floors.values()], env_ds)
            if c.returncode != 0:
                raise SystemExit(f"the outputs differ from the checkpoint:\n{c.stdout}{c.stderr}")
        else:
            raise SystemExit("a layoutc conversion failed: nothing to check")

    machine = machine_line(vers, lc_ver, date, load_start, os.getloadavg())
    report(args, jobs, build_res, ckpt, vers, machine, predictions, checks, content)


def report(args, jobs, build_res, ckpt, vers, machine, predictions, checks, content) -> None:
    """Print the Markdown section: the table, every run, the memory and plan checks."""
    gen = json.loads((ckpt / "GENERATED").read_text())
    params = gen["params_rank0"] + (EP - 1) * gen["expert_params_rank0"]
    experts = EP * gen["expert_params_rank0"]
    print()
    print("## Converting a native MoE checkpoint (`benchmarks/convert_moe_vs_deepspeed.py`)")
    print()
    print(machine)
    print()
    print(
        f"Checkpoint: real DeepSpeed {vers['deepspeed']} native MoE, ZeRO-2, world {WORLD}, "
        f"ep {EP}, bf16, AdamW, {STEPS} steps; {MODEL['moe_layers']} MoE layers of "
        f"{MODEL['experts']} experts (Linear({MODEL['hidden']}, {MODEL['ffn']}), ReLU, "
        f"Linear({MODEL['ffn']}, {MODEL['hidden']}); top-{MODEL['k']}) and dense layers: "
        f"{params:,} params, {experts:,} of them in experts; {build_res.files} files, "
        f"{build_res.disk / 1e9:.2f} GB, read from a warm page cache. Wall = best of "
        f"{args.repeat} rounds (commands round-robin); vs dd = wall / the best wall of the "
        f"`dd oflag=direct` copy of that conversion's own output files; memory columns are "
        f"the worst run's."
    )
    print()
    print_runs(build_res, jobs)
    print()
    budget = 256 * 2**20 + BUDGET_SLACK
    for j in jobs:
        if j.memory and j.result.ok:
            peak = j.result.stat("maxrss")
            verdict = "within" if peak <= budget else "OVER"
            print(
                f"- {j.name}: peak RSS {mib(peak)} MiB, {verdict} the budget + "
                f"{BUDGET_SLACK // 2**20} MiB ({budget // 2**20} MiB)"
            )
    for t, s in predictions.items():
        r = next(j.result for j in jobs if j.target == t and not j.dd and not j.memory)
        if "error" in s:
            print(f"- plan → {t} failed: {s['error']}")
            continue
        w = s["bytes_written"]
        print(
            f"- plan → {t}: predicted {w:,} bytes written, {r.data:,} on disk minus metadata "
            f"({100 * (r.data - w) / w:+.3f} %); predicted peak memory "
            f"{mib(s['peak_memory_bytes'])} MiB"
        )
    for j in jobs:
        if j.result.note and not j.ds:
            print(f"- {j.name}: {j.result.note}")
    print(
        f"- checks: {len(checks)} `layoutc verify` runs passed; runs of one conversion wrote "
        f"the same manifest; content: {json.dumps(content)}"
    )


if __name__ == "__main__":
    main()
