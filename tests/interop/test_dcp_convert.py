"""layoutc reads real PyTorch distributed checkpoints (FSDP2, torch 2.13): the corpus of
dcp_make.py, its ground truth the full tensors at save time.

A DCP folder converts to safetensors and torch exactly, model tensors under their model
names; ``infer`` proves the FSDP2 world and each tensor's cut from the chunks; a
``.metadata`` whose pickle would run a command is refused, the global named, the command
never run (test_dcp_corpus.py shows torch's own reader runs it); a truncated ``.distcp``
is refused naming the file.
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
from layoutc.errors import InputError, Unsupported
from layoutc.formats import dcp, pt
from layoutc.formats.pt import UnsafePickle
from layoutc.plan.request import source_placement

pytestmark = pytest.mark.interop

FS_CASES = [n for n, c in corpus.DCP_CASES.items() if c["storage"] == "fs"]


def _folder(dcp_corpus: dict[str, Path], case: str) -> Path:
    return dcp_corpus[case] / corpus.DCP_DIR


@pytest.mark.parametrize("case", FS_CASES)
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


def test_writing_dcp_is_refused_before_anything_is_written(
    dcp_corpus: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(Unsupported, match="writing dcp"):
        layoutc.convert(_folder(dcp_corpus, "dcp_w2_untied"), tmp_path / "out", "dcp")
    assert not (tmp_path / "out").exists()
