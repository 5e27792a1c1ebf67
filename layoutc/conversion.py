"""Convert a checkpoint on disk: infer or check its layout, plan, execute, commit.

The steps, each refusing to go on if the previous one found a problem:

1. the source layout is inferred from the checkpoint (or read from ``--spec``) and checked
   against the files — every buffer the layout places must be there, with its size and
   dtype — before a byte of tensor data is read;
2. the plan is compiled and validated;
3. the target's files are created with their structure under a temporary folder next to
   the output, then filled by running the plan: it reads exactly the runs it needs from the
   source files and writes at known offsets of the output files (pread / pwrite);
4. the output is committed: CRCs patched, files fsynced, a manifest of each file's size and
   CRC-32 written (``layoutc-manifest.json``, with the plan's digest and layoutc's version), the
   folder renamed into place, and only then the marker a loader looks for
   (``latest_universal``, the safetensors index).

Nothing pickled runs: the source is read with the restricted unpickler, and DeepSpeed need
not be installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from layoutc import ir
from layoutc.errors import LayoutcError
from layoutc.formats import pt, weights
from layoutc.formats import safetensors as st
from layoutc.formats.deepspeed import DeepSpeedCheckpoint, infer, open_checkpoint
from layoutc.formats.match import check_against
from layoutc.formats.writers import prepare
from layoutc.lang.check import load_layout, load_text
from layoutc.place import place
from layoutc.place.full import WeightsPlacement
from layoutc.plan.compile import compile_plan
from layoutc.plan.plan import Plan
from layoutc.runtime import memory
from layoutc.runtime.checksum import file_crc
from layoutc.runtime.fileio import Files
from layoutc.runtime.spill import Spill

MANIFEST = "layoutc-manifest.json"


class OutputExists(LayoutcError):
    """The output folder exists and is not empty."""


class SourceFiles(Mapping[tuple[str, str], Any]):
    """``(file, key) -> flat tensor`` of a checkpoint, read in place: a contiguous tensor is a
    :class:`~layoutc.runtime.fileio.Region` of its file (pread, nothing mapped); a strided
    view (rare in checkpoints) is made contiguous once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.opener = pt.Opener()
        self.files = Files()
        self._objs: dict[str, Any] = {}
        self._views: dict[tuple[str, str], Any] = {}

    def __getitem__(self, fk: tuple[str, str]) -> Any:
        if fk not in self._views and fk[0].endswith(".safetensors"):
            file, key = fk
            if file not in self._objs:
                self._objs[file] = st.read_header(self.folder / file)[0]
            e = self._objs[file][key]
            self._views[fk] = self.files.region(
                str(self.folder / file), e.begin, e.numel, memory.np_dtype(e.dtype)
            )
        if fk not in self._views:
            file, key = fk
            if file not in self._objs:
                self._objs[file] = pt.load(self.folder / file)
            ref = pt.at(self._objs[file], key)
            if ref.contiguous:
                data_at, _ = self.opener.member(str(self.folder / file), ref.storage.member)
                itemsize = memory.np_dtype(ref.dtype).itemsize
                self._views[fk] = self.files.region(
                    str(self.folder / file),
                    data_at + ref.offset * itemsize,
                    ref.numel,
                    memory.np_dtype(ref.dtype),
                )
            else:
                self._views[fk] = np.ascontiguousarray(ref.numpy(self.opener)).reshape(-1)
        return self._views[fk]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)

    def close(self) -> None:
        self._views.clear()
        self.files.close()
        self.opener.close()


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

    def summary(self) -> str:
        rate = self.bytes_written / self.seconds / 1e9 if self.seconds else 0.0
        from layoutc.render import human_size

        swapped = f"; swapped {human_size(self.bytes_swapped)}" if self.bytes_swapped else ""
        return (
            f"wrote {len(self.files)} files, {human_size(self.bytes_written)} to {self.output} "
            f"in {self.seconds:.2f} s ({rate:.2f} GB/s); read {human_size(self.bytes_read)}"
            f"{swapped}; peak RSS {human_size(self.peak_rss_bytes)}"
        )


def source_text(ckpt: DeepSpeedCheckpoint, spec: str | Path | None = None) -> tuple[str, str]:
    """The text of ``ckpt``'s layout and the name diagnostics use: ``spec``, or inferred."""
    if spec is not None:
        return Path(spec).read_text(encoding="utf-8"), str(spec)
    return infer(ckpt), f"{ckpt.folder} (inferred)"


def source_layout(ckpt: DeepSpeedCheckpoint, spec: str | Path | None = None) -> ir.Layout:
    """The layout of ``ckpt``: ``spec`` if given, else inferred; checked against the files."""
    layout = load_text(*source_text(ckpt, spec))
    check_against(place(layout), ckpt.folder)
    return layout


def target_for(
    source: ir.Layout,
    source_text: tuple[str, str],
    to: str | Path,
    overrides: Mapping[str, int] | None = None,
) -> ir.Layout:
    """The target layout: a ``.layout`` file, or a format name meaning the source layout
    stored in that format; ``overrides`` (``--set``) change mesh axes and let constants of
    whichever it is."""
    if str(to) not in ir.FORMATS:
        return load_layout(to, dict(overrides or {}))
    base = load_text(*source_text, dict(overrides)) if overrides else source
    return base.with_store(replace(base.store, format=str(to)))


def with_dtype(layout: ir.Layout, dtype: str | None) -> ir.Layout:
    """The layout with every floating tensor stored as ``dtype`` (for safetensors / torch)."""
    if dtype is None:
        return layout
    floats = {"fp32", "fp16", "bf16", "fp64"}
    tensors = tuple(replace(t, dtype=dtype) if t.dtype in floats else t for t in layout.tensors)
    opt = layout.optimizer
    return replace(
        layout, tensors=tensors, dtype=dtype, optimizer=replace(opt, master=dtype) if opt else None
    )


def convert(
    checkpoint: str | Path,
    output: str | Path,
    to: str | Path,
    *,
    spec: str | Path | None = None,
    tag: str | None = None,
    memory_budget: int | None = None,
    workers: int = 1,
    dtype: str | None = None,
    max_shard_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    overrides: Mapping[str, int] | None = None,
    param_groups: list[dict[str, Any]] | None = None,
) -> Report:
    """Convert ``checkpoint`` — a DeepSpeed checkpoint, or full weights (safetensors, a
    torch state dict, a Hugging Face folder) with ``spec`` describing the model — into
    ``output`` in format (or layout file) ``to``; ``overrides`` set mesh axes or let
    constants of the target (``--set``); ``param_groups`` are the optimizer
    hyperparameters written with fresh optimizer state (a source without any)."""
    start = time.perf_counter()
    source: Any
    if weights.is_weights(checkpoint) and not is_deepspeed(checkpoint):
        if spec is None:
            raise ValueError(
                f"{checkpoint}: full weights carry no layout to infer; give --spec MODEL.layout "
                "(the model's tensors and the topology to lay them out for)"
            )
        w = weights.open_weights(checkpoint)
        text = (Path(spec).read_text(encoding="utf-8"), str(spec))
        src = load_text(*text)
        weights.check_weights(src, w)
        source = WeightsPlacement(
            src.with_store(replace(src.store, format=w.format)), w.entries, w.format
        )
        folder, src_tag = w.folder, None
    else:
        ckpt = open_checkpoint(checkpoint, tag)
        text = source_text(ckpt, spec)
        src = load_text(*text)
        check_against(place(src), ckpt.folder)
        source, folder, src_tag = src, ckpt.folder, ckpt.tag
    tgt = target_for(src, text, to, overrides)
    if tgt.store.format in ("safetensors", "torch"):
        tgt = with_dtype(tgt, dtype)
    elif dtype is not None:
        raise ValueError(
            f"--dtype applies to safetensors and torch outputs, not {tgt.store.format}"
        )
    if max_shard_size is not None:
        if tgt.store.format != "safetensors":
            raise ValueError(
                f"--max-shard-size applies to safetensors output, not {tgt.store.format}"
            )
        tgt = tgt.with_store(replace(tgt.store, max_shard_bytes=max_shard_size))
    plan = compile_plan(source, tgt, memory=memory_budget, workers=workers)
    plan.validate(plan.source_placement, plan.target_placement)
    if src_tag is None and tgt.store.format == "deepspeed":
        plan = replace(
            plan,
            warnings=(
                *plan.warnings,
                "the weights carry no run state: the checkpoint starts at step 0 with no lr "
                "scheduler state; an engine with an lr scheduler loads it with "
                "load_checkpoint(OUT, load_lr_scheduler_states=False)",
            ),
        )
    if on_plan is not None:
        on_plan(plan)
    return execute(
        plan,
        folder,
        output,
        tag=src_tag or tgt.store.tag or "global_step0",
        progress=progress,
        started=start,
        param_groups=param_groups,
    )


def is_deepspeed(path: str | Path) -> bool:
    """A DeepSpeed checkpoint root (``latest``) or tag folder (``*_model_states.pt``)."""
    p = Path(path)
    return p.is_dir() and ((p / "latest").is_file() or any(p.glob("*model_states.pt")))


def execute(
    plan: Plan,
    source: str | Path,
    output: str | Path,
    *,
    tag: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    started: float | None = None,
    param_groups: list[dict[str, Any]] | None = None,
) -> Report:
    """Run a compiled plan: read ``source`` (the folder holding the source's files, e.g. a
    DeepSpeed tag folder), write ``output`` atomically with its manifest. The plan must come
    from :func:`layoutc.compile` in this process (it carries the shard maps the output's
    files are created from); validate it first."""
    start = started if started is not None else time.perf_counter()
    if plan.target_placement is None:
        raise ValueError(
            "this plan has no shard maps (loaded from JSON?): compile it with layoutc.compile"
        )
    folder = Path(source)
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise OutputExists(f"{out}: exists and is not empty; choose a new output folder")
    partial = out.with_name(out.name + f".partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    files_in = SourceFiles(folder)
    try:
        prepared = prepare(
            plan.target_placement, partial, folder, tag or folder.name, param_groups=param_groups
        )
        total = sum(u.stats.write_bytes for u in plan.units) or 1  # progress: bytes written
        done = 0

        def on_unit(unit: Any) -> None:
            nonlocal done
            done += unit.stats.write_bytes
            if progress is not None:
                progress(done, total)

        spill = Spill(out.with_name(out.name + f".swap-{os.getpid()}"))
        try:
            memory.execute(plan, files_in, prepared.views, on_unit=on_unit, spill=spill)
        finally:
            swapped = spill.bytes_out + spill.bytes_in
            spill.close()
        crcs = prepared.finish()
        files = _commit(partial, out, prepared, plan, crcs)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        files_in.close()
    seconds = time.perf_counter() - start
    t = plan.totals
    return Report(
        out,
        files,
        t.read_bytes,
        t.write_bytes,
        seconds,
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        plan,
        plan.warnings,
        swapped,
    )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plan_digest(plan: Plan) -> str:
    return hashlib.sha256(plan.to_json(with_ops=False).encode()).hexdigest()


def _commit(
    partial: Path, out: Path, prepared: Any, plan: Plan, crcs: dict[Path, int]
) -> list[str]:
    from layoutc import __version__

    files = sorted(p for p in partial.rglob("*") if p.is_file())
    for p in files:
        _fsync(p)
    manifest = {
        "layoutc": __version__,
        "plan_sha256": plan_digest(plan),
        "source": plan.source.to_dict(),
        "target": plan.target.to_dict(),
        "files": {
            str(p.relative_to(partial)): {
                "bytes": p.stat().st_size,
                "crc32": f"{crcs[p] if p in crcs else file_crc(p):08x}",
            }
            for p in files
        },
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    _fsync(partial / MANIFEST)
    if out.exists():
        out.rmdir()  # empty, checked before
    partial.rename(out)
    for marker, text in prepared.markers.items():
        final = out / marker.relative_to(partial)
        tmp = final.with_name(final.name + ".tmp")
        tmp.write_text(text)
        _fsync(tmp)
        tmp.rename(final)
    return [str(p.relative_to(partial)) for p in files] + [
        str(m.relative_to(partial)) for m in prepared.markers
    ]


def verify(output: str | Path) -> list[str]:
    """Files of ``output`` whose size or CRC-32 differs from the manifest (or are missing)."""
    out = Path(output)
    manifest = json.loads((out / MANIFEST).read_text())
    bad = []
    for rel, entry in sorted(manifest["files"].items()):
        p = out / rel
        if not p.is_file():
            bad.append(f"{rel}: missing")
        elif p.stat().st_size != entry["bytes"]:
            bad.append(f"{rel}: {p.stat().st_size} bytes, the manifest says {entry['bytes']}")
        elif f"{file_crc(p):08x}" != entry["crc32"]:
            bad.append(f"{rel}: CRC-32 differs from the manifest")
    return bad
