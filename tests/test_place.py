"""Shard maps: every stored element is accounted for exactly once, slices tile tensors."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from layouts import moe_layouts, training_layouts, with_format

from layoutc.errors import Unsupported
from layoutc.ir import FORMATS
from layoutc.lang.check import load_layout, load_text
from layoutc.place import place
from layoutc.place.shards import STEP, box_ranges, pad_ranges, slices_of
from layoutc.runtime import memory as M


def _coverage(p):
    """How often each element of each stored buffer is covered by a run or a padding range."""
    counts = {(b.file, b.key): np.zeros(b.numel, np.int32) for b in p.buffers()}
    for t in p.tensors:
        for state in p.states(t):
            for sl in p.slices(t, state):
                n = sl.numel if sl.shape else 1
                for c in range(p.copies(t, state)):
                    runs = p.runs(t, state, sl, c, 0, n)
                    assert len(runs) == p.count_runs(t, state, sl, 0, n, c)
                    # a step has no copy where the rank's slice is empty (AutoTP's grains)
                    empty_step = state == STEP and t.uneven and not runs
                    assert sum(r.numel for r in runs) == n or empty_step
                    for r in runs:
                        counts[(r.file, r.key)][r.offset : r.offset + r.numel] += 1
    for r in p.pads():
        counts[(r.file, r.key)][r.offset : r.offset + r.numel] += 1
    return counts


ANY_LAYOUT = st.one_of(training_layouts(), moe_layouts())


@settings(max_examples=80, deadline=None)
@given(ANY_LAYOUT)
def test_every_stored_element_is_covered_exactly_once(layout):
    p = place(layout)
    step_keys = set()
    for t in p.trainable:
        if STEP in p.states(t):
            for c in range(p.copies(t, STEP)):
                # none where the rank's slice is empty: DeepSpeed keeps no state for it
                for r in p.runs(t, STEP, p.slices(t, STEP)[0], c, 0, 1):
                    step_keys.add((r.file, r.key))
    for key, count in _coverage(p).items():
        if key in step_keys:
            assert count.min() >= 1  # a group's step is shared by its tensors
        else:
            assert count.size == 0 or (count.min() == 1 and count.max() == 1), key


def _placed(layout, fmt):
    """``layout`` placed as ``fmt``, where that format can hold it: universal holds no
    native experts, a distributed checkpoint no fused, padded or grained split."""
    assume(not (fmt == "universal" and any(t.expert for t in layout.tensors)))
    try:
        return place(with_format(layout, fmt))
    except Unsupported:
        assume(fmt != "dcp")
        raise


@settings(max_examples=50, deadline=None)
@given(ANY_LAYOUT, st.sampled_from(FORMATS))
def test_every_file_is_listed_and_counted(layout, fmt):
    p = _placed(layout, fmt)
    files = list(p.files())
    assert len(files) == len(set(files)) == p.file_count()
    assert {b.file for b in p.buffers()} <= set(files)


@settings(max_examples=80, deadline=None)
@given(ANY_LAYOUT, st.sampled_from(FORMATS))
def test_step_counters_name_the_buffers_their_copies_write(layout, fmt):
    """A counter named by several tensors is the same set of (file, key) for each of them,
    and two counters never share one: what the planner relies on to write each once."""
    p = _placed(layout, fmt)
    held: dict[object, set[tuple[str, str]]] = {}
    for t in p.tensors:
        if STEP not in p.states(t):
            continue
        sl = p.slices(t, STEP)[0]
        listed = [c for _, copies in p.step_counters(t) for c in copies]
        assert sorted(listed) == [
            c for c in range(p.copies(t, STEP)) if p.runs(t, STEP, sl, c, 0, 1)
        ], t.name
        for counter, copies in p.step_counters(t):
            runs = {(r.file, r.key) for c in copies for r in p.runs(t, STEP, sl, c, 0, 1)}
            assert held.setdefault(counter, runs) == runs, (t.name, counter)
    named = [k for runs in held.values() for k in runs]
    assert len(named) == len(set(named))


@settings(max_examples=60, deadline=None)
@given(training_layouts())
def test_slices_tile_each_tensor_exactly_once(layout):
    for t in layout.tensors:
        hits = np.zeros(t.shape, np.int32)
        for sl in slices_of(t, layout.mesh):
            assert sl.shape == t.local_shape_at(dict(sl.coords), layout.mesh.sizes)
            assert all(n <= m for n, m in zip(sl.shape, t.local_shape, strict=True))
            for seg in sl.segments:
                hits[tuple(slice(a, b) for a, b in seg.logical)] += 1
        assert hits.min() == 1 and hits.max() == 1, t.name


@settings(max_examples=60, deadline=None)
@given(ANY_LAYOUT, st.sampled_from(FORMATS))
def test_store_then_load_is_identity(layout, fmt):
    """split then merge (store a logical tensor as slices and runs, read it back) changes nothing."""
    p = _placed(layout, fmt)
    values = M.markers(p)
    back = M.load(p, M.store(p, values))
    for t in p.tensors:
        for state in p.states(t):
            assert np.array_equal(back[t.name][state], values[t.name][state]), (t.name, state)


def test_box_ranges_merge_whole_trailing_dims():
    shape = (4, 3, 2)
    assert list(box_ranges(shape, ((1, 3), (0, 3), (0, 2)))) == [(6, 18)]
    assert list(box_ranges(shape, ((1, 2), (1, 3), (0, 2)))) == [(8, 12)]
    assert list(box_ranges(shape, ((0, 2), (0, 3), (1, 2)))) == [
        (1, 2),
        (3, 4),
        (5, 6),
        (7, 8),
        (9, 10),
        (11, 12),
    ]


def test_vocabulary_padding_sits_at_the_end_of_the_last_slice():
    layout = load_text("mesh { tp = 2 }\ntensor e [pad(101, 4 * tp) / tp, 3]\nstore deepspeed\n")
    first, last = slices_of(layout.tensors[0], layout.mesh)
    assert first.shape == (52, 3) and pad_ranges(first) == []
    assert last.segments[0].logical == ((52, 101), (0, 3))
    assert pad_ranges(last) == [(49 * 3, 52 * 3)]


def _deepspeed_shard_sizes(total: int, parts: int, grain: int) -> list[int]:
    """DeepSpeed 0.19's AutoTP rule (module_inject/tp_shard.get_shard_size), restated."""
    count, rest = divmod(total, grain)
    sizes = [(count // parts + (r < count % parts)) * grain for r in range(parts)]
    sizes[-1] += rest
    return sizes


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(1, 70), st.integers(1, 9))
def test_grains_cut_as_deepspeeds_autotp_does(total, grain, parts):
    grain = min(grain, total)
    layout = load_text(f"mesh {{ tp = {parts} }}\ntensor w [grains({total}, {grain}) / tp, 2]\n")
    (t,) = layout.tensors
    slices = slices_of(t, layout.mesh)
    assert [sl.shape[0] for sl in slices] == _deepspeed_shard_sizes(total, parts, grain)
    starts = [seg.logical[0][0] for sl in slices for seg in sl.segments]
    assert starts == sorted(starts)  # parts in rank order, end to end


def test_empty_grain_parts_hold_nothing():
    layout = load_text("mesh { tp = 4 }\ntensor q [grains(16, 8) / tp, 16]\nstore deepspeed\n")
    slices = slices_of(layout.tensors[0], layout.mesh)
    assert [sl.shape for sl in slices] == [(8, 16), (8, 16), (0, 16), (0, 16)]
    assert [sl.segments for sl in slices[2:]] == [(), ()]


def test_fused_blocks_are_split_block_by_block():
    layout = load_text(
        "mesh { tp = 2 }\ntensor qkv [(q: 4, k: 2, v: 2) / tp, 1]\nstore deepspeed\n"
    )
    sl = slices_of(layout.tensors[0], layout.mesh)[1]
    assert [seg.logical[0] for seg in sl.segments] == [(2, 4), (5, 6), (7, 8)]
    assert [seg.local[0] for seg in sl.segments] == [(0, 2), (2, 3), (3, 4)]


def test_deepspeed_file_names_follow_the_zero_stage_and_dtype():
    base = "mesh {{ dp = 2, tp = 2 }}\ndtype {dt}\noptimizer adam\nzero {z} over dp\ntensor w [4 / tp, 2]\nstore deepspeed\n"
    files = {
        (z, dt): sorted(place(load_text(base.format(z=z, dt=dt))).files())
        for z in (1, 3)
        for dt in ("bf16", "fp32")
    }
    assert files[(1, "bf16")] == [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_0_mp_rank_01_optim_states.pt",
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_1_mp_rank_01_optim_states.pt",
        "mp_rank_00_model_states.pt",
        "mp_rank_01_model_states.pt",
    ]
    assert "zero_pp_rank_1_mp_rank_01_model_states.pt" in files[(3, "fp32")]
    assert "zero_pp_rank_1_mp_rank_01_optim_states.pt" in files[(3, "fp32")]
    assert not any(f.startswith("mp_rank") for f in files[(3, "fp32")])


def test_zero1_flat_partitions_pad_the_trailing_ranks():
    """Two params of 5 and 4 elements over dp = 4: T = 9, padded to 16, P = 4; rank 3 is all padding."""
    layout = load_text(
        "mesh { dp = 4 }\noptimizer adam\nzero 1 over dp\ntensor a [5]\ntensor b [4]\nstore deepspeed\n"
    )
    p = place(layout)
    _, b = p.tensors
    runs = p.runs(b, "exp_avg", p.slices(b, "exp_avg")[0], 0, 0, 4)
    assert [(r.file, r.offset, r.start, r.numel) for r in runs] == [
        ("zero_pp_rank_1_mp_rank_00_optim_states.pt", 1, 0, 3),
        ("zero_pp_rank_2_mp_rank_00_optim_states.pt", 0, 3, 1),
    ]
    pads = sorted((r.file, r.key.rsplit("/", 1)[-1], r.offset, r.numel) for r in p.pads())
    assert pads == [
        ("zero_pp_rank_2_mp_rank_00_optim_states.pt", "exp_avg", 1, 3),
        ("zero_pp_rank_2_mp_rank_00_optim_states.pt", "exp_avg_sq", 1, 3),
        ("zero_pp_rank_3_mp_rank_00_optim_states.pt", "exp_avg", 0, 4),
        ("zero_pp_rank_3_mp_rank_00_optim_states.pt", "exp_avg_sq", 0, 4),
    ]
    master = {
        b.file: b.numel for b in p.buffers() if b.key.endswith("single_partition_of_fp32_groups/0")
    }
    assert [master[f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"] for r in range(4)] == [
        4,
        4,
        1,
        0,
    ]


def test_zero3_sub_groups_number_the_fp32_flat_groups():
    layout = load_text(
        "mesh { dp = 2 }\noptimizer adam\nzero 3 over dp { sub_group 4 }\n"
        "tensor a [6]\ntensor b [3]\ntensor c [2]\nstore deepspeed\n"
    )
    p = place(layout)
    keys = {
        t.name: p.runs(t, "master", p.slices(t, "master")[0], 0, 0, t.numel)[0].key
        for t in p.tensors
    }
    # partitions: a 3, b 2 (closes sub-group 0 at 5 >= 4), c 1 -> sub-group 1
    assert keys == {
        "a": "optimizer_state_dict/fp32_flat_groups/0",
        "b": "optimizer_state_dict/fp32_flat_groups/0",
        "c": "optimizer_state_dict/fp32_flat_groups/1",
    }


def test_bf16_optimizer_keeps_padding_in_fp32_partitions():
    layout = load_text(
        "mesh { dp = 4 }\ndtype bf16\noptimizer adam\nzero 1 over dp { bf16_optimizer }\ntensor a [9]\nstore deepspeed\n"
    )
    p = place(layout)
    sizes = {b.file: b.numel for b in p.buffers() if "fp32" in b.key}
    assert set(sizes.values()) == {4}
    assert all(f.startswith("bf16_") for f in sizes)


def test_tie_aliases_are_not_stored_twice():
    layout = load_text(
        "mesh { dp = 2 }\noptimizer adam\nzero 1 over dp\ntensor e [4, 2]\ntie head = e\nstore safetensors\n"
    )
    p = place(layout)
    assert [t.name for t in p.tensors] == ["e"]
    assert [b.key for b in p.buffers()] == ["e"]


def test_files_are_held_by_the_ranks_that_load_them():
    layout = load_layout("specs/llama2-7b.layout")  # pp = 2, dp = 4, tp = 2
    p = place(layout)
    mesh = layout.mesh
    optim = p.holders("bf16_zero_pp_rank_3_mp_rank_02_optim_states.pt")
    assert optim.size(mesh) == 1 and dict(optim.fixed) == {"dp": 3, "pp": 1, "tp": 0}
    model = p.holders("mp_rank_01_model_states.pt")
    assert dict(model.fixed) == {"pp": 0, "tp": 1} and model.size(mesh) == 4
    layer = p.holders("layer_33-model_01-model_states.pt")
    assert dict(layer.fixed) == {"pp": 1, "tp": 1} and layer.size(mesh) == 4
    assert all(p.holders(f).size(mesh) >= 1 for f in p.files())


def test_zero2_keeps_frozen_parameters_also_in_frozen_param_fragments():
    layout = load_text(
        "mesh { dp = 2 }\noptimizer adam\nzero 2 over dp\ntensor w [4]\nfrozen f [3]\nstore deepspeed\n"
    )
    p = place(layout)
    f = next(t for t in p.tensors if t.name == "f")
    keys = sorted(
        r.key
        for c in range(p.copies(f, "weight"))
        for r in p.runs(f, "weight", p.slices(f, "weight")[0], c, 0, 3)
    )
    assert keys == ["frozen_param_fragments/f", "module/f"]


def test_a_data_parallel_axis_without_zero_does_not_multiply_model_files():
    layout = load_text("mesh { dp = 4, tp = 2 }\ntensor w [4 / tp]\nstore deepspeed\n")
    assert sorted(place(layout).files()) == [
        "mp_rank_00_model_states.pt",
        "mp_rank_01_model_states.pt",
    ]


MOE = (
    "mesh {{ edp = 2, ep = 2 }}\noptimizer adam\n{zero}\ntensor gate.w [2, 3]\n"
    "group experts {{ for e in 0..2 over ep {{ tensor experts.{{e}}.w [3, 3]{layer} }} }}"
)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "mesh { pp = 2, dp = 2 }\npipeline over pp\noptimizer adam\nzero 2 over dp\ntensor 0.w [4]",
            "refuses ZeRO-2 with pipeline",
        ),
        (
            "mesh { dp = 2 }\noptimizer adam\nzero 1 over dp { round_robin }\ntensor w [4]",
            "round_robin",
        ),
        ("mesh { dp = 2 }\nzero 3 over dp\ntensor w [4]", "without an optimizer"),
        ("mesh { pp = 1, dp = 2 }\npipeline over pp\ntensor w [4]", "<layer>.<param>"),
        (MOE.format(zero="zero 3 over (edp, ep)", layer=" layer 0"), "not with ZeRO-3"),
        (
            MOE.format(zero="zero 1 over (edp, ep)", layer=" layer 0")
            + "\ngroup more { for e in 0..2 over ep { tensor more.{e}.w [3] } }",
            "some experts name their MoE layer and some do not",
        ),
        (MOE.format(zero="zero 1 over edp", layer=" layer 0"), "ZeRO does not partition over"),
        (
            "mesh { dp = 2, ep = 2 }\noptimizer adam\nzero 1 over (dp, ep)\n"
            "group x { tensor experts.w [4 / ep, 3] }",
            "names no MoE layer",
        ),
        (
            "mesh { dp = 2, ep = 2 }\noptimizer adam\nzero 1 over (dp, ep)\n"
            "group x { tensor experts.w [3, 4 / ep] layer 0 }",
            "dim 0 the expert",
        ),
    ],
)
def test_configurations_deepspeed_cannot_hold_are_refused(text, match):
    with pytest.raises(Unsupported, match=re.escape(match)):
        place(load_text(text + "\nstore deepspeed\n"))


def test_a_universal_checkpoint_of_native_experts_is_refused_saying_why():
    text = MOE.format(zero="zero 2 over (edp, ep)", layer=" layer 0")
    with pytest.raises(Unsupported, match="every expert-parallel rank names its own experts"):
        place(load_text(text + "\nstore universal\n"))


def test_experts_live_in_their_own_files_held_by_their_coordinate():
    p = place(load_text(MOE.format(zero="zero 2 over (edp, ep)", layer=" layer 3") + "\n"))
    assert list(p.expert_files()) == [
        "layer_3_expert_0_mp_rank_00_model_states.pt",
        "layer_3_expert_1_mp_rank_00_model_states.pt",
    ]
    assert str(p.holders("layer_3_expert_1_mp_rank_00_model_states.pt")) == "{ep=1}"
    # expert 1 is on ep 1: its masters are partitioned over edp, in ranks 1 and 3's files
    t = p.layout.tensor("experts.1.w")
    runs = p.runs(t, "master", p.slices(t, "master")[0], 0, 0, 9)
    assert [(r.file, r.start, r.numel) for r in runs] == [
        ("zero_pp_rank_1_mp_rank_00_optim_states.pt", 0, 6),
        ("zero_pp_rank_3_mp_rank_00_optim_states.pt", 6, 3),
    ]


@settings(max_examples=40, deadline=None)
@given(
    ANY_LAYOUT,
    st.sets(st.sampled_from(["weight", "master", "exp_avg", "exp_avg_sq", "step"]), min_size=1),
)
def test_the_closed_form_count_of_files_read_matches_the_runs(layout, states):
    from layoutc.place.base import Placement

    p = place(layout)
    assert p.files_holding(states) == Placement.files_holding(p, states)


def test_experts_without_a_layer_live_in_deepspeeds_older_files_one_per_expert():
    p = place(load_text(MOE.format(zero="zero 2 over (edp, ep)", layer="") + "\n"))
    assert list(p.expert_files()) == [
        "expert_0_mp_rank_00_model_states.pt",
        "expert_1_mp_rank_00_model_states.pt",
    ]
    assert str(p.holders("expert_1_mp_rank_00_model_states.pt")) == "{ep=1}"
