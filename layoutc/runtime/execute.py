"""Run a plan on files: create the output, move the bytes, prove what was read, commit.

:func:`run` runs a plan's units (:func:`layoutc.runtime.executor.execute`) reading the
source through its checkpoint handle (:class:`SourceFiles`: regions of its files, read in
place) and writing at known offsets of the output's files, created under a temporary
folder beside the output (:func:`layoutc.formats.writers.prepare`). After the units run,
the CRC-32 of every source member read is proven against its archive (:func:`check_crcs`)
and the output is committed in one step (:mod:`layoutc.runtime.commit`). Under torchrun
each rank runs the units the plan dealt it; rank 0 creates the files, combines every
rank's CRCs and commits once every rank has succeeded (:func:`_run_across`). The runtime
decides nothing: what runs where comes from the plan.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from layoutc.dtypes import dtype_name, np_dtype
from layoutc.errors import InputError, UsageError
from layoutc.formats import pt
from layoutc.formats.checkpoint import Checkpoint
from layoutc.formats.sources import in_folder
from layoutc.formats.writers import prepare
from layoutc.plan.plan import Plan
from layoutc.runtime import distributed, executor
from layoutc.runtime.checksum import Pieces
from layoutc.runtime.commit import (
    MANIFEST,
    OutputError,
    as_output_error,
    check_output,
    commit,
    discard,
    is_output_failure,
    make_partial,
    partial_name,
)
from layoutc.runtime.fileio import Files, Region
from layoutc.runtime.journal import (
    JOURNAL,
    VERSION,
    Done,
    Found,
    Journal,
    command_key,
    discard_journals,
    fingerprint,
    remove,
    resumable,
    sizes,
    take_over,
    unit_ranges,
    verify,
)
from layoutc.runtime.leftovers import IN_USE, described, size_of, swaps
from layoutc.runtime.reopen import reopening
from layoutc.runtime.spill import Spill
from layoutc.units import human_size

Reads = dict[str, tuple[list[str], list[tuple[int, int, int]]]]  # see SourceFiles.reads


def check_crcs(reads: Reads, source: Checkpoint) -> None:
    """Refuse the source if a member read has bytes other than its archive's CRC-32 says:
    the CRC of each member is combined from the CRCs taken as its bytes were read (by any
    rank), and only the bytes no read touched (padding, parts no target needs) are read
    now."""
    for path, (names, runs) in reads.items():
        pieces = Pieces()
        for offset, length, crc in runs:
            pieces.record(offset, length, crc)
        fd = os.open(path, os.O_RDONLY)
        try:
            for name in names:
                m = source.member(path, name)
                pt.check_crc(path, m, pieces.crc(fd, m.data_at, m.data_at + m.size))
        finally:
            os.close(fd)


def _merge_reads(all_reads: list[Reads]) -> Reads:
    out: Reads = {}
    for reads in all_reads:
        for path, (names, runs) in reads.items():
            have = out.setdefault(path, ([], []))
            have[0].extend(n for n in names if n not in have[0])
            have[1].extend(runs)
    return out


class SourceFiles(Mapping[tuple[str, str], Any]):
    """``(file, key) -> flat tensor`` of a checkpoint, read in place: a contiguous tensor is a
    :class:`~layoutc.runtime.fileio.Region` of its file (pread, nothing mapped); a strided
    view (rare in checkpoints) is made contiguous once, its member's CRC-32 checked first.
    Regions record the CRC-32 of what they read, so :func:`check_crcs` proves each member
    read against its archive's CRC without reading it again."""

    def __init__(self, source: Checkpoint | Path) -> None:
        self.source = source if isinstance(source, Checkpoint) else Checkpoint(Path(source))
        self.folder = self.source.folder
        self.opener = self.source.opener
        self.files = Files(record_reads=True)
        self._views: dict[tuple[str, str], Any] = {}
        self._read: dict[str, set[str]] = {}  # file path -> members read through regions

    def __getitem__(self, fk: tuple[str, str]) -> Any:
        if fk not in self._views and fk[0].endswith(".safetensors"):
            file, key = fk
            e = self.source.header(file)[0][key]
            self._views[fk] = self.files.region(
                str(self.folder / file), e.begin, e.numel, np_dtype(e.dtype)
            )
        if fk not in self._views:
            file, key = fk
            ref = self.source.ref(file, key)
            if ref.contiguous:
                data_at, _ = self.opener.member(str(self.folder / file), ref.storage.member)
                self._read.setdefault(str(self.folder / file), set()).add(ref.storage.member)
                itemsize = np_dtype(ref.dtype).itemsize
                self._views[fk] = self.files.region(
                    str(self.folder / file),
                    data_at + ref.offset * itemsize,
                    ref.numel,
                    np_dtype(ref.dtype),
                )
            else:
                self._views[fk] = np.ascontiguousarray(ref.numpy(self.opener)).reshape(-1)
        return self._views[fk]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)

    def reads(self) -> Reads:
        """The members read through regions, per file, and the CRCs of the runs read."""
        return {
            path: (sorted(names), self.files.reads[path].snapshot())
            for path, names in self._read.items()
            if path in self.files.reads
        }

    def close(self) -> None:
        self._views.clear()
        self.files.close()


@dataclass
class Report:
    output: Path
    files: list[str]
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    plan: Plan = field(repr=False)
    warnings: tuple[str, ...] = ()
    bytes_swapped: int = 0  # through swap files, out and in
    markers: tuple[str, ...] = ()  # files a loader looks for (``latest``, an index), by name
    kept_bytes: int = 0  # written by an earlier run of the same command, verified and kept

    def summary(self) -> str:
        """One line: the files of tensors (the count ``layoutc plan`` shows), the small
        files beside them, then bytes, time and memory."""
        rate = self.bytes_written / self.seconds if self.seconds else 0.0
        swapped = f"; swapped {human_size(self.bytes_swapped)}" if self.bytes_swapped else ""
        n = len(self.files)
        besides = ", ".join([*self.markers, MANIFEST])
        if self.kept_bytes:
            swapped += f"; {human_size(self.kept_bytes)} of it kept from an earlier run"
        return (
            f"wrote {human_size(self.bytes_written)} in {n} file{'s' if n != 1 else ''} "
            f"(and {besides}) to {self.output} in {self.seconds:.2f} s "
            f"({human_size(rate)}/s); read {human_size(self.bytes_read)}{swapped}; "
            f"peak RSS {human_size(self.peak_rss_bytes)}"
        )


def run(
    plan: Plan,
    source: Checkpoint | str | Path,
    output: str | Path,
    tag: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    started: float | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    sha256: bool = False,
    restart: bool = False,
    tell: Callable[[str], None] | None = None,
) -> Report:
    """Run ``plan`` from ``source`` into ``output``. What an earlier run of the same
    command left (killed, interrupted, out of disk) is taken up where it stopped, its
    bytes read back and verified first (:mod:`layoutc.runtime.journal`); ``restart``:
    removed instead. ``tell`` gets a line for each such folder and what is done with it."""
    start = started if started is not None else time.perf_counter()
    if plan.target_placement is None or plan.source_placement is None:
        raise UsageError(
            "this plan carries no layouts to run (compile it with layoutc.compile, or save "
            "it with layoutc plan CKPT -o, and run a saved one with layoutc.execute_saved)"
        )
    if not isinstance(source, Checkpoint):
        handle = in_folder(source)
        try:
            return run(
                plan, handle, output, tag, progress, start, param_groups, sha256, restart, tell
            )
        finally:
            handle.close()
    out = Path(output)
    tag = output_tag(plan, source, tag)
    say = tell or (lambda line: None)
    group = distributed.current()
    if group is not None:
        return _run_across(
            group, plan, source, out, tag, progress, start, param_groups, sha256, restart, say
        )
    check_output(out, plan, source.folder)
    begun = _begin(plan, source, out, tag, param_groups, restart, say)
    partial = begun.partial
    files_in = SourceFiles(source)
    journal = None
    try:
        prepared, skip, journal = _take_up(plan, source, out, tag, param_groups, begun, say)
        on_unit = _journaled(
            journal, plan, prepared.views, _progress_by_bytes_written(plan, progress, skip)
        )
        spill = Spill.beside(plan.target_placement.layout, out, str(os.getpid()))
        try:
            todo = [u for u in plan.units if u.id not in skip]
            executor.execute(
                plan, files_in, prepared.views, on_unit=on_unit, spill=spill, units=todo
            )
            check_crcs(files_in.reads(), source)
        finally:
            swapped = spill.moved
            spill.close()
        journal.close(flush=False)
        journal = None
        discard_journals(partial)
        crcs = prepared.finish()
        files = commit(partial, out, prepared.markers, plan, crcs, sha256=sha256)
    except BaseException as e:
        _stopped(e, journal, begun, out, plan)
    finally:
        files_in.close()
        IN_USE.discard(partial.absolute())
    return _report(plan, out, files, len(prepared.markers), start, swapped, skip)


def output_tag(plan: Plan, source: Checkpoint, tag: str | None) -> str:
    """The tag the output is written under: the one asked for, the plan's, or the
    source folder's name."""
    return tag or plan.tag or source.folder.name


@dataclass
class _Begun:
    """Where a run builds its output: a fresh partial folder, or the one an earlier run of
    the same command left (``found``: its journal); ``head``: the new journal's first line."""

    partial: Path
    found: Found | None
    head: dict[str, Any]


def _begin(
    plan: Plan,
    source: Checkpoint,
    out: Path,
    tag: str,
    param_groups: Any,
    restart: bool,
    say: Callable[[str], None],
) -> _Begun:
    """The partial folder to build ``out`` in: the one a run of this command on this source
    left (unless ``restart``), else a new one. Every other left by a process that is gone is
    named, and with ``restart`` removed."""
    head = _head(plan, source, tag, param_groups)
    found, others = _left(out, head, restart, say)
    if restart:
        remove([*([found.partial] if found else []), *(p for p, _ in others)])
        found = None
    if found is not None:
        found = take_over(found, partial_name(out))
    partial = found.partial if found else make_partial(out)
    IN_USE.add(partial.absolute())  # until the run ends: not another's to take up
    return _Begun(partial, found, head)


def _head(plan: Plan, source: Checkpoint, tag: str, param_groups: Any) -> dict[str, Any]:
    """The first line of this run's journal: the command and the source."""
    key = command_key(plan, tag, param_groups)
    return {"journal": VERSION, "key": key, "source": fingerprint(plan, source)}


def _left(
    out: Path,
    head: dict[str, Any],
    restart: bool,
    say: Callable[[str], None],
    removing: str = "removing",
) -> tuple[Found | None, list[tuple[Path, str]]]:
    """What earlier runs into ``out`` left, each told to ``say``: the partial folder of the
    command and source ``head`` names (with its journal), and the others with why not;
    with ``restart``, that each is ``removing`` (a dry run: "would remove")."""
    found, others = resumable(out, head["key"], head["source"])
    scratch = "it holds the swap files of spilled tensors, which nothing reads again"
    others += [(p, scratch) for p in swaps(out)]
    for p, why in [*([(found.partial, "")] if found and restart else []), *others]:
        if restart:
            say(f"--restart: {removing} {p} ({size_of(p) / 2**20:,.1f} MiB)")
        else:
            say(described(p, f"{why}, so it is not reused (--restart removes it)"))
    return found, others


def preview(
    plan: Plan,
    source: Checkpoint,
    out: Path,
    tag: str | None,
    param_groups: Any,
    restart: bool,
    say: Callable[[str], None],
) -> None:
    """What :func:`run` would do with what earlier runs into ``out`` left, told to ``say``;
    nothing is changed (a dry run)."""
    head = _head(plan, source, output_tag(plan, source, tag), param_groups)
    found, _ = _left(out, head, restart, say, "would remove")
    if found is not None and not restart:
        say(
            f"{found.partial}: left by an earlier run of this command ({human_size(found.bytes)} "
            "journaled); the run goes on from it after reading that back (--restart: start over)"
        )


def _reuse(
    found: Found, prepared: Any, files: dict[str, int], plan: Plan, say: Callable[[str], None]
) -> tuple[set[int], list[tuple[str, int, int, int]]]:
    """What of an earlier run's output is kept: the output files (created again over it,
    of the sizes ``files``) are those its journal lists, and each range it records is read
    back and verified. Returns the units not to run again and the verified ranges (to
    carry into the new journal); records the ranges' CRCs for the commit."""
    partial = found.partial
    ours = {str(f) for f in prepared.files}
    strays = [
        f
        for f in partial.rglob("*")
        if (f.is_symlink() or f.is_file()) and str(f) not in ours and JOURNAL not in f.name
    ]
    for f in strays:  # nothing this command writes: never committed with its output
        f.unlink()
    if strays:
        say(f"{partial}: removed {len(strays)} file(s) this command does not write")
    if found.head["files"] != files:
        say(f"{partial}: its files are not those this command writes; none of it is kept")
        return set(), []
    good, bad = verify(found, prepared.io, plan.workers)
    for path, at, n, crc in good:
        prepared.io.pieces.setdefault(path, Pieces()).record(at, n, crc)
    done = Done((p, at, n) for p, at, n, _ in good)
    skip = {u.id for u in plan.units if done.covers(unit_ranges(plan, u, prepared.views))}
    kept = _kept(plan, skip)[0]
    total = _bytes_to_write(plan)
    failed = f"; {human_size(bad)} did not verify and are written again" if bad else ""
    say(
        f"going on from {partial}, left by an earlier run of this command: "
        f"{human_size(kept)} of {human_size(total)} ({len(skip)} of {len(plan.units)} units) "
        f"read back and verified against its journal{failed}"
    )
    carried = [(str(Path(p).relative_to(partial)), at, n, crc) for p, at, n, crc in good]
    return skip, carried


def _take_up(
    plan: Plan,
    source: Checkpoint,
    out: Path,
    tag: str,
    param_groups: Any,
    begun: _Begun,
    say: Callable[[str], None],
) -> tuple[Any, set[int], Journal]:
    """The output's files created in ``begun``'s partial folder (over what an earlier run
    left there, verified: :func:`_reuse`), and rank 0's journal made anew. Returns the
    prepared files, the units not to run again and the journal."""
    prepared = prepare_output(plan, begun.partial, source, tag, param_groups, begun.found)
    files = sizes(prepared.files, begun.partial)
    skip: set[int] = set()
    carried: list[tuple[str, int, int, int]] = []
    if begun.found is not None:
        skip, carried = _reuse(begun.found, prepared, files, plan, say)
    head = {**begun.head, "files": files}
    try:
        journal = Journal(begun.partial / JOURNAL, prepared.io, begun.partial, head, carried)
    except OSError as e:  # a failure of the output's filesystem, named as such
        raise as_output_error(e, out) from None
    return prepared, skip, journal


def _kept(plan: Plan, skip: set[int]) -> tuple[int, int]:
    """The bytes the units ``skip`` write and read: an earlier run wrote them."""
    units = [u for u in plan.units if u.id in skip]
    return sum(u.stats.write_bytes for u in units), sum(u.stats.read_bytes for u in units)


_RESUMABLE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}  # a full disk: free space, run again


def _resumable(e: BaseException, out: Path) -> bool:
    """A run stopped by ``e`` keeps what it wrote: interrupted (Ctrl-C, SIGTERM), or the
    output's disk full."""
    return isinstance(e, KeyboardInterrupt) or (
        isinstance(e, OSError) and e.errno in _RESUMABLE_ERRNOS and is_output_failure(e, out)
    )


def _kept_line(recorded: int, plan: Plan, partial: Path) -> str:
    return (
        f"{human_size(recorded)} of {human_size(_bytes_to_write(plan))} written are kept in "
        f"{partial}: run the same command again to go on from there (--restart starts over)"
    )


def _stopped(
    e: BaseException,
    journal: Journal | None,
    begun: _Begun,
    out: Path,
    plan: Plan,
) -> NoReturn:
    """A run that stops short: interrupted (Ctrl-C, SIGTERM) or out of disk space, what it
    wrote (or the earlier run it took up) is kept with its journal for the same command to
    go on from, and the error says so; any other failure removes the partial folder
    (:func:`_fail`)."""
    keep = _resumable(e, out)
    if journal is not None:
        with contextlib.suppress(Exception):  # a full disk: what is recorded stays
            journal.close(flush=keep)
    recorded = journal.recorded if journal else begun.found.bytes if begun.found else 0
    if not keep or not recorded:
        _fail(e, begun.partial, out)
    line = _kept_line(recorded, plan, begun.partial)
    if isinstance(e, KeyboardInterrupt):
        raise type(e)(line) from None
    assert isinstance(e, OSError)
    raise OutputError(f"{as_output_error(e, out)}; {line}") from None


def _fail(
    e: BaseException,
    partial: Path | None,
    out: Path,
    tell: Callable[[BaseException], object] | None = None,
) -> NoReturn:
    """Remove the partial output and raise ``e`` — for a failure of the output's filesystem
    (full, read-only, a name too long, ...) the :class:`~layoutc.runtime.commit.OutputError`
    that names it — after ``tell`` (the other ranks) what it is."""
    discard(partial)
    named = as_output_error(e, out) if isinstance(e, OSError) and is_output_failure(e, out) else e
    if tell is not None:
        tell(named)
    if named is not e:
        raise named from None
    raise e


def prepare_output(
    plan: Plan,
    partial: Path,
    source: Checkpoint,
    tag: str | None,
    param_groups: list[dict[str, Any]] | None,
    again: Found | None = None,
) -> Any:
    """The plan's output files, created under ``partial`` (every tensor a hole); ``again``:
    over the files an earlier run left there, their tensors' bytes kept."""
    with reopening() if again is not None else contextlib.nullcontext():
        return prepare(
            plan.target_placement,
            partial,
            source,
            output_tag(plan, source, tag),
            param_groups=param_groups,
            source=plan.source_placement,
        )


def _bytes_to_write(plan: Plan) -> int:
    """What the progress display counts towards (at least 1)."""
    return sum(u.stats.write_bytes for u in plan.units) or 1


def _report(
    plan: Plan,
    out: Path,
    files: list[str],
    markers: int,
    start: float,
    swapped: int,
    skipped: set[int] = frozenset(),  # type: ignore[assignment]
) -> Report:
    """What a run did; ``skipped``: the units an earlier run wrote (kept, not read)."""
    t = plan.totals
    kept, not_read = _kept(plan, skipped)
    return Report(
        out,
        files[: len(files) - markers],
        t.read_bytes - not_read,
        t.write_bytes,
        time.perf_counter() - start,
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        plan,
        plan.warnings,
        swapped,
        tuple(files[len(files) - markers :]),
        kept,
    )


def _progress_by_bytes_written(
    plan: Plan, progress: Callable[[int, int], None] | None, skipped: set[int]
) -> Callable[[Any], None]:
    """An ``on_unit`` callback reporting bytes written so far (those of the units
    ``skipped``, an earlier run's, from the start) out of the plan's."""
    total = _bytes_to_write(plan)
    done = _kept(plan, skipped)[0]
    lock = threading.Lock()

    def on_unit(unit: Any) -> None:
        nonlocal done
        with lock:
            done += unit.stats.write_bytes
            now = done
        if progress is not None:
            progress(now, total)

    return on_unit


def _journaled(
    journal: Journal, plan: Plan, views: Any, then: Callable[[Any], object]
) -> Callable[[Any], None]:
    """An ``on_unit`` callback recording each finished unit's ranges in ``journal``, then
    calling ``then``."""

    def on_unit(unit: Any) -> None:
        journal.add(unit_ranges(plan, unit, views))
        then(unit)

    return on_unit


class _ProgressWatch:
    """Rank 0's view of a distributed run: bytes written by all ranks (a counter in the
    group's store every rank adds to), reported every 0.2 s until stopped."""

    def __init__(
        self,
        group: distributed.Group,
        counter: str,
        plan: Plan,
        progress: Callable[[int, int], None],
    ) -> None:
        self.group, self.counter, self.progress = group, counter, progress
        self.total = _bytes_to_write(plan)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="layoutc-progress", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.2):
            now = self.group.add(self.counter, 0)
            if now is None:
                return
            self.progress(min(now, self.total), self.total)

    def stop(self, final: bool) -> None:
        """Stop reporting; ``final``: report the count once more, every rank being done."""
        self.done.set()
        self.thread.join()
        if final:
            now = self.group.add(self.counter, 0)
            self.progress(self.total if now is None else now, self.total)


def _regions(io: Files, layout: dict[tuple[str, str], Any]) -> dict[tuple[str, str], Any]:
    """Writable regions of the output's files, from rank 0's description of them."""
    return {
        k: io.region(v[0], v[1], v[2], np_dtype(v[3]))
        if isinstance(v, tuple)
        else np.zeros(0, np_dtype(v))
        for k, v in layout.items()
    }


class RankFailed(InputError):
    """A rank of a distributed conversion failed; nothing was committed. The message names
    each failing rank and the class of what it raised; the kind is not carried across ranks,
    and what fails on one rank but not on rank 0 is most often that rank's own disk or
    memory, so this is an input error (exit 1), never a usage error."""


def _run_across(
    group: distributed.Group,
    plan: Plan,
    source: Checkpoint,
    out: Path,
    tag: str,
    progress: Callable[[int, int], None] | None,
    start: float,
    param_groups: list[dict[str, Any]] | None,
    sha256: bool,
    restart: bool,
    say: Callable[[str], None],
) -> Report:
    """:func:`execute` on every rank of ``group``: rank 0 creates the files (or takes up
    an earlier run's, see :func:`run`), every rank writes the units the plan dealt it
    (``plan.rank_of``) and journals them in a file of its own, rank 0 combines the CRCs of
    all ranks' writes and commits once every rank has succeeded; a failure anywhere leaves
    nothing committed and is raised on every rank, naming the rank (an interruption or a
    full disk keeps what was written, for the same command to go on from)."""
    rank, world = group.rank, group.world
    if plan.ranks != world:
        raise UsageError(
            f"this plan deals its units to {plan.ranks} rank(s); torchrun runs {world}: "
            f"plan it for {world} (layoutc plan ... --ranks {world})"
        )
    partial: Path | None = None
    prepared = None
    layout: Any = None
    journal: Journal | None = None
    begun: _Begun | None = None
    if rank == 0:
        try:
            check_output(out, plan, source.folder)
            begun = _begin(plan, source, out, tag, param_groups, restart, say)
            partial = begun.partial
            prepared, skip, journal = _take_up(plan, source, out, tag, param_groups, begun, say)
            discard_journals(partial, others_only=True)  # what they held is carried
            layout = {
                k: (v.path, v.offset, v.size, dtype_name(v.dtype))
                if isinstance(v, Region)
                else dtype_name(v.dtype)
                for k, v in prepared.views.items()
            }
            counter = f"layoutc-written-{partial.name}"  # the run's progress counter
            group.add(counter, _kept(plan, skip)[0])
            layout[("", "run")] = (counter, str(partial), sorted(skip))
        except BaseException as e:

            def tell(n: BaseException) -> None:
                group.broadcast(f"rank 0: {type(n).__name__}: {n}")

            if begun is None or begun.found is None or not _resumable(e, out):
                if journal is not None:
                    journal.close(flush=False)
                _fail(e, partial, out, tell)
            tell(e)  # interrupted while taking up an earlier run: that run's work is kept
            _stopped(e, journal, begun, out, plan)
    layout = group.broadcast(layout)
    if isinstance(layout, str):
        raise RankFailed(f"{out}: {layout}")
    counter, where, skip_ids = layout.pop(("", "run"))
    skip = set(skip_ids)
    io = prepared.io if prepared is not None else Files(os.O_RDWR, direct=True)
    mine = [u for u in plan.units if plan.rank_of(u) == rank and u.id not in skip]
    views: Any = prepared.views if prepared is not None else _regions(io, layout)
    if journal is None:
        journal = Journal(Path(where) / f"{JOURNAL}-{rank}", io, Path(where))
    on_unit = _journaled(journal, plan, views, lambda u: group.add(counter, u.stats.write_bytes))

    watch = _ProgressWatch(group, counter, plan, progress) if rank == 0 and progress else None

    error = None
    keep = stopped = False  # kept for the same command to go on from; Ctrl-C or SIGTERM
    swapped = 0
    reads: Reads = {}
    files_in = SourceFiles(source)
    spill = Spill.beside(plan.target_placement.layout, out, f"{os.getpid()}-{rank}")
    try:  # whatever fails here is reported to every rank below, never left hanging
        threads = max(1, plan.workers // world)
        executor.execute(
            plan, files_in, views, on_unit=on_unit, spill=spill, units=mine, threads=threads
        )
    except BaseException as e:
        error = f"rank {rank}: {type(e).__name__}: {e}"
        keep, stopped = _resumable(e, out), isinstance(e, KeyboardInterrupt)
    finally:
        swapped = spill.moved
        spill.close()
        reads = files_in.reads()
        files_in.close()
    with contextlib.suppress(Exception):  # a full disk: what is recorded stays
        journal.close(flush=error is not None or rank != 0)
    pieces = {path: p.snapshot() for path, p in io.pieces.items()}
    if prepared is None:
        io.close()
    results = group.gather((error, pieces, swapped, reads, keep, journal.recorded, stopped))
    if partial is not None:  # committed, removed or kept below: no longer being built
        IN_USE.discard(partial.absolute())
    errors = [r[0] for r in results if r[0]]
    if watch is not None:
        watch.stop(final=not errors)
    files: Any = None
    recorded = sum(r[5] for r in results)
    if rank == 0 and errors and recorded and any(r[4] for r in results):
        assert partial is not None
        line = _kept_line(recorded, plan, partial)  # interrupted, or a full disk: kept
        group.broadcast("; ".join(errors) + f" (nothing committed); {line}")
        if all(r[6] for r in results if r[0]):
            raise KeyboardInterrupt(line)
        raise RankFailed(f"{out}: " + "; ".join(errors) + f" (nothing committed); {line}")
    if rank == 0:
        assert prepared is not None and partial is not None
        try:
            if errors:
                raise RankFailed(f"{out}: " + "; ".join(errors) + " (nothing committed)")
            check_crcs(_merge_reads([r[3] for r in results]), source)
            for r in results[1:]:
                for path, runs in r[1].items():
                    for offset, length, crc in runs:
                        prepared.io.pieces.setdefault(path, Pieces()).record(offset, length, crc)
            discard_journals(partial)
            files = commit(partial, out, prepared.markers, plan, prepared.finish(), sha256)
            files = (files, len(prepared.markers))
        except BaseException as e:
            why = "; ".join(errors)
            _fail(
                e,
                partial,
                out,
                lambda n: group.broadcast(
                    (why or f"rank 0: {type(n).__name__}: {n}") + " (nothing committed)"
                ),
            )
    files = group.broadcast(files)
    if isinstance(files, str):
        raise RankFailed(f"{out}: {files}")
    written, markers = files
    return _report(plan, out, written, markers, start, sum(r[2] for r in results), skip)
