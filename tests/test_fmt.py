"""``layoutc fmt``: canonical text that means the same thing and keeps every comment.

Properties, over the shipped specs and over random *valid* layouts built token by token
(with comments and blank lines dropped between any two tokens):

* ``fmt`` is idempotent: formatting formatted text changes nothing;
* ``parse(fmt(x)) == parse(x)``: the syntax tree survives (spans aside);
* ``load_text(fmt(x))`` checks to the same Layout as ``load_text(x)``;
* every comment of the input appears in the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from layoutc import load_text
from layoutc.errors import LayoutError
from layoutc.ir import DTYPES, FORMATS
from layoutc.lang.fmt import fmt
from layoutc.lang.parse import parse

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.layout"))


def formatted(text: str) -> str:
    return fmt(parse(text))


def comments_of(text: str) -> list[str]:
    """The comments a generated layout holds (the generator writes them as ``# cN ...``)."""
    out = []
    for line in text.splitlines():
        at = line.find("# c")
        if at >= 0:
            out.append(line[at:].rstrip())
    return out


def assert_round_trips(text: str, comments: list[str]) -> str:
    once = formatted(text)
    assert formatted(once) == once, "fmt is not idempotent"
    assert parse(once) == parse(text), "fmt changed the syntax tree"
    assert load_text(once).to_dict() == load_text(text).to_dict(), "fmt changed the layout"
    for c in comments:
        assert c in once, f"fmt lost the comment {c!r}"
    assert once.endswith("\n") and not once.endswith("\n\n")
    assert all(line == line.rstrip() for line in once.splitlines()), "trailing whitespace"
    return once


# ---------------------------------------------------------------- specs and examples


@pytest.mark.parametrize("spec", SPECS, ids=[p.name for p in SPECS])
def test_every_spec_is_already_canonical_and_round_trips(spec: Path) -> None:
    text = spec.read_text(encoding="utf-8")
    assert formatted(text) == text
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("#")]
    assert_round_trips(text, lines)


@pytest.mark.parametrize("spec", SPECS, ids=[p.name for p in SPECS])
def test_a_spec_squashed_onto_few_lines_formats_back_to_the_same_tree(spec: Path) -> None:
    text = spec.read_text(encoding="utf-8")
    code = "\n".join(line.split("#")[0] for line in text.splitlines())
    squashed = " ".join(code.split())  # one line: the language is free-form
    assert parse(formatted(squashed)) == parse(text)
    assert load_text(formatted(squashed)).to_dict() == load_text(text).to_dict()


def test_messy_text_gets_canonical_spacing_indentation_and_blank_lines() -> None:
    text = (
        "layout   x   # head\n"
        "mesh{dp=2,tp=2}\n"
        "let  A=1,B = A*2 # b\n"
        "\n\n\n"
        "tensor   w [ 4/tp , 2 ]   bf16\n"
        "for i in 0..2{tensor l.{i+1}.w[2*(3+i)]}\n"
        "group g{ tie a = w }\n"
        'store safetensors{writers 2,tag "a#b"}\n'
    )
    assert formatted(text) == (
        "layout x  # head\n"
        "mesh { dp = 2, tp = 2 }\n"
        "let A = 1, B = A * 2  # b\n"
        "\n"
        "tensor w [4 / tp, 2] bf16\n"
        "for i in 0..2 {\n"
        "  tensor l.{i + 1}.w [2 * (3 + i)]\n"
        "}\n"
        "group g {\n"
        "  tie a = w\n"
        "}\n"
        'store safetensors { writers 2, tag "a#b" }\n'
    )


def test_literals_keep_their_spelling() -> None:
    text = "mesh { dp = 1_0 }\nlet A = 1MiB, B = 1e9, C = 1.5GB, D = 007\n"
    assert formatted(text) == text


def test_parentheses_are_kept_as_written() -> None:
    text = "mesh { dp = 2 }\nlet A = (1 + 2) * 3, B = ((4)), C = -(A - B), D = 2 - (3 - 4)\n"
    assert formatted(text) == text


def test_a_comment_inside_a_multi_line_statement_survives() -> None:
    text = (
        "mesh { dp = 2 }\n"
        "tensor w [4,  # rows\n"
        "  8]  # cols\n"
        "store deepspeed {\n"
        "  writers 2,  # two\n"
        '  tag "x"\n'
        "}\n"
    )
    out = assert_round_trips(text, ["# rows", "# cols", "# two"])
    assert "tensor w [4, 8]" in out


def test_a_multi_line_let_keeps_one_binding_per_line_with_its_comment() -> None:
    text = "mesh { dp = 2 }\n\nlet L = 12,  # layers\n    E = 768  # width\n"
    assert formatted(text) == text


def test_trailing_comment_at_end_of_file_without_newline_survives() -> None:
    assert_round_trips("mesh { dp = 2 }  # c1", ["# c1"])


def test_comment_only_file_formats_to_its_comments() -> None:
    assert formatted("# c1\n\n\n# c2") == "# c1\n\n# c2\n"


# ---------------------------------------------------------------- random valid layouts


_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2, "%": 2}


@dataclass(frozen=True)
class E:
    """An expression: its text and its value (None where a loop variable makes it vary)."""

    text: str
    value: int | None
    prec: int = 3  # 3 = atom


def binop(op: str, a: E, b: E) -> E:
    p = _PRECEDENCE[op]
    left = a.text if a.prec >= p else f"({a.text})"
    right = b.text if b.prec > p else f"({b.text})"
    value = None
    if a.value is not None and b.value is not None:
        value = {
            "+": a.value + b.value,
            "-": a.value - b.value,
            "*": a.value * b.value,
            "/": a.value // b.value if b.value else None,
            "%": a.value % b.value if b.value else None,
        }[op]
    return E(f"{left} {op} {right}", value, p)


INT_SPELLINGS = {10: ["10", "1_0"], 1000: ["1000", "1_000", "1e3", "1KB"], 1024: ["1KiB"]}


@st.composite
def positive(draw: st.DrawFn, env: dict[str, int], depth: int = 2) -> E:
    """A positive expression over ``env`` (names bound to positive values)."""
    choice = draw(st.integers(0, 9 if depth > 0 else 2))
    if choice == 0 and env:
        name = draw(st.sampled_from(sorted(env)))
        return E(name, env[name])
    if choice == 1:
        v = draw(st.sampled_from(sorted(INT_SPELLINGS)))
        return E(draw(st.sampled_from(INT_SPELLINGS[v])), v)
    if choice <= 2:
        v = draw(st.integers(1, 12))
        return E(str(v), v)
    a = draw(positive(env, depth - 1))
    b = draw(positive(env, depth - 1))
    assert a.value is not None and b.value is not None
    if choice == 3:
        return binop("+", a, b)
    if choice == 4:
        return binop("*", a, b)
    if choice == 5:
        fn = draw(st.sampled_from(["min", "max", "cdiv"]))
        return E(
            f"{fn}({a.text}, {b.text})",
            {"min": min, "max": max}.get(fn, lambda x, y: -(-x // y))(a.value, b.value),
        )
    if choice == 6:
        return binop("+", binop("%", a, b), E("1", 1))
    if choice == 7:
        return binop("+", binop("/", a, b), E("1", 1))
    if choice == 8 and a.value > b.value:
        return binop("-", a, b)
    return E(f"({a.text})", a.value)


@dataclass
class Gen:
    """What the generator has declared so far."""

    axes: dict[str, int]
    split_axes: list[str]
    pipeline: str | None
    lets: dict[str, int] = field(default_factory=dict)
    counter: int = 0
    top_names: list[str] = field(default_factory=list)

    def fresh(self) -> int:
        self.counter += 1
        return self.counter


Tokens = list[tuple[str, bool]]  # (token, starts a statement)


def stmt(*tokens: str) -> Tokens:
    return [(t, i == 0) for i, t in enumerate(tokens)]


@st.composite
def dim(draw: st.DrawFn, g: Gen, free: list[str], loop_vars: list[str]) -> str:
    env = {**g.axes, **g.lets}
    kinds = ["plain", "plain"] + (["split", "pad", "fused", "two"] if free else []) + ["padonly"]
    if loop_vars:
        kinds.append("loopvar")
    kind = draw(st.sampled_from(kinds))
    if kind == "loopvar":
        return f"{draw(st.sampled_from(loop_vars))} + {draw(st.integers(1, 3))}"
    if kind == "plain":
        e = draw(positive({k: v for k, v in env.items() if k in g.lets}))
        return f"{e.value} = {e.text}" if draw(st.booleans()) and e.prec > 0 else e.text
    if kind == "padonly":
        return f"pad({draw(st.integers(1, 20))}, {draw(st.integers(1, 8))})"
    if kind == "two" and len(free) >= 2:
        a, b = draw(st.permutations(free))[:2]
        free.remove(a)
        free.remove(b)
        n = g.axes[a] * g.axes[b] * draw(st.integers(1, 3))
        return f"{n} / ({a}, {b})"
    axis = draw(st.sampled_from(free))
    free.remove(axis)
    size = g.axes[axis]
    if kind == "pad":
        mult = draw(st.sampled_from([f"{draw(st.integers(1, 3))} * {axis}", str(size * 2)]))
        return f"pad({draw(st.integers(1, 20))}, {mult}) / {axis}"
    if kind == "fused":
        sizes = [size * draw(st.integers(1, 3)) for _ in range(draw(st.integers(2, 3)))]
        named = draw(st.booleans())
        items = [f"b{k}: {s}" if named else str(s) for k, s in enumerate(sizes)]
        text = f"({', '.join(items)}) / {axis}"
        return f"{sum(sizes)} = {text}" if draw(st.booleans()) else text
    # split: a multiple of the axis size, written as a literal or as `k * axis`
    k = draw(st.integers(1, 4))
    return draw(st.sampled_from([f"{k * size} / {axis}", f"{k} * {axis} / {axis}"]))


@st.composite
def entry(draw: st.DrawFn, g: Gen, loop_vars: list[str], staged: bool) -> Tokens:
    n = g.fresh()
    templates = [
        draw(st.sampled_from([f"{{{v}}}", f"{{{v} + 1}}", f"{{2 * {v}}}", f"{{{v} * 3 + 1}}"]))
        for v in loop_vars
    ]
    parts = [f"t{n}", *templates]
    if draw(st.booleans()):
        parts.append(draw(st.sampled_from(["weight", "bias", "0"])))
    name = ".".join(parts)
    free = list(g.split_axes)
    shape = [draw(dim(g, free, loop_vars)) for _ in range(draw(st.integers(0, 3)))]
    kind = draw(st.sampled_from(["tensor", "tensor", "tensor", "frozen", "buffer"]))
    tokens = [kind, name, "[", *_commas(shape), "]"]
    if draw(st.booleans()):
        tokens.append(draw(st.sampled_from(DTYPES)))
    if g.pipeline and not staged and draw(st.booleans()):
        size = g.axes[g.pipeline]
        tokens += ["stage", draw(st.sampled_from([str(size - 1), f"{g.pipeline} - 1", "0"]))]
    out = stmt(*tokens)
    if not loop_vars:
        g.top_names.append(name)
    elif draw(st.integers(0, 3)) == 0:  # tie an alias with the same templates
        out += stmt("tie", "a" + name, "=", name)
    return out


def _commas(items: list[str]) -> list[str]:
    out: list[str] = []
    for i, it in enumerate(items):
        out.append(it + ("," if i < len(items) - 1 else ""))
    return out


@st.composite
def body_item(draw: st.DrawFn, g: Gen, loop_vars: list[str], depth: int, staged: bool) -> Tokens:
    kind = draw(st.sampled_from(["entry", "entry", "entry"] + (["loop", "group"] if depth else [])))
    if kind == "entry":
        return draw(entry(g, loop_vars, staged))
    stage: list[str] = []
    if g.pipeline and draw(st.booleans()):
        pp = g.pipeline
        stage = ["stage", f"{loop_vars[-1]} % {pp}" if loop_vars else f"{pp} - 1"]
    if kind == "group":
        head = ["group", draw(st.sampled_from(["no_decay", "g1", "experts"])), *stage, "{"]
        vars_ = loop_vars
    else:
        var = "ijk"[len(loop_vars)]
        lo = draw(st.integers(0, 2))
        hi = draw(st.sampled_from([str(lo + draw(st.integers(1, 3))), f"{lo} + 2"]))
        if not stage and g.pipeline and draw(st.booleans()):
            stage = ["stage", f"{var} % {g.pipeline}"]
        head = ["for", var, "in", f"{lo}..{hi}", *stage, "{"]
        vars_ = [*loop_vars, var]
    out = stmt(*head)
    for _ in range(draw(st.integers(1, 3))):
        out += draw(body_item(g, vars_, depth - 1, staged or bool(stage)))
    out.append(("}", True))
    return out


@st.composite
def layout_texts(draw: st.DrawFn) -> str:
    names = draw(st.permutations(["dp", "tp", "sp", "ep", "pp"]))[: draw(st.integers(1, 3))]
    axes = {a: draw(st.integers(1, 4)) for a in names}
    pipeline = draw(st.sampled_from([None, *names]))
    rest = [a for a in names if a != pipeline]
    zero_axes = [a for a in rest if draw(st.booleans())]
    g = Gen(axes, [a for a in rest if a not in zero_axes], pipeline)

    statements: list[Tokens] = []
    if draw(st.booleans()):
        statements.append(stmt("layout", draw(st.sampled_from(["x", "llama_tiny", "g2"]))))
    mesh = ["mesh", "{", *_commas([f"{a} = {s}" for a, s in axes.items()])]
    if draw(st.booleans()):
        mesh[-1] += ","  # a trailing comma is allowed
    statements.append(stmt(*mesh, "}"))
    for _ in range(draw(st.integers(0, 2))):
        bindings = []
        for _ in range(draw(st.integers(1, 3))):
            name = f"C{g.fresh()}"
            e = draw(positive({**g.lets, **axes}))
            assert e.value is not None
            if draw(st.integers(0, 4)) == 0:  # a negative constant, never used in a dim
                neg = E(f"-{e.text}" if e.prec == 3 else f"-({e.text})", -e.value)
                e = draw(st.sampled_from([neg, binop("-", E("0", 0), e)]))
                bindings.append(f"{name} = {e.text}")
                continue
            bindings.append(f"{name} = {e.text}")
            g.lets[name] = e.value
        statements.append(stmt("let", *_commas(bindings)))

    others: list[Tokens] = []
    dtype = draw(st.sampled_from([None, "bf16", "fp16", "fp32"]))
    if dtype:
        others.append(stmt("dtype", dtype))
    if pipeline:
        others.append(stmt("pipeline", "over", pipeline))
    if draw(st.booleans()):
        name = draw(st.sampled_from(["adam", "adamw", "lamb", "adagrad", "sgd", "lion"]))
        opts = []
        if name == "lion" or draw(st.booleans()):
            opts.append(draw(st.sampled_from(["states (m, v)", "states m", "states (m)"])))
        if draw(st.booleans()):
            opts.append(draw(st.sampled_from(["master fp32", "master bf16", "master none"])))
        if draw(st.booleans()):
            opts.append(draw(st.sampled_from(["step", "no_step"])))
        others.append(stmt("optimizer", name, *(["{", *_commas(opts), "}"] if opts else [])))
    if zero_axes:
        stage = draw(st.integers(0, 3))
        over = zero_axes[0] if len(zero_axes) == 1 else "(" + ", ".join(zero_axes) + ")"
        opts = []
        if stage == 3 and draw(st.booleans()):
            opts.append(draw(st.sampled_from(["sub_group 1e8", "sub_group 1000"])))
        if stage in (1, 2) and draw(st.booleans()):
            opts.append("round_robin")
        if stage <= 1 and dtype == "bf16" and draw(st.booleans()):
            opts.append("bf16_optimizer")
        others.append(
            stmt("zero", str(stage), "over", over, *(["{", *_commas(opts), "}"] if opts else []))
        )
    elif draw(st.booleans()):
        others.append(stmt("zero", "0"))
    for what in draw(st.sets(st.sampled_from(["optimizer", "params"]))):
        if draw(st.booleans()):
            others.append(stmt("offload", what, "to", "cpu"))
        else:
            opts = draw(st.sampled_from([[], ["{", "block 1MiB,", "queue 4,", "threads 2", "}"]]))
            others.append(stmt("offload", what, "to", "nvme", '"/local_nvme"', *opts))
    if draw(st.booleans()):
        opts = draw(
            st.lists(
                st.sampled_from(
                    ["writers 4", 'tag "global_step100"', 'tag "run#1"', "max_shard 2GB"]
                ),
                unique_by=lambda o: o.split()[0],
                max_size=3,
            )
        )
        others.append(
            stmt(
                "store",
                draw(st.sampled_from(FORMATS)),
                *(["{", *_commas(opts), "}"] if opts else []),
            )
        )

    body = [draw(body_item(g, [], 2, False)) for _ in range(draw(st.integers(1, 5)))]
    ties = []
    for source in g.top_names[:2]:
        if draw(st.booleans()):
            ties.append(stmt("tie", f"alias.{source}", "=", source))
    rest_statements = draw(st.permutations(others + body + ties))
    statements += rest_statements

    tokens = [tok for s in statements for tok in s]
    return _join(draw, tokens)


def _join(draw: st.DrawFn, tokens: Tokens) -> str:
    """Glue tokens with random whitespace, comments and blank lines."""
    n = 0

    def comment() -> str:
        nonlocal n
        n += 1
        return f"# c{n} " + draw(st.sampled_from(["note", "{ [ ( ,", 'a "quoted" word', "x#y"]))

    inside = st.sampled_from([" ", " ", " ", " ", "\n", "\n  ", "C", "\n\n"])
    between = st.sampled_from(["\n", "\n", "\n", " ", "\n\n", "\n\n\n", "C", "N"])
    out = []
    if draw(st.booleans()):
        out.append(comment() + "\n")
    for i, (tok, starts) in enumerate(tokens):
        if i:
            sep = draw(between if starts else inside)
            if sep == "C":
                sep = "  " + comment() + "\n"
            elif sep == "N":
                sep = "\n" + comment() + "\n"
            out.append(sep)
        out.append(tok)
    if draw(st.booleans()):
        out.append("  " + comment())  # a trailing comment, maybe without a newline
    if draw(st.booleans()):
        out.append("\n")
    return "".join(out)


FMT_SETTINGS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FMT_SETTINGS
@given(layout_texts())
def test_the_generator_makes_valid_layouts(text: str) -> None:
    try:
        layout = load_text(text)
    except LayoutError as e:  # dims the generator multiplied past 2**53 elements: not its aim
        assume(set(e.codes) != {"E139"})
        raise
    assert layout.mesh.world >= 1


@FMT_SETTINGS
@given(layout_texts())
def test_fmt_round_trips_random_layouts_and_keeps_their_comments(text: str) -> None:
    assert_round_trips(text, comments_of(text))
