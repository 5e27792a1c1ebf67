"""What the conversion benchmarks share: measuring a command, building a cached DeepSpeed
checkpoint under torchrun, the durable ``dd`` copy that is the disk's floor, DeepSpeed's
converters' command lines, running the measured commands, checking layoutc's outputs, the
hand-off to a content check in another interpreter, and formatting.

Standard library only: the driver of a benchmark runs in any interpreter, and torch and
deepspeed are imported only inside the torchrun workers (``exit_worker``).

``measure`` runs a command once in a fresh process and records its wall time, CPU time, the
time of a ``sync`` right after it, the peak RSS of its largest process (``/usr/bin/time -f
%M``, or ``getrusage(RUSAGE_CHILDREN)`` of a wrapper where there is no /usr/bin/time), and,
sampled every 0.1 s over the whole process tree, the peak sum of PSS and of anonymous PSS
(``/proc/PID/smaps_rollup``). A ``sync`` before it (untimed) keeps earlier dirty pages out
of its figures. ``run_once`` measures one run of a benchmark's command into a fresh output
folder; ``round_robin`` runs a benchmark's jobs (``Job``) that way, a round at a time, each
dd floor copying the first output of its layoutc conversion; ``print_runs`` tabulates them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
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

    def best_time(self, attr: str = "wall") -> float | None:
        """The best run's ``attr`` (``"sync"``: its wall time plus the sync after it), or
        None when no run succeeded."""
        b = self.best
        return None if b is None else (b.wall + b.sync if attr == "sync" else getattr(b, attr))


@dataclass
class Job:
    """One measured command of a round-robin benchmark (:func:`round_robin`). ``target``:
    the layoutc conversion it runs (a key of the script's TARGETS) or whose first output it
    copies (``dd``: its command is made when that output is there); ``memory``: a run under
    a ``--memory`` budget; ``ds``: one of DeepSpeed's converters."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    target: str | None = None
    memory: bool = False
    dd: bool = False
    ds: bool = False
    result: Result = field(init=False)

    def __post_init__(self) -> None:
        self.result = Result(self.name, self.cmd)


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


def ds_env(ext_dir: Path = CACHE / "torch_extensions") -> dict[str, str]:
    """This environment for DeepSpeed on CPU, its compiled ops cached in ``ext_dir``."""
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
    key: str, ds_python: str, script: Path, world: int, rebuild: bool, tmp: Path
) -> tuple[Path, Result]:
    """The checkpoint ``base/ckpt`` (``base``: ``CACHE/key``), built by ``script --worker
    --out base/ckpt`` under torchrun at ``world`` ranks (CPU, one thread each) unless
    ``base/DONE`` says it was, and the build's measurements. A ``GENERATED`` file in the
    checkpoint marks a complete build."""
    base = CACHE / key
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
    env = ds_env()
    env["OMP_NUM_THREADS"] = "1"
    ckpt = base / "ckpt"
    done = base / "DONE"
    res = Result(f"build (torchrun, {world} ranks)", cmd, out=ckpt)
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


@contextmanager
def checkpoint(
    args: argparse.Namespace, key: str, script: Path, world: int, prefix: str
) -> Iterator[tuple[Path, Path, Result]]:
    """(temp folder, checkpoint, the build's measurements) for a benchmark's runs: the folder
    made under ``--tmp`` with ``prefix`` and deleted at the end; the checkpoint cached as
    ``key`` (:func:`build_cached`; ``--rebuild``), which must hold at least 1 GB."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=args.tmp))
    try:
        ckpt, res = build_cached(key, args.ds_python, script, world, args.rebuild, tmp)
        if res.disk < 10**9:
            raise SystemExit(f"{ckpt}: only {res.disk:,} bytes; expected >= 1 GB")
        yield tmp, ckpt, res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def warm(folder: Path) -> None:
    """Read every file under ``folder`` once, so that runs read it from the page cache."""
    subprocess.run(f"find '{folder}' -type f -exec cat {{}} + > /dev/null", shell=True, check=True)


def drop_caches() -> bool:
    """Empty the page cache (``sync``, then ``/proc/sys/vm/drop_caches``), so that the next
    run reads from the disk; False where this process may not (not root)."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


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


ZERO_TO_FP32 = (
    "import sys\n"
    "from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict as c\n"
    "c(sys.argv[1], sys.argv[2], safe_serialization=True, max_shard_size=None)\n"
)


def zero_to_fp32(ds_python: str, ckpt: Path) -> list[str]:
    """DeepSpeed's ``convert_zero_checkpoint_to_fp32_state_dict`` of ``ckpt`` into OUTDIR:
    safetensors, one file (``max_shard_size=None``)."""
    return [ds_python, "-c", ZERO_TO_FP32, str(ckpt), OUTDIR]


def ds_to_universal(ds_python: str, ckpt: Path, tag: str) -> list[str]:
    """DeepSpeed's ``ds_to_universal`` of ``ckpt``'s ``tag`` into OUTDIR/``tag``, its
    default workers, ``--inject_missing_state``."""
    return [
        ds_python,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(ckpt / tag),
        "--output_folder",
        f"{OUTDIR}/{tag}",
        "--inject_missing_state",
    ]


def conversion_jobs(
    name: str, convert: list[str], env: dict[str, str], memory: str | None = None
) -> list[Job]:
    """The jobs of layoutc conversion ``name`` (a key of the script's TARGETS), whose command
    line is ``convert``: the conversion; the same under ``--memory memory`` when given; and
    its dd floor, the durable copy of the conversion's first output."""
    jobs = [Job(f"layoutc → {name}", convert, env, target=name)]
    if memory is not None:
        jobs.append(
            Job(
                f"layoutc → {name} --memory {memory}",
                [*convert, "--memory", memory],
                env,
                target=name,
                memory=True,
            )
        )
    # The command is made when the first output is there (dd_copy lists its files).
    jobs.append(Job(f"dd oflag=direct of the {name} output", [], env, name, dd=True))
    return jobs


def run_once(
    res: Result, cmd: list[str], env: dict[str, str], tmp: Path, key: str, k: int, repeat: int
) -> tuple[Run, Path]:
    """Measure run ``k + 1`` of ``repeat`` of ``cmd`` (its OUTDIR made ``tmp/out<key>``, a
    torchrun's ``--master_port`` a fresh port) and add it to ``res``: a success records the
    output's size, a failure prints the log's tail. The run and its output folder, which
    the caller deletes."""
    out = tmp / f"out{key}"
    real = [c.replace(OUTDIR, str(out)) for c in cmd]
    if "--master_port" in real:  # a fresh rendezvous port for every run
        real[real.index("--master_port") + 1] = str(free_port())
    print(f"[{res.name}] run {k + 1}/{repeat} ...", flush=True)
    run = measure(real, env, tmp, tmp / f"job{key}.log")
    res.runs.append(run)
    if run.rc != 0:
        print(f"[{res.name}] FAILED rc={run.rc}:\n{run.log[-3000:]}", flush=True)
    elif out.exists():
        res.files, res.disk, res.data = du(out)
    return run, out


def round_robin(
    jobs: list[Job], repeat: int, tmp: Path, floors: dict[str, Path]
) -> Iterator[tuple[int, Job, Run, Path]]:
    """Run every job once a round, ``repeat`` rounds (so that each layoutc row and its dd
    floor are measured within the same minutes), each by :func:`run_once`; yield (round,
    job, run, output folder) after each run and delete that folder when the caller moves
    on. A ``dd`` job copies the files of ``floors[job.target]`` (see :func:`keep_floor`),
    and is skipped while that folder is missing."""
    for k in range(repeat):
        for i, job in enumerate(jobs):
            if job.dd:
                assert job.target is not None, f"{job.name}: a dd job names its conversion"
                floor = floors[job.target]
                if not floor.exists():
                    print(f"[{job.name}] skipped: no layoutc output to copy", flush=True)
                    continue
                job.cmd = job.result.cmd = dd_copy(floor)
            run, out = run_once(job.result, job.cmd, job.env, tmp, f"{i}-{k}", k, repeat)
            yield k, job, run, out
            shutil.rmtree(out, ignore_errors=True)


# A traceback's exception line: ``ValueError: ...``, ``torch.x.CheckpointException: ...``.
EXCEPTION = r"[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b"


def error_line(log: str, pattern: str = EXCEPTION) -> str:
    """The last line of ``log`` that ``pattern`` matches at its start (by default a
    traceback's exception line), else its last line; 300 characters at the most."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    found = [ln for ln in lines if re.match(pattern, ln)]
    return (found or lines or ["(no output)"])[-1][:300]


def note_error(res: Result, log: str, ckpt: Path, pattern: str = EXCEPTION) -> None:
    """Add the error line of a failed run's ``log`` (:func:`error_line`, the checkpoint's
    path written CKPT) to ``res.note``, unless the note has it: the first error of racing
    workers varies from run to run."""
    line = error_line(log, pattern).replace(str(ckpt), "CKPT")
    if line not in res.note:
        res.note = f"{res.note} / {line}" if res.note else line


def manifest(out: Path) -> str:
    """The checksum manifest layoutc wrote into ``out``, as text."""
    return (out / "layoutc-manifest.json").read_text()


def verify_output(
    layoutc: str, job: Job, k: int, out: Path, checks: list[str]
) -> subprocess.CompletedProcess[str]:
    """``layoutc verify`` of ``out``, the output of run ``k + 1`` of ``job``; its return code
    is recorded in ``checks``."""
    v = subprocess.run([layoutc, "verify", str(out)], capture_output=True, text=True)
    checks.append(f"layoutc verify ({job.name}, run {k + 1}): rc {v.returncode}")
    return v


def same_manifest(out: Path, first: dict[str, str], target: str) -> bool:
    """Whether ``out`` holds the manifest that the first run of conversion ``target`` wrote
    (``first[target]``, recorded now if this is that run)."""
    return manifest(out) == first.setdefault(target, manifest(out))


def keep_floor(out: Path, floor: Path) -> None:
    """Keep the first output of a conversion as ``floor``, read into the page cache: the
    files its dd job copies."""
    if not floor.exists():
        out.rename(floor)
        warm(floor)


def run_check(
    ds_python: str, script: Path, paths: list[Path], env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], dict]:
    """``script --check PATHS`` in ``ds_python`` (the content check reads the outputs with
    torch): the finished process and the JSON summary it printed last ({} if none)."""
    c = subprocess.run(
        [ds_python, str(script), "--check", *map(str, paths)],
        capture_output=True,
        text=True,
        env=env,
    )
    lines = c.stdout.strip().splitlines()
    return c, json.loads(lines[-1]) if lines else {}


def finish_check(summary: dict, problems: list[str]) -> NoReturn:
    """End a content check: print ``summary`` and the first 20 ``problems`` as the JSON line
    that :func:`run_check` reads, and exit 1 if there are any."""
    summary["problems"] = problems[:20] + (
        [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []
    )
    print(json.dumps(summary))
    sys.exit(1 if problems else 0)


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


def parse(ap: argparse.ArgumentParser, worker: Callable[[Path], None]) -> argparse.Namespace:
    """The parsed command line of a benchmark that launches itself under torchrun to build
    its checkpoint. With ``--worker`` this process is one of those ranks: it runs
    ``worker(--out)`` and exits (:func:`exit_worker`) instead of returning."""
    args = ap.parse_args()
    if args.worker:
        exit_worker(lambda: worker(args.out))
    return args


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


def print_runs(build: Result, jobs: list[Job]) -> None:
    """The Markdown table of a round-robin benchmark, a row for the build and each job
    (``vs dd``: a layoutc row's best wall over the best wall of its conversion's dd floor;
    memory columns: the worst run's), then every run's wall time."""
    floor = {j.target: j.result for j in jobs if j.dd}
    print(
        "| step | wall s | vs dd | wall + sync s | CPU s | max-process RSS MiB | "
        "tree PSS MiB | tree anon PSS MiB | output files | output MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r, j in [(build, None), *((j.result, j) for j in jobs)]:
        b = r.best
        label = r.name + (" (cached)" if r.cached else "")
        if not r.runs:
            print(f"| {label} | not run: no layoutc output to copy | | | | | | | | |")
            continue
        if b is None:
            fails = ", ".join(f"{x.wall:.1f}" for x in r.runs)
            print(f"| {label} | fails after {fails} s: `{r.note}` | | | | | | | | |")
            continue
        vs = "-"
        if j is not None and j.target and not j.dd:
            vs = ratio(b.wall, floor[j.target].best_time())
        print(
            f"| {label} | {secs(b.wall)} | {vs} | {secs(b.wall + b.sync)} | {secs(b.cpu)} | "
            f"{mib(r.stat('maxrss'))} | {mib(r.stat('pss'))} | {mib(r.stat('pss_anon'))} | "
            f"{r.files} | {r.disk / 1e6:,.0f} |"
        )
    print()
    print(
        "Every run (s): "
        + "; ".join(
            f"{j.name}: "
            + ", ".join(
                f"{x.wall:.2f}" if x.rc == 0 else f"rc {x.rc} {x.wall:.2f}" for x in j.result.runs
            )
            for j in jobs
            if j.result.runs
        )
        + "."
    )
