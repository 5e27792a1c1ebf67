"""Save a training job's checkpoint tag atomically, in parallel, and if asked asynchronously.

One :class:`Saver` per rank. A save of tag ``T`` into ``DIR`` runs in three calls, made by
every rank in the same order:

* :meth:`Saver.begin` waits for the previous save (raising its failure), removes partial
  folders a killed job left in ``DIR`` and opens ``DIR/.T.layoutc-partial``;
* :meth:`Saver.save` (any number of times) pickles a state dict as ``torch.save`` does, creates
  its file under the partial folder with every storage a pre-sized hole, and queues the
  storages' bytes to a pool of writer threads that write them at their offsets (O_DIRECT
  where the filesystem allows), each piece's CRC-32 taken while it is in cache. An
  asynchronous save first copies the bytes, in pieces, into reused host buffers, so
  training may change the tensors as soon as the call returns; the writes start once the
  whole save is copied (so they do not slow the copy the loop waits for), or earlier when
  the buffers reach ``host_memory`` and the copy must wait for a write to free one;
* :meth:`Saver.end` commits: each rank waits for its writes, patches its files' CRCs and
  fsyncs them; the ranks exchange their files' sizes and CRCs; rank 0 writes the manifest
  (``layoutc-manifest.json``, readable by ``layoutc verify``), fsyncs the folder, renames it
  to ``DIR/T`` (an existing ``DIR/T`` is swapped out in the same step where the kernel can)
  and only then replaces ``DIR/latest`` (write, fsync, rename). An asynchronous save runs
  this in a background thread and returns at once; its collectives use a process group of
  their own, so they never interleave with training's.

A failure anywhere (a write error, a full disk, a rank that could not finish) leaves ``DIR/T``
and ``latest`` as they were, removes the partial folder, and is raised on every rank by the
next call; a killed job leaves at most a partial folder, which the next save removes. Files
saved outside a tag (``save_16bit_model``) are written the same way into a temporary file
renamed into place, before the call returns.

All ranks must see ``DIR`` as one folder (a shared filesystem), as DeepSpeed itself assumes.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from layoutc.deepspeed.errors import SaveFailed
from layoutc.deepspeed.snapshot import HostBuffers, as_bytes, pickled
from layoutc.formats import pt
from layoutc.runtime.commit import fsync_dir, seal
from layoutc.runtime.fileio import ALIGN, Files, direct_supported, fsync_path

PIECE = 64 << 20  # bytes per write (and per host buffer)
PARTIAL = ".layoutc-partial"
_AT_FDCWD = -100


class Group:
    """The ranks that save together, over a gloo group of their own (or one process); one
    per process (:meth:`shared`), whatever the number of engines attached."""

    _shared: Group | None = None

    @classmethod
    def shared(cls) -> Group:
        if cls._shared is None or (cls._shared.group is not None and not dist.is_initialized()):
            cls._shared = cls()  # every rank gets here at its first attach: in step
        return cls._shared

    def __init__(self) -> None:
        self.dist = dist
        self.group: Any = None
        self.rank, self.world = 0, 1
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.group = dist.new_group(backend="gloo")  # every rank calls this, in order

    def barrier(self) -> None:
        if self.group is not None:
            self.dist.barrier(group=self.group)

    def gather(self, obj: Any) -> list[Any]:
        if self.group is None:
            return [obj]
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        if self.group is None:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


@dataclass
class _File:
    """One file being written: its container, where its bytes go, the writes in flight."""

    path: Path  # where it is written
    rel: str  # its name under the tag (or its final path, outside a tag)
    created: pt.Created
    files: Files
    writes: list[Future[None]] = field(default_factory=list)

    def finish(self) -> tuple[int, int]:
        """Wait for the writes, patch the CRCs, fsync; returns (bytes, CRC-32)."""
        try:
            for w in self.writes:
                w.result()
            pieces = self.files.pieces.get(str(self.path))
        finally:
            self.files.close()
        crc = self.created.finish_crcs(pieces)
        fsync_path(self.path)
        return self.created.size, crc


@dataclass
class _Tag:
    folder: Path  # DIR
    tag: str
    partial: Path
    files: list[_File] = field(default_factory=list)

    @property
    def final(self) -> Path:
        return self.folder / self.tag


class Saver:
    def __init__(
        self,
        *,
        async_save: bool = True,
        workers: int | None = None,
        host_memory: int | None = None,
        group: Group | None = None,
    ) -> None:
        self.group = group or Group.shared()
        self.async_save = async_save
        self.writers = ThreadPoolExecutor(workers or 4, thread_name_prefix="layoutc-save")
        self.committer = ThreadPoolExecutor(1, thread_name_prefix="layoutc-commit")
        pinned = torch.cuda.is_available()
        self.buffers = HostBuffers(PIECE, host_memory, pinned=pinned)
        self.tag: _Tag | None = None
        self.held: list[tuple[_File, Any, int, torch.Tensor]] = []  # copies not yet queued
        self.pending: Future[None] | None = None
        self.closed = False
        self.lock = threading.Lock()
        self.committed: dict[str, float] = {}  # tag -> time.perf_counter() of its commit
        atexit.register(self._at_exit)

    # -- the three calls of a save ---------------------------------------------------------

    def begin(self, folder: str | os.PathLike[str], tag: str) -> None:
        self.wait()
        root = Path(folder).absolute()
        if self.group.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(f".*{PARTIAL}"):
                print(
                    f"layoutc: removing {stale}, left by a save that did not finish",
                    file=sys.stderr,
                )
                shutil.rmtree(stale, ignore_errors=True)
        self.group.barrier()
        self.tag = _Tag(root, tag, root / f".{tag}{PARTIAL}")

    def where(self, path: str | os.PathLike[str]) -> Path:
        """Where a file DeepSpeed names is written: under the partial folder for the tag
        being saved, else where it says."""
        p = Path(path).absolute()
        t = self.tag
        if t is not None and (p == t.final or t.final in p.parents):
            return t.partial / p.relative_to(t.final)
        return p

    def save(self, obj: Any, path: str | os.PathLike[str]) -> None:
        self._raise_failure()
        target = self.where(path)
        inside = self.tag is not None and target != Path(path).absolute()
        if not inside:
            target = target.with_name(f"{target.name}.layoutc-tmp-{os.getpid()}")
        target.parent.mkdir(parents=True, exist_ok=True)
        f = self._start(obj, target, Path(path).name, copy=self.async_save and inside)
        if inside:
            assert self.tag is not None
            f.rel = str(target.relative_to(self.tag.partial))
            self.tag.files.append(f)
            return
        try:  # outside a tag: done before returning
            self._release()
            f.finish()
            final = Path(path).absolute()
            os.replace(target, final)
            fsync_dir(final.parent)
        except BaseException:
            target.unlink(missing_ok=True)
            raise

    def end(self, save_latest: bool) -> None:
        self._release()
        t, self.tag = self.tag, None
        if t is None:
            return
        if self.async_save:
            with self.lock:
                self.pending = self.committer.submit(self._commit, t, save_latest)
        else:
            self._commit(t, save_latest)

    def abort(self) -> None:
        """The save in progress failed in the caller: wait for its writes, keep nothing."""
        self._release()
        t, self.tag = self.tag, None
        if t is None:
            return
        for f in t.files:
            with contextlib.suppress(BaseException):  # the caller's failure is the one raised
                f.finish()
        shutil.rmtree(t.partial, ignore_errors=True)

    def wait(self) -> None:
        """Wait for the last save to be committed; raise its failure (once)."""
        self._raise_failure(block=True)

    def close(self) -> None:
        if not self.closed:
            self.wait()
            self.closed = True
            self.writers.shutdown()
            self.committer.shutdown()

    # -- inside ------------------------------------------------------------------------------

    def _raise_failure(self, block: bool = False) -> None:
        with self.lock:
            pending = self.pending
            if pending is None or (not block and not pending.done()):
                return
            self.pending = None
        pending.result()

    def _start(self, obj: Any, target: Path, name: str, copy: bool) -> _File:
        """Create ``target`` with its storages as holes and queue their bytes."""
        p = pickled(obj)
        files = Files(os.O_RDWR, direct=direct_supported(target.parent))
        sizes = {key: (s.nbytes(), None) for key, s in p.storages.items()}
        with open(target, "wb") as out:
            created = pt.write_pickled(
                out,
                p.pkl,
                sizes,
                target,
                archive=Path(name).stem or "archive",
                align=ALIGN if files.direct else 64,
            )
        f = _File(target, name, created, files)
        try:
            for key, storage in p.storages.items():
                n = storage.nbytes()
                if n:
                    at, _ = created.storages[key]
                    region = files.region(str(target), at, n, np.dtype(np.uint8))
                    self._queue(f, region, as_bytes(storage), copy)
        except BaseException:
            for w in f.writes:
                w.cancel()
            for held in [h for h in self.held if h[0] is f]:
                self.held.remove(held)
                self.buffers.give(held[3])
            files.close()
            raise
        return f

    def _queue(self, f: _File, region: Any, src: torch.Tensor, copy: bool) -> None:
        copy = copy or src.device.type != "cpu"
        step = self.buffers.piece if copy else PIECE
        for lo in range(0, src.numel(), step):
            piece = src[lo : lo + step]
            if copy:
                if self.held and not self.buffers.available(piece.numel()):
                    self._release()  # the copy would wait for writes: start them
                buf = self.buffers.take(piece.numel())
                buf.copy_(piece)
                self.held.append((f, region, lo, buf))
            else:
                f.writes.append(self.writers.submit(self._write, region, lo, piece, None))

    def _release(self) -> None:
        """Start the writes of the copies made so far. A save holds them back until its
        tensors are all copied, so that the copy, which the training loop waits for, does
        not share the CPU with the writers."""
        held, self.held = self.held, []
        for f, region, lo, buf in held:
            f.writes.append(self.writers.submit(self._write, region, lo, buf, buf))

    def _write(self, region: Any, at: int, data: torch.Tensor, buf: torch.Tensor | None) -> None:
        try:
            region.write_bytes(at, data.numpy().data)
        finally:
            if buf is not None:
                self.buffers.give(buf)

    def _commit(self, t: _Tag, save_latest: bool) -> None:
        g = self.group
        done: dict[str, tuple[int, int]] = {}
        error = None
        for f in t.files:
            try:
                done[f.rel] = f.finish()
            except BaseException as e:  # every rank still takes part in the exchange
                error = error or f"rank {g.rank}: writing {t.final / f.rel}: {e}"
        reports = g.gather((done, error))
        outcome = None
        if g.rank == 0:
            errors = [e for _, e in reports if e]
            if errors:
                outcome = "; ".join(errors)
            else:
                try:
                    self._place(t, reports, save_latest)
                except BaseException as e:
                    outcome = f"rank 0: committing {t.final}: {e}"
            if outcome:
                shutil.rmtree(t.partial, ignore_errors=True)
        outcome = g.broadcast(outcome)
        if not outcome:
            self.committed[t.tag] = time.perf_counter()
        if outcome:
            raise SaveFailed(
                f"{t.final} was not saved ({outcome}); the previous checkpoint and "
                "`latest` are as they were"
            )

    def _place(self, t: _Tag, reports: list[Any], save_latest: bool) -> None:
        """Rank 0: manifest, fsync, rename into place, then ``latest``."""
        crcs: dict[Path, int] = {}
        for done, _ in reports:
            for rel, (_, crc) in done.items():
                crcs[t.partial / rel] = crc
        t.partial.mkdir(parents=True, exist_ok=True)  # a tag whose ranks wrote nothing
        head = {
            "training": {"saved_by": "layoutc.deepspeed", "tag": t.tag, "ranks": self.group.world},
            "target": {"format": "deepspeed-tag"},
        }
        seal(t.partial, {}, head, crcs)
        if t.final.exists():
            _swap(t.partial, t.final)
            shutil.rmtree(t.partial)  # now the old tag
        else:
            os.rename(t.partial, t.final)
        fsync_dir(t.folder)
        if save_latest:
            tmp = t.folder / f".latest.layoutc-tmp-{os.getpid()}"
            tmp.write_text(t.tag)
            fsync_path(tmp)
            os.replace(tmp, t.folder / "latest")
            fsync_dir(t.folder)

    def _at_exit(self) -> None:
        try:
            self.close()
        except BaseException as e:
            print(f"layoutc: the last checkpoint save failed: {e}", file=sys.stderr)


def _swap(a: Path, b: Path) -> None:
    """Exchange folders ``a`` and ``b`` (``renameat2(RENAME_EXCHANGE)``: one step); where
    the kernel cannot, ``b`` is moved aside first."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None and fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), 2) == 0:
        return  # 2: RENAME_EXCHANGE
    aside = b.with_name(f"{b.name}.layoutc-old-{os.getpid()}")
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)
