"""layoutc on real DeepSpeed native Mixture-of-Experts checkpoints (ds_moe.py).

``infer`` describes each ZeRO-1/2 case exactly (every expert of every MoE layer under its
global id, dealt over ``ep``, in the MoE layer its file names), the check against the files
passes, and whole-tensor exports hold every fp32 master exactly; what layoutc does not read
yet is refused by name.
"""

from __future__ import annotations

import shutil

import corpus
import numpy as np
import pytest
import torch

from layoutc.conversion import convert
from layoutc.errors import LayoutError, Unsupported
from layoutc.formats import safetensors as st
from layoutc.formats.deepspeed import infer, open_checkpoint
from layoutc.lang.check import load_text

pytestmark = pytest.mark.interop

ZERO = sorted(corpus.MOE_CASES)  # ZeRO 0, 1 and 2


@pytest.mark.parametrize("name", ZERO)
def test_infer_deals_every_expert_over_ep_under_its_global_id_and_moe_layer(moe_corpus, name):
    case = corpus.MOE_CASES[name]
    _, layout = corpus.inferred_moe(moe_corpus[name], case)
    _, meta = corpus.read_truth(moe_corpus[name])
    experts = {t.name: t for t in layout.tensors if t.expert}
    assert set(experts) == set(meta["experts"])
    for n, want in meta["experts"].items():
        t = experts[n]
        assert t.expert is not None
        assert (t.layer, t.expert.id) == (want["layer"], want["expert"])
        assert t.pinned(layout.mesh.sizes) == {"ep": want["ep_rank"]}
        assert t.expert.local(case["ep"]) == want["local"]
    assert {t.name for t in layout.tensors} == set(meta["trainable"])


@pytest.mark.parametrize("name", ZERO)
@pytest.mark.parametrize("fmt_", ["safetensors", "torch"])
def test_whole_tensor_exports_hold_every_fp32_master_experts_included(
    moe_corpus, name, fmt_, tmp_path
):
    out = tmp_path / fmt_
    convert(moe_corpus[name], out, fmt_)
    truth, meta = corpus.read_truth(moe_corpus[name])
    if fmt_ == "torch":
        sd = torch.load(out / "pytorch_model.bin", weights_only=True)
        values = {k: v.float().numpy() for k, v in sd.items()}
    else:
        values = st.load_state_dict(out)
    assert set(values) == set(meta["trainable"])
    for n in meta["trainable"]:
        want = truth[f"fp32/{n}"]
        assert np.array_equal(np.asarray(values[n], np.float32).reshape(want.shape), want), n


def test_bf16_weights_exported_are_the_ones_deepspeed_saved(moe_corpus, tmp_path):
    name = "moe_z2_w4_ep2_bf16"
    convert(moe_corpus[name], tmp_path / "out", "safetensors", dtype="bf16")
    truth, meta = corpus.read_truth(moe_corpus[name])
    values = st.load_state_dict(tmp_path / "out")
    for n in meta["trainable"]:
        assert np.array_equal(np.asarray(values[n], np.float32), truth[f"weight16/{n}"]), n


def test_a_universal_target_is_refused_saying_why(moe_corpus, tmp_path):
    with pytest.raises(Unsupported, match="every expert-parallel rank names its own experts"):
        convert(moe_corpus["moe_z2_w2_ep2_bf16"], tmp_path / "out", "universal")
    assert not (tmp_path / "out").exists()


def test_expert_files_a_spec_does_not_place_are_named_not_dropped(moe_corpus, tmp_path):
    """A spec that puts the second MoE layer's experts in the first layer's files: the
    second layer's files hold state nothing places, refused by name (E308)."""
    name = "moe_z2_w2_ep2_bf16"
    text = infer(open_checkpoint(moe_corpus[name]))
    fewer = tmp_path / "fewer.layout"
    fewer.write_text(text.replace("layer 1\n", "layer 0\n"))
    with pytest.raises(LayoutError) as e:
        convert(moe_corpus[name], tmp_path / "out", "safetensors", spec=fewer)
    assert "E308" in e.value.render() and "layer_1_expert_0_mp_rank_00" in e.value.render()


def test_a_missing_expert_file_is_named(moe_corpus, tmp_path):
    name = "moe_z2_w2_ep2_bf16"
    copy = tmp_path / "ckpt"
    shutil.copytree(moe_corpus[name], copy)
    (copy / "global_step2" / "layer_0_expert_3_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(Exception, match=r"layer_0_expert_3_mp_rank_00_model_states\.pt"):
        convert(copy, tmp_path / "out", "safetensors")


@pytest.mark.parametrize("name", ["moe_z0_w4_ep2_fp32", "moe_z2_w4_ep2_bf16"])
def test_rewritten_at_its_own_topology_every_file_is_deepspeeds_own(moe_corpus, name, tmp_path):
    """Key for key and value for value: run metadata, local expert names in param_shapes and
    the optimizer files, ep_size group names, the expert files, ZeRO-0's expp_rank files."""
    convert(moe_corpus[name], tmp_path / "out", "deepspeed")
    corpus.assert_same_files(tmp_path / "out" / "global_step2", moe_corpus[name] / "global_step2")


# (case, target dp, target ep): dp up and down, ep up and down, ep changed at the same dp,
# no expert parallelism at all; ZeRO-0, 1 and 2, bf16 and fp32
RESHARDS = [
    ("moe_z2_w2_ep2_bf16", 4, 2),
    ("moe_z2_w4_ep2_bf16", 2, 2),
    ("moe_z2_w4_ep2_bf16", 4, 4),
    ("moe_z1_w4_ep4_bf16", 4, 2),
    ("moe_z1_w4_ep2_fp32", 2, 1),
    ("moe_z2_w4_ep2_fp32", 2, 2),
    ("moe_z1_w2_ep2_bf16", 4, 4),
    ("moe_z0_w4_ep2_fp32", 2, 2),
    ("moe_z0_w4_ep2_fp32", 4, 4),
    ("moe_z0_w2_ep2_fp32", 2, 1),
]


@pytest.mark.parametrize(("name", "dp", "ep"), RESHARDS)
def test_deepspeed_resumes_at_another_data_and_expert_parallel_size(
    moe_corpus, ds_python, name, dp, ep, tmp_path
):
    """What DeepSpeed refuses to do itself (test_moe_corpus): its plain load_checkpoint at
    another dp and ep, exact masters, moments, step and counters, then one more step."""
    out = tmp_path / "out"
    convert(moe_corpus[name], out, "deepspeed", overrides={"dp": dp, "ep": ep})
    layout = load_text(infer(open_checkpoint(out)), "resharded.layout")
    assert layout.mesh.sizes == {"edp": dp // ep, "ep": ep}
    truth, meta = corpus.read_truth(moe_corpus[name])
    loaded = corpus.load(
        name, out, world=dp, ep=ep, root=moe_corpus[name].parent.parent, python=ds_python
    )
    corpus.assert_resumed(loaded, truth, meta)


def test_inspect_shows_which_ranks_hold_which_experts(moe_corpus, capsys):
    from layoutc.cli import main

    assert main(["inspect", str(moe_corpus["moe_z2_w4_ep2_bf16"])]) == 0
    out = capsys.readouterr().out
    assert "experts: 2 MoE layers dealt over ep = 2" in out
    assert "moe1.deepspeed_moe.experts.deepspeed_experts" in out
    assert "ep 0 (ranks 0, 2): layer 0 experts 0-1, layer 1 experts 0-3" in out
    assert "ep 1 (ranks 1, 3): layer 0 experts 2-3, layer 1 experts 4-7" in out


def test_deepspeeds_older_expert_files_read_the_same(moe_corpus, tmp_path):
    """Before DeepSpeed 0.6 expert G of every MoE layer was one expert_G_mp_rank_XX file and
    num_experts one count (its loader still reads them so). The same checkpoint in that
    form: infer declares its experts without a layer, exports are the same bytes, and it is
    written back as it was."""
    name = "moe_z2_w4_ep2_bf16"
    old = tmp_path / "old"
    shutil.copytree(moe_corpus[name], old)
    tag = old / "global_step2"
    merged: dict[int, dict[str, torch.Tensor]] = {}
    for f in sorted(tag.glob("layer_*_expert_*_model_states.pt"), key=lambda p: p.name):
        g = int(f.name.split("_")[3])
        merged.setdefault(g, {}).update(torch.load(f, weights_only=True))
        f.unlink()
    for g, sd in merged.items():
        torch.save(sd, tag / f"expert_{g}_mp_rank_00_model_states.pt")
    ms = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    ms["num_experts"] = max(ms["num_experts"])
    torch.save(ms, tag / "mp_rank_00_model_states.pt")

    layout = load_text(infer(open_checkpoint(old)), "old.layout")
    assert {t.layer for t in layout.tensors if t.expert} == {None}
    for fmt_ in ("safetensors", "torch"):
        convert(old, tmp_path / f"{fmt_}-old", fmt_)
        convert(moe_corpus[name], tmp_path / f"{fmt_}-new", fmt_)
        assert corpus.tree_bytes(tmp_path / f"{fmt_}-old") == corpus.tree_bytes(
            tmp_path / f"{fmt_}-new"
        )
    convert(old, tmp_path / "back", "deepspeed")
    corpus.assert_same_files(tmp_path / "back" / "global_step2", tag)
