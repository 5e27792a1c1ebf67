"""Where DeepSpeed ZeRO puts every element of a trainable parameter, as integer arithmetic.

Contract
--------
Given the element counts of the trainable parameters of one optimizer param group on one
model-parallel rank, in the order DeepSpeed lays them out, and the size ``dp`` of the group
that partitions them, this module answers, for any parameter and any range of its flattened
elements, which partition ranks hold those elements and at which offset of each rank's
saved flat buffer. Answers are :class:`Fragment` s: contiguous runs, one per rank touched,
in rank order. Nothing here touches tensors, files or torch; the planner turns fragments
into reads and writes.

Every query costs O(1), O(#params) or O(#fragments returned), never O(numel): parameters
may have 10**10 elements and ``dp`` may be 65,536, so nothing walks elements or ranks that
are not part of the answer.

The rules (DeepSpeed reference notes, sections 1.4 and 1.5)
-------------------------------------------------------------
ZeRO stage 1/2 and the BF16 optimizer (:class:`FlatGroup`). The parameters are laid end to
end in one flat buffer of T elements. The buffer is zero-padded at its tail up to T', the
next multiple of an alignment equal to ``NCCL_START_ALIGNMENT * dp`` (so an empty group
stays empty). It is then cut into ``dp`` equal contiguous partitions of P = T' / dp
elements, always an even number; rank r owns flat elements [r*P, (r+1)*P). Padding only
ever sits at the tail, so the padding on rank r is the part of its partition beyond T,
clamped to [0, P]; when T is tiny several trailing ranks hold nothing but padding. Stage 1/2
saves each rank's fp32 partition with that padding cut off; the BF16 optimizer saves the
whole partition. A parameter's piece on rank r is its overlap with that rank's partition:
its start inside the partition is the overlap start minus r*P, its start inside the
parameter is the overlap start minus the parameter's flat offset. This is exactly what
DeepSpeed records as ``param_slice_mappings``.

ZeRO stage 3 (:class:`Stage3Group`). Each parameter is partitioned on its own: its
flattened elements are zero-padded at the tail to a multiple of ``dp`` and cut into ``dp``
equal pieces of pn = ceil(numel / dp) elements; rank r holds elements [r*pn, (r+1)*pn).
The optimizer groups parameters into sub-groups greedily: walking the parameters in order,
it adds up their partition sizes pn, and the parameter whose pn brings the running total to
at least ``sub_group_size`` is the last member of the sub-group it closes; whatever is left
open at the end forms a final sub-group. On every rank a sub-group's flat buffer is the
plain concatenation of its members' pieces, padding included, and is saved that way.

What it refuses, and what it leaves to the caller
-------------------------------------------------
* Malformed groups: ``dp < 1``, a negative or non-integer element count, or
  ``sub_group_size < 1`` raise :class:`ValueError` naming the offending value.
* Out-of-range parameter indices, ranks and sub-group numbers raise :class:`IndexError`;
  element ranges outside ``0 <= lo <= hi <= numel`` raise :class:`ValueError`. Negative
  indices are not read from the end: a negative rank is always a caller's bug.
* Ordering is the caller's: ``numels`` must already be in flat-buffer order. DeepSpeed's
  ``round_robin_gradients`` reordering is not modelled here; under it DeepSpeed's own
  ``param_slice_mappings`` disagree with its flat buffer, so there is no single truth to
  reproduce.
* One partition group per object: MoE expert groups, hpZ or MiCS are expressed by building
  one group per partition group with that group's ``dp``.
* Elastic checkpoints (optimizer states resized on save) and NVMe-offloaded sub-groups
  (empty tensors in the ``.pt`` file) are properties of files, not of the geometry, and are
  handled where files are read.
* A parameter with no elements has no fragment anywhere: it appears in no
  :meth:`FlatGroup.rank_mapping`. DeepSpeed asserts when such a parameter sits strictly
  inside a partition, so its ``param_slice_mappings`` never hold a zero-length entry either.
"""

from __future__ import annotations

import operator
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

NCCL_START_ALIGNMENT = 2
"""Stage 1/2 flat buffers are padded to a multiple of this many elements per rank, whatever
the dtype, so every partition starts on an even element (what NCCL wants for 16-bit data)."""


@dataclass(frozen=True, slots=True)
class Fragment:
    """One contiguous run of a parameter's flattened elements held by one partition rank.

    ``buffer_offset`` is relative to the rank's buffer that the producing class documents;
    ``param_offset`` is the position of the run's first element in the flattened parameter.
    """

    rank: int
    buffer_offset: int
    param_offset: int
    numel: int


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _clamp(value: int, low: int, high: int) -> int:
    return min(max(value, low), high)


def _validated_numels(owner: str, numels: Iterable[int]) -> tuple[int, ...]:
    """The element counts as a tuple of plain ints, so the group is hashable and exact."""
    out: list[int] = []
    for i, n in enumerate(numels):
        if isinstance(n, bool):
            raise ValueError(f"{owner}: numels[{i}] = {n!r} is a bool, not an element count")
        try:
            value = operator.index(n)
        except TypeError:
            raise ValueError(
                f"{owner}: numels[{i}] = {n!r} is not an integer element count"
            ) from None
        if value < 0:
            raise ValueError(f"{owner}: numels[{i}] = {value} is negative; counts must be >= 0")
        out.append(value)
    return tuple(out)


def _validated_at_least_one(owner: str, name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be an integer >= 1, got {name}={value!r}")
    return value


def _check_index(owner: str, what: str, value: int, size: int) -> None:
    if not 0 <= value < size:
        raise IndexError(f"{owner}: {what} {value} is out of range; valid are 0..{size - 1}")


def _element_range(owner: str, index: int, numel: int, lo: int, hi: int | None) -> int:
    """The resolved end of ``[lo, hi)``; a reversed or overhanging range is a caller's bug."""
    end = numel if hi is None else hi
    if not 0 <= lo <= end <= numel:
        raise ValueError(
            f"{owner}: element range [{lo}, {end}) of param {index} is not within "
            f"[0, {numel}]; need 0 <= lo <= hi <= numel"
        )
    return end


def _split(start: int, stop: int, piece: int, origin: int, base: int) -> list[Fragment]:
    """Cut positions ``[start, stop)`` of a line dealt out to ranks in runs of ``piece``.

    Position e lands on rank ``e // piece`` at buffer offset ``base + e % piece`` and is
    element ``e - origin`` of the parameter. Both layouts are this one cut: stage 1/2 with
    the flat buffer as the line, stage 3 with the padded parameter itself.
    """
    fragments: list[Fragment] = []
    if start >= stop:
        return fragments
    for rank in range(start // piece, (stop - 1) // piece + 1):
        lo = max(start, rank * piece)
        hi = min(stop, (rank + 1) * piece)
        fragments.append(Fragment(rank, base + lo - rank * piece, lo - origin, hi - lo))
    return fragments


def _split_count(start: int, stop: int, piece: int) -> int:
    """``len(_split(start, stop, piece, ...))`` without building it."""
    if start >= stop:
        return 0
    return (stop - 1) // piece - start // piece + 1


@dataclass(frozen=True)
class FlatGroup:
    """The ZeRO-1/2 (and BF16_Optimizer) flat buffer of one optimizer param group.

    One object per param group and model-parallel rank, ``numels`` in flat-buffer order,
    ``dp`` the size of the group that partitions it. Fragments returned by :meth:`locate`
    and :meth:`rank_mapping` have ``buffer_offset`` relative to the start of that rank's
    partition, which is also the start of its saved fp32 buffer.
    """

    numels: tuple[int, ...]
    dp: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "numels", _validated_numels("FlatGroup", self.numels))
        _validated_at_least_one("FlatGroup", "dp", self.dp)

    @cached_property
    def _bounds(self) -> tuple[int, ...]:
        """Prefix sums: param i occupies flat ``[_bounds[i], _bounds[i + 1])``."""
        return tuple(accumulate(self.numels, initial=0))

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Flat offset of each parameter: the sum of the element counts before it."""
        return self._bounds[:-1]

    @cached_property
    def _ends(self) -> tuple[int, ...]:
        """Flat end of each parameter, non-decreasing, for bisecting by position."""
        return self._bounds[1:]

    @property
    def total(self) -> int:
        """T: the number of real (non-padding) elements in the flat buffer."""
        return self._bounds[-1]

    @property
    def alignment(self) -> int:
        """A: the flat buffer's length is padded to a multiple of this."""
        return NCCL_START_ALIGNMENT * self.dp

    @property
    def padded_total(self) -> int:
        """T': T rounded up to a multiple of the alignment; an empty group stays empty."""
        return _ceil_div(self.total, self.alignment) * self.alignment

    @property
    def partition_size(self) -> int:
        """P: every rank's partition has this many elements, padding included."""
        return self.padded_total // self.dp

    def padding(self, rank: int) -> int:
        """Padding elements at the tail of ``rank``'s partition: its part beyond T."""
        _check_index("FlatGroup", "rank", rank, self.dp)
        size = self.partition_size
        return _clamp((rank + 1) * size - self.total, 0, size)

    def saved_numel(self, rank: int, strip_padding: bool = True) -> int:
        """Length of ``rank``'s saved fp32 partition.

        Stage 1/2 cuts the padding off before saving (``strip_padding=True``); the BF16
        optimizer saves the whole partition (``strip_padding=False``).
        """
        pad = self.padding(rank)
        return self.partition_size - pad if strip_padding else self.partition_size

    def _param(self, index: int, lo: int, hi: int | None) -> tuple[int, int, int]:
        _check_index("FlatGroup", "param index", index, len(self.numels))
        end = _element_range("FlatGroup", index, self.numels[index], lo, hi)
        return self.offsets[index], lo, end

    def locate(self, index: int, lo: int = 0, hi: int | None = None) -> list[Fragment]:
        """Fragments of param ``index``'s elements ``[lo, hi)``, in rank order."""
        origin, lo, hi = self._param(index, lo, hi)
        return _split(origin + lo, origin + hi, self.partition_size, origin, 0)

    def count(self, index: int, lo: int = 0, hi: int | None = None) -> int:
        """How many fragments :meth:`locate` returns, in O(1), so planners can budget first."""
        origin, lo, hi = self._param(index, lo, hi)
        return _split_count(origin + lo, origin + hi, self.partition_size)

    def rank_mapping(self, rank: int) -> list[tuple[int, Fragment]]:
        """``(param index, fragment)`` for each param with elements on ``rank``, in flat order.

        Fragment ``buffer_offset`` and ``numel`` are DeepSpeed's ``param_slice_mappings``
        start and numel for that rank; ``param_offset`` is where the slice starts in the
        parameter. Costs O(log #params + #entries) (plus any empty params in between).
        """
        _check_index("FlatGroup", "rank", rank, self.dp)
        size = self.partition_size
        begin, end = rank * size, (rank + 1) * size
        offsets, ends, numels = self.offsets, self._ends, self.numels
        mapping: list[tuple[int, Fragment]] = []
        i = bisect_right(ends, begin)
        while i < len(numels) and offsets[i] < end:
            if numels[i]:
                lo, hi = max(offsets[i], begin), min(ends[i], end)
                mapping.append((i, Fragment(rank, lo - begin, lo - offsets[i], hi - lo)))
            i += 1
        return mapping


@dataclass(frozen=True)
class Stage3Group:
    """ZeRO-3: the trainable params of one optimizer param group on one model-parallel rank.

    ``numels`` in param-group order, ``dp`` the size of their partition group and
    ``sub_group_size`` the optimizer's sub-group threshold (DeepSpeed's default 1e9).
    Fragments returned by :meth:`locate` have ``buffer_offset`` relative to the start of
    the rank's flat buffer of the parameter's sub-group, the unit DeepSpeed saves as one
    fp32 tensor per sub-group.
    """

    numels: tuple[int, ...]
    dp: int
    sub_group_size: int = 1_000_000_000

    def __post_init__(self) -> None:
        object.__setattr__(self, "numels", _validated_numels("Stage3Group", self.numels))
        _validated_at_least_one("Stage3Group", "dp", self.dp)
        _validated_at_least_one("Stage3Group", "sub_group_size", self.sub_group_size)

    @cached_property
    def _table(
        self,
    ) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Sub-groups, each param's sub-group and offset in it, and each sub-group's length.

        One pass of the greedy rule; every later query is a lookup.
        """
        groups: list[tuple[int, ...]] = []
        lengths: list[int] = []
        group_of: list[int] = []
        offset_in: list[int] = []
        members: list[int] = []
        running = 0
        for i, n in enumerate(self.numels):
            members.append(i)
            group_of.append(len(groups))
            offset_in.append(running)
            running += _ceil_div(n, self.dp)
            if running >= self.sub_group_size:
                groups.append(tuple(members))
                lengths.append(running)
                members, running = [], 0
        if members:
            groups.append(tuple(members))
            lengths.append(running)
        return tuple(groups), tuple(group_of), tuple(offset_in), tuple(lengths)

    def _check_param(self, index: int) -> None:
        _check_index("Stage3Group", "param index", index, len(self.numels))

    def partition_numel(self, index: int) -> int:
        """pn: elements of param ``index`` on every rank, padding included."""
        self._check_param(index)
        return _ceil_div(self.numels[index], self.dp)

    @property
    def sub_groups(self) -> tuple[tuple[int, ...], ...]:
        """Param indices of each optimizer sub-group, in order."""
        return self._table[0]

    def sub_group_of(self, index: int) -> int:
        """The sub-group whose flat buffers hold param ``index``'s pieces."""
        self._check_param(index)
        return self._table[1][index]

    def offset_in_sub_group(self, index: int) -> int:
        """Where param ``index``'s piece starts in each rank's flat buffer of its sub-group.

        The same on every rank, because every member contributes pn elements on every rank.
        """
        self._check_param(index)
        return self._table[2][index]

    def sub_group_numel(self, sub_group: int) -> int:
        """Per-rank length of sub-group ``sub_group``'s flat buffer, saved with padding."""
        _check_index("Stage3Group", "sub-group", sub_group, len(self._table[3]))
        return self._table[3][sub_group]

    def padding(self, index: int, rank: int) -> int:
        """Zero-filled tail elements of param ``index``'s piece on ``rank``."""
        pn = self.partition_numel(index)
        _check_index("Stage3Group", "rank", rank, self.dp)
        return _clamp((rank + 1) * pn - self.numels[index], 0, pn)

    def locate(self, index: int, lo: int = 0, hi: int | None = None) -> list[Fragment]:
        """Fragments of param ``index``'s elements ``[lo, hi)``, in rank order."""
        pn = self.partition_numel(index)
        hi = _element_range("Stage3Group", index, self.numels[index], lo, hi)
        return _split(lo, hi, pn, 0, self._table[2][index])

    def count(self, index: int, lo: int = 0, hi: int | None = None) -> int:
        """How many fragments :meth:`locate` returns, in O(1)."""
        pn = self.partition_numel(index)
        hi = _element_range("Stage3Group", index, self.numels[index], lo, hi)
        return _split_count(lo, hi, pn)
