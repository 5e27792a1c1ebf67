"""One taxonomy of failures, by what the caller should do.

Every exception layoutc raises on purpose is of exactly one kind (``layoutc.errors.KINDS``):
the input is wrong, valid but unsupported, the request does not apply, or a bug.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import layoutc
from layoutc.errors import (
    KINDS,
    LayoutcError,
    kind,
)
from layoutc.formats.safetensors import UnsupportedDtype

# Classes that narrow their module's error to another kind, listed first among their bases:
# a safetensors dtype layoutc does not read is Unsupported, and still a SafetensorsError.
NARROWED = {UnsupportedDtype}


def _modules() -> list[ModuleType]:
    """Every module of the package that imports here (those needing torch may not), but
    ``layoutc.__main__``, which runs the command line."""
    found = [layoutc]
    for info in pkgutil.walk_packages(layoutc.__path__, "layoutc."):
        if info.name == "layoutc.__main__":
            continue
        try:
            found.append(importlib.import_module(info.name))
        except ImportError:
            continue
    return found


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_subclasses(sub)}
    return out


# ------------------------------------------------------------------ the classes


def test_every_error_class_of_the_package_is_of_exactly_one_kind() -> None:
    _modules()
    classes = {c for c in _subclasses(LayoutcError) if c.__module__.startswith("layoutc.")}
    assert {"UnsafePickle", "OutputError", "SwapError", "RankFailed"} <= {
        c.__name__ for c in classes
    }
    for cls in classes - set(KINDS):
        kinds = [k for k in KINDS if issubclass(cls, k)]
        assert len(kinds) == 1 or cls in NARROWED, f"{cls.__qualname__}: kinds {kinds}"


def test_a_narrowed_class_is_of_the_kind_it_lists_first() -> None:
    for cls in NARROWED:
        e = cls("x")
        assert kind(e) is cls.__bases__[0] in KINDS


def test_every_public_exception_of_the_package_is_a_layoutc_error() -> None:
    for module in _modules():
        for name, obj in vars(module).items():
            if (
                isinstance(obj, type)
                and issubclass(obj, BaseException)
                and obj.__module__ == module.__name__
                and not name.startswith("_")
            ):
                assert issubclass(obj, LayoutcError), f"{module.__name__}.{name}"
