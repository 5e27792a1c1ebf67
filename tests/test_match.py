"""Checking a layout against stored data: copies of one slice must agree (E305)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from layouts import training_layouts

from layoutc import zero
from layoutc.errors import LayoutError
from layoutc.formats.match import check_replicas
from layoutc.lang.check import load_text
from layoutc.place import place
from layoutc.runtime import memory


def _reader(stored):
    return lambda f, k, at, n: np.asarray(stored[(f, k)]).reshape(-1)[at : at + n]


@settings(max_examples=40, deadline=None)
@given(training_layouts())
def test_what_partition_stores_has_agreeing_copies(layout):
    p = place(layout)
    stored = zero.partition(layout, memory.markers(p))
    check_replicas(p, _reader(stored))


def test_a_replica_that_differs_is_named_with_both_files():
    layout = load_text(
        "mesh { dp = 1, tp = 2 }\ndtype fp32\ntensor w [4 / tp, 2]\ntensor norm [3]\n",
        "tp.layout",
    )
    p = place(layout)
    stored = zero.partition(layout, memory.markers(p))
    check_replicas(p, _reader(stored))
    stored[("mp_rank_01_model_states.pt", "module/norm")][2] += 1
    with pytest.raises(LayoutError) as e:
        check_replicas(p, _reader(stored))
    (d,) = e.value.diagnostics
    assert d.code == "E305"
    assert d.message.startswith("norm weight: declared the same in mp_rank_00_model_states.pt")
    assert "mp_rank_01_model_states.pt" in d.message and "element 2" in d.message


def test_a_tensor_the_layout_leaves_out_is_named_not_dropped():
    from layoutc.formats.deepspeed import infer, open_checkpoint
    from layoutc.formats.match import check_against

    ckpt = open_checkpoint(Path(__file__).parent.parent / "examples" / "deepspeed-zero2")
    text = infer(ckpt)
    check_against(place(load_text(text)), ckpt.folder)
    partial = "\n".join(line for line in text.splitlines() if not line.startswith("buffer table"))
    assert partial != text
    with pytest.raises(LayoutError) as e:
        check_against(place(load_text(partial + "\n")), ckpt.folder)
    assert [d.code for d in e.value.diagnostics] == ["E306"]
    assert "mp_rank_00_model_states.pt: holds module/table" in str(e.value)
