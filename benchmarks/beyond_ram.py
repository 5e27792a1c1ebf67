"""A DeepSpeed checkpoint larger than this machine's memory, converted under a 1 GiB budget.

One run, each step measured (wall time, the sync after it, the largest process's RSS by
``/usr/bin/time``, the process tree's peak PSS):

    weights          synthetic full weights: ``--tensors`` bf16 tensors of [4096, 4096]
                     (default 128: 2.15 B parameters, 4.3 GB) in safetensors files of 2 GB,
                     finite values, written by this script (not measured)
    hf -> ds         layoutc convert WEIGHTS --to deepspeed --set dp=8 --memory 1GiB: a ZeRO-2
                     checkpoint (the layout inferred from the weights, fresh AdamW state)
                     of 14 bytes per parameter: 30.1 GB by default
    dd               every file of that tag copied by its own ``dd oflag=direct conv=fsync``,
                     all at once: the disk's floor for those bytes (the universal output's
                     are as many; the safetensors output, fp32 weights only, gets a dd of
                     its own files as its floor)
    universal        layoutc convert CKPT --to universal --memory 1GiB, then layoutc verify
    killed           the same command again, killed (SIGKILL) at half the wall time of the last
    resumed          ... and run again: it goes on from the journal of the killed run; its
                     output verifies and its manifest is the uninterrupted run's, byte for byte
    safetensors      layoutc convert CKPT --to safetensors --memory 1GiB (fp32), then verify
    ds_to_universal  DeepSpeed's converter of the same tag (``--timeout`` each, default 20 min)
    zero_to_fp32     DeepSpeed's ``convert_zero_checkpoint_to_fp32_state_dict``

Each output is deleted once measured (the disk holds the checkpoint and one output at a
time). Targets: peak RSS <= the budget + 128 MiB, wall <= 1.3x the dd floor, the output
verifies.

    python benchmarks/beyond_ram.py [--tensors 128] [--memory 1GiB] [--work DIR] [--timeout S]

The driver needs the standard library and numpy; layoutc is the ``layoutc`` next to this
interpreter; DeepSpeed's tools run in ``--ds-python`` (default: $LAYOUTC_DS_PYTHON, else
this interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # after the sys.path insert above

SIDE = 4096
PER_FILE = 2 << 30


def write_weights(folder: Path, tensors: int) -> int:
    """``tensors`` bf16 [SIDE, SIDE] tensors in safetensors files of about PER_FILE bytes,
    with the index a Hugging Face folder has; returns the bytes of tensor data."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    nbytes = SIDE * SIDE * 2
    per_file = max(1, PER_FILE // nbytes)
    names = [f"layers.{i}.weight" for i in range(tensors)]
    chunks = [names[i : i + per_file] for i in range(0, tensors, per_file)]
    weight_map = {}
    for k, chunk in enumerate(chunks):
        fname = f"model-{k + 1:05d}-of-{len(chunks):05d}.safetensors"
        header = {
            n: {
                "dtype": "BF16",
                "shape": [SIDE, SIDE],
                "data_offsets": [j * nbytes, (j + 1) * nbytes],
            }
            for j, n in enumerate(chunk)
        }
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for _ in chunk:  # finite bf16 values: the exponent kept below all-ones
                bits = rng.integers(0, 1 << 16, SIDE * SIDE, dtype=np.uint16) & 0xBF7F
                f.write(bits.tobytes())
        weight_map.update(dict.fromkeys(chunk, fname))
    index = {"metadata": {"total_size": nbytes * tensors}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return nbytes * tensors


def run(name: str, cmd: list[str], work: Path, timeout: float) -> dict:
    """``cmd`` measured once, killed after ``timeout`` seconds."""
    print(f"{time.strftime('%H:%M:%S')} {name}: {' '.join(cmd)}", flush=True)
    limited = ["timeout", "-s", "KILL", str(timeout), *cmd]
    r = harness.measure(limited, os.environ.copy(), work, work / f"{name}.log")
    row = {
        "step": name,
        "rc": r.rc,
        "wall": r.wall,
        "sync": r.sync,
        "maxrss": r.maxrss,
        "pss": r.pss,
        "error": "" if r.rc == 0 else (harness.error_line(r.log) or f"exit {r.rc}"),
    }
    if r.rc == 137:
        row["error"] = f"killed (SIGKILL: out of memory, or the {timeout} s limit)"
    print(f"  -> rc {r.rc}, {r.wall:.1f} s, max RSS {r.maxrss / 2**20:,.0f} MiB", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tensors", type=int, default=128)
    ap.add_argument("--memory", default="1GiB")
    ap.add_argument("--dp", type=int, default=8)
    ap.add_argument(
        "--work", type=Path, help="work here (default: a temp folder), removed at the end"
    )
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--ds-python", default=os.environ.get("LAYOUTC_DS_PYTHON") or sys.executable)
    args = ap.parse_args()
    layoutc = shutil.which("layoutc", path=str(Path(sys.executable).parent)) or "layoutc"
    budget = harness_size(args.memory)
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / "layoutc-beyond-ram"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start_load = os.getloadavg()
    try:
        t = time.perf_counter()
        weights = write_weights(work / "weights", args.tensors)
        print(f"weights: {weights / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s", flush=True)
        ckpt = work / "ckpt"
        rows = []
        convert = [layoutc, "convert"]
        budgeted = ["--memory", args.memory, "-q"]
        to_ds = ["--to", "deepspeed", "--set", f"dp={args.dp}", "-o", str(ckpt), *budgeted]
        rows.append(run("hf -> ds", [*convert, str(work / "weights"), *to_ds], work, args.timeout))
        if rows[-1]["rc"]:
            raise SystemExit(f"no checkpoint: {rows[-1]['error']}")
        shutil.rmtree(work / "weights")
        tag = (ckpt / "latest").read_text().strip()
        size = sum(f.stat().st_size for f in (ckpt / tag).rglob("*") if f.is_file())
        out = work / "out"
        dd = [c.replace(harness.OUTDIR, str(out)) for c in harness.dd_copy(ckpt / tag)]
        rows.append(run("dd", dd, work, args.timeout))
        shutil.rmtree(out, ignore_errors=True)
        for target in ("universal", "safetensors"):
            rows.append(
                run(
                    target,
                    [*convert, str(ckpt), "--to", target, "-o", str(out), *budgeted],
                    work,
                    args.timeout,
                )
            )
            ok = subprocess.run([layoutc, "verify", str(out)], capture_output=True, text=True)
            rows[-1]["verified"] = ok.returncode == 0
            if target == "universal" and ok.returncode == 0:
                rows += killed_and_resumed(rows[-1], out, convert, ckpt, budgeted, work, args)
            if target == "safetensors" and out.is_dir():  # its own floor: far fewer bytes
                copy = work / "out-dd"
                dd = [c.replace(harness.OUTDIR, str(copy)) for c in harness.dd_copy(out)]
                rows.append(run("dd safetensors", dd, work, args.timeout))
                shutil.rmtree(copy, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
        for name, cmd in (
            ("ds_to_universal", harness.ds_to_universal(args.ds_python, ckpt, tag)),
            ("zero_to_fp32", harness.zero_to_fp32(args.ds_python, ckpt)),
        ):
            free = shutil.disk_usage(work).free
            need = int(1.8 * size) if name == "ds_to_universal" else 0  # its slices + output
            if free < need:
                rows.append(
                    {"step": name, "rc": -1, "wall": 0.0, "sync": 0.0, "maxrss": 0, "pss": 0,
                     "error": f"not run: it writes a temporary folder of every parameter's "
                     f"slices and then the output, about {need / 1e9:.0f} GB; "
                     f"{free / 1e9:.0f} GB free"}
                )  # fmt: skip
                continue
            out.mkdir()
            rows.append(
                run(name, [c.replace(harness.OUTDIR, str(out)) for c in cmd], work, args.timeout)
            )
            shutil.rmtree(out, ignore_errors=True)
        report(rows, size, budget, args, start_load)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def killed_and_resumed(
    fresh: dict, out: Path, convert: list[str], ckpt: Path, budgeted: list[str], work: Path, args
) -> list[dict]:
    """The conversion that wrote ``out`` (its row ``fresh``) run again into a new folder,
    killed at half its wall time, then once more: what it kept, how long it took, whether
    it verifies and wrote the same manifest."""
    first = (out / "layoutc-manifest.json").read_bytes()
    shutil.rmtree(out)
    cmd = [*convert, str(ckpt), "--to", "universal", "-o", str(out), *budgeted]
    killed = run("killed", cmd, work, fresh["wall"] / 2)
    partial = next(out.parent.glob(f"{out.name}.partial-*"), None)
    killed["error"] = (
        f"SIGKILL at {fresh['wall'] / 2:.1f} s; left {partial.name if partial else 'nothing'}"
    )
    resumed = run("resumed", cmd, work, args.timeout)
    log = (work / "resumed.log").read_text()
    note = next((x for x in log.splitlines() if x.startswith("note: going on from")), "")
    resumed["error"] = note.split("this command: ", 1)[1] if note else "did not go on"
    ok = subprocess.run([convert[0], "verify", str(out)], capture_output=True)
    same = out.is_dir() and (out / "layoutc-manifest.json").read_bytes() == first
    resumed["verified"] = ok.returncode == 0 and same
    if not same:
        resumed["error"] += "; the manifest differs from the uninterrupted run's"
    return [killed, resumed]


def harness_size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def report(rows: list[dict], size: int, budget: int, args: argparse.Namespace, load: tuple) -> None:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print()
    print(
        f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {mem / 2**30:.1f} GiB RAM; "
        f"ZeRO-2 dp={args.dp} bf16 AdamW checkpoint of {args.tensors} x [{SIDE}, {SIDE}]: "
        f"{size / 1e9:.2f} GB; --memory {args.memory}; load {load[0]:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end"
    )
    print()
    print("| step | wall s | wall + sync s | max RSS MiB | tree PSS MiB | verified | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        verified = {True: "yes", False: "NO"}.get(r.get("verified"), "")
        print(
            f"| {r['step']} | {r['wall']:.1f} | {r['wall'] + r['sync']:.1f} | "
            f"{r['maxrss'] / 2**20:,.0f} | {r['pss'] / 2**20:,.0f} | {verified} | {r['error']} |"
        )
    floors = {"universal": "dd", "safetensors": "dd safetensors"}
    print()
    for r in rows:
        if r["step"] in floors and not r["rc"]:
            floor = next(f for f in rows if f["step"] == floors[r["step"]])
            rss_ok = r["maxrss"] <= budget + (128 << 20)
            wall = r["wall"] / floor["wall"]
            print(
                f"- {r['step']}: RSS {r['maxrss'] / 2**20:,.0f} MiB against {budget / 2**20:,.0f} "
                f"+ 128 ({'met' if rss_ok else 'missed'}); wall {wall:.2f}x the dd floor "
                f"({'met' if wall <= 1.3 else 'missed'}, target <= 1.3x); "
                f"verified: {'yes' if r.get('verified') else 'NO'}"
            )
    steps = {r["step"]: r for r in rows}
    if "resumed" in steps:
        fresh, killed, resumed = steps["universal"], steps["killed"], steps["resumed"]
        print(
            f"- killed at {killed['wall']:.1f} s and run again: the rerun took "
            f"{resumed['wall']:.1f} s ({resumed['wall'] / fresh['wall']:.2f}x the uninterrupted "
            f"run's {fresh['wall']:.1f} s; both runs {killed['wall'] + resumed['wall']:.1f} s), "
            f"RSS {resumed['maxrss'] / 2**20:,.0f} MiB; same manifest and verified: "
            f"{'yes' if resumed.get('verified') else 'NO'}"
        )


if __name__ == "__main__":
    main()
