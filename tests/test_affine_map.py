"""AutoTP's affine map, written for a layout and read back into dims (no DeepSpeed here;
the interop tests compare with the maps DeepSpeed writes)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from layoutc.formats import autotp
from layoutc.lang.check import load_text
from layoutc.place.shards import slices_of


def _layout(dim: str, tp: int):
    return load_text(f"mesh {{ tp = {tp} }}\ntensor w [{dim}, 3]\ntensor r [3, {dim}]\n")


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(2, 6), st.booleans())
def test_the_affine_map_of_a_grained_split_reads_back_as_the_same_cut(size, grain, tp, named):
    grain = min(grain, size)
    layout = _layout(f"grains({size}, {grain}) / tp", tp)
    for t in layout.tensors:
        entry = autotp.affine_entry(layout, t, "tp")
        shape, dim, sizes = autotp.split_of(t.name, entry, tp)
        assert shape == t.shape and dim == (0 if t.name == "w" else 1)
        assert sizes == [sl.shape[dim] for sl in slices_of(t, layout.mesh)]
        found = autotp.grain_of(size, sizes, grain, by_grain_size=named)
        assert found is not None
        if named:  # DeepSpeed's rule names the grain: it is the one read back
            assert found == grain
        else:  # the smallest grain that cuts the same way (0: an even split)
            assert autotp.shares(size, tp, found or 1) == sizes or found == 0
            assert found != 0 or len(set(sizes)) == 1


def test_a_replicated_tensor_is_one_piece_on_every_rank():
    layout = load_text("mesh { tp = 3 }\ntensor n [5]\n")
    entry = autotp.affine_entry(layout, layout.tensors[0], "tp")
    assert entry["ranks"][2]["pieces"] == [
        {"shape": [5], "source": [0, [1]], "dest": [0, [1]], "locations": [0, 1, 2]}
    ]
    assert autotp.split_of("n", entry, 3) == ((5,), None, [5, 5, 5])


def test_an_empty_shard_is_an_empty_piece_where_its_rows_would_start():
    layout = load_text("mesh { tp = 4 }\ntensor q [grains(16, 8) / tp, 16]\n")
    ranks = autotp.affine_entry(layout, layout.tensors[0], "tp")["ranks"]
    assert [r["shard_shape"] for r in ranks.values()] == [[8, 16], [8, 16], [0, 16], [0, 16]]
    assert ranks[2]["pieces"][0]["source"] == [256, [16, 1]]


def test_shards_that_are_no_single_cut_are_refused():
    entry = {
        "logical_shape": [4, 4],
        "ranks": {
            0: {"shard_shape": [2, 2], "pieces": []},
            1: {"shard_shape": [2, 2], "pieces": []},
        },
    }
    try:
        autotp.split_of("w", entry, 2)
    except ValueError as e:
        assert "no split" in str(e)
    else:
        raise AssertionError("a two-dim cut was read as a split")


def test_retarget_rewrites_the_map_for_the_target_topology():
    two = load_text("mesh { tp = 2 }\ntensor q [grains(16, 8) / tp, 16]\n")
    four = load_text("mesh { tp = 4 }\ntensor q [grains(16, 8) / tp, 16]\n")
    info = {"affine_map": {"version": 1, "params": {"^q$": {}}}, "original_vocab_size": 7}
    out = autotp.retarget(info, four, ("tp",))
    assert out["original_vocab_size"] == 7
    assert out["affine_map"]["params"]["^q$"] == autotp.affine_entry(four, four.tensors[0], "tp")
    assert autotp.retarget(info, two, ()) is None  # no tensor-parallel axis: nothing to map
