"""The README's main job on the shipped example: a real DeepSpeed checkpoint, converted."""

from __future__ import annotations

import json
import zipfile
import zlib

import numpy as np

import layoutc
from layoutc.conversion import MANIFEST, verify
from layoutc.formats import pt
from layoutc.formats import safetensors as st
from layoutc.formats.deepspeed import infer, open_checkpoint

EXAMPLE = "examples/deepspeed-zero2"


def test_the_example_converts_to_universal_and_verifies(tmp_path):
    out = tmp_path / "u"
    report = layoutc.convert(EXAMPLE, out, "universal")
    assert (out / "latest_universal").read_text() == "global_step2"
    assert verify(out) == []
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["files"]) == set(report.files) | set(report.markers)
    assert manifest["markers"] == list(report.markers) == ["latest_universal"]
    # the files of tensors counted alike by the plan, the report and the disk
    assert report.plan.summary()["files_written"] == len(report.files)
    on_disk = [p for p in out.rglob("*") if p.is_file()]
    assert len(on_disk) == len(report.files) + len(report.markers) + 1  # + the manifest
    assert report.summary().startswith(
        f"wrote 7.4 KiB in {len(report.files)} files (and latest_universal, {MANIFEST}) to {out}"
    )
    for rel, entry in manifest["files"].items():  # combined from the writes, never re-read
        assert entry["crc32"] == f"{zlib.crc32((out / rel).read_bytes()):08x}", rel
    for container in out.rglob("*.pt"):  # every zip member's CRC patched correctly
        with zipfile.ZipFile(container) as z:
            assert z.testzip() is None, container
    fp32 = pt.load(out / "global_step2" / "zero" / "embed.weight" / "fp32.pt")["param"]
    assert fp32.shape == (37, 10) and fp32.dtype == "fp32"


def test_the_example_exports_its_fp32_masters_to_safetensors(tmp_path):
    layoutc.convert(EXAMPLE, tmp_path / "s", "safetensors")
    values = st.load_state_dict(tmp_path / "s")
    ckpt = open_checkpoint(EXAMPLE)
    module = ckpt.model_states["module"]
    for name, arr in values.items():
        assert arr.shape == module[name].shape
        if module[name].dtype == "bf16":  # the 16-bit weights are the masters rounded
            rounded = np.asarray(arr, np.float32).astype(module[name].numpy().dtype)
            assert np.array_equal(rounded, module[name].numpy()), name
    assert values["head.weight"] is values["embed.weight"]


def test_safetensors_output_is_sharded_with_an_index_above_the_shard_size(tmp_path):
    out = tmp_path / "s"
    layoutc.convert(EXAMPLE, out, "safetensors", max_shard_size=600)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({p.name for p in out.glob("model-*-of-*.safetensors")})
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert index["weight_map"]["head.weight"] == index["weight_map"]["embed.weight"]
    values = st.load_state_dict(out)
    whole = st.load_state_dict(_single(tmp_path))
    assert values.keys() == whole.keys()
    assert all(np.array_equal(values[k], whole[k]) for k in values)
    assert verify(out) == []


def _single(tmp_path):
    out = tmp_path / "one"
    layoutc.convert(EXAMPLE, out, "safetensors")
    return out


def test_a_compiled_plan_and_the_same_plan_read_back_write_the_same_bytes(tmp_path):
    ckpt = open_checkpoint(EXAMPLE)
    source = layoutc.load_text(infer(ckpt))
    plan = layoutc.compile(source, "torch", memory=256, workers=2)  # many pieces per member
    plan.validate(plan.source_placement, plan.target_placement)
    report = layoutc.execute(plan, ckpt.folder, tmp_path / "t", tag=ckpt.tag)
    assert report.files == ["pytorch_model.bin"] and verify(tmp_path / "t") == []
    with zipfile.ZipFile(tmp_path / "t" / "pytorch_model.bin") as z:
        assert z.testzip() is None
    assert report.bytes_written == plan.summary()["bytes_written"]
    loaded = layoutc.Plan.from_json(plan.to_json())  # it carries both layouts
    layoutc.execute(loaded, ckpt.folder, tmp_path / "again", tag=ckpt.tag)
    assert _files(tmp_path / "again") == _files(tmp_path / "t")


def test_the_plan_counts_bytes_per_source_file_and_per_target_rank():
    ckpt = open_checkpoint(EXAMPLE)
    source = layoutc.load_text(infer(ckpt))
    target = layoutc.load_text(infer(ckpt), overrides={"dp": 3})
    plan = layoutc.compile(source, target)
    io = plan.summary()["io"]
    totals = plan.totals
    assert sum(r["bytes"] for r in io["read_by_file"]) == totals.read_bytes
    assert sum(r["bytes"] for r in io["written_by_rank"]) == totals.write_bytes
    assert {r["file"] for r in io["read_by_file"]} == {
        p.name for p in ckpt.model_files + ckpt.optim_files
    }
    ranks = {r["ranks"]: r["files"] for r in io["written_by_rank"]}
    assert ranks == {"{dp=0}": 1, "{dp=1}": 1, "{dp=2}": 1, "every rank": 1}


def _files(root):
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def test_a_universal_checkpoint_is_a_source_too(tmp_path):
    layoutc.convert(EXAMPLE, tmp_path / "u", "universal")
    text = infer(open_checkpoint(tmp_path / "u"))
    assert 'store universal { tag "global_step2" }' in text
    body = text.split("\n", 1)[1]  # after the comment naming the folder
    assert (
        body.replace("universal", "deepspeed") == infer(open_checkpoint(EXAMPLE)).split("\n", 1)[1]
    )
    for to, kw in (("safetensors", {}), ("deepspeed", {"overrides": {"dp": 3}})):
        layoutc.convert(EXAMPLE, tmp_path / f"direct-{to}", to, **kw)
        layoutc.convert(tmp_path / "u", tmp_path / f"via-{to}", to, **kw)
        assert _files(tmp_path / f"direct-{to}") == _files(tmp_path / f"via-{to}"), to
