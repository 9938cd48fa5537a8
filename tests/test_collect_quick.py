"""The quick collection: harvest, KVM_RESET_DIRTY_RINGS and dedup of every ring in one native
call (``RingSet.collect_quick``), taken by ``Vm.collect_dirty_pages`` and the tracker whenever
the rings need no accounting beyond counting.  These tests check that it is taken, that it
reports exactly what the guest wrote, and that each way it can end other than cleanly (a reset
that fails, a reset whose count does not match) is accounted for as the general path does.
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from kvmio import DirtyRingOverrunError, Hlt, Kvm, KvmError, _abi
from kvmio._abi import lib
from kvmio.dirty import ringset
from kvmio.dirty.ringset import VM_WIDE, QuickHarvest, RingSet
from kvmio.guests.workload import MEM_BASE, MEM_SLOT, Workload
from kvmio.tracker import DirtyTracker
from test_collect_proofs import FailOnce, _pages_of, _set_max_writes
from test_ring_model import ModelKernel


@pytest.fixture
def outcomes(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts what ``RingSet.collect_quick`` returned, by type (observes, changes nothing)."""
    seen: Counter[str] = Counter()
    real = RingSet.collect_quick

    def spy(self: RingSet, *args: Any, **kwargs: Any) -> Any:
        got = real(self, *args, **kwargs)
        seen[type(got).__name__] += 1
        return got

    monkeypatch.setattr(ringset.RingSet, "collect_quick", spy)
    return seen


def _rounds(w: Workload, rounds: int, step: int) -> Iterator[set[int]]:
    """Run vCPU 0 for ``step`` more writes per round (a new generation each round) and yield
    the pages the round wrote, read from guest memory."""
    for r in range(rounds):
        w.generation = r + 2
        _set_max_writes(w, 0, step * (r + 1))
        assert isinstance(w.run_vcpu(0), Hlt)
        yield set(np.flatnonzero(w.mem.page_words() == r + 2).tolist())


@pytest.mark.kvm
@pytest.mark.parametrize("order", ["sequential", "random"])
def test_the_quick_path_is_taken_and_reports_exactly_the_written_pages(
        kvm: Kvm, outcomes: Counter[str], order: str) -> None:
    with Workload(kvm, mem_size=64 << 20, ring_entries=4096, max_writes=0, order=order,
                  value="generation") as w:
        assert w.vm.collect_dirty_pages().count == 0  # the first builds the native state
        for written in _rounds(w, 6, 300):
            got = w.vm.collect_dirty_pages()
            assert set(got.pages[MEM_SLOT].tolist()) == written
            assert got.entries == 300  # one entry per write: the workload writes each once
            assert got.per_vcpu[0] == got.pages
            assert got.harvested_at > 0
            assert got.reset_ns > 0  # the kernel's reset, timed in the native call
            assert not got.pages[MEM_SLOT].flags.writeable  # the result cannot be changed
            empty = w.vm.collect_dirty_pages()
            assert empty.entries == 0 and empty.reset_ns == 0  # reset exactly: nothing left
        assert outcomes["QuickHarvest"] >= 12 and outcomes["Harvest"] == 0


@pytest.mark.kvm
def test_a_tracker_collects_through_the_quick_path(kvm: Kvm, outcomes: Counter[str]) -> None:
    with Workload(kvm, mem_size=64 << 20, ring_entries=4096, max_writes=0,
                  value="generation") as w, DirtyTracker(w.vm, interval=3600.0) as t:
        t.take()  # `with` started it
        for written in _rounds(w, 4, 200):
            assert _pages_of(t.take(), w) == written
        assert outcomes["QuickHarvest"] >= 4


@pytest.mark.kvm
@pytest.mark.fake
def test_a_failed_quick_reset_loses_nothing(kvm: Kvm, monkeypatch: pytest.MonkeyPatch) -> None:
    """FAKE: the quick path's reset is issued on a file that is no VM (/dev/null: ENOTTY),
    and the general path's retry fails too (an injected EIO through ``kvmio._abi.ioctl``).
    The collection raises that error and hands every entry back; the next collection reports
    every page, and the reset accounting is in step."""
    with Workload(kvm, mem_size=64 << 20, ring_entries=4096, max_writes=0,
                  value="generation") as w:
        w.vm.collect_dirty_pages()
        rounds = _rounds(w, 2, 250)
        first = next(rounds)
        rs = w.vm.ring_set
        assert rs is not None
        injected = FailOnce(lib.KVM_RESET_DIRTY_RINGS)
        monkeypatch.setattr(_abi, "ioctl", injected.ioctl)
        fd = os.open("/dev/null", os.O_RDONLY)
        try:
            with pytest.raises(KvmError, match="injected failure") as e:
                rs.collect_quick(fd)
            assert e.value.errno == errno.EIO
        finally:
            os.close(fd)
            monkeypatch.undo()
        assert injected.calls == 1
        second = next(rounds)
        got = w.vm.collect_dirty_pages()
        assert set(got.pages[MEM_SLOT].tolist()) == first | second
        assert got.entries == 500
        assert w.vm.collect_dirty_pages().entries == 0


@pytest.mark.kvm
@pytest.mark.parametrize("policy", ["raise", "report"])
def test_a_quick_reset_that_does_not_match_is_an_overrun(kvm: Kvm, policy: str) -> None:
    """A model ring (its memory is ours) whose reset goes to a real VM's fd: the kernel resets
    nothing of it (0 of 40 harvested), as when it overwrote entries before the reset reached
    them.  That is the general path's mismatch: raised, or reported against the one ring that
    can be to blame, which then owes the difference."""
    model = ModelKernel(64)
    with kvm.create_vm() as vm:
        vm.enable_dirty_ring(4096)
        rs = RingSet(64, model.reset)
        ring = model.ring(rs)
        try:
            rs.harvest_and_reset()  # builds the native state (nothing to take yet)
            model.push(40)
            with rs.lock:
                if policy == "raise":
                    with pytest.raises(DirtyRingOverrunError, match="reset 0 entries but 40"):
                        rs.collect_quick(vm.fd)
                    assert ring.suspect  # every ring harvested since the reset is suspect
                else:
                    got = rs.collect_quick(vm.fd, "report")
                    assert not isinstance(got, QuickHarvest) and got is not None
                    assert got.entries == 40 and set(got.overruns) <= {0, VM_WIDE}
                    assert got.overruns and ring.shortfall == 40
        finally:
            ring.close()
            model.close()


@pytest.mark.kvm
def test_quick_collection_with_two_rings_splits_pages_per_vcpu(kvm: Kvm,
                                                               outcomes: Counter[str]) -> None:
    with Workload(kvm, mem_size=64 << 20, vcpus=2, ring_entries=4096, max_writes=0,
                  order="random", value="generation") as w:
        w.vm.collect_dirty_pages()
        w.generation = 5
        seen = []
        for i in (0, 1):
            before = set(np.flatnonzero(w.mem.page_words() == 5).tolist())
            _set_max_writes(w, i, 150)
            assert isinstance(w.run_vcpu(i), Hlt)
            seen.append(set(np.flatnonzero(w.mem.page_words() == 5).tolist()) - before)
        got = w.vm.collect_dirty_pages()
        assert outcomes["QuickHarvest"] == 1  # the first collection primed it
        assert got.entries == 300
        for i in (0, 1):
            assert seen[i] <= set(got.per_vcpu[i][MEM_SLOT].tolist())
        assert set(got.pages[MEM_SLOT].tolist()) == seen[0] | seen[1]


@pytest.mark.kvm
def test_entries_a_ring_full_exit_drained_come_with_the_next_quick_collection(
        kvm: Kvm, outcomes: Counter[str]) -> None:
    """``DirtyRing.drain`` (how a ring-full exit is served without a tracker) keeps what it
    harvested in the ring's stash and resets: the ring is then in step but not quiet, and the
    next collection must report the drained pages, then go quick again."""
    with Workload(kvm, mem_size=64 << 20, ring_entries=4096, max_writes=0,
                  value="generation") as w:
        w.vm.collect_dirty_pages()
        rounds = _rounds(w, 2, 120)
        first = next(rounds)
        ring = w.vcpus[0].dirty_ring
        assert ring.drain() == 120 and ring.pending_reset == 0
        second = next(rounds)
        got = w.vm.collect_dirty_pages()
        assert set(got.pages[MEM_SLOT].tolist()) == first | second
        assert got.entries == 240
        assert outcomes["QuickHarvest"] == 0  # the stash made it take the general path
        assert w.vm.collect_dirty_pages().entries == 0
        assert outcomes["QuickHarvest"] == 1


@pytest.mark.kvm
@pytest.mark.parametrize("size_pages", [512, 0])
def test_the_quick_path_drops_pages_of_memory_deleted_since(
        kvm: Kvm, outcomes: Counter[str], size_pages: int) -> None:
    """Entries for a slot deleted (or re-created smaller) after the guest wrote: the quick
    collection counts them as dropped exactly as the general path does, and keeps the rest."""
    with Workload(kvm, mem_size=16 << 20, order="sequential", ring_entries=1024,
                  max_writes=0, value="count") as w:
        w.vm.collect_dirty_pages()  # builds the native state: the next one goes quick
        _set_max_writes(w, 0, 600)
        assert isinstance(w.run_vcpu(0), Hlt)  # pages 0..599 of the slot
        w.vm.delete_memory_region(MEM_SLOT)
        if size_pages:
            w.vm.add_memory_region(MEM_BASE, size_pages * 4096, log_dirty=True)
        d = w.vm.collect_dirty_pages()
        assert outcomes["QuickHarvest"] == 1 and outcomes["Harvest"] == 0
        assert d.entries == 600 and d.dropped == 600 - size_pages
        assert d.pages.get(MEM_SLOT, np.zeros(0)).tolist() == list(range(size_pages))


@pytest.mark.kvm
def test_the_general_path_times_its_reset_too(kvm: Kvm, outcomes: Counter[str]) -> None:
    """A ring owned by a harvester takes the general path: its reset is timed as well."""
    with Workload(kvm, mem_size=16 << 20, ring_entries=1024, max_writes=100) as w:
        ring = w.vcpus[0].take_dirty_ring()
        assert isinstance(w.run_vcpu(0), Hlt)
        d = w.vm.collect_dirty_pages(rings=[ring])
        assert d.entries == 100 and d.reset_ns > 0
        assert outcomes["QuickHarvest"] == 0
