"""The layout language end to end: text in, checked IR facts out.

Every construct of docs/language.md is written once and the resulting
:class:`~layoutc.ir.Layout` is asserted fact by fact: mesh sizes and rank order, constants
and expressions (seen through name templates, which print an expression's value, and
through dims), loops, groups, stages, kinds, dtypes, ties and the file-level statements.
The geometry of a split dim (``Dim.segments``) is checked against a brute-force model over
random blocks, paddings and splits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layoutc import LayoutError, ir, load_layout, load_text

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.layout"))


def names(layout: ir.Layout) -> list[str]:
    return [t.name for t in layout.tensors]


OFFSET = 10**15  # keeps a dim positive whatever the sign of the expression


def value_of(expression: str, prelude: str = "mesh { dp = 2 }") -> int:
    """The value of an expression, read back from the size of a dim ``[(expr) + OFFSET]``."""
    layout = load_text(f"{prelude}\ntensor v [({expression}) + {OFFSET}]")
    (tensor,) = layout.tensors
    return tensor.shape[0] - OFFSET


# ---------------------------------------------------------------- mesh


def test_mesh_lists_axes_slowest_to_fastest_with_their_sizes() -> None:
    mesh = load_text("mesh { pp = 2, dp = 4, tp = 2 }").mesh
    assert mesh.names == ("pp", "dp", "tp")
    assert mesh.sizes == {"pp": 2, "dp": 4, "tp": 2}
    assert mesh.world == 16
    assert mesh.to_dict() == {"pp": 2, "dp": 4, "tp": 2}


def test_rank_13_of_a_2_4_2_mesh_is_pp_1_dp_2_tp_1_as_the_docs_say() -> None:
    mesh = load_text("mesh { pp = 2, dp = 4, tp = 2 }").mesh
    assert mesh.coords(13) == {"pp": 1, "dp": 2, "tp": 1}
    assert mesh.rank({"pp": 1, "dp": 2, "tp": 1}) == 13
    # the two tp ranks of one (pp, dp) pair are neighbours
    assert mesh.rank({"pp": 1, "dp": 2, "tp": 0}) == 12


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=3))
def test_ranks_enumerate_coordinates_in_row_major_order(sizes: list[int]) -> None:
    axes = [f"a{k}" for k in range(len(sizes))]
    text = "mesh { " + ", ".join(f"{a} = {s}" for a, s in zip(axes, sizes, strict=True)) + " }"
    mesh = load_text(text).mesh
    every = list(product(*(range(s) for s in sizes)))  # last axis fastest
    assert len(every) == mesh.world
    for rank, coords in enumerate(every):
        as_dict = dict(zip(axes, coords, strict=True))
        assert mesh.rank(as_dict) == rank
        assert mesh.coords(rank) == as_dict


def test_axis_sizes_may_use_constants_defined_above_the_mesh_and_a_trailing_comma() -> None:
    mesh = load_text("let DP = 1024\nmesh { pp = 8, dp = DP, tp = 8, }").mesh
    assert mesh.sizes == {"pp": 8, "dp": 1024, "tp": 8}
    assert mesh.world == 65_536


def test_an_axis_name_is_also_a_constant_for_its_size() -> None:
    assert value_of("128 * tp", "mesh { tp = 4 }") == 512


# ---------------------------------------------------------------- let and expressions


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("7 / 2", 3),
        ("-7 / 2", -4),  # floor division rounds toward minus infinity
        ("-7 % 2", 1),  # % takes the sign of the divisor
        ("7 % -2", -1),
        ("2 * 3 + 4", 10),
        ("2 * (3 + 4)", 14),
        ("2 + 3 * 4", 14),
        ("10 - 3 - 2", 5),  # left associative
        ("2 * 64 / 4", 32),  # (2 * 64) / 4
        ("64 / 4 * 2", 32),
        ("-(3 + 4)", -7),
        ("- -3", 3),
        ("min(3, 1, 2)", 1),
        ("max(3, 9)", 9),
        ("min(5)", 5),
        ("cdiv(10, 3)", 4),
        ("cdiv(9, 3)", 3),
        ("1_000", 1000),
        ("1_000_000", 10**6),
        ("1KB", 10**3),
        ("1MiB", 2**20),
        ("5GB", 5 * 10**9),
        ("2GiB", 2 * 2**30),
        ("1TiB", 2**40),
        ("1e9", 10**9),
        ("1.5GB", 1_500_000_000),
        ("1.55e1", 15),  # a fractional size is rounded down
        ("5GB / 2", 2_500_000_000),
    ],
)
def test_expressions_evaluate_as_documented(expression: str, expected: int) -> None:
    assert value_of(expression) == expected


def test_let_constants_are_evaluated_in_order_and_may_use_earlier_ones() -> None:
    prelude = "mesh { dp = 8 }\nlet L = 32, H = 4096, F = 11008\nlet FF = 4 * H, G = FF / L"
    assert value_of("FF", prelude) == 16384
    assert value_of("G", prelude) == 512


def test_entries_may_use_a_constant_defined_further_down() -> None:
    layout = load_text("mesh { dp = 2 }\ntensor w [H]\nlet H = 64")
    assert layout.tensor("w").shape == (64,)


# ---------------------------------------------------------------- templates and loops


def test_templates_fill_in_expressions_and_may_mix_text() -> None:
    layout = load_text(
        "mesh { pp = 2, dp = 4 }\npipeline over pp\nlet L = 4\n"
        "for i in 0..L stage i * pp / L {\n"
        "  tensor {i + 1}.attn.weight [64, 64]\n"
        "  tensor blocks.{i}.mlp{2 * i}.weight [64, 64]\n"
        "}\n"
        "tensor {L + 1}.norm.weight [64] stage pp - 1\n"
    )
    assert names(layout) == [
        "1.attn.weight",
        "blocks.0.mlp0.weight",
        "2.attn.weight",
        "blocks.1.mlp2.weight",
        "3.attn.weight",
        "blocks.2.mlp4.weight",
        "4.attn.weight",
        "blocks.3.mlp6.weight",
        "5.norm.weight",
    ]
    assert [t.stage for t in layout.tensors] == [0, 0, 0, 0, 1, 1, 1, 1, 1]


def test_loops_are_half_open() -> None:
    layout = load_text("mesh { dp = 2 }\nfor i in 2..5 { tensor l.{i} [1] }")
    assert names(layout) == ["l.2", "l.3", "l.4"]


def test_loop_bounds_are_expressions() -> None:
    layout = load_text("mesh { dp = 2 }\nlet L = 3\nfor i in L - 2..L * 2 - 3 { tensor l.{i} [1] }")
    assert names(layout) == ["l.1", "l.2"]


def test_nested_loops_unroll_outer_major_and_the_inner_body_sees_both_variables() -> None:
    layout = load_text(
        "mesh { dp = 2 }\n"
        "for i in 0..2 {\n"
        "  for j in 0..3 { tensor l.{i}.{j} [i + 1, j + 1] }\n"
        "  tensor l.{i}.norm [4]\n"
        "}\n"
    )
    assert names(layout) == [
        "l.0.0",
        "l.0.1",
        "l.0.2",
        "l.0.norm",
        "l.1.0",
        "l.1.1",
        "l.1.2",
        "l.1.norm",
    ]
    assert layout.tensor("l.1.2").shape == (2, 3)


def test_a_loop_variable_exists_only_inside_its_body() -> None:
    with pytest.raises(LayoutError) as e:
        load_text("mesh { dp = 2 }\nfor i in 0..2 { tensor l.{i} [1] }\ntensor after.{i} [1]")
    assert e.value.codes == ["E110"]


def test_two_sibling_loops_may_reuse_a_variable_name() -> None:
    layout = load_text(
        "mesh { dp = 2 }\nfor i in 0..2 { tensor a.{i} [1] }\nfor i in 0..2 { tensor b.{i} [1] }"
    )
    assert names(layout) == ["a.0", "a.1", "b.0", "b.1"]


def test_ties_may_use_templates_inside_loops() -> None:
    layout = load_text(
        "mesh { dp = 2 }\n"
        "for i in 0..2 {\n"
        "  tensor enc.{i}.embed [1000, 64]\n"
        "  tie dec.{i}.embed = enc.{i}.embed\n"
        "}\n"
    )
    assert layout.ties == (("dec.0.embed", "enc.0.embed"), ("dec.1.embed", "enc.1.embed"))
    assert layout.tie_source["dec.1.embed"] == "enc.1.embed"


# ---------------------------------------------------------------- stages


PIPE = "mesh { pp = 4, dp = 2 }\npipeline over pp\n"


def test_a_loop_stage_is_evaluated_per_iteration() -> None:
    layout = load_text(PIPE + "let L = 32\nfor i in 0..L stage i * pp / L { tensor l.{i}.w [4] }")
    assert layout.pipeline == "pp"
    assert layout.stages == 4
    assert [t.stage for t in layout.tensors] == [i * 4 // 32 for i in range(32)]


def test_an_entry_stage_overrides_the_loop_stage_which_overrides_the_default() -> None:
    layout = load_text(
        PIPE
        + "tensor first [4]\n"
        + "for i in 0..2 stage 2 {\n"
        + "  tensor l.{i}.a [4]\n"
        + "  tensor l.{i}.b [4] stage 3\n"
        + "}\n"
    )
    stages = {t.name: t.stage for t in layout.tensors}
    assert stages == {"first": 0, "l.0.a": 2, "l.0.b": 3, "l.1.a": 2, "l.1.b": 3}


def test_a_group_stage_applies_to_its_body_and_an_inner_loop_stage_wins() -> None:
    layout = load_text(
        PIPE
        + "group g stage 1 {\n"
        + "  tensor a [4]\n"
        + "  for i in 0..2 stage 3 { tensor l.{i} [4] }\n"
        + "  tensor b [4] stage 2\n"
        + "}\n"
    )
    assert {t.name: t.stage for t in layout.tensors} == {"a": 1, "l.0": 3, "l.1": 3, "b": 2}


# ---------------------------------------------------------------- groups


def test_groups_are_numbered_by_first_appearance_and_reopening_joins_the_same_group() -> None:
    layout = load_text(
        "mesh { dp = 8 }\nlet L = 2, E = 768\n"
        "tensor wte.weight [50257, E]\n"
        "for i in 0..L {\n"
        "  group no_decay {\n"
        "    tensor h.{i}.ln_1.weight [E]\n"
        "    tensor h.{i}.ln_1.bias [E]\n"
        "  }\n"
        "  tensor h.{i}.attn.c_attn.weight [E, 2304 = (q: E, k: E, v: E)]\n"
        "  group no_decay { tensor h.{i}.attn.c_attn.bias [2304 = (q: E, k: E, v: E)] }\n"
        "}\n"
    )
    assert layout.groups == ("default", "no_decay")
    by_group: dict[str, list[str]] = {}
    for t in layout.tensors:
        by_group.setdefault(t.group, []).append(t.name)
    assert by_group["default"] == [
        "wte.weight",
        "h.0.attn.c_attn.weight",
        "h.1.attn.c_attn.weight",
    ]
    assert by_group["no_decay"] == [
        "h.0.ln_1.weight",
        "h.0.ln_1.bias",
        "h.0.attn.c_attn.bias",
        "h.1.ln_1.weight",
        "h.1.ln_1.bias",
        "h.1.attn.c_attn.bias",
    ]


def test_default_counts_from_its_first_entry_and_the_innermost_group_wins() -> None:
    layout = load_text(
        "mesh { dp = 2 }\n"
        "group a { tensor x [1] group b { tensor y [1] } tensor z [1] }\n"
        "tensor w [1]\n"
    )
    assert layout.groups == ("a", "b", "default")
    assert {t.name: t.group for t in layout.tensors} == {
        "x": "a",
        "y": "b",
        "z": "a",
        "w": "default",
    }


def test_a_layout_without_groups_has_only_the_default_group() -> None:
    assert load_text("mesh { dp = 2 }").groups == ("default",)


# ---------------------------------------------------------------- entries


def test_kinds_dtypes_and_per_entry_attributes() -> None:
    layout = load_text(
        "mesh { pp = 2, dp = 4 }\npipeline over pp\ndtype bf16\n"
        "tensor model.norm.weight [4096] stage 1\n"
        "tensor model.router.weight [8, 4096] fp32\n"
        "buffer model.position_ids [1, 2048] int64\n"
        "frozen model.rotary.inv_freq [64] fp32 stage 0\n"
        "tensor scalar []\n"
    )
    t = layout.by_name
    assert layout.dtype == "bf16"
    assert (t["model.norm.weight"].kind, t["model.norm.weight"].dtype) == (ir.PARAM, "bf16")
    assert t["model.norm.weight"].stage == 1
    assert t["model.router.weight"].dtype == "fp32"
    assert (t["model.position_ids"].kind, t["model.position_ids"].dtype) == (ir.BUFFER, "int64")
    assert t["model.rotary.inv_freq"].kind == ir.FROZEN
    assert not t["model.rotary.inv_freq"].trainable
    assert not t["model.position_ids"].trainable
    assert t["model.norm.weight"].trainable
    assert t["scalar"].shape == ()
    assert [p.name for p in layout.params()] == [
        "model.norm.weight",
        "model.router.weight",
        "scalar",
    ]


def test_entry_attributes_come_in_either_order() -> None:
    text = "mesh { pp = 2 }\npipeline over pp\ntensor a [4] fp16 stage 1\ntensor b [4] stage 1 fp16"
    layout = load_text(text)
    assert [(t.dtype, t.stage) for t in layout.tensors] == [("fp16", 1), ("fp16", 1)]


def test_the_file_dtype_defaults_to_fp32_and_applies_to_entries_above_it() -> None:
    assert load_text("mesh { dp = 2 }\ntensor w [1]").tensor("w").dtype == "fp32"
    layout = load_text("mesh { dp = 2 }\ntensor w [1]\ndtype bf16")
    assert layout.dtype == "bf16"
    assert layout.tensor("w").dtype == "bf16"


def test_keywords_are_not_reserved_outside_their_places() -> None:
    layout = load_text("mesh { dp = 2 }\nlet over = 3\ntensor layers.0.stage [over]")
    assert layout.tensor("layers.0.stage").shape == (3,)


def test_the_layout_name_comes_from_the_header_or_else_the_file_name(tmp_path: Path) -> None:
    assert load_text("layout llama_tiny\nmesh { dp = 2 }").name == "llama_tiny"
    path = tmp_path / "my-job.layout"
    path.write_text("mesh { dp = 2 }\n", encoding="utf-8")
    assert load_layout(path).name == "my-job"


# ---------------------------------------------------------------- dims


def test_dims_split_pad_and_fuse_to_the_documented_logical_and_local_shapes() -> None:
    layout = load_text(
        "mesh { tp = 4 }\nlet V = 32000, H = 4096, NQ = 32, NKV = 8, D = 128\n"
        "tensor embed.weight [pad(V, 128 * tp) / tp, H]\n"
        "tensor qkv.weight [6144 = (q: NQ * D, k: NKV * D, v: NKV * D) / tp, H]\n"
        "tensor o_proj.weight [H, NQ * D / tp]\n"
        "tensor norm.weight [H]\n"
    )
    t = layout.by_name
    assert t["embed.weight"].shape == (32000, 4096)
    assert t["embed.weight"].padded_shape == (32256, 4096)
    assert t["embed.weight"].local_shape == (8064, 4096)
    assert t["qkv.weight"].shape == (6144, 4096)
    assert t["qkv.weight"].local_shape == (1536, 4096)
    assert [b.name for b in t["qkv.weight"].dims[0].blocks] == ["q", "k", "v"]
    assert t["o_proj.weight"].local_shape == (4096, 1024)
    assert t["o_proj.weight"].split_axes == ("tp",)
    assert t["norm.weight"].local_shape == (4096,)
    assert t["norm.weight"].split_axes == ()


@pytest.mark.parametrize(
    ("dim", "size", "split"),
    [
        ("64 / tp", 64, ("tp",)),
        ("2 * 64 / tp", 128, ("tp",)),
        ("64 / (tp)", 64, ("tp",)),
        ("64 / 2", 32, ()),
        ("64 / (tp, sp)", 64, ("tp", "sp")),
        ("64 / (sp, tp)", 64, ("sp", "tp")),
    ],
)
def test_slash_means_split_only_at_the_top_of_a_dim_over_axes(
    dim: str, size: int, split: tuple[str, ...]
) -> None:
    layout = load_text(f"mesh {{ tp = 2, sp = 2 }}\ntensor w [{dim}]")
    (d,) = layout.tensor("w").dims
    assert (d.size, d.split, d.parts) == (size, split, 2 ** len(split))


def test_a_tensor_may_be_split_over_several_dims() -> None:
    layout = load_text("mesh { tp = 2, ep = 4 }\ntensor w [8 / ep, 6 / tp, 3]")
    w = layout.tensor("w")
    assert w.split_axes == ("ep", "tp")
    assert w.local_shape == (2, 3, 3)
    assert w.local_numel == 18
    assert w.numel == 144


def test_the_worked_examples_of_how_a_split_dim_is_cut() -> None:
    layout = load_text(
        "mesh { tp = 2, sp = 2 }\n"
        "tensor fused [(q: 8, k: 4, v: 4) / tp]\n"
        "tensor padded [pad(10, 4) / tp]\n"
        "tensor two [pad(10, 8) / (tp, sp)]\n"
    )
    fused, padded, two = (layout.tensor(n).dims[0] for n in ("fused", "padded", "two"))
    # (logical_start, local_start, length)
    assert fused.segments(0) == [(0, 0, 4), (8, 4, 2), (12, 6, 2)]
    assert fused.segments(1) == [(4, 0, 4), (10, 4, 2), (14, 6, 2)]
    assert (padded.padded, padded.local) == (12, 6)
    assert padded.segments(0) == [(0, 0, 6)]
    assert padded.segments(1) == [(6, 0, 4)]  # then 2 rows of padding
    assert (two.padded, two.local) == (16, 4)
    assert [two.segments(c) for c in range(4)] == [[(0, 0, 4)], [(4, 0, 4)], [(8, 0, 2)], []]


def test_gqa_qkv_of_llama2_70b_gives_each_tp_rank_its_query_heads_and_shared_kv_head() -> None:
    dim = load_text("mesh { tp = 8 }\ntensor w [(q: 8192, k: 1024, v: 1024) / tp, 8192]").tensor(
        "w"
    )
    for t in range(8):
        assert dim.dims[0].segments(t) == [
            (1024 * t, 0, 1024),
            (8192 + 128 * t, 1024, 128),
            (9216 + 128 * t, 1152, 128),
        ]


def cut_by_hand(blocks: list[int], pad_to: int, parts: int) -> list[list[int | None]]:
    """Every part's local rows as logical indices (None = padding), built row by row."""
    if len(blocks) > 1:
        out: list[list[int | None]] = [[] for _ in range(parts)]
        start = 0
        for size in blocks:
            rows = list(range(start, start + size))
            piece = size // parts
            for c in range(parts):
                out[c].extend(rows[c * piece : (c + 1) * piece])
            start += size
        return out
    (size,) = blocks
    padded = -(-size // pad_to) * pad_to
    rows: list[int | None] = [*range(size), *[None] * (padded - size)]
    local = padded // parts
    return [rows[c * local : (c + 1) * local] for c in range(parts)]


def rows_from_segments(dim: ir.Dim, part: int) -> list[int | None]:
    rows: list[int | None] = [None] * dim.local
    for logical, local, length in dim.segments(part):
        assert length > 0
        for k in range(length):
            assert rows[local + k] is None, "two segments write one local row"
            rows[local + k] = logical + k
    return rows


@settings(max_examples=60, deadline=None)
@given(
    parts=st.sampled_from([(1,), (2,), (3,), (2, 2), (4, 2)]),
    fused=st.booleans(),
    data=st.data(),
)
def test_segments_match_a_row_by_row_model_of_fused_and_padded_splits(
    parts: tuple[int, ...], fused: bool, data: st.DataObject
) -> None:
    axes = ["tp", "sp"][: len(parts)]
    p = 1
    for s in parts:
        p *= s
    mesh = "mesh { " + ", ".join(f"{a} = {s}" for a, s in zip(axes, parts, strict=True)) + " }"
    split = axes[0] if len(axes) == 1 else "(" + ", ".join(axes) + ")"
    if fused:
        blocks = data.draw(st.lists(st.integers(1, 5).map(lambda k: k * p), min_size=2, max_size=4))
        dim_text = "(" + ", ".join(f"b{k}: {b}" for k, b in enumerate(blocks)) + f") / {split}"
        pad_to = 1
    else:
        size = data.draw(st.integers(1, 40))
        pad_to = data.draw(st.integers(1, 4)) * p
        blocks = [size]
        dim_text = f"pad({size}, {pad_to}) / {split}"
    dim = load_text(f"{mesh}\ntensor w [{dim_text}]").tensor("w").dims[0]
    assert dim.parts == p
    expected = cut_by_hand(blocks, pad_to, p)
    for c in range(p):
        assert rows_from_segments(dim, c) == expected[c]
    # coverage: every logical row is held by exactly one part
    held = sorted(r for c in range(p) for r in rows_from_segments(dim, c) if r is not None)
    assert held == list(range(sum(blocks)))


def test_an_unsplit_unpadded_dim_is_one_segment() -> None:
    dim = load_text("mesh { dp = 2 }\ntensor w [7]").tensor("w").dims[0]
    assert dim.segments(0) == [(0, 0, 7)]
    assert dim.to_dict() == {"size": 7}


def test_dim_to_dict_states_blocks_padding_and_split() -> None:
    layout = load_text("mesh { tp = 2 }\ntensor f [(q: 4, k: 2) / tp]\ntensor p [pad(10, 4) / tp]")
    assert layout.tensor("f").dims[0].to_dict() == {
        "size": 6,
        "blocks": [{"name": "q", "size": 4}, {"name": "k", "size": 2}],
        "split": ["tp"],
        "local": 3,
    }
    assert layout.tensor("p").dims[0].to_dict() == {
        "size": 10,
        "pad_to": 4,
        "padded": 12,
        "split": ["tp"],
        "local": 6,
    }


def test_unnamed_fused_blocks_and_a_single_named_block() -> None:
    layout = load_text("mesh { tp = 2 }\ntensor a [(4, 2) / tp]\ntensor b [(q: 4) / tp]")
    assert [b.name for b in layout.tensor("a").dims[0].blocks] == [None, None]
    assert layout.tensor("a").dims[0].fused
    assert layout.tensor("b").dims[0].blocks == (ir.Block("q", 4),)


# ---------------------------------------------------------------- ties


def test_a_tie_records_alias_and_source_and_may_come_before_the_source() -> None:
    layout = load_text(
        "mesh { dp = 8 }\ntie lm_head.weight = transformer.wte.weight\n"
        "tensor transformer.wte.weight [50257, 768]"
    )
    assert layout.ties == (("lm_head.weight", "transformer.wte.weight"),)
    assert names(layout) == ["transformer.wte.weight"]


def test_a_tie_alias_declared_with_the_same_shape_is_accepted() -> None:
    layout = load_text("mesh { tp = 2 }\ntensor a [8 / tp, 4]\ntensor b [8, 4 / tp]\ntie b = a")
    assert layout.ties == (("b", "a"),)


# ---------------------------------------------------------------- optimizer, zero, offload, store


@pytest.mark.parametrize(
    ("name", "states", "step"),
    [
        ("adam", ("exp_avg", "exp_avg_sq"), True),
        ("adamw", ("exp_avg", "exp_avg_sq"), True),
        ("lamb", ("exp_avg", "exp_avg_sq"), True),
        ("adagrad", ("sum",), True),
        ("sgd", ("momentum_buffer",), False),
    ],
)
def test_known_optimizers_have_default_states_and_step(
    name: str, states: tuple[str, ...], step: bool
) -> None:
    opt = load_text(f"mesh {{ dp = 2 }}\noptimizer {name}").optimizer
    assert opt == ir.Optimizer(name, "fp32", states, step)


def test_optimizer_options_override_master_states_and_step() -> None:
    opt = load_text(
        "mesh { dp = 2 }\noptimizer adam { master bf16, states (m, v, w), no_step }"
    ).optimizer
    assert opt == ir.Optimizer("adam", "bf16", ("m", "v", "w"), False)
    opt = load_text(
        "mesh { dp = 2 }\noptimizer lion { states exp_avg, step, master none }"
    ).optimizer
    assert opt == ir.Optimizer("lion", None, ("exp_avg",), True)
    opt = load_text("mesh { dp = 2 }\noptimizer sgd { step }").optimizer
    assert opt == ir.Optimizer("sgd", "fp32", ("momentum_buffer",), True)


def test_without_an_optimizer_statement_the_layout_stores_weights_only() -> None:
    assert load_text("mesh { dp = 2 }").optimizer is None


def test_zero_records_stage_axes_and_options() -> None:
    assert load_text("mesh { dp = 2 }").zero == ir.Zero()
    z = load_text(
        "mesh { pp = 2, dp = 4, ep = 2 }\npipeline over pp\nzero 1 over (dp, ep) { round_robin }"
    ).zero
    assert (z.stage, z.axes, z.round_robin, z.bf16_optimizer) == (1, ("dp", "ep"), True, False)
    z = load_text("mesh { dp = 64 }\nzero 3 over dp { sub_group 1e8 }").zero
    assert (z.stage, z.axes, z.sub_group_size) == (3, ("dp",), 10**8)
    z = load_text("mesh { dp = 4 }\ndtype bf16\nzero 1 over dp { bf16_optimizer }").zero
    assert z.bf16_optimizer
    z = load_text("mesh { dp = 4 }\nzero 0").zero
    assert (z.stage, z.axes) == (0, ())


def test_layout_axis_roles_follow_pipeline_and_zero() -> None:
    layout = load_text(
        "mesh { pp = 2, dp = 2, ep = 2, tp = 2 }\npipeline over pp\nzero 1 over (dp, ep)\n"
        "tensor 0.w [4 / tp]"
    )
    assert layout.dp_axes == ("dp", "ep")
    assert layout.model_axes == ("tp",)
    # an axis no tensor is split over only holds replicas: data parallel, not model parallel
    assert load_text("mesh { dp = 2, tp = 2 }\ntensor w [4 / tp]").model_axes == ("tp",)
    assert load_text("mesh { dp = 2, tp = 2 }\ntensor w [4]").model_axes == ()


def test_offload_records_what_where_and_the_aio_options_with_defaults() -> None:
    layout = load_text(
        "mesh { dp = 8 }\nzero 3 over dp\n"
        'offload optimizer to nvme "/local_nvme" { block 2MiB, queue 32, threads 8 }\n'
        "offload params to cpu\n"
    )
    assert layout.offloads == (
        ir.Offload("optimizer", "nvme", "/local_nvme", 2 * 2**20, 32, 8),
        ir.Offload("params", "cpu", None, 2**20, 8, 1),
    )


def test_store_records_format_writers_tag_and_max_shard_with_defaults() -> None:
    assert load_text("mesh { dp = 2 }").store == ir.Store("deepspeed", 1, 5_000_000_000, None)
    store = load_text(
        'mesh { dp = 8 }\nstore safetensors { writers 8, max_shard 2GB, tag "global_step100" }'
    ).store
    assert store == ir.Store("safetensors", 8, 2_000_000_000, "global_step100")


def test_a_hash_inside_a_string_is_not_a_comment() -> None:
    layout = load_text('mesh { dp = 2 }\nstore torch { tag "run#3" }  # the tag')
    assert layout.store.tag == "run#3"


# ---------------------------------------------------------------- the IR as data


COMPLETE = """\
layout llama_tiny

mesh { pp = 2, dp = 4, tp = 2 }          # axes slowest to fastest
let L = 4, H = 512, F = 1376, V = 32000

pipeline over pp
dtype bf16
optimizer adam { master fp32 }
zero 1 over dp

tensor 0.embed_tokens.weight [pad(V, 128 * tp) / tp, H] stage 0
for i in 0..L stage i * pp / L {
  tensor {i + 1}.self_attn.qkv_proj.weight [(q: H, k: H, v: H) / tp, H]
  tensor {i + 1}.self_attn.o_proj.weight   [H, H / tp]
  tensor {i + 1}.mlp.gate_up_proj.weight   [(gate: F, up: F) / tp, H]
  tensor {i + 1}.mlp.down_proj.weight      [H, F / tp]
  tensor {i + 1}.input_layernorm.weight    [H]
  tensor {i + 1}.post_attention_layernorm.weight [H]
}
tensor {L + 1}.norm.weight    [H]                        stage pp - 1
tensor {L + 2}.lm_head.weight [pad(V, 128 * tp) / tp, H] stage pp - 1

store deepspeed { writers 4 }
"""


def test_the_complete_example_of_the_docs_checks_to_the_stated_facts() -> None:
    layout = load_text(COMPLETE)
    assert layout.name == "llama_tiny"
    assert layout.mesh.world == 16
    assert len(layout.tensors) == 1 + 4 * 6 + 2
    assert [t.stage for t in layout.tensors if ".self_attn.o_proj" in t.name] == [0, 0, 1, 1]
    assert layout.tensor("6.lm_head.weight").stage == 1
    assert layout.tensor("0.embed_tokens.weight").local_shape == (16000, 512)
    assert layout.store.writers == 4


@pytest.mark.parametrize("spec", [*SPECS, None], ids=[*(p.name for p in SPECS), "complete"])
def test_to_dict_is_json_serialisable_and_deterministic(spec: Path | None) -> None:
    def load() -> ir.Layout:
        return load_text(COMPLETE) if spec is None else load_layout(spec)

    first, second = load(), load()
    a = json.dumps(first.to_dict(), sort_keys=True)
    assert a == json.dumps(second.to_dict(), sort_keys=True)
    assert json.loads(a) == first.to_dict()
    assert first == second
    assert json.loads(a)["version"] == 1


# ---------------------------------------------------------------- shipped specs


def test_there_are_shipped_specs() -> None:
    assert len(SPECS) >= 5


@pytest.mark.parametrize("spec", SPECS, ids=[p.name for p in SPECS])
def test_every_shipped_spec_checks(spec: Path) -> None:
    layout = load_layout(spec)
    assert layout.tensors
    assert layout.mesh.world >= 1
    assert len({t.name for t in layout.tensors}) == len(layout.tensors)


def test_the_llama2_70b_spec_has_65536_ranks() -> None:
    layout = load_layout(ROOT / "specs" / "llama2-70b.layout")
    assert layout.mesh.world == 65_536


def test_gpt2_small_ties_the_output_projection_to_the_token_embedding() -> None:
    layout = load_layout(ROOT / "specs" / "gpt2-small.layout")
    assert layout.ties == (("lm_head.weight", "transformer.wte.weight"),)
    assert layout.groups == ("default", "no_decay")


def test_importing_layoutc_and_checking_a_spec_does_not_import_torch(tmp_path: Path) -> None:
    # A stand-in torch on the path: importing it would put "torch" in sys.modules even
    # where the real torch is not installed, so the test cannot pass by accident.
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    code = (
        "import layoutc, sys\n"
        "layoutc.load_layout('specs/llama2-7b.layout')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "import torch\n"  # the stand-in is importable, so the check above meant something
        "assert 'torch' in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- experts

EXPERTS = """
let dp = 4
mesh { edp = dp / ep, ep = 2 }
optimizer adam
zero 2 over (edp, ep)
tensor gate.weight [6, 4]
group experts {
  for e in 0..6 over ep {
    tensor experts.{e}.w [4, 4] layer 1
  }
}
"""


def test_an_axis_may_be_sized_from_an_axis_declared_after_it_and_keeps_its_place() -> None:
    layout = load_text(EXPERTS)
    assert layout.mesh.names == ("edp", "ep")
    assert layout.mesh.sizes == {"edp": 2, "ep": 2}


@pytest.mark.parametrize(
    ("overrides", "sizes"),
    [({"dp": 8}, {"edp": 4, "ep": 2}), ({"dp": 6, "ep": 3}, {"edp": 2, "ep": 3})],
)
def test_set_dp_and_ep_recompute_the_expert_data_parallel_axis(
    overrides: dict[str, int], sizes: dict[str, int]
) -> None:
    assert load_text(EXPERTS, overrides=overrides).mesh.sizes == sizes


def test_experts_are_dealt_over_their_axis_in_equal_runs_of_global_ids() -> None:
    layout = load_text(EXPERTS)
    sizes = layout.mesh.sizes
    experts = [t for t in layout.tensors if t.expert]
    assert [t.name for t in experts] == [f"experts.{e}.w" for e in range(6)]
    assert [t.expert.id for t in experts if t.expert] == list(range(6))
    assert [t.pinned(sizes) for t in experts] == [{"ep": e // 3} for e in range(6)]
    assert [t.expert.local(2) for t in experts if t.expert] == [0, 1, 2, 0, 1, 2]
    assert {t.layer for t in experts} == {1}
    assert {t.group for t in experts} == {"experts"}
    assert layout.tensor("gate.weight").expert is None


@given(ep=st.integers(1, 8), per=st.integers(1, 5))
def test_every_expert_id_sits_on_exactly_one_coordinate_each_holding_as_many(
    ep: int, per: int
) -> None:
    count = ep * per
    layout = load_text(
        f"mesh {{ ep = {ep} }}\nfor e in 0..{count} over ep {{\n  tensor x.{{e}} [2]\n}}\n"
    )
    held: dict[int, list[int]] = {}
    for t in layout.tensors:
        assert t.expert is not None
        held.setdefault(t.pinned(layout.mesh.sizes)["ep"], []).append(t.expert.id)
    assert sorted(held) == list(range(ep))
    assert sorted(i for ids in held.values() for i in ids) == list(range(count))
    assert all(ids == sorted(ids) and len(ids) == per for ids in held.values())
    for c, ids in held.items():
        assert ids == list(range(c * per, (c + 1) * per))  # a contiguous run per coordinate


def test_a_dp_smaller_than_ep_says_it_does_not_divide_not_that_edp_is_zero() -> None:
    with pytest.raises(LayoutError) as info:
        load_text(EXPERTS, overrides={"dp": 1, "ep": 2})
    codes = [d.code for d in info.value.diagnostics]
    assert codes[0] == "E142" and "E109" not in codes
