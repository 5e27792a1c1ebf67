"""Every example in the docs runs, and prints what the docs show.

An example is a ```sh or ```python block in README.md or docs/*.md (docs/language.md's
diagnostics are test_docs.py's). A block that is not meant to run (install steps, a
``torchrun`` line, a fragment) is fenced without a language. The rules:

- a ```sh block runs line by line, each line in bash with ``layoutc`` meaning
  ``python -m layoutc`` of this tree; a trailing ``# exit N`` says the line exits with N,
  and every other line must exit 0. A ```python block runs as one script and must exit 0.
- Both run in a fresh folder where ``specs/`` and ``examples/`` are the repository's, so
  relative output paths (``out/...``, ``plan.json``) land there; ``/tmp/`` in an example
  is that folder too, and is shown as ``/tmp/`` in what it prints.
- When the block is followed by a ```text block, that is what it prints: stdout and stderr
  as one stream, in the order printed (as a terminal shows them; Python runs unbuffered,
  and argparse wraps usage at 80 columns). Two wildcards, and nothing else: a line of
  only ``...`` stands for any run of lines (output trimmed, or varying from machine to
  machine), and ``…`` inside a line for any run of characters (a duration, a rate, a
  memory size). A block with no ```text block after it only has to succeed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [
    ROOT / "README.md",
    *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "language.md"),
]
BLOCK = re.compile(
    r"^```(?P<lang>sh|python)\n(?P<code>.*?)^```\n(?:\n```text\n(?P<out>.*?)^```\n)?", re.S | re.M
)
EXIT = re.compile(r"\s+#\s*exit\s+(\d+)\s*$")


def _examples() -> list:
    cases = []
    for doc in DOCS:
        text = doc.read_text()
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            name = f"{doc.relative_to(ROOT)}:{line}"
            cases.append(pytest.param(m["lang"], m["code"], m["out"], id=name))
    return cases


def _run(lang: str, code: str, folder: Path) -> str:
    """Run an example in ``folder``; what it prints, stdout and stderr as one stream."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80", "PYTHONUNBUFFERED": "1"}
    code = code.replace("/tmp/", f"{folder}/")
    if lang == "python":
        steps = [([sys.executable, "-c", code], 0, code)]
    else:
        steps = []
        for line in code.splitlines():
            if not line.strip():
                continue
            m = EXIT.search(line)
            command = line[: m.start()] if m else line
            script = f'layoutc() {{ "{sys.executable}" -m layoutc "$@"; }}\n{command}'
            steps.append((["bash", "-c", script], int(m[1]) if m else 0, line))
    printed = ""
    for argv, want, shown in steps:
        p = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=folder,
            env=env,
            timeout=120,
        )
        assert p.returncode == want, f"{shown}\nexit {p.returncode}, not {want}\n{p.stdout}"
        printed += p.stdout
    return printed.replace(f"{folder}/", "/tmp/")


def _shows(printed: str, expected: str) -> bool:
    """Whether ``printed`` is ``expected``, a ``...`` line matching any run of lines and
    ``…`` any run of characters within a line."""
    pattern = "".join(
        r"(?:.*\n)*?" if line == "..." else ".*".join(map(re.escape, line.split("…"))) + r"\n"
        for line in expected.splitlines()
    )
    return re.fullmatch(pattern, printed) is not None


@pytest.mark.parametrize(("lang", "code", "expected"), _examples())
def test_the_example_prints_what_the_docs_show(lang, code, expected, tmp_path):
    for name in ("specs", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    printed = _run(lang, code, tmp_path)
    if expected is not None:
        assert _shows(printed, expected), f"--- docs show:\n{expected}--- it prints:\n{printed}"


def test_no_runnable_block_hides_under_another_fence():
    """A block fenced ```bash, ```console, ```shell or ```py would escape the test above."""
    hidden = [
        f"{doc.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
        for doc in DOCS
        for text in [doc.read_text()]
        for m in re.finditer(
            r"^```(?:bash|console|shell|shell-session|py|python3|pycon)\b", text, re.M
        )
    ]
    assert not hidden, hidden
