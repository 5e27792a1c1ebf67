"""Make real PyTorch Distributed Checkpoints (DCP) written by FSDP2, with the ground truth they
must hold (the test oracle for layoutc's DCP reader and writer).

Run under torchrun, one process per rank, on CPU with gloo::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 --master_port 29611 \\
        tests/interop/dcp_make.py --case dcp_w2_untied --out /tmp/ckpt/dcp_w2_untied

``--case`` takes one name or several, comma separated, all of one world size; with several,
each case gets ``--out/<case>``. A case's root holds, when complete::

    dcp/                        THE DCP CHECKPOINT ITSELF: what ``dcp.save`` wrote (``.metadata``
                                and ``__<rank>_<n>.distcp``; the Hugging Face case: safetensors)
    ground_truth.safetensors    name -> tensor, full (gathered), in its own dtype (keys below)
    ground_truth.json           the case, world, param groups, the ``.metadata`` summary, ...
    DONE                        written last, by rank 0

Without torchrun, ``dcp_make.py --to-torch-save DCP_DIR --dump OUT.safetensors`` runs torch's
own ``format_utils.dcp_to_torch_save`` on DCP_DIR and writes what it produced under the
ground-truth naming (OUT.json: param groups, train state, the top-level structure): the
baseline the ground truth is checked against, and the way a planted ``.metadata`` payload is
shown to run inside torch.

The model of a "llama" case is ``transformers.LlamaForCausalLM(LlamaConfig(**case["model"]))``
built after ``torch.manual_seed(SEED)`` (no download), ``fully_shard`` on each decoder layer
and on the root over a 1-D CPU mesh of all ranks (FSDP2 shards dim 0 with ``torch.chunk``
semantics: sizes are uneven, a last shard may be smaller or empty), trained ``STEPS`` AdamW
steps on random tokens, then saved as::

    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd, "train_state": {"step": 2, "note": "x"}},
             storage_writer=FileSystemWriter(dcp_dir, thread_count=2))

(the Hugging Face case saves ``model_sd`` alone through ``HuggingFaceStorageWriter``).

A "tiny" case holds the DeepSpeed corpus's model, ``ds_make.make_model(**case["model"])``
(TinyLM: embed.weight and head.weight tied, a frozen ``logit_bias``, persistent buffers
``counter`` and ``table``, a non-persistent ``scratch``, a ``scale`` of shape (1,)), with
``fully_shard`` on the root alone (the tie stays one parameter) and the DeepSpeed corpus's
optimizer: ``AdamW(ds_make.param_groups(model), **TINY_ADAMW)``, two groups (decay with
weight_decay 0.1, then no_decay with 0.0); its loss is the cross-entropy of the logits against
random targets. So a DeepSpeed checkpoint and a DCP one hold the same names, shapes and
groups, the oracle for converting one into the other. Buffers are plain tensors, the same on
every rank: ``dcp.save`` writes each once, one chunk of the whole.

Ground-truth tensor keys (every DTensor gathered with ``full_tensor()`` at save time)::

    model/<key>         every key of get_state_dict's model state dict (tied aliases
                        included, frozen parameters and persistent buffers included)
    exp_avg/<fqn>       AdamW first moment, per key of get_state_dict's optimizer ``state``
    exp_avg_sq/<fqn>    AdamW second moment
    step/<fqn>          AdamW's step as saved: a 0-dim float32 tensor

``ground_truth.json``: ``case``, ``case_config``, ``world``, ``param_groups`` (as
get_state_dict returns them, ``params`` being fqns; tuples become lists), ``train_state``,
``frozen``, ``tied`` ({alias: the key it shares storage with}), ``buffers`` (the persistent
buffers among the model keys), ``adamw``, ``losses``, ``versions`` and
``metadata``: a summary of the ``.metadata`` torch wrote (see :func:`metadata_summary`), whose
``keys`` map every flattened key to its global size, dtype and chunks (offsets, sizes, and
the file, offset and length of its bytes) or to ``{"kind": "bytes", ...}``; and ``files``
(name -> size) of the DCP folder.

This file imports torch and transformers only inside functions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ds_make  # after the sys.path insert above; imports no torch at module level

# The DeepSpeed corpus's helpers serve this corpus too (dcp_load.py calls them through here):
# param groups and metadata made JSON-able, the ground truth written atomically, and a
# torchrun worker's exit through os._exit.
jsonable = ds_make._jsonable
write_truth = ds_make.write_truth
exit_process = ds_make.exit_process

SEED = 1234
LOAD_SEED = 98765  # a fresh model for loading: nothing matches the checkpoint by accident
STEPS = 2
BATCH = 2
SEQ = 6
ADAMW: dict[str, Any] = {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.01}
# The DeepSpeed corpus's optimizer (ds_make.build_engine); weight decay comes per group.
TINY_ADAMW: dict[str, Any] = {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8}
TRAIN_STATE: dict[str, Any] = {"step": 2, "note": "x"}
DCP_DIR = "dcp"
THREADS = 2  # FileSystemWriter(thread_count=...): several files per rank
KINDS = ("exp_avg", "exp_avg_sq", "step")

# GQA (4 query heads, 2 key/value heads of 16), dim-0 sizes uneven at world 2 and 3:
# vocab 101 -> 51+50 / 34+34+33, intermediate 91 -> 46+45 / 31+31+29, k/v 32 -> 11+11+10.
LLAMA: dict[str, Any] = {
    "vocab_size": 101,
    "hidden_size": 64,
    "intermediate_size": 91,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 32,
    "tie_word_embeddings": False,
}
# Dim 0 smaller than world 3: k/v_proj [2, 8] and mlp [2, 8] shard 1+1+0, q_proj [4, 8] 2+2+0,
# vocab 5 -> 2+2+1: the last rank holds empty shards.
TINY: dict[str, Any] = {
    "vocab_size": 5,
    "hidden_size": 8,
    "intermediate_size": 2,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 2,
    "max_position_embeddings": 32,
    "tie_word_embeddings": False,
}

# --------------------------------------------------------------------------------------------
# Cases
#   world     ranks the checkpoint is saved at
#   kind      "llama" (transformers' Llama) | "tiny" (the DeepSpeed corpus's TinyLM)
#   model     LlamaConfig keyword arguments | ds_make.make_model keyword arguments
#   frozen    parameter names set requires_grad=False (no optimizer state)
#   storage   "fs" (FileSystemWriter, model + optim + train_state) | "hf" (the Hugging Face
#             storage writer, model only)
# --------------------------------------------------------------------------------------------


def _case(world: int, model: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {
        "world": world,
        "kind": "llama",
        "model": dict(model),
        "frozen": [],
        "storage": "fs",
        **kw,
    }


CASES: dict[str, dict[str, Any]] = {
    "dcp_w2_untied": _case(2, LLAMA),
    "dcp_w3_tied": _case(
        3,
        {**LLAMA, "tie_word_embeddings": True},
        frozen=["model.layers.0.input_layernorm.weight"],
    ),
    "dcp_w3_empty": _case(3, TINY),
    "dcp_hf_w2": _case(2, LLAMA, storage="hf"),
    # TinyLM at the DeepSpeed corpus's dims: scale (1,) shards 1+0, an empty shard on rank 1.
    "dcp_tiny_w2": _case(2, ds_make.DEFAULT_MODEL, kind="tiny", frozen=["logit_bias"]),
}


# --------------------------------------------------------------------------------------------
# Model, optimizer, training
# --------------------------------------------------------------------------------------------


def build(case: dict[str, Any], seed: int):
    """(model, optimizer) for ``case`` at the current world size, FSDP2-sharded."""
    if case["kind"] == "tiny":
        return build_tiny(case, seed)
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**case["model"]))
    params = dict(model.named_parameters())
    for name in case["frozen"]:
        params[name].requires_grad_(False)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **ADAMW)
    return model, opt


def build_tiny(case: dict[str, Any], seed: int):
    """(model, optimizer) of a "tiny" case: ds_make's TinyLM (which seeds itself with
    ds_make.SEED) with every parameter and persistent buffer redrawn from ``seed`` unless
    that is ds_make.SEED, ``fully_shard`` on the root, AdamW over ds_make's two groups."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = ds_make.make_model(**case["model"])
    if seed != ds_make.SEED:
        torch.manual_seed(seed)
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                t.copy_(torch.randn_like(t))
    params = dict(model.named_parameters())
    for name in case["frozen"]:
        params[name].requires_grad_(False)
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    opt = torch.optim.AdamW(ds_make.param_groups(model), **TINY_ADAMW)
    return model, opt


def train(model, opt, case: dict[str, Any], rank: int, start: int, steps: int) -> list[float]:
    """``steps`` AdamW steps on tokens drawn from (step, rank); the mean loss of each."""
    import torch
    import torch.distributed as dist

    tiny = case["kind"] == "tiny"
    vocab = case["model"]["vocab" if tiny else "vocab_size"]
    losses = []
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + 97 * step + rank)
        tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
        if tiny:
            targets = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
            logits = model(tokens)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
        else:
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / dist.get_world_size())
    return losses


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------


def full(t: Any) -> Any:
    """A DTensor gathered (a collective: every rank calls it, in the same order), a plain
    tensor as it is; detached, cloned, on CPU."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu().clone()


def truth_tensors(model_sd: dict[str, Any], optim_sd: dict[str, Any] | None) -> dict[str, Any]:
    """The ground-truth naming of a (model, optimizer) state dict pair, tensors full."""
    out = {f"model/{k}": full(v) for k, v in model_sd.items()}
    for fqn, st in (optim_sd or {}).get("state", {}).items():
        for kind in KINDS:
            out[f"{kind}/{fqn}"] = full(st[kind])
    return out


def tied_names(model) -> dict[str, str]:
    """{state-dict name: the first name of the parameter it shares} for tied aliases."""
    first: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        seen = first.setdefault(id(p), name)
        if seen != name:
            tied[name] = seen
    return tied


def capture(model, opt) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, json-able meta) of what the model and optimizer hold now, as get_state_dict
    presents them."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    state = cast(dict[str, Any], optim_sd["state"])
    tensors = truth_tensors(model_sd, optim_sd)
    meta = {
        "param_groups": jsonable(optim_sd["param_groups"]),
        "model_keys": list(model_sd),
        "optim_state_keys": {k: sorted(v) for k, v in state.items()},
        "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
        "tied": tied_names(model),
        "buffers": [n for n, _ in model.named_buffers() if n in model_sd],
        "placements": {
            k: [str(p) for p in getattr(v, "placements", ())] for k, v in model_sd.items()
        },
    }
    return tensors, meta


def metadata_summary(dcp_dir: Path) -> dict[str, Any]:
    """What the pickled ``.metadata`` of ``dcp_dir`` says, as plain data: ``keys`` (flattened
    key -> {"kind": "tensor", "dtype", "size", "chunks": [{"offsets", "sizes", "file",
    "offset", "length"}]} or {"kind": "bytes", "file", "offset", "length"}), ``planner_data``
    (flattened key -> the path into the nested state dict), ``key_order`` (the keys as torch
    listed them), ``version``, ``storage_meta``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    md = FileSystemReader(str(dcp_dir)).read_metadata()
    storage = md.storage_data or {}

    def where(fqn: str, offset: Any, index: int | None) -> dict[str, Any]:
        info = storage.get(MetadataIndex(fqn, offset, index))
        if info is None:
            return {"file": None, "offset": None, "length": None}
        return {"file": str(info.relative_path), "offset": info.offset, "length": info.length}

    keys: dict[str, Any] = {}
    for fqn, item in md.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            chunks = [
                {
                    "offsets": list(c.offsets),
                    "sizes": list(c.sizes),
                    **where(fqn, c.offsets, i),
                }
                for i, c in enumerate(item.chunks)
            ]
            keys[fqn] = {
                "kind": "tensor",
                "dtype": str(item.properties.dtype).replace("torch.", ""),
                "size": list(item.size),
                "chunks": chunks,
            }
        else:
            keys[fqn] = {"kind": "bytes", **where(fqn, None, None)}
    return {
        "keys": keys,
        "key_order": list(md.state_dict_metadata),
        "planner_data": jsonable(md.planner_data),
        "version": getattr(md, "version", None),
        "storage_meta": repr(md.storage_meta),
        "storage_data_entries": len(storage),
    }


def hf_headers(dcp_dir: Path) -> dict[str, Any]:
    """{file: {"metadata": its ``__metadata__``, "tensors": {name: {dtype, shape}}}} of the
    safetensors files in ``dcp_dir`` (read from the header alone)."""
    out = {}
    for f in sorted(dcp_dir.rglob("*.safetensors")):
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        md = header.pop("__metadata__", None)
        out[str(f.relative_to(dcp_dir))] = {
            "metadata": md,
            "tensors": {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in header.items()},
        }
    return out


def files_of(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------------------------
# torch's own converter (no torchrun)
# --------------------------------------------------------------------------------------------


def to_torch_save(dcp_dir: Path, dump: Path) -> None:
    """``dcp_to_torch_save(dcp_dir)``, loaded back, written under the ground-truth naming."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix="dcp_to_torch-") as tmp:
        pt = Path(tmp) / "sd.pt"
        dcp_to_torch_save(dcp_dir, pt)
        sd = torch.load(pt, weights_only=False)
    optim = sd.get("optim")
    tensors = truth_tensors(sd["model"], optim)
    meta = {
        "top": sorted(sd),
        "param_groups": jsonable(optim["param_groups"]) if optim else None,
        "train_state": jsonable(sd.get("train_state")),
        "optim_state_keys": {k: sorted(v) for k, v in optim["state"].items()} if optim else {},
    }
    write_truth(tensors, meta, dump)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def init_dist() -> tuple[int, int]:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A short collective timeout: a rank that died leaves the others failing in minutes.
    dist.init_process_group("gloo", timeout=timedelta(minutes=3))
    return dist.get_rank(), dist.get_world_size()


def save(case: dict[str, Any], model_sd: dict[str, Any], optim_sd: dict[str, Any], path: Path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    if case["storage"] == "hf":
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        dcp.save(
            model_sd, storage_writer=HuggingFaceStorageWriter(str(path), save_distributed=True)
        )
        return
    state = {"model": model_sd, "optim": optim_sd, "train_state": dict(TRAIN_STATE)}
    dcp.save(state, storage_writer=FileSystemWriter(str(path), thread_count=THREADS))


def make_case(name: str, out: Path, rank: int, world: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict

    case = CASES[name]
    if case["world"] != world:
        raise SystemExit(f"case {name} wants world {case['world']}, torchrun gave {world}")
    t0 = time.time()
    if rank == 0:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
    dist.barrier()
    model, opt = build(case, SEED)
    losses = train(model, opt, case, rank, 0, STEPS)
    model_sd, optim_sd = get_state_dict(model, opt)
    save(case, model_sd, optim_sd, out / DCP_DIR)
    tensors, meta = capture(model, opt)
    if case["storage"] == "hf":
        tensors = {k: v for k, v in tensors.items() if k.startswith("model/")}
    dist.barrier()
    if rank == 0:
        import importlib.metadata as im

        dcp_dir = out / DCP_DIR
        meta.update(
            {
                "case": name,
                "case_config": case,
                "world": world,
                "train_state": dict(TRAIN_STATE) if case["storage"] == "fs" else None,
                "adamw": jsonable(TINY_ADAMW if case["kind"] == "tiny" else ADAMW),
                "losses": losses,
                "files": files_of(dcp_dir),
                "versions": {
                    "torch": torch.__version__,
                    "transformers": im.version("transformers"),
                },
            }
        )
        if case["storage"] == "hf":
            meta["hf_headers"] = hf_headers(dcp_dir)
            print(f"dcp_make: {name} files {json.dumps(meta['files'])}", flush=True)
            print(f"dcp_make: {name} headers {json.dumps(meta['hf_headers'])}", flush=True)
        else:
            meta["metadata"] = metadata_summary(dcp_dir)
            for key, item in meta["metadata"]["keys"].items():
                print(f"dcp_make: {name} .metadata {key} {json.dumps(item)}", flush=True)
            print(f"dcp_make: {name} files {json.dumps(meta['files'])}", flush=True)
        write_truth(tensors, meta, out / "ground_truth.safetensors")
        (out / "DONE").write_text(json.dumps({"case": name, "seconds": time.time() - t0}) + "\n")
    dist.barrier()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--case", help="case name(s), comma separated (under torchrun)")
    ap.add_argument("--out", type=Path, help="case root (under torchrun)")
    ap.add_argument("--to-torch-save", type=Path, help="a DCP folder (no torchrun)")
    ap.add_argument("--dump", type=Path, help="OUT.safetensors for --to-torch-save")
    args = ap.parse_args(argv)
    if args.to_torch_save is not None:
        if args.dump is None:
            raise SystemExit("--to-torch-save needs --dump")
        to_torch_save(args.to_torch_save, args.dump)
        return
    if not args.case or args.out is None:
        raise SystemExit("--case and --out are required under torchrun")
    names = [n for n in args.case.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {sorted(CASES)}")
    rank, world = init_dist()
    import torch.distributed as dist

    def work() -> None:
        for name in names:
            out = args.out if len(names) == 1 else args.out / name
            make_case(name, out, rank, world)
            if rank == 0:
                print(f"dcp_make: {name} -> {out}", flush=True)
        dist.barrier()
        dist.destroy_process_group()

    exit_process(work)


if __name__ == "__main__":
    main()
