"""The attack tests' fixtures; their tools are in ``bounded.py`` (a module name of its own:
``conftest`` names several modules in one run)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from bounded import EXAMPLE


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """A private copy of the shipped real DeepSpeed ZeRO-2 checkpoint, to damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(EXAMPLE, dst)
    return dst
