"""layoutc: a declarative checkpoint-layout compiler.

Describe how a training job lays out its tensors (mesh, sharding, ZeRO, pipeline stages,
storage format) in a ``.layout`` file; compile two layouts into a plan of explicit
read / gather / merge / split / swap / write ops; show it as a dry run; execute it.

Every module of the package imports this one first, so it imports only what it must: the
place stage, because the function ``layoutc.place`` shares its name with the subpackage (the
subpackage, once imported, would replace a name defined later); every other public name is
imported on first use (:pep:`562`), so a module pays only for the stages it uses
(docs/architecture.md). Importing layoutc never imports torch: parsing, checking, placing
and planning are pure Python arithmetic.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from layoutc.conversion import convert, execute
    from layoutc.errors import (
        Diagnostic,
        InputError,
        InternalError,
        LayoutcError,
        LayoutError,
        PlanError,
        Span,
        Unsupported,
        UsageError,
    )
    from layoutc.ir import Layout
    from layoutc.lang.check import load_layout, load_text
    from layoutc.plan.compile import compile_plan as compile
    from layoutc.plan.plan import Plan

from layoutc.place import place

__version__ = "0.1.0"

# public name -> (module, name in it)
_PUBLIC = {
    **{
        name: ("layoutc.errors", name)
        for name in (
            "Diagnostic",
            "InputError",
            "InternalError",
            "LayoutcError",
            "LayoutError",
            "PlanError",
            "Span",
            "Unsupported",
            "UsageError",
        )
    },
    "Layout": ("layoutc.ir", "Layout"),
    "load_layout": ("layoutc.lang.check", "load_layout"),
    "load_text": ("layoutc.lang.check", "load_text"),
    "compile": ("layoutc.plan.compile", "compile_plan"),
    "Plan": ("layoutc.plan.plan", "Plan"),
    "convert": ("layoutc.conversion", "convert"),
    "execute": ("layoutc.conversion", "execute"),
}


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'layoutc' has no attribute {name!r}")
    module, attr = _PUBLIC[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


__all__ = [
    "Diagnostic",
    "InputError",
    "InternalError",
    "Layout",
    "LayoutError",
    "LayoutcError",
    "Plan",
    "PlanError",
    "Span",
    "Unsupported",
    "UsageError",
    "__version__",
    "compile",
    "convert",
    "execute",
    "load_layout",
    "load_text",
    "place",
]
