"""layoutc.deepspeed's saver in one process, without DeepSpeed: each file holds what
``torch.save`` would, a tag is committed atomically with its manifest, a failure is raised
by the next call and keeps the last tag, host buffers stay within their bound."""

from __future__ import annotations

import errno
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layoutc.deepspeed import SaveFailed
from layoutc.deepspeed.saver import Saver
from layoutc.deepspeed.snapshot import HostBuffers
from layoutc.runtime import fileio
from layoutc.runtime.commit import verify

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool]


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """Tensors of several dtypes, some sharing a storage at an offset, some not
    contiguous, a Parameter, an empty one, and plain values, nested."""
    base = torch.randn(
        draw(st.integers(1, 300)),
        generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))),
    )
    out: dict[str, Any] = {"step": draw(st.integers(0, 10**9)), "name": "adam", "none": None}
    for i in range(draw(st.integers(1, 6))):
        dtype = draw(st.sampled_from(DTYPES))
        n = draw(st.integers(0, 200))
        out[f"t{i}"] = (torch.arange(n) % 7).to(dtype)
    lo = draw(st.integers(0, base.numel() - 1))
    out["view"] = base[lo:]  # a view into a storage another entry holds too
    out["base"] = base
    out["nested"] = OrderedDict(
        w=torch.nn.Parameter(torch.ones(3, 4), requires_grad=draw(st.booleans())),
        t=torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
        groups=[{"lr": 0.1, "params": [0, 1]}],
    )
    return out


def _same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and type(a) is type(b)
        assert (a.dtype, a.shape, a.stride(), a.storage_offset()) == (
            b.dtype,
            b.shape,
            b.stride(),
            b.storage_offset(),
        )
        assert torch.equal(a, b) and a.requires_grad == b.requires_grad
    elif isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("async_save", [False, True])
@settings(max_examples=15, deadline=None)
@given(sd=state_dicts())
def test_a_saved_file_holds_what_torch_save_would(
    tmp_path_factory: pytest.TempPathFactory, sd: dict[str, Any], async_save: bool
) -> None:
    folder = tmp_path_factory.mktemp("ckpt")
    saver = Saver(async_save=async_save, workers=2, host_memory=1 << 20)
    saver.begin(folder, "t")
    saver.save(sd, folder / "t" / "states.pt")
    torch.save(sd, folder / "theirs.pt")
    if async_save:  # the caller may change its tensors as soon as save returns
        want = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}
        sd["base"].zero_()
        sd["t0"] = "replaced"
    saver.end(save_latest=True)
    saver.close()
    ours = torch.load(folder / "t" / "states.pt", weights_only=True)
    _same(torch.load(folder / "theirs.pt", weights_only=True), ours)
    if async_save:  # the values at the call, not after it
        for k, v in want.items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == ours[k].dtype and torch.equal(v, ours[k]), k
    assert ours["view"].untyped_storage().data_ptr() == ours["base"].untyped_storage().data_ptr()
    assert (folder / "latest").read_text() == "t" and verify(folder / "t") == []


@pytest.mark.parametrize("host_memory", [None, 1 << 20])
def test_an_async_tag_of_many_files_holds_the_values_at_the_call(
    tmp_path: Path, host_memory: int | None
) -> None:
    """Writes wait for the whole tag to be copied, unless the host buffers run out: then
    they start so that the copy can go on. Either way each file holds what it held at the
    call, though the caller changes every tensor at once."""
    saver = Saver(async_save=True, workers=2, host_memory=host_memory)
    g = torch.Generator().manual_seed(0)
    sds = [
        {"w": torch.randn(n, generator=g), "b": torch.randn(7, generator=g)}
        for n in (800_000, 300_001, 1_000_003)
    ]
    want = [{k: v.clone() for k, v in sd.items()} for sd in sds]
    saver.begin(tmp_path, "t")
    for i, sd in enumerate(sds):
        saver.save(sd, tmp_path / "t" / f"f{i}.pt")
        for v in sd.values():
            v.fill_(float("nan"))
    saver.end(save_latest=True)
    saver.close()
    for i, sd in enumerate(want):
        ours = torch.load(tmp_path / "t" / f"f{i}.pt", weights_only=True)
        assert all(torch.equal(ours[k], v) for k, v in sd.items()), i
    assert verify(tmp_path / "t") == [] and saver.buffers.used == 0


def test_saving_a_tag_again_replaces_it_whole(tmp_path: Path) -> None:
    saver = Saver(async_save=False)
    for value in (1.0, 2.0):
        saver.begin(tmp_path, "t")
        saver.save({"x": torch.full((4,), value)}, tmp_path / "t" / "a.pt")
        if value == 1.0:
            saver.save({"y": torch.zeros(2)}, tmp_path / "t" / "b.pt")
        saver.end(save_latest=True)
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["a.pt", "layoutc-manifest.json"]
    assert torch.load(tmp_path / "t" / "a.pt", weights_only=True)["x"][0] == 2.0
    assert verify(tmp_path / "t") == [] and not list(tmp_path.glob(".*"))


def test_a_failed_write_is_raised_by_the_next_save_and_keeps_the_last_tag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saver = Saver(async_save=True)
    saver.begin(tmp_path, "a")
    saver.save({"x": torch.ones(1000)}, tmp_path / "a" / "f.pt")
    saver.end(save_latest=True)
    saver.wait()

    def full(self: Any, at: int, raw: Any, crc: Any = None) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)

    monkeypatch.setattr(fileio.Region, "write_bytes", full)
    saver.begin(tmp_path, "b")
    saver.save({"x": torch.ones(1000)}, tmp_path / "b" / "f.pt")  # returns: async
    saver.end(save_latest=True)
    with pytest.raises(SaveFailed, match=r"/b was not saved .*No space left on device"):
        saver.begin(tmp_path, "c")
    saver.wait()  # raised once
    assert (tmp_path / "latest").read_text() == "a" and not (tmp_path / "b").exists()
    assert verify(tmp_path / "a") == [] and not list(tmp_path.glob(".*partial"))


def test_a_partial_tag_left_by_a_killed_job_is_removed_by_the_next_save(tmp_path: Path) -> None:
    (tmp_path / ".old.layoutc-partial").mkdir()
    (tmp_path / ".old.layoutc-partial" / "half.pt").write_bytes(b"\0" * 10)
    saver = Saver(async_save=False)
    saver.begin(tmp_path, "new")
    saver.end(save_latest=False)
    assert not (tmp_path / ".old.layoutc-partial").exists() and not (tmp_path / "latest").exists()


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=40),
    limit=st.integers(4096, 12288),
)
def test_host_buffers_never_hold_more_than_their_limit(sizes: list[int], limit: int) -> None:
    buffers = HostBuffers(4096, limit)
    peak = [0]
    lock = threading.Lock()

    def use(n: int) -> None:
        buf = buffers.take(min(n, buffers.piece))
        with lock:
            peak[0] = max(peak[0], buffers.used)
        buffers.give(buf)

    threads = [threading.Thread(target=use, args=(n,)) for n in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= limit and buffers.used == 0
