"""A cached corpus of real DeepSpeed checkpoints with their ground truth, and a DeepSpeed loader.

    build(cases, root) -> {case: checkpoint root}    runs ds_make.py under torchrun (cached)
    load(case, ckpt, world=..., universal=...)       runs ds_load.py under torchrun (plain ZeRO
                                                      cases: one launch per world size serves all)
    family(case) -> [cases]                           the cases built together with ``case``
    ds_to_universal(tag_dir, out_root)                DeepSpeed's own converter (a baseline)
    read_truth(path) -> (tensors, meta)               numpy arrays + json, no torch needed
    build_dcp(cases, root) -> {case: case root}        runs dcp_make.py under torchrun (cached)
    dcp_load(case, folder, world, out_dir)            runs dcp_load.py under torchrun
    dcp_to_torch_save(folder, out_dir)                torch's own DCP converter (a baseline)

``CASES`` are the data-parallel (ZeRO) cases, ``PARALLEL_CASES`` the pipeline and
tensor-parallel ones (ds_parallel.py), ``MOE_CASES`` DeepSpeed's native Mixture-of-Experts ones
(ds_moe.py, its own torchrun script), ``AUTOEP_CASES`` DeepSpeed AutoEP on a Hugging Face
Mixtral (ds_autoep.py, likewise; needs transformers), ``ALL_CASES`` all of them;
``build(None)`` builds all. ``DCP_CASES`` are PyTorch Distributed Checkpoints written by FSDP2
(dcp_make.py, a torchrun script of its own; needs transformers, not DeepSpeed), built by
``build_dcp`` alone. ``hf_load_strict(case, dir)`` asks the Hugging Face model of an
AutoEP case whether it takes a folder of safetensors as its state dict.

DeepSpeed runs in a separate interpreter: ``$LAYOUTC_DS_PYTHON`` if set, else this one. It
needs torch, deepspeed and safetensors, and transformers for the AutoTP cases (see the
/tmp/dsvenv recipe in the docstring of conftest.py). This module itself imports neither torch
nor DeepSpeed.

Cache layout: ``root/ds<deepspeed version>-<hash of ds_make.py, ds_parallel.py and the
versions>/<case>/`` (MoE cases: ``root/ds<version>-moe-<the same hash with ds_moe.py>/``, so
that editing ds_moe.py rebuilds only them; AutoEP cases likewise under ``-autoep-`` with
ds_autoep.py) holding the checkpoint root (``latest``, ``global_step2/``),
``ground_truth.safetensors``, ``ground_truth.json`` and ``DONE`` (written last: a case without
it is rebuilt); ``root/torch_extensions`` caches DeepSpeed's JIT-built CPU comm op;
``root/logs`` keeps the torchrun output of each launch. DCP cases live under
``root/dcp-torch<torch version>-<hash of dcp_make.py and the versions>/<case>/``: the case
root holds ``dcp/`` (the DCP checkpoint itself, the folder to hand to a reader or to
``dcp_load``), ``ground_truth.safetensors``, ``ground_truth.json`` and ``DONE``.
``ds_groups_of(case)`` names the DeepSpeed corpus's two param groups of a case's TinyLM.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MAKE = HERE / "ds_make.py"
PARALLEL = HERE / "ds_parallel.py"  # imported by ds_make.py: part of the cache key
MOE = HERE / "ds_moe.py"  # a torchrun script of its own; imports ds_make.py
AUTOEP = HERE / "ds_autoep.py"  # likewise
LOAD = HERE / "ds_load.py"
DCP_MAKE = HERE / "dcp_make.py"  # PyTorch DCP by FSDP2: its own torchrun script and cache
DCP_LOAD = HERE / "dcp_load.py"
PYTHON_ENV = "LAYOUTC_DS_PYTHON"
TIMEOUT_S = 600


def _module(name: str, path: Path) -> Any:
    """A script beside this file as a module (they import torch/deepspeed only inside
    functions)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_DS_MAKE = _module("layoutc_interop_ds_make", MAKE)
CASES: dict[str, dict[str, Any]] = _DS_MAKE.CASES
PARALLEL_CASES: dict[str, dict[str, Any]] = _DS_MAKE.PARALLEL_CASES
MOE_CASES: dict[str, dict[str, Any]] = _module("layoutc_interop_ds_moe", MOE).CASES
AUTOEP_CASES: dict[str, dict[str, Any]] = _module("layoutc_interop_ds_autoep", AUTOEP).CASES
ALL_CASES: dict[str, dict[str, Any]] = {**_DS_MAKE.ALL_CASES, **MOE_CASES, **AUTOEP_CASES}
_DCP_MAKE = _module("layoutc_interop_dcp_make", DCP_MAKE)
DCP_CASES: dict[str, dict[str, Any]] = _DCP_MAKE.CASES
DCP_DIR: str = _DCP_MAKE.DCP_DIR  # the DCP checkpoint's folder inside a case root
# (script, cache folder label, its cases): each script builds into a cache folder of its own.
SCRIPTS: tuple[tuple[Path, str, dict[str, dict[str, Any]]], ...] = (
    (MAKE, "", _DS_MAKE.ALL_CASES),
    (MOE, "moe", MOE_CASES),
    (AUTOEP, "autoep", AUTOEP_CASES),
)


def family(case: str) -> list[str]:
    """The cases worth building together with ``case``: the data-parallel cases, the MoE
    cases, the AutoEP cases, or the parallel cases of its kind (the AutoTP ones need
    transformers, the others do not)."""
    if case in CASES:
        return list(CASES)
    if case in MOE_CASES:
        return list(MOE_CASES)
    if case in AUTOEP_CASES:
        return list(AUTOEP_CASES)
    kind = PARALLEL_CASES[case]["kind"]
    return [n for n, c in PARALLEL_CASES.items() if c["kind"] == kind]


def ds_python() -> str:
    return os.environ.get(PYTHON_ENV) or sys.executable


@cache
def versions(python: str | None = None) -> dict[str, str] | None:
    """{'deepspeed': ..., 'torch': ..., 'safetensors': ...[, 'transformers': ...]} as seen by
    ``python``; None if it cannot run the first three (transformers is optional)."""
    python = python or ds_python()
    code = (
        "import importlib.metadata as m, json\n"
        "import deepspeed, torch, safetensors\n"
        "v = {k: m.version(k) for k in ('deepspeed', 'torch', 'safetensors')}\n"
        "try:\n"
        "    v['transformers'] = m.version('transformers')\n"
        "except m.PackageNotFoundError:\n"
        "    pass\n"
        "print(json.dumps(v))\n"
    )
    env = _env(None)
    try:
        out = subprocess.run(
            [python, "-c", code], capture_output=True, text=True, timeout=300, env=env
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def cache_key(python: str | None = None, *, script: Path = MAKE) -> str:
    """The cache folder's name for the cases ``script`` builds (one of ``SCRIPTS``)."""
    vers = versions(python)
    if vers is None:
        raise RuntimeError(f"DeepSpeed is not importable by {python or ds_python()}")
    h = hashlib.sha256(MAKE.read_bytes())
    h.update(PARALLEL.read_bytes())
    h.update(json.dumps(vers, sort_keys=True).encode())
    label = next(label for s, label, _ in SCRIPTS if s == script)
    if label:
        h.update(script.read_bytes())
        return f"ds{vers['deepspeed']}-{label}-{h.hexdigest()[:12]}"
    return f"ds{vers['deepspeed']}-{h.hexdigest()[:12]}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(ext_dir: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    if ext_dir is not None:
        env["TORCH_EXTENSIONS_DIR"] = str(ext_dir)
    return env


def torchrun_command(python: str, nproc: int, script: Path, args: list[str]) -> list[str]:
    """``script args`` under torchrun at ``nproc`` ranks on a free local port."""
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(script),
        *args,
    ]


def torchrun(
    script: Path,
    args: list[str],
    nproc: int,
    *,
    python: str | None = None,
    ext_dir: Path,
    log: Path,
    attempts: int = 2,
) -> int:
    """Run ``script`` under torchrun on a free port; retried once (port races, rare aborts)."""
    python = python or ds_python()
    log.parent.mkdir(parents=True, exist_ok=True)
    code = -1
    for attempt in range(attempts):
        cmd = torchrun_command(python, nproc, script, args)
        with log.open("a") as fh:
            fh.write(f"$ {' '.join(cmd)}  # attempt {attempt + 1}\n")
            fh.flush()
            try:
                code = subprocess.run(
                    cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(ext_dir), timeout=TIMEOUT_S
                ).returncode
            except subprocess.TimeoutExpired:
                code = -9
            fh.write(f"# exit {code}\n")
        if code == 0:
            return code
    tail = log.read_text(errors="replace")[-6000:]
    raise RuntimeError(f"torchrun {script.name} {' '.join(args)} failed ({code}):\n{tail}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build(
    cases: Iterable[str] | None, root: Path | str, *, python: str | None = None
) -> dict[str, Path]:
    """Make (or reuse) the checkpoints of ``cases`` (all when None) under ``root``.

    Cases of one world size (and one ``launch`` group: see ds_make.PARALLEL_CASES) share one
    torchrun launch; MoE and AutoEP cases run ds_moe.py / ds_autoep.py into cache folders of
    their own. Returns {case: checkpoint root}.
    """
    names = list(ALL_CASES) if cases is None else list(cases)
    unknown = [n for n in names if n not in ALL_CASES]
    if unknown:
        raise KeyError(f"unknown interop case(s) {unknown}; known: {sorted(ALL_CASES)}")
    root = Path(root).expanduser()
    out: dict[str, Path] = {}
    for script, _, cases_ in SCRIPTS:
        mine = [n for n in names if n in cases_]
        if mine:
            base = root / cache_key(python, script=script)
            _build(script, mine, base, root, python)
            out.update({n: base / n for n in mine})
    return {n: out[n] for n in names}


def _build(
    script: Path,
    names: list[str],
    base: Path,
    root: Path,
    python: str | None,
    cases: dict[str, dict[str, Any]] = ALL_CASES,
) -> None:
    """Run ``script`` for those of ``names`` (from ``cases``) without a DONE in ``base``, a
    launch per (world, launch group)."""
    with _locked(base / ".lock"):
        todo = [n for n in names if not (base / n / "DONE").is_file()]
        launches: dict[tuple[int, str], list[str]] = {}
        for n in todo:
            case = cases[n]
            launches.setdefault((case["world"], case.get("launch", "")), []).append(n)
        for (world, launch), group in sorted(launches.items()):
            target = base / group[0] if len(group) == 1 else base
            stamp = time.strftime("%Y%m%d-%H%M%S")
            tag = f"-{launch}" if launch else ""
            torchrun(
                script,
                ["--case", ",".join(group), "--out", str(target)],
                world,
                python=python,
                ext_dir=root / "torch_extensions",
                log=root / "logs" / f"make-w{world}{tag}-{stamp}-{os.getpid()}.log",
            )
        missing = [n for n in names if not (base / n / "DONE").is_file()]
        if missing:
            raise RuntimeError(f"{script.name} finished but left no DONE for {missing} in {base}")


def read_truth(path: Path | str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors as float32 numpy arrays, json meta) of a ground-truth or ds_load dump.

    ``path`` is the ``.safetensors`` file or a checkpoint root holding ground_truth.*.
    """
    from safetensors.numpy import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "ground_truth.safetensors"
    meta = json.loads(path.with_suffix(".json").read_text())
    return load_file(str(path)), meta


@cache
def dcp_versions(python: str | None = None) -> dict[str, str] | None:
    """{'torch': ..., 'transformers': ..., 'safetensors': ...} as seen by ``python`` (the
    DCP cases need no DeepSpeed); None if it cannot import them."""
    python = python or ds_python()
    code = (
        "import importlib.metadata as m, json\n"
        "import torch, transformers, safetensors\n"
        "print(json.dumps({k: m.version(k) for k in ('torch', 'transformers', 'safetensors')}))\n"
    )
    try:
        out = subprocess.run(
            [python, "-c", code], capture_output=True, text=True, timeout=300, env=_env(None)
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def dcp_cache_key(python: str | None = None) -> str:
    """The cache folder's name for the DCP cases: torch's version and a hash of dcp_make.py,
    ds_make.py (whose model and param groups the "tiny" cases train) and the versions
    (dcp_load.py is no part of it: it writes nothing into the corpus)."""
    vers = dcp_versions(python)
    if vers is None:
        raise RuntimeError(f"torch/transformers are not importable by {python or ds_python()}")
    h = hashlib.sha256(DCP_MAKE.read_bytes())
    h.update(MAKE.read_bytes())
    h.update(json.dumps(vers, sort_keys=True).encode())
    return f"dcp-torch{vers['torch']}-{h.hexdigest()[:12]}"


def build_dcp(
    cases: Iterable[str] | None, root: Path | str, *, python: str | None = None
) -> dict[str, Path]:
    """Make (or reuse) the DCP cases ``cases`` (all when None) under ``root``; cases of one
    world share a launch. Returns {case: case root}; the DCP checkpoint itself is
    ``case root / DCP_DIR``, beside ground_truth.* (read them with :func:`read_truth`)."""
    names = list(DCP_CASES) if cases is None else list(cases)
    unknown = [n for n in names if n not in DCP_CASES]
    if unknown:
        raise KeyError(f"unknown DCP case(s) {unknown}; known: {sorted(DCP_CASES)}")
    root = Path(root).expanduser()
    base = root / dcp_cache_key(python)
    _build(DCP_MAKE, names, base, root, python, DCP_CASES)
    return {n: base / n for n in names}


def ds_groups_of(case: str, *, python: str | None = None) -> list[dict[str, Any]]:
    """``ds_make.param_groups`` of the TinyLM of ``case`` (a ds_make data-parallel case or a
    "tiny" DCP case) as [{"params": [fqn, ...], "weight_decay": wd}, ...], in the DeepSpeed
    corpus's group order: what both kinds of checkpoint must say of the groups. Runs ds_make's
    own code in ``python`` (it needs torch, not DeepSpeed)."""
    model = (CASES.get(case) or DCP_CASES[case])["model"]
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "import ds_make\n"
        f"m = ds_make.make_model(**{model!r})\n"
        "names = {id(p): n for n, p in m.named_parameters()}\n"
        "print(json.dumps([{'params': [names[id(p)] for p in g['params']],\n"
        "                   'weight_decay': g['weight_decay']} for g in ds_make.param_groups(m)]))\n"
    )
    cmd = [python or ds_python(), "-c", code]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(None), timeout=TIMEOUT_S)
    if out.returncode != 0:
        raise RuntimeError(f"ds_make.param_groups failed ({out.returncode}):\n{out.stderr[-6000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def dcp_load(
    case: str,
    folder: Path | str,
    world: int,
    out_dir: Path | str,
    *,
    root: Path | str | None = None,
    python: str | None = None,
    expect_error: bool = False,
    train_state: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Have a fresh FSDP2 job of ``world`` ranks load the DCP checkpoint ``folder`` (the
    folder holding ``.metadata``) as DCP case ``case`` (dcp_load.py: strict default planner,
    then ``set_state_dict`` and one more training step).

    Returns (tensors as numpy arrays in the ground-truth naming, json meta) of what the job
    holds after loading; the dump stays in ``out_dir`` (``loaded-w<world>.safetensors`` /
    ``.json``). A refusal raises unless ``expect_error``; then the tensors are empty and
    ``meta["error"]`` says why. ``train_state=False``: the folder holds the model and the
    optimizer alone (no ``train_state.*`` keys are asked for; the step resumes at
    dcp_make.STEPS). ``root`` caches the logs (default: a temp dir).
    """
    if case not in DCP_CASES:
        raise KeyError(f"unknown DCP case {case!r}; known: {sorted(DCP_CASES)}")
    root = Path(root).expanduser() if root else Path(tempfile.gettempdir()) / "layoutc-interop"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dump = out_dir / f"loaded-w{world}.safetensors"
    for stale in (dump, dump.with_suffix(".json")):
        stale.unlink(missing_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args = ["--case", case, "--dcp", str(folder), "--dump", str(dump)]
    if not train_state:
        args.append("--no-train-state")
    torchrun(
        DCP_LOAD,
        args,
        world,
        python=python,
        ext_dir=root / "torch_extensions",
        log=root / "logs" / f"dcp-load-{case}-w{world}-{stamp}-{os.getpid()}.log",
    )
    if not dump.exists():
        meta = json.loads(dump.with_suffix(".json").read_text())
        if not expect_error:
            raise RuntimeError(f"FSDP2 refused {folder} as {case}: {meta['error']}")
        return {}, meta
    if expect_error:
        raise AssertionError(f"FSDP2 loaded {folder} as {case}; an error was expected")
    return read_truth(dump)


def dcp_to_torch_save(
    folder: Path | str, out_dir: Path | str, *, python: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """torch's own ``format_utils.dcp_to_torch_save`` on the DCP checkpoint ``folder``, in
    the ground-truth naming (dcp_make.py --to-torch-save; it unpickles ``.metadata`` as torch
    always does). Raises RuntimeError with torch's message if torch fails."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dump = out_dir / "torch_save.safetensors"
    cmd = [
        python or ds_python(),
        str(DCP_MAKE),
        "--to-torch-save",
        str(folder),
        "--dump",
        str(dump),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(None), timeout=TIMEOUT_S)
    if out.returncode != 0:
        raise RuntimeError(f"dcp_to_torch_save failed ({out.returncode}):\n{out.stderr[-6000:]}")
    return read_truth(dump)


@dataclass
class Loaded:
    """What DeepSpeed loaded (ds_load.py), or why it refused (``error``)."""

    tensors: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    log: Path | None = None


def load(
    case: str,
    ckpt: Path | str,
    *,
    world: int | None = None,
    ep: int | None = None,
    universal: bool = False,
    tag: str | None = None,
    root: Path | str | None = None,
    python: str | None = None,
    expect_error: bool = False,
    fresh: bool = False,
    via_layoutc: bool | Path = False,
) -> Loaded:
    """Have real DeepSpeed load ``ckpt`` as ``case`` at ``world`` ranks (default: the case's;
    a pipeline / TP case keeps its pp and tp, so ``world`` sets the data-parallel size; a MoE
    case is built at expert-parallel size ``ep``, default its own).

    A refusal by DeepSpeed raises unless ``expect_error``; then ``Loaded.error`` holds it.
    ``fresh``: the checkpoint has no lr scheduler state (load_lr_scheduler_states=False).
    ``via_layoutc``: load with ``layoutc.deepspeed.load_checkpoint`` (any saved topology);
    a folder: make a reshard there (its ``scratch``).
    ``root`` is where torch extensions / logs are cached (default: a temp dir).
    """
    if case not in ALL_CASES:
        raise KeyError(f"unknown interop case {case!r}")
    world = world or ALL_CASES[case]["world"]
    root = Path(root).expanduser() if root else Path(tempfile.gettempdir()) / "layoutc-interop"
    with tempfile.TemporaryDirectory(prefix="ds_load-") as tmp:
        dump = Path(tmp) / "loaded.safetensors"
        args = ["--case", case, "--ckpt", str(ckpt), "--dump", str(dump)]
        if universal:
            args.append("--universal")
        if fresh:
            args.append("--fresh")
        if via_layoutc:
            args.append("--layoutc")
            if not isinstance(via_layoutc, bool):
                args += ["--scratch", str(via_layoutc)]
        if ep is not None:
            args += ["--ep", str(ep)]
        if tag is not None:
            args += ["--tag", tag]
        log = (
            root
            / "logs"
            / f"load-{case}-w{world}{f'-ep{ep}' if ep else ''}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        )
        if case in CASES or case in PARALLEL_CASES:  # served: see _Server
            group = ALL_CASES[case].get("launch", "")
            log = _server(python or ds_python(), world, root, group).run(args)
        else:  # Mixture-of-Experts: expert groups set per process; a launch of its own
            torchrun(LOAD, args, world, python=python, ext_dir=root / "torch_extensions", log=log)
        if not dump.exists():
            meta = json.loads(dump.with_suffix(".json").read_text())
            if not expect_error:
                raise RuntimeError(f"DeepSpeed refused {ckpt} as {case}: {meta['error']}")
            return Loaded(meta=meta, error=meta["error"], log=log)
        tensors, meta = read_truth(dump)
        if expect_error:
            raise AssertionError(f"DeepSpeed loaded {ckpt} as {case}; an error was expected")
        return Loaded(tensors=tensors, meta=meta, log=log)


class _Server:
    """One torchrun launch of ds_load.py ``--serve`` at one world size, running the loads
    it is asked for one after another: starting torch and DeepSpeed on every rank costs
    more than a load. Loads share a launch where ds_make builds their cases together (a
    case's ``launch`` group: the same process-global DeepSpeed state, such as AutoTP's
    groups). Started on first use, stopped at exit; a load that kills it fails with its
    log."""

    def __init__(self, python: str, world: int, root: Path, group: str = "") -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=f"ds_load-serve-w{world}-"))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        label = f"-{group}" if group else ""
        self.log = root / "logs" / f"load-serve-w{world}{label}-{stamp}-{os.getpid()}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        cmd = torchrun_command(python, world, LOAD, ["--serve", str(self.folder)])
        self.out = self.log.open("a")
        self.out.write(f"$ {' '.join(cmd)}\n")
        self.out.flush()
        self.proc = subprocess.Popen(
            cmd, stdout=self.out, stderr=subprocess.STDOUT, env=_env(root / "torch_extensions")
        )
        self.count = 0

    def run(self, args: list[str]) -> Path:
        self.count += 1
        name = f"{self.count:05d}"
        tmp = self.folder / f"{name}.tmp"
        tmp.write_text(json.dumps(args))
        tmp.rename(self.folder / f"{name}.req")
        done = self.folder / f"{name}.done"
        deadline = time.monotonic() + TIMEOUT_S
        while not done.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                _SERVERS.pop(next(k for k, v in _SERVERS.items() if v is self), None)
                tail = self.log.read_text(errors="replace")[-6000:]
                raise RuntimeError(f"ds_load.py --serve failed on {' '.join(args)}:\n{tail}")
            time.sleep(0.05)
        return self.log

    def stop(self) -> None:
        if self.proc.poll() is None:
            (self.folder / "STOP").write_text("")
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.out.close()


_SERVERS: dict[tuple[str, int, Path, str], _Server] = {}


LIVE_SERVERS = 2  # each holds its ranks' memory (~0.4 GB each): the least recent stops


def _server(python: str, world: int, root: Path, group: str) -> _Server:
    key = (python, world, root, group)
    if key not in _SERVERS:
        if not _SERVERS:
            atexit.register(_stop_servers)
        while len(_SERVERS) >= LIVE_SERVERS:
            _SERVERS.pop(next(iter(_SERVERS))).stop()
        _SERVERS[key] = _Server(python, world, root, group)
    _SERVERS[key] = _SERVERS.pop(key)  # the most recently used last
    return _SERVERS[key]


def _stop_servers() -> None:
    for server in _SERVERS.values():
        server.stop()
    _SERVERS.clear()


def hf_load_strict(
    case: str, directory: Path | str, *, python: str | None = None
) -> dict[str, Any]:
    """Whether the Hugging Face model of AutoEP ``case`` (``MixtralForCausalLM(config)``)
    takes the ``*.safetensors`` files in ``directory`` with ``load_state_dict(sd,
    strict=True)``: {"files", "missing", "unexpected", "error" (None when it took them)}; see
    ds_autoep.hf_load_strict. Runs in DeepSpeed's interpreter, which has transformers."""
    if case not in AUTOEP_CASES:
        raise KeyError(f"{case!r} is not an AutoEP case; known: {sorted(AUTOEP_CASES)}")
    cmd = [python or ds_python(), str(AUTOEP), "--case", case, "--hf-check", str(directory)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(None), timeout=TIMEOUT_S)
    if out.returncode != 0:
        raise RuntimeError(
            f"ds_autoep.py --hf-check failed ({out.returncode}):\n{out.stderr[-6000:]}"
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


UNIVERSAL_STATES = ("fp32", "exp_avg", "exp_avg_sq")


def assert_universal_matches(out: Path | str, truth: dict[str, Any]) -> int:
    """Assert that the universal checkpoint at ``out`` holds every fp32 master and moment of
    the save-time ``truth``, in its shape, exactly; returns how many were compared."""
    import numpy as np
    import torch

    out = Path(out)
    tag = (out / "latest_universal").read_text()
    compared = 0
    for key, want in truth.items():
        kind, name = key.split("/", 1)
        if kind in UNIVERSAL_STATES:
            got = torch.load(out / tag / "zero" / name / f"{kind}.pt", weights_only=True)["param"]
            assert tuple(got.shape) == tuple(want.shape), key  # multi-dim params keep their shape
            assert np.array_equal(got.float().numpy(), want), key
            compared += 1
    return compared


def universal_exact(ckpt: Path | str, out: Path, truth: dict[str, Any], **options: Any) -> int:
    """layoutc's conversion of ``ckpt`` to DeepSpeed's universal format in ``out``
    (``options`` as for ``convert``), checked by :func:`assert_universal_matches`; returns
    how many states were compared."""
    from layoutc.conversion import convert

    convert(ckpt, out, "universal", **options)
    return assert_universal_matches(out, truth)


RESUMED = ("step", "global_steps", "lr_scheduler")


def assert_resumed(
    loaded: Loaded, truth: dict[str, Any], meta: dict[str, Any], skip: tuple[str, ...] = ()
) -> None:
    """Assert that DeepSpeed loaded every ground-truth tensor but ``skip`` exactly, with the
    saved step, global steps and lr scheduler state, and trained one more step from there."""
    import numpy as np

    assert loaded.error is None, loaded.error
    for key, want in truth.items():
        if key not in skip:
            np.testing.assert_array_equal(loaded.tensors[key], want, err_msg=key)
    for state in RESUMED:
        assert loaded.meta[state] == meta[state], state
    assert loaded.meta["global_steps_after"] == 3 and np.isfinite(loaded.meta["next_loss"])


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but layoutc's manifest (its plan digest names the route),
    by relative path: to compare two outputs byte for byte."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "layoutc-manifest.json"
    }


def ds_to_universal(
    tag_dir: Path | str, out_root: Path | str, *, python: str | None = None
) -> Path:
    """Run DeepSpeed's ``ds_to_universal`` on ``tag_dir`` (``<root>/global_stepN``).

    Writes ``out_root/<tag>_universal`` and ``out_root/latest_universal``; returns
    ``out_root`` (what ``load(..., universal=True)`` takes). ``--inject_missing_state`` is
    passed: without it DeepSpeed refuses checkpoints lacking universal_checkpoint_info.
    """
    tag_dir, out_root = Path(tag_dir), Path(out_root)
    cmd = [
        python or ds_python(),
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(tag_dir),
        "--output_folder",
        str(out_root / f"{tag_dir.name}_universal"),
        "--inject_missing_state",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(None), timeout=TIMEOUT_S)
    if out.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed ({out.returncode}):\n{out.stderr[-6000:]}")
    return out_root


def inferred_moe(root: Path | str, case: dict[str, Any]) -> tuple[Any, Any]:
    """(checkpoint, layout) of a mixture-of-experts case as ``layoutc infer`` describes it,
    asserted canonical, at the case's dp and ep, checked against every file of the folder
    (each one placed)."""
    from layoutc.formats.deepspeed import infer, open_checkpoint
    from layoutc.formats.match import check_against
    from layoutc.lang.check import load_text
    from layoutc.lang.fmt import fmt
    from layoutc.lang.parse import parse
    from layoutc.place import place

    ckpt = open_checkpoint(root)
    text = infer(ckpt)
    assert fmt(parse(text)) == text
    layout = load_text(text, "inferred.layout")
    assert layout.mesh.sizes == {"edp": case["world"] // case["ep"], "ep": case["ep"]}
    p = place(layout)
    check_against(p, ckpt)  # every file, key, size and dtype; no file left unplaced
    assert sorted(p.files()) == sorted(f.name for f in ckpt.folder.iterdir())
    return ckpt, layout


def assert_same_files(ours: Path, theirs: Path) -> None:
    """Two tag folders hold the same files, each equal object for object (``plain``)."""
    import torch

    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    for f in sorted(p.name for p in theirs.iterdir()):
        a = torch.load(ours / f, weights_only=False)
        b = torch.load(theirs / f, weights_only=False)
        assert plain(a) == plain(b), f


def plain(x: Any) -> Any:
    """A ``torch.load``-ed object as comparable data: tensors as (dtype, shape, values),
    pickled records as their class name and fields."""
    import torch

    if isinstance(x, torch.Tensor):
        return (x.dtype, tuple(x.shape), x.float().flatten().tolist())
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [plain(v) for v in x]
    if hasattr(x, "__dict__") and not isinstance(x, type):
        return (type(x).__name__, plain(vars(x)))
    return x
