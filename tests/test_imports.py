"""What each command imports: the dry run pays for no executor, a conversion for no torch.

Every layoutc command starts a fresh interpreter, so its imports are part of its wall time
(numpy and ml_dtypes cost more than compiling a 65,536-rank plan). These tests run the
commands in a subprocess and read the modules they imported: ``layoutc plan`` imports
neither numpy, ml_dtypes nor torch, whether its source is a layout file or a checkpoint;
a conversion imports nothing outside a declared set of third-party modules.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = "examples/deepspeed-zero2"

EXECUTOR_ONLY = {"numpy", "ml_dtypes", "torch"}  # what planning must not import
# The top-level modules outside the standard library that a conversion may import: the
# dependencies in pyproject.toml (numpy, ml_dtypes, lark, jinja2) and what those import
# themselves (jinja2 needs markupsafe; lark uses regex when it is installed). No torch:
# it is imported by the distributed executor and the tensor-facing API only.
CONVERT_NEEDS = {"numpy", "ml_dtypes", "lark", "jinja2", "markupsafe", "regex"}


def _importtime(*argv: str) -> set[str]:
    """The top-level names of every module ``python -X importtime -m layoutc ARGV``
    imported (from its report on stderr); the command must succeed."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "layoutc", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    report = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert result.returncode == 0, "\n".join(
        line for line in result.stderr.splitlines() if not line.startswith("import time:")
    )
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in report[1:]}


def _imports(code: str) -> set[str]:
    """The modules outside the standard library that running ``code`` in a fresh
    interpreter imports (those imported at its start excluded)."""
    probe = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        f"{code}\n"
        "new = {m for m in set(sys.modules) - before if m.split('.')[0] not in sys.stdlib_module_names}\n"
        "print(json.dumps(sorted(new)))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


def _third_party_imports(code: str) -> set[str]:
    """The top-level names of the modules outside the standard library and layoutc that
    running ``code`` in a fresh interpreter imports."""
    return {m.split(".")[0] for m in _imports(code)} - {"layoutc"}


def _convert_example(out: Path) -> str:
    return (
        "from layoutc.cli import main\n"
        f"assert main(['convert', {EXAMPLE!r}, '--to', 'universal', '-o', {str(out)!r}, '-q']) == 0"
    )


def test_planning_a_layout_file_imports_neither_numpy_ml_dtypes_nor_torch() -> None:
    imported = _importtime("plan", "specs/llama2-70b.layout", "--to", "safetensors")
    assert "layoutc" in imported and "lark" in imported  # the report was read
    assert not imported & EXECUTOR_ONLY


def test_planning_from_a_checkpoint_folder_imports_neither_numpy_ml_dtypes_nor_torch() -> None:
    imported = _importtime("plan", EXAMPLE, "--to", "deepspeed", "--set", "dp=1")
    assert not imported & EXECUTOR_ONLY


def test_importing_the_conversion_path_imports_only_its_declared_dependencies() -> None:
    imported = _third_party_imports("import layoutc.cli, layoutc.conversion")
    assert imported <= CONVERT_NEEDS, imported - CONVERT_NEEDS
    assert "torch" not in imported


def test_a_conversion_imports_only_its_declared_dependencies(tmp_path: Path) -> None:
    out = tmp_path / "u"
    imported = _third_party_imports(_convert_example(out))
    assert (out / "latest_universal").is_file()
    assert imported <= CONVERT_NEEDS, imported - CONVERT_NEEDS
    assert {"numpy", "ml_dtypes"} <= imported  # the bf16 example needs both


def test_the_benchmarks_import_row_imports_what_a_conversion_imports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmarks/convert_vs_deepspeed.py times its "imports" row with IMPORT_PROBE as
    the start-up cost of every conversion; it must import what a real one does."""
    spec = importlib.util.spec_from_file_location(
        "convert_vs_deepspeed", ROOT / "benchmarks" / "convert_vs_deepspeed.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look it up
    spec.loader.exec_module(bench)  # the script imports only the standard library

    def modules(code: str) -> set[str]:  # layoutc's modules, and other packages by name
        mods = _imports(code)
        return {m for m in mods if m.startswith("layoutc.")} | {m.split(".")[0] for m in mods}

    assert modules(bench.IMPORT_PROBE) == modules(_convert_example(tmp_path / "u"))


def test_importing_the_training_integration_imports_neither_torch_nor_deepspeed() -> None:
    """``layoutc.deepspeed`` is imported by training scripts at the top; torch and
    DeepSpeed are loaded when ``attach`` or ``load_checkpoint`` is called."""
    imported = _third_party_imports("import layoutc.deepspeed")
    assert not imported & {"torch", "deepspeed", "numpy"}


def test_layoutc_deepspeed_without_deepspeed_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['deepspeed'] = None\n"
        "import layoutc.deepspeed as d\n"
        "try:\n"
        "    d.attach(object())\n"
        "except ModuleNotFoundError as e:\n"
        "    print(e.name, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("deepspeed layoutc.deepspeed runs inside a DeepSpeed job")
    assert "pip install 'layoutc[deepspeed]'" in out.stdout
