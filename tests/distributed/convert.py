"""One rank of a distributed conversion in the tests (run under torchrun).

    python -m torch.distributed.run --nproc_per_node N tests/distributed/convert.py \\
        SRC OUT TARGET [--set NAME=VALUE] [--fail-rank R]

``--fail-rank R`` makes rank R fail while writing its first unit, to prove that nothing
is committed and every rank reports the failure; ``--full-rank R`` makes rank R find the
disk full after its second unit (what the ranks wrote is kept, for the same command to go
on from); ``--full-verifying`` makes rank 0 find it full while it reads back what an
earlier run wrote (which stays). Rank 0 prints its last progress report
(bytes written by all ranks, and the total)."""

from __future__ import annotations

import argparse
import errno
import sys

import torch.distributed as dist

import layoutc
from layoutc.conversion import RankFailed
from layoutc.runtime import executor


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("output")
    ap.add_argument("target")
    ap.add_argument("--set", dest="settings", action="append", default=[])
    ap.add_argument("--fail-rank", type=int)
    ap.add_argument("--full-rank", type=int)
    ap.add_argument("--full-verifying", action="store_true")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if args.fail_rank == rank:
        run = executor._run

        def failing(op, *a):
            if type(op).__name__ == "Write":
                raise OSError("injected write failure")
            return run(op, *a)

        executor._run = failing
    if args.full_rank == rank:
        run_unit, units = executor.execute, []

        def full(plan, source, out, **kw):
            units.extend(kw["units"][:2])
            run_unit(plan, source, out, **{**kw, "units": units})
            raise OSError(errno.ENOSPC, "No space left on device")

        executor.execute = full
    if args.full_verifying and rank == 0:  # while reading back what an earlier run wrote
        from layoutc.runtime import execute

        def full(*a, **kw):
            raise OSError(errno.ENOSPC, "No space left on device")

        execute.verify = full
    overrides = {k: int(v) for k, v in (s.split("=") for s in args.settings)}
    seen: list[tuple[int, int]] = []  # rank 0's progress reports: (done, total)
    try:
        report = layoutc.convert(
            args.source,
            args.output,
            args.target,
            workers=1,
            overrides=overrides,
            progress=lambda done, total: seen.append((done, total)),
        )
        status = 0
        if rank == 0:
            print(f"progress {seen[-1][0]} {seen[-1][1]} written {report.bytes_written}")
            print(f"kept {report.kept_bytes}")
            summary = report.plan.summary()
            peaks = " ".join(map(str, report.plan.peak_per_rank()))
            print(f"planned for {summary['ranks']} ranks, peak per rank {peaks}, in all "
                  f"{summary['peak_memory_bytes_all_ranks']}")  # fmt: skip
        elif seen:  # one display per run: only rank 0 reports
            print(f"rank {rank} reported progress", file=sys.stderr)
            status = 4
    except RankFailed as e:
        print(f"rank {rank}: {e}", file=sys.stderr)
        status = 3
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
