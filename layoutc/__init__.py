"""layoutc: a declarative checkpoint-layout compiler.

Describe how a training job lays out its tensors (mesh, sharding, ZeRO, pipeline stages,
storage format) in a ``.layout`` file; compile two layouts into a plan of explicit
read / gather / merge / split / swap / write ops; show it as a dry run; execute it.

Importing layoutc never imports torch: parsing, checking, placing and planning are pure
Python arithmetic.
"""

from __future__ import annotations

from typing import Any

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
from layoutc.place import place
from layoutc.plan.compile import compile_plan as compile
from layoutc.plan.plan import Plan


def convert(checkpoint: Any, output: Any, to: Any, **kwargs: Any) -> Any:
    """Convert a checkpoint; see :func:`layoutc.conversion.convert` (imported lazily)."""
    from layoutc.conversion import convert as _convert

    return _convert(checkpoint, output, to, **kwargs)


def execute(plan: Plan, source: Any, output: Any, **kwargs: Any) -> Any:
    """Run a compiled plan on files; see :func:`layoutc.conversion.execute`."""
    from layoutc.conversion import execute as _execute

    return _execute(plan, source, output, **kwargs)


__version__ = "0.1.0"

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
