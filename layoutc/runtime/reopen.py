"""Files a writer creates: new and empty, or — when an interrupted conversion is gone on
from — the same files again over what they hold (:func:`reopening`). Standard library
only, so that the ``.pt`` writer below the runtime can use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import BinaryIO

_REOPEN: ContextVar[bool] = ContextVar("layoutc_reopen", default=False)


@contextmanager
def reopening() -> Iterator[None]:
    """Within this block :func:`new_file` keeps what a file already holds: the files of an
    interrupted conversion are created again over themselves, their headers rewritten
    (the same bytes) and the tensors' bytes, skipped over as holes, kept."""
    token = _REOPEN.set(True)
    try:
        yield
    finally:
        _REOPEN.reset(token)


def new_file(path: str | os.PathLike[str]) -> BinaryIO:
    """``path`` opened to be written from its start: created empty, or within
    :func:`reopening` opened as it is when it exists."""
    if _REOPEN.get() and os.path.isfile(path) and not os.path.islink(path):
        return open(path, "r+b")
    return open(path, "wb")
