"""A PyTorch distributed checkpoint (DCP) as a conversion source: open, infer, check.

:class:`DcpCheckpoint` opens a folder written by ``torch.distributed.checkpoint``: its
``.metadata`` read without running its pickle (:mod:`layoutc.formats.dcp_metadata`), every
item's bytes checked to lie inside its ``.distcp`` file and apart from every other item's,
and each tensor item — a ``torch.save`` container at an offset of its file — read through
layoutc's restricted loader when a run needs it. Byte items (non-tensor state: a step
count, an lr scheduler, a dataloader) are carried as bytes, never unpickled.

:func:`infer_text` writes the layout the chunks prove: the model's tensors under their
names (the state dict's key prefix, ``model.`` by default, in the store), the optimizer's
states per trainable tensor, and FSDP2's ``zero 3 over dp`` when tensors are cut along dim
0 in ``torch.chunk`` pieces. :func:`check` compares a layout's shard map with the metadata
before a byte is read.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from layoutc import ir
from layoutc.errors import Diagnostic, InputError, LayoutError, Span, Unsupported
from layoutc.formats import dcp_metadata as dm
from layoutc.formats import pt
from layoutc.formats import safetensors_header as st
from layoutc.formats.checkpoint import Checkpoint, layout_name, layout_tensor_name
from layoutc.place.base import Placement
from layoutc.place.dcp import DcpPlacement, item_key, parse_item_key
from layoutc.place.shards import STEP

_STATE = re.compile(r"^(?P<prefix>(?:.*\.)?)state\.(?P<fqn>.+)\.(?P<state>[A-Za-z_][A-Za-z0-9_]*)$")
ADAM_STATES = ("exp_avg", "exp_avg_sq")


class NotDcp(InputError):
    """The folder is not a distributed checkpoint layoutc can read."""


def is_dcp(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (
        (p / dm.METADATA).is_file()
        or bool(dm.per_rank_files(p))
        or any(p.glob("*.distcp"))
        or dm.is_hf(p)
    )


@dataclass(frozen=True)
class Keys:
    """How the saved keys divide: the model's tensors (name -> key), each trainable one's
    optimizer states, and what is neither (carried as it is to a DCP output)."""

    model_prefix: str
    optimizer_prefix: str
    model: dict[str, str]  # tensor name -> key
    states: dict[str, tuple[str, ...]]  # tensor name -> its optimizer states, as saved
    other_tensors: tuple[str, ...]
    byte_items: tuple[str, ...]


class DcpCheckpoint(Checkpoint):
    format = "dcp"

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        if not folder.is_dir():
            raise NotDcp(f"{folder}: no such directory")
        try:
            self.metadata, self.metadata_files = dm.read(folder)
        except dm.BadMetadata as e:
            raise NotDcp(str(e)) from None
        # the Hugging Face layout: each item raw tensor bytes of a safetensors file
        self.hf = not self.metadata_files
        self.where = folder / (
            self.metadata_files[0]
            if self.metadata_files
            else min(i.file for i in self.metadata.items.values())
        )
        self._check_items()

    def _check_items(self) -> None:
        """Every item lies inside its file, a plain file of the folder, apart from the
        others or on the very same bytes (a tied alias, saved once): a truncated or crafted
        file is refused naming the file and the item."""
        spans: dict[str, list[tuple[int, int, str]]] = {}
        sizes: dict[str, int] = {}
        for (key, offsets), item in self.metadata.items.items():
            problem = ir.check_tag(item.file)
            if problem:
                raise NotDcp(
                    f"{self.where}: {key} is stored in {item.file[:80]!r}, which "
                    f"{problem}; a checkpoint's files lie in its folder"
                )
            if item.file not in sizes:
                path = self.folder / item.file
                if not path.is_file():
                    raise NotDcp(f"{path}: missing; the metadata stores {key} there")
                sizes[item.file] = os.path.getsize(path)
            end = item.offset + item.length
            if end > sizes[item.file]:
                raise NotDcp(
                    f"{self.folder / item.file}: {sizes[item.file]} bytes, but the metadata "
                    f"stores {_what(key, offsets)} at bytes {item.offset} to {end}: the file "
                    "is truncated"
                )
            spans.setdefault(item.file, []).append((item.offset, end, key))
        for file, s in spans.items():
            s.sort()
            for (a_at, a_end, a), (b_at, b_end, b) in itertools.pairwise(s):
                if b_at < a_end and (a_at, a_end) != (b_at, b_end):
                    raise NotDcp(
                        f"{self.folder / file}: the items of {a} and {b} overlap: the metadata "
                        "is crafted or damaged"
                    )

    # -------------------------------------------------------------- items

    def tensor_item(self, key: str, offsets: tuple[int, ...]) -> pt.TensorRef:
        """The saved chunk of ``key`` at ``offsets``, as a reference (no data read),
        checked to be the chunk the metadata describes."""
        item = self.metadata.item(key, offsets)
        path = self.folder / item.file
        ref = pt.load(path, self.opener, (item.offset, item.length))
        entry = self.metadata.tensors[key]
        sizes = next(c.sizes for c in entry.chunks if c.offsets == offsets)
        where = (
            f"{path}: {_what(key, offsets)} (bytes {item.offset} to {item.offset + item.length})"
        )
        if not isinstance(ref, pt.TensorRef):
            raise NotDcp(f"{where} holds a {type(ref).__name__}, not a tensor")
        if tuple(ref.shape) != tuple(sizes) or ref.dtype != entry.dtype:
            raise NotDcp(
                f"{where} is {ref.dtype} {list(ref.shape)}; the metadata says {entry.dtype} "
                f"{list(sizes)}"
            )
        return ref

    def ref(self, file: str, name: str) -> pt.TensorRef:
        """The stored buffer ``name`` (a :func:`~layoutc.place.dcp.item_key`) of ``file``."""
        key, offsets = parse_item_key(name)
        item = self.metadata.items.get((key, offsets))
        if item is None or item.file != file:
            raise KeyError(name)
        return self.tensor_item(key, offsets)

    def value(self, key: str) -> Any:
        """A byte item's value, read as data through layoutc's restricted loader (numbers,
        strings, lists, tuples, dicts): a global in it is refused, never called."""
        item = self.metadata.item(key, None)
        return pt.load(self.folder / item.file, self.opener, (item.offset, item.length))

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's param groups as saved (``<optimizer prefix>param_groups.<i>.
        <field>``), in order: hyperparameters and ``params``, the parameter names."""
        prefix = self.keys.optimizer_prefix + "param_groups."
        groups: dict[int, dict[str, Any]] = {}
        for key in self.metadata.byte_items:
            if not key.startswith(prefix):
                continue
            index, _, name = key[len(prefix) :].partition(".")
            if index.isdigit() and name:
                groups.setdefault(int(index), {})[name] = self.value(key)
        return [groups[i] for i in sorted(groups)]

    def member(self, path: str, name: str) -> pt.Member:
        """A member of the container at byte ``START`` of a ``.distcp`` file (named
        ``@START/...``): found through that item, wherever another process opened it."""
        found = self.opener.members(path).get(name)
        if found is None and name.startswith("@"):
            start = int(name[1:].split("/", 1)[0])
            file = str(Path(path).relative_to(self.folder))
            for item in self.metadata.items.values():
                if item.file == file and item.offset == start:
                    return self.opener.window(path, start, item.length)[name]
        if found is None:
            raise KeyError(name)
        return found

    def header(self, file: str | Path) -> tuple[dict[str, st.Entry], dict[str, str]]:
        """A safetensors file of the Hugging Face layout, its entries named as stored
        buffers (:func:`~layoutc.place.dcp.item_key`), so a run reads each in place."""
        entries, meta = super().header(file)
        if not self.hf:
            return entries, meta
        named = {}
        for (key, offsets), item in self.metadata.items.items():
            if item.file == str(file) and offsets is not None and key in entries:
                named[item_key(key, offsets)] = entries[key]
        return named, meta

    def item_bytes(self, key: str) -> bytes:
        """A byte item's bytes, as saved (never unpickled)."""
        item = self.metadata.item(key, None)
        with open(self.folder / item.file, "rb") as f:
            f.seek(item.offset)
            return f.read(item.length)

    # -------------------------------------------------------------- files

    @cached_property
    def index(self) -> dict[tuple[str, tuple[int, ...]], str]:
        """(key, chunk offsets) -> the file holding that chunk."""
        return {
            (key, offsets): i.file
            for (key, offsets), i in self.metadata.items.items()
            if offsets is not None
        }

    def data_files(self) -> list[str]:
        return sorted({i.file for i in self.metadata.items.values()} | set(self.metadata_files))

    def state_files(self) -> list[str]:
        found = {p.name for p in self.folder.glob("*.distcp") if p.is_file()}
        found |= {i.file for i in self.metadata.items.values()}
        return sorted(found | set(self.metadata_files))

    def read(self) -> set[str]:
        return set(self.data_files())

    def _digest(self, path: Path) -> str:
        h = hashlib.sha256()
        if path.name in self.metadata_files:
            h.update(path.read_bytes())
        else:
            for (key, offsets), item in sorted(
                self.metadata.items.items(), key=lambda kv: (kv[1].file, kv[1].offset)
            ):
                if self.folder / item.file == path:
                    h.update(repr((key, offsets, item.offset, item.length)).encode())
        return h.hexdigest()

    # -------------------------------------------------------------- what the keys are

    @cached_property
    def keys(self) -> Keys:
        return divide_keys(self.metadata)


def _what(key: str, offsets: tuple[int, ...] | None) -> str:
    return key if not offsets else f"the chunk of {key} at offsets {list(offsets)}"


def divide_keys(md: dm.Metadata) -> Keys:
    """Which saved tensors are the model's and which its optimizer's (``<prefix>state.
    <name>.<state>`` for a model tensor ``<model prefix><name>``); see :class:`Keys`."""
    found: dict[str, list[tuple[str, str]]] = {}  # optimizer prefix -> [(fqn, state)]
    for key in md.tensors:
        m = _STATE.match(key)
        if m:
            found.setdefault(m["prefix"], []).append((m["fqn"], m["state"]))
    best: tuple[int, str, str] | None = None
    for oprefix, pairs in found.items():
        fqns = {f for f, _ in pairs}
        votes: Counter[str] = Counter()
        for key in md.tensors:
            if key.startswith(oprefix + "state."):
                continue
            for f in fqns:
                if key.endswith(f) and (len(key) == len(f) or key[-len(f) - 1] == "."):
                    votes[key[: len(key) - len(f)]] += 1
        if votes:
            mprefix, n = votes.most_common(1)[0]
            if best is None or n > best[0]:
                best = (n, oprefix, mprefix)
    if best is None:
        oprefix, mprefix = "optim.", _common_prefix(list(md.tensors))
    else:
        _, oprefix, mprefix = best
    model: dict[str, str] = {}
    states: dict[str, list[str]] = {}
    other: list[str] = []
    for key in md.tensors:
        m = _STATE.match(key)
        if m and m["prefix"] == oprefix and mprefix + m["fqn"] in md.tensors:
            states.setdefault(m["fqn"], []).append(m["state"])
        elif key.startswith(mprefix) and not key.startswith(oprefix + "state."):
            model[key[len(mprefix) :]] = key
        else:
            other.append(key)
    return Keys(
        mprefix,
        oprefix,
        model,
        {k: tuple(v) for k, v in states.items()},
        tuple(other),
        tuple(md.byte_items),
    )


def _common_prefix(keys: list[str]) -> str:
    """``model.`` when every key starts with it (a model saved under one name), else none."""
    firsts = {k.split(".", 1)[0] for k in keys if "." in k}
    if len(firsts) == 1 and all("." in k for k in keys):
        return firsts.pop() + "."
    return ""


# ------------------------------------------------------------------ infer


def infer_text(ckpt: DcpCheckpoint, name: str | None = None) -> str:
    """The ``.layout`` text the checkpoint's chunks prove (see the module docstring)."""
    md, keys = ckpt.metadata, ckpt.keys
    world = _world(ckpt)
    dp, tp, tp_dims = _mesh(ckpt, world)
    lines = [
        f"# Inferred from the PyTorch distributed checkpoint {ckpt.folder} "
        f"({', '.join(ckpt.metadata_files) or 'Hugging Face safetensors'}"
        + (f", DCP {md.version}" if md.version else "")
        + ").",
        f"layout {layout_name(name or ckpt.folder.name, 'dcp')}",
        f"mesh {{ dp = {dp}, tp = {tp} }}" if tp > 1 else f"mesh {{ dp = {world} }}",
    ]
    trainable = [n for n in keys.model if n in keys.states]
    weight_dtypes = Counter(md.tensors[keys.model[n]].dtype for n in keys.model)
    dtype = weight_dtypes.most_common(1)[0][0] if weight_dtypes else "fp32"
    lines.append(f"dtype {dtype}")
    if trainable:
        lines.append(_optimizer_line(ckpt, trainable))
    if dp > 1 or (world > 1 and tp == 1):
        lines.append("zero 3 over dp  # FSDP2: each tensor's dim 0 in torch.chunk pieces over dp")

    def line(n: str) -> str:
        layout_tensor_name(n, ckpt.where)
        t = md.tensors[keys.model[n]]
        kind = "tensor" if n in keys.states else _untrained_kind(t, world)
        own = f" {t.dtype}" if t.dtype != dtype else ""
        comment = ""
        if kind == "frozen" and trainable:
            comment = "  # no optimizer state: frozen, or tied to another parameter"
        split = tp_dims.get(keys.model[n])
        dims = [f"{d} / tp" if i == split else str(d) for i, d in enumerate(t.shape)]
        return f"{kind} {n} [{', '.join(dims)}]{own}{comment}"

    groups = _groups(ckpt, trainable)
    lines += [line(n) for n in groups[0]]
    for i, members in enumerate(groups[1:], 1):
        lines.append(f"group group{i} {{  # param group {i}, as saved")
        lines += [f"  {line(n)}" for n in members]
        lines.append("}")
    ties = _ties(ckpt)
    lines += [line(n) for n in keys.model if n not in keys.states and n not in ties]
    lines += [f"tie {alias} = {source}" for alias, source in ties.items()]
    opts = []
    if keys.model_prefix != ir.Store.model_prefix:
        opts.append(f'model "{keys.model_prefix}"')
    if trainable and keys.optimizer_prefix != ir.Store.optimizer_prefix:
        opts.append(f'optimizer "{keys.optimizer_prefix}"')
    lines.append("store dcp" + (f" {{ {', '.join(opts)} }}" if opts else ""))
    return "\n".join(lines) + "\n"


def _ties(ckpt: DcpCheckpoint) -> dict[str, str]:
    """Model tensors saved once under two keys — every chunk of the alias is the very same
    bytes as the same chunk of a trainable tensor — as {alias: tensor} (layoutc writes a tie
    so; torch saves each key's bytes apart, which the metadata cannot tell from a copy)."""
    md, keys = ckpt.metadata, ckpt.keys
    by_items: dict[tuple[object, ...], str] = {}
    for n in keys.model:
        if n in keys.states:
            by_items.setdefault(_spans(md, keys.model[n]), n)
    out = {}
    for n in keys.model:
        if n not in keys.states:
            source = by_items.get(_spans(md, keys.model[n]))
            if source is not None:
                out[n] = source
    return out


def _spans(md: dm.Metadata, key: str) -> tuple[object, ...]:
    t = md.tensors[key]
    return (t.dtype, t.shape, *((c.offsets, md.items.get((key, c.offsets))) for c in t.chunks))


def _groups(ckpt: DcpCheckpoint, trainable: list[str]) -> list[list[str]]:
    """The trainable tensors by optimizer param group, in each group's order as saved (its
    ``params``); one group in saved order when the checkpoint does not say. The groups are
    read as data: a global in one is refused (:class:`~layoutc.formats.pt.UnsafePickle`)."""
    saved = [g.get("params") for g in ckpt.param_groups()]
    lists = [[str(n) for n in g] for g in saved if isinstance(g, list)]
    if len(saved) < 2 or len(lists) != len(saved):
        return [trainable]
    if sorted(n for g in lists for n in g) != sorted(trainable):
        return [trainable]
    return lists


def _world(ckpt: DcpCheckpoint) -> int:
    """The FSDP world the chunks prove: the most pieces any tensor is cut in along dim 0
    (1 when no tensor is cut)."""
    return max((len(t.chunks) for t in ckpt.metadata.tensors.values()), default=1)


def _mesh(ckpt: DcpCheckpoint, world: int) -> tuple[int, int, dict[str, int]]:
    """(dp, tp, {model key: the dim split over tp}): FSDP alone over the world when that
    explains every cut, else the smallest tensor-parallel size for which every model
    tensor's saved chunks are exactly its cut — FSDP2's ``torch.chunk``
    pieces of dim 0 over dp, of the whole tensor or of each of its tp slices along one
    dim (2-D FSDP x TP). (world, 1, {}) when none is: the chunks are then checked against
    the 1-D cut, and a mismatch is named."""
    md, keys = ckpt.metadata, ckpt.keys
    saved = {
        key: sorted((c.offsets, c.sizes) for c in md.tensors[key].chunks if c.numel)
        for key in keys.model.values()
    }
    if all(len(c) <= 1 or _cut(md.tensors[k].shape, world, 1, None) == c for k, c in saved.items()):
        return world, 1, {}  # FSDP alone explains every cut: the simplest reading
    for tp in range(2, world + 1):
        if world % tp:
            continue
        dp, dims = world // tp, {}
        for key, chunks in saved.items():
            shape = md.tensors[key].shape
            fits = [
                d
                for d in (None, *range(len(shape)))
                if len(chunks) > 1 and _cut(shape, dp, tp, d) == chunks
            ]
            if len(chunks) <= 1 or None in fits:
                continue
            if not fits:
                break
            dims[key] = fits[0]
        else:
            if dims:
                return dp, tp, dims
    return world, 1, {}


def _cut(
    shape: tuple[int, ...], dp: int, tp: int, d: int | None
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The non-empty chunks of a tensor cut over tp along dim ``d`` (evenly; None: not),
    each tp slice's dim 0 then in ``torch.chunk`` pieces over dp."""
    if d is not None and shape[d] % tp:
        return []
    out = []
    for j in range(tp if d is not None else 1):
        lo = [0] * len(shape)
        size = list(shape)
        if d is not None:
            size[d] = shape[d] // tp
            lo[d] = j * size[d]
        each = -(-size[0] // dp)
        for p in range(dp):
            a, b = min(p * each, size[0]), min((p + 1) * each, size[0])
            if b > a:
                out.append(((lo[0] + a, *lo[1:]), (b - a, *size[1:])))
    return sorted(out)


def _untrained_kind(t: dm.TensorEntry, world: int) -> str:
    """A model tensor without optimizer state: a buffer when saved whole in one chunk (FSDP2
    leaves buffers unsharded), else a frozen parameter — FSDP2 saves a parameter in one
    chunk per rank, an empty one for a rank whose ``torch.chunk`` piece is empty."""
    if world > 1 and len(t.chunks) == 1 and t.shape:
        return "buffer"
    return "frozen"


def _optimizer_line(ckpt: DcpCheckpoint, trainable: list[str]) -> str:
    keys = ckpt.keys
    sets = {keys.states[n] for n in trainable}
    if len(sets) > 1:
        a, b = sorted(sets)[:2]
        raise Unsupported(
            f"{ckpt.where}: trainable tensors keep different optimizer states "
            f"({', '.join(a)} and {', '.join(b)}); a layout declares one optimizer"
        )
    states = [s for s in sets.pop() if s != STEP]
    step = STEP in keys.states[trainable[0]]
    name = "adamw" if tuple(states) == ADAM_STATES else "custom"
    listed = f"({', '.join(states)})" if len(states) != 1 else states[0]
    return f"optimizer {name} {{ master none, states {listed}{', step' if step else ', no_step'} }}"


# ------------------------------------------------------------------ check


def check(placement: DcpPlacement, ckpt: DcpCheckpoint) -> None:
    """Raise LayoutError unless the metadata holds every chunk the layout cuts, with its
    dtype and size, and every tensor it saves is the layout's or carried."""
    md = ckpt.metadata
    src = Span(placement.layout.source, 0, 0)
    diags: list[Diagnostic] = []
    meta = ckpt.where
    for t in placement.tensors:
        for s in placement.states(t):
            key = placement.key(t, s)
            entry = md.tensors.get(key)
            if entry is None:
                diags.append(
                    Diagnostic(
                        "E302", f"{meta}: no {key}, which the layout stores ({t.name}, {s})", src
                    )
                )
                continue
            shape = () if s == STEP else t.shape
            if entry.shape != shape:
                diags.append(
                    Diagnostic(
                        "E303",
                        f"{meta}: {key} has shape {list(entry.shape)}; the layout says {list(shape)}",
                        src,
                    )
                )
                continue
            if entry.dtype != placement.dtype(t, s):
                diags.append(
                    Diagnostic(
                        "E304",
                        f"{meta}: {key} is {entry.dtype}; the layout says {placement.dtype(t, s)}",
                        src,
                    )
                )
            want = sorted(
                (offsets, (b - a, *sl.shape[1:]) if sl.shape else ())
                for sl in placement.slices(t, s)
                for a, b, offsets, _ in placement.chunks(t, s, sl)
            )
            have = sorted((c.offsets, c.sizes) for c in entry.chunks if c.numel or not c.sizes)
            if want != have:
                diags.append(
                    Diagnostic(
                        "E303",
                        f"{meta}: {key} is saved in {len(have)} chunk(s) "
                        f"{_chunks(have)}; the layout cuts it in {len(want)} {_chunks(want)}",
                        src,
                        "infer the layout (layoutc infer CKPT) to see how the checkpoint cuts it",
                    )
                )
        if len(diags) >= 50:
            break
    if diags:
        raise LayoutError(diags)


def _chunks(pieces: list[tuple[tuple[int, ...], tuple[int, ...]]], shown: int = 4) -> str:
    text = ", ".join(f"{list(s)} at {list(o)}" for o, s in pieces[:shown])
    return f"({text}{', ...' if len(pieces) > shown else ''})"


def carried(placement: Placement, ckpt: DcpCheckpoint) -> tuple[list[str], list[str]]:
    """The saved tensors and byte items the layout does not place: what a DCP output
    carries as it is, and any other output leaves behind."""
    if not isinstance(placement, DcpPlacement):
        raise TypeError(f"the layout of a DCP checkpoint is placed as dcp, not {placement.format}")
    placed = {placement.key(t, s) for t in placement.tensors for s in placement.states(t)}
    placed |= {placement.weight_key(alias) for alias, _ in placement.layout.ties}
    tensors = [k for k in ckpt.metadata.tensors if k not in placed]
    return tensors, list(ckpt.metadata.byte_items)


def open_dcp(path: str | Path, tag: str | None = None) -> DcpCheckpoint:
    return DcpCheckpoint(Path(path))


__all__ = [
    "DcpCheckpoint",
    "Keys",
    "NotDcp",
    "carried",
    "check",
    "infer_text",
    "is_dcp",
    "open_dcp",
]
