"""DCP metadata and items read without running a pickle: a small checkpoint saved by torch's
own ``dcp.save`` in one process (the FSDP2 corpus is in tests/interop)."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from layoutc.conversion import convert
from layoutc.formats import dcp, dcp_metadata, dcp_write, pt
from layoutc.formats.dcp import NotDcp

torch = pytest.importorskip("torch")
tdcp = pytest.importorskip("torch.distributed.checkpoint")
safetensors_torch = pytest.importorskip("safetensors.torch")


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


# ---------------------------------------------------------------- writing (--to dcp)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "deepspeed-zero2"


def _torch_load(folder: Path, template: dict[str, object]) -> dict[str, object]:
    """What torch's own ``dcp.load`` puts into ``template`` from ``folder`` (one process)."""
    tdcp.load(template, storage_reader=tdcp.FileSystemReader(str(folder)))
    return template


def test_a_written_checkpoint_is_what_torch_loads(
    saved: tuple[Path, dict[str, object]], tmp_path: Path
) -> None:
    """DCP -> DCP: torch's loader finds every tensor, bit for bit, and the byte item."""
    folder, state = saved
    out = tmp_path / "out"
    convert(folder, out, "dcp")
    template = {
        "model": {"w": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16)},
        "optim": {"state": {"w": {"exp_avg": torch.zeros(3, 4), "step": torch.tensor(0.0)}}},
        "extra": {"epoch": 0},
    }
    got = _torch_load(out, template)
    assert got["extra"] == {"epoch": 7}
    for path in (("model", "w"), ("model", "b"), ("optim", "state", "w", "exp_avg")):
        want, have = state, got
        for k in path:
            want, have = want[k], have[k]  # type: ignore[index]
        assert torch.equal(have, want) and have.dtype == want.dtype, path  # type: ignore[arg-type]
    assert float(got["optim"]["state"]["w"]["step"]) == 3.0  # type: ignore[index]
    again = dcp.DcpCheckpoint(out)
    assert again.metadata.flat == dcp_metadata.read(folder)[0].flat


def test_a_deepspeed_checkpoint_becomes_a_dcp_that_torch_reads(tmp_path: Path) -> None:
    """DeepSpeed ZeRO-2 (bf16, two param groups, a tie) -> DCP: torch's converter reads
    the fp32 masters under their model names, the tied head once saved and listed twice,
    the moments, and both param groups with every AdamW field."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_out, weights = tmp_path / "dcp", tmp_path / "st"
    convert(EXAMPLE, dcp_out, "dcp")
    convert(EXAMPLE, weights, "safetensors")
    dcp_to_torch_save(str(dcp_out), str(tmp_path / "all.pt"))
    everything = torch.load(tmp_path / "all.pt", weights_only=True)
    masters = safetensors_torch.load_file(str(weights / "model.safetensors"))
    model = everything["model"]
    assert set(model) == set(masters) | {"head.weight"}
    for name, want in masters.items():
        assert torch.equal(model[name], want), name
    assert torch.equal(model["head.weight"], model["embed.weight"])
    groups = everything["optim"]["param_groups"]
    assert [g["params"] for g in groups] == [
        ["embed.weight", "fc1.weight", "fc2.weight"],
        ["scale", "fc1.bias", "fc2.bias", "norm.weight", "norm.bias"],
    ]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(set(dcp_write.ADAMW) <= set(g) for g in groups)
    state = everything["optim"]["state"]
    assert set(state) == {n for g in groups for n in g["params"]}
    assert all(s["step"].dtype == torch.float32 and s["step"].ndim == 0 for s in state.values())
    assert "tie head.weight = embed.weight" in dcp.infer_text(dcp.DcpCheckpoint(dcp_out))


def test_a_dcp_output_is_the_same_under_a_tight_memory_budget(tmp_path: Path) -> None:
    """Streamed under --memory like every conversion: the same files, byte for byte."""
    convert(EXAMPLE, tmp_path / "free", "dcp")
    convert(EXAMPLE, tmp_path / "tight", "dcp", memory_budget=4096)
    for f in sorted((tmp_path / "free").iterdir()):
        if f.name != "layoutc-manifest.json":
            assert (tmp_path / "tight" / f.name).read_bytes() == f.read_bytes(), f.name


def test_plan_shows_a_dcp_target_in_text_and_html(tmp_path: Path) -> None:
    from layoutc.cli import main

    html = tmp_path / "plan.html"
    assert main(["plan", str(EXAMPLE), "--to", "dcp", "--html", str(html)]) == 0
    page = html.read_text()
    assert "(dcp, 2 ranks)" in page and "cut in 2 pieces over dp in __*_*.distcp" in page
