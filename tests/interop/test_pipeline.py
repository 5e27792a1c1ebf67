"""layoutc against real DeepSpeed PipelineModule checkpoints (pp = 2, a tied embedding/head
on both stages, a frozen parameter, buffers): infer, convert, and DeepSpeed resuming from
what layoutc wrote.

DeepSpeed's own ds_to_universal reads no ZeRO-0 pipeline, and on the dp = 2 ZeRO-1 case
both stages extract the tied embedding's fragments to the same temporary files (it failed in
some runs here, not in others); zero_to_fp32 reads none of them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import corpus  # tests/interop, on the path through conftest
import numpy as np
import pytest
import torch

from layoutc.conversion import convert, verify
from layoutc.errors import LayoutError, Unsupported
from layoutc.formats import safetensors as st
from layoutc.formats.deepspeed import infer, open_checkpoint
from layoutc.formats.match import check_against
from layoutc.lang.check import load_text
from layoutc.lang.fmt import fmt
from layoutc.lang.parse import parse
from layoutc.place import place

ZERO1 = ["pp2_dp1_z1_bf16", "pp2_dp2_z1_bf16"]
ZERO0 = ["pp2_dp1_z0_fp32", "pp2_dp2_z0_fp32"]
# Universal loading restores no buffers: the final layer's step counter starts again.
FRESH = ("buffer/4.counter",)


def _other_world(case: str) -> int:
    """pp stays 2; the data-parallel size changes (dp 1 <-> 2)."""
    return 4 if "_dp1_" in case else 2


def _universal_exact(ckpt: Path, out: Path, truth: dict[str, Any], **options: Any) -> None:
    """Converted to universal, every trainable tensor's master and moments exact."""
    compared = corpus.universal_exact(ckpt, out, truth, **options)
    assert compared == 3 * sum(k.startswith("fp32/") for k in truth)


def _spec(meta: dict[str, Any], truth: dict[str, Any], dp: int, **change: str) -> str:
    """The layout of a case, declared from what DeepSpeed reported at save time (for the
    cases whose files do not say it all: ZeRO-0 names no parameters, a model-parallel
    pipeline does not record which dim each tensor is split on). ``change`` replaces a
    tensor's dims, to make a wrong layout."""
    stage_of = {}
    for m in meta["mp_ranks"]:
        lo, hi = m["layers"]
        stage_of.update({layer: m["stage"] for layer in range(lo, hi)})
    tied = meta["pipe_tied"]
    topo, dtype = meta["topology"], meta["case_config"]["dtype"]

    def entry(kind: str, name: str, source: str) -> str:
        split = meta["tp_layout"][name]["dim"]
        shape = truth[f"{source}/{name}"].shape
        dims = change.get(name) or ", ".join(
            f"{n} / tp" if i == split else str(n) for i, n in enumerate(shape)
        )
        own = " fp32" if kind == "buffer" and dtype != "fp32" else ""
        if name in tied:
            layer = meta["layer_files"][name]["layer"]
            where = f"stage ({', '.join(map(str, tied[name]))}) layer {layer}"
        else:
            where = f"stage {stage_of[int(name.split('.', 1)[0])]}"
        return f"{kind} {name} [{dims}]{own} {where}"

    lines = [
        f"mesh {{ pp = 2, dp = {dp}, tp = {topo['tp']} }}",
        "pipeline over pp",
        f"dtype {dtype}",
        "optimizer adam",
        f"zero {meta['zero_stage']} over dp",
    ]
    for g, group in enumerate(meta["param_groups"]):
        body = [entry("tensor", n, "fp32") for n in group["params"]]
        lines += body if g == 0 else [f"group g{g} {{", *body, "}"]
    lines += [entry("frozen", n, "frozen") for n in meta["frozen"]]
    lines += [entry("buffer", n, "buffer") for n in meta["buffers"]]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("case", ZERO1)
def test_infer_describes_a_pipeline_checkpoint_exactly(ds_corpus, case):
    ckpt = open_checkpoint(ds_corpus[case])
    text = infer(ckpt)
    assert fmt(parse(text)) == text
    layout = load_text(text, "inferred.layout")
    check_against(place(layout), ckpt.folder)  # every file and key, sizes and dtypes
    assert sorted(place(layout).files()) == sorted(p.name for p in ckpt.folder.iterdir())
    truth, meta = ds_corpus.truth(case)
    assert {t.name for t in layout.tensors if t.trainable} == {
        k.split("/", 1)[1] for k in truth if k.startswith("fp32/")
    }
    assert {t.name for t in layout.tensors if t.kind == "frozen"} == set(meta["frozen"])
    assert {t.name for t in layout.tensors if t.kind == "buffer"} == set(meta["buffers"])
    for name, stages in meta["pipe_tied"].items():
        assert layout.tensor(name).stages == tuple(stages)
    for m in meta["mp_ranks"]:
        lo, hi = m["layers"]
        for t in layout.tensors:
            if t.name.split(".", 1)[0].isdigit() and lo <= int(t.name.split(".", 1)[0]) < hi:
                assert t.stage == m["stage"], t.name


@pytest.mark.parametrize("case", ZERO1)
def test_pipeline_to_universal_is_exact_and_deepspeed_resumes_at_another_dp(
    ds_corpus, case, tmp_path
):
    out = tmp_path / "universal"
    truth, meta = ds_corpus.truth(case)
    _universal_exact(ds_corpus[case], out, truth)
    assert verify(out) == []
    loaded = ds_corpus.load(case, out, world=_other_world(case), universal=True)
    assert loaded.meta["topology"]["pp"] == 2
    assert loaded.meta["topology"]["dp"] == _other_world(case) // 2
    corpus.assert_resumed(loaded, truth, meta, skip=FRESH)


@pytest.mark.parametrize("case", [*ZERO1, *ZERO0])
def test_pipeline_to_safetensors_holds_every_tensor_whole(ds_corpus, case, tmp_path):
    truth, meta = ds_corpus.truth(case)
    spec = None
    if case in ZERO0:
        spec = tmp_path / "model.layout"
        spec.write_text(_spec(meta, truth, meta["topology"]["dp"]))
    out = tmp_path / "st"
    convert(ds_corpus[case], out, "safetensors", spec=spec)
    values = st.load_state_dict(out)
    assert set(values) == {k.split("/", 1)[1] for k in truth if k.split("/")[0] != "weight16"}
    for key, want in truth.items():
        kind, name = key.split("/", 1)
        if kind in ("fp32", "frozen", "buffer"):
            got = np.asarray(values[name], np.float32).reshape(want.shape)
            np.testing.assert_array_equal(got, want, err_msg=key)


@pytest.mark.parametrize("case", ZERO0)
def test_a_zero0_pipeline_is_read_with_its_declared_layout(ds_corpus, case, tmp_path):
    """Its files name no parameters: infer refuses to guess; with --spec the conversion is
    exact, the tied layer's state taken from one stage's copy."""
    with pytest.raises(Unsupported, match="ZeRO-0 pipeline"):
        infer(open_checkpoint(ds_corpus[case]))
    truth, meta = ds_corpus.truth(case)
    spec = tmp_path / "model.layout"
    spec.write_text(_spec(meta, truth, meta["topology"]["dp"]))
    out = tmp_path / "universal"
    _universal_exact(ds_corpus[case], out, truth, spec=spec)


def test_a_tied_layer_declared_on_one_stage_is_a_diagnostic(ds_corpus, tmp_path):
    """Stage 1's optimizer holds the tied embedding too; a layout that leaves it out puts
    every stage-1 parameter at the wrong offset, and the check says where."""
    case = "pp2_dp2_z1_bf16"
    text = infer(open_checkpoint(ds_corpus[case]))
    wrong = text.replace("stage (0, 1) layer 0", "stage 0 layer 0")
    assert wrong != text
    spec = tmp_path / "wrong.layout"
    spec.write_text(wrong)
    with pytest.raises(LayoutError) as e:
        convert(ds_corpus[case], tmp_path / "out", "universal", spec=spec)
    assert "mp_rank_01" in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", [*ZERO1, "pp2_dp1_z0_fp32"])
def test_a_pipeline_resharded_to_another_dp_loads_in_deepspeed_natively(ds_corpus, case, tmp_path):
    """DeepSpeed refuses a ZeRO-1 pipeline checkpoint at another data-parallel size; the one
    layoutc writes for that size (layer files, per-stage mp_rank files with the stage's
    param shapes or, for ZeRO-0, its torch optimizer state) loads with a plain
    load_checkpoint — every weight, buffer, master and moment as DeepSpeed saved it."""
    truth, meta = ds_corpus.truth(case)
    spec = None
    if case in ZERO0:
        spec = tmp_path / "model.layout"
        spec.write_text(_spec(meta, truth, meta["topology"]["dp"]))
    world = _other_world(case)
    out = tmp_path / "ds"
    convert(ds_corpus[case], out, "deepspeed", spec=spec, overrides={"dp": world // 2})
    assert verify(out) == []
    loaded = ds_corpus.load(case, out, world=world)
    assert loaded.meta["topology"] == {"pp": 2, "tp": 1, "dp": world // 2}
    corpus.assert_resumed(loaded, truth, meta)


def test_a_pipeline_reshard_equals_the_one_through_universal(ds_corpus, tmp_path):
    case = "pp2_dp1_z1_bf16"
    convert(ds_corpus[case], tmp_path / "direct", "deepspeed", overrides={"dp": 2})
    convert(ds_corpus[case], tmp_path / "universal", "universal")
    convert(tmp_path / "universal", tmp_path / "via", "deepspeed", overrides={"dp": 2})
    direct, via = corpus.tree_bytes(tmp_path / "direct"), corpus.tree_bytes(tmp_path / "via")
    assert direct.keys() == via.keys()
    assert [f for f in direct if direct[f] != via[f]] == []  # byte for byte


PPTP = "pp2_tp2_dp1_z1_bf16"


def test_a_tensor_parallel_pipeline_is_read_with_its_declared_layout(ds_corpus, tmp_path):
    """Hand-written column/row-parallel layers: nothing in the files says which dim each
    tensor is split on, so infer asks for the layout; with it, universal output is exact
    and DeepSpeed resumes from it at dp = 2 (its loader cuts each tensor again on the dim
    recorded next to it), and safetensors hold the whole tensors."""
    with pytest.raises(Unsupported, match="which dim each tensor is split on"):
        infer(open_checkpoint(ds_corpus[PPTP]))
    truth, meta = ds_corpus.truth(PPTP)
    spec = tmp_path / "model.layout"
    spec.write_text(_spec(meta, truth, 1))
    out = tmp_path / "universal"
    _universal_exact(ds_corpus[PPTP], out, truth, spec=spec)
    tag = (out / "latest_universal").read_text()
    row = torch.load(out / tag / "zero" / "1.fc2.weight" / "fp32.pt", weights_only=True)
    assert row["cat_dim"] == 1  # row-parallel: split on dim 1
    loaded = ds_corpus.load(PPTP, out, world=8, universal=True)
    assert loaded.meta["topology"] == {"pp": 2, "tp": 2, "dp": 2}
    for key, want in truth.items():
        if key not in FRESH:
            np.testing.assert_array_equal(loaded.tensors[key], want, err_msg=key)
    st_out = tmp_path / "st"
    convert(ds_corpus[PPTP], st_out, "safetensors", spec=spec)
    values = st.load_state_dict(st_out)
    for key, want in truth.items():
        kind, name = key.split("/", 1)
        if kind in ("fp32", "frozen", "buffer"):
            got = np.asarray(values[name], np.float32).reshape(want.shape)
            np.testing.assert_array_equal(got, want, err_msg=key)


def test_a_tensor_parallel_pipeline_resharded_natively_loads_in_deepspeed(ds_corpus, tmp_path):
    """PP x TP with its declared layout, written for dp = 2: per stage and tp rank its
    mp_rank file, layer_XX-model_YY files, and optimizer partitions; DeepSpeed loads them
    on 8 ranks with a plain load_checkpoint."""
    truth, meta = ds_corpus.truth(PPTP)
    spec = tmp_path / "model.layout"
    spec.write_text(_spec(meta, truth, 1))
    out = tmp_path / "ds"
    convert(ds_corpus[PPTP], out, "deepspeed", spec=spec, overrides={"dp": 2})
    assert verify(out) == []
    loaded = ds_corpus.load(PPTP, out, world=8)
    assert loaded.meta["topology"] == {"pp": 2, "tp": 2, "dp": 2}
    corpus.assert_resumed(loaded, truth, meta)


@pytest.mark.parametrize(
    ("dims", "code", "says"),
    [
        ("6, 10 / tp", "E303", "cut another way"),  # column-parallel declared row-parallel
        ("3, 10", "E305", "1.fc1.weight weight"),  # a split declared replicated, same shape
    ],
)
def test_a_wrong_split_is_caught_not_converted(ds_corpus, tmp_path, dims, code, says):
    truth, meta = ds_corpus.truth(PPTP)
    spec = tmp_path / "wrong.layout"
    spec.write_text(_spec(meta, truth, 1, **{"1.fc1.weight": dims}))
    with pytest.raises(LayoutError) as e:
        convert(ds_corpus[PPTP], tmp_path / "out", "universal", spec=spec)
    assert any(d.code == code and says in d.message for d in e.value.diagnostics), e.value
    assert not (tmp_path / "out").exists()


ONE_STAGE = "pp1_dp2_z1_bf16"  # the same model in one stage, on 2 data-parallel ranks


def _one_stage(text: str) -> str:
    """The inferred pp = 2 layout moved onto one stage at dp = 2 (the tied layer once)."""
    out = text.replace("mesh { pp = 2, dp = 1 }", "mesh { pp = 1, dp = 2 }")
    out = out.replace("stage (0, 1)", "stage 0")
    return re.sub(r" stage 1\b", " stage 0", out)


def test_a_pipeline_resumes_at_another_pipeline_degree_through_universal(ds_corpus, tmp_path):
    case = "pp2_dp1_z1_bf16"
    out = tmp_path / "universal"
    convert(ds_corpus[case], out, "universal")
    loaded = ds_corpus.load(ONE_STAGE, out, world=2, universal=True)
    assert loaded.meta["topology"] == {"pp": 1, "tp": 1, "dp": 2}
    truth, meta = ds_corpus.truth(case)
    corpus.assert_resumed(loaded, truth, meta, skip=FRESH)


def test_a_pipeline_written_for_another_pipeline_degree_loads_natively(ds_corpus, tmp_path):
    """pp 2 -> 1 (and dp 1 -> 2) written directly from a target layout that puts every layer
    on stage 0: DeepSpeed loads every weight, buffer, master and moment. ``--set pp=1`` on
    the source's own layout says which tensors would be off the mesh."""
    case = "pp2_dp1_z1_bf16"
    text = infer(open_checkpoint(ds_corpus[case]))
    with pytest.raises(LayoutError, match="E107"):
        convert(ds_corpus[case], tmp_path / "refused", "deepspeed", overrides={"pp": 1})
    target = tmp_path / "one-stage.layout"
    target.write_text(_one_stage(text))
    out = tmp_path / "ds"
    convert(ds_corpus[case], out, target)
    assert verify(out) == []
    loaded = ds_corpus.load(ONE_STAGE, out, world=2)
    assert loaded.meta["topology"] == {"pp": 1, "tp": 1, "dp": 2}
    truth, meta = ds_corpus.truth(case)
    corpus.assert_resumed(loaded, truth, meta)
