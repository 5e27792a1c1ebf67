"""A saved plan is an executable artefact: ``layoutc plan CKPT -o p.json`` then ``layoutc
execute p.json CKPT -o OUT`` writes what ``layoutc convert`` writes, byte for byte, and
the plan read back summarises as the plan it was saved from."""

from __future__ import annotations

from pathlib import Path

import pytest

import layoutc
from layoutc.cli import main
from layoutc.conversion import execute_saved
from layoutc.formats.deepspeed import infer, open_checkpoint
from layoutc.formats.sources import open_source
from layoutc.plan.request import plan_checkpoint

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "deepspeed-zero2"


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize(
    "target",
    [
        ["--to", "deepspeed", "--set", "dp=3"],
        ["--to", "universal"],
        ["--to", "safetensors", "--dtype", "bf16", "--max-shard-size", "1KB"],
        ["--to", "torch", "--memory", "1MiB", "--workers", "3"],
    ],
    ids=["deepspeed", "universal", "safetensors", "torch"],
)
def test_a_saved_plan_writes_what_convert_writes(tmp_path, capsys, target):
    plan = tmp_path / "plan.json"
    assert main(["plan", str(EXAMPLE), *target, "-o", str(plan)]) == 0
    assert main(["execute", str(plan), str(EXAMPLE), "-o", str(tmp_path / "run"), "-q"]) == 0
    assert main(["convert", str(EXAMPLE), *target, "-o", str(tmp_path / "convert"), "-q"]) == 0
    ran, converted = _files(tmp_path / "run"), _files(tmp_path / "convert")
    assert ran == converted  # the manifest too: the same plan digest, files and CRCs
    assert len(ran) >= 2  # the manifest and what it lists


def test_a_plan_of_full_weights_runs_on_them(tmp_path, capsys):
    weights = tmp_path / "w"
    layoutc.convert(EXAMPLE, weights, "safetensors")
    spec = tmp_path / "model.layout"
    spec.write_text(infer(open_checkpoint(EXAMPLE)))
    target = ["--to", "deepspeed", "--spec", str(spec), "--set", "dp=3"]
    plan = tmp_path / "plan.json"
    assert main(["plan", str(weights), *target, "-o", str(plan)]) == 0
    groups = tmp_path / "groups.json"
    group = '{"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}'
    groups.write_text(f"[{group}, {group}]")  # the example's two param groups
    more = ["--param-groups", str(groups), "-q"]
    assert main(["execute", str(plan), str(weights), "-o", str(tmp_path / "run"), *more]) == 0
    assert main(["convert", str(weights), *target, "-o", str(tmp_path / "conv"), *more]) == 0
    assert _files(tmp_path / "run") == _files(tmp_path / "conv")


@pytest.mark.parametrize("to", ["deepspeed", "universal", "safetensors"])
def test_a_plan_read_back_summarises_as_the_plan_saved(to):
    source = open_source(EXAMPLE)
    try:
        plan = plan_checkpoint(source, to, overrides={"dp": 3} if to == "deepspeed" else None)
    finally:
        source.close()
    back = layoutc.Plan.from_json(plan.to_json())
    assert back.summary() == plan.summary()
    assert back.summary()["io"]["target_rank_sets"] == plan.summary()["io"]["target_rank_sets"]
    assert back.to_json() == plan.to_json()


def test_a_plan_of_a_layout_file_cannot_run_on_a_checkpoint_by_itself(tmp_path, capsys):
    spec = tmp_path / "model.layout"
    spec.write_text(infer(open_checkpoint(EXAMPLE)))
    plan = tmp_path / "plan.json"
    assert main(["plan", str(spec), "--to", "universal", "-o", str(plan)]) == 0
    code = main(["execute", str(plan), str(EXAMPLE), "-o", str(tmp_path / "out")])
    assert code == 2
    assert "does not record its source checkpoint" in capsys.readouterr().err


def test_the_plan_runs_on_the_tag_it_was_made_from_not_on_what_latest_names_now(tmp_path):
    import shutil

    root = tmp_path / "ckpt"
    shutil.copytree(EXAMPLE, root)
    source = open_source(root)
    try:
        plan = layoutc.Plan.from_json(plan_checkpoint(source, "universal").to_json())
    finally:
        source.close()
    (root / "latest").write_text("global_step9")  # a later save that is not there yet
    report = execute_saved(plan, root, tmp_path / "out")
    assert (tmp_path / "out" / "latest_universal").read_text() == "global_step2"
    assert report.files
