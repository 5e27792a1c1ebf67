"""Checking a layout against stored data: copies of one slice must agree (E305)."""

from __future__ import annotations

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
