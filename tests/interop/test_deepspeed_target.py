"""layoutc writing native DeepSpeed checkpoints, with real DeepSpeed loading them.

DeepSpeed's own loader refuses a checkpoint saved at another data-parallel size; these
tests convert every corpus checkpoint to the other world size (and across ZeRO stages),
have DeepSpeed load it with a plain ``engine.load_checkpoint`` (no universal checkpoint),
compare what it loaded with its own ground truth from save time, and train one more step.
"""

from __future__ import annotations

import math
import re

import corpus  # tests/interop, on the path through conftest
import numpy as np
import pytest
import torch

from layoutc.conversion import convert, verify
from layoutc.errors import Unsupported
from layoutc.formats import pt
from layoutc.formats import safetensors as st
from layoutc.formats.deepspeed import infer, open_checkpoint
from layoutc.lang.check import load_text
from layoutc.place import place

CASES = sorted(corpus.CASES)  # every checkpoint of the corpus
STATES = ("fp32", "exp_avg", "exp_avg_sq", "frozen", "buffer")


def _other_world(case: str) -> int:
    return 2 if "_w3" in case else 3


def _assert_resumes_exactly(loaded, truth, meta):
    for key, want in truth.items():
        if key.split("/", 1)[0] in STATES:
            assert np.array_equal(loaded.tensors[key], want), key
    for field in ("step", "global_steps", "lr_scheduler"):
        assert loaded.meta[field] == meta[field], field
    # and training goes on from there
    assert math.isfinite(loaded.meta["next_loss"])
    assert loaded.meta["global_steps_after"] == meta["global_steps"] + 1


@pytest.mark.parametrize("case", CASES)
def test_deepspeed_loads_a_reshard_to_another_world_size_natively(ds_corpus, case, tmp_path):
    world = _other_world(case)
    out = tmp_path / "ds"
    convert(ds_corpus[case], out, "deepspeed", overrides={"dp": world})
    assert verify(out) == []
    assert (out / "latest").read_text() == "global_step2"
    truth, meta = ds_corpus.truth(case)
    loaded = ds_corpus.load(case, out, world=world)  # no load_universal
    _assert_resumes_exactly(loaded, truth, meta)


@pytest.mark.parametrize(
    ("case", "stage", "world", "load_as"),
    [
        ("z2_w2_bf16", 3, 3, "z3_w3_bf16"),
        ("z3_w2_fp32", 1, 3, "z1_w3_fp32"),
        ("z3_w3_bf16", 2, 2, "z2_w2_bf16"),
        ("z1_w3_fp32", 2, 2, "z2_w2_fp32"),
    ],
)
def test_a_reshard_across_zero_stages_loads_in_deepspeed(
    ds_corpus, case, stage, world, load_as, tmp_path
):
    text = infer(open_checkpoint(ds_corpus[case]))
    text = re.sub(r"zero \d over dp( \{[^}]*\})?", f"zero {stage} over dp", text)
    target = tmp_path / "target.layout"
    target.write_text(text)
    out = tmp_path / "ds"
    convert(ds_corpus[case], out, target, overrides={"dp": world})
    truth, meta = ds_corpus.truth(case)
    _assert_resumes_exactly(ds_corpus.load(load_as, out, world=world), truth, meta)


def _flat(obj, prefix=""):
    """(key path, leaf) pairs of a loaded container, records included, in order."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{prefix}/{k}")
    elif isinstance(obj, list | tuple) and not isinstance(obj, pt.Size):
        for i, v in enumerate(obj):
            yield from _flat(v, f"{prefix}/{i}")
    elif isinstance(obj, pt.Record):
        yield prefix, (obj.cls, obj.args)
        yield from _flat(obj.state, prefix + "#")
    else:
        yield prefix, obj


@pytest.mark.parametrize("case", CASES)
def test_same_size_conversion_reproduces_deepspeeds_own_files(ds_corpus, case, tmp_path):
    """A -> A: the same files, keys in the same order, every value and tensor equal —
    except ZeRO-3 partition padding, which DeepSpeed leaves uninitialised and layoutc zeroes."""
    out = tmp_path / "ds"
    convert(ds_corpus[case], out, "deepspeed")
    src = open_checkpoint(ds_corpus[case]).folder
    dst = out / src.name
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in src.iterdir())
    layout = load_text(infer(open_checkpoint(ds_corpus[case])))
    pads: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for r in place(layout).pads():
        pads.setdefault((r.file, r.key), []).append((r.offset, r.offset + r.numel))
    for f in sorted(p.name for p in src.iterdir()):
        want = list(_flat(pt.load(src / f)))
        got = list(_flat(pt.load(dst / f)))
        assert [k for k, _ in got] == [k for k, _ in want], f
        for (key, a), (_, b) in zip(want, got, strict=True):
            if not isinstance(a, pt.TensorRef):
                assert type(b) is type(a) and b == a, (f, key)
                continue
            assert isinstance(b, pt.TensorRef), (f, key)
            assert (b.dtype, tuple(b.shape)) == (a.dtype, tuple(a.shape)), (f, key)
            x, y = a.numpy().reshape(-1).copy(), b.numpy().reshape(-1)
            for lo, hi in pads.get((f, key.lstrip("/")), []):
                assert not y[lo:hi].any(), (f, key, "padding is zero")
                x[lo:hi] = 0
            assert np.array_equal(x, y), (f, key)


GROUPS = [{"lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": wd} for wd in (0.1, 0)]


@pytest.mark.parametrize(
    ("case", "fmt", "dtype"),
    [
        ("z2_w2_bf16", "safetensors", None),  # fp32 weights -> bf16 ZeRO-2
        ("z3_w2_bf16", "torch", "bf16"),  # bf16 weights -> ZeRO-3 (masters cast up)
        ("bf16opt_w2", "safetensors", None),  # -> DeepSpeed's bf16 optimizer
    ],
)
def test_full_weights_become_a_checkpoint_deepspeed_trains_from(
    ds_corpus, case, fmt, dtype, tmp_path
):
    weights = tmp_path / "weights"
    convert(ds_corpus[case], weights, fmt, **({"dtype": dtype} if dtype else {}))
    spec = tmp_path / "model.layout"
    spec.write_text(infer(open_checkpoint(ds_corpus[case])))
    out = tmp_path / "ds"
    convert(weights, out, "deepspeed", spec=spec, overrides={"dp": 3}, param_groups=GROUPS)
    if fmt == "torch":
        sd = torch.load(weights / "pytorch_model.bin", weights_only=True)
        values = {k: v.float().numpy() for k, v in sd.items()}
    else:
        values = {k: np.asarray(v, np.float32) for k, v in st.load_state_dict(weights).items()}
    loaded = ds_corpus.load(case, out, world=3, fresh=True)
    truth, _ = ds_corpus.truth(case)
    for key, want in truth.items():
        kind, name = key.split("/", 1)
        if kind == "fp32":  # the masters are the weights, cast to fp32
            assert np.array_equal(loaded.tensors[key], values[name].reshape(want.shape)), key
        elif kind in ("exp_avg", "exp_avg_sq"):
            assert not loaded.tensors[key].any(), key
    assert loaded.meta["step"] == 0 and loaded.meta["global_steps"] == 0
    assert math.isfinite(loaded.meta["next_loss"]) and loaded.meta["global_steps_after"] == 1


@pytest.mark.parametrize("case", CASES)
def test_resharding_directly_equals_resharding_through_universal(ds_corpus, case, tmp_path):
    world = _other_world(case)
    convert(ds_corpus[case], tmp_path / "direct", "deepspeed", overrides={"dp": world})
    convert(ds_corpus[case], tmp_path / "universal", "universal")
    convert(tmp_path / "universal", tmp_path / "via", "deepspeed", overrides={"dp": world})
    direct, via = corpus.tree_bytes(tmp_path / "direct"), corpus.tree_bytes(tmp_path / "via")
    assert direct.keys() == via.keys()
    assert [f for f in direct if direct[f] != via[f]] == []  # byte for byte


@pytest.mark.parametrize("case", ["z2_w2_bf16", "z1_w3_fp32", "bf16opt_w2"])
def test_deepspeeds_own_universal_output_becomes_a_native_checkpoint(ds_corpus, case, tmp_path):
    src = open_checkpoint(ds_corpus[case])
    universal = corpus.ds_to_universal(
        src.folder, tmp_path / "ds_universal", python=ds_corpus.python
    )
    world = _other_world(case)
    out = tmp_path / "ds"
    convert(universal, out, "deepspeed", overrides={"dp": world})
    truth, meta = ds_corpus.truth(case)
    _assert_resumes_exactly(ds_corpus.load(case, out, world=world), truth, meta)


def test_deepspeeds_flattened_zero3_universal_output_is_refused_by_name(ds_corpus, tmp_path):
    src = open_checkpoint(ds_corpus["z3_w2_fp32"])
    universal = corpus.ds_to_universal(src.folder, tmp_path / "u", python=ds_corpus.python)
    with pytest.raises(Unsupported, match=r"fp32\.pt: a bare tensor, not a dict with `param`"):
        convert(universal, tmp_path / "ds", "deepspeed")
    assert not (tmp_path / "ds").exists()
