"""Hostile and damaged distributed checkpoints (DCP): every one is refused by name.

Each case damages a private copy of a DCP folder — the shipped DeepSpeed example converted
by layoutc (``--to dcp``: a tie, two param groups, byte items) — the way a crafted or
corrupted file would, its ``.metadata`` rewritten with layoutc's own DCP pickle writer, and
runs the real command line on it in a bounded child process (see ``bounded.py``).
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import craft
import pytest
from bounded import EXAMPLE, assert_no_output, assert_refused, cli, tree

from layoutc.conversion import convert
from layoutc.formats import dcp_metadata as dm
from layoutc.formats import dcp_write
from layoutc.formats.dcp_write import Entry, Saved

TARGETS = ("safetensors",)  # what reads every item; test_items_that_overlap also tries dcp


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dcp") / "ckpt"
    convert(EXAMPLE, out, "dcp")
    (out / "layoutc-manifest.json").unlink()
    return out


@pytest.fixture
def ckpt(clean: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(clean, tmp_path / "ckpt"))


@dataclass
class Parts:
    """A ``.metadata`` taken apart, to edit and write again."""

    entries: dict[str, Entry]
    byte_items: list[str]
    paths: dict[str, tuple[str | int, ...]]
    saved: list[Saved]


def rewrite(folder: Path, edit: Callable[[Parts], None]) -> None:
    md, _ = dm.read(folder)
    parts = Parts(
        {
            k: Entry(e.dtype, e.shape, tuple((c.offsets, c.sizes) for c in e.chunks))
            for k, e in md.tensors.items()
        },
        list(md.byte_items),
        dict(md.flat),
        [Saved(k, o, i.file, i.offset, i.length) for (k, o), i in md.items.items()],
    )
    edit(parts)
    (folder / dm.METADATA).write_bytes(
        dcp_write.metadata(parts.entries, parts.byte_items, parts.paths, parts.saved)
    )


def refused(
    ckpt: Path,
    tmp_path: Path,
    *needles: str,
    data_only: bool = False,
    targets: tuple[str, ...] = TARGETS,
) -> None:
    """``inspect`` (unless the damage is in what only a conversion reads: ``data_only``) and
    a conversion to each of ``targets`` refuse ``ckpt``, write nothing, and leave it
    unchanged."""
    before = tree(ckpt)
    if not data_only:
        assert_refused(cli("inspect", ckpt), *needles)
    for to in targets:
        out = tmp_path / f"out-{to}"
        assert_refused(cli("convert", ckpt, "--to", to, "-o", out, "-q"), *needles)
        assert_no_output(out)
    assert tree(ckpt) == before


def _item(parts: Parts, key: str) -> int:
    return next(i for i, s in enumerate(parts.saved) if s.key == key)


def test_an_item_outside_the_folder_is_refused(ckpt: Path, tmp_path: Path) -> None:
    (tmp_path / "outside.distcp").write_bytes(b"\0" * 4096)

    def edit(p: Parts) -> None:
        i = _item(p, "model.fc1.weight")
        p.saved[i] = replace(p.saved[i], file="../outside.distcp", offset=0)

    rewrite(ckpt, edit)
    refused(ckpt, tmp_path, ".metadata", "model.fc1.weight", "`/`")


def test_items_that_overlap_are_refused(ckpt: Path, tmp_path: Path) -> None:
    def edit(p: Parts) -> None:
        starts = sorted({s.offset for s in p.saved if s.file == "__0_0.distcp"})
        second = next(s for s in p.saved if s.file == "__0_0.distcp" and s.offset == starts[1])
        i = p.saved.index(second)
        p.saved[i] = replace(second, offset=second.offset - 100, length=second.length + 100)

    rewrite(ckpt, edit)
    refused(ckpt, tmp_path, "__0_0.distcp", "overlap", targets=("safetensors", "dcp"))


def test_an_item_whose_container_reaches_past_its_bytes_is_refused(
    ckpt: Path, tmp_path: Path
) -> None:
    """The metadata gives the item fewer bytes than its zip: its directory lies outside."""

    def edit(p: Parts) -> None:
        i = _item(p, "model.fc1.weight")
        p.saved[i] = replace(p.saved[i], length=p.saved[i].length - 200)

    rewrite(ckpt, edit)
    refused(ckpt, tmp_path, "__0_0.distcp", data_only=True)


def test_a_chunk_larger_than_its_item_is_refused_naming_the_tensor(
    ckpt: Path, tmp_path: Path
) -> None:
    """The metadata says fc1.weight (and its states) is [6, 1000]; its items hold [., 10]."""

    def edit(p: Parts) -> None:
        for key, e in p.entries.items():
            if "fc1.weight" in key and len(e.shape) == 2:
                chunks = tuple((o, (s[0], 1000)) for o, s in e.chunks)
                p.entries[key] = Entry(e.dtype, (6, 1000), chunks)

    rewrite(ckpt, edit)
    refused(ckpt, tmp_path, "model.fc1.weight", "the metadata says fp32 [3, 1000]", data_only=True)


def test_a_billion_laughs_metadata_is_refused_in_bounded_time(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / dm.METADATA).write_bytes(craft.raw_pickle(craft.laughs(60)))
    refused(ckpt, tmp_path, ".metadata")


def test_a_metadata_of_a_million_chunks_is_refused_in_bounded_time(
    ckpt: Path, tmp_path: Path
) -> None:
    def edit(p: Parts) -> None:
        n = 1_000_000
        p.entries["model.big"] = Entry("fp32", (n,), tuple(((i,), (1,)) for i in range(n)))

    rewrite(ckpt, edit)
    run = cli("inspect", ckpt, timeout=60)
    assert_refused(run, ".metadata")


def test_code_planted_in_a_param_group_item_is_refused_and_never_run(
    ckpt: Path, tmp_path: Path
) -> None:
    """infer reads the param groups (as data, to declare them): a global in one is refused
    by name; torch's loader would run it (``torch.load(weights_only=False)``)."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return os.system, (f"touch {marker}",)

    md, _ = dm.read(ckpt)
    item = md.item("optim.param_groups.0.lr", None)
    data = (ckpt / item.file).read_bytes()
    planted = craft.container_bytes(pickle.dumps(Payload(), protocol=2))
    (ckpt / item.file).write_bytes(
        data[: item.offset] + planted + data[item.offset + item.length :]
    )

    def edit(p: Parts) -> None:
        shift = len(planted) - item.length
        for i, s in enumerate(p.saved):
            if s.file == item.file and s.offset > item.offset:
                p.saved[i] = replace(s, offset=s.offset + shift)
            elif s.key == "optim.param_groups.0.lr":
                p.saved[i] = replace(s, length=len(planted))

    rewrite(ckpt, edit)
    before = tree(ckpt)
    assert_refused(cli("infer", ckpt), "posix.system", item.file)
    out = tmp_path / "out"
    assert_refused(cli("convert", ckpt, "--to", "safetensors", "-o", out, "-q"), "posix.system")
    assert_no_output(out)
    assert not marker.exists() and tree(ckpt) == before
