"""The .pt container without torch, proven against real torch."""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from layoutc.formats import pt

DTYPES = {
    "fp32": (np.float32, torch.float32),
    "fp16": (np.float16, torch.float16),
    "bf16": (ml_dtypes.bfloat16, torch.bfloat16),
    "int64": (np.int64, torch.int64),
    "int32": (np.int32, torch.int32),
    "uint8": (np.uint8, torch.uint8),
    "bool": (np.bool_, torch.bool),
}


def _as_np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(sorted(DTYPES)),
    hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
    st.integers(0, 2**32 - 1),
)
def test_torch_loads_what_layoutc_writes(tmp_path_factory, dtype, shape, seed):
    rng = np.random.default_rng(seed)
    np_dtype, torch_dtype = DTYPES[dtype]
    values = (rng.standard_normal(shape) * 100).astype(np.float32).astype(np_dtype)
    path = tmp_path_factory.mktemp("pt") / "t.pt"
    pt.save({"x": pt.Tensor(dtype, tuple(values.shape), values)}, path)
    back = torch.load(path, weights_only=True, mmap=True)["x"]
    assert back.dtype == torch_dtype and tuple(back.shape) == values.shape
    assert np.array_equal(_as_np(back), values)


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(sorted(DTYPES)),
    hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
    st.integers(0, 2**32 - 1),
)
def test_layoutc_reads_what_torch_writes_including_views(tmp_path_factory, dtype, shape, seed):
    rng = np.random.default_rng(seed)
    _, torch_dtype = DTYPES[dtype]
    base = torch.from_numpy((rng.standard_normal(shape) * 100).astype(np.float32)).to(torch_dtype)
    sd = {"base": base, "t": base.t() if base.dim() == 2 else base, "tail": base.reshape(-1)[1:]}
    path = tmp_path_factory.mktemp("pt") / "t.pt"
    torch.save(sd, path)
    got = pt.load(path)
    for k, ref in sd.items():
        assert got[k].shape == tuple(ref.shape)
        assert np.array_equal(got[k].numpy(), _as_np(ref.contiguous())), k
        flat = _as_np(ref.contiguous()).reshape(-1)
        lo, hi = len(flat) // 3, len(flat) - len(flat) // 4
        assert np.array_equal(got[k].read_flat(lo, hi), flat[lo:hi])
    assert got["base"].storage == got["tail"].storage  # one storage, two views


def test_entries_with_one_key_share_a_storage_in_torch(tmp_path: Path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    pt.save(
        OrderedDict(
            embed=pt.Tensor("fp32", (2, 3), w, key="e"), head=pt.Tensor("fp32", (2, 3), w, key="e")
        ),
        tmp_path / "t.pt",
    )
    back = torch.load(tmp_path / "t.pt", weights_only=True)
    assert isinstance(back, OrderedDict) and list(back) == ["embed", "head"]
    assert back["embed"].data_ptr() == back["head"].data_ptr()


def test_unkeyed_tensors_never_take_a_key_a_keyed_tensor_uses(tmp_path: Path):
    a, b = np.zeros(0, np.float32), np.arange(3, dtype=np.float32)
    pt.save(
        {"stub": pt.Tensor("fp32", (0,), a), "w": pt.Tensor("fp32", (3,), b, key="0")},
        tmp_path / "t.pt",
    )
    back = torch.load(tmp_path / "t.pt", weights_only=True)
    assert back["stub"].numel() == 0 and back["w"].tolist() == [0.0, 1.0, 2.0]


def test_torch_size_survives_reading_and_writing_again(tmp_path: Path):
    torch.save({"shapes": [torch.Size([37, 10])], "plain": (37, 10)}, tmp_path / "a.pt")
    mine = pt.load(tmp_path / "a.pt")
    assert isinstance(mine["shapes"][0], pt.Size) and not isinstance(mine["plain"], pt.Size)
    pt.save(mine, tmp_path / "b.pt")
    back = torch.load(tmp_path / "b.pt", weights_only=True)
    assert type(back["shapes"][0]) is torch.Size and back["shapes"][0].numel() == 370
    assert type(back["plain"]) is tuple


def test_containers_scalars_and_parameters_round_trip_through_torch(tmp_path: Path):
    obj = {
        "ints": [0, 255, 65535, -1, 2**31 - 1, -(2**31), 2**40, -(2**70)],
        "floats": (0.5, -1e300),
        "strings": {"a": "ünïcode", "n": None, "t": True, "f": False},
        "p": pt.Tensor("fp32", (2,), np.ones(2, np.float32), parameter=True, requires_grad=True),
        "dtype": pt.DType("bfloat16"),
    }
    pt.save(obj, tmp_path / "t.pt")
    back = torch.load(tmp_path / "t.pt", weights_only=True)
    assert (
        back["ints"] == obj["ints"]
        and back["floats"] == obj["floats"]
        and back["strings"] == obj["strings"]
    )
    assert isinstance(back["p"], torch.nn.Parameter) and back["p"].requires_grad
    assert back["dtype"] is torch.bfloat16
    mine = pt.load(tmp_path / "t.pt")
    assert mine["ints"] == obj["ints"] and mine["dtype"] == pt.DType("bfloat16")


def test_large_tensors_stream_from_chunks(tmp_path: Path):
    n = 3_000_000

    def chunks():
        for start in range(0, n, 1_000_000):
            yield np.arange(start, min(n, start + 1_000_000), dtype=np.float32).tobytes()

    written = pt.save({"x": pt.Tensor("fp32", (n,), chunks)}, tmp_path / "t.pt")
    assert written == (tmp_path / "t.pt").stat().st_size
    back = torch.load(tmp_path / "t.pt", weights_only=True, mmap=True)["x"]
    assert back[123456].item() == 123456.0 and back[-1].item() == n - 1


def test_a_foreign_global_is_refused_and_never_runs(tmp_path: Path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"x": Payload()}, protocol=2))
    with pytest.raises(pt.UnsafePickle, match=r"evil\.pt: refusing to load the pickled global `"):
        pt.load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_deepspeed_classes_become_inert_records(tmp_path: Path):
    scaler = pt.Record(
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        (),
        {"cur_scale": 65536.0, "cur_iter": 3},
    )
    stage = pt.Record("deepspeed.runtime.zero.config.ZeroStageEnum", (2,))
    frag = pt.Record(
        "deepspeed.utils.tensor_fragment.fragment_address", (), {"numel": 10, "start": 4}
    )
    pt.save(
        {"loss_scaler": scaler, "zero_stage": stage, "mapping": OrderedDict(w=frag)},
        tmp_path / "o.pt",
    )
    got = pt.load(tmp_path / "o.pt")
    assert (
        got["loss_scaler"].cls.endswith("DynamicLossScaler")
        and got["loss_scaler"].get("cur_scale") == 65536.0
    )
    assert got["zero_stage"].args == (2,)
    assert got["mapping"]["w"].state == {"numel": 10, "start": 4}
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "o.pt", weights_only=True)  # torch refuses them too, by design


def test_not_a_container_is_a_clear_error(tmp_path: Path):
    (tmp_path / "x.pt").write_bytes(b"not a zip")
    with pytest.raises(pt.BadContainer, match=r"x\.pt: not a torch zip checkpoint"):
        pt.load(tmp_path / "x.pt")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a/other", b"")
    (tmp_path / "y.pt").write_bytes(buf.getvalue())
    with pytest.raises(pt.BadContainer, match=r"no data\.pkl"):
        pt.load(tmp_path / "y.pt")
