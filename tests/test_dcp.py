"""DCP metadata and items read without running a pickle: a small checkpoint saved by torch's
own ``dcp.save`` in one process (the FSDP2 corpus is in tests/interop)."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from layoutc.formats import dcp, dcp_metadata, pt
from layoutc.formats.dcp import NotDcp

torch = pytest.importorskip("torch")
tdcp = pytest.importorskip("torch.distributed.checkpoint")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    folder = tmp_path_factory.mktemp("dcp")
    state = {
        "model": {
            "w": torch.arange(12.0).reshape(3, 4),
            "b": torch.ones(5, dtype=torch.bfloat16),
        },
        "optim": {"state": {"w": {"exp_avg": torch.full((3, 4), 2.0), "step": torch.tensor(3.0)}}},
        "extra": {"epoch": 7},
    }
    tdcp.save(state, storage_writer=tdcp.FileSystemWriter(str(folder), thread_count=2))
    return folder, state


def _copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def test_metadata_lists_every_chunk_and_byte_item(saved: tuple[Path, dict[str, object]]) -> None:
    folder, _ = saved
    md, files = dcp_metadata.read(folder)
    assert files == [".metadata"]
    assert md.tensors["model.w"].shape == (3, 4) and md.tensors["model.b"].dtype == "bf16"
    assert md.tensors["optim.state.w.step"].shape == ()
    assert md.byte_items == ["extra.epoch"]
    assert md.flat["model.w"] == ("model", "w")


def test_each_item_is_read_in_place_as_saved(saved: tuple[Path, dict[str, object]]) -> None:
    folder, _ = saved
    ckpt = dcp.DcpCheckpoint(folder)
    ref = ckpt.tensor_item("model.w", (0, 0))
    assert np.array_equal(ref.numpy(ckpt.opener), np.arange(12.0).reshape(3, 4))
    assert ref.storage.member.startswith("@")  # a member of the container inside the file
    step = ckpt.tensor_item("optim.state.w.step", ())
    assert float(step.numpy(ckpt.opener)) == 3.0
    assert ckpt.keys.model == {"w": "model.w", "b": "model.b"}
    assert ckpt.keys.states == {"w": ("exp_avg", "step")}


def test_a_metadata_naming_os_system_is_refused_before_anything_runs(
    saved: tuple[Path, dict[str, object]], tmp_path: Path
) -> None:
    bad = _copy(saved[0], tmp_path / "bad")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return os.system, (f"touch {marker}",)

    (bad / ".metadata").write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.raises(pt.UnsafePickle, match=r"\.metadata: refusing .*`posix\.system`"):
        dcp.DcpCheckpoint(bad)
    assert not marker.exists()


def test_an_item_past_the_end_of_its_file_is_named(
    saved: tuple[Path, dict[str, object]], tmp_path: Path
) -> None:
    cut = _copy(saved[0], tmp_path / "cut")
    victim = max(cut.glob("*.distcp"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(NotDcp, match=rf"{victim.name}: \d+ bytes, .* truncated"):
        dcp.DcpCheckpoint(cut)
