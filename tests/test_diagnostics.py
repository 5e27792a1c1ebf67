"""Diagnostics: one golden per mistake, the whole rendered text, byte for byte.

Every ``E0xx`` / ``E1xx`` code emitted by the parser or the checker has at least one minimal
bad input below; its rendered output (``file:line:col: error[CODE]: message``, the source
line, the caret and the help) lives in ``tests/golden/diagnostics/<id>.txt``. A golden is
read by a person before it is kept: it must say where, what was found, what was expected.

Run with ``LAYOUTC_UPDATE_GOLDENS=1`` to rewrite the goldens after an intended change, then
read the diff.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

import pytest

from layoutc import LayoutError, load_layout, load_text
from layoutc.errors import Diagnostic
from layoutc.lang.parse import MAX_SOURCE_BYTES

ROOT = Path(__file__).resolve().parent.parent
GOLDENS = Path(__file__).resolve().parent / "golden" / "diagnostics"
UPDATE = bool(os.environ.get("LAYOUTC_UPDATE_GOLDENS"))
PATH = "example.layout"

# id -> minimal bad input. The id starts with the code it must produce; variants of one
# code carry a suffix. Most inputs are the examples of docs/language.md. Bytes are a file's
# content: they are written to a file and loaded from it.
CASES: dict[str, str | bytes] = {
    # ---- syntax (parse.py): exactly one diagnostic, parsing stops
    "E001": "mesh { dp = 8 }\ntensor w [4096, 4096] stage\n",
    "E002": "mesh { dp = 8\ntensor w [4096]\n",
    "E002-eof": "for i in 0..2 { tensor layers.{i}.w [4096]\n",
    "E002-nested": "layout x\nmesh { dp = 2 }\nfor i in 0..2 {\n  group g {\n    tensor w.{i} [1]\n}\n",
    "E003": "mesh { dp: 8 }\n",
    "E003-let": "mesh { dp = 8 }\nlet a = 1, b: 2\n",
    "E004": "tensor qkv [(q = 4096, k = 4096, v = 4096), 4096]\n",
    "E005": "mesh { dp = 8 }\ntensr w [4096]\n",
    "E006": "tensor w [4096, 4096 stage 0\n",
    "E007": "mesh { dp = 8 }\nfor i in 0..2 {\n  tensor layers.{i +}.w [4096]\n}\n",
    "E008": "mesh { dp = 8 }\nlayout gpt2\n",
    "E009": "mesh { dp = 8 }\ntensor w [4096] bf16 fp32\n",
    "E009-stage": "mesh { pp = 2 }\npipeline over pp\ntensor w [4096] stage 0 stage 1\n",
    "E010": b"mesh { dp = 2 }\ntensor w [4]  # caf\xe9 (Latin-1)\n",
    "E011": "mesh { dp = 2 }\nlet X = " + "(" * 101 + "1" + ")" * 101 + "\n",
    "E011-template": "mesh { dp = 2 }\ntensor w.{" + "(" * 101 + "0" + ")" * 101 + "} [4]\n",
    "E012": b"#" * (MAX_SOURCE_BYTES + 1),
    # ---- semantic (check.py)
    "E101": "mesh { pp = 2, dp = 4 }\npipeline over ppp\n",
    "E101-split": "mesh { dp = 2, tp = 2 }\ntensor w [4096 / (tp, sp), 4096]\n",
    "E101-misspelt": "mesh { dp = 2, tp = 2 }\ntensor w [4096 / tpp, 4096]\n",
    "E102": "mesh { tp = 3 }\nlet F = 11008\ntensor down_proj.weight [4096, F / tp]\n",
    "E102-padded": "mesh { tp = 3 }\nlet V = 32000\ntensor embed.weight [pad(V, 128) / tp, 4096]\n",
    "E102-fused": "mesh { tp = 16 }\ntensor qkv.weight [(q: 4096, k: 1000, v: 1000) / tp, 4096]\n",
    "E102-two-axes": "mesh { tp = 2, sp = 3 }\ntensor w [8 / (tp, sp)]\n",
    "E103": "mesh { dp = 2 }\ntensor norm.weight [4096]\ntensor norm.weight [4096]\n",
    "E103-loop": "mesh { dp = 2 }\nfor i in 0..3 {\n  tensor layers.w [4096]\n}\n",
    "E104": (
        "mesh { dp = 2 }\ntensor transformer.wte.weight [50257, 768]\n"
        "tie lm_head.weight = transformer.wte.weights\n"
    ),
    "E105": (
        "mesh { dp = 2 }\ntensor embed.weight [32000, 4096]\n"
        "tensor lm_head.weight [32000, 2048]\ntie lm_head.weight = embed.weight\n"
    ),
    "E106": "mesh { dp = 8 }\nzero 1 over dq\n",
    "E106-pipeline": "mesh { pp = 2, dp = 4 }\npipeline over pp\nzero 1 over (pp, dp)\n",
    "E106-no-axes": "mesh { dp = 8 }\nzero 2\n",
    "E107": "mesh { pp = 2, dp = 4 }\npipeline over pp\ntensor norm.weight [4096] stage pp\n",
    "E107-loop": (
        "mesh { pp = 2 }\npipeline over pp\nlet L = 4\n"
        "for i in 0..L stage i { tensor layers.{i}.w [8] }\n"
    ),
    "E108": "mesh { tp = 2 }\ntensor qkv.weight [6144 = (q: 4096, k: 1024, v: 512) / tp, 4096]\n",
    "E108-plain": "mesh { tp = 2 }\ntensor w [100 = 96 / tp]\n",
    "E109": "mesh { dp = 0 }\n",
    "E109-dim": "mesh { dp = 2 }\nlet H = 4096\ntensor w [H - 4096]\n",
    "E109-option": "mesh { dp = 2 }\nstore deepspeed { writers 0 }\n",
    "E110": "mesh { dp = 2, tp = 2 }\nlet H = 4096\ntensor w [Hd * 2, H]\n",
    "E110-function": "mesh { dp = 2 }\ntensor w [ceil(10, 3)]\n",
    "E110-arity": "mesh { dp = 2 }\ntensor w [cdiv(10)]\n",
    "E111": "mesh { dp = 2 }\nlet Z = 0\ntensor w [4096 / Z]\n",
    "E111-cdiv": "mesh { dp = 2 }\nlet Z = 0\ntensor w [cdiv(4096, Z)]\n",
    "E112": "mesh { dp = 2 }\ndtype bfloat16\n",
    "E112-entry": "mesh { dp = 2 }\ntensor w [4] float32\n",
    "E112-master": "mesh { dp = 2 }\noptimizer adam { master 32 }\n",
    "E113": "mesh { dp = 2 }\nstore safetensor\n",
    "E114": "mesh { dp = 2 }\nstore deepspeed { writer 4 }\n",
    "E114-missing-value": "mesh { dp = 2 }\nstore deepspeed { writers }\n",
    "E114-flag-with-value": "mesh { dp = 8 }\nzero 1 over dp { round_robin 1 }\n",
    "E114-string": 'mesh { dp = 2 }\nstore deepspeed { writers "4" }\n',
    "E114-tag": "mesh { dp = 2 }\nstore deepspeed { tag global_step100 }\n",
    "E114-states": "mesh { dp = 2 }\noptimizer adam { states (m: 1, v: 2) }\n",
    "E114-unknown-optimizer": "mesh { dp = 2 }\noptimizer lion\n",
    "E115": "mesh { dp = 2, tp = 2 }\nlet tp = 4\n",
    "E115-loop": "mesh { dp = 2 }\nlet L = 2\nfor L in 0..4 {\n  tensor w [4]\n}\n",
    "E115-statement": "mesh { dp = 2 }\nstore deepspeed\nstore universal\n",
    "E115-option": "mesh { dp = 2 }\nstore deepspeed { writers 4, writers 8 }\n",
    "E115-block": "mesh { tp = 2 }\ntensor qkv [(q: 64, q: 64) / tp, 64]\n",
    "E115-dtype": "mesh { dp = 2 }\ndtype bf16\ndtype fp16\n",
    "E115-offload": "mesh { dp = 2 }\noffload params to cpu\noffload params to cpu\n",
    "E115-step": "mesh { dp = 2 }\noptimizer sgd { step, no_step }\n",
    "E116": "tensor w [4096]\n",
    "E116-empty": "mesh { }\n",
    "E116-twice": "mesh { dp = 2 }\nmesh { tp = 2 }\n",
    "E117": "mesh { tp = 2 }\ntensor w [64 / tp, 64 / tp]\n",
    "E117-tuple": "mesh { tp = 2, sp = 2 }\ntensor w [64 / (tp, tp), 64]\n",
    "E118": "mesh { tp = 2 }\nlet V = 32000\ntensor w [pad(V, 128) * 2 / tp, 64]\n",
    "E118-arity": "mesh { tp = 2 }\ntensor w [pad(32000) / tp, 64]\n",
    "E118-block": "mesh { tp = 2 }\ntensor w [(q: pad(60, 64), k: 64) / tp, 64]\n",
    "E119": "mesh { tp = 2 }\ntensor w [(q: 64, k: 64) * 2, 64]\n",
    "E119-split": "mesh { tp = 2 }\ntensor w [64 / (tp, 2), 64]\n",
    "E120": "mesh { dp = 2 }\ntensor w [4] stage 1\n",
    "E121": "mesh { dp = 2 }\nzero 4 over dp\n",
    "E122": "mesh { dp = 2 }\nlet L = 0\nfor i in 0..L {\n  tensor layers.{i}.w [4]\n}\n",
    "E124": "mesh { dp = 2 }\nfor i in 0..2 {\n  tensor layers.{i - 1}.w [8]\n}\n",
    "E125": "mesh { dp = 2 }\nzero 2 over dp { sub_group 1e8 }\n",
    "E125-bf16": "mesh { dp = 2 }\ndtype fp16\nzero 1 over dp { bf16_optimizer }\n",
    "E125-round-robin": "mesh { dp = 2 }\nzero 3 over dp { round_robin }\n",
    "E126": (
        "mesh { dp = 2, ep = 4 }\nlet E = 8, H = 64\nzero 1 over (dp, ep)\n"
        "tensor router.weight [E, H]\ntensor experts.w1 [E / ep, H, H]\n"
    ),
    "E127": "mesh { dp = 2 }\ntensor a [4]\ntie a = a\n",
    "E127-twice": "mesh { dp = 2 }\ntensor a [4]\ntensor b [4]\ntie c = a\ntie c = b\n",
    "E127-chain": "mesh { dp = 2 }\ntensor a [4]\ntensor b [4]\ntie b = a\ntie c = b\n",
    "E127-alias-only": "mesh { dp = 2 }\ntensor a [4]\ntie c = a\ntie d = c\n",
    "E128": "mesh { dp = 2 }\noffload optimizer to nvme\n",
    "E128-what": "mesh { dp = 2 }\noffload gradients to cpu\n",
    "E128-device": "mesh { dp = 2 }\noffload optimizer to disk\n",
    "E128-cpu-directory": 'mesh { dp = 2 }\noffload params to cpu "/tmp"\n',
    "E130": "mesh { pp = 2, tp = 2 }\npipeline over pp\ntensor w [64 / pp, 64]\n",
    "E131": "mesh { tp = 2 }\ntensor w [4096 / tp * 2, 64]\n",
    "E131-paren": "mesh { tp = 2 }\ntensor w [(4096 / tp), 64]\n",
    "E132": "mesh { dp = 2 }\nfor i in 0..2 {\n  let H = 64\n  tensor layers.{i}.w [64]\n}\n",
    "E133": "mesh { dp = 2 }\ntensor w [1e30]\n",
    "E133-digits": "mesh { dp = 2 }\ntensor w [" + "9" * 100 + "]\n",
    "E133-exponent": "mesh { dp = 2 }\ntensor w [1e999999999]\n",
    "E133-template": "mesh { dp = 2 }\ntensor w.{" + "9" * 100 + "} [4]\n",
    # ---- --set NAME=VALUE overrides (OVERRIDES below)
    "E109-set": "mesh { dp = 2 }\ntensor w [8]\n",
    "E134": "mesh { dp = 2 }\ntensor w [8]\n",
    "E135": "mesh { pp = 2 }\npipeline over pp\ntensor tied.weight [8] stage (0, 0)\n",
    "E135-layer": "mesh { pp = 2 }\npipeline over pp\ntensor tied.weight [8] layer -1\n",
    "E120-layer": "mesh { dp = 2 }\ntensor tied.weight [8] layer 0\n",
    "E136": "mesh { tp = 2 }\ntensor w [grains(101, 1) * 2 / tp, 16]\n",
    "E136-arity": "mesh { tp = 2 }\ntensor w [grains(101) / tp, 16]\n",
    "E136-unsplit": "mesh { tp = 2 }\ntensor w [grains(101, 1), 16]\n",
    "E136-grain": "mesh { tp = 2 }\ntensor w [grains(48, 64) / tp, 16]\n",
    # ---- limits: what a layout may expand to
    "E137": 'mesh { dp = 2 }\ntensor w [4]\nstore deepspeed { tag "../global_step100" }\n',
    "E137-dots": 'mesh { dp = 2 }\ntensor w [4]\nstore deepspeed { tag ".." }\n',
    "E137-empty": 'mesh { dp = 2 }\ntensor w [4]\nstore deepspeed { tag "" }\n',
    "E138": "mesh { dp = 2 }\nfor i in 0..1e9 {\n  tensor layers.{i}.w [4]\n}\n",
    "E138-nested": (
        "mesh { dp = 2 }\nfor i in 0..1024 {\n  for j in 0..1024 {\n"
        "    tensor layers.{i}.experts.{j}.w [4]\n  }\n}\n"
    ),
    "E138-tensors": "mesh { dp = 2 }\nfor i in 0..300000 {\n  tensor layers.{i}.w [4]\n}\n",
    "E139": "mesh { dp = 2 }\ntensor w [1e9, 1e9]\n",
    "E139-total": "mesh { dp = 2 }\ntensor a [5e15]\ntensor b [5e15]\n",
    "E140": "mesh { dp = 2 }\ntensor w [" + ", ".join(["1"] * 33) + "]\n",
    "E141": "mesh { pp = 64, dp = 8192, tp = 8 }\n",
    "E142": "let dp = 6\nmesh { edp = dp / ep, ep = 4 }\n",
    "E143": "mesh { dp = 2, ep = 4 }\nfor e in 0..6 over ep {\n  tensor experts.{e}.w [8, 8]\n}\n",
    "E143-axis": "mesh { dp = 2, ep = 2 }\nfor e in 0..4 over xp {\n  tensor experts.{e}.w [8]\n}\n",
    "E143-start": "mesh { dp = 2, ep = 2 }\nfor e in 2..6 over ep {\n  tensor experts.{e}.w [8]\n}\n",
    "E143-nested": (
        "mesh { dp = 2, ep = 2 }\nfor e in 0..2 over ep {\n  for f in 0..2 over ep {\n"
        "    tensor experts.{e}.{f}.w [8]\n  }\n}\n"
    ),
    "E143-split": "mesh { dp = 2, ep = 2 }\nfor e in 0..2 over ep {\n  tensor experts.{e}.w [8 / ep]\n}\n",
    "E144": "mesh { dp = 2 }\ntensor w [4, 8] from (gate: w1, up: w3)\n",
    "E144-block": "mesh { dp = 2 }\ntensor w [(gate: 4, up: 4), 8] from (gate: w1, down: w3)\n",
    "E144-twice": "mesh { dp = 2 }\ntensor w [(gate: 4, up: 4), 8] from (gate: w1, gate: w3)\n",
    "E144-missing": "mesh { dp = 2 }\ntensor w [(gate: 4, up: 4), 8] from (gate: w1)\n",
    "E143-pipeline": (
        "mesh { pp = 2, ep = 2 }\npipeline over pp\nfor e in 0..2 over pp {\n  tensor experts.{e}.w [8]\n}\n"
    ),
}
OVERRIDES: dict[str, dict[str, int]] = {"E109-set": {"dp": 0}, "E134": {"pd": 3}}
COMMAND_LINE = {"E134"}  # reported against the command line, not a source location
WHOLE_FILE = {"E012"}  # about the whole file, with no line to show


def code_of(case: str) -> str:
    return case.split("-")[0]


def diagnose(text: str | bytes, path: str = PATH, case: str = "") -> LayoutError:
    with pytest.raises(LayoutError) as info:
        if isinstance(text, bytes):  # a file, read from a folder of its own by its bare name
            with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder):
                Path(path).write_bytes(text)
                load_layout(path, OVERRIDES.get(case))
        else:
            load_text(text, path, OVERRIDES.get(case))
    return info.value


def rendered(case: str) -> str:
    return diagnose(CASES[case], case=case).render() + "\n"


def emitted_codes() -> set[str]:
    source = "".join(
        (ROOT / "layoutc" / "lang" / f).read_text(encoding="utf-8")
        for f in ("parse.py", "check.py")
    )
    return set(re.findall(r'"(E[01]\d\d)"', source))


# ---------------------------------------------------------------- the golden table


# Goldens that hold the right text while the implementation prints something else.
KNOWN_WRONG: dict[str, str] = {}


def golden_cases() -> list[object]:
    return [
        pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=KNOWN_WRONG[c]))
        if c in KNOWN_WRONG
        else c
        for c in sorted(CASES)
    ]


@pytest.mark.parametrize("case", golden_cases())
def test_each_bad_input_renders_exactly_its_golden(case: str) -> None:
    golden = GOLDENS / f"{case}.txt"
    got = rendered(case)
    if UPDATE and case not in KNOWN_WRONG:
        GOLDENS.mkdir(parents=True, exist_ok=True)
        golden.write_text(got, encoding="utf-8")
    assert golden.is_file(), f"no golden {golden.name}; run with LAYOUTC_UPDATE_GOLDENS=1"
    assert got == golden.read_text(encoding="utf-8")


@pytest.mark.parametrize("case", sorted(set(CASES) - COMMAND_LINE - WHOLE_FILE))
def test_each_bad_input_reports_its_code_first_at_a_real_location(case: str) -> None:
    error = diagnose(CASES[case], case=case)
    first = error.diagnostics[0]
    assert first.code == code_of(case)
    text = CASES[case]
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    lines = text.splitlines()
    assert 1 <= first.span.line <= len(lines)
    assert 1 <= first.span.column <= len(lines[first.span.line - 1]) + 1
    head, shown, caret, *_ = first.render(text).splitlines()
    assert head.startswith(f"{PATH}:{first.span.line}:{first.span.column}: error[{first.code}]: ")
    # the caret sits under the source line, at the character of the reported column (a long
    # line is shown as a window around it)
    gutter = f"{first.span.line:>4} | "
    assert shown.startswith(gutter)
    at = caret.index("^")
    column = first.span.column
    assert shown[at : at + 1] == lines[first.span.line - 1][column - 1 : column]
    if len(lines[first.span.line - 1]) <= 120:
        assert caret.index("^") == len(gutter) + first.span.column - 1


def test_every_code_the_parser_and_checker_emit_has_a_golden_case() -> None:
    covered = {code_of(c) for c in CASES}
    assert emitted_codes() <= covered, sorted(emitted_codes() - covered)


def test_every_golden_file_belongs_to_a_case() -> None:
    stale = {p.stem for p in GOLDENS.glob("*.txt")} - set(CASES)
    assert not stale, f"goldens without a case: {sorted(stale)}"


@pytest.mark.parametrize(
    ("case", "line", "column"),
    [
        ("E001", 2, 28),
        ("E002", 2, 1),
        ("E003", 1, 10),
        ("E005", 2, 1),
        ("E007", 3, 20),
        ("E102", 3, 32),
        ("E104", 3, 22),
        ("E107", 3, 33),
        ("E110", 3, 11),
        ("E114", 2, 19),
        ("E126", 5, 8),
        ("E130", 3, 16),
    ],
)
def test_the_diagnostic_points_at_the_offending_text(case: str, line: int, column: int) -> None:
    span = diagnose(CASES[case]).diagnostics[0].span
    assert (span.file, span.line, span.column) == (PATH, line, column)


# ---------------------------------------------------------------- what messages say


def test_divisibility_names_the_tensor_the_dim_and_both_values() -> None:
    (d,) = diagnose("mesh { tp = 3 }\ntensor x [10 / tp]\n").diagnostics
    assert d.code == "E102"
    assert d.message == "dim 0 of x has 10 elements, not divisible by tp = 3"


def test_divisibility_over_two_axes_names_each_axis_and_its_size() -> None:
    (d,) = diagnose("mesh { tp = 2, sp = 3 }\ntensor w [4, 8 / (tp, sp)]\n").diagnostics
    assert d.code == "E102"
    assert d.message.startswith("dim 1 of w has 8 elements, not divisible by ")
    assert "tp = 2" in d.message and "sp = 3" in d.message


def test_divisibility_inside_a_loop_names_the_expanded_tensor() -> None:
    error = diagnose("mesh { tp = 3 }\nfor i in 0..2 { tensor layers.{i}.w [4 / tp] }\n")
    assert error.codes == ["E102"]
    assert "layers.0.w has 4 elements, not divisible by tp = 3" in error.diagnostics[0].message
    assert "also in 1 more loop iteration" in error.diagnostics[0].message


def test_an_unknown_axis_lists_the_valid_axes() -> None:
    (d,) = diagnose("mesh { pp = 2, dp = 4 }\npipeline over ppp\n").diagnostics
    assert d.hint == "did you mean `pp`? valid axes: pp, dp"


def test_an_unknown_dtype_suggests_the_canonical_spelling() -> None:
    (d,) = diagnose("mesh { dp = 2 }\ndtype half\n").diagnostics
    assert d.code == "E112"
    assert d.hint.startswith("did you mean `fp16`?")


def test_a_misspelt_keyword_suggests_the_keyword() -> None:
    (d,) = diagnose("mesh { dp = 8 }\ngruop g { tensor w [1] }\n").diagnostics
    assert d.code == "E005"
    assert "did you mean `group`?" in d.hint


# ---------------------------------------------------------------- collecting


FIVE_MISTAKES = """\
mesh { dp = 2, tp = 3 }
dtype bfloat16
tensor a [10 / tp]
tensor b [4] stage 1
store safetensor
zero 7 over dp
"""


def test_semantic_errors_are_all_collected_into_one_layout_error() -> None:
    error = diagnose(FIVE_MISTAKES)
    assert sorted(error.codes) == ["E102", "E112", "E113", "E120", "E121"]
    assert sorted(d.span.line for d in error.diagnostics) == [2, 3, 4, 5, 6]
    text = error.render()
    for code in error.codes:
        assert f"error[{code}]" in text


def test_collected_diagnostics_are_listed_in_file_order() -> None:
    lines = [d.span.line for d in diagnose(FIVE_MISTAKES).diagnostics]
    assert lines == sorted(lines)


def test_a_syntax_error_stops_parsing_with_exactly_one_diagnostic() -> None:
    error = diagnose("mesh { dp: 2 }\ntensor a [10 / tp]\ntensr b [1]\n")
    assert error.codes == ["E003"]


def test_str_of_a_layout_error_shows_five_diagnostics_then_how_many_more() -> None:
    text = "mesh { dp = 2 }\n" + "".join(f"tensor w{k} [{k} - 9]\n" for k in range(8))
    error = diagnose(text)
    assert len(error.diagnostics) == 8
    short = str(error)
    assert short.count("error[E109]") == 5
    assert short.endswith("... and 3 more")
    assert error.render().count("error[E109]") == 8


def test_one_mistake_in_a_loop_body_is_reported_once_with_the_number_of_repeats() -> None:
    error = diagnose("mesh { dp = 2 }\nfor i in 0..9 { tensor w.{i} [0] }\n")
    (d,) = error.diagnostics
    assert d.message == "dim 0 of w.0 is 0; it must be positive (also in 8 more loop iterations)"


def test_the_rendered_diagnostic_names_a_given_file_path() -> None:
    error = diagnose("mesh { dp = 0 }\n", path="jobs/llama.layout")
    assert error.render().startswith("jobs/llama.layout:1:13: error[E109]: ")


# ---------------------------------------------------------------- syntax labels anywhere


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("layout x\nmesh { dp: 2 }\n", "E003"),
        ("layout x\nmesh { dp = 2 }\ntensor qkv [(q = 4, k = 4), 4]\n", "E004"),
        ("layout x\nmesh { dp = 2 }\ntensr w [1]\n", "E005"),
        ("layout x\nmesh { dp = 2 }\ntensor w [1, 2 stage 0\n", "E006"),
        ("layout x\nmesh { dp = 2 }\nfor i in 0..2 { tensor w.{i} [1]\n", "E002"),
        ("layout x\nmesh { dp = 2 }\ngroup g { for i in 0..2 { tensor w.{i} [1] }\n", "E002"),
    ],
)
def test_common_syntax_mistakes_are_labelled_after_a_header_and_other_statements(
    text: str, code: str
) -> None:
    assert diagnose(text).codes == [code]


def test_an_unclosed_brace_help_says_where_it_was_opened() -> None:
    (d,) = diagnose("mesh { dp = 2 }\nfor i in 0..2 {\n  tensor w.{i} [1]\n").diagnostics
    assert d.code == "E002"
    assert d.hint == "the `{` opened at line 2, column 15 is never closed"


# ---------------------------------------------------------------- precision of messages


def test_the_expected_list_of_a_syntax_error_names_only_tokens_that_can_follow() -> None:
    (d,) = diagnose("mesh { dp = 8 }\ntensor w [4096 4096]\n").diagnostics
    assert d.code == "E001"
    assert "`]`" in d.hint and "`,`" in d.hint
    for impossible in ("`}`", "`)`", "`..`"):
        assert impossible not in d.hint


def test_a_form_feed_between_statements_does_not_shift_the_shown_source_line() -> None:
    text = "mesh { dp = 2 }\n\f\ntensor w [4096 / tpp]\n"
    (d,) = diagnose(text).diagnostics
    assert d.span.line == 3
    assert d.render(text).splitlines()[1] == "   3 | tensor w [4096 / tpp]"


def test_a_tensor_repeated_by_its_loop_says_the_name_needs_the_loop_variable() -> None:
    (d,) = diagnose("mesh { dp = 2 }\nfor i in 0..3 { tensor a [1] }\n").diagnostics
    assert d.code == "E103"
    assert f"first at {d.span}" not in d.message
    assert "{i}" in d.hint


def test_a_tie_to_an_alias_is_reported_as_a_chain_of_ties() -> None:
    (d,) = diagnose(CASES["E127-alias-only"]).diagnostics
    assert d.code == "E127"
    assert "tie d = a" in d.message + d.hint


def test_a_repeated_stage_points_at_the_second_stage() -> None:
    (d,) = diagnose(CASES["E009-stage"]).diagnostics
    assert d.code == "E009"
    assert d.span.column >= len("tensor w [4096] stage 0 ") + 1


def test_a_chain_of_ties_names_the_tensor_to_tie_to() -> None:
    (d,) = diagnose(CASES["E127-chain"]).diagnostics
    assert d.code == "E127"
    assert "tie c = a" in d.message + d.hint


def test_a_crlf_file_renders_its_source_lines_without_carriage_returns() -> None:
    text = "mesh { dp = 2 }\r\ntensor a [3 / dp]\r\n"
    (d,) = diagnose(text).diagnostics
    assert (d.code, d.span.line, d.span.column) == ("E102", 2, 11)
    assert "\r" not in d.render(text)
    (eof,) = diagnose("mesh { dp = 2 }\r\ntensor a [3 / dp\r\n").diagnostics
    assert (eof.code, eof.span.line, eof.span.column) == ("E006", 2, 17)


def test_diagnostic_render_without_source_is_one_line() -> None:
    d = Diagnostic("E109", "mesh axis `dp` is 0; it must be positive")
    assert d.render() == "error[E109]: mesh axis `dp` is 0; it must be positive"
