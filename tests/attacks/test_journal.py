"""An earlier run's partial folder as hostile input: what a rerun takes up from it is
bounded, confined to the folder, and never trusted unread (tests/test_resume.py damages
the journal's lines; these damage the folder around it)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from bounded import ROOT, tree

import layoutc
from layoutc.runtime import executor, journal

EXAMPLE = ROOT / "examples" / "deepspeed-zero2"


def _interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    real = executor.execute

    def interrupted(plan: Any, source: Any, out: Any, **kw: Any) -> Any:
        real(plan, source, out, **{**kw, "units": kw["units"][:4]})
        monkeypatch.setattr(executor, "execute", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(executor, "execute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        layoutc.convert(EXAMPLE, tmp_path / "out", "universal")
    (partial,) = tmp_path.glob("out.partial-*")
    return partial


def test_a_journal_over_its_bound_is_not_read(tmp_path, monkeypatch):
    partial = _interrupted(tmp_path, monkeypatch)
    with open(partial / journal.JOURNAL, "r+b") as f:  # sparse: 256 MiB + 1 of nothing
        f.truncate(journal.MAX_JOURNAL + 1)
    assert journal.read(partial) is None
    report = layoutc.convert(EXAMPLE, tmp_path / "out", "universal")
    assert report.kept_bytes == 0 and layoutc.conversion.verify(tmp_path / "out") == []


def test_a_partial_folder_that_is_a_link_is_never_taken_up(tmp_path, monkeypatch):
    partial = _interrupted(tmp_path, monkeypatch)
    elsewhere = tmp_path / "elsewhere"
    partial.rename(elsewhere)
    partial.symlink_to(elsewhere)  # the name of a dead run's folder, a link elsewhere
    before = tree(elsewhere)
    notes: list[str] = []
    report = layoutc.convert(EXAMPLE, tmp_path / "out", "universal", tell=notes.append)
    assert report.kept_bytes == 0 and notes == []
    assert tree(elsewhere) == before and partial.is_symlink()


def test_a_folder_inside_the_partial_linked_elsewhere_is_refused(tmp_path, monkeypatch):
    partial = _interrupted(tmp_path, monkeypatch)
    tag = partial / "global_step2"
    elsewhere = tmp_path / "elsewhere"
    tag.rename(elsewhere)
    tag.symlink_to(elsewhere)  # the run would write its files through it
    before = tree(elsewhere)
    with pytest.raises(layoutc.conversion.OutputError, match="resolves outside the folder"):
        layoutc.convert(EXAMPLE, tmp_path / "out", "universal")
    assert tree(elsewhere) == before  # nothing written there, nothing removed
    assert not (tmp_path / "out").exists()


def test_ranges_past_a_file_are_not_read(tmp_path, monkeypatch):
    """Each range is checked against the size the first line records before it is read:
    a journal cannot make the rerun read beyond the output's files."""
    partial = _interrupted(tmp_path, monkeypatch)
    path = partial / journal.JOURNAL
    head = json.loads(path.read_bytes().splitlines()[0])
    rel, size = next(iter(head["files"].items()))
    reads: list[tuple[int, int]] = []
    real = journal.crc_of_file_range

    def counted(fd: int, lo: int, hi: int, *a: Any) -> int:
        reads.append((lo, hi))
        return real(fd, lo, hi, *a)

    monkeypatch.setattr(journal, "crc_of_file_range", counted)
    bad = [[rel, size, 1 << 40, 0], [rel, 0, size + 1, 0]]
    path.write_bytes(json.dumps(head).encode() + b"\n" + json.dumps({"ranges": bad}).encode())
    report = layoutc.convert(EXAMPLE, tmp_path / "out", "universal")
    assert report.kept_bytes == 0 and reads == []
    assert os.path.getsize(tmp_path / "out" / rel) == size
