"""What interrupted work left behind: the partial folders (:func:`partials`) and swap
folders (:func:`swaps`) of conversions whose process is gone, and how to name one
(:func:`described`). Standard library only.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator
from pathlib import Path

_PARTIAL = re.compile(r"\.partial-(\d+)-[0-9a-f]+")
_SWAP = re.compile(r"\.swap-(\d+)(?:-\d+)?")
IN_USE: set[Path] = set()  # partial folders a run in this process is building (absolute)


def _beside(out: Path, pattern: re.Pattern[str]) -> Iterator[tuple[Path, int]]:
    """The folders beside ``out`` whose name is ``out``'s and then ``pattern`` (its first
    group a process id), and that process id."""
    for p in sorted(out.parent.glob(f"{glob.escape(out.name)}.*")):
        m = pattern.fullmatch(p.name[len(out.name) :])
        if m and p.is_dir() and not p.is_symlink():
            yield p, int(m[1])


def partials(out: Path, dead: bool = False) -> list[Path]:
    """The partial folders of conversions into ``out`` (``dead``: of processes that are
    gone), in name order."""
    return [p for p, pid in _beside(out, _PARTIAL) if not (dead and _running(p, pid))]


def swaps(out: Path) -> list[Path]:
    """The swap folders beside ``out`` (``OUT.swap-<pid>[-<rank>]``: spilled tensors) of
    conversions whose process is gone: scratch that nothing reads again."""
    return [p for p, pid in _beside(out, _SWAP) if pid != os.getpid() and not process_alive(pid)]


def _running(p: Path, pid: int) -> bool:
    """Whether a run still builds ``p``: its process runs and, if it is this one, holds it."""
    return p.absolute() in IN_USE if pid == os.getpid() else process_alive(pid)


def size_of(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def described(p: Path, why: str) -> str:
    """A line for a partial folder a conversion that did not finish left: its size, ``why``
    it stays, and how to remove it. Nothing is removed."""
    pid = re.search(r"\.(?:partial|swap)-(\d+)", p.name)
    gone = f" (process {pid[1]} is gone)" if pid else ""
    return (
        f"{p}: {size_of(p) / 2**20:,.1f} MiB left by a conversion that did not finish{gone}; "
        f"{why}: remove it with `rm -r {p}`"
    )


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (on this host): it exists and is not a zombie (killed,
    not yet reaped by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True
