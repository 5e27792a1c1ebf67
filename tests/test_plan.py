"""Plans: validated, deterministic, and proven by running them on marker tensors."""

from __future__ import annotations

import glob

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from layouts import layout_pairs, training_layouts

from layoutc.errors import PlanError, Unsupported
from layoutc.ir import FORMATS
from layoutc.lang.check import load_layout, load_text
from layoutc.place import place
from layoutc.plan import ops as O
from layoutc.plan.compile import compile_plan, target_layout
from layoutc.plan.plan import Plan
from layoutc.render import render
from layoutc.runtime import executor
from layoutc.runtime import memory as M


def run(source, target, memory=None, workers=1, seed=None):
    """Compile, validate, execute on markers; return (plan, values, target placement, result)."""
    plan = compile_plan(source, target, memory=memory, workers=workers)
    S, T = place(source), place(target_layout(source, target))
    plan.validate(S, T)
    values = M.markers(S, seed)
    result = executor.execute(plan, M.store(S, values), T)
    for u in plan.units:
        assert result.peaks[u.id] <= u.stats.peak_bytes or u.mode == "fill", u
    return plan, values, T, result


def assert_moved_exactly(plan, values, T, result):
    got = M.load(T, result.stored)
    for u in plan.units:
        if u.source_state is None or u.state == "step":
            continue
        want = values[u.tensor][u.source_state]
        have = got[u.tensor][u.state]
        assert np.array_equal(want.astype(np.float64), have.astype(np.float64)), (u.tensor, u.state)


@settings(max_examples=40, deadline=None)
@given(layout_pairs(), st.sampled_from([None, 64, 4096]), st.integers(1, 3))
def test_resharding_moves_every_element_to_its_place(pair, memory, workers):
    plan, values, T, result = run(*pair, memory=memory, workers=workers)
    assert_moved_exactly(plan, values, T, result)


@settings(max_examples=40, deadline=None)
@given(
    training_layouts(),
    st.sampled_from(["universal", "safetensors", "torch"]),
    st.sampled_from([None, 48]),
)
def test_conversion_to_whole_tensor_formats_is_exact(layout, fmt, memory):
    plan, values, T, result = run(layout, fmt, memory=memory)
    assert_moved_exactly(plan, values, T, result)


@settings(max_examples=25, deadline=None)
@given(layout_pairs())
def test_a_to_b_to_universal_equals_a_to_universal(pair):
    a, b = pair
    *_, res_ab = run(a, b, seed=1)
    *_, res_au = run(a, "universal", seed=1)
    via = compile_plan(b, "universal")
    res_bu = executor.execute(via, res_ab.stored, place(target_layout(b, "universal")))
    # the optimizer states are topology-free; model-states files follow each source
    zero = {k: v for k, v in res_au.stored.items() if k[0].startswith("zero/")}
    assert zero.keys() == {k for k in res_bu.stored if k[0].startswith("zero/")}
    for key, arr in zero.items():
        assert np.array_equal(arr, res_bu.stored[key]), key


@settings(max_examples=25, deadline=None)
@given(layout_pairs(), st.sampled_from([None, 100]))
def test_plans_round_trip_through_json(pair, memory):
    plan = compile_plan(*pair, memory=memory, workers=2)
    text = plan.to_json()
    back = Plan.from_json(text)
    assert back == plan
    assert back.to_json() == text
    assert compile_plan(*pair, memory=memory, workers=2).to_json() == text  # deterministic


@settings(max_examples=25, deadline=None)
@given(layout_pairs(), st.integers(16, 400))
def test_peak_memory_stays_within_the_budget(pair, memory):
    plan = compile_plan(*pair, memory=memory)
    assert plan.peak_memory_bytes <= memory
    assert all(u.stats.peak_bytes <= memory for u in plan.units)


def test_a_tensor_larger_than_the_budget_streams_through_swap():
    layout = load_text(
        "mesh { dp = 2, tp = 2 }\noptimizer adam\nzero 1 over dp\ntensor w [64 / tp, 16]\nstore deepspeed\n"
    )
    plan, values, T, result = run(layout, "universal", memory=1024)
    spilled = [u for u in plan.units if u.mode == "spill"]
    assert {u.state for u in spilled} >= {"master", "exp_avg", "exp_avg_sq"}
    assert all(u.stats.swap_bytes > 0 for u in spilled)
    assert any("budget; it streams through the swap tier" in w for w in plan.warnings)
    assert plan.summary()["ops_by_kind"]["swap"] > 0
    assert_moved_exactly(plan, values, T, result)


def test_missing_optimizer_state_becomes_fresh_state_with_a_warning():
    src = load_text("mesh { dp = 1 }\ntensor w [4]\nstore safetensors\n")
    dst = load_text(
        "mesh { dp = 2 }\noptimizer adam\nzero 1 over dp\ntensor w [4]\nstore deepspeed\n"
    )
    plan = compile_plan(src, dst)
    modes = {u.state: (u.mode, u.source_state) for u in plan.units if u.state != "pad"}
    assert modes["exp_avg"] == ("fill", None)
    assert modes["master"][1] == "weight"
    assert any("fresh exp_avg" in w for w in plan.warnings)


def test_a_target_tensor_missing_from_the_source_is_an_error():
    src = load_text("mesh { dp = 1 }\ntensor w [4]\nstore torch\n")
    dst = load_text("mesh { dp = 1 }\ntensor w [4]\ntensor v [2]\nstore torch\n")
    with pytest.raises(Exception, match="v, which the source layout"):
        compile_plan(src, dst)


def test_a_shape_mismatch_names_the_tensor_and_both_shapes():
    src = load_text("mesh { dp = 1 }\ntensor w [4, 2]\nstore torch\n")
    dst = load_text("mesh { dp = 1 }\ntensor w [2, 4]\nstore torch\n")
    with pytest.raises(Exception, match=r"w has shape \[4, 2\] in .* but \[2, 4\]"):
        compile_plan(src, dst)


def test_a_step_counter_shared_on_one_rank_but_not_another_is_written_once_per_file():
    # ZeRO-3 closes a sub-group by each rank's slice sizes: on tp rank 0, w0's 2 elements
    # fill sub-group 0 and w1 has a counter of its own; on rank 1, w0's 1 element and w1
    # share one.
    body = "tensor w0 [grains(3, 1) / tp]\ntensor w1 [1]\nstore deepspeed\n"
    src = load_text("mesh { dp = 1, tp = 1 }\noptimizer adam\nzero 0 over dp\n" + body)
    dst = load_text(
        "mesh { dp = 1, tp = 2 }\noptimizer adam\nzero 3 over dp { sub_group 2 }\n" + body
    )
    plan, values, T, result = run(src, dst)  # validated: every counter written exactly once
    counters = [b for b in T.buffers() if b.key.endswith("/step")]
    assert len(counters) == 3
    assert all(result.stored[(b.file, b.key)][0] == 7 for b in counters)
    assert_moved_exactly(plan, values, T, result)


def test_validation_catches_an_element_written_twice():
    layout = load_text(
        "mesh { dp = 2 }\noptimizer adam\nzero 1 over dp\ntensor w [6]\nstore deepspeed\n"
    )
    plan = compile_plan(layout, "universal").materialized()
    unit = plan.units[0]
    ops = unit.ops
    extra = next(op for op in ops if isinstance(op, O.Write))
    bad = plan.__class__(
        plan.source,
        plan.target,
        (unit.__class__(**{**unit.__dict__, "ops": (*ops, extra)}), *plan.units[1:]),
    )
    with pytest.raises(PlanError, match="written twice"):
        bad.validate(place(layout), place(target_layout(layout, "universal")))


def test_validation_catches_an_implicit_cast():
    layout = load_text("mesh { dp = 1 }\ndtype bf16\ntensor w [6]\nstore safetensors\n")
    target = load_text(
        "mesh { dp = 2 }\ndtype bf16\noptimizer adam\nzero 1 over dp\ntensor w [6]\nstore deepspeed\n"
    )
    plan = compile_plan(layout, target).materialized()
    unit = next(u for u in plan.units if u.cast)
    ops = tuple(
        o.__class__(**{**{f: getattr(o, f) for f in o.__slots__}, "cast": None})
        if hasattr(o, "cast")
        else o
        for o in unit.ops
    )
    bad = plan.__class__(
        plan.source,
        plan.target,
        tuple(
            u if u is not unit else unit.__class__(**{**unit.__dict__, "ops": ops})
            for u in plan.units
        ),
    )
    with pytest.raises(PlanError, match="declares cast"):
        bad.validate()


@pytest.mark.parametrize("spec", sorted(glob.glob("specs/*.layout")))
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_shipped_spec_plans_to_every_format(spec, fmt):
    layout = load_layout(spec)
    if fmt == "universal" and any(t.expert for t in layout.tensors):
        with pytest.raises(Unsupported, match="cannot hold those"):
            compile_plan(layout, fmt)
        return
    plan = compile_plan(layout, fmt, memory=2 << 30, workers=4)
    s = plan.summary()
    assert s["bytes_written"] > 0 and s["files_written"] > 0
    assert s["peak_memory_bytes"] <= 2 << 30


def test_mixtral_plans_from_ep_8_to_ep_4_reading_each_experts_files_where_they_go():
    source = load_layout("specs/mixtral-moe.layout")
    target = load_layout("specs/mixtral-moe.layout", {"ep": 4})
    assert target.mesh.sizes == {"edp": 2, "ep": 4, "tp": 2}
    plan = compile_plan(source, target, memory=2 << 30, workers=4)
    plan.validate()
    s = plan.summary()
    # every state of every tensor is read once (a step counter once per optimizer group)
    sp = plan.source_placement
    logical = sum(sp.state_bytes(t, state) for t in sp.tensors for state in sp.states(t))
    steps = 4 * len(sp.trainable)
    assert logical - steps <= s["bytes_read"] <= logical
    experts = [f for f in plan.target_placement.files() if "_expert_" in f]
    assert len(experts) == 32 * 8 * 2
    held = plan.target_placement.holders("layer_5_expert_3_mp_rank_01_model_states.pt")
    assert str(held) == "{ep=1, tp=1}"  # expert 3 of 8 is on ep rank 3 // 2
    layers = s["experts"]
    assert [e["layer"] for e in layers] == list(range(32))
    assert {(e["experts"], e["source"], e["target"], e["tensors"]) for e in layers} == {
        (8, "ep 8: 1 per rank", "ep 4: 2 per rank", 24)
    }
    # each layer's experts: 8 * 3 matrices of 14336 * 4096, bf16 weights and three fp32
    # states (masters and moments, partitioned with no padding); the expert group's step
    # counters (4 bytes in each of 16 files) are written with one of the layers
    data = 24 * 14336 * 4096 * (2 + 3 * 4)
    assert sorted({e["bytes_written"] - data for e in layers}) == [0, 64]
    text = render(plan)
    assert "experts (per mixture-of-experts layer)" in text and "24 more layers alike" in text


def test_the_shipped_reshard_pairs_plan():
    for a, b in [
        ("gpt2-small", "gpt2-small-dp4"),
        ("llama2-7b", "llama2-7b-tp4"),
        ("llama2-70b-dp8", "llama2-70b"),
    ]:
        plan = compile_plan(
            load_layout(f"specs/{a}.layout"), load_layout(f"specs/{b}.layout"), memory=4 << 30
        )
        assert plan.summary()["bytes_read"] > 0


def test_equally_sliced_tensors_over_the_budget_copy_in_chunks_without_swap():
    a = load_text(
        "mesh { dp = 2 }\noptimizer adam\nzero 1 over dp\ntensor w [64, 16]\nstore deepspeed\n"
    )
    b = load_text(
        "mesh { dp = 3 }\noptimizer adam\nzero 2 over dp\ntensor w [64, 16]\nstore deepspeed\n"
    )
    plan, values, T, result = run(a, b, memory=1024)
    assert {u.mode for u in plan.units if u.state != "pad"} == {"direct"}
    assert plan.summary()["bytes_swapped"] == 0
    assert all(u.stats.peak_bytes <= 1024 for u in plan.units)
    assert_moved_exactly(plan, values, T, result)


def test_a_budget_too_small_for_one_element_is_refused():
    layout = load_text("mesh { dp = 1 }\ntensor w [4]\nstore torch\n")
    with pytest.raises(ValueError, match="too small"):
        compile_plan(layout, "safetensors", memory=8)


@settings(max_examples=25, deadline=None)
@given(layout_pairs(), st.integers(1, 4), st.integers(1, 3), st.sampled_from([None, 64, 400]))
def test_each_rank_runs_its_share_within_its_own_budget(pair, ranks, workers, memory):
    """The planner deals units to ranks; each rank holds at most its budget, and the
    summary states what one rank and all of them together hold at most."""
    plan = compile_plan(*pair, memory=memory, workers=workers, ranks=ranks)
    assert plan.ranks == ranks and plan.workers == workers * ranks
    per_rank = plan.peak_per_rank()
    assert len(per_rank) == ranks
    assert {plan.rank_of(u) for u in plan.units} <= set(range(ranks))
    for rank, peak in enumerate(per_rank):
        mine = sorted(u.stats.peak_bytes for u in plan.units if plan.rank_of(u) == rank)
        assert peak == min(sum(mine[-workers:]) if mine else 0, memory or 1 << 62)
    s = plan.summary()
    assert s["peak_memory_bytes"] == max(per_rank)
    assert s["peak_memory_bytes_all_ranks"] == sum(per_rank)
    assert Plan.from_json(plan.to_json()).summary() == s


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 3),
    st.lists(st.integers(1, 3), min_size=2, max_size=3),
    st.integers(1, 3),
    st.sampled_from([None, 8192]),
)
def test_a_target_assembles_its_blocks_from_other_tensors_exactly(tp, tp2, blocks, rows, memory):
    """``from (a: x, b: y)``: each block of a fused dim comes from a tensor of its own, at
    any split of the source and of the target; ``from x`` renames. (A block taken from
    another tensor is assembled whole in memory: up to 4.2 KB here, so the tight budget is
    8 KiB.)"""
    sizes = [n * tp * tp2 for n in blocks]  # divisible by the split of either end
    source = load_text(
        f"mesh {{ dp = 2, tp = {tp} }}\ndtype bf16\noptimizer adam\nzero 1 over dp\n"
        + "".join(f"tensor part{i} [{rows}, {n} / tp, 3]\n" for i, n in enumerate(sizes))
        + "tensor router [5, 2]\n"
    )
    fused = ", ".join(f"b{i}: {n}" for i, n in enumerate(sizes))
    parts = ", ".join(f"b{i}: part{i}" for i in range(len(sizes)))
    target = load_text(
        f"mesh {{ tp = {tp2} }}\ndtype bf16\noptimizer adam\n"
        f"tensor joined [{rows}, ({fused}) / tp, 3] from ({parts})\n"
        "tensor gate [5, 2] from router\nstore deepspeed\n"
    )
    plan, values, T, result = run(source, target, memory=memory)
    got = M.load(T, result.stored)
    for state in ("weight", "master", "exp_avg"):
        want = np.concatenate([values[f"part{i}"][state] for i in range(len(sizes))], axis=1)
        assert np.array_equal(got["joined"][state].astype(np.float64), want.astype(np.float64))
        assert np.array_equal(got["gate"][state], values["router"][state])
    assert not any("not copied" in w for w in plan.warnings)
