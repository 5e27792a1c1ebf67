"""layoutc.save writes state dicts torch loads, in parallel pieces, with valid zip CRCs."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from layoutc import save as saving


@pytest.mark.parametrize("direct", [None, False], ids=["direct-where-possible", "buffered"])
@pytest.mark.parametrize("workers", [1, 3])
def test_torch_loads_a_state_dict_written_in_parallel_pieces(
    tmp_path, monkeypatch, workers, direct
):
    monkeypatch.setattr(saving, "PIECE", 2 * 4096)  # many pieces per storage, across threads
    sd = {
        "big": torch.randn(5000),  # pages written directly, and a tail
        "w": torch.randn(17, 13),
        "b": torch.randn(33).bfloat16(),
        "h": torch.randn(5).half(),
        "i": torch.arange(100, dtype=torch.int64),
        "flag": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
        "n": np.arange(12, dtype=np.float32).reshape(3, 4),
    }
    sd["tied"] = sd["w"]  # the same object: one storage
    path = tmp_path / "model.pt"
    size = saving.save(sd, path, workers=workers, direct=direct)
    assert path.stat().st_size == size and not list(tmp_path.glob("*.tmp-*"))
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every member's CRC combined right
    for mmap in (False, True):
        back = torch.load(path, weights_only=True, mmap=mmap)
        assert list(back) == list(sd)
        for k, v in sd.items():
            want = torch.from_numpy(v) if isinstance(v, np.ndarray) else v
            assert back[k].dtype == want.dtype and torch.equal(back[k], want), k
        assert back["tied"].data_ptr() == back["w"].data_ptr()
