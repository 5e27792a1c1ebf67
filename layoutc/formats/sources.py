"""The formats a conversion reads, in the order a path is tried: one row per format.

A row says how to recognise the format from a path and how to open it as a
:class:`~layoutc.formats.checkpoint.Checkpoint`; a new source format is a new row.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from layoutc.errors import UsageError
from layoutc.formats import dcp, deepspeed, weights
from layoutc.formats.checkpoint import Checkpoint


def _weights(path: Path, tag: str | None) -> Checkpoint:
    return weights.open_weights(path)


SOURCES: list[tuple[str, Callable[[Path], bool], Callable[[Path, str | None], Checkpoint]]] = [
    ("deepspeed", deepspeed.is_deepspeed, deepspeed.open_checkpoint),
    ("dcp", dcp.is_dcp, dcp.open_dcp),
    ("weights", weights.is_weights, _weights),
]


def open_source(path: str | Path, tag: str | None = None) -> Checkpoint:
    """The checkpoint at ``path`` (``tag``: a DeepSpeed tag other than ``latest``'s), in
    the first format of :data:`SOURCES` it is; a DeepSpeed checkpoint if none. A path that
    does not exist is a :class:`~layoutc.errors.UsageError` (exit 2)."""
    p = Path(path)
    if not p.exists():  # a path the command line names wrongly: a usage error, as verify's
        raise UsageError(f"{p}: no such file or folder")
    for _, test, opener in SOURCES:
        if test(p):
            return opener(p, tag)
    return deepspeed.open_checkpoint(p, tag)  # names what a DeepSpeed folder lacks


def as_checkpoint(source: Checkpoint | str | Path) -> Checkpoint:
    """``source`` itself, or the checkpoint in the folder it names."""
    return source if isinstance(source, Checkpoint) else open_source(source)


def in_folder(folder: str | Path) -> Checkpoint:
    """The files in ``folder`` as a handle, without requiring a whole checkpoint there: a
    DeepSpeed tag folder's (its files checked as DeepSpeed's), else plain files."""
    p = Path(folder)
    if deepspeed.is_deepspeed(p, files="any"):
        return deepspeed.DeepSpeedCheckpoint.scan(p)
    return Checkpoint(p)
