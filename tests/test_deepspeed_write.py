"""Writing DeepSpeed checkpoints, for random layouts: what the writer lays out, the reader
finds again — the same layout inferred, every buffer where the shard map says, every
element back in place after resharding to another topology.

Real DeepSpeed loading what layoutc writes is proven in tests/interop; these tests cover
the geometry over many more layouts than the corpus has."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from layouts import layout_pairs

from layoutc import ir, zero
from layoutc.conversion import SourceFiles, execute, verify
from layoutc.errors import Unsupported
from layoutc.formats import pt
from layoutc.formats.deepspeed import infer, open_checkpoint
from layoutc.formats.match import check_against
from layoutc.formats.writers import prepare
from layoutc.lang.check import load_text
from layoutc.lang.fmt import fmt
from layoutc.lang.parse import parse
from layoutc.place import place
from layoutc.plan.compile import compile_plan
from layoutc.runtime import memory

TAG = "global_step7"


def _runs(layout: ir.Layout) -> bool:
    """What DeepSpeed runs: an optimizer needs a trainable parameter with elements on every
    stage and model-parallel rank."""
    p = place(layout)
    models = range(p.mesh.size(*p.model_axes)) if p.uneven else range(1)
    return bool(p.trainable) and all(
        p.optimizer_groups(s, m) for s in range(max(1, layout.stages)) for m in models
    )


def _lr(layout: ir.Layout, group: str) -> float:
    """A learning rate that names the layout's param group (to follow it through)."""
    return 0.001 * (1 + layout.groups.index(group))


def _stage_files(p) -> list[tuple[int, str]]:
    """(stage, the file holding that stage's param groups) of a DeepSpeed placement."""
    out = []
    for stage in range(max(1, p.layout.stages)):
        coords = dict.fromkeys(p.mesh.names, 0)
        if p.layout.pipeline:
            coords[p.layout.pipeline] = stage
        out.append((stage, p.model_file(coords) if p.mode == "plain" else p.optim_file(coords)))
    return out


def _saved_groups(obj: dict, plain: bool) -> list[dict]:
    inner = obj["optimizer"] if plain else obj["optimizer_state_dict"]
    inner = inner.get("base_optimizer_state") or inner.get("optimizer_state_dict") or inner
    return inner["param_groups"]


def _stub_source(folder: Path, layout: ir.Layout) -> Path:
    """A source holding only what a fresh layout cannot say: each stage's param groups
    (hyperparameters), in the files where DeepSpeed keeps them, each group's lr naming it."""
    p = place(layout)
    folder.mkdir(parents=True)
    for stage, f in _stage_files(p):
        groups = [
            {"lr": _lr(layout, members[0].group), "betas": (0.9, 0.99), "params": [g]}
            for g, members, _m in p.optimizer_groups(stage)
        ]
        key = "optimizer_state_dict" if p.mode == "stage3" else "base_optimizer_state"
        obj = (
            {"optimizer": {"param_groups": groups}}
            if p.mode == "plain"
            else {"optimizer_state_dict": {key: {"param_groups": groups}}}
        )
        pt.save(obj, folder / f)
    return folder


def write(layout: ir.Layout, values, out: Path, stub: Path) -> None:
    """A DeepSpeed checkpoint of ``layout`` holding ``values``, written by layoutc's writer."""
    p = place(layout)
    prepared = prepare(p, out, stub, TAG, source=p)
    for (file, key), data in zero.partition(layout, values).items():
        if data.size:
            prepared.views[(file, key)][0 : data.size] = data
    prepared.finish()
    for marker, text in prepared.markers.items():
        marker.write_text(text)


def read(layout: ir.Layout, folder: Path):
    files = SourceFiles(folder)
    try:
        stored = {(b.file, b.key): files[(b.file, b.key)][:] for b in place(layout).buffers()}
    finally:
        files.close()
    return zero.reassemble(layout, stored)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(layout_pairs())
def test_written_checkpoints_read_back_infer_and_reshard_exactly(tmp_path_factory, pair):
    a, b = pair
    assume(_runs(a) and _runs(b))
    tmp = tmp_path_factory.mktemp("ds")
    values = memory.markers(place(a))
    write(a, values, tmp / "a", _stub_source(tmp / "stub", a))

    ckpt = open_checkpoint(tmp / "a")
    check_against(place(a), ckpt.folder)  # every file and key, sizes and dtypes
    written = ckpt.model_files + ckpt.optim_files + ckpt.layer_files
    assert sorted(p.name for p in written) == sorted(place(a).files())
    text: str | None = None
    if a.mesh.size("tp") == 1:  # infer reads data- and pipeline-parallel checkpoints
        try:
            text = infer(ckpt)
        except Unsupported as e:  # what ZeRO-0 and pipeline files cannot say
            assert a.pipeline or a.zero.stage == 0, e
            said = ("ZeRO-0", "only frozen parameters", "model-parallel layer file")
            assert any(m in str(e) for m in said), e
    if text is not None:
        assert fmt(parse(text)) == text, text
        inferred = load_text(text)
        stored = sorted((t.name, t.local_shape, t.kind, t.dtype) for t in a.tensors)  # padded
        assert sorted((t.name, t.shape, t.kind, t.dtype) for t in inferred.tensors) == stored
        assert inferred.ties == a.ties
        check_against(place(inferred), ckpt.folder)
        assert sorted(place(inferred).files()) == sorted(place(a).files())
    _assert_param_slice_mappings_tile_every_parameter(a, ckpt.folder)
    back = read(a, ckpt.folder)
    for t in place(a).tensors:
        for s in place(a).states(t):
            assert np.array_equal(back[t.name][s], values[t.name][s]), (t.name, s)

    plan = compile_plan(a, b)
    plan.validate(plan.source_placement, plan.target_placement)
    execute(plan, ckpt.folder, tmp / "b", tag=TAG)
    assert verify(tmp / "b") == []
    got = read(b, open_checkpoint(tmp / "b").folder)
    pb = place(b)
    for t in pb.tensors:
        for s in pb.states(t):
            have = values[t.name]
            if s == "weight" and pb.mode == "plain" and "master" in have:
                want = have["master"]  # ZeRO-0's fp32 weight is the master
            elif s in have:
                want = have[s]
            else:  # stage 3 keeps no 16-bit copy; ZeRO-0 keeps no master but its weight
                want = have["master" if s == "weight" else "weight"]
            assert np.array_equal(_f64(got[t.name][s]), _f64(want)), (t.name, s)
    # each of b's param groups got the hyperparameters of its layout group, stage by stage
    for stage, f in _stage_files(pb):
        saved = _saved_groups(pt.load(tmp / "b" / TAG / f), pb.mode == "plain")
        names = [members[0].group for _, members, _m in pb.optimizer_groups(stage)]
        assert [g["lr"] for g in saved] == [_lr(b, n) for n in names], f


def _f64(a) -> np.ndarray:
    return np.asarray(a, np.float64)


def _assert_param_slice_mappings_tile_every_parameter(layout: ir.Layout, folder: Path) -> None:
    p = place(layout)
    if p.mode != "flat":
        return
    seen: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for f in sorted(folder.glob("*optim_states.pt")):
        mp = f.name.split("mp_rank_")[1]
        inner = pt.load(f)["optimizer_state_dict"]
        for g, mapping in enumerate(inner["param_slice_mappings"]):
            size = inner["single_partition_of_fp32_groups"][g].numel + inner["group_paddings"][g]
            for name, frag in mapping.items():
                assert (
                    frag.state["start"] >= 0 and frag.state["start"] + frag.state["numel"] <= size
                )
                seen.setdefault((mp, name), []).append((frag.state["start"], frag.state["numel"]))
    for (mp, name), frags in seen.items():  # each parameter once per model-parallel rank
        model = p.model_index(p.mesh.unindex(p.mp_axes, int(mp.split("_")[0])))
        assert sum(n for _, n in frags) == math.prod(p.local_shape(layout.tensor(name), model)), (
            mp,
            name,
        )
    # every parameter somewhere; on a rank whose slice is empty, nowhere (DeepSpeed's rule)
    assert {name for _, name in seen} == {t.name for t in p.trainable if t.local_numel}
