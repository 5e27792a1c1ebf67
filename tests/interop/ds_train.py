"""Train with real DeepSpeed and save through layoutc's checkpoint engine (torchrun script).

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/interop/ds_train.py \\
        --case z2_w2_bf16[,z1_w2_fp32,...] --out DIR [--fault io|kill]

Per case (ds_make.CASES, built at this world size), after ds_make.STEPS training steps, one
state saved three times under the tag ``global_step2``: by DeepSpeed's own
TorchCheckpointEngine into ``DIR/<case>/torch``, then through ``layoutc.deepspeed.attach``
synchronously into ``DIR/<case>/sync`` and asynchronously into ``DIR/<case>/async``. Rank 0
then reads every file of ``sync`` and ``async`` with ``torch.load(weights_only=True)`` (the
DeepSpeed classes allowed) and compares it with the same file of ``torch``, every value and
every tensor (dtype, shape, strides, bytes); and reads ``async`` with DeepSpeed's
``get_fp32_state_dict_from_zero_checkpoint``. ``DIR/<case>/truth.safetensors`` / ``.json``
hold ds_make.capture's ground truth at the save, plus ``compared`` (files found equal),
``differences``, ``zero_to_fp32`` (its tensors equal to the fp32 truth: true/false) and
``next_loss``, the loss of one more training step (a resumed run must reproduce it).

``--fault io`` (one case): saves ``A``, then ``B`` with rank 0's writes failing with ENOSPC,
then tries ``C``; ``DIR/<case>/fault.json`` records what each call raised. ``--fault kill``:
saves ``A`` and waits, then saves ``B`` asynchronously and rank 1 is killed with SIGKILL by
its first write of ``B`` (training goes on; the launch then fails).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ds_make  # after the sys.path insert above

TAG = f"global_step{ds_make.STEPS}"
KINDS = ("sync", "async")


def same(a: Any, b: Any, where: str, out: list[str]) -> None:
    import torch

    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor):
            out.append(f"{where}: a tensor, and {type(b).__name__}")
        elif (a.dtype, a.shape, a.stride(), a.storage_offset()) != (
            b.dtype,
            b.shape,
            b.stride(),
            b.storage_offset(),
        ):
            out.append(f"{where}: tensors differ in dtype, shape or strides")
        else:
            # Bit for bit: equal values are not enough (NaN != NaN, -0.0 == 0.0).
            x, y = (t.detach().reshape(-1).view(torch.uint8) for t in (a, b))
            if not torch.equal(x, y):
                n = int((x != y).sum())
                at = int((x != y).nonzero()[0]) // a.element_size()
                out.append(
                    f"{where}: {n} bytes differ, first at element {at}: "
                    f"{a.reshape(-1)[at].item()!r} and {b.reshape(-1)[at].item()!r}"
                )
    elif isinstance(a, dict):
        if type(a) is not type(b) or list(a) != list(b):
            out.append(f"{where}: keys {list(a)} and {list(b) if isinstance(b, dict) else b}")
        else:
            for k in a:
                same(a[k], b[k], f"{where}.{k}", out)
    elif isinstance(a, list | tuple):
        if type(a) is not type(b) or len(a) != len(b):
            out.append(f"{where}: {type(a).__name__} of {len(a)}, and {b!r:.80}")
        else:
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                same(x, y, f"{where}[{i}]", out)
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        if type(a) is not type(b):
            out.append(f"{where}: {type(a).__name__} and {type(b).__name__}")
        else:
            same(vars(a), vars(b), where, out)
    elif a != b:
        out.append(f"{where}: {a!r:.80} and {b!r:.80}")


def compare(theirs: Path, ours: Path) -> tuple[list[str], list[str]]:
    """Files of ``ours`` equal to ``theirs`` (every .pt file), and the differences."""
    from layoutc.deepspeed.engine import safe_load

    equal, diffs = [], []
    names = sorted(str(p.relative_to(theirs)) for p in theirs.rglob("*.pt"))
    mine = sorted(str(p.relative_to(ours)) for p in ours.rglob("*.pt"))
    if names != mine:
        diffs.append(f"{ours}: files {mine}, DeepSpeed's {names}")
    for name in names:
        if (ours / name).is_file():
            found: list[str] = []
            same(safe_load(str(theirs / name)), safe_load(str(ours / name)), name, found)
            diffs += found
            if not found:
                equal.append(name)
    return equal, diffs


def zero_to_fp32_matches(root: Path, tensors: dict[str, Any]) -> bool:
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(root))
    want = {k[len("fp32/") :]: v for k, v in tensors.items() if k.startswith("fp32/")}
    return set(sd) >= set(want) and all(
        torch.equal(sd[k].float(), torch.as_tensor(v)) for k, v in want.items()
    )


def save_case(name: str, out: Path, rank: int, world: int) -> None:
    import torch.distributed as dist

    import layoutc.deepspeed

    case = ds_make.CASES[name]
    if case["world"] != world:
        raise SystemExit(f"case {name} wants world {case['world']}, torchrun gave {world}")
    engine, _ = ds_make.build_engine(case, world)
    losses = ds_make.train(engine, case, rank)
    engine.save_checkpoint(str(out / "torch"))
    ours = layoutc.deepspeed.attach(engine, async_save=False)
    engine.save_checkpoint(str(out / "sync"))
    ours.saver.async_save = True
    engine.save_checkpoint(str(out / "async"))
    ours.wait()
    tensors, meta = ds_make.capture(engine, case)
    next_loss = ds_make.train(engine, case, rank, steps=1)[0]
    if rank == 0:
        equal, diffs = [], []
        for kind in KINDS:
            e, d = compare(out / "torch" / TAG, out / kind / TAG)
            equal += [f"{kind}/{n}" for n in e]
            diffs += [f"{kind}: {x}" for x in d]
        meta.update(
            {
                "case": name,
                "case_config": case,
                "world_size": world,
                "losses": losses,
                "next_loss": next_loss,
                "compared": equal,
                "differences": diffs,
                "zero_to_fp32": zero_to_fp32_matches(out / "async", tensors),
            }
        )
        ds_make.write_truth(tensors, meta, out / "truth.safetensors")
    engine.destroy()
    dist.barrier()


def _after_tag_a(name: str, out: Path, rank: int, world: int, on_write_of_b: Any) -> Any:
    """Train, save tag A through layoutc (asynchronously) and wait for it; then make every
    write of tag B call ``on_write_of_b(region)`` first. Returns (engine, case, ours)."""
    import layoutc.deepspeed
    from layoutc.runtime import fileio

    case = ds_make.CASES[name]
    engine, _ = ds_make.build_engine(case, world)
    ds_make.train(engine, case, rank)
    ours = layoutc.deepspeed.attach(engine)
    engine.save_checkpoint(str(out), tag="A")
    ours.wait()
    write = fileio.Region.write_bytes

    def patched(self: Any, at: int, raw: Any, crc: Any = None) -> None:
        if ".B.layoutc-partial" in self.path:
            on_write_of_b(self)
        write(self, at, raw, crc)

    fileio.Region.write_bytes = patched  # type: ignore[method-assign]
    return engine, case, ours


def fault_io(name: str, out: Path, rank: int, world: int) -> None:
    """A write of tag B fails on rank 0: the next save raises it; A stays."""

    def fail(region: Any) -> None:
        if rank == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), region.path)

    engine, _, ours = _after_tag_a(name, out, rank, world, fail)
    raised = {}
    for tag in ("B", "C"):
        try:
            engine.save_checkpoint(str(out), tag=tag)
            raised[tag] = None
        except Exception as e:
            raised[tag] = f"{type(e).__name__}: {e}"
    try:
        ours.wait()
        raised["wait"] = None
    except Exception as e:
        raised["wait"] = f"{type(e).__name__}: {e}"
    if rank == 0:
        (out / "fault.json").write_text(json.dumps(raised) + "\n")


def fault_kill(name: str, out: Path, rank: int, world: int) -> None:
    """Rank 1 dies (SIGKILL) in its first write of tag B, while training goes on."""

    def die(region: Any) -> None:
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    engine, case, ours = _after_tag_a(name, out, rank, world, die)
    engine.save_checkpoint(str(out), tag="B")
    ds_make.train(engine, case, rank, steps=1)
    ours.wait()  # rank 0 waits here for a rank that is gone, until torchrun stops it


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", required=True, help="case name(s), comma separated")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--fault", choices=("io", "kill"))
    args = ap.parse_args(argv)
    names = ds_make.case_names(args.case)
    rank, world = ds_make.init_dist()
    import torch.distributed as dist

    def work() -> None:
        for name in names:
            out = args.out / name
            if rank == 0:
                out.mkdir(parents=True, exist_ok=True)
            dist.barrier()
            if args.fault == "io":
                fault_io(name, out, rank, world)
            elif args.fault == "kill":
                fault_kill(name, out, rank, world)
            else:
                save_case(name, out, rank, world)
            if rank == 0:
                print(f"ds_train: {name} -> {out}", flush=True)
        dist.barrier()

    ds_make.exit_process(work)


if __name__ == "__main__":
    main()
