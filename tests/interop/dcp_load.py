"""Load a DCP folder into a fresh FSDP2 job and dump what it holds (the other half of the DCP
oracle): the proof that a folder loads at any world size, whoever wrote it.

Run under torchrun with N ranks (any N; the folder may have been saved at another world)::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 3 --master_port 29612 \\
        tests/interop/dcp_load.py --case dcp_w2_untied --dcp CASE_ROOT/dcp \\
        --dump OUT.safetensors

It builds the case's model (dcp_make.CASES, ``model`` and ``frozen``; a "tiny" case: the
DeepSpeed corpus's TinyLM and its two param groups) from another seed (dcp_make.LOAD_SEED:
nothing matches by accident, buffers included), ``fully_shard``s it and builds AdamW as
dcp_make does, takes ``get_state_dict(model, opt)`` (torch initialises the optimizer's state
for it) as the template ``{"model", "optim", "train_state"}`` (``--no-train-state``: without
``train_state``, for a folder of model and optimizer alone), calls ``dcp.load(template,
checkpoint_id=DCP)`` with the default planner (strict: a key of the template missing from
the folder fails), then ``set_state_dict``. Rank 0 then writes ``OUT.safetensors`` in the
ground-truth naming of dcp_make (model/, exp_avg/, exp_avg_sq/, step/; every tensor gathered
from what the model and optimizer hold after ``set_state_dict``) and ``OUT.json`` with
``ok``, ``world``, ``param_groups`` (after the load), ``train_state`` (as loaded),
``model_keys``, ``tied``, ``frozen``, then, after one more training step, ``next_loss``.

A Hugging Face case (storage "hf") loads the model state dict alone through
``HuggingFaceStorageReader``; its dump has model/ tensors only.

If loading raises, rank 0 writes only ``OUT.json`` with ``ok`` false and ``error`` holding the
exception, and the run still exits 0, so callers can assert on refusals.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dcp_make  # after the sys.path insert above


def load_into(
    case: dict[str, Any], model, opt, folder: Path, with_train_state: bool = True
) -> dict[str, Any] | None:
    """Load ``folder`` into ``model`` and ``opt``; the train state as loaded (or None)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    if case["storage"] == "hf":
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        dcp.load(model_sd, storage_reader=HuggingFaceStorageReader(str(folder)))
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
        return None
    train_state: dict[str, Any] = {"step": -1, "note": ""}
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    if with_train_state:
        state["train_state"] = train_state
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return state.get("train_state")


def run(
    name: str, folder: Path, dump: Path, rank: int, world: int, with_train_state: bool = True
) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.api import CheckpointException

    case = dcp_make.CASES[name]
    model, opt = dcp_make.build(case, dcp_make.LOAD_SEED)
    try:
        train_state = load_into(case, model, opt, folder, with_train_state)
        error = None
    # dcp.load gathers every rank's failure into a CheckpointException, a BaseException.
    except (Exception, CheckpointException) as e:  # a refusal: reported, not raised
        error = f"{type(e).__name__}: {e}"
        if rank == 0:
            traceback.print_exc()
    failed = [error is not None]
    every: list[list[bool]] = [[] for _ in range(world)]
    dist.all_gather_object(every, failed)
    if any(f[0] for f in every):
        if rank == 0:
            dump.with_suffix(".json").write_text(
                json.dumps({"ok": False, "world": world, "error": error or "another rank"}) + "\n"
            )
        return
    tensors, meta = dcp_make.capture(model, opt)
    if case["storage"] == "hf":
        tensors = {k: v for k, v in tensors.items() if k.startswith("model/")}
    # Resuming means training on: one more step from the loaded state.
    step = int(train_state["step"]) if train_state else dcp_make.STEPS
    (next_loss,) = dcp_make.train(model, opt, case, rank, step, 1)
    if rank == 0:
        meta.update(
            {
                "ok": math.isfinite(next_loss),
                "case": name,
                "world": world,
                "folder": str(folder),
                "train_state": dcp_make.jsonable(train_state),
                "next_loss": next_loss,
            }
        )
        dcp_make.write_truth(tensors, meta, dump)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--case", required=True, choices=sorted(dcp_make.CASES))
    ap.add_argument("--dcp", required=True, type=Path, help="the DCP folder (holds .metadata)")
    ap.add_argument("--dump", required=True, type=Path, help="OUT.safetensors (+ OUT.json)")
    ap.add_argument(
        "--no-train-state",
        action="store_true",
        help="the template has no train_state (a folder of model and optim alone)",
    )
    args = ap.parse_args(argv)
    rank, world = dcp_make.init_dist()
    import torch.distributed as dist

    def work() -> None:
        run(args.case, args.dcp, args.dump, rank, world, not args.no_train_state)
        dist.barrier()
        dist.destroy_process_group()

    dcp_make.exit_process(work)


if __name__ == "__main__":
    main()
