"""Hostile layout files: each is refused by a named diagnostic, quickly, with no traceback.

A ``.layout`` file is input like any other: it may come from a colleague, a bug report or
``layoutc infer`` run on a damaged checkpoint. Each case writes one into a private folder
and runs the real command line on it, in a child process bounded in time and memory (see
``bounded.py``): ``check``, and ``plan`` with the layout as the source and as the target.
A refusal is exit 1, the diagnostic's code and the file's name on stderr, no traceback,
within :data:`SECONDS`. The limits themselves are documented in docs/language.md
("Limits") and tested one by one in tests/test_diagnostics.py; here the point is that the
hostile extreme of each is cheap to refuse.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bounded import ROOT, Run, assert_refused, cli

SECONDS = 10  # every refusal, start-up included; each case used to hang, crash or take minutes
GOOD = "mesh { dp = 2 }\ntensor w [4]\n"


def write(tmp_path: Path, text: str | bytes, name: str = "hostile.layout") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def refused_quickly(run: Run, code: str, path: Path) -> None:
    assert_refused(run, f"error[{code}]", path.name)
    assert run.seconds < SECONDS, f"{run.seconds:.1f} s"


def refused_by_check_and_plan(tmp_path: Path, text: str | bytes, code: str) -> None:
    """``check`` refuses the layout, and so does ``plan`` with it as the source and as the
    target (the path a conversion would take)."""
    path = write(tmp_path, text)
    good = write(tmp_path, GOOD, "good.layout")
    refused_quickly(cli("check", path), code, path)
    refused_quickly(cli("plan", path, "--to", "safetensors"), code, path)
    refused_quickly(cli("plan", good, "--to", path), code, path)


# ---------------------------------------------------------------- tags


@pytest.mark.parametrize(
    "tag",
    ["/srv/victim", "../../victim", "..", ".", "", "dir\\\\victim", "step\0x", "x" * 256],
    ids=["absolute", "parent", "dotdot", "dot", "empty", "backslash", "nul", "long"],
)
def test_a_tag_that_is_not_one_folder_name_is_refused(tmp_path: Path, tag: str) -> None:
    text = f'mesh {{ dp = 2 }}\ntensor w [4]\nstore safetensors {{ tag "{tag}" }}\n'
    refused_by_check_and_plan(tmp_path, text, "E137")


def test_a_refused_tag_is_pointed_at_in_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'mesh { dp = 2 }\ntensor w [4]\nstore deepspeed { tag "/srv/victim" }\n')
    run = cli("check", path)
    assert_refused(run, f"{path.name}:3:23: error[E137]", 'tag "/srv/victim" contains `/`')


# ---------------------------------------------------------------- sizes and counts


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("for i in 0..1000000000 { tensor w.{i} [4] }", "E138"),
        ("for i in 0..4611686018427387903 { tensor w.{i} [4] }", "E138"),  # 2**62 - 1
        ("for i in 0..1000 { for j in 0..1000 { for k in 0..1000 { } } }", "E138"),
        ("for i in 0..100000 { for j in 0..100000 { tensor w.{i}.{j} [4] } }", "E138"),
        ("for i in 0..300000 { tensor w.{i} [4] }", "E138"),  # more tensors than allowed
        ("tensor w [4611686018427387904, 4611686018427387904]", "E139"),  # [2**62, 2**62]
        ("tensor a [5e15]\ntensor b [5e15]", "E139"),  # together
        ("tensor w [" + ", ".join(["4294967296"] * 40) + "]", "E140"),  # 40 dims of 2**32
        ("tensor w [" + ", ".join(["1"] * 1000) + "]", "E140"),
    ],
    ids=[
        "loop-1e9",
        "loop-2e62",
        "nested-1e9",
        "nested-tensors",
        "tensors",
        "elements",
        "elements-together",
        "dims",
        "dims-of-one",
    ],
)
def test_a_layout_that_expands_too_far_is_refused_before_expanding(
    tmp_path: Path, body: str, code: str
) -> None:
    refused_by_check_and_plan(tmp_path, f"mesh {{ dp = 2 }}\n{body}\n", code)


HUGE_AXES = "mesh { " + ", ".join(f"a{k} = 4611686018427387904" for k in range(20_000)) + " }"


@pytest.mark.parametrize(
    "mesh",
    [
        "mesh { dp = 1000000 }",
        "mesh { pp = 64, dp = 8192, tp = 8 }",
        "mesh { dp = 4e18 }",
        HUGE_AXES,
    ],
    ids=["dp-1e6", "three-axes", "dp-4e18", "many-huge-axes"],
)
def test_a_mesh_of_more_ranks_than_any_job_is_refused(tmp_path: Path, mesh: str) -> None:
    refused_by_check_and_plan(tmp_path, f"{mesh}\ntensor w [4]\n", "E141")


def test_a_target_set_to_a_million_ranks_is_refused(tmp_path: Path) -> None:
    """``--set dp=1000000`` on a ZeRO target used to plan a million files for minutes."""
    specs = ROOT / "specs"
    run = cli(
        "plan", specs / "gpt2-small.layout", "--to", specs / "gpt2-small-dp4.layout",
        "--set", "dp=1000000",
    )  # fmt: skip
    refused_quickly(run, "E141", Path("gpt2-small-dp4.layout"))


def test_the_largest_shipped_layout_stays_well_inside_the_limits() -> None:
    """65,536 ranks and 483 tensors: checked and planned in seconds."""
    spec = ROOT / "specs" / "llama2-70b.layout"
    check = cli("check", spec)
    assert check.code == 0, check.err
    assert "65,536 ranks" in check.out
    plan = cli("plan", spec, "--to", "safetensors")
    assert plan.code == 0, plan.err
    assert check.seconds < SECONDS and plan.seconds < SECONDS


# ---------------------------------------------------------------- text the parser must survive


def test_a_file_that_is_not_utf8_is_refused_at_its_first_bad_byte(tmp_path: Path) -> None:
    text = b"mesh { dp = 2 }\ntensor w [4]  # caf\xe9\n"
    refused_by_check_and_plan(tmp_path, text, "E010")
    path = tmp_path / "hostile.layout"
    assert_refused(cli("fmt", path), f"{path.name}:2:20: error[E010]", "byte 0xe9")


def test_a_binary_file_given_as_a_layout_is_refused(tmp_path: Path) -> None:
    refused_by_check_and_plan(tmp_path, bytes(range(256)) * 64, "E010")


def test_a_file_larger_than_a_layout_may_be_is_refused_unread(tmp_path: Path) -> None:
    refused_by_check_and_plan(tmp_path, b"#" * (9 << 20), "E012")


@pytest.mark.parametrize(
    "text",
    [
        "let X = " + "(" * 1000 + "1" + ")" * 1000,
        "let X = " + "-" * 1000 + "1",
        "let X = " + " + ".join(["1"] * 20_000),
        "for i in 0..1 { " * 1000 + "}" * 1000,
        "group g { " * 1000 + "}" * 1000,
        "tensor w.{" + "(" * 1000 + "0" + ")" * 1000 + "} [4]",
        "tensor w [" + "(" * 100_000 + "4" + ")" * 100_000 + "]",
    ],
    ids=["parens", "minus", "chain", "loops", "groups", "template", "parens-1e5"],
)
def test_nesting_deeper_than_the_limit_is_refused_not_a_recursion_error(
    tmp_path: Path, text: str
) -> None:
    refused_by_check_and_plan(tmp_path, f"mesh {{ dp = 2 }}\n{text}\n", "E011")


@pytest.mark.parametrize(
    "number", ["9" * 5000, "1e999999999", "1" + "_0" * 4000, "0." + "0" * 5000 + "1e5000"]
)
def test_a_number_too_large_for_64_bits_is_refused_without_computing_it(
    tmp_path: Path, number: str
) -> None:
    refused_by_check_and_plan(tmp_path, f"mesh {{ dp = 2 }}\ntensor w [{number}]\n", "E133")


def test_a_number_too_long_inside_a_name_template_is_refused(tmp_path: Path) -> None:
    text = "mesh { dp = 2 }\ntensor w.{" + "9" * 5000 + "} [4]\n"
    refused_by_check_and_plan(tmp_path, text, "E133")


def test_ties_that_go_round_in_a_circle_are_refused_not_followed_forever(tmp_path: Path) -> None:
    text = GOOD + "tie c = a\ntie a = b\ntie b = a\ntie x = c\n"
    refused_by_check_and_plan(tmp_path, text, "E127")


# ---------------------------------------------------------------- work linear in the input


def test_forty_thousand_mistakes_are_reported_in_seconds(tmp_path: Path) -> None:
    """Each diagnostic used to split the whole file again to show its line (64 s)."""
    path = write(
        tmp_path, "mesh { dp = 2 }\n" + "".join(f"tensor w{k} [0]\n" for k in range(40_000))
    )
    run = cli("check", path)
    assert_refused(run, "error[E109]", f"{path.name}: 40000 errors")
    assert run.seconds < 3 * SECONDS, f"{run.seconds:.1f} s"


def test_twenty_thousand_ties_to_missing_tensors_are_reported_in_seconds(tmp_path: Path) -> None:
    """Each one used to compare its name with every tensor for a "did you mean" (over 400 s)."""
    text = "mesh { dp = 2 }\n" + "".join(
        f"tensor w{k} [4]\ntie a{k} = x{k}\n" for k in range(20_000)
    )
    path = write(tmp_path, text)
    run = cli("check", path)
    assert_refused(run, "error[E104]", f"{path.name}: 20000 errors")
    assert run.seconds < 3 * SECONDS, f"{run.seconds:.1f} s"


def test_twenty_thousand_unknown_names_and_axes_are_reported_in_seconds(tmp_path: Path) -> None:
    mesh = "mesh { " + ", ".join(f"a{k} = 1" for k in range(20_000)) + " }\n"
    let = "let " + ", ".join(f"c{k} = 1" for k in range(20_000)) + "\n"
    body = "".join(f"tensor w{k} [q{k}, 4 / (a{k}, b{k})]\n" for k in range(20_000))
    path = write(tmp_path, mesh + let + body)
    run = cli("check", path)
    assert_refused(run, "error[E110]", "error[E101]", "more)")
    assert run.seconds < 3 * SECONDS, f"{run.seconds:.1f} s"


def test_a_long_chain_of_ties_is_checked_in_seconds(tmp_path: Path) -> None:
    """Each tie walked the chain before it to name the tensor at its end."""
    text = "mesh { dp = 2 }\ntensor a0 [4]\n" + "".join(
        f"tie a{k + 1} = a{k}\n" for k in range(40_000)
    )
    path = write(tmp_path, text)
    run = cli("check", path)
    assert_refused(run, "error[E127]", "tie a2 = a1: a1 is itself an alias of a0")
    assert run.seconds < 3 * SECONDS, f"{run.seconds:.1f} s"


def test_fmt_of_a_file_of_many_comments_takes_seconds(tmp_path: Path) -> None:
    """fmt took comments with list.pop(0) and scanned all of them per statement (57 s)."""
    lines = ["mesh { dp = 2 }"]
    for k in range(20_000):
        lines += [f"# comment {k}", f"tensor w{k} [4]  # trailing {k}", ""]
    path = write(tmp_path, "\n".join(lines) + "\n")
    run = cli("fmt", path)
    assert run.code == 0, run.err
    assert run.out.count("# comment") == 20_000 and run.out.count("# trailing") == 20_000
    assert run.seconds < SECONDS, f"{run.seconds:.1f} s"


def test_a_huge_one_line_file_shows_a_window_of_its_line(tmp_path: Path) -> None:
    """A diagnostic on a line of a million characters prints a window around the caret,
    not the line."""
    tensors = "".join(f"tensor w{k} [4] " for k in range(20_000))
    path = write(tmp_path, f"mesh {{ dp = 2 }} {tensors}tensor z [0]\n")
    run = cli("check", path)
    assert_refused(run, f"{path.name}:1:", "error[E109]: dim 0 of z is 0", "tensor z [0]")
    assert len(run.err) < 2_000, len(run.err)
    assert run.seconds < SECONDS, f"{run.seconds:.1f} s"
