"""layoutc against real DeepSpeed AutoTP checkpoints: a Hugging Face Llama (4 query heads
sharing 2 key/value heads, a vocabulary of 101) sharded by DeepSpeed's automatic tensor
parallelism at tp = 2 and tp = 4, ZeRO-1, 2 and 3. At tp = 4 the attention projections are cut in
whole key/value-head groups, so two ranks hold empty (0, 16) slices, and the vocabulary is
cut 26/25/25/25: uneven shards, declared as ``grains(N, G) / tp``.

The engine that loads a checkpoint may be another case's: the cases share the model (same
config and seed), so loading tp = 4 files with the tp = 2 case changes the tensor-parallel
degree.
"""

from __future__ import annotations

import re
from pathlib import Path

import corpus  # tests/interop, on the path through conftest
import ds_make
import numpy as np
import pytest

from layoutc.cli import main
from layoutc.conversion import convert, verify
from layoutc.errors import LayoutError, Unsupported
from layoutc.formats import autotp, pt
from layoutc.formats import safetensors as st
from layoutc.formats.deepspeed import infer, open_checkpoint
from layoutc.formats.match import check_against
from layoutc.lang.check import load_text
from layoutc.lang.fmt import fmt
from layoutc.lang.parse import parse
from layoutc.place import place

CASES = [
    "autotp2_dp1_z1_bf16",
    "autotp2_dp2_z1_bf16",
    "autotp4_dp1_z1_bf16",
    "autotp2_dp1_z2_bf16",
    "autotp2_dp2_z2_bf16",
    "autotp4_dp1_z2_bf16",
    "autotp2_dp2_z3_bf16",
    "autotp2_dp1_z3_bf16",
]
# (the case whose engine loads the output, its world size): another tp, and dp where it can
OTHER_TP = {
    "autotp2_dp1_z1_bf16": ("autotp4_dp1_z1_bf16", 4),
    "autotp2_dp2_z1_bf16": ("autotp4_dp1_z1_bf16", 4),
    "autotp4_dp1_z1_bf16": ("autotp2_dp2_z1_bf16", 4),
    "autotp2_dp1_z2_bf16": ("autotp4_dp1_z2_bf16", 4),
    "autotp2_dp2_z2_bf16": ("autotp4_dp1_z2_bf16", 4),
    "autotp4_dp1_z2_bf16": ("autotp2_dp2_z2_bf16", 4),
    # ZeRO-3 universal files keep ZeRO-3's model-states names, which only a ZeRO-3 engine
    # looks for; DeepSpeed trains no ZeRO-3 AutoTP model with empty slices (tp = 4 here).
    "autotp2_dp2_z3_bf16": ("autotp2_dp1_z3_bf16", 2),
    "autotp2_dp1_z3_bf16": ("autotp2_dp2_z3_bf16", 4),
}
KV_HEADS = ds_make.LLAMA_MODEL["num_key_value_heads"]


def _topology(case: str) -> dict[str, int]:
    c = ds_make.ALL_CASES[case]
    return {"pp": c["pp"], "tp": c["tp"], "dp": c["dp"]}


def _engine_case(case: str, to: dict[str, int]) -> str:
    """The case of ``case``'s ZeRO stage at the topology ``to`` (its engine loads there)."""
    want = {**_topology(case), "dp": 1, **to}
    stage = ds_make.ALL_CASES[case]["stage"]
    return next(c for c in CASES if _topology(c) == want and ds_make.ALL_CASES[c]["stage"] == stage)


def _declared(text: str) -> str:
    """An inferred layout with what the files cannot say: the attention projections are cut
    in whole key/value-head groups (the model's config has 2 key/value heads)."""

    def grains(m: re.Match[str]) -> str:
        n = int(m.group(2))
        return f"{m.group(1)}grains({n}, {n // KV_HEADS}) / tp"

    return re.sub(r"(self_attn\.\w+\.weight \[(?:\d+, )?)(\d+) / tp", grains, text)


@pytest.mark.parametrize("case", CASES)
def test_infer_reads_autotps_cut_of_every_tensor(ds_corpus, case):
    ckpt = open_checkpoint(ds_corpus[case])
    text = infer(ckpt)
    assert fmt(parse(text)) == text
    layout = load_text(text, "inferred.layout")
    check_against(place(layout), ckpt.folder)  # every rank's shapes, sizes and dtypes
    assert sorted(place(layout).files()) == sorted(p.name for p in ckpt.folder.iterdir())
    truth, _ = ds_corpus.truth(case)
    assert {t.name for t in layout.tensors} == {k.split("/", 1)[1] for k in truth if "fp32/" in k}
    assert layout.mesh.sizes == {"dp": _topology(case)["dp"], "tp": _topology(case)["tp"]}
    lm_head = layout.tensor("lm_head.weight").dims[0]
    assert (lm_head.grain, lm_head.split) == (1, ("tp",))  # vocabulary 101: uneven
    q = layout.tensor("model.layers.0.self_attn.q_proj.weight").dims[0]
    if _topology(case)["tp"] == 4:  # more ranks than key/value heads: whole heads, some empty
        assert q.grain == 8 and [q.local_at(p) for p in range(4)] == [8, 8, 0, 0]


@pytest.mark.parametrize("case", CASES)
def test_autotp_to_universal_is_exact_and_deepspeed_resumes_at_another_tp(
    ds_corpus, case, tmp_path
):
    out = tmp_path / "universal"
    truth, meta = ds_corpus.truth(case)
    compared = corpus.universal_exact(ds_corpus[case], out, truth)
    assert compared == 3 * sum(k.startswith("fp32/") for k in truth)
    assert verify(out) == []
    engine_case, world = OTHER_TP[case]
    loaded = ds_corpus.load(engine_case, out, world=world, universal=True)
    assert loaded.meta["topology"] == _topology(engine_case) != _topology(case)
    corpus.assert_resumed(loaded, truth, meta)


@pytest.mark.parametrize("case", CASES)
def test_autotp_to_safetensors_loads_strictly_into_the_hugging_face_model(
    ds_corpus, case, tmp_path
):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path / "st"
    convert(ds_corpus[case], out, "safetensors")
    truth, _ = ds_corpus.truth(case)
    values = st.load_state_dict(out)
    for key, want in truth.items():
        kind, name = key.split("/", 1)
        if kind == "fp32":
            np.testing.assert_array_equal(np.asarray(values[name], np.float32), want, err_msg=key)
    model = LlamaForCausalLM(LlamaConfig(**ds_make.LLAMA_MODEL))
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in values.items()}
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize(
    ("case", "to"),
    [
        ("autotp4_dp1_z1_bf16", {"tp": 2, "dp": 2}),  # inferred: the tp = 4 cut proves it
        ("autotp2_dp1_z1_bf16", {"tp": 4}),  # declared: empty shards written
        ("autotp2_dp2_z1_bf16", {"tp": 4, "dp": 1}),
        ("autotp4_dp1_z2_bf16", {"tp": 2, "dp": 2}),
        ("autotp2_dp2_z2_bf16", {"tp": 4, "dp": 1}),  # empty slices recorded as frozen
        ("autotp2_dp2_z3_bf16", {"tp": 2, "dp": 1}),
    ],
)
def test_autotp_resharded_to_another_topology_loads_in_deepspeed_natively(
    ds_corpus, case, to, tmp_path
):
    """DeepSpeed's files at the new topology, written directly: a plain load_checkpoint
    restores every weight, master and moment; the metadata (param shapes without the empty
    slices, AutoTP's affine map, the config) is what DeepSpeed itself writes there."""
    spec = None
    if to["tp"] == 4:
        spec = tmp_path / "model.layout"
        spec.write_text(_declared(infer(open_checkpoint(ds_corpus[case]))))
    out = tmp_path / "ds"
    convert(ds_corpus[case], out, "deepspeed", spec=spec, overrides=to)
    assert verify(out) == []
    engine_case = _engine_case(case, to)
    truth, meta = ds_corpus.truth(case)
    loaded = ds_corpus.load(engine_case, out, world=to["tp"] * to.get("dp", 1))
    assert loaded.meta["topology"] == _topology(engine_case)
    corpus.assert_resumed(loaded, truth, meta)
    # the model-states files say what DeepSpeed's own say at that topology
    ours, theirs = open_checkpoint(out), open_checkpoint(ds_corpus[engine_case])
    for mine, ds in zip(ours.model_files, theirs.model_files, strict=True):
        a, b = pt.load(mine), pt.load(ds)
        keys = ("param_shapes", "frozen_param_shapes", autotp.INFO, "ds_config", "mp_world_size")
        for key in (*keys, "dp_world_size"):
            assert repr(a.get(key)) == repr(b.get(key)), (mine.name, key)
        frozen = a.get("frozen_param_fragments") or {}  # ZeRO-2: the empty slices
        assert {k: v.shape for k, v in frozen.items()} == {
            k: v.shape for k, v in (b.get("frozen_param_fragments") or {}).items()
        }


@pytest.mark.parametrize(
    ("case", "zero", "engine_case"),
    [
        ("autotp2_dp2_z1_bf16", "zero 3 over dp", "autotp2_dp2_z3_bf16"),
        ("autotp2_dp2_z3_bf16", "zero 1 over dp", "autotp2_dp2_z1_bf16"),
    ],
)
def test_autotp_written_at_another_zero_stage_loads_in_deepspeed_natively(
    ds_corpus, case, zero, engine_case, tmp_path
):
    """ZeRO-1 <-> ZeRO-3 under AutoTP: each TP slice partitioned over data parallelism (or
    gathered back into flat groups), loaded by a plain load_checkpoint."""
    text = infer(open_checkpoint(ds_corpus[case]))
    target = re.sub(r"zero \d over dp[^\n]*", zero, text)
    assert target != text
    (tmp_path / "target.layout").write_text(target)
    out = tmp_path / "ds"
    convert(ds_corpus[case], out, tmp_path / "target.layout")
    assert verify(out) == []
    truth, meta = ds_corpus.truth(case)
    loaded = ds_corpus.load(engine_case, out, world=4)
    assert loaded.meta["topology"] == _topology(engine_case)
    corpus.assert_resumed(loaded, truth, meta)


def test_a_tp_the_files_do_not_prove_is_refused_not_guessed(ds_corpus, tmp_path, capsys):
    """At tp = 2 the attention rows split evenly whatever the key/value-head count; at tp = 4
    that count decides, and the files do not record it."""
    case = "autotp2_dp1_z1_bf16"
    with pytest.raises(Unsupported, match="key/value-head groups") as e:
        convert(ds_corpus[case], tmp_path / "out", "deepspeed", overrides={"tp": 4})
    assert "model.layers.0.self_attn.q_proj.weight" in str(e.value)
    assert not (tmp_path / "out").exists()
    # the dry run says the same
    args = ["plan", str(ds_corpus[case]), "--to", "deepspeed", "--set", "tp=4"]
    assert main(args) == 1
    assert "key/value-head groups" in capsys.readouterr().err


def test_an_even_split_declared_for_uneven_shards_is_caught(ds_corpus, tmp_path):
    case = "autotp4_dp1_z1_bf16"
    text = infer(open_checkpoint(ds_corpus[case]))
    wrong = text.replace(
        "self_attn.q_proj.weight [grains(16, 8) / tp, 16]", "self_attn.q_proj.weight [16 / tp, 16]"
    )
    assert wrong != text
    spec = tmp_path / "wrong.layout"
    spec.write_text(wrong)
    with pytest.raises(LayoutError, match="E303") as e:
        convert(ds_corpus[case], tmp_path / "out", "universal", spec=spec)
    assert "q_proj" in str(e.value) and "[8, 16]" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_the_declared_layout_round_trips_through_universal_byte_for_byte(ds_corpus, tmp_path):
    """tp 2 -> 4 directly equals tp 2 -> universal -> tp 4."""
    case = "autotp2_dp1_z1_bf16"
    spec = tmp_path / "model.layout"
    spec.write_text(_declared(infer(open_checkpoint(ds_corpus[case]))))
    convert(ds_corpus[case], tmp_path / "direct", "deepspeed", spec=spec, overrides={"tp": 4})
    convert(ds_corpus[case], tmp_path / "universal", "universal", spec=spec)
    universal_spec = tmp_path / "universal.layout"
    universal_spec.write_text(Path(spec).read_text().replace("store deepspeed", "store universal"))
    convert(
        tmp_path / "universal",
        tmp_path / "via",
        "deepspeed",
        spec=universal_spec,
        overrides={"tp": 4},
    )
    direct, via = corpus.tree_bytes(tmp_path / "direct"), corpus.tree_bytes(tmp_path / "via")
    assert direct.keys() == via.keys()
    assert [f for f in direct if direct[f] != via[f]] == []
