"""The PyTorch DCP corpus (dcp_make.py) is what we think it is, and dcp_load.py is an oracle.

torch 2.13's ``dcp.save`` of ``{"model", "optim", "train_state"}`` from FSDP2 flattens to
``model.<key>`` and ``optim.state.<fqn>.<exp_avg|exp_avg_sq|step>`` tensors and
``optim.param_groups.<i>.<field>`` / ``train_state.<key>`` byte items; every sharded tensor
has one chunk per rank, split on dim 0 as ``torch.chunk`` splits it (an empty shard is a
chunk of size 0 at the end), a step one 0-dim chunk, a buffer (plain, the same on every rank)
one chunk of the whole; ``FileSystemWriter(thread_count=2)``
writes ``__<rank>_<0|1>.distcp``. The ground truth is what torch's own converter reads; a
fresh FSDP2 job at another world size loads it back exactly; the TinyLM case keeps the
DeepSpeed corpus's names and param groups; and torch runs whatever a
planted ``.metadata`` pickle tells it to, which is why layoutc never unpickles one.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import corpus
import dcp_attack
import numpy as np
import pytest

pytestmark = pytest.mark.interop

CASES = corpus.DCP_CASES
FS_CASES = [n for n, c in CASES.items() if c["storage"] == "fs"]
STATES = ("exp_avg", "exp_avg_sq", "step")
# Cases with a tensor whose dim 0 is smaller than the world: the last ranks' shards are empty.
EMPTY_SHARDS = ("dcp_w3_empty", "dcp_tiny_w2")


def dcp_folder(corpus_: dict[str, Path], name: str) -> Path:
    return corpus_[name] / corpus.DCP_DIR


def chunk_rows(n: int, world: int) -> list[tuple[int, int]]:
    """(offset, rows) of each rank's dim-0 shard as FSDP2 cuts it: torch.chunk sizes, the
    ranks past the last chunk empty (offset n)."""
    size = -(-n // world)
    return [(min(r * size, n), max(0, min(size, n - r * size))) for r in range(world)]


def assert_same_tensors(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.parametrize("name", FS_CASES)
def test_metadata_flattens_model_optimizer_and_train_state_as_recorded(dcp_corpus, name):
    truth, meta = corpus.read_truth(dcp_corpus[name])
    keys = meta["metadata"]["keys"]
    tensors = {f"model.{k}" for k in meta["model_keys"]} | {
        f"optim.state.{fqn}.{kind}"
        for fqn, kinds in meta["optim_state_keys"].items()
        for kind in kinds
    }
    fields = {
        f"optim.param_groups.{i}.{field}" for i, g in enumerate(meta["param_groups"]) for field in g
    }
    byte_items = fields | {f"train_state.{k}" for k in meta["train_state"]}
    assert {k for k, v in keys.items() if v["kind"] == "tensor"} == tensors
    assert {k for k, v in keys.items() if v["kind"] == "bytes"} == byte_items
    assert sorted(meta["metadata"]["key_order"]) == sorted(keys)
    for key, path in meta["metadata"]["planner_data"].items():
        assert ".".join(str(p) for p in path) == key
    # The ground truth names the same things, tied aliases and frozen parameters included.
    assert {k for k in truth if k.startswith("model/")} == {
        f"model/{k}" for k in meta["model_keys"]
    }
    assert {k for k in truth if not k.startswith("model/")} == {
        f"{kind}/{fqn}" for fqn, kinds in meta["optim_state_keys"].items() for kind in kinds
    }
    assert all(sorted(kinds) == sorted(STATES) for kinds in meta["optim_state_keys"].values())


@pytest.mark.parametrize("name", FS_CASES)
def test_every_tensor_is_chunked_on_dim0_like_torch_chunk_one_chunk_per_rank(dcp_corpus, name):
    truth, meta = corpus.read_truth(dcp_corpus[name])
    world = meta["world"]
    files = set(meta["files"])
    empty = 0
    for key, item in meta["metadata"]["keys"].items():
        if item["kind"] == "bytes":
            assert item["file"] in files, key
            continue
        chunks = item["chunks"]
        assert all(c["file"] in files and c["length"] > 0 for c in chunks), key
        if not item["size"]:  # AdamW's step: a 0-dim tensor, written once
            assert key.endswith(".step"), key
            assert [(c["offsets"], c["sizes"]) for c in chunks] == [([], [])], key
            continue
        if key.startswith("model.") and key[6:] in meta["buffers"]:  # replicated: written once
            assert meta["placements"][key[6:]] == [], key
            assert [(c["offsets"], c["sizes"]) for c in chunks] == [
                ([0] * len(item["size"]), item["size"])
            ], key
            continue
        rows = chunk_rows(item["size"][0], world)
        assert [(c["offsets"][0], c["sizes"][0]) for c in chunks] == rows, key
        assert all(c["offsets"][1:] == [0] * (len(item["size"]) - 1) for c in chunks), key
        assert all(c["sizes"][1:] == item["size"][1:] for c in chunks), key
        empty += sum(1 for c in chunks if c["sizes"][0] == 0)
        want = truth[f"model/{key[6:]}"] if key.startswith("model.") else None
        if want is not None:
            assert list(want.shape) == item["size"] and item["dtype"] == str(want.dtype), key
    assert (empty > 0) == (name in EMPTY_SHARDS)


@pytest.mark.parametrize("name", FS_CASES)
def test_thread_count_two_writes_two_files_per_rank(dcp_corpus, name):
    _, meta = corpus.read_truth(dcp_corpus[name])
    world = meta["world"]
    want = {".metadata"} | {f"__{r}_{t}.distcp" for r in range(world) for t in range(2)}
    assert set(meta["files"]) == want
    assert sorted(p.name for p in dcp_folder(dcp_corpus, name).iterdir()) == sorted(want)


def test_tied_embedding_is_saved_under_both_names_and_frozen_weight_has_no_state(dcp_corpus):
    truth, meta = corpus.read_truth(dcp_corpus["dcp_w3_tied"])
    frozen = "model.layers.0.input_layernorm.weight"
    assert meta["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert meta["frozen"] == [frozen]
    np.testing.assert_array_equal(
        truth["model/lm_head.weight"], truth["model/model.embed_tokens.weight"]
    )
    keys = meta["metadata"]["keys"]
    assert "model.lm_head.weight" in keys and "model.model.embed_tokens.weight" in keys
    assert not any(k.startswith("optim.state.lm_head.") for k in keys)
    assert not any(k.startswith(f"optim.state.{frozen}.") for k in keys)
    assert f"model.{frozen}" in keys
    params = meta["param_groups"][0]["params"]
    assert "lm_head.weight" not in params and frozen not in params


def test_the_tiny_case_is_the_deepspeed_corpus_model_tie_frozen_bias_and_buffers(dcp_corpus):
    truth, meta = corpus.read_truth(dcp_corpus["dcp_tiny_w2"])
    assert meta["case_config"]["model"] == corpus.CASES["z2_w2_bf16"]["model"]
    params = ["scale", "logit_bias", "embed.weight", "fc1.weight", "fc1.bias", "fc2.weight"]
    params += ["fc2.bias", "norm.weight", "norm.bias", "head.weight"]
    assert sorted(meta["model_keys"]) == sorted([*params, "counter", "table"])  # no scratch
    assert meta["tied"] == {"head.weight": "embed.weight"}
    assert meta["frozen"] == ["logit_bias"] and meta["buffers"] == ["counter", "table"]
    np.testing.assert_array_equal(truth["model/head.weight"], truth["model/embed.weight"])
    trainable = set(params) - {"logit_bias", "head.weight"}
    assert set(meta["optim_state_keys"]) == trainable
    assert truth["model/counter"].tolist() == [2.0]  # one forward per training step
    assert {truth[f"step/{fqn}"].dtype for fqn in trainable} == {np.dtype("float32")}
    assert {truth[f"step/{fqn}"].shape for fqn in trainable} == {()}


def test_the_tiny_case_keeps_the_deepspeed_corpus_param_groups(dcp_corpus, dcp_python):
    _, meta = corpus.read_truth(dcp_corpus["dcp_tiny_w2"])
    want = corpus.ds_groups_of("dcp_tiny_w2", python=dcp_python)
    assert [g["weight_decay"] for g in want] == [0.1, 0.0]
    assert [
        {"params": g["params"], "weight_decay": g["weight_decay"]} for g in meta["param_groups"]
    ] == want
    assert want == corpus.ds_groups_of("z2_w2_bf16", python=dcp_python)
    for g in meta["param_groups"]:  # the DeepSpeed corpus's AdamW, decay per group
        assert (g["lr"], g["betas"], g["eps"]) == (0.01, [0.9, 0.999], 1e-8)


@pytest.mark.parametrize("name", FS_CASES)
def test_ground_truth_is_what_torchs_own_converter_reads(dcp_corpus, dcp_python, tmp_path, name):
    truth, meta = corpus.read_truth(dcp_corpus[name])
    got, got_meta = corpus.dcp_to_torch_save(
        dcp_folder(dcp_corpus, name), tmp_path, python=dcp_python
    )
    assert_same_tensors(got, truth)
    assert got_meta["top"] == ["model", "optim", "train_state"]
    assert got_meta["param_groups"] == meta["param_groups"]
    assert got_meta["train_state"] == meta["train_state"] == {"step": 2, "note": "x"}


def test_hf_storage_writes_each_rank_shard_with_its_offsets(dcp_corpus):
    from safetensors.numpy import load_file

    truth, meta = corpus.read_truth(dcp_corpus["dcp_hf_w2"])
    folder = dcp_folder(dcp_corpus, "dcp_hf_w2")
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"shard-0000{r + 1}-model-00001-of-00001.safetensors" for r in range(2)]
    model = {k[len("model/") :]: v for k, v in truth.items()}
    rebuilt = {k: np.zeros_like(v) for k, v in model.items()}
    for name in names:
        header = meta["hf_headers"][name]["metadata"]
        assert header["DCP_VERSION"] == "1.0" and header["format"] == "pt"
        offsets = json.loads(header["DCP_SHARDING_INFO"])
        for key, part in load_file(str(folder / name)).items():
            at = offsets[key]["saved_offsets"]
            rebuilt[key][tuple(slice(o, o + s) for o, s in zip(at, part.shape, strict=True))] = part
    assert sorted(rebuilt) == sorted(model)
    for key, value in model.items():
        np.testing.assert_array_equal(rebuilt[key], value, err_msg=key)


@pytest.mark.parametrize(
    ("name", "world"),
    [
        ("dcp_w2_untied", 3),
        ("dcp_w3_tied", 2),
        ("dcp_w3_empty", 2),
        ("dcp_hf_w2", 3),
        ("dcp_tiny_w2", 3),
    ],
)
def test_a_fresh_fsdp2_job_at_another_world_loads_the_ground_truth(
    dcp_corpus, dcp_python, tmp_path, name, world
):
    truth, meta = corpus.read_truth(dcp_corpus[name])
    got, got_meta = corpus.dcp_load(
        name,
        dcp_folder(dcp_corpus, name),
        world,
        tmp_path,
        root=dcp_corpus[name].parent.parent,
        python=dcp_python,
    )
    assert got_meta["ok"] and got_meta["world"] == world
    assert math.isfinite(got_meta["next_loss"])
    assert_same_tensors(got, truth)
    if CASES[name]["storage"] == "fs":
        assert got_meta["param_groups"] == meta["param_groups"]
        assert got_meta["train_state"] == meta["train_state"]


def test_a_fresh_fsdp2_job_loads_the_tiny_case_without_asking_for_train_state(
    dcp_corpus, dcp_python, tmp_path
):
    name = "dcp_tiny_w2"
    truth, meta = corpus.read_truth(dcp_corpus[name])
    got, got_meta = corpus.dcp_load(
        name,
        dcp_folder(dcp_corpus, name),
        2,
        tmp_path,
        root=dcp_corpus[name].parent.parent,
        python=dcp_python,
        train_state=False,
    )
    assert got_meta["ok"] and got_meta["train_state"] is None
    assert math.isfinite(got_meta["next_loss"])
    assert_same_tensors(got, truth)
    assert got_meta["param_groups"] == meta["param_groups"]


def test_torch_runs_a_payload_planted_in_metadata(dcp_corpus, dcp_python, tmp_path):
    name = "dcp_w3_empty"
    folder = shutil.copytree(dcp_folder(dcp_corpus, name), tmp_path / "planted")
    marker = tmp_path / "payload-ran"
    dcp_attack.plant_metadata_payload(folder, f"touch {marker}")
    assert not marker.exists()
    got, _ = corpus.dcp_to_torch_save(folder, tmp_path / "out", python=dcp_python)
    assert marker.exists()  # torch unpickled .metadata and ran the command ...
    truth, _ = corpus.read_truth(dcp_corpus[name])
    assert_same_tensors(got, truth)  # ... and loaded the checkpoint as if nothing happened


def test_torch_refuses_a_truncated_distcp_file(dcp_corpus, dcp_python, tmp_path):
    folder = shutil.copytree(dcp_folder(dcp_corpus, "dcp_w3_empty"), tmp_path / "cut")
    victim = dcp_attack.truncate_distcp(folder)
    assert victim.suffix == ".distcp"
    with pytest.raises(RuntimeError, match="dcp_to_torch_save failed"):
        corpus.dcp_to_torch_save(folder, tmp_path / "out", python=dcp_python)


def test_the_loader_reports_a_folder_that_does_not_fit_the_model(dcp_corpus, dcp_python, tmp_path):
    _, meta = corpus.dcp_load(
        "dcp_w2_untied",
        dcp_folder(dcp_corpus, "dcp_w3_empty"),
        2,
        tmp_path,
        root=dcp_corpus["dcp_w3_empty"].parent.parent,
        python=dcp_python,
        expect_error=True,
    )
    assert meta["ok"] is False and "Size mismatch" in meta["error"], meta
