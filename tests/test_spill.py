"""Spill units swap through files: the same elements move as through memory, the output
of a conversion under a budget smaller than its tensors equals the unbounded one byte for
byte, and the swap files are gone afterwards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from layouts import layout_pairs
from test_deepspeed_write import _stub_source, write

from layoutc.conversion import execute, verify
from layoutc.formats.deepspeed import open_checkpoint
from layoutc.lang.check import load_text
from layoutc.place import place
from layoutc.plan.compile import compile_plan
from layoutc.runtime import executor, memory
from layoutc.runtime.spill import Spill

TP_LAYOUT = """\
mesh { dp = 2, tp = 2 }
dtype bf16
optimizer adam
zero 1 over dp
tensor embed.weight [pad(37, 2 * tp) / tp, 16]
tensor proj.weight [24, 32 / tp]
tensor norm.weight [16]
store deepspeed
"""


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(layout_pairs())
def test_swap_files_on_disk_move_what_swap_files_in_memory_move(tmp_path_factory, pair):
    a, b = pair
    plan = compile_plan(a, b, memory=64)
    assume(any(u.mode == "spill" for u in plan.units))
    stored = memory.store(place(a), memory.markers(place(a), seed=3))
    in_memory = executor.execute(plan, stored, place(b))
    folder = tmp_path_factory.mktemp("spill") / "swap"
    spill = Spill(folder)
    on_disk = executor.execute(plan, stored, place(b), spill=spill)
    assert spill.bytes_out == spill.bytes_in > 0
    spill.close()
    assert not folder.exists()
    for key, arr in in_memory.stored.items():
        assert np.array_equal(arr, on_disk.stored[key]), key


def _files(root: Path) -> dict[str, bytes]:
    """Every file's bytes, the manifest included (its plan digest ignores the schedule)."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_a_conversion_under_a_tiny_budget_spills_to_disk_and_equals_the_unbounded_one(tmp_path):
    layout = load_text(TP_LAYOUT)
    write(
        layout,
        memory.markers(place(layout), seed=5),
        tmp_path / "ckpt",
        _stub_source(tmp_path / "stub", layout),
    )
    folder = open_checkpoint(tmp_path / "ckpt").folder
    outputs = {}
    for budget in (None, 256):
        plan = compile_plan(layout, "universal", memory=budget, workers=2)
        plan.validate(plan.source_placement, plan.target_placement)
        out = tmp_path / f"u-{budget}"
        report = execute(plan, folder, out, tag=folder.name)
        assert verify(out) == []
        spilled = [u for u in plan.units if u.mode == "spill"]
        if budget is None:
            assert not spilled and report.bytes_swapped == 0
        else:
            assert spilled and report.bytes_swapped == sum(u.stats.swap_bytes for u in spilled)
        outputs[budget] = _files(out)
    assert outputs[None] == outputs[256]
    assert not list(tmp_path.glob("*.swap-*"))  # swap files removed


def test_spills_go_under_the_nvme_offload_directory_with_its_settings(tmp_path):
    nvme = load_text(
        TP_LAYOUT.replace(
            "store deepspeed",
            f'offload params to nvme "{tmp_path}/p"\n'
            f'offload optimizer to nvme "{tmp_path}/nvme" {{ block 64KiB, queue 3, threads 2 }}\n'
            "store deepspeed",
        )
    )
    out = tmp_path / "out"
    spill = Spill.beside(nvme, out, "7")
    assert spill.folder == tmp_path / "nvme" / "out.swap-7"
    assert spill.settings == {"block_size": 64 << 10, "queue_depth": 3, "threads": 2}
    plain = Spill.beside(load_text(TP_LAYOUT), out, "7")
    assert plain.folder == tmp_path / "out.swap-7" and plain.settings == {}

    plan = compile_plan(nvme, "universal", memory=256, workers=2)
    stored = memory.store(place(nvme), memory.markers(place(nvme), seed=3))
    in_memory = executor.execute(plan, stored, plan.target_placement)
    on_disk = executor.execute(plan, stored, plan.target_placement, spill=spill)
    assert spill.pool is not None and spill.pool.block_size == 64 << 10
    assert spill.pool.queue_depth == 3 and not spill.pool.direct
    spill.close()
    assert list((tmp_path / "nvme").iterdir()) == []  # the directory stays, our folder goes
    for key, arr in in_memory.stored.items():
        assert np.array_equal(arr, on_disk.stored[key]), key
