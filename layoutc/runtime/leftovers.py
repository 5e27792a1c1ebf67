"""What interrupted work left behind: the partial folders of conversions whose process is
gone (:func:`partials`), and how to name one (:func:`described`). Standard library only.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

_PARTIAL = re.compile(r"\.partial-(\d+)-[0-9a-f]+")
IN_USE: set[Path] = set()  # partial folders a run in this process is building (absolute)


def partials(out: Path, dead: bool = False) -> list[Path]:
    """The partial folders of conversions into ``out`` (``dead``: of processes that are
    gone), in name order."""
    found = []
    for p in sorted(out.parent.glob(f"{glob.escape(out.name)}.partial-*")):
        m = _PARTIAL.fullmatch(p.name[len(out.name) :])
        if m and p.is_dir() and not p.is_symlink() and not (dead and _running(p, int(m[1]))):
            found.append(p)
    return found


def _running(p: Path, pid: int) -> bool:
    """Whether a run still builds ``p``: its process runs and, if it is this one, holds it."""
    return p.absolute() in IN_USE if pid == os.getpid() else process_alive(pid)


def size_of(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def described(p: Path, why: str) -> str:
    """A line for a partial folder a conversion that did not finish left: its size, ``why``
    it stays, and how to remove it. Nothing is removed."""
    pid = _PARTIAL.fullmatch(p.name[p.name.rindex(".partial-") :])
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
