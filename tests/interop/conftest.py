"""Interop tests: real DeepSpeed 0.19.8 as the oracle (CPU, torchrun, gloo).

DeepSpeed runs in its own interpreter, ``$LAYOUTC_DS_PYTHON`` (default: the one running
pytest), which needs the CPU torch pinned in constraints.txt, deepspeed and safetensors, and
transformers for the AutoTP cases::

    python3 -m venv /tmp/dsvenv
    /tmp/dsvenv/bin/pip install torch==2.13.0            # pinned: unpinned pulls CUDA wheels
    DS_BUILD_OPS=0 /tmp/dsvenv/bin/pip install --no-build-isolation deepspeed==0.19.8
    /tmp/dsvenv/bin/pip install numpy safetensors pytest
    /tmp/dsvenv/bin/pip install -c constraints.txt transformers
    /tmp/dsvenv/bin/pip install -c constraints.txt -e .     # layoutc itself, for tests using it

    /tmp/dsvenv/bin/python -m pytest tests/interop -m interop -q -p no:cacheprovider
    # or keep layoutc's own venv for pytest and point at DeepSpeed's:
    LAYOUTC_DS_PYTHON=/tmp/dsvenv/bin/python python -m pytest tests/interop -m interop

Every test in this folder is marked ``interop``. Without a DeepSpeed-capable interpreter the
``ds_corpus`` fixture fails with instructions (deselect with ``-m 'not interop'``). Checkpoints are built once and cached under
``$LAYOUTC_INTEROP_CACHE`` (default ``~/.cache/layoutc-interop``), keyed by a hash of
ds_make.py and the DeepSpeed/torch versions.

The PyTorch Distributed Checkpoint cases (``dcp_corpus``; dcp_make.py) need torch and
transformers in that interpreter, not DeepSpeed, and are cached beside the others under a key
of their own.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus

MARKER = "interop: compares against real DeepSpeed (slow; generates checkpoints once per session)"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.interop)


def cache_root() -> Path:
    return Path(
        os.environ.get("LAYOUTC_INTEROP_CACHE") or Path.home() / ".cache" / "layoutc-interop"
    ).expanduser()


class Corpus(Mapping[str, Path]):
    """{case: checkpoint root} for every case in ds_make.ALL_CASES, plus loading helpers.

    The data-parallel cases (ds_make.CASES) are built at once; the pipeline / tensor-parallel
    ones on first use, a kind at a time (corpus.family), so sessions that never touch them
    do not pay for them (nor need transformers, which only the AutoTP cases import).
    """

    def __init__(self, root: Path, python: str) -> None:
        self.root = root
        self.python = python
        self.paths = corpus.build(list(corpus.CASES), root, python=python)
        self.cases = corpus.CASES

    def __getitem__(self, case: str) -> Path:
        if case not in self.paths and case in corpus.ALL_CASES:
            self.paths.update(corpus.build(corpus.family(case), self.root, python=self.python))
        return self.paths[case]

    def __iter__(self) -> Iterator[str]:
        return iter(corpus.ALL_CASES)

    def __len__(self) -> int:
        return len(corpus.ALL_CASES)

    def truth(self, case: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(fp32 numpy tensors, json meta) DeepSpeed reported at save time."""
        return corpus.read_truth(self[case])

    def load(self, case: str, ckpt: Path | str, **kw: Any) -> corpus.Loaded:
        """corpus.load with this corpus's interpreter and cache (world=, universal=, ...)."""
        kw.setdefault("root", self.root)
        kw.setdefault("python", self.python)
        return corpus.load(case, ckpt, **kw)


@pytest.fixture(scope="session")
def ds_python() -> str:
    """The interpreter DeepSpeed runs in; fails the test with instructions if it cannot."""
    python = corpus.ds_python()
    if corpus.versions(python) is None:
        pytest.fail(
            f"DeepSpeed/torch/safetensors not importable by {python}: install them as the README's "
            f"test command does, set {corpus.PYTHON_ENV} to an interpreter that has them, or "
            "deselect these tests with -m 'not interop'",
            pytrace=False,
        )
    return python


@pytest.fixture(scope="session")
def ds_corpus(ds_python: str) -> Corpus:
    return Corpus(cache_root(), ds_python)


@pytest.fixture(scope="session")
def moe_corpus(ds_python: str) -> dict[str, Path]:
    """{case: checkpoint root} of the MoE cases (corpus.MOE_CASES) alone: they build in under
    a minute, without the ds_make.py cases."""
    return corpus.build(list(corpus.MOE_CASES), cache_root(), python=ds_python)


@pytest.fixture(scope="session")
def autoep_corpus(ds_python: str) -> dict[str, Path]:
    """{case: checkpoint root} of the AutoEP cases (corpus.AUTOEP_CASES) alone; they need
    transformers in DeepSpeed's interpreter."""
    return corpus.build(list(corpus.AUTOEP_CASES), cache_root(), python=ds_python)


@pytest.fixture(scope="session")
def dcp_python() -> str:
    """The interpreter FSDP2 runs in (the DeepSpeed one: it has torch and transformers);
    fails the test with instructions if it cannot."""
    python = corpus.ds_python()
    if corpus.dcp_versions(python) is None:
        pytest.fail(
            f"torch/transformers/safetensors not importable by {python}: install them as the "
            f"README's test command does, set {corpus.PYTHON_ENV} to an interpreter that has "
            "them, or deselect these tests with -m 'not interop'",
            pytrace=False,
        )
    return python


@pytest.fixture(scope="session")
def dcp_corpus(dcp_python: str) -> dict[str, Path]:
    """{case: case root} of the PyTorch DCP cases (corpus.DCP_CASES), built once and cached.

    A case root is NOT the checkpoint: the DCP checkpoint itself (``.metadata`` and the
    ``.distcp`` files; safetensors for the Hugging Face case) is ``root / corpus.DCP_DIR``,
    beside ``ground_truth.safetensors`` / ``.json`` (``corpus.read_truth(root)``). Copy it
    before damaging it: the cache is shared by every session."""
    return corpus.build_dcp(list(corpus.DCP_CASES), cache_root(), python=dcp_python)
