"""Full model weights as a conversion source: safetensors, torch state dicts, HF folders.

:func:`open_weights` finds every tensor of a weights checkpoint — a ``.safetensors`` file,
a ``pytorch_model.bin`` / ``.pt`` state dict, or a Hugging Face folder with
``model.safetensors``, ``pytorch_model.bin`` or either's ``.index.json`` — without reading
tensor data: name, file, key, dtype and shape. Weights have no layout of their own to
infer; the layout of the model comes from ``--spec``, and :func:`check_weights` checks it
against the files (every tensor present, with the shape the layout declares) before a
byte is read. Dtypes may differ from the layout's: the plan casts.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from layoutc import ir
from layoutc.errors import Diagnostic, InputError, LayoutError
from layoutc.formats import pt
from layoutc.formats import safetensors_header as st
from layoutc.formats.checkpoint import Checkpoint, layout_name, layout_tensor_name


class NotWeights(InputError):
    """The path holds no weights layoutc can read."""


@dataclass(frozen=True)
class WeightEntry:
    file: str  # relative to the weights folder
    key: str  # "/"-joined key path in the file (the tensor name in safetensors)
    dtype: str
    shape: tuple[int, ...]


class Weights(Checkpoint):
    """Full weights: ``entries`` by tensor name, ``ties`` (alias -> source) stored once."""

    def __init__(self, folder: Path, format: str) -> None:
        super().__init__(folder)
        self.format = format  # "safetensors" | "torch"
        self.entries: dict[str, WeightEntry] = {}
        self.ties: dict[str, str] = {}

    @property
    def files(self) -> list[str]:
        return sorted({e.file for e in self.entries.values()})

    def data_files(self) -> list[str]:
        return self.files


def is_weights(path: str | Path) -> bool:
    p = Path(path)
    if p.is_file():
        return p.suffix in (".safetensors", ".bin", ".pt", ".pth")
    return any(
        (p / n).is_file()
        for n in (
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
        )
    )


def open_weights(path: str | Path) -> Weights:
    p = Path(path)
    if p.is_file():
        files = [p.name]
        folder = p.parent
        fmt = "safetensors" if p.suffix == ".safetensors" else "torch"
    elif p.is_dir():
        folder = p
        fmt, files = _folder_files(p)
    else:
        raise NotWeights(f"{p}: no such file or directory")
    w = Weights(folder, fmt)
    for f in files:
        if fmt == "safetensors":
            entries, metadata = w.header(f)
            for name, e in entries.items():
                w.entries[name] = WeightEntry(f, name, e.dtype, tuple(e.shape))
            if st.TIES_KEY in metadata:
                w.ties.update(_ties(folder / f, metadata[st.TIES_KEY]))
        else:
            _torch_entries(w, f)
    if p.is_dir():
        w.ties.update(_config_ties(p, w))
    for alias, source in w.ties.items():  # a tie stored once is found under both names
        if source in w.entries:
            w.entries.setdefault(alias, w.entries[source])
    return w


_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "shared.weight")


def _config_ties(folder: Path, w: Weights) -> dict[str, str]:
    """``lm_head.weight`` tied to the input embedding where a Hugging Face ``config.json``
    says the word embeddings are tied (``tie_word_embeddings``, true unless set false) and
    the files leave the head out, as ``save_pretrained`` does; the embedding is the one
    stored tensor named as one. Nothing where that is not certain."""
    config = folder / "config.json"
    if "lm_head.weight" in w.entries or not config.is_file():
        return {}
    try:
        tied = json.loads(config.read_text()).get("tie_word_embeddings", True)
    except (OSError, ValueError, AttributeError):
        return {}
    found = [n for n in w.entries if any(n == e or n.endswith("." + e) for e in _INPUT_EMBEDDINGS)]
    return {"lm_head.weight": found[0]} if tied is True and len(found) == 1 else {}


def _folder_files(p: Path) -> tuple[str, list[str]]:
    for fmt, single, index in (
        ("safetensors", "model.safetensors", "model.safetensors.index.json"),
        ("torch", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (p / index).is_file():
            return fmt, sorted(set(_weight_map(p / index).values()))
        if (p / single).is_file():
            return fmt, [single]
    raise NotWeights(
        f"{p}: no model.safetensors, pytorch_model.bin or index of either (a weights folder), "
        "and no `latest` or *_model_states.pt (a DeepSpeed checkpoint)"
    )


def _weight_map(index: Path) -> dict[str, str]:
    """An index's ``weight_map`` (tensor name -> shard file), each shard a plain file name
    in the index's folder: a path that leaves it (``../x``, ``/x``) is refused."""
    try:
        doc = json.loads(index.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NotWeights(f"{index}: not a JSON index ({e})") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise NotWeights(f"{index}: no `weight_map` object of tensor name -> file name")
    for name, file in weight_map.items():
        problem = ir.check_tag(file)
        if problem:
            raise NotWeights(
                f"{index}: the shard of {name[:80]} is {file[:80]!r}, which {problem}; "
                "shards are files beside the index"
            )
    return weight_map


def _ties(path: Path, text: str) -> dict[str, str]:
    """The ties a safetensors file records in its metadata (alias -> source)."""
    try:
        ties = json.loads(text)
    except json.JSONDecodeError as e:
        raise NotWeights(f"{path}: its {st.TIES_KEY} metadata is not JSON ({e})") from None
    if not isinstance(ties, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in ties.items()
    ):
        raise NotWeights(f"{path}: its {st.TIES_KEY} metadata is not an object of names")
    return ties


def _torch_entries(w: Weights, f: str) -> None:
    """A torch state dict: top-level tensors by name; the first name of a shared view is
    stored, later names of the same view become ties."""
    obj = w.load(f)
    if not isinstance(obj, dict):
        raise NotWeights(f"{w.folder / f}: not a state dict (a {type(obj).__name__})")
    seen: dict[tuple[object, ...], str] = {}
    for name, ref in obj.items():
        if not isinstance(ref, pt.TensorRef):
            continue
        view = (ref.storage.key, ref.offset, tuple(ref.shape), tuple(ref.stride))
        if view in seen:
            w.ties[str(name)] = seen[view]
            continue
        seen[view] = str(name)
        w.entries[str(name)] = WeightEntry(f, str(name), ref.dtype, tuple(ref.shape))


def check_weights(layout: ir.Layout, w: Weights) -> None:
    """Every tensor of ``layout`` is in the weights with its logical shape (ties may be
    stored once); raises LayoutError naming each file, tensor and both shapes."""
    diags: list[Diagnostic] = []
    for t in layout.tensors:
        if t.name in layout.tie_source:
            continue  # stored as its source
        e = w.entries.get(t.name)
        where = str(w.folder / e.file) if e else str(w.folder)
        if e is None:
            diags.append(
                Diagnostic(
                    "E302",
                    f"{where}: no tensor {t.name}, which the layout declares",
                    t.span,
                    f"the weights hold {len(w.entries)} tensors"
                    + (f", e.g. {next(iter(w.entries))}" if w.entries else ""),
                )
            )
        elif tuple(e.shape) != tuple(t.shape):
            diags.append(
                Diagnostic(
                    "E303",
                    f"{where}: {t.name} has shape {list(e.shape)}; the layout says {list(t.shape)}",
                    t.span,
                )
            )
    if diags:
        raise LayoutError(diags)


__all__ = ["NotWeights", "WeightEntry", "Weights", "check_weights", "is_weights", "open_weights"]


def infer_text(w: Weights) -> str:
    """A starting ``.layout`` for full weights: every stored tensor a trainable ``tensor``
    in its shape (its dtype where it is not the most common one), the ties the files
    record, one rank (``--set dp=N`` for a target), Adam with fp32 masters, ZeRO-2 over dp,
    stored as the files are. What weights cannot say (frozen tensors, buffers, param
    groups, tensor parallelism) is for the user to add."""
    where = w.folder / w.files[0] if len(w.files) == 1 else w.folder
    names = [n for n in w.entries if n not in w.ties]
    if not names:
        raise NotWeights(f"{where}: holds no tensors")
    for n in names:
        layout_tensor_name(n, where)
    dtypes = Counter(w.entries[n].dtype for n in names)
    dtype = dtypes.most_common(1)[0][0]
    lines = [
        f"# Inferred from the {w.format} weights {where} ({len(names)} tensors): a start.",
        "# Weights do not say which tensors are frozen or buffers, nor the topology: edit",
        "# them here, or set the mesh with --set dp=N.",
        f"layout {layout_name(w.folder.name, 'weights')}",
        "mesh { dp = 1 }",
        f"dtype {dtype}",
        "optimizer adam { master fp32, states (exp_avg, exp_avg_sq), step }",
        "zero 2 over dp",
    ]
    for n in names:
        e = w.entries[n]
        own = f" {e.dtype}" if e.dtype != dtype else ""
        lines.append(f"tensor {n} [{', '.join(map(str, e.shape))}]{own}")
    lines += [f"tie {alias} = {source}" for alias, source in sorted(w.ties.items())]
    lines.append(f"store {w.format}")
    return "\n".join(lines) + "\n"
