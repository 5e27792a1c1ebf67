"""layoutc convert of a real >= 1 GB PyTorch Distributed Checkpoint (FSDP2, DCP) against
torch's own ``dcp_to_torch_save`` and against the disk's floor for the same output bytes.

One run builds (or reuses) the checkpoint, then times and measures, side by side:

    build               torchrun (world 2, CPU, gloo) of a ~101M-param model: an
                        Embedding(12289, 2048) (an odd row count: its shards are uneven),
                        18 blocks of LayerNorm(2048) + Linear(2048, 2048), a LayerNorm and a
                        Linear(2048, 33) head; fp32, ``fully_shard`` (FSDP2) on every block
                        and on the root, torch.optim.AdamW, 1 step; then ``get_state_dict``
                        and ``dcp.save({"model": ..., "optim": ...})`` through a
                        ``FileSystemWriter(thread_count=2)`` -> ~1.2 GB (weights, exp_avg,
                        exp_avg_sq); cached under ~/.cache/layoutc-bench/<key> (key:
                        generator source + versions)
    layoutc st          layoutc convert CKPT --to safetensors -o OUT -q   (+ --memory 256MiB)
    layoutc torch       layoutc convert CKPT --to torch -o OUT -q
    dd (X)              every file of the first layoutc X output, copied at once, each by its
                        own ``dd bs=32M oflag=direct conv=fsync`` from the page cache: the
                        same bytes made durable at the disk's direct-IO speed, nothing
                        computed on them -- the floor for writing that output
    dcp_to_torch_save   torch.distributed.checkpoint.format_utils.dcp_to_torch_save(CKPT,
                        OUT/model.pt): the whole checkpoint (model and optimizer) loaded into
                        memory, then one torch.save

The commands run round-robin, ``--repeat`` rounds (default 2), so that each layoutc row and
its dd floor are measured within the same minutes. A command that fails -- a layoutc that
does not read DCP yet included -- is a row of the table (its time to failure and the error
line it printed), not a failure of the benchmark. Measurements are harness.measure's (wall,
CPU, the ``sync`` after, max-process RSS, sampled process-tree PSS); the source is read once
before anything is measured and stays in the page cache. layoutc fsyncs its output and
torch.save does not: "wall + sync" puts them on the same footing.

The targets the report grades: layoutc at least 5x faster than dcp_to_torch_save (wall +
sync) with at most 1/8 of its peak RSS, and within 1.3x of its own dd floor (wall).

Checked, outside the timings (a failed check is reported, and the script then exits 1):

- ``layoutc verify OUT`` passes for the output of every layoutc run, and runs of the same
  conversion write the same manifest;
- the safetensors output holds every model tensor, each equal (``np.array_equal``, same
  dtype and shape) to the one dcp_to_torch_save wrote under ``model`` -- every tensor, in
  full, read with ``torch.load(weights_only=True, mmap=True)`` by the --ds-python
  interpreter; the torch output's model tensors are compared the same way. Output names are
  matched to model fqns with or without the ``model.`` prefix of the DCP key.

Run (the main process needs only the standard library)::

    LAYOUTC_DS_PYTHON=/tmp/v/bin/python /tmp/v/bin/python benchmarks/convert_dcp_vs_torch.py [--only-build]

``--ds-python`` (default ``$LAYOUTC_DS_PYTHON``, else this interpreter) needs torch (and
safetensors, for the check); ``--layoutc`` (default: the ``layoutc`` next to this
interpreter, else on PATH). ``--only-build`` builds (or finds) the checkpoint, prints its
size and the build's measurements, and stops. The script launches itself under torchrun
with ``--worker`` to build the checkpoint, and with ``--check`` (in --ds-python) to compare
the outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, beside this script

from harness import (
    EXCEPTION,
    OUTDIR,
    Job,
    arguments,
    checkpoint,
    conversion_jobs,
    ds_env,
    error_line,
    finish_check,
    keep_floor,
    layoutc_python,
    machine_line,
    mib,
    note_error,
    parse,
    plan_prediction,
    print_runs,
    ratio,
    round_robin,
    run_check,
    same_manifest,
    secs,
    verify_output,
    versions,
    warm,
)

HERE = Path(__file__).resolve()

# Embedding 12289 x 2048 + 18 x (LayerNorm + Linear(2048, 2048)) + LayerNorm + Linear(2048,
# 33): 100,847,649 params, 12 bytes each in the checkpoint (fp32 weight, exp_avg,
# exp_avg_sq): ~1.2 GB. 12289 and 33 rows are odd: rank 0 holds one row more.
MODEL = {"vocab": 12289, "hidden": 2048, "blocks": 18, "head": 33}
WORLD = 2
STEPS = 1
BATCH = 2
SEQ = 16
SEED = 1234
THREADS = 2  # FileSystemWriter(thread_count=...)
MEMORY_BUDGET = "256MiB"
TORCH_SAVE = "model.pt"  # dcp_to_torch_save's output file, in its output folder
# Targets: layoutc / dcp_to_torch_save, wall + sync and max-process RSS; layoutc / its dd.
FASTER, SMALLER, FLOOR = 5.0, 8.0, 1.3

# The conversions measured: name -> --to.
TARGETS = {"safetensors": "safetensors", "torch": "torch"}
# The line that says why a run failed: a traceback's exception, or a command's "error: ".
FAILURE = rf"{EXCEPTION}|.*\berror: "
DCP_TO_TORCH_SAVE = (
    "import pathlib, sys\n"
    "from torch.distributed.checkpoint.format_utils import dcp_to_torch_save\n"
    "out = pathlib.Path(sys.argv[2])\n"
    "out.mkdir(parents=True)\n"
    f"dcp_to_torch_save(sys.argv[1], out / {TORCH_SAVE!r})\n"
)


# ------------------------------------------------------------------------------------------
# The checkpoint generator (runs under torchrun, one process per rank; torch is imported
# here only)
# ------------------------------------------------------------------------------------------


def worker(out: Path) -> None:
    """Train the model ``STEPS`` steps under FSDP2 and save model and optimizer with DCP."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", timeout=timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    h = MODEL["hidden"]

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(h)
            self.fc = nn.Linear(h, h)

        def forward(self, x):
            return x + torch.nn.functional.gelu(self.fc(self.norm(x)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(MODEL["vocab"], h)
            self.blocks = nn.ModuleList(Block() for _ in range(MODEL["blocks"]))
            self.norm = nn.LayerNorm(h)
            self.head = nn.Linear(h, MODEL["head"])

        def forward(self, ids):
            x = self.embed(ids)
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x))

    torch.manual_seed(SEED)  # the same full model on every rank, then sharded
    model = Net()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(1000 + 97 * step + rank)
        ids = torch.randint(MODEL["vocab"], (BATCH, SEQ), generator=g)
        model(ids).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model_sd, optim_sd = get_state_dict(model, opt)
    writer = dcp.FileSystemWriter(str(out), thread_count=THREADS)
    dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=writer)
    dist.barrier()
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())  # DTensors: the global count
        (out / "GENERATED").write_text(json.dumps({"params": params, "world": world}) + "\n")
    dist.barrier()


# ------------------------------------------------------------------------------------------
# The content check (runs in --ds-python: torch.load of dcp_to_torch_save's file)
# ------------------------------------------------------------------------------------------


def model_tensors(sd: dict, fqns: set[str] | None = None) -> dict:
    """The model's tensors in a loaded state dict, by model fqn: ``sd["model"]`` where it is
    a nested dict, else the flat names, those under a ``model.`` prefix (DCP's key) mapped
    to the fqn without it -- to ``fqns``' members only, when given."""
    import torch

    if isinstance(sd.get("model"), dict):
        sd = sd["model"]
    got = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        name = k if fqns is None or k in fqns else k.removeprefix("model.")
        if fqns is None or name in fqns:
            got[name] = v
    return got


def check(saved: Path, outputs: list[Path]) -> None:
    """Compare the model tensors of each layoutc output folder in ``outputs`` with those of
    dcp_to_torch_save's ``saved``; print a JSON summary and exit 1 on any difference."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    truth = model_tensors(torch.load(saved, map_location="cpu", weights_only=True, mmap=True))
    if not truth:
        print(json.dumps({"problems": [f"{saved}: no model tensors"]}))
        sys.exit(1)
    fqns = set(truth)
    summary: dict[str, object] = {"model_tensors": len(truth)}
    problems: list[str] = []
    for out in outputs:
        loaded: dict = {}
        for f in sorted(out.glob("*.safetensors")):
            loaded.update(load_file(f))
        for f in sorted([*out.glob("*.bin"), *out.glob("*.pt")]):
            loaded.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        got = model_tensors(loaded, fqns)
        missing = sorted(fqns - set(got))
        if missing:
            problems.append(f"{out.name}: {len(missing)} model tensors missing: {missing[:5]}")
        equal = 0
        for n in sorted(set(got)):
            a, b = got[n], truth[n]
            if a.dtype != b.dtype or a.shape != b.shape:
                problems.append(
                    f"{out.name}: {n} is {a.dtype} {tuple(a.shape)}, "
                    f"dcp_to_torch_save wrote {b.dtype} {tuple(b.shape)}"
                )
            elif np.array_equal(a.numpy(), b.numpy()):
                equal += 1
            else:
                problems.append(f"{out.name}: {n} differs from dcp_to_torch_save's")
        summary[out.name] = {"equal": equal, "other_tensors": len(loaded) - len(got)}
    finish_check(summary, problems)


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------


def cache_key(vers: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(inspect.getsource(worker).encode())
    h.update(json.dumps([MODEL, WORLD, STEPS, BATCH, SEQ, SEED, THREADS, vers]).encode())
    return f"dcp_fsdp2_w{WORLD}_fp32_{MODEL['blocks']}x{MODEL['hidden']}-torch{vers['torch']}-{h.hexdigest()[:12]}"


def main() -> None:
    ap = arguments(__doc__.splitlines()[0], needs="torch and safetensors")
    ap.add_argument("--check", nargs="+", type=Path, help=argparse.SUPPRESS)
    ap.add_argument(
        "--only-build", action="store_true", help="build (or find) the checkpoint and stop"
    )
    args = parse(ap, worker)
    if args.check:
        check(args.check[0], args.check[1:])
        return
    lc_ver = "-" if args.only_build else layoutc_python(args)[1]
    vers = versions(args.ds_python, ("torch",))
    load_start = os.getloadavg()
    date = time.strftime("%Y-%m-%d")

    bench = checkpoint(args, cache_key(vers), HERE, WORLD, "layoutc-bench-dcp-")
    with bench as (tmp, ckpt, build_res):
        if args.only_build:
            b = build_res.best
            print(
                f"{ckpt}: {build_res.files} files, {build_res.disk:,} bytes "
                f"({build_res.disk / 1e9:.2f} GB); {build_res.note or 'built now'}; build wall "
                f"{secs(b.wall if b else None)} s, CPU {secs(b.cpu if b else None)} s, "
                f"max-process RSS {mib(b.maxrss if b else None)} MiB, tree PSS "
                f"{mib(b.pss if b else None)} MiB"
            )
            return
        warm(ckpt)

        env_lc = dict(os.environ)
        env_torch = ds_env()
        floors = {t: tmp / f"floor-{t}" for t in TARGETS}
        saved = tmp / "dcp_to_torch_save"  # the first output of dcp_to_torch_save, kept
        jobs: list[Job] = []
        for t, to in TARGETS.items():
            convert = [args.layoutc, "convert", str(ckpt), "--to", to, "-o", OUTDIR, "-q"]
            memory = MEMORY_BUDGET if t == "safetensors" else None
            jobs += conversion_jobs(t, convert, env_lc, memory)
        torch_job = Job(
            "torch dcp_to_torch_save",
            [args.ds_python, "-c", DCP_TO_TORCH_SAVE, str(ckpt), OUTDIR],
            env_torch,
        )
        jobs.append(torch_job)
        predictions = {
            t: plan_prediction(args.layoutc, ckpt, to, None) for t, to in TARGETS.items()
        }
        manifests: dict[str, str] = {}  # by conversion
        checks: list[str] = []
        problems: list[str] = []
        for k, job, run, out in round_robin(jobs, args.repeat, tmp, floors):
            if run.rc != 0:
                note_error(job.result, run.log, ckpt, FAILURE)
            if job is torch_job and run.rc == 0 and not saved.exists():
                out.rename(saved)  # the reference of the content check
            if job.target and not job.dd and run.rc == 0:
                v = verify_output(args.layoutc, job, k, out, checks)
                if v.returncode != 0:
                    problems.append(
                        f"layoutc verify ({job.name}, run {k + 1}) failed: "
                        f"{(v.stdout + v.stderr).strip()[-500:]}"
                    )
                elif not same_manifest(out, manifests, job.target):
                    problems.append(f"{job.name}: run {k + 1} wrote another manifest")
                keep_floor(out, floors[job.target])
        load_end = os.getloadavg()

        outputs = [f for f in floors.values() if f.exists()]
        if not saved.exists():
            content: dict = {"not run": "dcp_to_torch_save wrote nothing to compare with"}
        elif not outputs:
            content = {"not run": "no layoutc conversion succeeded"}
        else:
            c, content = run_check(args.ds_python, HERE, [saved / TORCH_SAVE, *outputs], env_torch)
            if c.returncode != 0:
                problems.append(
                    f"the outputs differ from dcp_to_torch_save's (rc {c.returncode}): "
                    f"{(c.stdout + c.stderr).strip()[-1500:]}"
                )

    machine = machine_line(vers, lc_ver, date, load_start, load_end)
    report(args, jobs, build_res, ckpt, vers, machine, predictions, checks, content, problems)
    if problems:
        sys.exit(1)


def report(
    args, jobs, build_res, ckpt, vers, machine, predictions, checks, content, problems
) -> None:
    """Print the Markdown section: the table, the ratios against the targets, the checks."""
    gen = json.loads((ckpt / "GENERATED").read_text())
    floor = {j.target: j.result for j in jobs if j.dd}
    torch_res = next(j.result for j in jobs if j.target is None)
    print()
    print("## Converting an FSDP2 DCP checkpoint (`benchmarks/convert_dcp_vs_torch.py`)")
    print()
    print(machine)
    print()
    print(
        f"Checkpoint: real torch {vers['torch']} Distributed Checkpoint (`dcp.save` of "
        f"`get_state_dict`, model and optimizer), FSDP2 (`fully_shard` per block and root), "
        f"world {WORLD}, fp32, AdamW, {STEPS} step; Embedding({MODEL['vocab']}, "
        f"{MODEL['hidden']}), {MODEL['blocks']} x (LayerNorm + Linear({MODEL['hidden']}, "
        f"{MODEL['hidden']})), LayerNorm, Linear({MODEL['hidden']}, {MODEL['head']}): "
        f"{gen['params']:,} params; {build_res.files} files, {build_res.disk / 1e9:.2f} GB, "
        f"read from a warm page cache. Wall = best of {args.repeat} rounds (commands "
        f"round-robin); vs dd = wall / the best wall of the `dd oflag=direct` copy of that "
        f"conversion's own output files; memory columns are the worst run's."
    )
    print()
    print_runs(build_res, jobs)
    print()

    def verdict(value: float | None, target: float, at_least: bool) -> str:
        if value is None:
            return "-"
        return "met" if (value >= target if at_least else value <= target) else "missed"

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    graded = [j for j in jobs if j.target and not j.dd and j.result.ok]
    if graded:
        print("| ratio | value | target | verdict |")
        print("|---|---|---|---|")
    else:
        print("No layoutc conversion succeeded: no ratios.")
    for j in graded:
        r = j.result
        for label, a, b, target, at_least in (
            (
                f"dcp_to_torch_save / {j.name}, wall",
                torch_res.best_time("wall"),
                r.best_time("wall"),
                None,
                True,
            ),
            (
                f"dcp_to_torch_save / {j.name}, wall + sync",
                torch_res.best_time("sync"),
                r.best_time("sync"),
                FASTER,
                True,
            ),
            (
                f"dcp_to_torch_save / {j.name}, max-process RSS",
                torch_res.stat("maxrss"),
                r.stat("maxrss"),
                SMALLER,
                True,
            ),
            (
                f"dcp_to_torch_save / {j.name}, tree PSS",
                torch_res.stat("pss"),
                r.stat("pss"),
                None,
                True,
            ),
            (
                f"{j.name} / its dd floor, wall",
                r.best_time("wall"),
                floor[j.target].best_time("wall"),
                FLOOR,
                False,
            ),
        ):
            shown = ratio(a, b)
            goal = "-" if target is None else f"{'>=' if at_least else '<='} {target:g}x"
            judged = "-" if target is None else verdict(div(a, b), target, at_least)
            print(f"| {label} | {shown} | {goal} | {judged} |")
    print()
    budget = 256 * 2**20
    for j in jobs:
        if j.memory and j.result.ok:
            peak = j.result.stat("maxrss")
            print(f"- {j.name}: peak RSS {mib(peak)} MiB (budget {budget // 2**20} MiB)")
    for t, s in predictions.items():
        if "error" in s:
            line = error_line(s["error"], FAILURE).replace(str(ckpt), "CKPT")
            print(f"- plan → {t} failed: `{line}`")
            continue
        r = next(j.result for j in jobs if j.target == t and not j.dd and not j.memory)
        w = s["bytes_written"]
        print(
            f"- plan → {t}: predicted {w:,} bytes written, {r.data:,} on disk minus metadata; "
            f"predicted peak memory {mib(s['peak_memory_bytes'])} MiB"
        )
    print(f"- dcp_to_torch_save wrote {torch_res.disk / 1e6:,.0f} MB ({TORCH_SAVE}).")
    print(
        f"- checks: {sum(c.endswith('rc 0') for c in checks)} of {len(checks)} `layoutc "
        f"verify` runs passed; content against dcp_to_torch_save: {json.dumps(content)}"
    )
    failed = [j.name for j in jobs if any(x.rc != 0 for x in j.result.runs)]
    if failed:
        print(f"- failed runs: {', '.join(failed)} (their logs are printed above)")
    for p in problems:
        print(f"- CHECK FAILED: {p}")


if __name__ == "__main__":
    main()
