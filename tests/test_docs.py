"""The documentation shows what the code does: every diagnostic example in
docs/language.md is re-run and its printed output compared.

Set LAYOUTC_UPDATE_DOCS=1 to rewrite the outputs in place after an intended change."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from layoutc.errors import LayoutError
from layoutc.lang.check import load_text

DOC = Path(__file__).resolve().parent.parent / "docs" / "language.md"
PAIR = re.compile(
    r"```layout\n(?P<src>(?:(?!```).)*?)```\n\n```text\n(?P<out>(?:(?!```).)*?)```", re.S
)


def _run(src: str) -> str:
    """Check an example; a first line ``# layoutc ... --set NAME=VALUE`` sets overrides."""
    first = src.splitlines()[0] if src else ""
    overrides = {name: int(value) for name, value in re.findall(r"--set (\w+)=(-?\d+)", first)}
    try:
        load_text(src, "example.layout", overrides)
    except LayoutError as e:
        return e.render() + "\n"
    return "ok\n"


def _examples() -> list[re.Match[str]]:
    text = DOC.read_text()
    start = text.index("## Diagnostics")
    return [m for m in PAIR.finditer(text) if m.start() > start]


def test_every_diagnostic_code_in_the_code_is_documented():
    code = "".join(p.read_text() for p in Path("layoutc/lang").glob("*.py"))
    codes = set(re.findall(r'"(E[01]\d\d)"', code))
    documented = set(re.findall(r"^### (E\d{3})", DOC.read_text(), re.M))
    assert codes <= documented, sorted(codes - documented)


def test_every_conversion_diagnostic_code_is_documented():
    """The checks against stored data and the planner's codes (E2xx, E3xx) are listed in
    the how-tos."""
    code = "".join(p.read_text() for p in Path("layoutc").rglob("*.py"))
    codes = set(re.findall(r'"(E[23]\d\d)"', code))
    docs = "".join(p.read_text() for p in Path("docs").glob("*.md"))
    documented = set(re.findall(r"^\| (E[23]\d\d) \|", docs, re.M))
    assert codes and codes <= documented, sorted(codes - documented)


def test_diagnostic_examples_print_what_the_docs_show():
    if os.environ.get("LAYOUTC_UPDATE_DOCS"):
        text = DOC.read_text()
        text = PAIR.sub(
            lambda m: (
                m.group(0)
                if m.start() < text.index("## Diagnostics")
                else f"```layout\n{m['src']}```\n\n```text\n{_run(m['src'])}```"
            ),
            text,
        )
        DOC.write_text(text)
        pytest.skip("docs rewritten")
    wrong = [(m["src"], m["out"], got) for m in _examples() if (got := _run(m["src"])) != m["out"]]
    assert not wrong, "\n\n".join(
        f"{src}--- docs say:\n{out}--- layoutc says:\n{got}" for src, out, got in wrong[:3]
    )
