"""The ``layoutc`` command line: exit codes, what goes to stdout and stderr, files written.

Exit codes are the contract scripts rely on: 0 success, 1 the input is wrong (diagnostics on
stderr), 2 a usage error (bad flags, missing files, no subcommand). Commands run in-process
through ``layoutc.cli.main``; one test runs ``python -m layoutc`` for real.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from layoutc import cli
from layoutc.cli import default_workers, main
from layoutc.lang.fmt import fmt
from layoutc.lang.parse import parse

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.layout"))
GPT2 = ROOT / "specs" / "gpt2-small.layout"
LLAMA = ROOT / "specs" / "llama2-7b.layout"
LLAMA_TP4 = ROOT / "specs" / "llama2-7b-tp4.layout"
MiB = 2**20


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    """llama2-7b with tp = 3: F = 11008 and the fused gate/up no longer divide."""
    text = LLAMA.read_text(encoding="utf-8")
    assert "tp = 2" in text
    path = tmp_path / "broken.layout"
    path.write_text(text.replace("tp = 2", "tp = 3"), encoding="utf-8")
    return path


# ---------------------------------------------------------------- check


def test_check_accepts_every_spec_and_says_ok_for_each(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "check", *SPECS)
    assert code == 0, err
    assert err == ""
    for spec in SPECS:
        assert re.search(rf"^{re.escape(str(spec))}: ok — layout \S+, mesh \{{", out, re.M), out


def test_check_reports_ranks_tensors_and_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check", ROOT / "specs" / "llama2-70b.layout")
    assert code == 0
    assert "(65,536 ranks)" in out
    assert "483 tensors" in out
    assert "trainable parameters" in out


def test_check_of_a_broken_spec_exits_1_with_located_diagnostics(
    capsys: pytest.CaptureFixture[str], broken: Path
) -> None:
    code, out, err = run(capsys, "check", broken)
    assert code == 1
    assert out == ""
    lines = broken.read_text(encoding="utf-8").splitlines()
    first = re.search(rf"^{re.escape(str(broken))}:(\d+):(\d+): error\[E102\]: (.*)$", err, re.M)
    assert first, err
    line, col = int(first[1]), int(first[2])
    assert "tp = 3" in first[3]
    assert "/ tp" in lines[line - 1][col - 1 :]  # the caret is on a split dim
    assert re.search(rf"^{re.escape(str(broken))}: \d+ errors?$", err, re.M)


def test_check_goes_on_to_the_next_file_after_a_broken_one(
    capsys: pytest.CaptureFixture[str], broken: Path
) -> None:
    code, out, err = run(capsys, "check", broken, GPT2)
    assert code == 1
    assert f"{GPT2}: ok" in out
    assert "error[E102]" in err


def test_check_of_a_missing_file_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, "check", tmp_path / "nope.layout")
    assert code == 2
    assert "nope.layout: no such file" in err


def test_an_unknown_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "check", "--bogus", GPT2)
    assert code == 2
    assert "unrecognized arguments: --bogus" in err


def test_no_subcommand_prints_help_and_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys)
    assert code == 2
    assert "check" in err and "fmt" in err and "plan" in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "usage: layoutc" in out


def test_python_dash_m_layoutc_checks_a_spec() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "layoutc", "check", "specs/gpt2-small.layout"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("specs/gpt2-small.layout: ok — layout gpt2_small")


# ---------------------------------------------------------------- fmt


def test_fmt_check_accepts_every_spec(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "fmt", "--check", *SPECS)
    assert (code, out, err) == (0, "", "")


def test_fmt_check_rejects_a_badly_spaced_file_with_a_diff(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "ugly.layout"
    path.write_text("mesh{dp=2}\ntensor   w [ 4/dp ]\n", encoding="utf-8")
    code, out, err = run(capsys, "fmt", "--check", path)
    assert code == 1
    assert out == ""
    assert "-tensor   w [ 4/dp ]" in err
    assert "+tensor w [4 / dp]" in err
    assert f"{path}: not formatted" in err
    assert path.read_text(encoding="utf-8") == "mesh{dp=2}\ntensor   w [ 4/dp ]\n"


def test_fmt_write_rewrites_the_file_in_canonical_form(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "ugly.layout"
    path.write_text("mesh{dp=2}  # the mesh\ntensor   w [ 4/dp ]\n", encoding="utf-8")
    code, out, _ = run(capsys, "fmt", "-w", path)
    assert code == 0
    assert f"{path}: formatted" in out
    assert path.read_text(encoding="utf-8") == "mesh { dp = 2 }  # the mesh\ntensor w [4 / dp]\n"
    assert run(capsys, "fmt", "--check", path)[0] == 0
    # a formatted file is left alone and nothing is said
    assert run(capsys, "fmt", "-w", path) == (0, "", "")


def test_fmt_without_flags_prints_the_canonical_text(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "ugly.layout"
    path.write_text("mesh{dp=2}\n", encoding="utf-8")
    code, out, _ = run(capsys, "fmt", path)
    assert (code, out) == (0, "mesh { dp = 2 }\n")
    assert out == fmt(parse("mesh{dp=2}\n"))


def test_fmt_of_a_file_with_a_syntax_error_exits_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "bad.layout"
    path.write_text("mesh { dp: 2 }\n", encoding="utf-8")
    code, out, err = run(capsys, "fmt", "--check", path)
    assert code == 1
    assert out == ""
    assert f"{path}:1:10: error[E003]" in err


def test_fmt_check_and_write_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "fmt", "--check", "-w", GPT2)[0] == 2


# ---------------------------------------------------------------- plan

SUMMARY_LINES = ["units", "ops", "read", "written", "peak memory"]


@pytest.mark.parametrize("target", ["universal", "safetensors", "torch", "llama2-7b-tp4.layout"])
def test_plan_prints_a_summary_for_every_kind_of_target(
    capsys: pytest.CaptureFixture[str], target: str
) -> None:
    to = str(ROOT / "specs" / target) if target.endswith(".layout") else target
    code, out, err = run(capsys, "plan", LLAMA, "--to", to)
    assert code == 0, err
    for label in SUMMARY_LINES:
        assert re.search(rf"^  {label} +\S", out, re.M), f"no `{label}` line in\n{out}"
    assert re.search(r"^per worker$", out, re.M)
    assert re.search(r"^largest tensors", out, re.M)
    assert re.search(r"ops +[\d,]+ +\(read [\d,]+, gather", out)


def test_plan_json_summary_parses_and_has_the_totals(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plan", LLAMA, "--to", LLAMA_TP4, "--json")
    assert code == 0
    summary = json.loads(out)["summary"]
    for key in (
        "ops_by_kind",
        "bytes_read",
        "bytes_written",
        "peak_memory_bytes",
        "files_read",
        "files_written",
        "workers",
    ):
        assert key in summary, key
    assert set(summary["ops_by_kind"]) >= {"read", "write"}
    assert summary["bytes_read"] > 0 and summary["bytes_written"] > 0
    assert summary["workers"] == default_workers()
    assert "plan" not in json.loads(out)


def test_plan_json_with_ops_includes_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plan", GPT2, "--to", "torch", "--json", "--ops")
    assert code == 0
    assert "plan" in json.loads(out)


def test_plan_with_a_memory_budget_keeps_peak_memory_under_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, "plan", LLAMA, "--to", LLAMA_TP4, "--json")
    unbounded = json.loads(out)["summary"]["peak_memory_bytes"]
    assert unbounded > 256 * MiB  # otherwise the budget below proves nothing
    code, out, _ = run(capsys, "plan", LLAMA, "--to", LLAMA_TP4, "--json", "--memory", "256MiB")
    assert code == 0
    summary = json.loads(out)["summary"]
    assert summary["peak_memory_bytes"] <= 256 * MiB
    assert summary["memory_budget_bytes"] == 256 * MiB


@pytest.mark.parametrize("workers", ["1", "3"])
def test_plan_balances_over_the_requested_workers(
    capsys: pytest.CaptureFixture[str], workers: str
) -> None:
    code, out, _ = run(capsys, "plan", GPT2, "--to", "universal", "--json", "--workers", workers)
    assert code == 0
    assert json.loads(out)["summary"]["workers"] == int(workers)


@pytest.mark.parametrize(
    "flags",
    [["--memory", "abc"], ["--memory", "12XB"], ["--workers", "0"], ["--workers", "two"]],
)
def test_plan_with_a_bad_flag_value_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], flags: list[str]
) -> None:
    code, out, err = run(capsys, "plan", GPT2, "--to", "universal", *flags)
    assert code == 2
    assert out == ""
    assert flags[0] in err


def test_plan_without_a_target_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "plan", GPT2)[0] == 2


def test_plan_to_an_unknown_target_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "plan", GPT2, "--to", "safetensor")
    assert code == 2
    assert "safetensor" in err


def test_plan_to_a_misspelt_format_suggests_the_format(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "plan", GPT2, "--to", "safetensor")
    assert code == 2
    assert "safetensors" in err


def test_plan_of_a_broken_layout_exits_1_with_diagnostics(
    capsys: pytest.CaptureFixture[str], broken: Path
) -> None:
    code, out, err = run(capsys, "plan", broken, "--to", "universal")
    assert code == 1
    assert out == ""
    assert "error[E102]" in err


def test_plan_writes_the_full_plan_and_an_html_report(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plan_json, html = tmp_path / "plan.json", tmp_path / "plan.html"
    code, out, err = run(
        capsys, "plan", GPT2, "--to", "safetensors", "-o", plan_json, "--html", html
    )
    assert code == 0
    assert "peak memory" in out  # the summary is still printed
    assert f"wrote the plan to {plan_json}" in err
    assert f"wrote {html}" in err
    assert json.loads(plan_json.read_text(encoding="utf-8"))
    assert "<html" in html.read_text(encoding="utf-8").lower()


def test_plan_markdown_is_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plan", GPT2, "--to", "torch", "--markdown")
    assert code == 0
    assert out.startswith("# Plan: ")
    assert "| units |" in out


# ---------------------------------------------------------------- --set


EXAMPLE = ROOT / "examples" / "deepspeed-zero2"


def test_set_changes_a_mesh_axis_of_the_target(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plan", EXAMPLE, "--to", "deepspeed", "--set", "dp=3")
    assert code == 0
    assert "(deepspeed, 2 ranks) -> global_step2 (deepspeed, 3 ranks)" in out
    code, out, _ = run(capsys, "plan", LLAMA, "--to", LLAMA_TP4, "--set", "dp=4", "--json")
    assert code == 0 and json.loads(out)["summary"]["target"]["world"] == 16


def test_set_of_a_name_the_target_lacks_is_a_diagnostic(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "plan", GPT2, "--to", "universal", "--set", "pd=3")
    assert code == 1
    assert err.startswith("--set pd=3: error[E134]:") and "did you mean `dp`?" in err


def test_a_set_axis_of_zero_is_one_diagnostic_not_a_cascade(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run(capsys, "plan", GPT2, "--to", "deepspeed", "--set", "dp=0")
    assert code == 1 and "error[E109]: mesh axis `dp` is set to 0 by `--set dp=0`" in err
    assert "E106" not in err


def test_a_cascade_of_diagnostics_is_capped(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "plan", GPT2, "--to", ROOT / "specs" / "llama2-7b.layout")
    shown = [line for line in err.splitlines() if ": error[" in line]
    assert code == 1 and len(shown) == cli.SHOWN_DIAGNOSTICS
    assert re.search(r"^\.\.\. and \d+ more$", err.splitlines()[-1])


@pytest.mark.parametrize("bad", ["dp", "=3", "dp=three"])
def test_set_needs_name_equals_integer(capsys: pytest.CaptureFixture[str], bad: str) -> None:
    code, out, err = run(capsys, "plan", GPT2, "--to", "universal", "--set", bad)
    assert code == 2 and out == ""
    assert "--set" in err


def test_convert_to_deepspeed_at_another_world_size(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "ds3"
    code, stdout, err = run(
        capsys, "convert", EXAMPLE, "--to", "deepspeed", "--set", "dp=3", "-o", out, "-q"
    )
    assert code == 0, err
    assert "in 4 files (and latest, layoutc-manifest.json)" in stdout
    names = sorted(p.name for p in (out / "global_step2").iterdir())
    assert names == [
        *(f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(3)),
        "mp_rank_00_model_states.pt",
    ]
    assert (out / "latest").read_text() == "global_step2"
    code, _, _ = run(capsys, "verify", out)
    assert code == 0


def _example_layout(tmp_path: Path, store: str) -> Path:
    """The example checkpoint's own layout (inferred), stored as ``store`` says."""
    path = tmp_path / "example.layout"
    assert main(["infer", str(ROOT / "examples" / "deepspeed-zero2"), "-o", str(path)]) == 0
    text = path.read_text(encoding="utf-8")
    path.write_text(re.sub(r"(?m)^store .*$", store, text), encoding="utf-8")
    return path


@pytest.mark.parametrize(("flags", "workers"), [([], 3), (["--workers", "2"], 2)])
def test_convert_runs_the_written_layouts_writers_unless_workers_is_given(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: list[str], workers: int
) -> None:
    target = _example_layout(tmp_path, "store universal { writers 3 }")
    capsys.readouterr()
    example = ROOT / "examples" / "deepspeed-zero2"
    code, _, err = run(capsys, "convert", example, "--to", target, "-o", tmp_path / "o", *flags)
    assert code == 0, err
    assert f"with {workers} workers" in err


def test_convert_without_writers_or_workers_runs_one_worker_per_cpu(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    target = _example_layout(tmp_path, "store universal")
    capsys.readouterr()
    example = ROOT / "examples" / "deepspeed-zero2"
    code, _, err = run(capsys, "convert", example, "--to", target, "-o", tmp_path / "o")
    assert code == 0, err
    n = default_workers()
    assert f"with {n} worker{'s' if n > 1 else ''}" in err


# ---------------------------------------------------------------- small conveniences


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from layoutc import __version__

    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"layoutc {__version__}"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2GiB", 2 << 30),
        ("2gib", 2 << 30),
        ("2G", 2 << 30),
        ("2g", 2 << 30),
        ("512m", 512 << 20),
        ("2GB", 2 * 10**9),
        ("2gb", 2 * 10**9),
        ("1.5GB", 1_500_000_000),
        ("1e9", 10**9),
        ("4096", 4096),
    ],
)
def test_sizes_take_the_unit_in_any_case_and_a_bare_letter_as_binary(text: str, value: int) -> None:
    from layoutc.cli import _bytes

    assert _bytes(text) == value


def test_quiet_convert_prints_only_the_result_and_takes_torch_dtype_names(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "st"
    code, stdout, err = run(
        capsys, "convert", EXAMPLE, "--to", "safetensors", "--dtype", "bfloat16", "-o", out, "-q"
    )
    assert code == 0, err
    assert err == ""  # no plan summary
    assert re.fullmatch(
        r"wrote [0-9.]+ KiB in 1 file \(and layoutc-manifest.json\) to \S+ in [0-9.]+ s "
        r"\([0-9.]+ [KMG]?i?B/s\); read .*\n",
        stdout,
    ), stdout
    header = json.loads((out / "model.safetensors").read_bytes()[8:].split(b"}}", 1)[0] + b"}}")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} <= {"BF16", "F32"}
    assert "BF16" in {v["dtype"] for k, v in header.items() if k != "__metadata__"}


@pytest.mark.parametrize(
    "argv",
    [
        ("inspect",),
        ("infer",),
        ("verify",),
        ("convert", "--to", "safetensors", "-o", "OUT"),
        ("plan", "--to", "safetensors"),
    ],
)
def test_a_path_that_does_not_exist_is_a_usage_error_for_every_command(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: tuple[str, ...]
) -> None:
    """One rule: a path the command line names wrongly exits 2, naming it."""
    missing = tmp_path / "missing-dir"
    args = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    code, _, err = run(capsys, args[0], missing, *args[1:])
    assert code == 2 and f"{missing}: no such" in err, err


@pytest.mark.parametrize(
    ("files", "says"),
    [
        ([], "is empty"),
        (["latest_checkpointed_iteration.txt", "iter_0000010/mp_rank_00/x"], "Megatron-LM"),
        (["global_step3/mp_rank_00_model_states.pt"], r"tag folders \(global_step3\), no `latest`"),
        (["config.json", "weights.bin"], "Hugging Face model folder without model.safetensors"),
        (["a.txt", "b.npy"], "is not a checkpoint layoutc reads (.*); it holds a.txt, b.npy"),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "infer"])
def test_a_folder_layoutc_does_not_read_is_named_for_what_it_is(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, files: list[str], says: str, command: str
) -> None:
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    code, _, err = run(capsys, command, tmp_path)
    assert code == 1 and re.search(f"{re.escape(str(tmp_path))}: .*{says}", err), err
    assert "_model_states.pt files" not in err


def test_a_usage_error_shows_the_subcommands_usage(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "plan", EXAMPLE, "--to", "deepsped")
    assert code == 2 and "did you mean `deepspeed`?" in err
    assert "\nusage: layoutc plan " in err


def test_convert_dry_run_plans_the_very_command_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "ds3"
    argv = ["convert", EXAMPLE, "--to", "deepspeed", "--set", "dp=3", "--dtype", "fp16", "-o", out]
    code, stdout, err = run(capsys, *argv, "--dry-run")
    assert code == 0 and not out.exists() and "nothing was written" in err
    planned = run(capsys, "plan", EXAMPLE, "--to", "deepspeed", "--set", "dp=3", "--dtype", "fp16")
    assert stdout == planned[1]  # the plan `layoutc plan` shows for the same flags
    assert "-> global_step2 (deepspeed, 3 ranks)" in stdout


def test_plan_takes_param_groups_and_checks_them_as_convert_does(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    weights = tmp_path / "w"
    assert run(capsys, "convert", EXAMPLE, "--to", "safetensors", "-o", weights, "-q")[0] == 0
    spec = tmp_path / "s.layout"
    assert run(capsys, "infer", EXAMPLE, "-o", spec)[0] == 0
    groups = [{"lr": 1e-4, "weight_decay": 0.1}, {"lr": 1e-4, "weight_decay": 0.0}]
    given = tmp_path / "groups.json"
    given.write_text(json.dumps(groups))
    argv = ["plan", weights / "model.safetensors", "--spec", spec, "--to", "deepspeed"]
    code, stdout, err = run(capsys, *argv, "--param-groups", given)
    convert = ["convert", weights / "model.safetensors", "--spec", spec, "--to", "deepspeed"]
    dry = run(capsys, *convert, "--param-groups", given, "-o", tmp_path / "o", "--dry-run")
    assert code == dry[0] == 0 and stdout == dry[1]  # the plan the run would follow
    given.write_text(json.dumps(groups[:1]))
    code, stdout, err = run(capsys, *argv, "--param-groups", given)
    dry = run(capsys, *convert, "--param-groups", given, "-o", tmp_path / "o", "--dry-run")
    assert code == dry[0] == 1 and stdout == dry[1] == ""
    assert f"--param-groups gives 1 param groups; the target's optimizer has {len(groups)}" in err
    assert err.splitlines()[-1] == dry[2].splitlines()[-1].replace("convert", "plan")
    given.write_text("{")
    code, _, err = run(capsys, *argv, "--param-groups", given)
    assert code == 2 and f"--param-groups {given}: not JSON" in err
    given.write_text(json.dumps(groups))
    code, _, err = run(capsys, "plan", spec, "--to", "universal", "--param-groups", given)
    assert code == 2 and "--param-groups apply to a checkpoint, not a .layout" in err


def test_convert_dry_run_fails_where_the_run_would_before_any_plan(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    code, stdout, err = run(
        capsys, "convert", EXAMPLE, "--to", "universal", "-o", tmp_path / "taken", "--dry-run"
    )
    assert code == 1 and stdout == "" and "exists and is not empty" in err
    weights = tmp_path / "w"  # full weights to DeepSpeed: no param groups to write
    assert run(capsys, "convert", EXAMPLE, "--to", "safetensors", "-o", weights, "-q")[0] == 0
    spec = tmp_path / "s.layout"
    assert run(capsys, "infer", EXAMPLE, "-o", spec)[0] == 0
    code, stdout, err = run(
        capsys, "convert", weights / "model.safetensors", "--spec", spec, "--to", "deepspeed",
        "-o", tmp_path / "ds", "--dry-run",
    )  # fmt: skip
    assert code == 1 and stdout == "" and "give them with --param-groups" in err
    assert not (tmp_path / "ds").exists()


def test_ctrl_c_stops_a_conversion_with_one_line_and_exit_130(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from layoutc.runtime import executor

    real = executor.execute

    def interrupted(plan: Any, source: Any, out: Any, **kw: Any) -> Any:
        kw["units"] = (plan.units if kw.get("units") is None else kw["units"])[:3]
        real(plan, source, out, **kw)  # some units written, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(executor, "execute", interrupted)
    code, _, err = run(capsys, "convert", EXAMPLE, "--to", "universal", "-o", tmp_path / "o")
    (partial,) = tmp_path.iterdir()  # what the three units wrote is kept, nothing committed
    assert code == 130 and err.splitlines()[-1].startswith(
        "layoutc convert: interrupted; nothing was committed; "
    )
    assert err.splitlines()[-1].endswith(
        f"written are kept in {partial}: run the same command again to go on from there "
        "(--restart starts over)"
    )
    assert "Traceback" not in err and partial.name.startswith("o.partial-")


def test_ctrl_c_before_anything_is_written_leaves_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from layoutc.runtime import executor

    def interrupted(*a: Any, **kw: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(executor, "execute", interrupted)
    code, _, err = run(capsys, "convert", EXAMPLE, "--to", "universal", "-o", tmp_path / "o")
    assert code == 130 and err.splitlines()[-1] == (
        "layoutc convert: interrupted; nothing was committed"
    )
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []  # no partial left


def test_a_partial_output_left_by_a_dead_conversion_is_named_and_kept(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "u"
    dead = tmp_path / "u.partial-999999999-0123456789ab"  # no such process
    live = tmp_path / f"u.partial-{os.getppid()}-0123456789ab"  # a run still going
    for p in (dead, live):
        p.mkdir()
        (p / "half.pt").write_bytes(b"\0" * (3 << 20))
    code, _, err = run(capsys, "convert", EXAMPLE, "--to", "universal", "-o", out, "-q")
    assert code == 0 and (out / "latest_universal").is_file()
    assert f"note: {dead}: 3.0 MiB left by a conversion that did not finish" in err
    assert "it has no journal to go on from, so it is not reused (--restart removes it)" in err
    assert f"`rm -r {dead}`" in err and str(live) not in err
    assert dead.is_dir() and live.is_dir()  # removed only when the user asks
