"""The DeepSpeed AutoEP corpus (ds_autoep.py) is what we think it is.

Its ground truth holds every state of every parameter, under DeepSpeed's names with the
experts full and under the Hugging Face model's names, the two agreeing element by element
through the recorded mapping; DeepSpeed's per-expert files exist at ZeRO-1/2 (holding the
saved weights) and not at ZeRO-3; the Hugging Face model takes the second naming strictly and
names what is wrong with a damaged one; DeepSpeed reloads a checkpoint at the topology it was
saved at exactly, and at another world and ep through its universal form.
"""

from __future__ import annotations

from typing import Any

import corpus
import numpy as np
import pytest

pytestmark = pytest.mark.interop

CASES = corpus.AUTOEP_CASES
TAG = "global_step2"
STATES = ("fp32", "exp_avg", "exp_avg_sq", "weight16")


def expected_files(case: dict[str, Any], layers: list[dict[str, Any]]) -> set[str]:
    """ZeRO-1/2: one model-states file, one per (layer, global expert), optimizer files per
    rank; ZeRO-3: model-states and optimizer files per rank, no expert files."""
    prefix = "bf16_" if case["dtype"] == "bf16" else ""
    ranks = range(case["world"])
    files = {f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in ranks}
    if case["stage"] == 3:
        return files | {f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in ranks}
    files.add("mp_rank_00_model_states.pt")
    return files | {
        f"layer_{m['layer']}_expert_{g}_mp_rank_00_model_states.pt"
        for m in layers
        for g in range(m["num_experts"])
    }


def piece(t: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    """The slice ``p`` (an hf_map piece) of the Hugging Face tensor ``t``."""
    index = [slice(None)] * t.ndim
    index[p["dim"]] = slice(p["start"], p["stop"])
    return t[tuple(index)]


@pytest.mark.parametrize("name", list(CASES))
def test_ground_truth_holds_every_state_of_every_parameter_with_experts_full(autoep_corpus, name):
    import torch

    case = CASES[name]
    truth, meta = corpus.read_truth(autoep_corpus[name])
    layers = meta["autoep_layers"]
    assert meta["ep_size"] == case["ep"] and len(layers) == case["model"]["num_hidden_layers"]
    assert meta["step"] == meta["global_steps"] == 2
    assert [g["moe"] for g in meta["param_groups"]] == [False, True]
    assert [g["name"] for g in meta["param_groups"]] == ["dense-params", f"ep_size_{case['ep']}"]
    assert sorted(n for g in meta["param_groups"] for n in g["params"]) == sorted(meta["trainable"])

    experts = {n: m for m in layers for n in m["experts"]}
    for p in meta["params"]:
        for state in STATES:
            assert truth[f"{state}/{p['name']}"].shape == tuple(p["shape"]), (state, p["name"])
        assert p["expert"] == (p["name"] in experts) == (p["group"] == 1), p["name"]
        if p["expert"]:
            m = experts[p["name"]]
            assert p["shape"][0] == m["num_experts"] == case["model"]["num_local_experts"]
            assert p["local_shape"] == [m["num_experts"] // case["ep"], *p["shape"][1:]]
        else:
            assert p["local_shape"] == p["shape"]
    named = {k.split("/", 1)[1] for k in truth if k.split("/", 1)[0] in STATES}
    assert named == set(meta["trainable"])
    for m in layers:
        # Every expert starts from its own draw: no two experts of a layer are equal.
        w1 = truth[f"fp32/{m['module']}.experts.w1"]
        assert len({w1[g].tobytes() for g in range(m["num_experts"])}) == m["num_experts"]

    for n in meta["trainable"]:
        master = torch.from_numpy(truth[f"fp32/{n}"])
        rounded = master.bfloat16().float() if case["dtype"] == "bf16" else master
        np.testing.assert_array_equal(truth[f"weight16/{n}"], rounded.numpy(), err_msg=n)


@pytest.mark.parametrize("name", list(CASES))
def test_the_two_namings_agree_element_by_element_through_the_recorded_mapping(autoep_corpus, name):
    case = CASES[name]
    truth, meta = corpus.read_truth(autoep_corpus[name])
    hf_map, ffn = meta["hf_map"], case["model"]["intermediate_size"]
    # hf_params keeps the state dict's order; the json's maps are sorted.
    assert sorted(p["name"] for p in meta["hf_params"]) == sorted(hf_map)
    assert {k.split("/", 1)[1] for k in truth if k.startswith("hf/")} == set(hf_map)
    assert {k.split("/", 1)[1] for k in truth if k.startswith("hf16/")} == set(hf_map)

    # The mapping is the documented one.
    for m in meta["autoep_layers"]:
        mod = m["module"]
        assert hf_map[f"{mod}.gate.weight"] == [
            {"param": f"{mod}.router.gate.weight", "dim": 0, "start": 0, "stop": m["num_experts"]}
        ]
        assert hf_map[f"{mod}.experts.gate_up_proj"] == [
            {"param": f"{mod}.experts.w1", "dim": 1, "start": 0, "stop": ffn},
            {"param": f"{mod}.experts.w3", "dim": 1, "start": ffn, "stop": 2 * ffn},
        ]
        assert hf_map[f"{mod}.experts.down_proj"] == [
            {"param": f"{mod}.experts.w2", "dim": 0, "start": 0, "stop": m["num_experts"]}
        ]
    used = [p["param"] for pieces in hf_map.values() for p in pieces]
    assert sorted(used) == sorted(meta["trainable"])  # each parameter lands exactly once

    for p in meta["hf_params"]:
        hf, hf16 = truth[f"hf/{p['name']}"], truth[f"hf16/{p['name']}"]
        assert list(hf.shape) == p["shape"] == list(hf16.shape)
        pieces = hf_map[p["name"]]
        dim = pieces[0]["dim"]
        assert [(q["start"], q["stop"]) for q in pieces] == list(
            zip([0] + [q["stop"] for q in pieces[:-1]], [q["stop"] for q in pieces], strict=True)
        ), p["name"]
        assert pieces[-1]["stop"] == hf.shape[dim] and {q["dim"] for q in pieces} == {dim}
        for q in pieces:
            np.testing.assert_array_equal(piece(hf, q), truth[f"fp32/{q['param']}"])
            np.testing.assert_array_equal(piece(hf16, q), truth[f"weight16/{q['param']}"])


@pytest.mark.parametrize("name", list(CASES))
def test_per_expert_files_hold_the_saved_weights_at_zero1_and_2_and_are_absent_at_zero3(
    autoep_corpus, name
):
    import torch

    case = CASES[name]
    root = autoep_corpus[name]
    truth, meta = corpus.read_truth(root)
    layers = meta["autoep_layers"]
    assert {p.name for p in (root / TAG).iterdir()} == expected_files(case, layers)
    saved = meta["ds_autoep_layers"]
    fmt = "zero3_partitioned" if case["stage"] == 3 else "per_expert_files"
    assert [d["checkpoint_format"] for d in saved] == [fmt] * len(layers)
    assert [(d["module_path"], d["num_experts"], d["ep_size"]) for d in saved] == [
        (m["module"], m["num_experts"], case["ep"]) for m in layers
    ]
    if case["stage"] == 3:
        by_rank = meta["ds_autoep_layers_by_rank"]
        assert [by_rank[str(r)][0]["ep_rank"] for r in range(case["world"])] == [
            r % case["ep"] for r in range(case["world"])
        ]
        return
    for m in layers:
        for g in range(m["num_experts"]):
            f = root / TAG / f"layer_{m['layer']}_expert_{g}_mp_rank_00_model_states.pt"
            sd = torch.load(f, weights_only=True)
            assert sorted(sd) == sorted(f"{n}.{g}" for n in m["experts"])
            for n in m["experts"]:
                np.testing.assert_array_equal(
                    sd[f"{n}.{g}"].float().numpy(), truth[f"weight16/{n}"][g]
                )


def test_the_hugging_face_model_takes_the_hf_naming_strictly_and_names_what_is_wrong(
    autoep_corpus, ds_python, tmp_path
):
    from safetensors.numpy import save_file

    name = "autoep_z2_w4_ep2_bf16"
    truth, _ = corpus.read_truth(autoep_corpus[name])
    hf = {k.split("/", 1)[1]: v for k, v in truth.items() if k.startswith("hf/")}
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    save_file(hf, str(good / "model.safetensors"))
    report = corpus.hf_load_strict(name, good, python=ds_python)
    assert report == {
        "files": ["model.safetensors"],
        "missing": [],
        "unexpected": [],
        "error": None,
    }

    gate_up = "model.layers.0.mlp.experts.gate_up_proj"
    broken = {k: v for k, v in hf.items() if k != gate_up}
    broken["model.layers.0.mlp.experts.w1"] = hf[gate_up][
        :, : CASES[name]["model"]["intermediate_size"]
    ]
    save_file(broken, str(bad / "model.safetensors"))
    report = corpus.hf_load_strict(name, bad, python=ds_python)
    assert report["missing"] == [gate_up]
    assert report["unexpected"] == ["model.layers.0.mlp.experts.w1"]
    assert report["error"] is not None and gate_up in report["error"]


def test_deepspeed_resumes_an_autoep_checkpoint_at_its_own_topology(autoep_corpus, ds_python):
    name = "autoep_z2_w2_ep2_bf16"
    truth, meta = corpus.read_truth(autoep_corpus[name])
    loaded = corpus.load(
        name, autoep_corpus[name], root=autoep_corpus[name].parent.parent, python=ds_python
    )
    corpus.assert_resumed(loaded, truth, meta)
    assert loaded.meta["hf_map"] == meta["hf_map"]


def test_deepspeed_resumes_an_autoep_checkpoint_through_universal_at_another_world_and_ep(
    autoep_corpus, ds_python, tmp_path
):
    # DeepSpeed's own ds_to_universal, then load_universal at world 4 and ep 4 (one expert
    # per rank, no expert data parallelism).
    name = "autoep_z2_w2_ep2_bf16"
    truth, meta = corpus.read_truth(autoep_corpus[name])
    out = corpus.ds_to_universal(autoep_corpus[name] / TAG, tmp_path, python=ds_python)
    loaded = corpus.load(
        name,
        out,
        world=4,
        ep=4,
        universal=True,
        root=autoep_corpus[name].parent.parent,
        python=ds_python,
    )
    corpus.assert_resumed(loaded, truth, meta)
    assert loaded.meta["partition_count"] == [4, 1]
    # The expert group keeps the name it was saved under.
    assert [g["name"] for g in loaded.meta["param_groups"]] == ["dense-params", "ep_size_2"]
