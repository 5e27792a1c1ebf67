"""layoutc's swap tier vs DeepSpeed's async IO op and dd, on the same disk, in one run.

For each tool: write 1 GiB of random bytes to a file in ``--dir`` and read it back, both
synchronous from the caller's point of view (a write is done when its data is on disk:
direct IO, or an fsync), best of ``--repeat``:

    layoutc swap        layoutc.runtime.swap.SwapPool(dir).swap_out(array).wait() / .swap_in(out=...),
                        arrays from layoutc.runtime.swap.aligned_empty (page-aligned, no staging copy)
                        (default settings: 8 MiB blocks, queue depth 8, 4 threads, O_DIRECT
                        where the filesystem has it), and a tuned setting (1 MiB, 32, 4)
    DeepSpeed aio       deepspeed.ops.op_builder.AsyncIOBuilder().load().aio_handle(1 MiB,
                        32, False, True, 1) sync_pwrite / sync_pread from a page-locked
                        tensor (new_cpu_locked_tensor), and from a plain tensor
    dd                  dd oflag=direct / iflag=direct, bs=8M, of /dev/zero and of a random
                        file (read from the page cache)

Run::

    LAYOUTC_DS_PYTHON=/tmp/dsvenv/bin/python python benchmarks/swap_vs_deepspeed_aio.py

DeepSpeed's op needs libaio (``apt-get install -y libaio-dev``) and JIT-compiles once
(about 2 minutes; cached in ``--ext-dir``). Without a DeepSpeed interpreter, or when the
op cannot be built, its rows say why and the rest still runs.
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

GIB = 1 << 30

DS_SCRIPT = r"""
import json, os, sys, time
import torch
from deepspeed.ops.op_builder import AsyncIOBuilder
path, size, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
op = AsyncIOBuilder().load(verbose=False)
h = op.aio_handle(1 << 20, 32, False, True, 1)
out = {}
for kind in ("page-locked", "plain"):
    if kind == "page-locked":
        buf = h.new_cpu_locked_tensor(size, torch.empty(0, dtype=torch.uint8))
    else:
        buf = torch.empty(size, dtype=torch.uint8)
    buf.copy_(torch.randint(0, 256, (size,), dtype=torch.uint8))
    w, r = [], []
    for _ in range(repeat):
        if os.path.exists(path):
            os.remove(path)
        os.sync()
        t = time.perf_counter(); h.sync_pwrite(buf, path); w.append(time.perf_counter() - t)
        t = time.perf_counter(); h.sync_pread(buf, path); r.append(time.perf_counter() - t)
    out[kind] = {"write": w, "read": r}
    if kind == "page-locked":
        h.free_cpu_locked_tensor(buf)
print("RESULT " + json.dumps(out))
"""


def layoutc_runs(folder: Path, size: int, repeat: int, **settings: int) -> dict[str, list[float]]:
    import numpy as np

    from layoutc.runtime.swap import SwapPool, aligned_empty

    data = aligned_empty(size, np.uint8)  # like DeepSpeed's page-locked tensor
    data[:] = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    out = aligned_empty(size, np.uint8)
    out[:] = 0  # touch the pages, as a preallocated buffer would be
    w, r = [], []
    with SwapPool(folder, **settings) as pool:
        direct = pool.direct
        for _ in range(repeat):
            os.sync()
            t = time.perf_counter()
            h = pool.swap_out(data)
            h.wait()
            if not direct:
                fd = os.open(h.path, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            w.append(time.perf_counter() - t)
            t = time.perf_counter()
            h.swap_in(out=out)
            r.append(time.perf_counter() - t)
            if not np.array_equal(out, data):
                raise SystemExit("layoutc swap: data came back different")
            h.free()
    return {"write": w, "read": r, "direct": direct}  # type: ignore[dict-item]


def dd_runs(folder: Path, size: int, repeat: int, source: str) -> dict[str, list[float]]:
    count = size // (8 << 20)
    dst = folder / "dd.bin"
    w, r = [], []
    for _ in range(repeat):
        dst.unlink(missing_ok=True)
        os.sync()
        t = time.perf_counter()
        subprocess.run(
            ["dd", f"if={source}", f"of={dst}", "bs=8M", f"count={count}", "oflag=direct"],
            check=True,
            capture_output=True,
        )
        w.append(time.perf_counter() - t)
        t = time.perf_counter()
        subprocess.run(
            ["dd", f"if={dst}", "of=/dev/null", "bs=8M", "iflag=direct"],
            check=True,
            capture_output=True,
        )
        r.append(time.perf_counter() - t)
    dst.unlink(missing_ok=True)
    return {"write": w, "read": r}


def ds_runs(python: str | None, folder: Path, size: int, repeat: int, ext: Path) -> dict | str:
    if not python:
        return "no DeepSpeed interpreter (set LAYOUTC_DS_PYTHON or --ds-python)"
    env = dict(os.environ, DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(ext))
    res = subprocess.run(
        [python, "-c", DS_SCRIPT, str(folder / "ds.bin"), str(size), str(repeat)],
        capture_output=True,
        text=True,
        env=env,
    )
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return f"failed (rc {res.returncode}): {(res.stderr or res.stdout).strip()[-300:]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=GIB, help="bytes per transfer (default 1 GiB)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, help="where the files go (default: a temp folder)")
    ap.add_argument("--ds-python", default=os.environ.get("LAYOUTC_DS_PYTHON"))
    ap.add_argument(
        "--ext-dir", type=Path, default=Path.home() / ".cache" / "layoutc-bench" / "aio"
    )
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="layoutc-swap-bench-", dir=args.dir))
    size = args.size // (8 << 20) * (8 << 20)
    rows: list[tuple[str, dict | str]] = []
    try:
        rnd = folder / "random.src"
        subprocess.run(
            ["dd", "if=/dev/urandom", f"of={rnd}", "bs=8M", f"count={size // (8 << 20)}"],
            check=True,
            capture_output=True,
        )
        print("[layoutc swap, default settings] ...", flush=True)
        rows.append(
            (
                "layoutc swap (8 MiB blocks, qd 8, 4 threads)",
                layoutc_runs(folder, size, args.repeat),
            )
        )
        print("[layoutc swap, 1 MiB blocks, qd 32] ...", flush=True)
        rows.append(
            (
                "layoutc swap (1 MiB blocks, qd 32, 4 threads)",
                layoutc_runs(folder, size, args.repeat, block_size=1 << 20, queue_depth=32),
            )
        )
        print("[DeepSpeed aio] ...", flush=True)
        ds = ds_runs(args.ds_python, folder, size, args.repeat, args.ext_dir)
        if isinstance(ds, str):
            rows.append(("DeepSpeed aio", ds))
        else:
            rows.append(("DeepSpeed aio, page-locked buffer", ds["page-locked"]))
            rows.append(("DeepSpeed aio, plain tensor", ds["plain"]))
        print("[dd] ...", flush=True)
        rows.append(("dd direct IO, zeros", dd_runs(folder, size, args.repeat, "/dev/zero")))
        rows.append(("dd direct IO, random data", dd_runs(folder, size, args.repeat, str(rnd))))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print()
    print("## Swap tier vs DeepSpeed async IO (`benchmarks/swap_vs_deepspeed_aio.py`)")
    print()
    print(
        f"Machine: {platform.platform()}, {len(os.sched_getaffinity(0))} cores, Python "
        f"{platform.python_version()}. Date: {time.strftime('%Y-%m-%d')}. {size / GIB:.2f} GiB "
        f"per transfer, best of {args.repeat}; GB/s = 1e9 bytes/s."
    )
    print()
    print("| tool | write GB/s | read GB/s | every write s | every read s |")
    print("|---|---|---|---|---|")
    best: dict[str, tuple[float, float]] = {}
    for name, r in rows:
        if isinstance(r, str):
            print(f"| {name} | {r} | | | |")
            continue
        w, rd = size / min(r["write"]) / 1e9, size / min(r["read"]) / 1e9
        best[name] = (w, rd)
        extra = (
            "" if "direct" not in r else (" (O_DIRECT)" if r["direct"] else " (buffered + fsync)")
        )
        print(
            f"| {name}{extra} | {w:.2f} | {rd:.2f} | "
            f"{', '.join(f'{x:.2f}' for x in r['write'])} | {', '.join(f'{x:.2f}' for x in r['read'])} |"
        )
    print()
    anchor = next((k for k in best if k.startswith("DeepSpeed aio, page")), None)
    if anchor:
        print(f"Ratios against {anchor} (target >= 0.9 both ways):")
        print()
        for name, (w, rd) in best.items():
            if name.startswith("layoutc"):
                aw, ar = best[anchor]
                print(f"- {name}: write {w / aw:.2f}x, read {rd / ar:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
