"""What the training integration raises (importable without torch or DeepSpeed)."""

from __future__ import annotations

from layoutc.errors import InputError


class SaveFailed(InputError):
    """A checkpoint tag was not saved (a disk or a rank failed); the previous one, and
    ``latest``, are intact."""
