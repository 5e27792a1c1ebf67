"""layoutc convert vs DeepSpeed's own converters on a real >= 1 GB ZeRO-2 checkpoint.

One run builds (or reuses) a real DeepSpeed checkpoint, then times and measures, side by
side, each of:

    build            torchrun (world 2, CPU, gloo) of a ~101M-param model (6 x
                     Linear(4096, 4096) + a small head), bf16, ZeRO-2, AdamW, 2 steps,
                     engine.save_checkpoint  -> ~1.4 GB; cached under
                     ~/.cache/layoutc-bench/<key> (key: generator source + versions)
    cp -r            copying the checkpoint folder (the anchor: bytes in, bytes out)
    dd direct        every file of the checkpoint copied by its own ``dd bs=32M oflag=direct
                     conv=fsync``, all at once: the same bytes made durable at the disk's
                     direct-IO speed — no tool that writes this much can finish sooner
    imports          ``python -c IMPORT_PROBE``: the interpreter start and every import a
                     ``layoutc convert`` of this (bf16) checkpoint pays before moving a byte —
                     the same modules, checked by tests/test_imports.py
    layoutc univ     layoutc convert CKPT --to universal -o OUT -q        (+ --memory 256MiB)
    ds_to_universal  python -m deepspeed.checkpoint.ds_to_universal --input_folder CKPT/<tag>
                     --output_folder OUT/<tag> --inject_missing_state (default workers)
    layoutc torchrun python -m torch.distributed.run --nproc_per_node 2 -m layoutc convert
                     CKPT --to universal -o OUT -q --workers 1 (the plan over 2 ranks; needs
                     torch next to layoutc)
    layoutc ds dp=3  layoutc convert CKPT --to deepspeed --set dp=3 -o OUT -q (a native
                     reshard; DeepSpeed's own path is ds_to_universal, then a universal load)
    layoutc st       layoutc convert CKPT --to safetensors -o OUT -q
    zero_to_fp32     deepspeed.utils.zero_to_fp32.convert_zero_checkpoint_to_fp32_state_dict(
                     CKPT, OUT, safe_serialization=True, max_shard_size=None)

For every command: wall time (best of ``--repeat``, default 2), CPU time, the time of a
``sync`` right after it (layoutc fsyncs its output before it returns, cp and DeepSpeed do
not: "wall + sync" puts them on the same footing), the peak RSS that ``/usr/bin/time -f %M``
reports (or ``getrusage(RUSAGE_CHILDREN)`` of a fresh wrapper process when there is no
/usr/bin/time) — that is the largest single process of the tree, file-backed pages (mmaps)
included — and, sampled every 0.1 s over the whole process tree, the peak sum of PSS and of
anonymous PSS (``/proc/PID/smaps_rollup``), which is what a multi-process tool really
holds and what memory a memory-mapping tool holds beyond the page cache.

Page cache: the source is read once before anything is measured (``cat > /dev/null``) and
stays cached (it is ~1.4 GB), so every run reads from a warm page cache; ``sync`` runs
before each measured command so no earlier dirty pages are flushed inside it.

For the layoutc runs it also prints the plan's predicted bytes written (``layoutc plan
--json``) against the bytes in the output (sum of file sizes minus metadata: the checksum
manifest and the loader markers). All outputs go to a temp folder deleted at the end.

Run (the main process needs only the standard library)::

    LAYOUTC_DS_PYTHON=/tmp/dsvenv/bin/python /tmp/v/bin/python benchmarks/convert_vs_deepspeed.py

``--ds-python`` (default ``$LAYOUTC_DS_PYTHON``, else this interpreter) needs torch and
deepspeed; ``--layoutc`` (default: the ``layoutc`` next to this interpreter, else on PATH).
The script launches itself under torchrun with ``--worker`` to build the checkpoint.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, beside this script

from harness import (
    METADATA,
    OUTDIR,
    Result,
    arguments,
    checkpoint,
    dd_copy,
    ds_env,
    ds_to_universal,
    free_port,
    layoutc_python,
    machine_line,
    mib,
    parse,
    plan_prediction,
    ratio,
    run_once,
    secs,
    versions,
    warm,
    zero_to_fp32,
)

HERE = Path(__file__).resolve()

# The checkpoint: 6 x Linear(4096, 4096) (with biases) + Linear(4096, 16): 100,753,424
# params. ZeRO-2, bf16 (fp32 masters + Adam states in the optimizer files): ~1.4 GB.
MODEL = {"hidden": 4096, "layers": 6, "head": 16}
WORLD = 2
STEPS = 2
MICRO_BATCH = 2
SEED = 1234
MEMORY_BUDGET = "256MiB"
RESHARD_SHORT = f"deepspeed dp={WORLD + 1}"
TORCHRUN = "layoutc → universal, torchrun 2 ranks x 1 thread"
RESHARD = f"layoutc → {RESHARD_SHORT} (native reshard)"
DD = "dd oflag=direct, every file at once (durable copy)"
IMPORTS = "layoutc start + imports"
# What `layoutc convert CKPT --to universal` imports on a bf16 checkpoint: the command line,
# the converter, the plan's text rendering, the distributed check, the plan's validation,
# and bf16 (ml_dtypes, looked up lazily by layoutc.dtypes on the first bf16 tensor).
IMPORT_PROBE = (
    "import layoutc.cli, layoutc.conversion, layoutc.runtime.distributed, "
    "layoutc.plan.validate, layoutc.lang.fmt, layoutc.dtypes; layoutc.dtypes.np_dtype('bf16')"
)


# ------------------------------------------------------------------------------------------
# The checkpoint generator (runs under torchrun, one process per rank; torch and deepspeed
# are imported here only)
# ------------------------------------------------------------------------------------------


def ds_config(world: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "train_batch_size": MICRO_BATCH * world,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": True},
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def worker(out: Path) -> None:
    """Train the model ``STEPS`` steps with ZeRO-2 and save a checkpoint to ``out``."""
    from datetime import timedelta

    import deepspeed
    import torch
    import torch.distributed as dist
    from torch import nn

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(SEED)
    h = MODEL["hidden"]
    layers: list[nn.Module] = []
    for _ in range(MODEL["layers"]):
        layers += [nn.Linear(h, h), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(h, MODEL["head"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(world))
    for step in range(STEPS):
        g = torch.Generator().manual_seed(1000 + 97 * step + rank)
        x = torch.randn(MICRO_BATCH, h, generator=g).to(torch.bfloat16)
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(str(out))
    dist.barrier()
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        (out / "GENERATED").write_text(json.dumps({"params": params, "world": world}) + "\n")
    dist.barrier()


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------


def cache_key(vers: dict[str, str]) -> str:
    h = hashlib.sha256()
    for fn in (ds_config, worker):
        h.update(inspect.getsource(fn).encode())
    h.update(json.dumps([MODEL, WORLD, STEPS, MICRO_BATCH, SEED, vers], sort_keys=True).encode())
    return f"z2_w{WORLD}_bf16_{MODEL['layers']}x{MODEL['hidden']}-ds{vers['deepspeed']}-{h.hexdigest()[:12]}"


def main() -> None:
    args = parse(arguments(__doc__.splitlines()[0]), worker)
    lc_py, lc_ver = layoutc_python(args)
    vers = versions(args.ds_python)
    load_start = os.getloadavg()
    date = time.strftime("%Y-%m-%d")

    bench = checkpoint(args, cache_key(vers), HERE, WORLD, "layoutc-bench-")
    with bench as (tmp, ckpt, build_res):
        tag = (ckpt / "latest").read_text().strip()
        warm(ckpt)  # every measured run reads the source from the page cache

        env_lc = dict(os.environ)
        env_ds = ds_env()

        def convert(to: str, *extra: str) -> list[str]:
            """layoutc's command line converting the checkpoint to ``to``."""
            return ["convert", str(ckpt), "--to", to, "-o", OUTDIR, "-q", *extra]

        jobs = [
            ("cp -r", ["cp", "-r", str(ckpt), OUTDIR], env_lc, None),
            (DD, dd_copy(ckpt), env_lc, None),
            (IMPORTS, [lc_py, "-c", IMPORT_PROBE], env_lc, None),
            (
                "layoutc → universal",
                [args.layoutc, *convert("universal")],
                env_lc,
                ("universal", None),
            ),
            (
                f"layoutc → universal --memory {MEMORY_BUDGET}",
                [args.layoutc, *convert("universal", "--memory", MEMORY_BUDGET)],
                env_lc,
                ("universal", MEMORY_BUDGET),
            ),
            (
                TORCHRUN,
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nproc_per_node",
                    "2",
                    "--master_addr",
                    "127.0.0.1",
                    "--master_port",
                    str(free_port()),
                    "-m",
                    "layoutc",
                    *convert("universal", "--workers", "1"),
                ],
                env_lc,
                None,
            ),
            ("DeepSpeed ds_to_universal", ds_to_universal(args.ds_python, ckpt, tag), env_ds, None),
            (
                RESHARD,
                [args.layoutc, *convert("deepspeed", "--set", f"dp={WORLD + 1}")],
                env_lc,
                ("deepspeed", None, f"dp={WORLD + 1}"),
            ),
            (
                "layoutc → safetensors",
                [args.layoutc, *convert("safetensors")],
                env_lc,
                ("safetensors", None),
            ),
            (
                "DeepSpeed zero_to_fp32 (safetensors)",
                zero_to_fp32(args.ds_python, ckpt),
                env_ds,
                None,
            ),
        ]
        results: list[Result] = [build_res]
        predictions: dict[str, dict] = {}
        for i, (name, cmd, env, plan) in enumerate(jobs):
            res = Result(name, cmd)
            if plan is not None:
                predictions[name] = plan_prediction(args.layoutc, ckpt, *plan)
            for k in range(args.repeat):
                run, out = run_once(res, cmd, env, tmp, f"{i}-{k}", k, args.repeat)
                if run.rc == 0 and out.exists() and plan is not None:
                    res.note = run.log.strip().splitlines()[-1][:300]  # what layoutc says
                shutil.rmtree(out, ignore_errors=True)
            results.append(res)
        load_end = os.getloadavg()

    # ----------------------------------------------------------------------------- report
    by = {r.name: r for r in results}
    print()
    print("## layoutc convert vs DeepSpeed's converters (`benchmarks/convert_vs_deepspeed.py`)")
    print()
    print(machine_line(vers, lc_ver, date, load_start, load_end))
    print()
    gp = json.loads((ckpt / "GENERATED").read_text())
    print(
        f"Checkpoint: real DeepSpeed {vers['deepspeed']} ZeRO-2, world {WORLD}, bf16, AdamW, "
        f"{STEPS} steps; {MODEL['layers']} x Linear({MODEL['hidden']}, {MODEL['hidden']}) + "
        f"Linear({MODEL['hidden']}, {MODEL['head']}) = {gp['params']:,} params; "
        f"{build_res.files} files, {build_res.disk / 1e9:.2f} GB. All runs read it from a warm "
        f'page cache; wall = best of {args.repeat}; "+ sync" adds the `sync` right after '
        f"(layoutc fsyncs its output itself). Max-process RSS is `/usr/bin/time -f %M` "
        f"(mmapped file pages included); tree PSS is the peak sum over the process tree, "
        f"sampled every 0.1 s, and its anonymous part; procs counts the tree's processes "
        f"(the `time` wrapper included)."
    )
    print()
    print(
        "| step | wall s | wall + sync s | CPU s | max-process RSS MiB | tree PSS MiB | "
        "tree anon PSS MiB | procs | output files | output MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        b = r.best
        label = r.name + (" (cached)" if r.cached else "")
        if b is None:
            rc = ", ".join(str(x.rc) for x in r.runs)
            print(f"| {label} | failed (rc {rc}) | | | | | | | | |")
            continue
        print(
            f"| {label} | {secs(b.wall)} | {secs(b.wall + b.sync)} | {secs(b.cpu)} | "
            f"{mib(r.stat('maxrss'))} | {mib(r.stat('pss'))} | {mib(r.stat('pss_anon'))} | "
            f"{max(x.procs for x in r.ok)} | {r.files} | {r.disk / 1e6:,.0f} |"
        )
    print()
    print(
        "Memory columns are the worst of the measured runs; times are the best run's. "
        "Every run: "
        + "; ".join(
            f"{r.name}: "
            + ", ".join(f"{x.wall:.1f}s" if x.rc == 0 else f"rc {x.rc}" for x in r.runs)
            for r in results[1:]
        )
        + "."
    )
    print()
    print("Plan prediction vs output (layoutc):")
    print()
    print(
        "| run | predicted bytes written | bytes on disk (minus metadata) | difference | "
        "predicted peak memory MiB | units by mode |"
    )
    print("|---|---|---|---|---|---|")
    for name, s in predictions.items():
        r = by[name]
        if "error" in s:
            print(f"| {name} | plan failed: {s['error']} | | | | |")
            continue
        w = s["bytes_written"]
        diff = r.data - w
        print(
            f"| {name} | {w:,} | {r.data:,} | {diff:+,} ({100 * diff / w:+.3f} %) | "
            f"{mib(s['peak_memory_bytes'])} | "
            f"{', '.join(f'{k} {v}' for k, v in s['units_by_mode'].items())} |"
        )
    print()

    def w(n: str, attr: str = "wall") -> float | None:
        return by[n].best_time(attr)

    U, C, D = "layoutc → universal", "cp -r", "DeepSpeed ds_to_universal"
    S, Z = "layoutc → safetensors", "DeepSpeed zero_to_fp32 (safetensors)"
    print("Ratios:")
    print()
    print("| ratio | wall | wall + sync | tree PSS | max-process RSS |")
    print("|---|---|---|---|---|")
    for label, a, b, memory in (
        ("ds_to_universal / layoutc universal", D, U, True),
        ("layoutc universal / cp -r", U, C, False),  # cp holds ~nothing: no memory ratio
        ("ds_to_universal / dd direct (the ceiling for any tool)", D, DD, False),
        ("layoutc universal / dd direct", U, DD, False),
        (f"ds_to_universal / layoutc {RESHARD_SHORT}", D, RESHARD, True),
        ("layoutc universal, torchrun 2 ranks / 1 process", TORCHRUN, U, True),
        (f"layoutc {RESHARD_SHORT} / cp -r", RESHARD, C, False),
        ("zero_to_fp32 / layoutc safetensors", Z, S, True),
    ):
        mem_cols = (
            f"{ratio(by[a].stat('pss'), by[b].stat('pss'))} | "
            f"{ratio(by[a].stat('maxrss'), by[b].stat('maxrss'))}"
            if memory
            else "n/a | n/a"
        )
        print(
            f"| {label} | {ratio(w(a), w(b))} | {ratio(w(a, 'sync'), w(b, 'sync'))} | {mem_cols} |"
        )
    print()
    u, floor, start, theirs = w(U), w(DD), w(IMPORTS), w(D)
    if u and floor and start:
        lead = (
            f"A 10x lead on ds_to_universal needs layoutc under {theirs / 10:.2f} s (wall), "
            if theirs  # None when ds_to_universal failed
            else "ds_to_universal did not finish; "
        )
        print(
            f"layoutc → universal takes {u - floor:+.2f} s beyond the durable direct-IO copy of "
            f"the same bytes; {start:.2f} s of every layoutc run is the interpreter starting "
            f"and importing layoutc. {lead}the dd copy alone took {floor:.2f} s."
        )
        print()
    print(
        "The predicted-vs-disk difference is file-format overhead (the zip entries and pickled "
        "records of the .pt files, the safetensors JSON header) and carried non-tensor state; "
        "metadata left out: " + ", ".join(sorted(METADATA)) + "."
    )
    print()
    for r in results:
        if r.note:
            print(f"- {r.name}: {r.note}")
    failed = [r.name for r in results if any(x.rc != 0 for x in r.runs)]
    if failed:
        print(f"- failures: {', '.join(failed)} (see the logs printed above)")


if __name__ == "__main__":
    main()
