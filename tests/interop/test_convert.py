"""layoutc against real DeepSpeed: infer, convert, and DeepSpeed loading what layoutc wrote."""

from __future__ import annotations

import pickle
import shutil
import zipfile
from pathlib import Path

import corpus  # tests/interop, on the path through conftest
import numpy as np
import pytest
import torch

from layoutc.conversion import convert, verify
from layoutc.errors import LayoutError
from layoutc.formats import pt
from layoutc.formats import safetensors as st
from layoutc.formats.deepspeed import infer, open_checkpoint
from layoutc.formats.match import check_against
from layoutc.lang.check import load_text
from layoutc.lang.fmt import fmt
from layoutc.lang.parse import parse
from layoutc.place import place

CASES = sorted(corpus.CASES)  # every checkpoint of the corpus
STATES = corpus.UNIVERSAL_STATES


def _other_world(case: str) -> int:
    return 2 if "_w3" in case else 3


@pytest.mark.parametrize("case", CASES)
def test_infer_describes_the_checkpoint_exactly(ds_corpus, case):
    ckpt = open_checkpoint(ds_corpus[case])
    text = infer(ckpt)
    assert fmt(parse(text)) == text  # canonical
    layout = load_text(text, "inferred.layout")
    check_against(place(layout), ckpt.folder)  # every file and key, sizes and dtypes
    assert sorted(place(layout).files()) == sorted(
        p.name for p in ckpt.model_files + ckpt.optim_files
    )
    truth, _ = ds_corpus.truth(case)
    trainable = {k.split("/", 1)[1] for k in truth if k.startswith("fp32/")}
    assert {
        t.name for t in layout.tensors if t.trainable and t.name not in layout.tie_source
    } == trainable


@pytest.mark.parametrize("case", CASES)
def test_universal_is_exact_and_deepspeed_resumes_from_it_at_another_world_size(
    ds_corpus, case, tmp_path
):
    out = tmp_path / "universal"
    truth, meta = ds_corpus.truth(case)
    corpus.universal_exact(ds_corpus[case], out, truth)
    assert verify(out) == []
    loaded = ds_corpus.load(case, out, world=_other_world(case), universal=True)
    for key, want in truth.items():
        if key.split("/", 1)[0] in STATES:
            assert np.array_equal(loaded.tensors[key], want), key
    for field in ("step", "global_steps", "lr_scheduler"):
        assert loaded.meta[field] == meta[field], field


@pytest.mark.parametrize(
    "case", ["z1_w2_bf16", "z2_w3_fp32", "z3_w2_bf16", "bf16opt_w2", "z3_w2_subgroups"]
)
@pytest.mark.parametrize("fmt_", ["safetensors", "torch"])
def test_whole_tensor_exports_hold_the_fp32_masters_frozen_params_buffers_and_ties(
    ds_corpus, case, fmt_, tmp_path
):
    out = tmp_path / fmt_
    convert(ds_corpus[case], out, fmt_)
    truth, meta = ds_corpus.truth(case)
    if fmt_ == "torch":
        sd = torch.load(out / "pytorch_model.bin", weights_only=True)
        values = {k: v.float().numpy() for k, v in sd.items()}
        tied = [(a, s) for a, s in meta.get("tied", {}).items()] or [
            ("head.weight", "embed.weight")
        ]
        for alias, source in tied:
            assert sd[alias].data_ptr() == sd[source].data_ptr()  # ties are shared storage
    else:
        values = st.load_state_dict(out)
        headers, _ = st.read_header(out / "model.safetensors")
        assert "head.weight" not in headers  # stored once, recorded in the metadata
        assert values["head.weight"] is values["embed.weight"]
    for key, want in truth.items():
        kind, name = key.split("/", 1)
        if kind in ("fp32", "frozen", "buffer"):
            assert np.array_equal(np.asarray(values[name], np.float32).reshape(want.shape), want), (
                key
            )


def test_a_spec_that_disagrees_with_the_checkpoint_is_a_diagnostic(ds_corpus, tmp_path):
    ckpt = open_checkpoint(ds_corpus["z2_w2_bf16"])
    wrong = (
        infer(ckpt)
        .replace("mesh { dp = 2 }", "mesh { dp = 4 }")
        .replace("tensor fc1.weight [6, 10]", "tensor fc1.weight [5, 10]")
    )
    spec = tmp_path / "wrong.layout"
    spec.write_text(wrong)
    with pytest.raises(LayoutError) as e:
        convert(ds_corpus["z2_w2_bf16"], tmp_path / "out", "universal", spec=spec)
    text = e.value.render()
    assert "E301" in text and "zero_pp_rank_3_mp_rank_00_optim_states.pt" in text
    assert not (tmp_path / "out").exists()


def test_a_foreign_pickled_global_is_refused_and_never_runs(ds_corpus, tmp_path):
    src = Path(ds_corpus["z1_w2_fp32"])
    copy = tmp_path / "ckpt"
    shutil.copytree(src, copy)
    tag = (copy / "latest").read_text().strip()
    target = copy / tag / "mp_rank_00_model_states.pt"
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with zipfile.ZipFile(target) as z:
        members = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = pickle.dumps({"module": {}, "evil": Payload()}, protocol=2)
    with zipfile.ZipFile(target, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    with pytest.raises(
        pt.UnsafePickle, match=r"mp_rank_00_model_states\.pt: refusing to load the pickled global"
    ):
        convert(copy, tmp_path / "out", "universal")
    assert not marker.exists()


def test_verify_names_a_file_with_a_flipped_byte(ds_corpus, tmp_path):
    out = tmp_path / "u"
    convert(ds_corpus["z2_w2_fp32"], out, "universal")
    victim = next(p for p in sorted(out.rglob("fp32.pt")))
    data = bytearray(victim.read_bytes())
    data[-200] ^= 0x01
    victim.write_bytes(bytes(data))
    bad = verify(out)
    assert len(bad) == 1 and str(victim.relative_to(out)) in bad[0]
