"""Guarantees that a mutation check of the dirty-ring core and the tracker found unproven: each
test here fails on a deliberately broken variant of kvmio (a mutant) that every other test
let through.

Most run kvmio's own ring and ring set on the model kernel of ``test_ring_model`` (no vCPU:
exact, repeatable sequences of publishes, overruns and resets); the rate test runs a real
guest on /dev/kvm.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from kvmio import Hlt, Kvm, KvmError, KvmStateError
from kvmio._abi import Mapping
from kvmio.dirty.pages import PageSet
from kvmio.dirty.ring import (
    GFN_DTYPE,
    GFN_SIZE,
    STOP_EMPTY,
    STOP_HOLE,
    STOP_LIMIT,
    STOP_MASK,
    DirtyEntries,
    harvest_array,
)
from kvmio.dirty.ringset import RingSet
from kvmio.guests.workload import Workload
from kvmio.tracker import DirtyRate, DirtyTracker
from test_ring_model import DIRTY, ModelKernel

# -- a reset that the kernel cut short: the ring owes the difference, resync pays it -----------


def test_a_short_reset_is_owed_by_the_ring_and_resync_brings_it_back_in_step() -> None:
    """The kernel writes over harvested entries before the reset reaches them: the reset comes
    back short, the one ring to blame owes the difference (``shortfall``), and ``resync`` takes
    exactly the entries written over ours, after which reset == harvested again."""
    k = ModelKernel(8)
    ring = k.ring()
    try:
        k.publish(8)
        first = ring.harvest(5, on_overrun="report")  # 0..4, marked harvested, not recycled
        assert first.offsets.tolist() == [0, 1, 2, 3, 4]
        k.publish(2)  # over positions 0 and 1: two of ours, harvested but not yet recycled
        assert k.overwrote_harvested
        assert k.ring_set.reset(on_overrun="report") == 0  # stops at once: position 0 is dirty
        vcpu, why = k.ring_set.take_reset_report() or (None, "")
        assert vcpu == 0 and "reset 0 entries but 5" in why
        assert ring.shortfall == 5 and ring.suspect is True
        assert ring.pending_reset == 0  # the accounting starts afresh; the ring owes the 5

        got = ring.resync()
        assert got.offsets.tolist() == [8, 9]  # the two the kernel wrote over ours
        assert ring.shortfall == 0 and ring.pending_reset == 0
        assert ring.harvested_total == 5 + 2
        assert k.reset_index == ring.index == 5  # the kernel recycled up to our index again
        assert len(ring.resync()) == 0 and ring.resync().offsets.tolist() == []  # in step

        rest = ring.harvest(on_overrun="report")  # resumes where it stopped
        assert rest.offsets.tolist() == [5, 6, 7]
        assert k.ring_set.reset(on_overrun="report") == 3  # reset == harvested
        assert k.ring_set.take_reset_report() is None
    finally:
        k.close()
        ring.close()


def test_a_shortfall_of_exactly_one_ring_can_still_be_resynchronised() -> None:
    k = ModelKernel(8)
    ring = k.ring()
    try:
        k.publish(8)
        assert len(ring.harvest(on_overrun="report")) == 8
        k.publish(3)
        assert k.ring_set.reset(on_overrun="report") == 0
        assert ring.shortfall == 8 == ring.size
        assert ring.resync().offsets.tolist() == [8, 9, 10]
        assert ring.shortfall == 0 and ring.pending_reset == 0
        assert k.reset_index == ring.index == 8
    finally:
        k.close()
        ring.close()


# -- one reset for two vCPUs' rings ------------------------------------------------------------


class TwoRings:
    """Two vCPUs' rings in one ring set over two model kernels: KVM_RESET_DIRTY_RINGS walks
    both (vCPU 0's first).  ``calls`` scripts what each reset call does: "walk" (reset both
    rings), "fail" (raise), or a count (reset that many, vCPU 0's first: cut short)."""

    def __init__(self, size: int):
        self.k = [ModelKernel(size), ModelKernel(size)]
        self.calls: list[str | int] = []
        self.ring_set = RingSet(size, self.reset)
        self.rings = [self.ring_set.map_ring(i, -1, memory=k.memory) for i, k in enumerate(self.k)]

    def reset(self) -> int:
        what = self.calls.pop(0) if self.calls else "walk"
        if what == "fail":
            raise KvmError("reset failed", errno=14, ioctl="KVM_RESET_DIRTY_RINGS")
        if what == "walk":
            return self.k[0].reset() + self.k[1].reset()
        n = int(what)  # recycle only the first n harvested entries
        done = 0
        for k in self.k:
            flags = k.gfns["flags"]
            while done < n and flags[k.reset_index % k.size] & 2:
                flags[k.reset_index % k.size] = 0
                k.reset_index = (k.reset_index + 1) & 0xFFFFFFFF
                done += 1
        return done

    def close(self) -> None:
        for k, r in zip(self.k, self.rings, strict=True):
            k.close()
            r.close()


def test_a_short_reset_of_two_rings_is_owed_by_the_one_found_full() -> None:
    t = TwoRings(8)
    try:
        t.k[0].publish(8)  # vCPU 0's ring completely full
        t.k[1].push(2)
        assert len(t.rings[0].harvest(on_overrun="report")) == 8 and t.rings[0].lapped
        assert len(t.rings[1].harvest(on_overrun="report")) == 2 and not t.rings[1].lapped
        t.k[0].publish(2)  # over two of vCPU 0's harvested entries, before the reset
        assert t.ring_set.reset(on_overrun="report") == 2  # only vCPU 1's were recycled
        vcpu, why = t.ring_set.take_reset_report() or (None, "")
        assert vcpu == 0 and "reset 2 entries but 10" in why
        assert t.rings[0].shortfall == 8 and t.rings[1].shortfall == 0
    finally:
        t.close()


def test_what_a_failing_reset_recycled_is_no_longer_pending() -> None:
    """A reset cut short by a signal (it recycled 4 of 5) whose repeat then fails: the 4 are
    recycled, whichever ring they came from, and only 1 is still pending; the next reset
    recycles exactly that one."""
    t = TwoRings(8)
    try:
        t.k[0].push(3)
        t.k[1].push(2)
        assert len(t.rings[0].harvest()) == 3 and len(t.rings[1].harvest()) == 2
        assert t.ring_set.pending_reset() == 5
        t.calls = [4, "fail"]
        with pytest.raises(KvmError, match="reset failed"):
            t.ring_set.reset()
        assert t.ring_set.pending_reset() == 1
        assert (t.rings[0].pending_reset, t.rings[1].pending_reset) == (0, 1)
        assert t.ring_set.reset() == 1  # reset == harvested: no error
    finally:
        t.close()


# -- a collection that fails hands everything back ---------------------------------------------


class FailingResetKernel(ModelKernel):
    """A model kernel whose next KVM_RESET_DIRTY_RINGS fails (after doing nothing)."""

    def __init__(self, size: int):
        super().__init__(size)
        self.fail_next = False

    def reset(self) -> int:
        if self.fail_next:
            self.fail_next = False
            raise KvmError("reset failed", errno=4, ioctl="KVM_RESET_DIRTY_RINGS")
        return super().reset()


def test_a_failed_collection_gives_back_everything_it_harvested_first_and_in_order() -> None:
    k = FailingResetKernel(16)
    ring = k.ring()
    try:
        k.push(5)
        k.fail_next = True
        with pytest.raises(KvmError, match="reset failed"):
            k.ring_set.harvest_and_reset()
        k.push(3)
        got = k.ring_set.harvest_and_reset()  # the reset works now: it matches
        assert got.all_entries().offsets.tolist() == list(range(8))
        assert got.entries == 8 and not got.overruns
        # Still the ring's own (its vCPU's rate counts them), not orphans of a closed ring.
        assert [r for r, _ in got.rings] == [ring] and got.orphans == []
        assert got.rings[0][1].offsets.tolist() == list(range(8))
        assert ring.pending_reset == 0 and k.reset_index == 8
    finally:
        k.close()
        ring.close()


class LappingKernel(ModelKernel):
    """A model kernel whose vCPU pushes ``lap`` more entries just before the next reset."""

    lap = 0

    def reset(self) -> int:
        lap, self.lap = self.lap, 0
        self.publish(lap)
        return super().reset()


def test_a_collection_names_every_overrun_it_survives_and_when_it_harvested() -> None:
    k = LappingKernel(8)
    ring = k.ring()
    try:
        k.publish(8)  # completely full
        before = time.monotonic()
        got = k.ring_set.harvest_and_reset(on_overrun="report")
        assert before <= got.time <= time.monotonic()  # the end of the period it covers
        assert got.entries == 8 and list(got.overruns) == [0]
        assert "filled completely" in got.overruns[0]
        # Pushed over ours before the reset reached them: the reset is short, and named.
        k.push(8)
        k.lap = 2
        got = k.ring_set.harvest_and_reset(on_overrun="report")
        assert got.entries == 8 and list(got.overruns) == [0]
        assert "reset 0 entries but 8" in got.overruns[0]
        assert ring.shortfall == 8
    finally:
        k.close()
        ring.close()


def test_a_collection_of_some_rings_leaves_the_others_alone() -> None:
    """An owner collects only the rings it passes (another harvester owns the rest)."""
    k = ModelKernel(8)
    ring = k.ring()
    other_memory = Mapping(8 * GFN_SIZE, what="another ring")
    other = k.ring_set.map_ring(1, -1, memory=other_memory)
    other_gfns = np.frombuffer(other_memory.mm, dtype=GFN_DTYPE)
    try:
        other_gfns["flags"][:2] = DIRTY
        k.push(3)
        got = k.ring_set.harvest_and_reset([ring])
        assert [r for r, _ in got.rings] == [ring] and got.entries == 3
        assert other.count_dirty() == 2 and other.harvested_total == 0
    finally:
        del other_gfns
        k.close()
        ring.close()
        other.close()


def test_entries_given_back_to_a_closed_ring_go_to_its_ring_set() -> None:
    k = ModelKernel(16)
    ring = k.ring()
    k.push(3)
    got = ring.harvest()
    assert k.ring_set.pending_reset() == 3
    k.close()
    ring.close()
    assert k.ring_set.pending_reset() == 3  # still owed by the closed ring: the next reset
    ring.give_back(got)  # the collection that harvested them failed after the ring closed
    orphans = k.ring_set.take_orphans()
    assert [o.offsets.tolist() for o in orphans] == [[0, 1, 2]]


# -- a ring stuck full of lost entries is stepped past them ------------------------------------


def test_a_stuck_ring_is_stepped_past_its_lost_entries_a_soft_limit_at_a_time() -> None:
    """The kernel counts 200 entries of a 256-entry ring that nobody can harvest (overwritten):
    each stuck ring-full exit skips at most a quarter ring (256 - 576 < 64) and resets, the
    kernel's reset index following ours; the hole that shows next is recovered, and then every
    entry is harvested again, with exactly the 200 lost counted as lost."""
    k = ModelKernel(256)
    ring = k.ring()
    try:
        ring.before_run()
        k.dirty_index += 200  # counted by the kernel, never shown: lost
        assert ring.count_dirty() == 0
        for step in range(1, 4):
            assert ring.stuck()
            assert ring.recover_stuck() == 64
            assert ring.lost_total == 64 * step and ring.progress == 64 * step
            assert k.reset_index == ring.index == 64 * step  # reset == skipped
            assert ring.pending_reset == 0 and ring.hole_pending is False
            assert ring.suspect is True  # not repaired yet: harvest it with the vCPU held
            assert not ring.stuck()  # a new KVM_RUN must show it stuck again
            with pytest.raises(KvmStateError, match="not stuck"):
                ring.recover_stuck()
            ring.before_run()
        k.push(10)  # past the 8 lost entries still counted
        assert len(ring.harvest(on_overrun="report")) == 0
        assert ring.hole_pending  # seen: hole scans cover the whole ring from now on
        after = ring.recover_from_overrun()
        assert after.offsets.tolist() == list(range(10))
        assert ring.lost_total == 200 and not ring.hole_pending
        assert k.reset_index == k.dirty_index == ring.index
    finally:
        k.close()
        ring.close()


# -- a full ring that was reset is in step again -----------------------------------------------


def test_mark_in_step_clears_suspicion_only_when_nothing_is_outstanding() -> None:
    k = ModelKernel(8)
    ring = k.ring()
    try:
        k.publish(8)  # a completely full ring: reported, and suspect
        assert len(ring.harvest(on_overrun="report")) == 8 and ring.suspect is True
        assert ring.lapped
        ring.mark_in_step()
        assert ring.suspect is True  # full since the last reset: not in step yet
        assert k.ring_set.reset(on_overrun="report") == 8
        assert not ring.lapped
        ring.mark_in_step()
        assert ring.suspect is False
        # A hole pending (2 entries counted, never shown) keeps it suspect.
        k.dirty_index += 2
        k.push(3)
        assert len(ring.harvest(on_overrun="report")) == 0 and ring.hole_pending
        assert not ring.lapped and ring.shortfall == 0
        ring.mark_in_step()
        assert ring.suspect is True
    finally:
        k.close()
        ring.close()


# -- the array harvester --------------------------------------------------------------------


def test_harvest_array_limit_zero_takes_nothing_and_window_zero_does_not_scan() -> None:
    ring = np.zeros(16, dtype=GFN_DTYPE)
    ring["flags"][3:6] = DIRTY
    got, idx, stop = harvest_array(ring, 3, 0)
    assert len(got) == 0 and got.offsets.tolist() == [] and idx == 3 and stop == STOP_LIMIT
    assert (ring["flags"][3:6] == DIRTY).all()  # untouched
    # A hole at the index: the default window finds it, window=0 does not look.
    _, idx, stop = harvest_array(ring, 1)
    assert idx == 1 and stop & STOP_MASK == STOP_HOLE
    _, idx, stop = harvest_array(ring, 1, window=0)
    assert idx == 1 and stop & STOP_MASK == STOP_EMPTY


def test_entry_addresses_of_several_slots(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        a = vm.add_memory_region(0x100000, 16 * 4096)
        b = vm.add_memory_region(0x40000000, 16 * 4096)
        entries = DirtyEntries(np.array([a.slot, b.slot, a.slot], dtype=np.uint32),
                               np.array([0, 5, 3], dtype=np.uint64))
        gpas = entries.gpas(vm.regions)
        assert gpas.dtype == np.uint64
        assert gpas.tolist() == [0x100000, 0x40000000 + 5 * 4096, 0x100000 + 3 * 4096]


# -- page sets --------------------------------------------------------------------------------


def test_page_set_equality_union_runs_and_ranges() -> None:
    a = PageSet({1: [5, 3, 4, 9], 2: [0]})
    b = PageSet({1: [3, 4, 5, 9, 9], 2: [0]})
    assert a == b
    assert (a != b) is False
    assert a != PageSet({1: [3, 4, 5, 9]})  # a slot missing
    assert a != PageSet({1: [3, 4, 5, 8], 2: [0]})  # a page differs
    assert a != PageSet({1: [3, 4, 5, 9], 3: [0]})  # another slot
    assert (a == {1: [3, 4, 5, 9]}) is False
    c = a | PageSet({1: [6], 3: [7]})
    assert c == PageSet({1: [3, 4, 5, 6, 9], 2: [0], 3: [7]})
    first, count = c.runs(1)
    assert first.tolist() == [3, 9] and count.tolist() == [4, 1]
    assert [x.tolist() for x in c.runs(42)] == [[], []]  # a slot without pages
    bases = {1: 0x100000, 2: 0x0, 3: 0x10000000}
    assert c.ranges(bases) == [(0x0, 4096), (0x100000 + 3 * 4096, 4 * 4096),
                               (0x100000 + 9 * 4096, 4096), (0x10000000 + 7 * 4096, 4096)]
    gpas = c.gpas(bases)
    assert gpas.dtype == np.uint64 and gpas.tolist() == sorted(gpas.tolist())
    assert repr(c) == "PageSet({1: 5, 2: 1, 3: 1} pages)"


def test_a_bitmap_never_names_a_page_past_the_slot() -> None:
    """A slot of 70 pages has a 2-word bitmap; bits past page 69 (set by a sloppy writer, or
    stale) are not pages of the slot."""
    words = np.array([0, (1 << 64) - 1], dtype=np.uint64)
    assert PageSet.from_bitmap(3, words, 70) == PageSet({3: range(64, 70)})
    words[0] = 1 << 63
    assert PageSet.from_bitmap(3, words, 64)[3].tolist() == [63]


# -- the tracker's rate is the latest pass's ----------------------------------------------------


NO_WORKER = 3600.0


def test_rate_and_heatmap_are_the_passes_and_empty_before_any(kvm: Kvm) -> None:
    with (Workload(kvm, mem_size=16 << 20, ring_entries=4096, max_writes=300,
                   order="sequential", value="count") as w,
          DirtyTracker(w.vm, "ring", interval=NO_WORKER, window=60.0) as tracker):
        assert tracker.rate() == DirtyRate(0.0, {}, 60.0)
        times, counts, _ = tracker.heatmap()  # no pass yet: empty, of the right shape
        assert times.dtype == np.float64 and times.shape == (0,)
        assert counts.dtype == np.int64 and counts.shape == (0, 128)
        assert isinstance(w.run_vcpu(0, on_ring_full=tracker.on_ring_full), Hlt)
        tracker.take()
        target = w.writes(0) + 500
        w.vm.write_memory(w.params_addr(0) + 80, target.to_bytes(8, "little"))
        assert isinstance(w.run_vcpu(0, on_ring_full=tracker.on_ring_full), Hlt)
        tracker.take()
        tracker.take()  # a pass that finds nothing: the window still holds the others
        samples = list(tracker.samples)
        assert len(samples) >= 3
        assert samples[-1].pages == 0 and samples[-2].pages > 0
        rates = [s.pages_per_second for s in samples]
        assert len(set(rates[-3:])) == 3  # each pass its own rate
        r = tracker.rate()
        assert r.pages_per_second == samples[-1].pages_per_second > 0
        assert r.vcpu_pages_per_second == samples[-1].vcpu_pages_per_second
        assert set(r.vcpu_pages_per_second) == {0} and r.window == 60.0
        assert r.vcpu_pages_per_second[0] == pytest.approx(r.pages_per_second)
        times, counts, _ = tracker.heatmap()
        assert times.tolist() == [s.time for s in samples] and counts.shape == (3, 128)
        assert counts.sum(axis=1).tolist() == [s.pages for s in samples]
