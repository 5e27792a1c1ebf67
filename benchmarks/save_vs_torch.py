"""Writing a 2 GiB state dict: layoutc's parallel writer vs torch.save, in one run.

Both write the same state dict (bf16 and fp32 tensors of a few hundred MiB, 2 GiB in all)
to a new file on the same disk and make it durable before the clock stops:

    torch.save       torch.save(sd, path), then fsync
    layoutc.save     layoutc.save.save(sd, path, workers=N): structure first, tensor bytes in
                     64 MiB pieces written concurrently at their offsets, zip CRCs combined
                     from the pieces' CRCs, fsync (for N = 1, 2, 4)
    dd direct        the torch.save output (cached) copied by four ``dd bs=32M oflag=direct
                     conv=fsync`` at once, one per quarter: the disk's durable direct-IO
                     speed for the same bytes with the standard tool, no checksums

Best of ``--repeat``; both outputs are checked to load with torch.load and to be equal.

Run::

    python benchmarks/save_vs_torch.py
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

GIB = 1 << 30
DD = "dd oflag=direct, 4 streams"


def state_dict(total: int):  # -> dict[str, torch.Tensor]
    import torch

    g = torch.Generator().manual_seed(0)
    sd = {}
    size, i = 0, 0
    while size < total:
        dtype = torch.bfloat16 if i % 2 else torch.float32
        n = min((256 << 20) // (2 if dtype == torch.bfloat16 else 4), (total - size) // 4 or 1)
        sd[f"layers.{i}.weight"] = torch.randn(n, generator=g).to(dtype)
        size += sd[f"layers.{i}.weight"].numel() * sd[f"layers.{i}.weight"].element_size()
        i += 1
    return sd


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dd_copy(src: Path, dst: Path, streams: int = 4, block: int = 32 << 20) -> None:
    """Copy ``src`` to ``dst`` with ``streams`` concurrent ``dd oflag=direct`` (``block``
    bytes per write, each its share of the blocks), fsynced."""
    blocks = -(-src.stat().st_size // block)
    share = -(-blocks // streams)
    procs = [
        subprocess.Popen(
            [
                "dd",
                f"if={src}",
                f"of={dst}",
                f"bs={block}",
                f"skip={k * share}",
                f"seek={k * share}",
                f"count={share}",
                "oflag=direct",
                "conv=notrunc,fsync",
                "status=none",
            ]
        )
        for k in range(streams)
    ]
    if any([p.wait() for p in procs]):  # wait for every stream, then judge
        raise SystemExit("dd failed")


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    os.sync()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2 * GIB)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path)
    args = ap.parse_args()
    import torch

    from layoutc.save import save

    sd = state_dict(args.size)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="layoutc-save-bench-", dir=args.dir) as tmp:
        folder = Path(tmp)

        def torch_save() -> None:
            torch.save(sd, folder / "torch.pt")
            _fsync(folder / "torch.pt")

        for _ in range(args.repeat):
            (folder / "torch.pt").unlink(missing_ok=True)
            rows.setdefault("torch.save + fsync", []).append(timed(torch_save))
            for n in (1, 2, 4):
                path = folder / f"layoutc-{n}.pt"
                path.unlink(missing_ok=True)
                rows.setdefault(f"layoutc.save, {n} writer(s)", []).append(
                    timed(lambda path=path, n=n: save(sd, path, workers=n))
                )
            (folder / "dd.pt").unlink(missing_ok=True)
            rows.setdefault(DD, []).append(
                timed(lambda: dd_copy(folder / "torch.pt", folder / "dd.pt"))
            )
        a = torch.load(folder / "torch.pt", weights_only=True, mmap=True)
        b = torch.load(folder / "layoutc-4.pt", weights_only=True, mmap=True)
        assert all(torch.equal(a[k], b[k]) for k in sd), "outputs differ"

    print()
    print("## Saving a state dict (`benchmarks/save_vs_torch.py`)")
    print()
    print(
        f"Machine: {platform.platform()}, {len(os.sched_getaffinity(0))} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}. Date: {time.strftime('%Y-%m-%d')}. "
        f"{len(sd)} tensors, {nbytes / GIB:.2f} GiB; best of {args.repeat}, fsync included."
    )
    print()
    print("| writer | best s | GB/s | every run s |")
    print("|---|---|---|---|")
    base = min(rows["torch.save + fsync"])
    for name, runs in rows.items():
        best = min(runs)
        print(
            f"| {name} | {best:.2f} | {nbytes / best / 1e9:.2f} | {', '.join(f'{x:.2f}' for x in runs)} |"
        )
    print()
    ceiling = min(rows[DD])  # the disk's durable direct-IO speed, by the standard tool
    for name, runs in rows.items():
        if name.startswith("layoutc"):
            print(
                f"- {name}: {base / min(runs):.2f}x torch.save (target >= 2x), "
                f"{ceiling / min(runs):.2f}x dd"
            )
    print(
        f"- dd: {base / ceiling:.2f}x torch.save (2x torch.save is {nbytes / base * 2 / 1e9:.2f} "
        f"GB/s; dd reached {nbytes / ceiling / 1e9:.2f} GB/s)"
    )


if __name__ == "__main__":
    main()
