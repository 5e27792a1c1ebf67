"""A run opens each source file once: one unpickle (one header parse) per file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

import layoutc
from layoutc.formats import pt
from layoutc.formats import safetensors_header as st
from layoutc.formats.deepspeed import infer, open_checkpoint
from layoutc.formats.sources import open_source

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "deepspeed-zero2"


@pytest.fixture
def counted(monkeypatch):
    """How many times each file was unpickled or its safetensors header parsed."""
    seen: Counter[str] = Counter()
    load, header = pt.load, st.read_header

    def counting_load(path, opener=None):
        seen[str(path)] += 1
        return load(path, opener)

    def counting_header(path):
        seen[str(path)] += 1
        return header(path)

    monkeypatch.setattr(pt, "load", counting_load)
    monkeypatch.setattr(st, "read_header", counting_header)
    return seen


@pytest.mark.parametrize("to", ["universal", "deepspeed", "safetensors", "torch"])
def test_a_convert_unpickles_each_source_file_once(tmp_path, counted, to):
    kw = {"overrides": {"dp": 3}} if to == "deepspeed" else {}
    layoutc.convert(EXAMPLE, tmp_path / "out", to, **kw)
    source = {k: n for k, n in counted.items() if Path(k).is_relative_to(EXAMPLE)}
    tag = open_source(EXAMPLE).folder
    assert set(source) == {str(p) for p in tag.glob("*.pt")}  # every file, and only once:
    assert set(source.values()) == {1}, source


def test_a_weights_source_is_read_once(tmp_path, counted):
    ours = tmp_path / "weights"
    layoutc.convert(EXAMPLE, ours, "safetensors")
    spec = tmp_path / "model.layout"
    spec.write_text(infer(open_checkpoint(EXAMPLE)))
    counted.clear()
    layoutc.convert(ours, tmp_path / "back", "torch", spec=spec)
    source = {k: n for k, n in counted.items() if Path(k).is_relative_to(ours)}
    assert source and set(source.values()) == {1}, source


def test_a_convert_indexes_each_source_archive_once(tmp_path, monkeypatch):
    """The handle's map and member index of a file serve its unpickling, the reads of its
    tensors, the proof of their CRCs and the plan's record of the source."""
    indexed: Counter[str] = Counter()
    members = pt.members

    def counting(path, data):
        indexed[str(path)] += 1
        return members(path, data)

    monkeypatch.setattr(pt, "members", counting)
    layoutc.convert(EXAMPLE, tmp_path / "out", "deepspeed", overrides={"dp": 3})
    source = {k: n for k, n in indexed.items() if Path(k).is_relative_to(EXAMPLE)}
    assert len(source) == 3 and set(source.values()) == {1}, source


def test_a_convert_parses_the_layout_once(tmp_path, monkeypatch):
    """Inferred, checked against the files, checked again with --set for the target, and
    recorded in the plan: one parse of the text."""
    from layoutc.lang import check

    parsed: list[str] = []
    parse = check.parse

    def counting(text, path="<string>"):
        parsed.append(path)
        return parse(text, path)

    check._parsed.cache_clear()
    monkeypatch.setattr(check, "parse", counting)
    report = layoutc.convert(EXAMPLE, tmp_path / "out", "deepspeed", overrides={"dp": 3})
    report.plan.to_json()  # what rebuilds both layouts, checked as it is recorded
    assert len(parsed) == 1, parsed
