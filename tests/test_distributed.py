"""A plan run across ranks with torchrun (gloo, CPU): the output equals the single-process
run byte for byte, and a rank that fails leaves nothing committed."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

import layoutc

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "distributed" / "convert.py"
EXAMPLE = ROOT / "examples" / "deepspeed-zero2"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(ranks: int, *args: object) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
        "--master_addr", "127.0.0.1", "--master_port", str(_port()), str(SCRIPT),
        *map(str, args),
    ]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize(
    ("target", "settings"),
    [("universal", []), ("deepspeed", ["--set", "dp=3"]), ("dcp", [])],
)
def test_ranks_together_write_what_one_process_writes(tmp_path, ranks, target, settings):
    overrides = {"dp": 3} if settings else None
    layoutc.convert(EXAMPLE, tmp_path / "single", target, overrides=overrides)
    run = torchrun(ranks, EXAMPLE, tmp_path / "multi", target, *settings)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _files(tmp_path / "multi") == _files(tmp_path / "single")
    # one progress display: rank 0 counts what every rank wrote
    line = next(x for x in run.stdout.splitlines() if x.startswith("progress "))
    _, done, total, _, written = line.split()
    assert int(done) == int(total) == int(written) > 0
    # the planner dealt the units to the ranks, each running one unit at a time
    planned = next(x for x in run.stdout.splitlines() if x.startswith("planned for "))
    head, _, total_peak = planned.partition(", in all ")
    assert head.startswith(f"planned for {ranks} ranks, peak per rank ")
    peaks = [int(x) for x in head.split("peak per rank ")[1].split()]
    assert len(peaks) == ranks and sum(peaks) == int(total_peak) and min(peaks) > 0


def test_ranks_reading_a_distributed_checkpoint_write_what_one_process_writes(tmp_path):
    """Each rank opens the containers inside the .distcp files it reads; rank 0 proves
    their CRCs, opening those another rank read."""
    source = tmp_path / "dcp"
    layoutc.convert(EXAMPLE, source, "dcp")
    layoutc.convert(source, tmp_path / "single", "deepspeed", overrides={"dp": 3})
    run = torchrun(2, source, tmp_path / "multi", "deepspeed", "--set", "dp=3")
    assert run.returncode == 0, run.stderr[-3000:]
    assert _files(tmp_path / "multi") == _files(tmp_path / "single")


def test_a_failing_rank_leaves_nothing_committed_and_every_rank_says_so(tmp_path):
    run = torchrun(2, EXAMPLE, tmp_path / "out", "universal", "--fail-rank", "1")
    assert run.returncode != 0
    for rank in (0, 1):
        assert (
            f"rank {rank}: " in run.stderr
            and "rank 1: OSError: injected write failure" in run.stderr
        )
    assert "(nothing committed)" in run.stderr
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no partial folder, no swap files


def test_what_the_ranks_wrote_before_a_full_disk_is_gone_on_from(tmp_path):
    """Each rank journals its own units; the same command goes on from what all of them
    wrote, under torchrun with another number of ranks or in one process."""
    layoutc.convert(EXAMPLE, tmp_path / "single", "universal")
    for ranks, again in ((2, 3), (3, None)):
        out = tmp_path / f"out{ranks}"
        full = torchrun(ranks, EXAMPLE, out, "universal", "--full-rank", "1")
        assert full.returncode != 0
        assert "rank 1: OSError: [Errno 28] No space left on device" in full.stderr
        assert f"written are kept in {out}.partial-" in full.stderr
        assert not out.exists()
        if again is not None:
            partial = next(tmp_path.glob(f"{out.name}.partial-*"))
            kept = sorted(p.name for p in partial.rglob("*"))
            full = torchrun(again, EXAMPLE, out, "universal", "--full-verifying")
            assert full.returncode != 0 and "written are kept in" in full.stderr
            (still,) = tmp_path.glob(f"{out.name}.partial-*")  # taken over, and kept
            assert sorted(p.name for p in still.rglob("*")) == kept
            run = torchrun(again, EXAMPLE, out, "universal")
            assert run.returncode == 0, run.stderr[-3000:]
            kept = next(x for x in run.stdout.splitlines() if x.startswith("kept "))
            assert int(kept.split()[1]) > 0
        else:
            assert layoutc.convert(EXAMPLE, out, "universal").kept_bytes > 0
        assert _files(out) == _files(tmp_path / "single")
        assert sorted(tmp_path.iterdir()) == sorted([tmp_path / "single", *tmp_path.glob("out*")])
        assert not list(tmp_path.glob("*.partial-*"))


def test_a_plan_saved_for_the_ranks_runs_under_torchrun_as_one_process_writes(tmp_path):
    """layoutc plan --ranks 2 -o, then layoutc execute under torchrun: the planner dealt the
    units; a plan made for another number of ranks is refused."""
    from layoutc.cli import main

    plan = tmp_path / "plan.json"
    assert main(["plan", str(EXAMPLE), "--to", "universal", "--ranks", "2", "-o", str(plan)]) == 0
    layoutc.convert(EXAMPLE, tmp_path / "single", "universal")

    def run(ranks: int, out: Path) -> subprocess.CompletedProcess[str]:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
            "--master_addr", "127.0.0.1", "--master_port", str(_port()),
            "-m", "layoutc", "execute", str(plan), str(EXAMPLE), "-o", str(out), "-q",
        ]  # fmt: skip
        env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)

    done = run(2, tmp_path / "multi")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _files(tmp_path / "multi") == _files(tmp_path / "single")
    refused = run(3, tmp_path / "three")
    assert refused.returncode != 0, refused.stderr[-3000:]  # torchrun's, for any rank's 2
    assert refused.stderr.count("plan it for 3 (layoutc plan ... --ranks 3)") == 3
    assert not (tmp_path / "three").exists()
