"""Load a checkpoint with real DeepSpeed and dump what it loaded (the other half of the oracle).

Run under torchrun with W ranks (W may differ from the world size the checkpoint was saved at
when ``--universal`` is given)::

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=/tmp/ext \\
        torchrun --nproc_per_node 3 --master_port 29512 tests/interop/ds_load.py \\
        --case z2_w2_bf16 --ckpt ROOT [--universal] [--tag TAG] --dump OUT.safetensors

It builds the case's model and DeepSpeed config (ds_make.ALL_CASES) at world size W, with
``"checkpoint": {"load_universal": true}`` under ``--universal``, calls
``engine.load_checkpoint(ROOT[, tag])`` and has rank 0 write ``OUT.safetensors`` and
``OUT.json`` in exactly the format of ds_make's ground truth: fp32/, exp_avg/, exp_avg_sq/,
weight16/, frozen/, buffer/ tensors and step, global_steps, lr scheduler state, ... (see
ds_make.capture). The json also holds ``load_path`` (what load_checkpoint returned) and
``client_state`` keys, then, after one more training step, ``next_loss`` and
``global_steps_after``. ``--layoutc`` first attaches layoutc (``layoutc.deepspeed.attach``),
whose ``engine.load_checkpoint`` reshards a checkpoint saved at another topology. If DeepSpeed raises while loading, rank 0 writes only ``OUT.json`` with
``"error"`` holding the exception text, and the run still exits 0 (torchrun turns any
non-zero worker exit into its own 1), so callers can assert on refusals.

A pipeline / tensor-parallel case (ds_make.PARALLEL_CASES) keeps its pp and tp: W = pp * tp *
dp picks the data-parallel size dp, and the dump holds full tensors as its ground truth does.

A Mixture-of-Experts case (ds_moe.CASES) is built at W ranks and ``--ep E`` (default: the
case's ep), so one checkpoint can be offered to another data- and expert-parallel topology;
the dump is in ds_moe's ground-truth format (experts under their global names). An AutoEP
case (ds_autoep.CASES) likewise, its dump in ds_autoep's format (both namings, experts full).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ds_autoep  # after the sys.path insert above
import ds_make
import ds_moe

CASES = {**ds_make.ALL_CASES, **ds_moe.CASES, **ds_autoep.CASES}
EP_KINDS = {"moe": ds_moe, "autoep": ds_autoep}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", required=True, choices=sorted(CASES))
    ap.add_argument("--ckpt", required=True, type=Path, help="checkpoint root (holds latest)")
    ap.add_argument("--universal", action="store_true", help="load_universal (latest_universal)")
    ap.add_argument("--tag", default=None)
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="a checkpoint without lr scheduler state: load_lr_scheduler_states=False",
    )
    ap.add_argument("--ep", type=int, default=None, help="expert-parallel size (MoE cases)")
    ap.add_argument(
        "--layoutc",
        action="store_true",
        help="attach layoutc.deepspeed first: load_checkpoint then takes any saved topology",
    )
    ap.add_argument("--scratch", default=None, help="with --layoutc: where a reshard is made")
    ap.add_argument("--dump", required=True, type=Path, help="OUT.safetensors (+ OUT.json)")
    return ap


def load_one(args: argparse.Namespace, rank: int, world: int, destroy: bool = False) -> None:
    """One load (every rank): build, load, capture, train a step, dump (rank 0)."""
    import torch.distributed as dist

    case = CASES[args.case]
    kind = ds_make
    if case.get("kind") in EP_KINDS:
        kind = EP_KINDS[case["kind"]]
        case = kind.at_topology(case, world, args.ep)
    elif args.ep is not None:
        raise SystemExit(f"--ep is for Mixture-of-Experts / AutoEP cases, not {args.case}")
    engine, cfg = kind.build_engine(case, world, universal=args.universal)
    error = None
    try:
        if args.layoutc:  # as a Trainer would: attach, then the engine's own call
            import layoutc.deepspeed

            layoutc.deepspeed.attach(engine)
        options = {"scratch": args.scratch} if args.scratch else {}
        load_path, client_state = engine.load_checkpoint(
            str(args.ckpt), tag=args.tag, load_lr_scheduler_states=not args.fresh, **options
        )
        if load_path is None:
            error = f"load_checkpoint found nothing to load in {args.ckpt}"
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    # Agree on failure across ranks before any collective in capture().
    import torch

    flag = torch.tensor([1 if error else 0])
    dist.all_reduce(flag)
    if flag.item():
        if rank == 0:
            args.dump.with_suffix(".json").write_text(
                json.dumps({"error": error or "failed on another rank", "case": args.case}) + "\n"
            )
    else:
        tensors, meta = kind.capture(engine, case)
        # then go on training: one more step must run on what was loaded
        next_loss = kind.train(engine, case, rank, steps=1)[0]
        if rank == 0:
            meta.update(
                {
                    "case": args.case,
                    "case_config": case,
                    "ds_config": cfg,
                    "world_size": world,
                    "universal": args.universal,
                    "load_path": load_path,
                    "client_state": sorted(client_state or {}),
                    "next_loss": next_loss,
                    "global_steps_after": engine.global_steps,
                }
            )
            ds_make.write_truth(tensors, meta, args.dump)
    if destroy:
        engine.destroy()
    dist.barrier()


def serve(folder: Path, rank: int, world: int) -> None:
    """Run the loads asked for in ``folder`` one after another in this one launch (every
    rank): ``NNNN.req`` holds a load's arguments (JSON list); ``NNNN.done`` is written once
    its dump is; ``STOP`` ends the loop. Spares each load the start of a torchrun job."""
    import time

    import torch.distributed as dist

    seen: set[str] = set()
    while True:
        box: list[Any] = [None]
        if rank == 0:
            while box[0] is None:
                if (folder / "STOP").exists():
                    box[0] = "STOP"
                    break
                ready = sorted(p for p in folder.glob("*.req") if p.name not in seen)
                if ready:
                    seen.add(ready[0].name)
                    box[0] = [ready[0].stem, json.loads(ready[0].read_text())]
                else:
                    time.sleep(0.05)
        dist.broadcast_object_list(box, src=0)
        if box[0] == "STOP":
            return
        name, argv = box[0]
        load_one(parser().parse_args(argv), rank, world, destroy=True)
        if rank == 0:
            (folder / f"{name}.done").write_text("done\n")


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    rank, world = ds_make.init_dist()
    if argv[:1] == ["--serve"]:
        ds_make.exit_process(lambda: serve(Path(argv[1]), rank, world))
    args = parser().parse_args(argv)
    ds_make.exit_process(lambda: load_one(args, rank, world))


if __name__ == "__main__":
    main()
