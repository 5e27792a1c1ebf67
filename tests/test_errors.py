"""One taxonomy of failures, by what the caller should do, and one exit code for each.

Every exception layoutc raises on purpose is of exactly one kind (``layoutc.errors.KINDS``):
the input is wrong (exit 1), valid but unsupported (exit 1, ``unsupported:``), the request
does not apply (exit 2), or a bug (exit 3, with a line asking to report it). An exception
layoutc does not raise on purpose is a bug too, never a usage error. The exit codes are
checked through ``layoutc.cli.main`` on inputs that really cause each failure.
"""

from __future__ import annotations

import errno
import importlib
import pkgutil
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

import layoutc
from layoutc import cli
from layoutc.errors import (
    KINDS,
    InputError,
    InternalError,
    LayoutcError,
    PlanError,
    Unsupported,
    UsageError,
    kind,
)
from layoutc.formats.safetensors import UnsupportedDtype
from layoutc.lang.check import load_text
from layoutc.plan.compile import compile_plan
from layoutc.plan.plan import Plan

ROOT = Path(__file__).resolve().parent.parent
GPT2 = ROOT / "specs" / "gpt2-small.layout"

# Classes that narrow their module's error to another kind, listed first among their bases:
# a safetensors dtype layoutc does not read is Unsupported, and still a SafetensorsError.
NARROWED = {UnsupportedDtype}


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


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


def test_each_kind_has_one_exit_code_and_a_bug_is_never_a_usage_error() -> None:
    codes = {k: cli.FAILURES[k][0] for k in KINDS}
    assert codes == {InputError: 1, Unsupported: 1, UsageError: 2, InternalError: 3}


def test_a_plan_read_back_that_fails_is_an_input_error_and_a_compiled_one_a_bug() -> None:
    plan = compile_plan(load_text(GPT2.read_text(), str(GPT2)), "universal")
    with pytest.raises(InternalError, match=r"the compiled plan is invalid: .* over the budget"):
        replace(plan, budget=1 << 20).validate()
    doc = Plan.from_json(plan.to_json())
    with pytest.raises(PlanError, match="over the budget"):
        replace(doc, budget=1 << 20).validate()


# ------------------------------------------------------------------ the command line


def test_a_folder_without_a_checkpoint_is_an_input_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, err = run(capsys, "inspect", tmp_path)
    assert code == 1
    assert err == f"layoutc inspect: {tmp_path}: is empty\n"  # no usage: the input is wrong


def test_an_output_folder_that_is_not_empty_is_an_input_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    code, err = run(
        capsys,
        "convert",
        ROOT / "examples" / "deepspeed-zero2",
        "-o",
        tmp_path / "out",
        "--to",
        "universal",
        "-q",
    )
    assert code == 1, err
    assert err.startswith(f"layoutc convert: {tmp_path / 'out'}")
    assert (tmp_path / "out" / "keep").read_text() == "x"


def test_a_configuration_layoutc_does_not_place_is_unsupported(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    spec = tmp_path / "fp16.layout"
    spec.write_text(
        "mesh { dp = 2 }\ndtype fp16\noptimizer adam { master fp32 }\nzero 0 over dp\n"
        "tensor w [4]\n"
    )
    code, err = run(capsys, "plan", spec, "--to", "universal")
    assert code == 1
    assert err.startswith("layoutc plan: unsupported: ")


def test_a_request_that_does_not_apply_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, err = run(capsys, "plan", GPT2, "--to", "universal", "--ops")
    assert code == 2
    assert err.startswith("layoutc plan: --ops ")


def test_a_compiled_plan_failing_validation_is_reported_as_a_bug(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import layoutc.plan.plan as plan_module

    def broken(plan: Plan, source: object = None, target: object = None) -> None:
        raise PlanError("unit 0 op 1 (write) writes [0:4] twice")

    monkeypatch.setattr(plan_module, "validate", broken)
    code, err = run(capsys, "plan", GPT2, "--to", "universal", "--validate")
    assert code == 3
    assert err.startswith(
        "layoutc plan: internal error: the compiled plan is invalid: unit 0 op 1 (write)"
    )
    assert cli.REPORT in err


@pytest.mark.parametrize("stray", [ValueError("bad value"), KeyError("k"), AssertionError("no")])
def test_an_exception_raised_by_accident_is_a_bug_not_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, stray: Exception
) -> None:
    def command(args: object) -> int:
        raise stray

    monkeypatch.setattr(cli, "cmd_check", command)
    code, err = run(capsys, "check", GPT2)
    assert code == 3
    assert "Traceback" in err
    assert f"layoutc check: internal error: {type(stray).__name__}: " in err
    assert cli.REPORT in err


def test_a_file_failing_under_a_command_is_an_input_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def command(args: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", "/data/ckpt")

    monkeypatch.setattr(cli, "cmd_check", command)
    code, err = run(capsys, "check", GPT2)
    assert (code, err) == (1, "layoutc check: /data/ckpt: Permission denied\n")
