"""The DeepSpeed corpus is what we think it is.

For every case: DeepSpeed's file names; a ground-truth entry for every parameter; the ground
truth agrees with the files themselves (decoded with the padding rules of
shared/reference/deepspeed.md §1.4/§1.5, which this also checks); and ds_load.py, reloading
the original checkpoint at the same world size, reproduces the ground truth exactly (which
validates the loader that other interop tests use on layoutc's output).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import corpus
import numpy as np
import pytest

pytestmark = pytest.mark.interop

CASES = corpus.CASES
NAMES = list(CASES)
TAG = "global_step2"
# Scalar state that a reload must reproduce exactly (ds_make.capture's json keys).
RELOADED_META = (
    "step",
    "optimizer_steps",
    "flat_groups",
    "global_steps",
    "global_samples",
    "skipped_steps",
    "lr_scheduler",
    "lr_scheduler_class",
    "lr",
    "loss_scaler",
    "optimizer_class",
    "zero_stage",
    "param_groups",
    "params",
    "trainable",
    "frozen",
    "tied",
    "buffers",
)


def expected_files(case: dict[str, Any]) -> set[str]:
    world, stage = case["world"], case["stage"]
    prefix = "bf16_" if case["dtype"] == "bf16" else ""
    files = {f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)}
    if stage == 3:
        files |= {f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)}
    else:
        files.add("mp_rank_00_model_states.pt")
    return files


@pytest.mark.parametrize("name", NAMES)
def test_files_have_deepspeeds_names(ds_corpus, name):
    root: Path = ds_corpus[name]
    assert (root / "latest").read_text() == TAG
    top = {p.name for p in root.iterdir()}
    assert top == {
        "latest",
        TAG,
        "ground_truth.safetensors",
        "ground_truth.json",
        "DONE",
    }, "zero_to_fp32.py / zero_to_torch.py must be gone"
    assert {p.name for p in (root / TAG).iterdir()} == expected_files(CASES[name])


@pytest.mark.parametrize("name", NAMES)
def test_ground_truth_covers_every_param(ds_corpus, name):
    case = CASES[name]
    tensors, meta = ds_corpus.truth(name)
    assert meta["case"] == name and meta["world_size"] == case["world"]
    assert meta["versions"]["deepspeed"] == corpus.versions(ds_corpus.python)["deepspeed"]
    assert meta["zero_stage"] == case["stage"]
    assert meta["step"] == 2 and meta["global_steps"] == 2 and meta["skipped_steps"] == 0
    assert meta["tag"] == TAG
    assert meta["lr_scheduler"] is not None
    assert meta["tied"] == {"head.weight": "embed.weight"}
    assert meta["frozen"] == ["logit_bias"]
    assert meta["buffers"] == ["counter", "table"]
    assert meta["non_persistent_buffers"] == ["scratch"]
    assert [len(g["params"]) for g in meta["param_groups"]] == [3, 5]
    if name == "bf16opt_w2":
        assert meta["optimizer_class"] == "BF16_Optimizer"
    if name == "z3_w2_subgroups":
        assert len(meta["flat_groups"]) == 5

    shapes = {p["name"]: tuple(p["shape"]) for p in meta["params"]}
    trainable = meta["trainable"]
    assert sorted(trainable) == sorted(n for g in meta["param_groups"] for n in g["params"])
    expected = {f"{k}/{n}" for n in trainable for k in ("fp32", "exp_avg", "exp_avg_sq")}
    expected |= {f"weight16/{p['name']}" for p in meta["params"] if p["requires_grad"]}
    expected |= {"frozen/logit_bias", "buffer/counter", "buffer/table"}
    assert set(tensors) == expected
    for key, t in tensors.items():
        assert t.dtype == np.float32, key
        kind, _, pname = key.partition("/")
        if kind != "buffer":
            assert t.shape == shapes[pname], key
        assert np.isfinite(t).all(), key
    assert (tensors["exp_avg_sq/embed.weight"] > 0).any()
    np.testing.assert_array_equal(tensors["weight16/head.weight"], tensors["weight16/embed.weight"])
    np.testing.assert_array_equal(tensors["buffer/counter"], [2.0])

    # The 16-bit weights are the fp32 masters rounded to nearest (even).
    for n in trainable:
        np.testing.assert_array_equal(
            tensors[f"weight16/{n}"], _round(tensors[f"fp32/{n}"], case["dtype"]), err_msg=n
        )
    if case["dtype"] != "fp32":
        # ... and the masters hold bits that the 16-bit copies lack (the steps moved them).
        assert any(
            not np.array_equal(tensors[f"weight16/{n}"], tensors[f"fp32/{n}"]) for n in trainable
        )


def _round(x: np.ndarray, dtype: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "fp32":
        return x
    if dtype == "fp16":
        return x.astype(np.float16).astype(np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


# --------------------------------------------------------------------------------------------
# The files themselves (needs torch, and deepspeed for the optimizer files' pickled classes)
# --------------------------------------------------------------------------------------------


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


@pytest.mark.parametrize("name", NAMES)
def test_model_files_agree_with_ground_truth(ds_corpus, name):
    torch = pytest.importorskip("torch")
    case = CASES[name]
    tensors, meta = ds_corpus.truth(name)
    tagdir = ds_corpus[name] / TAG
    files = sorted(tagdir.glob("*model_states.pt"))
    for f in files:
        # Model-state files need no DeepSpeed class to unpickle.
        sd = torch.load(f, map_location="cpu", weights_only=True)
        assert sd["ds_version"] == meta["versions"]["deepspeed"]
        assert sd["global_steps"] == 2
        assert sd["dp_world_size"] == case["world"] and sd["mp_world_size"] == 1
        assert sd["buffer_names"] == meta["buffers"]
        # shared_params is computed on global rank 0 only: other ranks' ZeRO-3 files hold {}.
        rank0 = f.name.startswith(("mp_rank_", "zero_pp_rank_0_"))
        assert sd["shared_params"] == ({"head.weight": "embed.weight"} if rank0 else {})
        assert _jsonish(sd["lr_scheduler"]) == meta["lr_scheduler"]
        flat = [[n for n in g] for g in sd["param_shapes"]]
        assert flat == [g["params"] for g in meta["flat_groups"]]
        for g in sd["param_shapes"]:
            for n, shape in g.items():
                assert tuple(shape) == tensors[f"fp32/{n}"].shape
        for b in meta["buffers"]:
            np.testing.assert_array_equal(_np(sd["module"][b]), tensors[f"buffer/{b}"])
        if case["stage"] == 3:
            assert all(sd["module"][p["name"]].numel() == 0 for p in meta["params"])
        else:
            for p in meta["params"]:
                kind = "weight16" if p["requires_grad"] else "frozen"
                np.testing.assert_array_equal(
                    _np(sd["module"][p["name"]]), tensors[f"{kind}/{p['name']}"]
                )
        if case["stage"] == 1:
            assert sd["frozen_param_shapes"] is None
        else:
            assert dict(sd["frozen_param_shapes"]) == {"logit_bias": torch.Size([37])}


def _jsonish(x: Any) -> Any:
    """``x`` as ds_make.capture's json holds it (tuples as lists, keys as str)."""
    if isinstance(x, dict):
        return {str(k): _jsonish(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonish(v) for v in x]
    return x


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_files_agree_with_ground_truth(ds_corpus, name):
    """Decode the optimizer files with the documented ZeRO rules; get the ground truth back."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("deepspeed")  # the optimizer files pickle DeepSpeed classes
    case = CASES[name]
    world = case["world"]
    tensors, meta = ds_corpus.truth(name)
    tagdir = ds_corpus[name] / TAG
    prefix = "bf16_" if case["dtype"] == "bf16" else ""
    optim = [
        torch.load(
            tagdir / f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
            map_location="cpu",
            weights_only=False,
        )["optimizer_state_dict"]
        for r in range(world)
    ]
    groups = [g["params"] for g in meta["flat_groups"]]
    shapes = {n: tensors[f"fp32/{n}"].shape for g in groups for n in g}
    got: dict[str, np.ndarray] = {}
    if case["stage"] == 3:
        assert all(o["partition_count"] == world for o in optim)
        for s, names in enumerate(groups):
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                if key == "fp32":
                    flats = [_np(o["fp32_flat_groups"][s]) for o in optim]
                else:
                    flats = [_np(o["optimizer_state_dict"]["state"][s][key]) for o in optim]
                off = 0
                for n in names:
                    numel = math.prod(shapes[n])
                    pn = math.ceil(numel / world)  # per-rank piece, padding at the tail
                    full = np.concatenate([f[off : off + pn] for f in flats])
                    # Padding of the Adam moments is 0; the fp32 masters' ZeRO-3 padding is
                    # uninitialised memory (arbitrary bytes, differing run to run).
                    if key != "fp32":
                        assert not full[numel:].any(), f"non-zero padding in {key}/{n}"
                    got[f"{key}/{n}"] = full[:numel].reshape(shapes[n])
                    off += pn
                assert all(len(f) == off for f in flats)
                assert all(o["optimizer_state_dict"]["state"][s]["step"] == 2 for o in optim)
        frozen = [
            torch.load(f, map_location="cpu", weights_only=True)["frozen_param_fragments"]
            for f in sorted(tagdir.glob("zero_pp_rank_*_model_states.pt"))
        ]
        full = np.concatenate([_np(fr["logit_bias"]).ravel() for fr in frozen])
        np.testing.assert_array_equal(full[:37], tensors["frozen/logit_bias"])
    else:
        bf16opt = meta["optimizer_class"] == "BF16_Optimizer"
        assert all(("zero_stage" in o) != bf16opt for o in optim)
        for g, names in enumerate(groups):
            total = sum(math.prod(shapes[n]) for n in names)
            align = 2 * world
            part = math.ceil(total / align) * align // world
            for r, o in enumerate(optim):
                assert o["partition_count"][g] == world
                pad = min(max((r + 1) * part - total, 0), part)
                assert o["group_paddings"][g] == pad
                fp32_len = part if bf16opt else part - pad  # BF16_Optimizer keeps the padding
                assert o["single_partition_of_fp32_groups"][g].numel() == fp32_len
                st = o["base_optimizer_state"]["state"][g]
                assert st["exp_avg"].numel() == part and st["step"] == 2
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                if key == "fp32":
                    flat = np.concatenate(
                        [_np(o["single_partition_of_fp32_groups"][g]) for o in optim]
                    )
                else:
                    flat = np.concatenate(
                        [_np(o["base_optimizer_state"]["state"][g][key]) for o in optim]
                    )
                off = 0
                for n in names:
                    numel = math.prod(shapes[n])
                    got[f"{key}/{n}"] = flat[off : off + numel].reshape(shapes[n])
                    off += numel
                assert off == total and not flat[total:].any()
    for key, value in got.items():
        np.testing.assert_array_equal(value, tensors[key], err_msg=key)
    assert set(got) == {k for k in tensors if k.split("/")[0] in ("fp32", "exp_avg", "exp_avg_sq")}


# --------------------------------------------------------------------------------------------
# The loader: DeepSpeed reloading its own checkpoint at the same world size
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_reload_same_world_reproduces_ground_truth(ds_corpus, name):
    tensors, meta = ds_corpus.truth(name)
    loaded = ds_corpus.load(name, ds_corpus[name])
    assert loaded.meta["world_size"] == CASES[name]["world"]
    assert set(loaded.tensors) == set(tensors)
    for key, t in tensors.items():
        np.testing.assert_array_equal(loaded.tensors[key], t, err_msg=key)
    for key in RELOADED_META:
        assert loaded.meta[key] == meta[key], key


def test_reload_at_another_world_is_refused(ds_corpus):
    """Without universal loading DeepSpeed refuses a DP-size change: the loader reports it."""
    loaded = ds_corpus.load("z2_w2_bf16", ds_corpus["z2_w2_bf16"], world=3, expect_error=True)
    assert "world size" in loaded.error


@pytest.mark.parametrize("name", ["z2_w2_bf16", "z3_w2_bf16"])
def test_universal_reload_via_deepspeeds_converter(ds_corpus, name, tmp_path):
    """The loader's --universal path, fed by DeepSpeed's own ds_to_universal, at world 3.

    Everything comes back exactly except persistent buffers: universal loading restores no
    buffers (nor frozen params: logit_bias matches only because the model is re-initialised
    from the same seed).
    """
    tensors, meta = ds_corpus.truth(name)
    uni = corpus.ds_to_universal(ds_corpus[name] / TAG, tmp_path, python=ds_corpus.python)
    assert (uni / "latest_universal").read_text().strip() == f"{TAG}_universal"
    loaded = ds_corpus.load(name, uni, world=3, universal=True)
    assert loaded.meta["world_size"] == 3
    assert set(loaded.tensors) == set(tensors)
    for key, t in tensors.items():
        if key == "buffer/counter":
            np.testing.assert_array_equal(loaded.tensors[key], [0.0])  # fresh, not restored
        else:
            np.testing.assert_array_equal(loaded.tensors[key], t, err_msg=key)
    for key in ("step", "global_steps", "global_samples", "lr_scheduler", "lr"):
        assert loaded.meta[key] == meta[key], key
    groups = loaded.meta["param_groups"]
    if CASES[name]["stage"] == 3:
        # DeepSpeed bug: a ZeRO-3 universal load applies param group 0's hyperparameters to
        # every group, so no_decay comes back with weight_decay 0.1.
        assert [g["weight_decay_loaded"] for g in groups] == [0.1, 0.1]
        for g in groups:
            g["weight_decay_loaded"] = g["weight_decay"]
    assert groups == meta["param_groups"]


# --------------------------------------------------------------------------------------------
# Pipeline and tensor-parallel cases (ds_parallel.py): full tensors, TP slices, layer files
# --------------------------------------------------------------------------------------------

PARALLEL = corpus.PARALLEL_CASES
PARALLEL_NAMES = list(PARALLEL)
# The scalar and layout state a reload at the same pp and tp must reproduce exactly.
PARALLEL_RELOADED_META = (
    *(k for k in RELOADED_META if k not in ("optimizer_steps", "flat_groups")),
    "pipe_tied",
    "tp_layout",
    "layer_files",
    "mp_ranks",
)


def _model_file(case: dict[str, Any], mp: int, dp: int = 0) -> str:
    if case["stage"] == 3:
        return f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt"
    return f"mp_rank_{mp:02d}_model_states.pt"


def parallel_expected_files(case: dict[str, Any]) -> set[str]:
    """DeepSpeed's file names (shared/reference/deepspeed.md §1.1) for pp * tp * dp."""
    pp, tp, dp = case["pp"], case["tp"], case["dp"]
    mp = pp * tp  # mp_rank = stage * tp + tp rank
    files = {_model_file(case, m) for m in range(mp)}
    if case["stage"] == 3:  # one model-states file per rank
        files = {_model_file(case, m, d) for m in range(mp) for d in range(dp)}
    if case["stage"] > 0:
        prefix = "bf16_" if case["dtype"] == "bf16" else ""
        files |= {
            f"{prefix}zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt"
            for d in range(dp)
            for m in range(mp)
        }
    if case["kind"] == "pipe":
        # Layers 0 (tied embed) .. blocks + 1 (Final); the tied head position writes no file.
        tp_part = [f"-model_{t:02d}" for t in range(tp)] if tp > 1 else [""]
        files |= {
            f"layer_{i:02d}{part}-model_states.pt"
            for i in range(case["model"]["blocks"] + 2)
            for part in tp_part
        }
    return files


def full_shapes(case: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every parameter's full shape, from the model config alone."""
    m = case["model"]
    if case["kind"] == "pipe":
        v, h, f = m["vocab"], m["hidden"], m["ffn"]
        shapes = {"tied_modules.embed.weight": (v, h)}
        for i in range(1, m["blocks"] + 1):
            shapes |= {
                f"{i}.fc1.weight": (f, h),
                f"{i}.fc1.bias": (f,),
                f"{i}.fc2.weight": (h, f),
                f"{i}.fc2.bias": (h,),
            }
        last = m["blocks"] + 1
        shapes |= {f"{last}.{n}": (h,) for n in ("norm.weight", "norm.bias", "shift")}
        shapes[f"{last}.scale"] = (1,)
        return shapes
    v, h, inter = m["vocab_size"], m["hidden_size"], m["intermediate_size"]
    hd = h // m["num_attention_heads"]
    q, kv = m["num_attention_heads"] * hd, m["num_key_value_heads"] * hd
    shapes = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for i in range(m["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        shapes |= {
            pre + "self_attn.q_proj.weight": (q, h),
            pre + "self_attn.k_proj.weight": (kv, h),
            pre + "self_attn.v_proj.weight": (kv, h),
            pre + "self_attn.o_proj.weight": (h, q),
            pre + "mlp.gate_proj.weight": (inter, h),
            pre + "mlp.up_proj.weight": (inter, h),
            pre + "mlp.down_proj.weight": (h, inter),
            pre + "input_layernorm.weight": (h,),
            pre + "post_attention_layernorm.weight": (h,),
        }
    return shapes


def expected_split_dim(case: dict[str, Any], name: str) -> int | None:
    """How the case's TP splits ``name``: column-parallel on dim 0, row-parallel on dim 1."""
    if case["tp"] == 1:
        return None
    if case["kind"] == "pipe":
        return {"fc1.weight": 0, "fc1.bias": 0, "fc2.weight": 1}.get(name.split(".", 1)[1])
    leaf = name.rsplit(".", 2)[-2]
    return {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0}.get(
        leaf, {"o_proj": 1, "down_proj": 1, "lm_head": 0}.get(leaf)
    )


def tp_slice(full: np.ndarray, tp: dict[str, Any], rank: int) -> np.ndarray:
    """TP rank ``rank``'s slice of ``full`` per the ground truth's {"dim", "sizes"}."""
    if tp["dim"] is None:
        return full
    start = sum(tp["sizes"][:rank])
    index = [slice(None)] * full.ndim
    index[tp["dim"]] = slice(start, start + tp["sizes"][rank])
    return full[tuple(index)]


@pytest.mark.parametrize("name", PARALLEL_NAMES)
def test_parallel_files_have_deepspeeds_names(ds_corpus, name):
    root: Path = ds_corpus[name]
    assert (root / "latest").read_text() == TAG
    assert {p.name for p in root.iterdir()} == {
        "latest",
        TAG,
        "ground_truth.safetensors",
        "ground_truth.json",
        "DONE",
    }
    assert {p.name for p in (root / TAG).iterdir()} == parallel_expected_files(PARALLEL[name])


@pytest.mark.parametrize("name", PARALLEL_NAMES)
def test_parallel_ground_truth_is_full_and_complete(ds_corpus, name):
    case = PARALLEL[name]
    tensors, meta = ds_corpus.truth(name)
    assert meta["case"] == name and meta["world_size"] == case["world"]
    assert meta["topology"] == {"pp": case["pp"], "tp": case["tp"], "dp": case["dp"]}
    assert meta["zero_stage"] == case["stage"]
    assert meta["step"] == 2 and meta["global_steps"] == 2 and meta["skipped_steps"] == 0
    assert meta["lr_scheduler"] is not None and meta["tag"] == TAG
    assert [m["mp_rank"] for m in meta["mp_ranks"]] == list(range(case["pp"] * case["tp"]))
    for m in meta["mp_ranks"]:
        assert m["mp_rank"] == m["stage"] * case["tp"] + m["tp_rank"]

    shapes = full_shapes(case)
    params = {p["name"]: p for p in meta["params"]}
    assert set(params) == set(shapes)
    for n, p in params.items():
        assert tuple(p["shape"]) == shapes[n], n
        assert p["tp"] == meta["tp_layout"][n], n
        assert p["tp"]["dim"] == expected_split_dim(case, n), n
        if p["tp"]["dim"] is not None:
            assert sum(p["tp"]["sizes"]) == shapes[n][p["tp"]["dim"]], n
    trainable = meta["trainable"]
    expected = {f"{k}/{n}" for n in trainable for k in ("fp32", "exp_avg", "exp_avg_sq")}
    expected |= {f"weight16/{n}" for n in trainable}
    expected |= {f"frozen/{n}" for n in meta["frozen"]} | {f"buffer/{b}" for b in meta["buffers"]}
    assert set(tensors) == expected
    for key, t in tensors.items():
        kind, _, pname = key.partition("/")
        assert t.dtype == np.float32 and np.isfinite(t).all(), key
        if kind != "buffer":
            assert t.shape == shapes[pname], key
    for n in trainable:
        np.testing.assert_array_equal(
            tensors[f"weight16/{n}"], _round(tensors[f"fp32/{n}"], case["dtype"]), err_msg=n
        )
    assert all((tensors[f"exp_avg_sq/{n}"] > 0).any() for n in trainable)

    if case["kind"] == "pipe":
        last = case["model"]["blocks"] + 1
        # tied across stages: the embedding/head, when there are two stages
        tied = {"tied_modules.embed.weight": [0, 1]} if case["pp"] == 2 else {}
        assert meta["pipe_tied"] == tied
        assert meta["frozen"] == [f"{last}.shift"]
        assert meta["buffers"] == [f"{i}.table" for i in range(1, last)] + [f"{last}.counter"]
        # Final counts its forward passes: 2 steps of GAS_PIPE = 2 micro-batches.
        np.testing.assert_array_equal(tensors[f"buffer/{last}.counter"], [4.0])
        assert meta["layer_files"]["tied_modules.embed.weight"] == {"layer": 0, "key": "weight"}
        assert meta["layer_files"]["1.fc1.weight"] == {"layer": 1, "key": "fc1.weight"}
    else:
        assert meta["pipe_tied"] == {} and meta["frozen"] == [] and meta["buffers"] == []
        vocab = case["model"]["vocab_size"]
        sizes = meta["tp_layout"]["lm_head.weight"]["sizes"]
        assert sizes == [-(-vocab // case["tp"])] + [vocab // case["tp"]] * (case["tp"] - 1)
        if case["tp"] > case["model"]["num_key_value_heads"]:
            # More TP ranks than key/value heads: the ranks past the heads hold empty slices.
            k = meta["tp_layout"]["model.layers.0.self_attn.k_proj.weight"]["sizes"]
            assert k[-1] == 0 and sum(k) == shapes["model.layers.0.self_attn.k_proj.weight"][0]


def _local(tensors: dict[str, np.ndarray], meta: dict[str, Any], name: str, tp_rank: int):
    """What the files of ``tp_rank`` hold for module tensor ``name`` (16-bit as fp32)."""
    params = {p["name"]: p for p in meta["params"]}
    if name in params:
        kind = "weight16" if params[name]["requires_grad"] else "frozen"
    else:
        kind = "buffer"
    return tp_slice(tensors[f"{kind}/{name}"], meta["tp_layout"][name], tp_rank)


@pytest.mark.parametrize("name", PARALLEL_NAMES)
def test_parallel_model_files_agree_with_ground_truth(ds_corpus, name):
    """The files hold the ground truth's TP slices: layer files (pipelines) or the mp_rank
    files' module (AutoTP), and the ZeRO-0 pipeline's torch optimizer state."""
    torch = pytest.importorskip("torch")
    case = PARALLEL[name]
    tensors, meta = ds_corpus.truth(name)
    tagdir = ds_corpus[name] / TAG
    params = {p["name"]: p for p in meta["params"]}
    for m in meta["mp_ranks"]:
        t = m["tp_rank"]
        sd = torch.load(tagdir / _model_file(case, m["mp_rank"]), weights_only=True)
        assert sd["ds_version"] == meta["versions"]["deepspeed"] and sd["global_steps"] == 2
        assert sd["checkpoint_parallel_dimensions"] == {
            "pp_degree": case["pp"],
            "tp_degree": case["tp"],
        }
        assert sd["mp_world_size"] == case["pp"] * case["tp"]
        assert sd["dp_world_size"] == case["dp"]
        assert _jsonish(sd["lr_scheduler"]) == meta["lr_scheduler"]
        local_shapes = {
            n: _local(tensors, meta, n, t).shape for n in m["params"] if params[n]["requires_grad"]
        }
        if case["stage"] == 0:
            assert sd["param_shapes"] is None
            # The torch optimizer's state, params numbered in its param-group order.
            opt = sd["optimizer"]
            order = [n for g in m["flat_groups"] for n in g]
            assert [i for g in opt["param_groups"] for i in g["params"]] == list(range(len(order)))
            for i, n in enumerate(order):
                st = opt["state"][i]
                assert st["step"] == 2
                for key in ("exp_avg", "exp_avg_sq"):
                    np.testing.assert_array_equal(
                        _np(st[key]),
                        tp_slice(tensors[f"{key}/{n}"], params[n]["tp"], t),
                        err_msg=f"{key}/{n}",
                    )
        else:
            assert [list(g) for g in sd["param_shapes"]] == m["flat_groups"]
            for g in sd["param_shapes"]:
                for n, shape in g.items():
                    assert tuple(shape) == local_shapes[n], n
        if case["kind"] == "pipe":
            assert sd["module"] is None
        else:
            assert set(sd["module"]) == set(m["params"])
            for n in m["params"]:
                if case["stage"] == 3:  # partitioned away: a 0-element stub
                    assert sd["module"][n].numel() == 0, n
                    continue
                np.testing.assert_array_equal(
                    _np(sd["module"][n]), _local(tensors, meta, n, t), err_msg=n
                )
    if case["kind"] == "pipe":
        tp_part = [f"-model_{t:02d}" for t in range(case["tp"])] if case["tp"] > 1 else [""]
        seen = set()
        for n, where in meta["layer_files"].items():
            for t, part in enumerate(tp_part):
                f = tagdir / f"layer_{where['layer']:02d}{part}-model_states.pt"
                layer = torch.load(f, map_location="cpu", weights_only=True)
                np.testing.assert_array_equal(
                    _np(layer[where["key"]]), _local(tensors, meta, n, t), err_msg=n
                )
                seen.add((f.name, where["key"]))
        # ... and nothing else: every key of every layer file is some ground-truth tensor.
        for f in tagdir.glob("layer_*"):
            keys = torch.load(f, map_location="cpu", weights_only=True).keys()
            assert {(f.name, k) for k in keys} <= seen, f.name


@pytest.mark.parametrize("name", [n for n in PARALLEL_NAMES if PARALLEL[n]["stage"] == 1])
def test_parallel_optimizer_files_agree_with_ground_truth(ds_corpus, name):
    """Per mp_rank, decode the ZeRO-1 files (§1.4 rules over the dp ranks); get the ground
    truth's TP slices back."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("deepspeed")  # the optimizer files pickle DeepSpeed classes
    case = PARALLEL[name]
    dp = case["dp"]
    tensors, meta = ds_corpus.truth(name)
    tagdir = ds_corpus[name] / TAG
    params = {p["name"]: p for p in meta["params"]}
    for m in meta["mp_ranks"]:
        optim = [
            torch.load(
                tagdir / f"bf16_zero_pp_rank_{d}_mp_rank_{m['mp_rank']:02d}_optim_states.pt",
                map_location="cpu",
                weights_only=False,
            )["optimizer_state_dict"]
            for d in range(dp)
        ]
        for g, names in enumerate(m["flat_groups"]):
            want = {
                (key, n): tp_slice(tensors[f"{key}/{n}"], params[n]["tp"], m["tp_rank"])
                for n in names
                for key in ("fp32", "exp_avg", "exp_avg_sq")
            }
            total = sum(want["fp32", n].size for n in names)
            part = math.ceil(total / (2 * dp)) * 2 * dp // dp
            for o in optim:
                assert o["partition_count"][g] == dp
                assert o["base_optimizer_state"]["state"][g]["step"] == 2
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                if key == "fp32":
                    flat = np.concatenate(
                        [_np(o["single_partition_of_fp32_groups"][g]) for o in optim]
                    )
                else:
                    flat = np.concatenate(
                        [_np(o["base_optimizer_state"]["state"][g][key]) for o in optim]
                    )
                assert len(flat) >= total and not flat[total:].any()
                off = 0
                for n in names:
                    w = want[key, n]
                    np.testing.assert_array_equal(
                        flat[off : off + w.size].reshape(w.shape), w, err_msg=f"{key}/{n}"
                    )
                    off += w.size
            assert len(optim[0]["base_optimizer_state"]["state"][g]["exp_avg"]) == part


def _assert_reloaded(loaded: corpus.Loaded, tensors, meta, *, fresh_buffers: tuple = ()):
    assert set(loaded.tensors) == set(tensors)
    for key, t in tensors.items():
        if key in fresh_buffers:
            np.testing.assert_array_equal(loaded.tensors[key], np.zeros_like(t), err_msg=key)
        else:
            np.testing.assert_array_equal(loaded.tensors[key], t, err_msg=key)
    for key in PARALLEL_RELOADED_META:
        assert loaded.meta[key] == meta[key], key
    assert loaded.meta["global_steps_after"] == 3 and np.isfinite(loaded.meta["next_loss"])


@pytest.mark.parametrize("name", PARALLEL_NAMES)
def test_parallel_reload_same_world_reproduces_ground_truth(ds_corpus, name):
    tensors, meta = ds_corpus.truth(name)
    loaded = ds_corpus.load(name, ds_corpus[name])
    assert loaded.meta["world_size"] == PARALLEL[name]["world"]
    assert loaded.meta["topology"] == meta["topology"]
    _assert_reloaded(loaded, tensors, meta)


def test_pipeline_zero0_reloads_at_another_dp(ds_corpus):
    """ZeRO-0 keeps the whole optimizer state per stage (mp_rank files): DeepSpeed loads a
    pp=2, dp=2 checkpoint at dp=1 natively, exactly."""
    name = "pp2_dp2_z0_fp32"
    tensors, meta = ds_corpus.truth(name)
    loaded = ds_corpus.load(name, ds_corpus[name], world=2)
    assert loaded.meta["topology"] == {"pp": 2, "tp": 1, "dp": 1}
    _assert_reloaded(loaded, tensors, meta)


def test_pipeline_zero1_dp_change_is_refused(ds_corpus):
    name = "pp2_dp2_z1_bf16"
    loaded = ds_corpus.load(name, ds_corpus[name], world=2, expect_error=True)
    assert "world size" in loaded.error


@pytest.mark.parametrize(
    ("name", "world", "fresh"),
    [
        # The Final layer's step counter is a buffer: universal loading restores none.
        ("pp2_dp1_z1_bf16", 4, ("buffer/4.counter",)),
        ("autotp2_dp1_z1_bf16", 4, ()),
    ],
)
def test_parallel_universal_reload_at_another_dp(ds_corpus, name, world, fresh, tmp_path):
    """The loader's --universal path on a pipeline and an AutoTP checkpoint (via DeepSpeed's
    ds_to_universal), at dp=2. (The dp=1 pipeline is the source: at dp=2, without
    pipeline-replicated patterns, both stages extract the tied embedding's fragments to the
    same temporary files, and ds_to_universal fails in some runs.)"""
    tensors, meta = ds_corpus.truth(name)
    uni = corpus.ds_to_universal(ds_corpus[name] / TAG, tmp_path, python=ds_corpus.python)
    loaded = ds_corpus.load(name, uni, world=world, universal=True)
    assert loaded.meta["topology"]["dp"] == 2
    _assert_reloaded(loaded, tensors, meta, fresh_buffers=fresh)
