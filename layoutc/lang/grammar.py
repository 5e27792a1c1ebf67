"""Find the grammar file and build the (cached) LALR parser.

The grammar lives at the top of the repository as ``grammar/layout.lark``; wheels carry it
inside the package as ``layoutc/grammar/layout.lark``. Both places are searched, so an
editable install and an installed wheel read the same file.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import lark

_PACKAGE = Path(__file__).resolve().parent.parent


def grammar_path() -> Path:
    for candidate in (
        _PACKAGE / "grammar" / "layout.lark",  # installed wheel
        _PACKAGE.parent / "grammar" / "layout.lark",  # source tree / editable install
    ):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"layout.lark not found next to {_PACKAGE}")


@cache
def parser() -> lark.Lark:
    return lark.Lark(
        grammar_path().read_text(encoding="utf-8"),
        parser="lalr",
        propagate_positions=True,
        maybe_placeholders=True,
        start=["start", "expr"],
        cache=True,  # the LALR tables, keyed by grammar and lark version, in the temp dir
    )
