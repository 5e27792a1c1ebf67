"""The DeepSpeed Mixture-of-Experts corpus (ds_moe.py) is what we think it is.

Its ground truth names every parameter, every expert of every MoE layer under its global id,
and DeepSpeed's own per-expert files match; DeepSpeed reloads a checkpoint at the topology it
was saved at exactly, refuses a ZeRO-2 one at another data-parallel world size, and reloads a
ZeRO-0 one at another data-parallel world size with the same ep exactly.
"""

from __future__ import annotations

from typing import Any

import corpus
import numpy as np
import pytest

pytestmark = pytest.mark.interop

CASES = corpus.MOE_CASES
TAG = "global_step2"
STATES = ("fp32", "exp_avg", "exp_avg_sq", "weight16")


def expected_files(case: dict[str, Any], layers: list[dict[str, Any]]) -> set[str]:
    """DeepSpeed's file names: one per (MoE layer, global expert), optimizer files per ep rank
    without ZeRO, per data-parallel rank with it."""
    files = {"mp_rank_00_model_states.pt"}
    files |= {
        f"layer_{m['layer']}_expert_{g}_mp_rank_00_model_states.pt"
        for m in layers
        for g in range(m["num_experts"])
    }
    if case["stage"] == 0:
        files |= {f"expp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(case["ep"])}
    else:
        prefix = "bf16_" if case["dtype"] == "bf16" else ""
        files |= {
            f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(case["world"])
        }
    return files


@pytest.mark.parametrize("name", list(CASES))
def test_ground_truth_holds_every_expert_of_every_layer_under_its_global_id(moe_corpus, name):
    case = CASES[name]
    root = moe_corpus[name]
    truth, meta = corpus.read_truth(root)
    layers = meta["moe_layers"]
    assert meta["ep_size"] == case["ep"]
    assert [m["num_experts"] for m in layers] == case["model"]["experts"]
    assert {p.name for p in (root / TAG).iterdir()} == expected_files(case, layers)

    for p in meta["params"]:
        for state in STATES:
            assert truth[f"{state}/{p['name']}"].shape == tuple(p["shape"]), (state, p["name"])
    assert {k.split("/", 1)[1] for k in truth} == set(meta["trainable"])

    experts = meta["experts"]
    held = {(e["layer"], e["expert"]) for e in experts.values()}
    assert held == {(m["layer"], g) for m in layers for g in range(m["num_experts"])}
    for name_, e in experts.items():
        assert f".deepspeed_experts.{e['expert']}." in name_
        assert e["ep_rank"] == e["expert"] // layers[e["layer"]]["num_local_experts"]
        assert (root / TAG / e["file"]).is_file()
    # Each expert starts from its own seed: no two experts of a layer hold the same master.
    for m in layers:
        firsts = sorted(n for n, e in experts.items() if e["layer"] == m["layer"])
        first_param = firsts[0].split(".deepspeed_experts.", 1)[1].split(".", 1)[1]
        values = [
            truth[f"fp32/{m['module']}.deepspeed_moe.experts.deepspeed_experts.{g}.{first_param}"]
            for g in range(m["num_experts"])
        ]
        assert len({v.tobytes() for v in values}) == m["num_experts"], m["module"]

    groups = meta["param_groups"]
    assert [g["moe"] for g in groups] == [False, False, True, True]
    assert [g["name"] for g in groups] == ["decay", "no_decay", *[f"ep_size_{case['ep']}"] * 2]
    assert sorted(n for g in groups for n in g["params"]) == sorted(meta["trainable"])
    assert all(g["moe"] == all(n in experts for n in g["params"]) for g in groups)
    dense, edp = case["world"], case["world"] // case["ep"]
    want = [None] * 4 if case["stage"] == 0 else [dense, dense, edp, edp]
    assert [g["partition_count"] for g in groups] == want
    assert meta["step"] == meta["global_steps"] == 2
    if case["dtype"] == "fp32":
        for n in meta["trainable"]:
            np.testing.assert_array_equal(truth[f"weight16/{n}"], truth[f"fp32/{n}"], err_msg=n)


def test_deepspeed_resumes_a_moe_checkpoint_at_its_own_topology(moe_corpus, ds_python):
    name = "moe_z2_w2_ep2_bf16"
    truth, meta = corpus.read_truth(moe_corpus[name])
    loaded = corpus.load(
        name, moe_corpus[name], root=moe_corpus[name].parent.parent, python=ds_python
    )
    corpus.assert_resumed(loaded, truth, meta)
    assert loaded.meta["experts"] == meta["experts"]


def test_deepspeed_refuses_a_zero2_moe_checkpoint_at_another_data_parallel_size(
    moe_corpus, ds_python
):
    name = "moe_z2_w2_ep2_bf16"
    loaded = corpus.load(
        name,
        moe_corpus[name],
        world=4,
        ep=2,
        root=moe_corpus[name].parent.parent,
        python=ds_python,
        expect_error=True,
    )
    assert "used a DP world size of 2 but the current world size is 4" in loaded.error


def test_deepspeed_resumes_a_zero0_moe_checkpoint_at_another_data_parallel_size_and_same_ep(
    moe_corpus, ds_python
):
    # Without ZeRO nothing is partitioned over data parallelism: expp_rank_{R} files are per
    # ep rank and experts per global id, so world 4 -> 2 at ep 2 reads the same files.
    name = "moe_z0_w4_ep2_fp32"
    truth, meta = corpus.read_truth(moe_corpus[name])
    loaded = corpus.load(
        name, moe_corpus[name], world=2, root=moe_corpus[name].parent.parent, python=ds_python
    )
    corpus.assert_resumed(loaded, truth, meta)
