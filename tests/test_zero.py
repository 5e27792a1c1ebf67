"""DeepSpeed ZeRO placement arithmetic (layoutc.place.zero).

Hand-computed cases pin the rules of the DeepSpeed reference notes (sections 1.4 and 1.5);
hypothesis then checks the geometry against a brute-force model that builds every rank's
buffer element by element from marker values ``(param, element)``, so a wrong offset shows
up as a wrong marker rather than as a plausible number.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layoutc.place.zero import NCCL_START_ALIGNMENT, FlatGroup, Fragment, Stage3Group

Marker = tuple[int, int]  # (param index, element index); None marks padding

small_numels = st.lists(st.integers(0, 12), max_size=8)
large_numels = st.lists(st.integers(0, 10**12), max_size=6)
dps = st.integers(1, 64)


def ceil_multiple(n: int, m: int) -> int:
    """Smallest multiple of m that is >= n, by counting up: independent of the module."""
    k = 0
    while k * m < n:
        k += 1
    return k * m


def flat_model(numels: list[int], dp: int) -> list[list[Marker | None]]:
    """Every rank's stage 1/2 partition, built the slow way: concatenate, pad, cut."""
    flat: list[Marker | None] = [(i, k) for i, n in enumerate(numels) for k in range(n)]
    flat += [None] * (ceil_multiple(len(flat), NCCL_START_ALIGNMENT * dp) - len(flat))
    size = len(flat) // dp
    return [flat[r * size : (r + 1) * size] for r in range(dp)]


def stage3_model(group: Stage3Group) -> list[list[list[Marker | None]]]:
    """``buffers[s][r]``: rank r's flat buffer of sub-group s, built element by element."""
    dp = group.dp
    buffers: list[list[list[Marker | None]]] = []
    for members in group.sub_groups:
        ranks: list[list[Marker | None]] = [[] for _ in range(dp)]
        for i in members:
            n = group.numels[i]
            padded: list[Marker | None] = [(i, k) for k in range(n)]
            padded += [None] * (ceil_multiple(n, dp) - n)
            pn = len(padded) // dp
            for r in range(dp):
                ranks[r] += padded[r * pn : (r + 1) * pn]
        buffers.append(ranks)
    return buffers


def read_back(buffer: list[Marker | None], fragments: list[Fragment]) -> list[Marker | None]:
    return [buffer[f.buffer_offset + j] for f in fragments for j in range(f.numel)]


def check_fragment_run(fragments: list[Fragment], lo: int, hi: int) -> None:
    """Fragments tile [lo, hi) of the parameter in order, one per consecutive rank."""
    position = lo
    for before, after in pairwise(fragments):
        assert after.rank == before.rank + 1
    for f in fragments:
        assert f.numel > 0
        assert f.param_offset == position
        position += f.numel
    assert position == hi


# --- ZeRO-1/2: hand-computed -------------------------------------------------------------


def test_flat_group_that_is_already_aligned_has_no_padding() -> None:
    g = FlatGroup((5, 3), 4)
    assert (g.total, g.alignment, g.padded_total, g.partition_size) == (8, 8, 8, 2)
    assert g.offsets == (0, 5)
    assert [g.padding(r) for r in range(4)] == [0, 0, 0, 0]
    assert g.locate(0) == [Fragment(0, 0, 0, 2), Fragment(1, 0, 2, 2), Fragment(2, 0, 4, 1)]
    assert g.locate(1) == [Fragment(2, 1, 0, 1), Fragment(3, 0, 1, 2)]


def test_flat_group_pads_to_twice_dp_and_the_last_rank_can_be_all_padding() -> None:
    g = FlatGroup((5, 4), 4)
    assert (g.total, g.padded_total, g.partition_size) == (9, 16, 4)
    assert [g.padding(r) for r in range(4)] == [0, 0, 3, 4]
    assert [g.saved_numel(r) for r in range(4)] == [4, 4, 1, 0]
    assert [g.saved_numel(r, strip_padding=False) for r in range(4)] == [4, 4, 4, 4]
    assert g.rank_mapping(3) == []


def test_tiny_flat_group_leaves_several_trailing_ranks_pure_padding() -> None:
    g = FlatGroup((3,), 8)
    assert (g.padded_total, g.partition_size) == (16, 2)
    assert [g.padding(r) for r in range(8)] == [0, 1, 2, 2, 2, 2, 2, 2]
    assert [g.saved_numel(r) for r in range(8)] == [2, 1, 0, 0, 0, 0, 0, 0]
    assert g.locate(0) == [Fragment(0, 0, 0, 2), Fragment(1, 0, 2, 1)]


def test_param_slice_mapping_of_a_param_crossing_a_partition_boundary() -> None:
    g = FlatGroup((3, 10, 5), 2)  # T = 18, T' = 20, P = 10; param 1 is flat [3, 13)
    assert g.partition_size == 10
    assert g.rank_mapping(0) == [(0, Fragment(0, 0, 0, 3)), (1, Fragment(0, 3, 0, 7))]
    assert g.rank_mapping(1) == [(1, Fragment(1, 0, 7, 3)), (2, Fragment(1, 3, 0, 5))]
    assert g.padding(1) == 2
    assert g.locate(1, 5, 9) == [Fragment(0, 8, 5, 2), Fragment(1, 0, 7, 2)]


def test_empty_flat_group_has_no_partitions_content() -> None:
    g = FlatGroup((0, 0), 3)
    assert (g.total, g.padded_total, g.partition_size) == (0, 0, 0)
    assert [g.saved_numel(r) for r in range(3)] == [0, 0, 0]
    assert g.locate(1) == [] and g.count(1) == 0
    assert g.rank_mapping(2) == []


def test_empty_params_inside_a_partition_get_no_slice_mapping() -> None:
    g = FlatGroup((1, 0, 3), 1)
    assert g.rank_mapping(0) == [(0, Fragment(0, 0, 0, 1)), (2, Fragment(0, 1, 0, 3))]


def test_flat_group_counts_fragments_of_huge_params_without_walking_them() -> None:
    g = FlatGroup((10**10, 7), 65_536)
    assert g.partition_size % 2 == 0
    assert g.count(0) == 65_536
    assert g.count(0, 10**10 - 1) == 1
    assert g.count(1) == 1
    assert g.padding(65_535) == g.padded_total - g.total


# --- ZeRO-3: hand-computed ---------------------------------------------------------------


def test_stage3_param_of_ten_elements_over_four_ranks_pads_the_last_rank_by_two() -> None:
    g = Stage3Group((10,), 4)
    assert g.partition_numel(0) == 3
    assert [g.padding(0, r) for r in range(4)] == [0, 0, 0, 2]
    assert g.locate(0) == [
        Fragment(0, 0, 0, 3),
        Fragment(1, 0, 3, 3),
        Fragment(2, 0, 6, 3),
        Fragment(3, 0, 9, 1),
    ]


def test_stage3_padding_can_fill_several_trailing_ranks() -> None:
    g = Stage3Group((9,), 8)  # pn = 2, padding 7 on the last ceil(7 / 2) = 4 ranks
    assert [g.padding(0, r) for r in range(8)] == [0, 0, 0, 0, 1, 2, 2, 2]
    assert g.count(0) == 5


def test_stage3_param_that_crosses_the_threshold_closes_its_sub_group() -> None:
    g = Stage3Group((8, 8, 8, 8), 4, sub_group_size=5)  # pn = 2 each: 2, 4, 6 >= 5
    assert g.sub_groups == ((0, 1, 2), (3,))
    assert [g.sub_group_of(i) for i in range(4)] == [0, 0, 0, 1]
    assert [g.offset_in_sub_group(i) for i in range(4)] == [0, 2, 4, 0]
    assert [g.sub_group_numel(s) for s in range(2)] == [6, 2]
    assert g.locate(2) == [Fragment(r, 4, 2 * r, 2) for r in range(4)]


def test_stage3_sub_group_closes_on_reaching_the_threshold_exactly() -> None:
    g = Stage3Group((8, 8, 8, 8), 4, sub_group_size=4)
    assert g.sub_groups == ((0, 1), (2, 3))


def test_stage3_default_sub_group_size_gives_one_sub_group() -> None:
    g = Stage3Group((8, 0, 8, 10**6), 4)
    assert g.sub_groups == ((0, 1, 2, 3),)
    assert g.sub_group_numel(0) == 2 + 0 + 2 + 250_000


def test_stage3_empty_param_after_a_closed_sub_group_opens_a_new_one() -> None:
    g = Stage3Group((4, 0), 1, sub_group_size=4)
    assert g.sub_groups == ((0,), (1,))
    assert g.sub_group_numel(1) == 0
    assert g.locate(1) == []


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: FlatGroup((1,), 0), "dp=0"),
        (lambda: FlatGroup((1, -3), 2), "numels[1] = -3"),
        (lambda: FlatGroup((1.5,), 2), "numels[0] = 1.5"),  # type: ignore[arg-type]
        (lambda: FlatGroup((True,), 2), "numels[0] = True"),
        (lambda: Stage3Group((1,), -2), "dp=-2"),
        (lambda: Stage3Group((1,), 2, sub_group_size=0), "sub_group_size=0"),
    ],
)
def test_malformed_groups_are_refused_with_the_offending_value(
    make: Callable[[], object], fragment: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        make()


def test_numels_given_as_a_list_are_stored_as_a_hashable_tuple() -> None:
    g = FlatGroup([2, 3], 2)  # type: ignore[arg-type]
    assert g.numels == (2, 3)
    assert hash(g) == hash(FlatGroup((2, 3), 2))


def test_out_of_range_indices_and_element_ranges_are_refused() -> None:
    flat = FlatGroup((4, 4), 2)
    z3 = Stage3Group((4, 4), 2)
    with pytest.raises(IndexError, match="param index 2"):
        flat.locate(2)
    with pytest.raises(IndexError, match="rank -1"):
        flat.padding(-1)
    with pytest.raises(IndexError, match="rank 2"):
        flat.rank_mapping(2)
    with pytest.raises(IndexError, match="sub-group 1"):
        z3.sub_group_numel(1)
    with pytest.raises(IndexError, match="rank 2"):
        z3.padding(0, 2)
    with pytest.raises(ValueError, match=r"\[3, 2\)"):
        flat.count(0, 3, 2)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        z3.locate(1, 0, 5)


# --- ZeRO-1/2: properties ----------------------------------------------------------------


@given(small_numels, dps)
def test_flat_partitions_cover_every_element_exactly_once(numels: list[int], dp: int) -> None:
    g = FlatGroup(tuple(numels), dp)
    model = flat_model(numels, dp)
    written: list[list[Marker | None]] = [[None] * g.saved_numel(r) for r in range(dp)]
    for i in range(len(numels)):
        for f in g.locate(i):
            for j in range(f.numel):
                slot = f.buffer_offset + j
                assert written[f.rank][slot] is None, "element written twice"
                written[f.rank][slot] = (i, f.param_offset + j)
    # What the fragments say is where the slow model puts it, padding stripped.
    assert written == [[m for m in part if m is not None] for part in model]
    assert [part.count(None) for part in model] == [g.padding(r) for r in range(dp)]


@given(small_numels, dps)
def test_flat_params_reassemble_from_their_fragments(numels: list[int], dp: int) -> None:
    g = FlatGroup(tuple(numels), dp)
    model = flat_model(numels, dp)
    for i, n in enumerate(numels):
        pieces = [read_back(model[f.rank], [f]) for f in g.locate(i)]
        assert [m for piece in pieces for m in piece] == [(i, k) for k in range(n)]


@given(large_numels, dps)
def test_flat_partitions_are_equal_even_and_just_large_enough(numels: list[int], dp: int) -> None:
    g = FlatGroup(tuple(numels), dp)
    assert g.total == sum(numels)
    assert g.padded_total % (2 * dp) == 0
    assert g.total <= g.padded_total < g.total + 2 * dp or g.total == g.padded_total == 0
    assert g.partition_size * dp == g.padded_total
    assert g.partition_size % 2 == 0
    assert sum(g.saved_numel(r) for r in range(dp)) == g.total
    paddings = [g.padding(r) for r in range(dp)]
    assert sum(paddings) == g.padded_total - g.total
    assert paddings == sorted(paddings), "padding only ever grows towards the last rank"


@given(large_numels.filter(bool), dps, st.data())
def test_flat_fragments_of_any_sub_range_tile_it_inside_saved_buffers(
    numels: list[int], dp: int, data: st.DataObject
) -> None:
    g = FlatGroup(tuple(numels), dp)
    i = data.draw(st.integers(0, len(numels) - 1))
    lo = data.draw(st.integers(0, numels[i]))
    hi = data.draw(st.integers(lo, numels[i]))
    fragments = g.locate(i, lo, hi)
    assert g.count(i, lo, hi) == len(fragments)
    check_fragment_run(fragments, lo, hi)
    for f in fragments:
        assert f.buffer_offset >= 0
        assert f.buffer_offset + f.numel <= g.saved_numel(f.rank)
        assert g.offsets[i] + f.param_offset == f.rank * g.partition_size + f.buffer_offset


@given(large_numels, dps)
def test_rank_mappings_over_all_ranks_are_exactly_the_located_fragments(
    numels: list[int], dp: int
) -> None:
    g = FlatGroup(tuple(numels), dp)
    by_rank = [(i, f) for r in range(dp) for i, f in g.rank_mapping(r)]
    by_param = [(i, f) for i in range(len(numels)) for f in g.locate(i)]
    assert sorted(by_rank, key=lambda e: (e[1].rank, e[0])) == by_rank
    assert sorted(by_rank, key=lambda e: (e[0], e[1].rank)) == by_param


# --- ZeRO-3: properties ------------------------------------------------------------------


stage3_groups = st.builds(
    Stage3Group,
    small_numels.map(tuple),
    dps,
    st.integers(1, 8),
)


@given(stage3_groups)
def test_stage3_rank_buffers_are_the_sum_of_partition_numels(g: Stage3Group) -> None:
    model = stage3_model(g)
    for s, members in enumerate(g.sub_groups):
        expected = sum(g.partition_numel(i) for i in members)
        assert g.sub_group_numel(s) == expected
        assert [len(buffer) for buffer in model[s]] == [expected] * g.dp


@given(stage3_groups)
def test_stage3_params_reassemble_from_rank_pieces(g: Stage3Group) -> None:
    model = stage3_model(g)
    seen: set[Marker] = set()
    for i, n in enumerate(g.numels):
        fragments = g.locate(i)
        buffers = model[g.sub_group_of(i)]
        restored = [m for f in fragments for m in read_back(buffers[f.rank], [f])]
        assert restored == [(i, k) for k in range(n)]
        seen.update((i, k) for k in range(n))
        pn = g.partition_numel(i)
        start = g.offset_in_sub_group(i)
        for r in range(g.dp):
            piece = buffers[r][start : start + pn]
            assert piece.count(None) == g.padding(i, r)
    stored = {m for sub in model for buffer in sub for m in buffer if m is not None}
    assert stored == seen
    assert sum(1 for sub in model for buffer in sub for m in buffer if m is not None) == len(seen)


@given(stage3_groups)
def test_stage3_sub_groups_follow_the_greedy_rule(g: Stage3Group) -> None:
    assert [i for members in g.sub_groups for i in members] == list(range(len(g.numels)))
    for s, members in enumerate(g.sub_groups):
        sizes = [g.partition_numel(i) for i in members]
        assert all(sum(sizes[:k]) < g.sub_group_size for k in range(1, len(sizes)))
        closed = s < len(g.sub_groups) - 1
        assert not closed or sum(sizes) >= g.sub_group_size
        for i in members:
            assert g.sub_group_of(i) == s
            assert g.offset_in_sub_group(i) == sum(sizes[: members.index(i)])


@settings(max_examples=200)
@given(large_numels.filter(bool), dps, st.integers(1, 10**13), st.data())
def test_stage3_fragments_of_any_sub_range_tile_it_inside_the_sub_group_buffer(
    numels: list[int], dp: int, sub_group_size: int, data: st.DataObject
) -> None:
    g = Stage3Group(tuple(numels), dp, sub_group_size)
    i = data.draw(st.integers(0, len(numels) - 1))
    lo = data.draw(st.integers(0, numels[i]))
    hi = data.draw(st.integers(lo, numels[i]))
    fragments = g.locate(i, lo, hi)
    assert g.count(i, lo, hi) == len(fragments)
    check_fragment_run(fragments, lo, hi)
    pn = g.partition_numel(i)
    assert pn * dp - numels[i] == sum(g.padding(i, r) for r in range(dp))
    start = g.offset_in_sub_group(i)
    for f in fragments:
        assert start <= f.buffer_offset
        assert f.buffer_offset + f.numel <= start + pn - g.padding(i, f.rank)
        assert f.buffer_offset + f.numel <= g.sub_group_numel(g.sub_group_of(i))
        assert f.param_offset == f.rank * pn + f.buffer_offset - start
