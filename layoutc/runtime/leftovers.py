"""What interrupted work left behind: the partial folders of conversions whose process is
gone. Standard library only, so that the command line can say so before it loads anything.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path


def left_behind(out: Path) -> list[str]:
    """A line for each partial folder of ``out`` that a conversion which did not finish
    left (its process is gone): its size, and how to remove it. Nothing is removed."""
    lines = []
    for p in sorted(out.parent.glob(f"{glob.escape(out.name)}.partial-*")):
        m = re.fullmatch(r"\.partial-(\d+)-[0-9a-f]+", p.name[len(out.name) :])
        if not m or not p.is_dir() or process_alive(int(m[1])):
            continue
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        lines.append(
            f"{p}: {size / 2**20:,.1f} MiB left by a conversion that did not finish (process "
            f"{m[1]} is gone); it is not reused: remove it with `rm -r {p}`"
        )
    return lines


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
