"""A checkpoint opened for one run: its files, each one's metadata loaded once.

Every stage of a run — inferring the layout, checking it against the files, the copy
checks, the writers carrying unsharded state over and the executor reading tensors —
asks the same :class:`Checkpoint` for a file, so each file is unpickled (a safetensors
header parsed) once per run, with the checks its format needs (:meth:`Checkpoint._load`).
A format is a subclass; :mod:`layoutc.formats.sources` lists them.

:meth:`Checkpoint.identity` is what a saved plan records of its source — each file's size
and a digest of its metadata — so a plan run later against a changed folder is refused
(:meth:`Checkpoint.check_identity`).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from layoutc.errors import InputError, Unsupported
from layoutc.formats import pt
from layoutc.formats import safetensors_header as st

_TENSOR_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


def layout_tensor_name(name: str, where: object) -> str:
    """``name`` as a layout may declare it (``infer``), else Unsupported naming ``where``."""
    if not _TENSOR_NAME.match(name):
        raise Unsupported(
            f"{where}: the tensor name {name!r} has characters a layout name cannot hold "
            "(letters, digits, _ and . only)"
        )
    return name


def layout_name(text: str, prefix: str) -> str:
    """``text`` (a folder's or tag's name) as a layout's name: other characters become
    ``_``; ``prefix`` where that leaves it empty or starting with a digit."""
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", text)
    return cleaned if cleaned and not cleaned[0].isdigit() else f"{prefix}_{cleaned}".rstrip("_")


class SourceChanged(InputError):
    """The source's files are not the ones a saved plan was made from."""


class Checkpoint:
    """The files of one checkpoint (``folder``; ``tag``: its DeepSpeed tag, if any)."""

    format = ""

    def __init__(self, folder: Path, tag: str | None = None) -> None:
        self.folder = folder
        self.tag = tag
        self._loaded: dict[str, Any] = {}
        self._headers: dict[str, tuple[dict[str, st.Entry], dict[str, str]]] = {}
        self.opener = pt.Opener()  # member indexes of the .pt files read

    def path(self, file: str | Path) -> Path:
        """``file``: a name relative to the folder, or (a :class:`~pathlib.Path`) a path
        as it is, e.g. one of the checkpoint's own lists."""
        return file if isinstance(file, Path) else self.folder / file

    def load(self, file: str | Path) -> Any:
        """The object in the torch file ``file``, tensors as references (no data read),
        loaded and checked once per run."""
        key = str(self.path(file))
        if key not in self._loaded:
            self._loaded[key] = self._load(Path(key))
        return self._loaded[key]

    def _load(self, path: Path) -> Any:
        return pt.load(path, self.opener)

    def member(self, path: str, name: str) -> pt.Member:
        """The zip member ``name`` of the file at ``path``, as its archive records it."""
        return self.opener.members(path)[name]

    def ref(self, file: str, key: str) -> pt.TensorRef:
        """The tensor stored at ``key`` (a ``/``-joined key path) of ``file``, unread."""
        ref = pt.at(self.load(file), key)
        if not isinstance(ref, pt.TensorRef):
            raise KeyError(key)
        return ref

    def header(self, file: str | Path) -> tuple[dict[str, st.Entry], dict[str, str]]:
        """A safetensors file's entries and metadata, parsed once per run."""
        key = str(self.path(file))
        if key not in self._headers:
            self._headers[key] = st.read_header(key)
        return self._headers[key]

    # -------------------------------------------------------------- identity

    def read(self) -> set[str]:
        """The files whose metadata was read so far, relative to the folder."""
        return {str(Path(k).relative_to(self.folder)) for k in (*self._loaded, *self._headers)}

    def data_files(self) -> list[str]:
        """The files holding the checkpoint's state, relative to its folder (by default
        those read so far)."""
        return sorted(self.read())

    def state_files(self) -> list[str]:
        """Every file of the folder that holds checkpoint state by the format's naming,
        whether or not a layout reads it (what a check refuses to leave behind)."""
        return self.data_files()

    def identity(self) -> dict[str, dict[str, Any]]:
        """What a saved plan records of its source (:meth:`check_identity`): the size of
        each of its :meth:`data_files`, and of those whose metadata was read, a SHA-256 of
        that metadata — a torch file's zip index (each member's name, size and CRC-32, the
        pickle's included), a safetensors file's header."""
        read = self.read()
        return {
            f: {
                "size": os.path.getsize(self.path(f)),
                "digest": self._digest(self.path(f)) if f in read else None,
            }
            for f in sorted(set(self.data_files()) | read)
        }

    def _digest(self, path: Path) -> str:
        h = hashlib.sha256()
        if path.suffix == ".safetensors":
            entries, metadata = self.header(path)
            for name, e in entries.items():
                h.update(repr((name, e.dtype, tuple(e.shape), e.begin, e.end)).encode())
            h.update(repr(sorted(metadata.items())).encode())
        else:
            for name, m in sorted(self.opener.members(str(path)).items()):
                h.update(repr((name, m.size, m.crc)).encode())
        return h.hexdigest()

    def check_identity(self, recorded: dict[str, dict[str, Any]]) -> None:
        """Refuse a checkpoint whose files are not those ``recorded`` (:meth:`identity`):
        one missing, of another size, or with other metadata."""
        for f, want in sorted(recorded.items()):
            path = self.path(f)
            if not path.is_file():
                raise SourceChanged(
                    f"{path}: the plan was made from a checkpoint with this file; it is "
                    "not there: plan again"
                )
            size = os.path.getsize(path)
            if size != want["size"]:
                raise SourceChanged(
                    f"{path}: {size} bytes; the plan was made from {want['size']} bytes: "
                    "the source changed since, plan again"
                )
            if want["digest"] is not None and self._digest(path) != want["digest"]:
                raise SourceChanged(
                    f"{path}: its metadata differs from what the plan was made from "
                    f"(SHA-256 {want['digest'][:16]}...): the source changed since, plan again"
                )

    def close(self) -> None:
        self.opener.close()
