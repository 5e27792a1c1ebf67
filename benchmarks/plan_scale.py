"""How planning cost grows with ranks and with tensors (Llama-2-70B spec, tp = 8, pp = 8).

Each row runs in a fresh interpreter so its peak RSS is its own. For growing data-parallel
degree (8 -> 1024, i.e. 512 -> 65,536 ranks) and then growing layer count at the largest
degree, it prints: parse + check time, compile time (to DeepSpeed's universal format,
and to the same model at dp / 2), summary time, peak RSS, and the plan's size (units, ops,
files). Run: python benchmarks/plan_scale.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "llama2-70b.layout"

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import layoutc
from layoutc.lang.check import load_text
t1 = time.perf_counter()
text = sys.stdin.read()
dp, layers, target = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
text = text.replace("let DP = 1024", f"let DP = {dp}").replace("let L = 80,", f"let L = {layers},")
src = load_text(text, "llama2-70b.layout")
t2 = time.perf_counter()
if target == "reshard":
    dst = load_text(text.replace(f"let DP = {dp}", f"let DP = {max(1, dp // 2)}"), "half.layout")
else:
    dst = target
plan = layoutc.compile(src, dst, memory=8 << 30, workers=8)
t3 = time.perf_counter()
s = plan.summary()
t4 = time.perf_counter()
print(json.dumps({
    "import_s": t1 - t0, "check_s": t2 - t1, "compile_s": t3 - t2, "summary_s": t4 - t3,
    "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "tensors": len(src.tensors), "ranks": src.mesh.world, "units": s["units"], "ops": s["ops"],
    "files_read": s["files_read"], "files_written": s["files_written"],
    "bytes_read": s["bytes_read"], "torch": "torch" in sys.modules,
}))
"""


def measure(dp: int, layers: int, target: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(dp), str(layers), target],
        input=SPEC.read_text(),
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    return json.loads(out.stdout)


def whole_process(runs: int = 5) -> tuple[float, float]:
    """``layoutc plan`` of the 65,536-rank reshard (dp 1024 -> 512) as a user runs it, the
    interpreter's start included, beside ``python -c pass``: the best of ``runs`` each."""
    import tempfile
    import time

    with tempfile.TemporaryDirectory() as tmp:
        half = Path(tmp) / "half.layout"
        half.write_text(SPEC.read_text().replace("let DP = 1024", "let DP = 512"))
        cmds = {
            "plan": [sys.executable, "-m", "layoutc", "plan", str(SPEC), "--to", str(half)],
            "python": [sys.executable, "-c", "pass"],
        }
        best = {}
        for name, cmd in cmds.items():
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True)
                times.append(time.perf_counter() - t0)
            best[name] = min(times)
    return best["plan"], best["python"]


def row(r: dict, label: str) -> str:
    total = r["check_s"] + r["compile_s"] + r["summary_s"]
    return (
        f"| {label} | {r['ranks']:,} | {r['tensors']} | {r['check_s']:.3f} | {r['compile_s']:.3f} | "
        f"{r['summary_s']:.3f} | {total:.3f} | {r['import_s']:.2f} | {r['rss_mib']:.0f} | "
        f"{r['units']:,} | {r['ops']:,} | {r['files_read']:,} -> {r['files_written']:,} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer rows")
    args = ap.parse_args()
    dps = [8, 64, 1024] if args.quick else [8, 32, 128, 512, 1024]
    print(
        f"# plan_scale on {platform.node()} ({os.cpu_count()} cores), Python {platform.python_version()}"
    )
    header = (
        "| run | ranks | tensors | parse+check s | compile s | summary s | total s | import s | "
        "peak RSS MiB | units | ops (planned) | files read -> written |"
    )
    print(header)
    print("|" + "---|" * 12)
    results = []
    for target in ("universal", "reshard"):
        for dp in dps:
            r = measure(dp, 80, target)
            assert not r["torch"], "planning imported torch"
            results.append(r)
            print(row(r, f"{target} dp={dp}"), flush=True)
    for layers in (20, 40, 80, 160):
        r = measure(1024, layers, "universal")
        print(row(r, f"universal dp=1024 L={layers}"), flush=True)
    big = [r for r in results if r["ranks"] == 65536]
    worst = max(r["check_s"] + r["compile_s"] + r["summary_s"] for r in big)
    print(
        f"\n65,536 ranks: slowest plan summary {worst:.3f} s (target < 1 s), "
        f"peak RSS {max(r['rss_mib'] for r in big):.0f} MiB (target < 500 MiB)"
    )
    plan_s, python_s = whole_process()
    print(
        f"`layoutc plan` of the 65,536-rank reshard as a whole process: {plan_s:.2f} s "
        f"(target < 1 s; `python -c pass` {python_s:.2f} s)"
    )


if __name__ == "__main__":
    main()
