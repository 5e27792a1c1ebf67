"""What the conversion benchmarks share: measuring a command, building a cached DeepSpeed
checkpoint under torchrun, the durable ``dd`` copy that is the disk's floor, and formatting.

Standard library only: the driver of a benchmark runs in any interpreter, and torch and
deepspeed are imported only inside the torchrun workers (``exit_worker``).

``measure`` runs a command once in a fresh process and records its wall time, CPU time, the
time of a ``sync`` right after it, the peak RSS of its largest process (``/usr/bin/time -f
%M``, or ``getrusage(RUSAGE_CHILDREN)`` of a wrapper where there is no /usr/bin/time), and,
sampled every 0.1 s over the whole process tree, the peak sum of PSS and of anonymous PSS
(``/proc/PID/smaps_rollup``). A ``sync`` before it (untimed) keeps earlier dirty pages out
of its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

CACHE = Path("~/.cache/layoutc-bench").expanduser()
# Files of layoutc's outputs that are not tensor data: left out of "bytes minus metadata".
METADATA = {"layoutc-manifest.json", "latest", "latest_universal", "model.safetensors.index.json"}
OUTDIR = "{OUT}"  # stands for a run's output folder in a command line

TIME_BIN = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
RUSAGE_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "open(sys.argv[1], 'w').write(f'{r.ru_maxrss} {r.ru_utime + r.ru_stime}\\n')\n"
    "sys.exit(rc)\n"
)


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _tree(pid: int) -> list[int]:
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def _rollup(pid: int) -> dict[str, int]:
    vals: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    vals[k] = int(parts[0]) * 1024
    except (OSError, ValueError):
        pass
    return vals


class TreeSampler(threading.Thread):
    """Peak over time of the summed PSS (and anonymous PSS, and RSS) of a process tree."""

    def __init__(self, pid: int, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.peak = {"Pss": 0, "Pss_Anon": 0, "Rss": 0, "procs": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            tot = {"Pss": 0, "Pss_Anon": 0, "Rss": 0}
            pids = _tree(self.pid)
            for p in pids:
                r = _rollup(p)
                for k in tot:
                    tot[k] += r.get(k, 0)
            for k, v in tot.items():
                self.peak[k] = max(self.peak[k], v)
            self.peak["procs"] = max(self.peak["procs"], len(pids))
            self.stop.wait(self.period)


@dataclass
class Run:
    rc: int
    wall: float
    sync: float
    cpu: float
    maxrss: int  # bytes, largest single process (wait4 / getrusage)
    pss: int  # bytes, peak of summed PSS over the tree (sampled)
    pss_anon: int
    procs: int
    log: str = ""


@dataclass
class Result:
    name: str
    cmd: list[str]
    runs: list[Run] = field(default_factory=list)
    out: Path | None = None
    files: int = 0
    disk: int = 0
    data: int = 0  # disk minus metadata files
    note: str = ""
    cached: bool = False

    @property
    def ok(self) -> list[Run]:
        return [r for r in self.runs if r.rc == 0]

    @property
    def best(self) -> Run | None:
        ok = self.ok
        return min(ok, key=lambda r: r.wall) if ok else None

    def stat(self, attr: str, fn=max) -> float | None:
        ok = self.ok
        return fn(getattr(r, attr) for r in ok) if ok else None


def _sync() -> float:
    t = time.perf_counter()
    os.sync()
    return time.perf_counter() - t


def measure(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> Run:
    """Run ``cmd`` once in a fresh process; sync before (untimed) and after (timed)."""
    _sync()
    stats = log.with_suffix(".time")
    if TIME_BIN:
        full = [TIME_BIN, "-f", "%M %U %S", "-o", str(stats), *cmd]
    else:
        full = [sys.executable, "-c", RUSAGE_WRAPPER, str(stats), *cmd]
    with log.open("w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
    sync = _sync()
    maxrss, cpu = 0, 0.0
    try:
        parts = stats.read_text().split()
        # GNU time appends "Command exited with non-zero status N" before the format line.
        parts = parts[-3:] if TIME_BIN else parts[-2:]
        maxrss = int(parts[0]) * 1024
        cpu = sum(float(x) for x in parts[1:])
    except (OSError, ValueError, IndexError):
        pass
    text = log.read_text(errors="replace")
    return Run(
        rc,
        wall,
        sync,
        cpu,
        maxrss,
        sampler.peak["Pss"],
        sampler.peak["Pss_Anon"],
        sampler.peak["procs"],
        text[-4000:],
    )


def du(path: Path, metadata: Iterable[str] = METADATA) -> tuple[int, int, int]:
    """(files, bytes, bytes minus metadata files) under ``path``."""
    files = total = meta = 0
    for p in path.rglob("*"):
        if p.is_file():
            files += 1
            size = p.stat().st_size
            total += size
            if p.name in metadata:
                meta += size
    return files, total, total - meta


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ds_env(ext_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {"DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "TORCH_EXTENSIONS_DIR": str(ext_dir)}
    )
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    return env


def versions(ds_python: str, packages: tuple[str, ...] = ("deepspeed", "torch")) -> dict[str, str]:
    """The installed version of each of ``packages`` in ``ds_python``, in that order."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "print(json.dumps({k: m.version(k) for k in sys.argv[1:]}))\n"
    )
    out = subprocess.run(
        [ds_python, "-c", code, *packages], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def exit_worker(work: Callable[[], None]) -> NoReturn:
    """Run a torchrun worker's ``work`` and leave through ``os._exit``: DeepSpeed/gloo
    sometimes abort at interpreter exit after all work is done. A failure prints its
    traceback and exits 1."""
    try:
        work()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def build_cached(
    name: str, base: Path, ds_python: str, script: Path, world: int, rebuild: bool, tmp: Path
) -> tuple[Path, Result]:
    """The checkpoint ``base/ckpt``, built by ``script --worker --out base/ckpt`` under
    torchrun at ``world`` ranks (CPU, one thread each) unless ``base/DONE`` says it was, and
    the build's measurements. A ``GENERATED`` file in the checkpoint marks a complete build."""
    cmd = [
        ds_python,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(world),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        "PORT",
        str(script),
        "--worker",
        "--out",
        str(base / "ckpt"),
    ]
    env = ds_env(CACHE / "torch_extensions")
    env["OMP_NUM_THREADS"] = "1"
    ckpt = base / "ckpt"
    done = base / "DONE"
    res = Result(name, cmd, out=ckpt)
    if done.is_file() and not rebuild:
        rec = json.loads(done.read_text())
        res.runs = [Run(**rec["run"])]
        res.cached = True
        res.note = f"cached, built {rec['date']}"
    else:
        if base.exists():
            shutil.rmtree(base)
        base.mkdir(parents=True)
        for attempt in range(2):  # port races and the rare abort at exit
            if ckpt.exists():
                shutil.rmtree(ckpt)
            cmd[cmd.index("--master_port") + 1] = str(free_port())
            print(f"building the checkpoint in {ckpt} (attempt {attempt + 1}) ...", flush=True)
            run = measure(cmd, env, tmp, tmp / f"build{attempt}.log")
            if run.rc == 0 and (ckpt / "GENERATED").is_file():
                break
            print(run.log, file=sys.stderr)
        else:
            raise SystemExit(f"building the checkpoint failed (rc {run.rc})")
        res.runs = [run]
        rec = {"run": {**run.__dict__, "log": ""}, "date": time.strftime("%Y-%m-%d %H:%M")}
        done.write_text(json.dumps(rec) + "\n")
    res.files, res.disk, res.data = du(ckpt)
    return ckpt, res


def warm(folder: Path) -> None:
    """Read every file under ``folder`` once, so that runs read it from the page cache."""
    subprocess.run(f"find '{folder}' -type f -exec cat {{}} + > /dev/null", shell=True, check=True)


def dd_copy(src: Path, dst: str = OUTDIR) -> list[str]:
    """A command copying every file under ``src`` to ``dst`` (same relative paths), each by
    its own ``dd bs=32M oflag=direct conv=fsync``, all at once: the bytes made durable at
    the disk's direct-IO speed, with nothing computed on them. Fails if any dd fails."""
    files = sorted(str(f.relative_to(src)) for f in src.rglob("*") if f.is_file())
    folders = sorted({str(Path(f).parent) for f in files})
    script = " ".join(
        [f"mkdir -p {' '.join(shlex.quote(f'{dst}/{d}') for d in folders)};"]
        + [
            f"dd if={shlex.quote(str(src / f))} of={shlex.quote(f'{dst}/{f}')} bs=32M "
            'oflag=direct conv=fsync status=none & pids="$pids $!";'
            for f in files
        ]
        + ['for p in $pids; do wait "$p" || exit 1; done']
    )
    return ["sh", "-c", script]


def plan_prediction(layoutc: str, ckpt: Path, to: str, memory: str | None, *settings: str) -> dict:
    cmd = [layoutc, "plan", str(ckpt), "--to", to, "--json"]
    if memory:
        cmd += ["--memory", memory]
    for setting in settings:
        cmd += ["--set", setting]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-500:]}
    return json.loads(out.stdout)["summary"]


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def secs(n: float | None) -> str:
    return "-" if n is None else f"{n:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def arguments(description: str, needs: str = "torch + deepspeed") -> argparse.ArgumentParser:
    """The command line the conversion benchmarks share (a script adds its own); ``needs``:
    what the --ds-python interpreter must have installed."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument(
        "--ds-python",
        default=os.environ.get("LAYOUTC_DS_PYTHON") or sys.executable,
        help=f"interpreter with {needs} (default: $LAYOUTC_DS_PYTHON, else this one)",
    )
    ap.add_argument(
        "--layoutc",
        default=shutil.which("layoutc", path=str(Path(sys.executable).parent))
        or shutil.which("layoutc"),
        help="the layoutc command (default: next to this interpreter, else on PATH)",
    )
    ap.add_argument(
        "--layoutc-python",
        help="the interpreter layoutc runs in, for the imports probe (default: the python "
        "beside --layoutc, else this one)",
    )
    ap.add_argument(
        "--repeat", type=int, default=2, help="measured runs per command (best is shown)"
    )
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached checkpoint")
    ap.add_argument("--tmp", type=Path, help="parent of the temp output folder (default: $TMPDIR)")
    return ap


def layoutc_python(args: argparse.Namespace) -> tuple[str, str]:
    """(the interpreter layoutc runs in, layoutc's version); exits if --layoutc does not run."""
    if not args.layoutc:
        raise SystemExit("no `layoutc` command found; pass --layoutc")
    if subprocess.run([args.layoutc, "--help"], capture_output=True).returncode != 0:
        raise SystemExit(f"{args.layoutc} does not run")
    beside = Path(args.layoutc).resolve().parent / "python"
    py = args.layoutc_python or (str(beside) if beside.exists() else sys.executable)
    code = "import layoutc; print(layoutc.__version__)"
    out = subprocess.run([py, "-c", code], capture_output=True, text=True)
    return py, out.stdout.strip() or "?"


def machine_line(
    vers: dict[str, str], lc_ver: str, date: str, load_start: tuple, load_end: tuple
) -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    nproc = len(os.sched_getaffinity(0))
    return (
        f"Machine: {platform.platform()}, {nproc} cores (nproc), {mem / 2**30:.1f} GiB RAM, "
        f"Python {platform.python_version()}; "
        f"{', '.join(f'{k} {v}' for k, v in vers.items())}, layoutc {lc_ver}. Date: {date}. "
        "Load average (1/5/15 min) "
        f"{'/'.join(f'{x:.2f}' for x in load_start)} at the start, "
        f"{'/'.join(f'{x:.2f}' for x in load_end)} at the end."
    )
