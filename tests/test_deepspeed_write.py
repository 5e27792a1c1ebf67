"""Writing DeepSpeed checkpoints, for random layouts: what the writer lays out, the reader
finds again — the same layout inferred, every buffer where the shard map says, every
element back in place after resharding to another topology.

Real DeepSpeed loading what layoutc writes is proven in tests/interop; these tests cover
the geometry over many more layouts than the corpus has."""

from __future__ import annotations

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
    """What DeepSpeed runs: an optimizer needs a trainable parameter, on every stage."""
    p = place(layout)
    return bool(p.trainable) and all(p.optimizer_groups(s) for s in range(max(1, layout.stages)))


def _writable(layout: ir.Layout) -> bool:
    """What DeepSpeed runs and a stub source gives hyperparameters for: as many param
    groups on every stage (the stub's one list of groups)."""
    p = place(layout)
    counts = {len(p.optimizer_groups(s)) for s in range(max(1, layout.stages))}
    return _runs(layout) and len(counts) == 1


def _stub_source(folder: Path, layout: ir.Layout) -> Path:
    """A source holding only what a fresh layout cannot say: the optimizer's param groups."""
    groups = len(place(layout).optimizer_groups())
    folder.mkdir(parents=True)
    inner = {
        "base_optimizer_state": {
            "param_groups": [
                {"lr": 0.5, "betas": (0.9, 0.99), "params": [g]} for g in range(groups)
            ]
        }
    }
    pt.save({"optimizer_state_dict": inner}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return folder


def write(layout: ir.Layout, values, out: Path, stub: Path) -> None:
    """A DeepSpeed checkpoint of ``layout`` holding ``values``, written by layoutc's writer."""
    p = place(layout)
    prepared = prepare(p, out, stub, TAG)
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
    assume(_writable(a) and _runs(b))  # b takes a's hyperparameters group by group
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
        assert sum(n for _, n in frags) == layout.tensor(name).local_numel, (mp, name)
    assert {name for _, name in seen} == {t.name for t in p.trainable if t.local_numel}
