"""Tools of the attack tests: run the real command line in a bounded child process,
and check what a refusal must leave behind.

Every case in ``tests/attacks/`` is a hostile or damaged input. A refusal is: exit code 1, a
message naming the file and what is wrong, no Python traceback, nothing written outside the
output folder, no output that looks complete, and the source unchanged — within a time and
memory bound, so a hang or a bomb fails the test instead of the machine.
"""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "deepspeed-zero2"
GiB = 1 << 30


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str
    seconds: float


def cli(
    *argv: str | Path, timeout: float = 60, memory: int = 3 * GiB, cwd: Path | None = None
) -> Run:
    """``python -m layoutc ARGV`` in a child process limited to ``memory`` bytes of address
    space and ``timeout`` seconds (a hang raises ``subprocess.TimeoutExpired``)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "layoutc", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit,
        env=env,
        cwd=cwd,
    )
    return Run(p.returncode, p.stdout, p.stderr, time.perf_counter() - start)


def assert_refused(run: Run, *needles: str) -> None:
    """Exit 1 with a message (no traceback) that contains every one of ``needles``."""
    assert "Traceback" not in run.err, run.err
    assert run.code == 1, f"exit {run.code}\nstdout: {run.out}\nstderr: {run.err}"
    for n in needles:
        assert n in run.err, f"{n!r} not in:\n{run.err}"


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (links not followed) with the SHA-256 of its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + os.readlink(p)
    return out


def assert_no_output(out: Path) -> None:
    """``out`` is absent or empty, and no partial or swap folder was left beside it."""
    assert not out.exists() or (out.is_dir() and not any(out.iterdir())), sorted(out.rglob("*"))
    left = [p.name for p in out.parent.iterdir() if p.name.startswith(out.name + ".")]
    assert not left, left
