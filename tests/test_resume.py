"""A conversion that stops short (kill -9, Ctrl-C, SIGTERM, a full disk) is gone on from by
the same command: what its journal records is read back and verified, the rest is written,
and the output is byte for byte what one uninterrupted run writes."""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import layoutc
from layoutc.conversion import verify
from layoutc.runtime import executor, journal
from layoutc.runtime.checksum import Pieces
from layoutc.runtime.commit import OutputError
from layoutc.runtime.leftovers import size_of

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "deepspeed-zero2"
TARGETS = [("universal", None), ("deepspeed", {"dp": 3}), ("safetensors", None), ("dcp", None)]

# One process that converts and is killed (SIGKILL, or SIGTERM: argv[1]) right after the
# journal has recorded argv[2] units on disk, the others still writing.
STOPPED = """
import os, signal, sys
from layoutc.cli import main
from layoutc.runtime import journal
how, after = getattr(signal, sys.argv[1]), int(sys.argv[2])
add, seen = journal.Journal.add, []
def add_then_stop(self, ranges):
    add(self, ranges)
    seen.append(ranges)
    if len(seen) == after:
        self.flush()
        os.kill(os.getpid(), how)
journal.Journal.add = add_then_stop
sys.exit(main(sys.argv[3:]))
"""


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _stopped_run(how: str, after: int, *args: object) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", STOPPED, how, str(after), "convert", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """The next conversion runs ``n`` of its units, then Ctrl-C."""
    real = executor.execute

    def interrupted(plan: Any, source: Any, out: Any, **kw: Any) -> Any:
        kw["units"] = (plan.units if kw.get("units") is None else kw["units"])[:n]
        real(plan, source, out, **kw)
        monkeypatch.setattr(executor, "execute", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(executor, "execute", interrupted)


def _interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int) -> Path:
    """Convert the example to universal into ``tmp_path / "out"``, Ctrl-C after ``n``
    units; the partial folder kept."""
    _interrupt_after(monkeypatch, n)
    with pytest.raises(KeyboardInterrupt):
        layoutc.convert(EXAMPLE, tmp_path / "out", "universal")
    return _partial(tmp_path)


def _partial(tmp_path: Path, name: str = "out") -> Path:
    (p,) = tmp_path.glob(f"{name}.partial-*")
    return p


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """What one uninterrupted run writes, per target."""
    root = tmp_path_factory.mktemp("fresh")
    out = {}
    for target, overrides in TARGETS:
        layoutc.convert(EXAMPLE, root / target, target, overrides=overrides)
        out[target] = _files(root / target)
    return out


@pytest.mark.parametrize(("target", "overrides"), TARGETS)
def test_a_killed_conversion_goes_on_from_its_journal(tmp_path, fresh, target, overrides):
    out = tmp_path / "out"
    settings_ = ["--set", f"dp={overrides['dp']}"] if overrides else []
    args = [EXAMPLE, "--to", target, "-o", out, "-q", "--workers", "2", *settings_]
    killed = _stopped_run("SIGKILL", 4, *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = _partial(tmp_path)
    assert not out.exists() and journal.read(partial) is not None
    notes: list[str] = []
    report = layoutc.convert(
        EXAMPLE, out, target, overrides=overrides, tell=notes.append, workers=2
    )
    assert len(notes) == 1 and notes[0].startswith("going on from ")
    assert "read back and verified against its journal" in notes[0]
    assert 0 < report.kept_bytes < report.bytes_written
    assert report.bytes_read < report.plan.totals.read_bytes  # the kept units were not read
    assert "of it kept from an earlier run" in report.summary()
    assert _files(out) == fresh[target]  # the same bytes as one run, manifest included
    assert verify(out) == [] and list(tmp_path.iterdir()) == [out]


def test_sigterm_stops_a_conversion_like_ctrl_c_and_keeps_what_was_written(tmp_path, fresh):
    out = tmp_path / "out"
    stopped = _stopped_run("SIGTERM", 3, EXAMPLE, "--to", "universal", "-o", out, "-q")
    partial = _partial(tmp_path)
    last = stopped.stderr.splitlines()[-1]
    assert stopped.returncode == 143 and "Traceback" not in stopped.stderr
    assert last.startswith("layoutc convert: terminated; nothing was committed; ")
    assert f"written are kept in {partial}: run the same command again" in last
    again = subprocess.run(
        [sys.executable, "-m", "layoutc", "convert", EXAMPLE, "--to", "universal", "-o", out],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"note: going on from {out}.partial-" in again.stderr
    assert _files(out) == fresh["universal"]


def test_bytes_changed_in_the_partial_folder_are_written_again(tmp_path, monkeypatch, fresh):
    out = tmp_path / "out"
    _interrupt_after(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt, match="run the same command again"):
        layoutc.convert(EXAMPLE, out, "universal")
    found = journal.read(_partial(tmp_path))
    assert found is not None and found.ranges
    rel, at, n, _ = max(found.ranges, key=lambda r: r[2])
    with open(found.partial / rel, "r+b") as f:  # one byte of a journaled range flipped
        f.seek(at + n // 2)
        byte = f.read(1)
        f.seek(at + n // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    notes: list[str] = []
    report = layoutc.convert(EXAMPLE, out, "universal", tell=notes.append)
    assert "did not verify and are written again" in notes[0]
    assert report.kept_bytes > 0
    assert _files(out) == fresh["universal"]


def test_files_the_command_does_not_write_are_never_committed(tmp_path, monkeypatch, fresh):
    out = tmp_path / "out"
    partial = _interrupted(tmp_path, monkeypatch, 5)
    (partial / "global_step2" / "stray.pt").write_bytes(b"not ours")
    (partial / "elsewhere").symlink_to(ROOT / "README.md")
    notes: list[str] = []
    report = layoutc.convert(EXAMPLE, out, "universal", tell=notes.append)
    assert notes[0].startswith(f"{tmp_path}/out.partial-")  # taken over: renamed
    assert notes[0].endswith(": removed 2 file(s) this command does not write")
    assert report.kept_bytes > 0 and _files(out) == fresh["universal"]
    assert (ROOT / "README.md").is_file()


def test_a_saved_plan_run_again_goes_on_too(tmp_path, monkeypatch, capsys, fresh):
    from layoutc.cli import main

    plan = tmp_path / "plan.json"
    assert main(["plan", str(EXAMPLE), "--to", "universal", "-o", str(plan)]) == 0
    out = tmp_path / "out"
    _interrupt_after(monkeypatch, 4)
    assert main(["execute", str(plan), str(EXAMPLE), "-o", str(out), "-q"]) == 130
    assert "written are kept in" in capsys.readouterr().err
    assert main(["execute", str(plan), str(EXAMPLE), "-o", str(out), "-q"]) == 0
    assert f"note: going on from {out}.partial-" in capsys.readouterr().err
    assert _files(out) == fresh["universal"]


def test_another_memory_budget_and_worker_count_go_on_all_the_same(tmp_path, monkeypatch, fresh):
    out = tmp_path / "out"
    _interrupt_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        layoutc.convert(EXAMPLE, out, "deepspeed", overrides={"dp": 3}, workers=1)
    report = layoutc.convert(
        EXAMPLE, out, "deepspeed", overrides={"dp": 3}, workers=3, memory_budget=1 << 20
    )
    assert report.kept_bytes > 0 and _files(out) == fresh["deepspeed"]


def test_another_command_or_a_changed_source_is_not_gone_on_from(tmp_path, monkeypatch, fresh):
    source = tmp_path / "src"
    shutil.copytree(EXAMPLE, source)
    out = tmp_path / "out"
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        layoutc.convert(source, out, "safetensors")  # another command
    other = _partial(tmp_path)
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        layoutc.convert(source, out, "universal")
    changed = next(p for p in tmp_path.glob("out.partial-*") if p != other)
    optim = next((source / "global_step2").glob("*optim_states.pt"))
    os.utime(optim, ns=(optim.stat().st_atime_ns, optim.stat().st_mtime_ns + 10**9))
    notes: list[str] = []
    report = layoutc.convert(source, out, "universal", tell=notes.append)
    assert report.kept_bytes == 0 and _files(out) == fresh["universal"]
    assert sorted(notes) == sorted(
        [
            f"{other}: {size_of(other) / 2**20:,.1f} MiB left by a conversion that did "
            f"not finish (process {other.name.split('-')[1]} is gone); it is of another "
            f"command, so it is not reused (--restart removes it): remove it with "
            f"`rm -r {other}`",
            f"{changed}: {size_of(changed) / 2**20:,.1f} MiB left by a conversion that "
            f"did not finish (process {changed.name.split('-')[1]} is gone); its source has "
            f"changed since, so it is not reused (--restart removes it): remove it with "
            f"`rm -r {changed}`",
        ]
    )
    assert other.is_dir() and changed.is_dir()  # removed only when asked


def test_restart_removes_what_earlier_runs_left_and_starts_over(tmp_path, monkeypatch, fresh):
    out = tmp_path / "out"
    partial = _interrupted(tmp_path, monkeypatch, 4)
    size = size_of(partial)
    notes: list[str] = []
    report = layoutc.convert(EXAMPLE, out, "universal", restart=True, tell=notes.append)
    assert notes == [f"--restart: removing {partial} ({size / 2**20:,.1f} MiB)"]
    assert report.kept_bytes == 0 and list(tmp_path.iterdir()) == [out]
    assert _files(out) == fresh["universal"]


def test_swap_folders_left_by_a_dead_conversion_are_named_and_removed_on_restart(tmp_path):
    out = tmp_path / "out"
    dead = [tmp_path / "out.swap-999999999", tmp_path / "out.swap-999999998-1"]
    live = tmp_path / f"out.swap-{os.getppid()}"  # a conversion still running
    for p in (*dead, live):
        p.mkdir()
        (p / "embed.weight").write_bytes(b"\0" * (1 << 20))
    notes: list[str] = []
    layoutc.convert(EXAMPLE, out, "universal", tell=notes.append)
    assert notes == [
        f"{p}: 1.0 MiB left by a conversion that did not finish (process "
        f"{p.name.split('-')[1]} is gone); it holds the swap files of spilled tensors, which "
        f"nothing reads again, so it is not reused (--restart removes it): remove it with "
        f"`rm -r {p}`"
        for p in sorted(dead)
    ]
    notes.clear()
    layoutc.convert(EXAMPLE, tmp_path / "again", "universal", tell=notes.append)
    assert notes == []  # only those of the same output are named
    shutil.rmtree(out)
    layoutc.convert(EXAMPLE, out, "universal", restart=True, tell=notes.append)
    assert notes == [f"--restart: removing {p} (1.0 MiB)" for p in sorted(dead)]
    assert not any(p.exists() for p in dead) and live.is_dir()


def test_a_dry_run_says_the_run_would_go_on(tmp_path, monkeypatch):
    out = tmp_path / "out"
    partial = _interrupted(tmp_path, monkeypatch, 4)
    found = journal.read(partial)
    assert found is not None
    notes: list[str] = []
    layoutc.convert(EXAMPLE, out, "universal", dry_run=True, tell=notes.append)
    assert len(notes) == 1 and notes[0].startswith(f"{partial}: left by an earlier run of this")
    assert "the run goes on from it after reading that back (--restart: start over)" in notes[0]
    notes.clear()
    layoutc.convert(EXAMPLE, out, "universal", dry_run=True, restart=True, tell=notes.append)
    assert notes == [f"--restart: would remove {partial} ({size_of(partial) / 2**20:,.1f} MiB)"]
    assert journal.read(partial) == found  # a dry run changes nothing


def test_a_full_disk_keeps_what_was_written_for_the_same_command(tmp_path, monkeypatch, fresh):
    from layoutc.runtime import fileio

    out = tmp_path / "out"
    real = fileio.pwrite_all
    calls = {"n": 0}

    def full(fd: int, data: Any, at: int, *a: Any) -> None:
        calls["n"] += 1
        if calls["n"] > 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, at, *a)

    monkeypatch.setattr(fileio, "pwrite_all", full)
    with pytest.raises(OutputError, match=r"\[ENOSPC\]; nothing was committed; .* kept in "):
        layoutc.convert(EXAMPLE, out, "universal", workers=1)
    monkeypatch.setattr(fileio, "pwrite_all", real)
    report = layoutc.convert(EXAMPLE, out, "universal")
    assert report.kept_bytes > 0 and _files(out) == fresh["universal"]


def test_any_other_failure_removes_the_partial_folder(tmp_path, monkeypatch):
    real = executor.execute

    def failing(plan: Any, source: Any, out: Any, **kw: Any) -> Any:
        kw["units"] = plan.units[:3]
        real(plan, source, out, **kw)
        raise OSError(errno.EIO, "Input/output error", str(EXAMPLE / "global_step2" / "x"))

    monkeypatch.setattr(executor, "execute", failing)
    with pytest.raises(OSError, match="Input/output error"):
        layoutc.convert(EXAMPLE, tmp_path / "out", "universal")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ the journal read as input


@pytest.mark.parametrize(
    "damage",
    [
        "garbage",  # not JSON at all
        "head",  # a first line of another shape
        "outside",  # ranges naming ../ paths, absolute paths, files not of the output
        "beyond",  # ranges past the end of their file
        "symlink",  # the journal a link elsewhere
        "cut",  # its last line cut short by a kill
    ],
)
def test_a_damaged_journal_is_never_trusted(tmp_path, monkeypatch, fresh, damage):
    partial = _interrupted(tmp_path, monkeypatch, 4)
    path = partial / journal.JOURNAL
    lines = path.read_bytes().splitlines(keepends=True)
    head = json.loads(lines[0])
    if damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "head":
        path.write_bytes(json.dumps({**head, "journal": 99}).encode() + b"\n" + b"".join(lines[1:]))
    elif damage == "outside":
        bad = [["../../etc/passwd", 0, 10, 0], ["/etc/passwd", 0, 10, 0], ["nope.pt", 0, 1, 0]]
        path.write_bytes(lines[0] + json.dumps({"ranges": bad}).encode() + b"\n")
    elif damage == "beyond":
        rel = next(iter(head["files"]))
        bad = [[rel, head["files"][rel] - 4, 64, 0], [rel, -1, 4, 0], [rel, 0, 2**70, 0]]
        path.write_bytes(lines[0] + json.dumps({"ranges": bad}).encode() + b"\n")
    elif damage == "symlink":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.write_bytes(b"".join(lines))
        path.unlink()
        path.symlink_to(elsewhere)
    else:
        path.write_bytes(b"".join(lines) + lines[-1][: len(lines[-1]) // 2])
    notes: list[str] = []
    report = layoutc.convert(EXAMPLE, tmp_path / "out", "universal", tell=notes.append)
    assert _files(tmp_path / "out") == fresh["universal"]
    if damage == "cut":  # the whole lines before it still count
        assert report.kept_bytes > 0
    else:
        assert report.kept_bytes == 0
        assert (tmp_path / "passwd").exists() is False and os.path.exists("/etc/passwd")


# ------------------------------------------------------------------ properties


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_crcs_combined_from_pieces_equal_the_crc_of_the_bytes(tmp_path_factory, data):
    """Any tiling of a file by written pieces (some ranges not written: read back; some
    written twice) gives each range the CRC-32 of its bytes."""
    size = data.draw(st.integers(1, 4096))
    blob = data.draw(st.binary(min_size=size, max_size=size))
    cuts = sorted(set([*data.draw(st.lists(st.integers(0, size), max_size=12)), 0, size]))
    pieces = Pieces()
    for lo, hi in itertools.pairwise(cuts):
        if data.draw(st.booleans()):
            for _ in range(data.draw(st.integers(1, 2))):
                pieces.add(lo, blob[lo:hi])
    ranges = []
    for _ in range(data.draw(st.integers(1, 6))):
        lo = data.draw(st.integers(0, size))
        ranges.append((lo, data.draw(st.integers(lo, size))))
    path = tmp_path_factory.mktemp("crc") / "f"
    path.write_bytes(blob)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = pieces.crcs(fd, ranges)
    finally:
        os.close(fd)
    assert got == [zlib.crc32(blob[lo:hi]) for lo, hi in ranges]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 64), st.integers(1, 16)), max_size=8),
    st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 64), st.integers(1, 16)), max_size=4),
)
def test_done_covers_a_unit_exactly_when_every_byte_of_it_verified(done, unit):
    bytes_done = {(p, i) for p, at, n in done for i in range(at, at + n)}
    want = bool(unit) and all((p, i) in bytes_done for p, at, n in unit for i in range(at, at + n))
    assert journal.Done(done).covers(unit) == want
