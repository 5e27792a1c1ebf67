"""Fuzzing the front end: no text makes ``load_text`` crash.

Whatever bytes a user feeds the checker, the answer is a :class:`~layoutc.ir.Layout` or a
:class:`~layoutc.errors.LayoutError` whose every diagnostic renders with a code, a location
and the source line; never a traceback from lark, the checker or the renderer. Inputs are
random printable text and mutations (characters or tokens deleted, duplicated, swapped,
replaced) of the shipped specs, which keep most of the structure and so reach the checker.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layoutc import Layout, LayoutError, load_text
from layoutc.lang.fmt import fmt
from layoutc.lang.parse import parse

SPECS = Path(__file__).resolve().parent.parent / "specs"
SEEDS = {p.name: p.read_text(encoding="utf-8") for p in sorted(SPECS.glob("*.layout"))}

# small specs keep each example fast; the big ones add pipelines and GQA
SEED_NAMES = ["gpt2-small.layout", "llama2-7b.layout", "mixtral-moe.layout"]

# Tokens the language uses, so mutations produce near-miss programs rather than noise.
VOCAB = [
    *"{}[](),=:+-*/%#\n",
    "..",
    '"x"',
    "tensor",
    "frozen",
    "buffer",
    "mesh",
    "let",
    "for",
    "in",
    "group",
    "stage",
    "tie",
    "zero",
    "over",
    "pad",
    "cdiv",
    "store",
    "offload",
    "optimizer",
    "0",
    "1",
    "3",
    "1MiB",
    "1e3",
    "tp",
    "dp",
    "pp",
    "{i}",
    "{i +}",
    "q:",
    "bf16",
]

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

_TOKEN = re.compile(r"\s+|[A-Za-z_0-9.{}]+|\S")


def assert_clean(text: str) -> None:
    """``load_text`` gives a Layout or a LayoutError that renders; anything else fails."""
    try:
        layout = load_text(text, "fuzz.layout")
    except LayoutError as e:
        assert e.diagnostics, "a LayoutError must carry at least one diagnostic"
        for d in e.diagnostics:
            assert re.fullmatch(r"E\d{3}", d.code), d
            rendered = d.render(text)
            assert f"error[{d.code}]" in rendered
            assert d.message in rendered
        assert e.render()
        str(e)
    else:
        assert isinstance(layout, Layout)
        layout.to_dict()


# A mutation is (kind, position, position, token), applied to characters or to tokens.
mutation = st.tuples(
    st.sampled_from(["delete", "duplicate", "swap", "insert", "replace"]),
    st.floats(0, 1, exclude_max=True),
    st.floats(0, 1, exclude_max=True),
    st.sampled_from(VOCAB),
)


def mutate(items: list[str], edits: list[tuple[str, float, float, str]]) -> list[str]:
    items = list(items)
    for kind, a, b, token in edits:
        if not items:
            items.append(token)
            continue
        i, j = int(a * len(items)), int(b * len(items))
        if kind == "delete":
            del items[i]
        elif kind == "duplicate":
            items.insert(i, items[i])
        elif kind == "swap":
            items[i], items[j] = items[j], items[i]
        elif kind == "insert":
            items.insert(i, token)
        else:
            items[i] = token
    return items


@SETTINGS
@given(st.text(alphabet=string.printable, max_size=200))
def test_random_printable_text_never_raises_anything_but_layout_error(text: str) -> None:
    assert_clean(text)


@SETTINGS
@given(
    st.lists(st.sampled_from([*VOCAB, " ", " ", "\n", "a", "w", "layers"]), max_size=60).map(
        " ".join
    )
)
def test_random_token_soup_never_raises_anything_but_layout_error(text: str) -> None:
    assert_clean(text)


@pytest.mark.parametrize("seed", SEED_NAMES)
@SETTINGS
@given(edits=st.lists(mutation, min_size=1, max_size=4))
def test_character_mutations_of_a_spec_never_raise_anything_but_layout_error(
    seed: str, edits: list[tuple[str, float, float, str]]
) -> None:
    assert_clean("".join(mutate(list(SEEDS[seed]), edits)))


@pytest.mark.parametrize("seed", SEED_NAMES)
@SETTINGS
@given(edits=st.lists(mutation, min_size=1, max_size=4))
def test_token_mutations_of_a_spec_never_raise_anything_but_layout_error(
    seed: str, edits: list[tuple[str, float, float, str]]
) -> None:
    assert_clean("".join(mutate(_TOKEN.findall(SEEDS[seed]), edits)))


@SETTINGS
@given(
    seed=st.sampled_from(SEED_NAMES),
    edits=st.lists(mutation, min_size=1, max_size=3),
    by_token=st.booleans(),
)
def test_fmt_round_trips_every_mutation_that_still_parses(
    seed: str, edits: list[tuple[str, float, float, str]], by_token: bool
) -> None:
    items = _TOKEN.findall(SEEDS[seed]) if by_token else list(SEEDS[seed])
    text = "".join(mutate(items, edits))
    try:
        tree = parse(text)
    except LayoutError:
        return
    out = fmt(tree)
    assert parse(out) == tree
    assert fmt(parse(out)) == out
    for comment in tree.comments:
        assert comment.text in out


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n\n",
        "# only a comment",
        "layout",
        "mesh {",
        "mesh { dp = 2 } tensor a.{} [1]",
        "mesh { dp = 2 } tensor a.{i +} [1]",
        "mesh { dp = 2 } tensor a [min()]",
        "mesh { dp = 2 } tensor a [pad((1, 2), 2) / dp]",
        "mesh { dp = 2 } tensor a [(q: 1) * 2]",
        "mesh { dp = 2 } zero (1, 2) over dp",
        "mesh { dp = 2 } store deepspeed { writers (a: 1) }",
        "mesh { dp = 2 } for i in (1, 2)..3 { }",
        'mesh { dp = 2 } offload optimizer to nvme "/x" { block "1" }',
        "mesh { dp = 2 } tensor a [1] stage (q: 1)",
        "mesh { dp = 0 } tensor a [4 / dp]",
        "mesh { dp = 2 } tensor a [4 / (dp, dp, xx)]",
        "let dp = 2 mesh { dp = 2 } tensor a [4 / dp]",
        "mesh { pp = 0 } pipeline over pp tensor a [1] stage 0",
        "mesh { dp = 2 }\r\ntensor a [3 / dp]\r\n",
        "mesh { dp = 2 }\ttensor\ta\t[3 / dp]",
        "mesh { dp = 2 }\u00a0tensor a [1]",
    ],
)
def test_known_awkward_inputs_raise_layout_error_or_check(text: str) -> None:
    assert_clean(text)
