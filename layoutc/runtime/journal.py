"""The journal of a conversion: which byte ranges of its output are written and on disk, so
that the same command, run again after a kill or an interruption, goes on from them.

A conversion builds its output in ``OUT.partial-<pid>-<random>`` (:mod:`layoutc.runtime.commit`)
and keeps, beside the files, ``.layoutc-journal`` (under torchrun each other rank R its own
``.layoutc-journal-R``): JSON lines,

* the first (rank 0's file only) names what is being built: ``{"journal": 1, "key": ...,
  "source": ..., "files": {path: bytes}}`` — the command (:func:`command_key`: the plan's
  digest, the tag, the param groups), the source (:func:`fingerprint`: each file's size,
  metadata digest and modification time) and each output file's size once created;
* then batches ``{"ranges": [[file, offset, bytes, crc32], ...]}``: the ranges the units
  that finished wrote, each batch appended only once those bytes are fsynced
  (:class:`Journal`, every :data:`INTERVAL` seconds and when the run stops).

A run of the same command (:func:`resumable`) looks at the partial folders of ``OUT`` whose
process is gone. One whose first line matches this command and this source is taken over
(renamed for this process), its files are created again over what they hold
(:func:`~layoutc.runtime.fileio.reopening`: same headers, the tensors' bytes kept), and each
range the journal lists is read back and its CRC-32 compared (:func:`verify`); a unit whose
every range verified is not run again (:class:`Done`), every other unit is. Ranges, not unit
numbers, are recorded, so a rerun with another ``--memory``, ``--workers`` or number of ranks
goes on all the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import zlib
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layoutc.formats.checkpoint import Checkpoint
from layoutc.plan import ops as O
from layoutc.plan.plan import Plan, Unit
from layoutc.runtime.checksum import Pieces, crc_of_file_range
from layoutc.runtime.commit import plan_digest
from layoutc.runtime.fileio import Files, Region, fsync_path, path_components
from layoutc.runtime.leftovers import partials

JOURNAL = ".layoutc-journal"
VERSION = 1
INTERVAL = 5.0  # seconds between journal batches: at most this much work is redone
MAX_JOURNAL = 256 << 20  # a journal larger than this is not read
Range = tuple[str, int, int]  # (file path, offset, bytes)


def command_key(plan: Plan, tag: str, param_groups: Any) -> str:
    """What decides every byte of the output besides the source: the plan's digest (both
    layouts, every route; not the schedule), the tag written and the param groups."""
    what = {"plan": plan_digest(plan), "tag": tag, "param_groups": param_groups}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=repr).encode()).hexdigest()


def fingerprint(plan: Plan, source: Checkpoint) -> dict[str, Any]:
    """The source as a journal records it: its folder, and for each of its files the size
    and metadata digest (:meth:`~layoutc.formats.checkpoint.Checkpoint.identity`: for a
    torch file the zip index with each member's CRC-32) and the modification time."""
    files = plan.source_files or source.identity()
    return {
        "folder": str(source.folder.absolute()),
        "files": {f: {**v, "mtime_ns": _mtime(source.path(f))} for f, v in sorted(files.items())},
    }


def _mtime(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


# ------------------------------------------------------------------ what a unit writes


def unit_ranges(plan: Plan, unit: Unit, views: Any) -> list[Range] | None:
    """The byte ranges of the output files ``unit`` writes, adjacent ones joined; None
    when one of its writes goes elsewhere than a file region (it is then always run)."""
    out: list[Range] = []
    for op in plan.unit_ops(unit):
        if not isinstance(op, O.Write) or not op.numel:
            continue
        view = views.get((op.file, op.key))
        if not isinstance(view, Region):
            return None
        size = view.dtype.itemsize
        out.append((view.path, view.offset + op.offset * size, op.numel * size))
    return _joined(out)


def _joined(ranges: Iterable[Range]) -> list[Range]:
    """``ranges`` sorted, those that touch or overlap made one."""
    out: list[Range] = []
    for path, at, n in sorted(ranges):
        if out and out[-1][0] == path and out[-1][1] + out[-1][2] >= at:
            end = max(out[-1][1] + out[-1][2], at + n)
            out[-1] = (path, out[-1][1], end - out[-1][1])
        else:
            out.append((path, at, n))
    return out


class Done:
    """The verified ranges of each file; which units they cover whole."""

    def __init__(self, ranges: Iterable[Range]) -> None:
        self.starts: dict[str, list[int]] = {}
        self.ends: dict[str, list[int]] = {}
        for path, at, n in _joined(ranges):
            self.starts.setdefault(path, []).append(at)
            self.ends.setdefault(path, []).append(at + n)

    def covers(self, ranges: list[Range] | None) -> bool:
        if not ranges:
            return False
        for path, at, n in ranges:
            starts = self.starts.get(path, [])
            i = bisect_right(starts, at) - 1
            if i < 0 or self.ends[path][i] < at + n:
                return False
        return True


# ------------------------------------------------------------------ writing it


class Journal:
    """Appends the ranges of finished units to ``path``: :meth:`add` from any thread as a
    unit finishes; a thread fsyncs the output files written and then appends what they
    hold, every :data:`INTERVAL` seconds; :meth:`close` does it a last time (when the run
    stops short: what finished is kept). With ``head`` (rank 0) the file is made anew,
    atomically: the head, then the ``carried`` ranges (verified, from an earlier run)."""

    def __init__(
        self,
        path: Path,
        io: Files,
        partial: Path,
        head: dict[str, Any] | None = None,
        carried: Sequence[tuple[str, int, int, int]] = (),
        interval: float | None = None,
    ) -> None:
        self.path, self.io, self.partial = path, io, partial
        self.lock = threading.Lock()
        self.flushing = threading.Lock()
        self.pending: list[Range] = []
        self.recorded = sum(n for _, _, n, _ in carried)  # bytes the journal holds
        self.stop = threading.Event()
        if head is not None:
            tmp = path.with_name(path.name + ".new")
            records = [head] + ([{"ranges": [list(r) for r in carried]}] if carried else [])
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            try:
                _append(fd, records)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            fsync_path(path.parent)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
        self.thread = threading.Thread(
            target=self._every,
            args=(INTERVAL if interval is None else interval,),
            name="layoutc-journal",
            daemon=True,
        )
        self.thread.start()

    def add(self, ranges: list[Range] | None) -> None:
        if ranges:
            with self.lock:
                self.pending.extend(ranges)

    def _every(self, interval: float) -> None:
        while not self.stop.wait(interval):
            with contextlib.suppress(OSError):  # a full disk: the run itself says so
                self.flush()

    def flush(self) -> None:
        """fsync the files the finished units wrote, then record their ranges."""
        with self.flushing:
            with self.lock:
                todo, self.pending = self.pending, []
            if not todo:
                return
            try:
                by_path: dict[str, list[tuple[int, int]]] = {}
                for p, at, n in todo:
                    by_path.setdefault(p, []).append((at, at + n))
                for p in by_path:
                    os.fsync(self.io.fd(p))
                lines: list[tuple[str, int, int, int]] = []
                for p, spans in by_path.items():
                    fd = self.io.fd(p)
                    pieces = self.io.pieces.get(p) or Pieces()
                    rel = str(Path(p).relative_to(self.partial))
                    for (lo, hi), crc in zip(spans, pieces.crcs(fd, spans), strict=True):
                        lines.append((rel, lo, hi - lo, crc))
                _append(self.fd, [{"ranges": lines}])
                self.recorded += sum(r[2] for r in lines)
            except BaseException:
                with self.lock:  # not recorded: tried again by the next flush
                    self.pending[:0] = todo
                raise

    def close(self, flush: bool) -> None:
        """Stop; ``flush``: record what finished since the last batch first."""
        self.stop.set()
        self.thread.join()
        try:
            if flush:
                self.flush()
        finally:
            os.close(self.fd)


def _append(fd: int, records: list[dict[str, Any]]) -> None:
    data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def discard_journals(partial: Path, others_only: bool = False) -> None:
    """Remove the journals of ``partial`` (before it is committed: not part of the
    output); ``others_only``: those of ranks other than 0."""
    for p in partial.glob(f"{JOURNAL}-*" if others_only else f"{JOURNAL}*"):
        p.unlink(missing_ok=True)


# ------------------------------------------------------------------ reading it


@dataclass
class Found:
    """A partial folder whose journal was read: its first line, the ranges recorded."""

    partial: Path
    head: dict[str, Any]
    ranges: list[tuple[str, int, int, int]] = field(default_factory=list)  # rel, at, n, crc

    @property
    def bytes(self) -> int:
        return sum(n for _, _, n, _ in self.ranges)


def read(partial: Path) -> Found | None:
    """The journal of ``partial`` (rank 0's and every other rank's), or None if it has
    none that reads as one. A last line cut short by a kill is left out."""
    head = None
    ranges: list[tuple[str, int, int, int]] = []
    names = sorted(p.name for p in partial.glob(f"{JOURNAL}*") if p.is_file())
    if JOURNAL not in names:
        return None
    for name in names:
        if name != JOURNAL and not name[len(JOURNAL) + 1 :].isdigit():
            continue
        path = partial / name
        if path.is_symlink() or path.stat().st_size > MAX_JOURNAL:
            return None
        for i, line in enumerate(path.read_bytes().splitlines()):
            try:
                record = json.loads(line)
            except ValueError:
                continue  # cut short
            if name == JOURNAL and i == 0:
                head = record if _is_head(record) else None
                if head is None:
                    return None
            elif isinstance(record, dict) and isinstance(record.get("ranges"), list):
                ranges += [(r[0], r[1], r[2], r[3]) for r in record["ranges"] if _is_range(r)]
    return Found(partial, head, ranges) if head is not None else None


def _is_head(r: Any) -> bool:
    return (
        isinstance(r, dict)
        and r.get("journal") == VERSION
        and isinstance(r.get("key"), str)
        and isinstance(r.get("files"), dict)
        and all(isinstance(v, int) for v in r["files"].values())
    )


def _is_range(r: Any) -> bool:
    return (
        isinstance(r, list)
        and len(r) == 4
        and isinstance(r[0], str)
        and not isinstance(path_components(r[0]), str)
        and all(type(x) is int and x >= 0 for x in r[1:])
    )


def resumable(
    out: Path, key: str, source: dict[str, Any]
) -> tuple[Found | None, list[tuple[Path, str]]]:
    """Among the partial folders of ``out`` left by processes that are gone, the one whose
    journal is of this command (``key``) on this source, the most written if several; and
    the others, each with why it is not that one."""
    best = None
    others = []
    for p in partials(out, dead=True):
        found = read(p)
        if found is None:
            others.append((p, "it has no journal to go on from"))
        elif found.head["key"] != key:
            others.append((p, "it is of another command"))
        elif found.head.get("source") != source:
            others.append((p, "its source has changed since"))
        elif best is None or found.bytes > best.bytes:
            if best is not None:
                others.append((best.partial, "another holds more of this command"))
            best = found
        else:
            others.append((p, "another holds more of this command"))
    return best, others


def take_over(found: Found, fresh: Path) -> Found | None:
    """Rename ``found``'s folder to ``fresh`` (a name of this process); None if another
    process took it first."""
    try:
        os.rename(found.partial, fresh)
    except FileNotFoundError:
        return None
    return Found(fresh, found.head, found.ranges)


def remove(folders: Iterable[Path]) -> None:
    for p in folders:
        shutil.rmtree(p, ignore_errors=True)


def sizes(files: Iterable[Path], partial: Path) -> dict[str, int]:
    """Each output file's size, by its path in the partial folder."""
    return {str(f.relative_to(partial)): os.path.getsize(f) for f in files}


def verify(found: Found, io: Files, threads: int) -> tuple[list[tuple[str, int, int, int]], int]:
    """Read back every range ``found`` records in the output files its first line lists
    and compare its CRC-32: the ranges that hold what the journal says (paths made
    absolute), and how many bytes did not."""
    files = found.head["files"]

    def check(r: tuple[str, int, int, int]) -> tuple[str, int, int, int] | None:
        rel, at, n, crc = r
        if rel not in files or at + n > files[rel]:
            return None
        path = str(found.partial / rel)
        got = crc_of_file_range(io.fd(path), at, at + n) if n else zlib.crc32(b"")
        return (path, at, n, crc) if got == crc else None

    unique = sorted(set(found.ranges))
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="layoutc-verify")
    try:
        checked = list(pool.map(check, unique))
    finally:  # Ctrl-C: the reads not started are not waited for
        pool.shutdown(cancel_futures=True)
    good = [r for r in checked if r is not None]
    bad = sum(r[2] for r, ok in zip(unique, checked, strict=True) if ok is None)
    return good, bad
