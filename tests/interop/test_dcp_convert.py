"""layoutc reads and writes real PyTorch distributed checkpoints (FSDP2, torch 2.13): the
corpus of dcp_make.py, its ground truth the full tensors at save time.

Reading: a DCP folder — torch's own layout or its Hugging Face storage writer's (the
sharding in each safetensors header) — converts to safetensors and torch exactly, model
tensors under their model names; ``infer`` proves the FSDP2 world and each tensor's cut
from the chunks; a ``.metadata`` whose pickle would run a command is refused, the global
named, the command never run (test_dcp_corpus.py shows torch's own reader runs it); a
truncated ``.distcp`` is refused naming the file.

Writing and moving: what ``--to dcp`` writes loads into a fresh FSDP2 job at another world
(dcp_load.py) and round-trips bit for bit; DeepSpeed ZeRO-2/3 -> DCP loads into FSDP2
with DeepSpeed's masters and moments; DCP -> DeepSpeed (--zero, --set dp, --dtype) and
DCP -> universal resume in real DeepSpeed (ds_load.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import corpus
import dcp_attack
import numpy as np
import pytest
from safetensors.numpy import load_file

import layoutc
from layoutc.errors import InputError
from layoutc.formats import dcp, pt
from layoutc.formats.pt import UnsafePickle
from layoutc.formats.sources import open_source
from layoutc.plan.request import plan_checkpoint, source_placement

pytestmark = pytest.mark.interop

FS_CASES = [n for n, c in corpus.DCP_CASES.items() if c["storage"] == "fs"]


def _folder(dcp_corpus: dict[str, Path], case: str) -> Path:
    return dcp_corpus[case] / corpus.DCP_DIR


@pytest.mark.parametrize("case", list(corpus.DCP_CASES))
@pytest.mark.parametrize("budget", [None, 4096])
def test_dcp_to_safetensors_is_every_model_tensor_exact(
    dcp_corpus: dict[str, Path], case: str, budget: int | None, tmp_path: Path
) -> None:
    truth, _ = corpus.read_truth(dcp_corpus[case])
    out = tmp_path / "hf"
    layoutc.convert(_folder(dcp_corpus, case), out, "safetensors", memory_budget=budget)
    got = load_file(str(out / "model.safetensors"))
    want = {k.split("/", 1)[1]: v for k, v in truth.items() if k.startswith("model/")}
    assert set(got) == set(want)
    for name, v in want.items():
        assert got[name].dtype == v.dtype and np.array_equal(got[name], v), name


def test_dcp_to_torch_holds_the_same_tensors(dcp_corpus: dict[str, Path], tmp_path: Path) -> None:
    case = "dcp_w3_tied"
    truth, _ = corpus.read_truth(dcp_corpus[case])
    out = tmp_path / "pt"
    layoutc.convert(_folder(dcp_corpus, case), out, "torch")
    obj = pt.load(out / "pytorch_model.bin")
    for key, v in truth.items():
        if key.startswith("model/"):
            assert np.array_equal(obj[key.split("/", 1)[1]].numpy(), v), key


@pytest.mark.parametrize("case", FS_CASES)
def test_infer_finds_the_fsdp_world_and_each_tensors_cut(
    dcp_corpus: dict[str, Path], case: str
) -> None:
    _, meta = corpus.read_truth(dcp_corpus[case])
    ckpt = dcp.DcpCheckpoint(_folder(dcp_corpus, case))
    text = dcp.infer_text(ckpt)
    world = corpus.DCP_CASES[case]["world"]
    assert f"mesh {{ dp = {world} }}" in text and "zero 3 over dp" in text
    layout, _ = source_placement(ckpt)  # checks every chunk
    trainable = {t.name for t in layout.tensors if t.trainable}
    assert trainable == {fqn for g in meta["param_groups"] for fqn in g["params"]}
    assert ckpt.keys.model_prefix == "model." and ckpt.keys.optimizer_prefix == "optim."


def test_a_metadata_pickle_naming_os_system_is_refused_and_never_run(
    dcp_corpus: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(_folder(dcp_corpus, "dcp_w2_untied"), folder)
    marker = tmp_path / "ran"
    dcp_attack.plant_metadata_payload(folder, f"touch {marker}")
    with pytest.raises(InputError) as info:
        layoutc.convert(folder, tmp_path / "out", "safetensors")
    assert isinstance(info.value, UnsafePickle) or "system" in str(info.value)
    assert ".metadata" in str(info.value) and "system" in str(info.value)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_truncated_distcp_is_refused_naming_the_file(
    dcp_corpus: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(_folder(dcp_corpus, "dcp_w3_tied"), folder)
    cut = dcp_attack.truncate_distcp(folder)
    with pytest.raises(InputError, match="truncated") as info:
        layoutc.convert(folder, tmp_path / "out", "safetensors")
    assert cut.name in str(info.value)
    assert not (tmp_path / "out").exists()


def _same(got: dict[str, object], want: dict[str, object], keys: list[str]) -> None:
    for k in keys:
        assert np.array_equal(got[k], want[k]), k  # type: ignore[arg-type]


@pytest.mark.parametrize("case", ["dcp_w3_tied", "dcp_tiny_w2"])
def test_dcp_to_dcp_loads_at_another_world_and_round_trips_bit_for_bit(
    dcp_corpus: dict[str, Path], dcp_python: str, case: str, tmp_path: Path
) -> None:
    """Written again by layoutc, a DCP loads into a fresh FSDP2 job at another world with
    every tensor, the param groups and the train state as saved; written twice, its
    tensors are the same bits."""
    truth, meta = corpus.read_truth(dcp_corpus[case])
    once, twice = tmp_path / "once", tmp_path / "twice"
    layoutc.convert(_folder(dcp_corpus, case), once, "dcp")
    world = 5 - corpus.DCP_CASES[case]["world"]  # 2 <-> 3
    got, loaded = corpus.dcp_load(case, once, world, tmp_path / "load", python=dcp_python)
    _same(got, truth, list(truth))
    assert loaded["param_groups"] == meta["param_groups"]
    assert loaded["train_state"] == meta["train_state"]
    layoutc.convert(once, twice, "dcp")
    a, b = dcp.DcpCheckpoint(once), dcp.DcpCheckpoint(twice)
    assert a.metadata.tensors == b.metadata.tensors and a.metadata.flat == b.metadata.flat
    for key, offsets in a.metadata.items:
        if offsets is None:
            assert a.item_bytes(key) == b.item_bytes(key), key
        else:
            x, y = a.tensor_item(key, offsets), b.tensor_item(key, offsets)
            assert x.numpy(a.opener).tobytes() == y.numpy(b.opener).tobytes(), key


@pytest.mark.parametrize("source", ["z2_w2_bf16", "z3_w2_bf16"])
def test_deepspeed_to_dcp_is_what_a_fresh_fsdp2_job_loads(
    ds_corpus: corpus.Corpus,
    dcp_python: str,
    source: str,
    tmp_path: Path,
) -> None:
    """DeepSpeed ZeRO-2/3 at dp 2 (bf16 weights, fp32 masters, two param groups, a tie, a
    frozen parameter, buffers) -> DCP: FSDP2 at world 3 holds DeepSpeed's fp32 masters, its
    moments and step, and its param groups."""
    import torch

    truth, meta = ds_corpus.truth(source)
    out = tmp_path / "dcp"
    layoutc.convert(ds_corpus[source], out, "dcp")
    got, loaded = corpus.dcp_load(
        "dcp_tiny_w2", out, 3, tmp_path / "load", python=dcp_python, train_state=False
    )
    for name in meta["trainable"]:
        for kind in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(got[f"{kind}/{name}"], truth[f"{kind}/{name}"], name)
        np.testing.assert_array_equal(got[f"model/{name}"], truth[f"fp32/{name}"], name)
        assert float(got[f"step/{name}"]) == meta["step"], name
    np.testing.assert_array_equal(got["model/head.weight"], truth["fp32/embed.weight"])
    for name in meta["frozen"]:  # DeepSpeed's bf16 copy, widened by FSDP2's fp32 parameter
        np.testing.assert_array_equal(got[f"model/{name}"], truth[f"frozen/{name}"], name)
        assert torch.from_numpy(got[f"model/{name}"]).bfloat16().float().numpy().tolist() == (
            got[f"model/{name}"].tolist()
        )
    for name in meta["buffers"]:
        np.testing.assert_array_equal(got[f"model/{name}"], truth[f"buffer/{name}"], name)
    groups = loaded["param_groups"]
    want = corpus.ds_groups_of(source, python=dcp_python)
    assert [g["params"] for g in groups] == [g["params"] for g in want]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [g["lr"] for g in groups] == meta["lr"]


@pytest.mark.parametrize(
    ("load_as", "zero", "dtype"), [("z2_w3_bf16", 2, "bf16"), ("z3_w3_bf16", 3, "bf16")]
)
def test_dcp_to_deepspeed_resumes_in_real_deepspeed(
    ds_corpus: corpus.Corpus,
    dcp_corpus: dict[str, Path],
    load_as: str,
    zero: int,
    dtype: str,
    tmp_path: Path,
) -> None:
    """FSDP2 at world 2 -> DeepSpeed ZeRO-K at dp 3 (--zero K --set dp=3 --dtype bf16):
    DeepSpeed's plain load_checkpoint restores the fp32 masters from the FSDP weights, the
    moments, the step and both param groups, and trains on."""
    truth, meta = corpus.read_truth(dcp_corpus["dcp_tiny_w2"])
    out = tmp_path / "ds"
    layoutc.convert(
        _folder(dcp_corpus, "dcp_tiny_w2"),
        out,
        "deepspeed",
        zero=zero,
        overrides={"dp": 3},
        dtype=dtype,
    )
    loaded = ds_corpus.load(load_as, out, world=3, fresh=True)
    assert loaded.error is None, loaded.error
    trainable = [n for g in meta["param_groups"] for n in g["params"]]
    for name in trainable:
        np.testing.assert_array_equal(loaded.tensors[f"fp32/{name}"], truth[f"model/{name}"])
        for kind in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(loaded.tensors[f"{kind}/{name}"], truth[f"{kind}/{name}"])
    for name in meta["buffers"]:
        np.testing.assert_array_equal(loaded.tensors[f"buffer/{name}"], truth[f"model/{name}"])
    assert {s for steps in loaded.meta["optimizer_steps"] for s in steps} == {2.0}
    groups = loaded.meta["param_groups"]
    assert [g["weight_decay_loaded"] for g in groups] == [0.1, 0.0]
    assert loaded.meta["global_steps_after"] >= 1 and np.isfinite(loaded.meta["next_loss"])


@pytest.mark.parametrize(("load_as", "zero"), [("z2_w3_bf16", 2), ("z3_w3_bf16", None)])
def test_dcp_to_universal_is_what_real_deepspeed_loads_at_another_world(
    ds_corpus: corpus.Corpus,
    dcp_corpus: dict[str, Path],
    load_as: str,
    zero: int | None,
    tmp_path: Path,
) -> None:
    """FSDP2 -> universal (the model files of the loading job's ZeRO stage: --zero, else
    FSDP's own 3): DeepSpeed's load_universal at world 3 restores masters, moments, step
    and param groups, and trains on."""
    truth, meta = corpus.read_truth(dcp_corpus["dcp_tiny_w2"])
    out = tmp_path / "universal"
    layoutc.convert(_folder(dcp_corpus, "dcp_tiny_w2"), out, "universal", zero=zero)
    loaded = ds_corpus.load(load_as, out, world=3, universal=True, fresh=True)
    assert loaded.error is None, loaded.error
    for name in (n for g in meta["param_groups"] for n in g["params"]):
        np.testing.assert_array_equal(loaded.tensors[f"fp32/{name}"], truth[f"model/{name}"])
        for kind in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(loaded.tensors[f"{kind}/{name}"], truth[f"{kind}/{name}"])
    assert {s for steps in loaded.meta["optimizer_steps"] for s in steps} == {2.0}
    # DeepSpeed's ZeRO-3 universal loader sets every group's hyperparameters from the first
    # saved group (stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3), whoever
    # wrote the checkpoint; ZeRO-1/2 take each group's own.
    decay = [0.1, 0.0] if load_as.startswith("z2") else [0.1, 0.1]
    assert [g["weight_decay_loaded"] for g in loaded.meta["param_groups"]] == decay
    assert np.isfinite(loaded.meta["next_loss"])


def test_a_saved_plan_of_a_dcp_runs_as_convert_runs_it(
    dcp_corpus: dict[str, Path], tmp_path: Path
) -> None:
    """``plan CKPT -o plan.json`` then ``execute``: the chunks found where the metadata
    puts them (``__R_1.distcp`` too), the output byte for byte what ``convert`` writes."""
    folder = _folder(dcp_corpus, "dcp_w3_tied")
    handle = open_source(folder)
    try:
        plan = plan_checkpoint(handle, "safetensors")
    finally:
        handle.close()
    saved = layoutc.Plan.from_json(plan.to_json())
    layoutc.execute(saved, folder, tmp_path / "executed")
    layoutc.convert(folder, tmp_path / "converted", "safetensors")
    assert corpus.tree_bytes(tmp_path / "executed") == corpus.tree_bytes(tmp_path / "converted")


def test_a_2d_fsdp_by_tensor_parallel_checkpoint_is_inferred_and_read_exactly(
    dcp_python: str, tmp_path: Path
) -> None:
    """FSDP2 over dp 2 x tensor parallel over tp 2 (dcp_2d.py): infer finds the mesh and
    which dim each tensor is split on; safetensors holds every tensor in full, and a DCP
    written again holds the model and the moments, as torch's own converter reads them."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    corpus.torchrun(
        corpus.HERE / "dcp_2d.py",
        [str(tmp_path)],
        4,
        python=dcp_python,
        ext_dir=tmp_path / "ext",
        log=tmp_path / "dcp_2d.log",
    )
    folder = tmp_path / "dcp"
    truth = torch.load(tmp_path / "truth.pt", weights_only=True)
    text = dcp.infer_text(dcp.DcpCheckpoint(folder))
    assert "mesh { dp = 2, tp = 2 }" in text and "zero 3 over dp" in text
    assert "tensor up.weight [10 / tp, 8]" in text and "tensor down.weight [8, 10 / tp]" in text
    assert "tensor norm.weight [8]" in text
    layoutc.convert(folder, tmp_path / "hf", "safetensors")
    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(got) == {k.split("/", 1)[1] for k in truth if k.startswith("model/")}
    for name, v in got.items():
        assert np.array_equal(v, truth[f"model/{name}"].numpy()), name
    layoutc.convert(folder, tmp_path / "again", "dcp")
    dcp_to_torch_save(str(tmp_path / "again"), str(tmp_path / "again.pt"))
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    for key, want in truth.items():
        kind, name = key.split("/", 1)
        have = again["model"][name] if kind == "model" else again["optim"]["state"][name][kind]
        assert torch.equal(have, want), key
