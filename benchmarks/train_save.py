"""Checkpointing inside a DeepSpeed training loop: how long a save blocks training, how long
until it is durable, and what resuming at another data-parallel size costs -- for
DeepSpeed's own checkpoint engines and layoutc's (layoutc.deepspeed), in one run.

The job (torchrun, world 2, CPU, gloo, one thread per rank): ZeRO-2, bf16, torch AdamW, a
model of ``--layers`` Linear(H, H) layers (default 8 x 4096² = 134M parameters: a 1.9 GB
checkpoint, weights 268 MB + fp32 masters and two moments 1.6 GB), ``--steps`` steps (10)
with a ``save_checkpoint`` every ``--every`` (2), each to a new tag. Per engine, per save:

    blocked   the wall time of ``engine.save_checkpoint`` (the loop waits this long)
    durable   from the start of the save until its files are on disk: DeepSpeed's engines
              + an fsync of every file of the tag and of the folders (they do not fsync);
              layoutc sync: the call itself (it commits before returning); layoutc async:
              until its background commit (fsync, rename, ``latest``) finished
    step      the mean time of the training steps that follow a save (an async save's
              writes compete with them for the CPU and the disk)

Engines: ``torch`` (DeepSpeed's default TorchCheckpointEngine), ``fast``
(FastCheckpointEngine: ``"checkpoint": {"writer": {"type": "fast"}}``), ``decoupled``
(``"decoupled": true``), ``layoutc-sync`` (``attach(engine, async_save=False)``),
``layoutc-async`` (``attach(engine)``). An engine that fails on this machine is a row with
its error. ``dd``: the first layoutc tag's files copied by ``dd oflag=direct conv=fsync``,
all at once -- the disk's floor for the same bytes.

Resume: the last layoutc-async tag loaded by ``layoutc.deepspeed.load_checkpoint`` at world
2 (the same topology: DeepSpeed's own load) and at world 3 (resharded first), and the same
tag converted to dp 3 beforehand loaded at world 3 (what a world-3 job pays for its own
checkpoint, the baseline of the target); the time of the call on rank 0, and of it the
resharding.

Targets graded: layoutc async blocks <= 1/10 of TorchCheckpointEngine's save; layoutc sync
durable >= 2x faster than TorchCheckpointEngine + fsync; resume at world 3 within 1.5x of
the same-topology load at world 3.

    python benchmarks/train_save.py [--layers 8] [--hidden 4096] [--steps 10] [--every 2]
        [--engines torch,fast,decoupled,layoutc-sync,layoutc-async] [--keep DIR]

The driver needs only the standard library; the workers need torch and deepspeed in
``--ds-python`` (default: ``$LAYOUTC_DS_PYTHON``, else this interpreter) and layoutc.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # after the sys.path insert above

ENGINES = ("torch", "fast", "decoupled", "layoutc-sync", "layoutc-async")
WRITERS = {
    "fast": {"writer": {"type": "fast"}},
    "decoupled": {"writer": {"type": "fast", "decoupled": True}},
}


# ------------------------------------------------------------------------------ worker


def _engine(args: argparse.Namespace, kind: str) -> Any:
    import deepspeed
    import torch

    torch.manual_seed(0)
    layers = [torch.nn.Linear(args.hidden, args.hidden) for _ in range(args.layers)]
    model = torch.nn.Sequential(*layers)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": True},
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }
    if kind in WRITERS:
        config["checkpoint"] = WRITERS[kind]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _step(engine: Any, hidden: int) -> float:
    import torch

    t = time.perf_counter()
    x = torch.randn(2, hidden, dtype=torch.bfloat16)
    loss = engine(x).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    return time.perf_counter() - t


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, files in os.walk(folder):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def train_worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()

    def work() -> None:
        report: dict[str, Any] = {"engine": args.engine, "saves": [], "steps": []}
        try:
            engine = _engine(args, args.engine)
        except Exception as e:
            report["error"] = f"{type(e).__name__}: {e}"
            if rank == 0:
                args.report.write_text(json.dumps(report))
            raise
        ours = None
        if args.engine.startswith("layoutc"):
            import layoutc.deepspeed

            ours = layoutc.deepspeed.attach(engine, async_save=args.engine == "layoutc-async")
        starts: dict[str, float] = {}
        for step in range(1, args.steps + 1):
            report["steps"].append(_step(engine, args.hidden))
            if step % args.every:
                continue
            tag = f"step{step}"
            dist.barrier()
            t0 = time.perf_counter()
            engine.save_checkpoint(str(args.out), tag=tag)
            blocked = time.perf_counter() - t0
            durable = blocked
            if ours is None:  # DeepSpeed's engines leave the files in the page cache
                if rank == 0:
                    _fsync_tree(args.out)
                dist.barrier()
                durable = time.perf_counter() - t0
            starts[tag] = t0
            report["saves"].append(
                {"tag": tag, "step": step, "blocked": blocked, "durable": durable}
            )
        if ours is not None:
            ours.wait()
            for s in report["saves"]:
                s["durable"] = ours.saver.committed[s["tag"]] - starts[s["tag"]]
        if rank == 0:
            args.report.write_text(json.dumps(report))
        dist.barrier()

    harness.exit_worker(work)


def load_worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")

    def work() -> None:
        import layoutc.deepspeed
        from layoutc.deepspeed import resume

        resharding = []
        convert = resume.convert

        def timed(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return convert(*a, **kw)
            finally:
                resharding.append(time.perf_counter() - t)

        resume.convert = timed
        engine = _engine(args, "torch")
        dist.barrier()
        t0 = time.perf_counter()
        layoutc.deepspeed.load_checkpoint(engine, str(args.out))
        seconds = time.perf_counter() - t0
        _step(engine, args.hidden)  # it trains on
        if dist.get_rank() == 0:
            report = {"seconds": seconds, "resharding": sum(resharding)}
            args.report.write_text(json.dumps(report))
        dist.barrier()

    harness.exit_worker(work)


# ------------------------------------------------------------------------------ driver


def _torchrun(args: argparse.Namespace, world: int, *extra: str, log: Path) -> int:
    cmd = [
        args.ds_python,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(world),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(harness.free_port()),
        __file__,
        "--layers",
        str(args.layers),
        "--hidden",
        str(args.hidden),
        "--steps",
        str(args.steps),
        "--every",
        str(args.every),
        *extra,
    ]
    env = harness.ds_env()
    # DeepSpeed's own launcher sets these (FastCheckpointEngine reads them); torchrun not.
    env.update(OMP_NUM_THREADS="1", CROSS_RANK="0", CROSS_SIZE="1", LOCAL_SIZE=str(world))
    with log.open("w") as fh:
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode


def _dd(tag: Path, work: Path) -> float:
    dst = work / "dd"
    shutil.rmtree(dst, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    subprocess.run([c.replace(harness.OUTDIR, str(dst)) for c in harness.dd_copy(tag)], check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=("train", "load"), help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="torch", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it")
    ap.add_argument("--ds-python", default=os.environ.get("LAYOUTC_DS_PYTHON") or sys.executable)
    args = ap.parse_args()
    if args.worker == "train":
        return train_worker(args)
    if args.worker == "load":
        return load_worker(args)

    work = args.keep or Path(tempfile.mkdtemp(prefix="train-save-"))
    work.mkdir(parents=True, exist_ok=True)
    reports: dict[str, dict[str, Any]] = {}
    for kind in args.engines.split(","):
        out, report, log = work / kind, work / f"{kind}.json", work / f"{kind}.log"
        shutil.rmtree(out, ignore_errors=True)
        code = _torchrun(
            args,
            2,
            "--worker",
            "train",
            "--engine",
            kind,
            "--out",
            str(out),
            "--report",
            str(report),
            log=log,
        )
        if report.is_file():
            reports[kind] = json.loads(report.read_text())
        if code or "error" in reports.get(kind, {}):
            reports[kind] = {
                "error": reports.get(kind, {}).get("error")
                or harness.error_line(log.read_text(errors="replace").replace("ChildFailed", ""))
                or f"exit {code}"
            }
        print(f"{kind}: {reports[kind].get('error', 'ok')}", flush=True)
        if kind != "layoutc-async":  # the one the loads read: the others' disk is freed
            shutil.rmtree(out, ignore_errors=True)

    first = work / "layoutc-async" / f"step{args.every}"
    size = sum(f.stat().st_size for f in first.rglob("*") if f.is_file()) if first.is_dir() else 0
    dd = _dd(first, work) if size else None
    loads: dict[str, Any] = {}
    saved = work / "layoutc-async"
    if "error" not in reports.get("layoutc-async", {"error": 1}):
        at3 = work / "saved-at-w3"  # the same tag as a world-3 job would have saved it
        shutil.rmtree(at3, ignore_errors=True)
        convert = [args.ds_python, "-m", "layoutc", "convert", str(saved), "--to", "deepspeed"]
        subprocess.run([*convert, "--set", "dp=3", "-q", "-o", str(at3)], check=True)
        for name, world, folder in (
            ("w2 <- w2", 2, saved),
            ("w3 <- w3", 3, at3),
            ("w3 <- w2", 3, saved),
        ):
            rep = work / f"load-{name[:2]}-{name[-2:]}.json"
            cold = harness.drop_caches()
            code = _torchrun(
                args,
                world,
                "--worker",
                "load",
                "--out",
                str(folder),
                "--report",
                str(rep),
                log=rep.with_suffix(".log"),
            )
            loads[name] = json.loads(rep.read_text()) if code == 0 else None
            if loads[name]:
                loads[name]["cold"] = cold

    print()
    print(
        f"# {time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} cores; "
        f"{args.layers} x Linear({args.hidden}, {args.hidden}), ZeRO-2 bf16, world 2; "
        f"checkpoint tag {size / 1e9:.2f} GB; {args.steps} steps, a save every {args.every}"
    )
    print()
    print("| engine | blocked (s, per save) | durable (s, per save) | step after a save (s) |")
    print("|---|---|---|---|")

    def fmt(xs: list[float]) -> str:
        return " / ".join(f"{x:.2f}" for x in xs)

    for kind, r in reports.items():
        if "error" in r:
            print(f"| {kind} | failed: {r['error'][:120]} | | |")
            continue
        after = [r["steps"][s["step"]] for s in r["saves"] if s["step"] < len(r["steps"])]
        print(
            f"| {kind} | {fmt([s['blocked'] for s in r['saves']])} | "
            f"{fmt([s['durable'] for s in r['saves']])} | {fmt(after)} |"
        )
    if dd is not None:
        print(f"| dd (same bytes, durable) | | {dd:.2f} | |")
    print()

    def median(kind: str, key: str) -> float | None:
        r = reports.get(kind, {})
        if "error" in r or not r:
            return None
        xs = sorted(s[key] for s in r["saves"])
        return xs[len(xs) // 2]

    torch_blocked = median("torch", "blocked")
    torch_durable = median("torch", "durable")
    async_blocked = median("layoutc-async", "blocked")
    sync_durable = median("layoutc-sync", "durable")
    grades = [
        ("layoutc async blocks <= 1/10 of torch's save", torch_blocked, async_blocked, 10.0),
        ("layoutc sync durable >= 2x faster than torch + fsync", torch_durable, sync_durable, 2.0),
    ]
    for name, theirs, ours, want in grades:
        if theirs and ours:
            got = theirs / ours
            print(f"- {name}: {got:.1f}x ({'met' if got >= want else 'missed'})")
    if all(loads.get(n) for n in ("w2 <- w2", "w3 <- w3", "w3 <- w2")):
        print()
        print("| load_checkpoint (job <- saved at) | seconds | of which resharding |")
        print("|---|---|---|")
        for name, r in loads.items():
            print(f"| {name} | {r['seconds']:.2f} | {r['resharding']:.2f} |")
        if not all(r["cold"] for r in loads.values()):
            print("\n(the page cache could not be dropped before each load: loads may be warm)")
        print()
        r = loads["w3 <- w2"]["seconds"] / loads["w3 <- w3"]["seconds"]
        print(
            f"- resume at world 3 from world 2 against the same-topology load at world 3: "
            f"{r:.2f}x ({'met' if r <= 1.5 else 'missed'}, target <= 1.5x)"
        )
    if dd and sync_durable:
        print(f"- layoutc sync durable against dd of the same bytes: {sync_durable / dd:.2f}x")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
