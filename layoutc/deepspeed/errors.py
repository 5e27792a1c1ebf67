"""What the training integration raises (importable without torch or DeepSpeed)."""

from __future__ import annotations

from layoutc.errors import LayoutcError


class SaveFailed(LayoutcError):
    """A checkpoint tag was not saved; the previous one, and ``latest``, are intact."""
