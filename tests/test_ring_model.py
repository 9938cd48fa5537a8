"""kvmio's ring harvesting against a model of the kernel's ring protocol.

The model kernel (``ModelKernel``) publishes entries as KVM does (slot and offset, then flags =
DIRTY, one position after the other), recycles harvested entries as KVM_RESET_DIRTY_RINGS does
(it walks from its reset index while entries are marked harvested, whatever its dirty index
says), and can overrun the ring as this host's emulator does (it pushes past the end, the
newest entries overwriting the oldest).  kvmio's own :class:`~kvmio.dirty.ring.DirtyRing` and
:class:`~kvmio.dirty.ringset.RingSet` run on top of it, on ring memory that the model shares
(no vCPU: the model's reset stands in for the ioctl), with every ring size the kernel accepts
up to 65,536 entries and overruns of any length, so holes far longer than 2,048 entries.

What must hold, checked after every step:
- nothing harvested twice, and, as long as nothing was overwritten, entries in push order;
- an overwritten entry that was never harvested is reported as an overrun by the next harvest;
- an overwritten entry that was harvested but not recycled is reported by the next reset;
- a hole (the entry at the index is not dirty, a later one is) is never reported as empty:
  a harvest that stops short of its limit while a hole exists reports the hole, whatever its
  length and the ring's size;
- with no overrun, KVM_RESET_DIRTY_RINGS recycles exactly what was harvested.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvmio._abi import Mapping
from kvmio.dirty.ring import (
    GFN_DTYPE,
    GFN_SIZE,
    STOP_EMPTY,
    STOP_HOLE,
    STOP_LAPPED,
    STOP_LIMIT,
    STOP_MASK,
    DirtyEntries,
    DirtyRing,
    harvest_array,
)
from kvmio.dirty.ringset import QuickHarvest, RingSet
from kvmio.errors import DirtyRingOverrunError, KvmInvalidArgumentError

DIRTY, RESET = 1, 2
M32 = 0xFFFFFFFF
#: The kernel's largest ring: KVM_DIRTY_RING_MAX_ENTRIES.
MAX_ENTRIES = 65536


class ModelKernel:
    """The kernel's side of one vCPU's ring, on memory shared with a :class:`DirtyRing`."""

    def __init__(self, size: int, start: int = 0):
        self.size = size
        self.memory = Mapping(size * GFN_SIZE, what="model ring")
        self.gfns: npt.NDArray[np.void] = np.frombuffer(self.memory.mm, dtype=GFN_DTYPE)
        self.dirty_index = self.reset_index = start
        self.next_offset = 0
        #: An entry nobody harvested was written over (its page is lost).
        self.lost_unharvested = False
        #: An entry harvested but not yet recycled was written over (the next reset is short).
        self.overwrote_harvested = False
        self.reset_saw_overwrite = False
        self.ring_set = RingSet(size, self.reset)

    def ring(self, ring_set: RingSet | None = None, vcpu_id: int = 0) -> DirtyRing:
        """kvmio's ring on this model's memory (index ``start``, as if it had harvested that
        many entries already), in this model's ring set or in ``ring_set``."""
        ring = (ring_set or self.ring_set).map_ring(vcpu_id, -1, memory=self.memory)
        # A fresh ring is in step with the kernel: start kvmio's free-running index where the
        # model's is (close to 2**32 in some examples, to cover the wrap-around).
        ring._index[0] = self.dirty_index
        return ring

    def used(self) -> int:
        return (self.dirty_index - self.reset_index) & M32

    def publish(self, n: int, slot: int = 0) -> None:
        """Push ``n`` entries whether or not there is room (room is the caller's business)."""
        if n <= 0:
            return
        flags = self.gfns["flags"]
        first = np.arange(min(n, self.size), dtype=np.uint64)
        pos = (self.dirty_index + first) % self.size
        before = flags[pos]
        if (before == DIRTY).any() or n > self.size:
            self.lost_unharvested = True  # n > size: the push overwrites its own entries
        if (before & RESET).any():
            self.overwrote_harvested = True
        # Only the last `size` pushes survive; write them in push order.
        keep = min(n, self.size)
        idx = self.dirty_index + n - keep + np.arange(keep, dtype=np.uint64)
        pos = idx % self.size
        self.gfns["slot"][pos] = slot
        self.gfns["offset"][pos] = self.next_offset + (n - keep) + np.arange(keep)
        flags[pos] = DIRTY
        self.next_offset += n
        self.dirty_index = (self.dirty_index + n) & M32

    def push(self, n: int, slot: int = 0) -> int:
        """A well-behaved kernel: publish while there is room; returns how many."""
        n = min(n, self.size - self.used())
        self.publish(n, slot)
        return n

    def reset(self) -> int:
        """KVM_RESET_DIRTY_RINGS: recycle entries marked harvested, in order, from the reset
        index, stopping at the first other (the kernel does not bound the walk by its dirty
        index)."""
        # Whether an entry harvested but not recycled was written over before this reset
        # (the caller clears it before the calls it watches).
        self.reset_saw_overwrite |= self.overwrote_harvested
        self.overwrote_harvested = False
        flags = self.gfns["flags"]
        order = (self.reset_index + np.arange(self.size, dtype=np.uint64)) % self.size
        walk = (flags[order] & RESET) != 0
        count = self.size if walk.all() else int(np.argmin(walk))
        flags[order[:count]] = 0
        self.reset_index = (self.reset_index + count) & M32
        return count

    def hole(self, index: int) -> bool:
        """Whether the entry at ``index`` is not dirty while a later one is."""
        flags = self.gfns["flags"]
        return bool(flags[index % self.size] != DIRTY and (flags == DIRTY).any())

    def close(self) -> None:
        del self.gfns


class RingProtocol(RuleBasedStateMachine):
    """The model kernel and kvmio's ring, driven at random."""

    @initialize(log2=st.integers(min_value=2, max_value=16),
                start=st.sampled_from([0, 5, M32 - 3]))
    def setup(self, log2: int, start: int) -> None:
        self.kernel = ModelKernel(1 << log2, start)
        self.size = self.kernel.size
        self.ring = self.kernel.ring()
        self.pushed_in_step: list[int] = []  # offsets pushed while nothing was overwritten
        self.seen: set[int] = set()
        self.harvested_in_step: list[int] = []
        self.overrun = False
        self.reported = False

    def teardown(self) -> None:
        if hasattr(self, "ring"):
            self.kernel.close()
            self.ring.close()

    # -- the kernel ---------------------------------------------------------------------------

    @rule(n=st.integers(min_value=0, max_value=MAX_ENTRIES), slot=st.integers(0, 3))
    def push(self, n: int, slot: int) -> None:
        first = self.kernel.next_offset
        k = self.kernel.push(n % (self.size + 1), slot)
        if not self.overrun:
            self.pushed_in_step.extend(range(first, first + k))

    @rule(n=st.one_of(st.integers(min_value=1, max_value=100),
                      st.integers(min_value=1, max_value=3 * MAX_ENTRIES)))
    def overrun_ring(self, n: int) -> None:
        """The emulator pushes past the end: up to three rings' worth beyond the room left."""
        n = self.size - self.kernel.used() + 1 + n % (3 * self.size)
        self.kernel.publish(n, 9)
        self.overrun = True

    @rule()
    def reset(self) -> None:
        expected = self.ring.pending_reset
        self.kernel.reset_saw_overwrite = False
        count = self.ring_set_reset()
        report = self.kernel.ring_set.take_reset_report()
        if report is not None or count < 0:
            self.reported = True  # a short (or long) reset is how some losses show
        if not self.kernel.reset_saw_overwrite and not self.overrun:
            assert count == expected and report is None  # reset == harvested
        if self.kernel.reset_saw_overwrite and expected:
            # Ours were written over before the kernel recycled them: the reset is short.
            assert report is not None or self.ring.shortfall > 0

    def ring_set_reset(self) -> int:
        try:
            return self.kernel.ring_set.reset(on_overrun="report")
        except DirtyRingOverrunError:  # more recycled than harvested: never short
            return -1

    # -- kvmio --------------------------------------------------------------------------------

    @rule(limit=st.one_of(st.none(), st.integers(min_value=1, max_value=MAX_ENTRIES)))
    def harvest(self, limit: int | None) -> None:
        lim = self.size if limit is None else min(limit, self.size)
        lost_before = self.kernel.lost_unharvested
        taken_before = self.ring.harvested_total
        got = self.ring.harvest(lim, on_overrun="report")
        offsets = got.offsets.tolist()
        assert not self.seen.intersection(offsets), "an entry was harvested twice"
        self.seen.update(offsets)
        if not self.overrun:
            self.harvested_in_step.extend(offsets)
        if lost_before:
            assert self.ring.overruns > 0 or self.reported, "an overwrite went unreported"
        stopped_short = self.ring.harvested_total - taken_before < lim
        if stopped_short and self.kernel.hole(self.ring.index):
            assert self.ring.hole_pending, (
                f"a hole was reported as empty (ring of {self.size}, index {self.ring.index})")

    @rule()
    def collect(self) -> None:
        """A whole collection as the VM makes it: the quick native path when the ring set is
        quiet (its reset through the model, as a caller without a VM fd does), else the
        general transaction."""
        rs = self.kernel.ring_set
        lost_before = self.kernel.lost_unharvested
        self.kernel.reset_saw_overwrite = False
        try:
            got = rs.collect_quick(-1, "report")
            if got is None:
                got = rs.harvest_and_reset(on_overrun="report")
        except DirtyRingOverrunError:  # more recycled than harvested: never short
            self.reported = True
            return
        if isinstance(got, QuickHarvest):
            entries = got.entries_of()
            overruns = {}
        else:
            entries, overruns = got.all_entries(), got.overruns
        if overruns:
            self.reported = True
        offsets = entries.offsets.tolist()
        assert not self.seen.intersection(offsets), "an entry was harvested twice"
        self.seen.update(offsets)
        if not self.overrun:
            self.harvested_in_step.extend(offsets)
        if lost_before:
            assert self.ring.overruns > 0 or self.reported, "an overwrite went unreported"
        if not self.overrun and not self.kernel.reset_saw_overwrite:
            assert self.ring.pending_reset == 0  # reset == harvested, in step

    @precondition(lambda self: hasattr(self, "ring") and (self.ring.hole_pending
                                                         or self.ring.shortfall > 0))
    @rule()
    def repair(self) -> None:
        """The owner repairs the ring (its vCPU is outside KVM_RUN: there is none here).  A
        ring overrun again and again without a reset in between may be beyond repair: that
        is an error, never silence."""
        try:
            repair = self.ring.resync if self.ring.shortfall else self.ring.recover_from_overrun
            got = repair()
        except DirtyRingOverrunError:
            self.reported = True  # the repair's own reset found the ring out of step
            return
        offsets = got.offsets.tolist()
        assert not self.seen.intersection(offsets), "an entry was harvested twice"
        self.seen.update(offsets)

    @invariant()
    def in_order_and_nothing_lost(self) -> None:
        if hasattr(self, "ring") and not self.overrun:
            n = len(self.harvested_in_step)
            assert self.harvested_in_step == self.pushed_in_step[:n]


RingProtocol.TestCase.settings = settings(max_examples=200, stateful_step_count=25,
                                          deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
test_ring_protocol = RingProtocol.TestCase


def _overrun_by_partial_harvests(size: int, lost: int) -> tuple[ModelKernel, DirtyRing]:
    """An overrun that the full-ring count cannot see: a ring filled to the brim plus ``lost``
    entries, then a small partial harvest and a reset (so no harvest since a reset ever takes
    a whole ring), then the rest.  The kernel's dirty index ends ``lost`` entries past kvmio's
    index, and what it publishes next lands past a hole of ``lost`` entries."""
    kernel = ModelKernel(size)
    ring = kernel.ring()
    kernel.publish(size + lost)
    ring.harvest(100, on_overrun="report")
    kernel.ring_set.reset(on_overrun="report")
    ring.harvest(on_overrun="report")
    kernel.ring_set.reset(on_overrun="report")
    kernel.push(10)  # past the hole
    return kernel, ring


@pytest.mark.parametrize(("size", "lost"), [(8192, 2049), (8192, 5000), (MAX_ENTRIES, 40000),
                                            (4096, 1)])
def test_partial_harvests_cannot_hide_an_overrun(size: int, lost: int) -> None:
    kernel, ring = _overrun_by_partial_harvests(size, lost)
    try:
        assert ring.overruns >= 1, "the overrun went unnoticed"
        assert kernel.hole(ring.index)
        got = ring.harvest(on_overrun="report")
        assert len(got) == 0 and ring.hole_pending, "a hole was reported as empty"
        # Recovery skips exactly the lost entries and takes what follows the hole.
        after = ring.recover_from_overrun()
        assert ring.lost_total == lost
        assert len(after) == 10 and not ring.hole_pending
    finally:
        kernel.close()
        ring.close()


def test_lapped_is_seen_by_a_limited_harvest_in_o1() -> None:
    """A ring published a whole lap past the index is reported even by a one-entry harvest."""
    ring = np.zeros(64, dtype=GFN_DTYPE)
    ring["flags"] = DIRTY
    got, idx, stop = harvest_array(ring, 10, 1, window=0)
    assert len(got) == 1 and idx == 11
    assert stop & STOP_MASK == STOP_LIMIT and stop & STOP_LAPPED
    ring["flags"][:] = 0
    ring["flags"][12:20] = DIRTY  # not lapped: the entry before the index is not dirty
    _, _, stop = harvest_array(ring, 12, 1, window=0)
    assert not stop & STOP_LAPPED


@pytest.mark.parametrize("size", [4, 4096, MAX_ENTRIES])
@pytest.mark.parametrize("hole", [1, 2049, "most"])
def test_hole_of_any_length_found_by_a_full_scan(size: int, hole: int | str) -> None:
    length = size - 2 if hole == "most" else min(int(hole), size - 2)
    ring = np.zeros(size, dtype=GFN_DTYPE)
    index = 7
    ring["flags"][(index + length) % size] = DIRTY
    got, idx, stop = harvest_array(ring, index)
    assert len(got) == 0 and idx == index and stop & STOP_MASK == STOP_HOLE
    ring["flags"][:] = 0
    _, _, stop = harvest_array(ring, index)
    assert stop == STOP_EMPTY


def _two_vcpus(size: int) -> tuple[list[ModelKernel], RingSet, list[DirtyRing]]:
    kernels = [ModelKernel(size), ModelKernel(size)]
    ring_set = RingSet(size, lambda: sum(k.reset() for k in kernels))
    rings = [k.ring(ring_set, vcpu_id=j) for j, k in enumerate(kernels)]
    return kernels, ring_set, rings


def _offsets(entries: list[DirtyEntries]) -> list[int]:
    return sorted(o for e in entries for o in e.offsets.tolist())


@pytest.mark.parametrize("overrun_ring", [0, 1])
def test_one_native_call_keeps_every_ring_when_one_overran(overrun_ring: int) -> None:
    """Every ring of a VM is harvested in one native call.  When one of them is found overrun,
    the collection raises, and what *every* ring gave (the overrun one too) comes back with
    the next collection, once each: the other ring's entries are not dropped because they
    were taken in the same call."""
    kernels, ring_set, rings = _two_vcpus(256)
    try:
        kernels[1 - overrun_ring].push(100)
        kernels[1 - overrun_ring].next_offset = 10_000  # tell the rings' entries apart
        kernels[overrun_ring].next_offset = 20_000
        kernels[overrun_ring].publish(256)  # a whole ring: lapped at the next harvest
        with pytest.raises(DirtyRingOverrunError, match=r"filled completely|whole ring"):
            ring_set.harvest_and_reset()
        got = ring_set.harvest_and_reset(on_overrun="report")
        assert _offsets([e for _, e in got.rings]) == sorted(
            [*range(100), *range(20_000, 20_256)])
        assert got.overruns.keys() <= {overrun_ring}
        assert ring_set.pending_reset() == 0
        # Nothing more: the next collection is empty and needs no reset.
        again = ring_set.harvest_and_reset(on_overrun="report")
        assert again.entries == 0 and all(k.used() == 0 for k in kernels)
    finally:
        for k in kernels:
            k.close()
        for r in rings:
            r.close()


def test_native_harvest_follows_rings_that_close_and_stashes() -> None:
    """The native control array follows the open rings: a closed ring's leftovers reach the
    next collection as orphans, and a ring-full drain's stash comes first in its ring."""
    kernels, ring_set, rings = _two_vcpus(64)
    try:
        kernels[0].push(5)
        kernels[1].push(7)
        assert ring_set.harvest_and_reset().entries == 12
        kernels[0].push(3)
        rings[0].drain()  # a ring-full exit: stashed, reset
        kernels[0].push(2)
        kernels[1].push(4)
        rings[1].close()  # its 4 entries become orphans
        got = ring_set.harvest_and_reset()
        assert [len(e) for _, e in got.rings] == [5] and sum(len(o) for o in got.orphans) == 4
        assert got.rings[0][1].offsets.tolist() == [5, 6, 7, 8, 9]  # stash first, in order
    finally:
        for k in kernels:
            k.close()
        rings[0].close()


def test_compiled_groups_are_the_pages_of_every_rings_entries() -> None:
    """The one-call collection also groups every ring's entries into sorted distinct pages per
    slot; they must be exactly what the entries it returns say, and it must give none when a
    ring's stashed entries (not in the groups) come first."""
    kernels, ring_set, rings = _two_vcpus(256)
    rng = np.random.default_rng(7)
    try:
        for _ in range(5):
            for k in kernels:
                for slot in rng.permutation(3).tolist():
                    n = int(rng.integers(0, 40))
                    k.next_offset = int(rng.integers(0, 1000))  # repeats across pushes
                    k.push(n, slot)
            got = ring_set.harvest_and_reset()
            entries = DirtyEntries.concat([e for _, e in got.rings])
            want = {raw: (p.tolist(), c) for raw, p, c in entries.slot_groups()}
            if len(entries):
                assert got.groups is not None
                assert {raw: (p.tolist(), c) for raw, p, c in got.groups} == want
                assert all(not p.flags.writeable for _, p, _ in got.groups)
        kernels[0].push(3)
        rings[0].drain()  # stashed: the next collection returns it first, outside the groups
        kernels[1].push(2)
        got = ring_set.harvest_and_reset()
        assert got.groups is None and got.entries == 5
    finally:
        for k in kernels:
            k.close()
        for r in rings:
            r.close()


def test_an_interrupt_inside_a_collection_loses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C (any exception) after the one native call took every ring's entries, while
    the rings account for them one by one: the rings not reached keep theirs, and the next
    collection returns every entry once, with the reset in step."""
    kernels, ring_set, rings = _two_vcpus(64)
    try:
        kernels[0].push(10)
        kernels[1].next_offset = 100
        kernels[1].push(20)
        real = DirtyRing.settle_native
        calls = []

        def interrupted(self: DirtyRing, *a: object, **k: object) -> DirtyEntries:
            calls.append(self.vcpu_id)
            if self.vcpu_id == 1:
                raise KeyboardInterrupt
            return real(self, *a, **k)  # type: ignore[arg-type]

        monkeypatch.setattr(DirtyRing, "settle_native", interrupted)
        with pytest.raises(KeyboardInterrupt):
            ring_set.harvest_and_reset()
        assert calls == [0, 1]
        monkeypatch.setattr(DirtyRing, "settle_native", real)
        got = ring_set.harvest_and_reset()
        assert _offsets([e for _, e in got.rings]) == [*range(10), *range(100, 120)]
        assert all(k.used() == 0 for k in kernels) and ring_set.pending_reset() == 0
    finally:
        for k in kernels:
            k.close()
        for r in rings:
            r.close()


def test_an_unattributable_short_reset_widens_every_ring_and_drains_next() -> None:
    """A reset that does not match and cannot be charged to one ring is an error, and every
    ring harvested since the last reset may be out of step: all of them scan for holes from
    then on, and the next reset recycles everything the kernel still holds."""
    kernels = [ModelKernel(64), ModelKernel(64)]
    cut = [1]

    def short_reset() -> int:
        n = sum(k.reset() for k in kernels)
        if cut[0] and n:
            cut[0] = 0
            return n - 1  # as if a harvested entry had been written over
        return n

    ring_set = RingSet(64, short_reset)
    rings = [k.ring(ring_set, vcpu_id=j) for j, k in enumerate(kernels)]
    try:
        for k in kernels:
            k.push(5)
        assert all(r.hole_window == 0 for r in rings)
        with pytest.raises(DirtyRingOverrunError, match="reset 9 entries but 10"):
            ring_set.harvest_and_reset(on_overrun="report")
        assert all(r.hole_window == 63 and r.suspect for r in rings)
        kernels[0].push(3)
        # The failed collection's entries come back (nothing dropped), then the new ones; the
        # draining reset after the mismatch is no error.
        got = ring_set.harvest_and_reset(on_overrun="report")
        assert got.entries == 13 and not got.overruns
    finally:
        for k in kernels:
            k.close()
        for r in rings:
            r.close()


def test_ring_set_refuses_foreign_rings_and_takes_each_once() -> None:
    kernels, ring_set, rings = _two_vcpus(16)
    other = ModelKernel(16)
    stranger = other.ring()
    try:
        with pytest.raises(KvmInvalidArgumentError, match="is not a ring of this ring set"):
            ring_set.harvest_and_reset([rings[0], stranger])
        kernels[0].push(4)
        got = ring_set.harvest_and_reset([rings[0], rings[0]])
        assert len(got.rings) == 1 and got.entries == 4
    finally:
        for k in [*kernels, other]:
            k.close()
        for r in [*rings, stranger]:
            r.close()


def test_harvest_array_rejects_bad_rings() -> None:
    with pytest.raises(KvmInvalidArgumentError, match="power of two"):
        harvest_array(np.zeros(6, dtype=GFN_DTYPE), 0)
    with pytest.raises(KvmInvalidArgumentError, match="GFN_DTYPE"):
        harvest_array(np.zeros(8, dtype=np.uint64), 0)  # type: ignore[arg-type]
    with pytest.raises(KvmInvalidArgumentError, match="limit"):
        harvest_array(np.zeros(8, dtype=GFN_DTYPE), 0, -1)


def test_ring_memory_too_small_is_refused() -> None:
    kernel = ModelKernel(16)
    try:
        with pytest.raises(KvmInvalidArgumentError, match="needs 512 bytes"):
            RingSet(32, kernel.reset).map_ring(0, -1, memory=kernel.memory)
    finally:
        kernel.close()


def test_full_wrap_around_harvest() -> None:
    ring = np.zeros(16, dtype=GFN_DTYPE)
    ring["flags"] = DIRTY
    ring["offset"] = np.arange(16)
    got, idx, stop = harvest_array(ring, 10)
    assert got.offsets.tolist() == [*range(10, 16), *range(10)]
    assert idx == 26 and stop & STOP_MASK == STOP_LIMIT and stop & STOP_LAPPED
    assert (ring["flags"] == RESET).all()
