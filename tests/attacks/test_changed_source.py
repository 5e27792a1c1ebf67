"""A saved plan run on a checkpoint other than the one it was made from: refused, naming
the file and what changed, with nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import craft
from bounded import assert_no_output, assert_refused, cli

MODEL = "global_step2/mp_rank_00_model_states.pt"


def _plan(example: Path, tmp_path: Path) -> Path:
    plan = tmp_path / "plan.json"
    run = cli("plan", example, "--to", "universal", "-o", plan)
    assert run.code == 0, run.err
    return plan


def test_a_file_of_another_size_is_refused(example: Path, tmp_path: Path) -> None:
    plan = _plan(example, tmp_path)
    with open(example / MODEL, "ab") as f:
        f.write(b"\0")
    out = tmp_path / "out"
    assert_refused(cli("execute", plan, example, "-o", out), MODEL, "bytes", "plan again")
    assert_no_output(out)


def test_a_file_with_other_metadata_of_the_same_size_is_refused(
    example: Path, tmp_path: Path
) -> None:
    def version(v: str):
        def edit(obj):
            obj["ds_version"] = v

        return edit

    craft.rewrite(example / MODEL, version("0.19.1"))  # the same writer both times
    plan = _plan(example, tmp_path)
    size = (example / MODEL).stat().st_size
    craft.rewrite(example / MODEL, version("0.19.2"))
    assert (example / MODEL).stat().st_size == size
    out = tmp_path / "out"
    assert_refused(cli("execute", plan, example, "-o", out), MODEL, "metadata differs")
    assert_no_output(out)


def test_a_missing_file_is_refused(example: Path, tmp_path: Path) -> None:
    plan = _plan(example, tmp_path)
    optim = next((example / "global_step2").glob("*optim_states.pt"))
    optim.unlink()
    out = tmp_path / "out"
    assert_refused(cli("execute", plan, example, "-o", out), optim.name, "not there")
    assert_no_output(out)


def test_another_checkpoint_is_refused(example: Path, tmp_path: Path) -> None:
    plan = _plan(example, tmp_path)
    other = tmp_path / "other"
    run = cli("convert", example, "--to", "deepspeed", "--set", "dp=3", "-o", other, "-q")
    assert run.code == 0, run.err
    out = tmp_path / "out"
    assert_refused(cli("execute", plan, other, "-o", out), "plan again")
    assert_no_output(out)


def test_a_damaged_plan_file_is_refused(example: Path, tmp_path: Path) -> None:
    plan = _plan(example, tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text(plan.read_text()[:-40])
    out = tmp_path / "out"
    assert_refused(cli("execute", broken, example, "-o", out), "broken.json", "not JSON")
    shutil.copy(plan, broken)
    broken.write_text(plan.read_text().replace('"layoutc_plan": 2', '"layoutc_plan": 1'))
    assert_refused(cli("execute", broken, example, "-o", out), "broken.json", "version")
    assert_no_output(out)
