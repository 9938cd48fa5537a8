"""Ring-mode tracking survives overruns (real /dev/kvm): the dense 'burst' guest overruns the
ring by construction (8 page writes per 11 instructions: one 1024-instruction emulation batch
pushes ~745 entries, past the soft limit and past the ring's end), the tracker reports the
tracked slots wholly dirty, recovers the ring at the vCPU's next ring-full exit, and goes on
losslessly once the guest writes at a lossless density again."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kvmio import DirtyRingFull, DirtyRingOverrunError, Hlt, Kvm
from kvmio.guests.workload import MEM_SLOT, Workload
from kvmio.tracker import DirtyRanges, DirtyTracker

from guests import burst, overrun_ring, wait_until

pytestmark = pytest.mark.kvm

#: Long enough that only ring-full exits harvest: the overrun then happens by construction,
#: not because the worker happened to be late.
NO_WORKER = 3600.0


def test_tracker_survives_an_overrun_and_recovers_the_ring(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=64 << 20, ring_entries=4096, max_writes=100,
                  order="sequential", value="count") as w:
        # 100 entries first, so that batch ends do not fall exactly on the ring's end.
        assert isinstance(w.run_vcpu(0), Hlt)
        w.vm.collect_dirty_pages()
        saved = w.vcpus[0].get_regs()
        burst(w)
        with DirtyTracker(w.vm, "ring", interval=NO_WORKER) as tracker:
            with w.runner(on_ring_full=tracker.on_ring_full) as r:
                wait_until(lambda: tracker.recoveries >= 2 or not r.running,
                           what="the ring to overrun and be recovered twice")
                r.pause()
                assert r.errors == {}
                first = tracker.take()
                # Every tracked page is reported, flagged as wholly dirty.
                assert first.wholly_dirty == {MEM_SLOT}
                assert first.slots[MEM_SLOT].pages == w.mem.num_pages
                assert tracker.overrun_events and all(
                    vid == 0 for _, vid, _ in tracker.overrun_events)
                assert w.vcpus[0].ring is not None and w.vcpus[0].ring.lost_total > 0
                # Back to the lossless dirtier.  Its first run may still find the ring being
                # repaired (a hole or a stuck count the burst left behind: repairs need
                # ring-full exits); nothing may be lost, and a repair flags the slot again.
                w.mem.array()[:] = 0
                w.vcpus[0].set_regs(saved)
                target = w.writes(0) + 20_000
                w.vm.write_memory(w.params_addr(0) + 80, target.to_bytes(8, "little"))
                r.resume()
                assert r.wait(300)
            assert isinstance(r.exits[0], Hlt) and w.writes(0) == target
            second = tracker.take(final=True)
            _check_covers(w, second)
            # Its ring-full exits repaired the ring: from now on the ring is exact again.
            events = len(tracker.overrun_events)
            w.mem.array()[:] = 0
            target += 20_000
            w.vm.write_memory(w.params_addr(0) + 80, target.to_bytes(8, "little"))
            with w.runner(on_ring_full=tracker.on_ring_full) as r:
                assert r.wait(300)
            assert isinstance(r.exits[0], Hlt) and w.writes(0) == target
            third = tracker.take(final=True)
            ring = w.vcpus[0].ring
            assert ring is not None and not ring.suspect  # in step: harvested while it runs
        assert third.wholly_dirty == frozenset()
        assert len(tracker.overrun_events) == events
        got = np.concatenate([(g - w.mem.guest_phys_addr) // 4096 + np.arange(n // 4096)
                              for g, n in third])
        assert np.array_equal(np.sort(got), np.flatnonzero(w.mem.page_words()))


def _check_covers(w: Workload, got: DirtyRanges) -> None:
    """Every page the guest wrote is in ``got`` (exactly them, unless flagged whole)."""
    pages = np.concatenate([(g - w.mem.guest_phys_addr) // 4096 + np.arange(n // 4096)
                            for g, n in got])
    written = np.flatnonzero(w.mem.page_words())
    assert np.isin(written, pages).all()
    if not got.wholly_dirty:
        assert np.array_equal(np.sort(pages), written)


def test_strict_tracker_raises_at_the_first_overrun(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=64 << 20, ring_entries=4096, max_writes=100) as w:
        assert isinstance(w.run_vcpu(0), Hlt)
        burst(w)
        tracker = DirtyTracker(w.vm, "ring", interval=NO_WORKER, strict=True)
        with (pytest.raises(DirtyRingOverrunError,
                            match=r"dirty ring of vCPU 0 overrun: .* dirty pages may have been "
                            "lost") as e,
              tracker, w.runner(on_ring_full=tracker.on_ring_full) as r):
            r.wait(300)
        # The tracker's own error (its pass in the vCPU thread), re-raised by the runner.
        assert e.value is tracker.error and e.value.vcpu == 0
        assert tracker.recoveries == 0 and tracker.overrun_events == []


def test_a_hole_keeps_the_slots_wholly_dirty_until_the_ring_is_recovered(kvm: Kvm) -> None:
    """Entries past a hole are not harvested until the ring is recovered: every take before
    that must flag the tracked slots whole, and a take with the vCPU stopped recovers the ring
    (no ring-full exit needed), after which takes are exact again."""
    with Workload(kvm, mem_size=64 << 20, ring_entries=4096, max_writes=100,
                  order="sequential", value="count") as w:
        v = w.vcpus[0]
        assert isinstance(w.run_vcpu(0), Hlt)
        w.vm.collect_dirty_pages()
        saved = v.get_regs()
        burst(w)
        ring = v.dirty_ring
        overrun_ring(v)
        tracker = DirtyTracker(w.vm, "ring", interval=NO_WORKER).start()
        try:
            first = tracker.take()  # harvests the full ring: overrun reported
            assert first.wholly_dirty == {MEM_SLOT}
            # The lossless dirtier writes a few pages, past the hole, and halts: no ring-full.
            w.mem.array()[:] = 0
            v.set_regs(saved)
            target = w.writes(0) + 300
            w.vm.write_memory(w.params_addr(0) + 80, target.to_bytes(8, "little"))
            assert isinstance(w.run_vcpu(0, on_ring_full=tracker.on_ring_full), Hlt)
            assert w.writes(0) == target
            second = tracker.take()  # finds the hole; the vCPU is stopped: recovers
            assert second.wholly_dirty == {MEM_SLOT} and not ring.hole_pending
            assert tracker.recoveries == 1
            target += 300
            w.mem.array()[:] = 0
            w.vm.write_memory(w.params_addr(0) + 80, target.to_bytes(8, "little"))
            assert isinstance(w.run_vcpu(0, on_ring_full=tracker.on_ring_full), Hlt)
            third = tracker.take()
            assert third.wholly_dirty == frozenset()
            got = np.concatenate([(g - w.mem.guest_phys_addr) // 4096 + np.arange(n // 4096)
                                  for g, n in third])
            assert np.array_equal(np.sort(got), np.flatnonzero(w.mem.page_words()))
        finally:
            tracker.close()


def _bss_kernel(clear_pages: int, later_pages: int) -> bytes:
    """A Multiboot kernel that clears ``clear_pages`` pages from 4 MiB with one ``rep stosd``
    (what a kernel does to its bss: on this host that single instruction pushes one ring entry
    per dword, far more than any ring holds), halts, then, resumed, writes one dword into each
    of ``later_pages`` pages from 8 MiB at a lossless density (~45 instructions per write) and
    halts again."""
    import struct

    from test_multiboot import make_elf

    code = (b"\xBF" + struct.pack("<I", 0x400000)             # mov edi, 4 MiB
            + b"\xB9" + struct.pack("<I", clear_pages * 1024)  # mov ecx, dwords
            + b"\xB8\x01\x01\x01\x01\xFC\xF3\xAB"              # mov eax, ..; cld; rep stosd
            + b"\xF4"                                          # hlt (IF=0)
            + b"\xBB" + struct.pack("<I", 0x800000)            # mov ebx, 8 MiB
            + b"\xB9" + struct.pack("<I", later_pages)         # mov ecx, pages
            + b"\x89\x03"                                      # 1: mov [ebx], eax
            + b"\x81\xC3\x00\x10\x00\x00"                      # add ebx, 4096
            + b"\xBA\x14\x00\x00\x00"                          # mov edx, 20
            + b"\x4A\x75\xFD"                                  # 2: dec edx; jnz 2b
            + b"\x49\x75\xED"                                  # dec ecx; jnz 1b
            + b"\xF4")                                         # hlt
    return make_elf([(0x100000, code, len(code))], 0x100000)


@pytest.mark.parametrize("interval", [NO_WORKER, 0.001], ids=["ring-full-only", "busy-worker"])
def test_a_bss_clear_is_survived_and_tracking_goes_on_losslessly(kvm: Kvm,
                                                                  interval: float) -> None:
    """With only ring-full exits harvesting, the clear overruns the 4096-entry ring by
    construction (each emulation batch pushes ~1024 entries past the soft limit, and the
    ring-full exit comes only at the batch's end).  With a busy worker too, harvests race the
    kernel lapping the ring, and a reset may stop short: the ring is brought back in step; or
    the worker keeps up with the clear (whether it does is timing, so either is accepted, and
    every cleared page must then be reported)."""
    from kvmio.guests.multiboot import MultibootMachine, StopReason

    later = 300
    with MultibootMachine(kvm, _bss_kernel(256, later), mem=64 << 20, ring_entries=4096,
                          log_dirty=False, irqchip=False) as m:
        slot = m.ram.slot
        assert not m.ram.log_dirty  # booted unlogged: logging starts with the tracker
        tracker = DirtyTracker(m.vm, "ring", interval=interval, log_slots=[slot])
        with tracker:
            assert m.ram.log_dirty
            first = m.run(timeout=300, on_ring_full=tracker.on_ring_full)
            assert first.reason == StopReason.HALTED, first.summary()
            cleared = tracker.take()
            if interval == NO_WORKER or tracker.overrun_events:
                assert tracker.overrun_events  # it did overrun, and was survived
                assert cleared.wholly_dirty == {slot}
                assert cleared.slots[slot].pages == m.ram.num_pages
            else:  # the worker kept up: the cleared pages, each of them, and nothing lost
                cleared_pages: set[int] = set()
                for gpa, length in cleared:
                    cleared_pages |= set(range(gpa // 4096, (gpa + length) // 4096))
                assert {0x400 + i for i in range(256)} <= cleared_pages
            second = m.run(timeout=300, on_ring_full=tracker.on_ring_full)
            assert second.reason == StopReason.HALTED, second.summary()
            got = tracker.take(final=True)
        assert not m.ram.log_dirty  # and stops with it
        pages: set[int] = set()
        for gpa, length in got:
            pages |= set(range(gpa // 4096, (gpa + length) // 4096))
        written = {0x800 + i for i in range(later)}
        assert written <= pages  # nothing written after the overrun was lost
        if not got.wholly_dirty:
            assert pages == written  # and, once in step again, exact


def test_closing_a_vcpu_whose_ring_is_held_by_the_tracker_does_not_deadlock(kvm: Kvm) -> None:
    """A tracker holds the ring set's lock while it holds an overrun ring's vCPU outside
    KVM_RUN; closing that vCPU meanwhile must not take the two locks the other way round
    (pytest-timeout fails a deadlock)."""
    for _ in range(5):
        with Workload(kvm, mem_size=64 << 20, ring_entries=4096, max_writes=100) as w:
            assert isinstance(w.run_vcpu(0), Hlt)
            burst(w)
            v = w.vcpus[0]
            overrun_ring(v)  # first, by construction
            tracker = DirtyTracker(w.vm, "ring", interval=0.0005)
            with tracker:
                wait_until(lambda: len(tracker.overrun_events) > 0,  # noqa: B023
                           what="the tracker to see the overrun")
                r = w.runner(on_ring_full=tracker.on_ring_full).start()
                passes = tracker.passes
                wait_until(lambda: tracker.passes > passes + 3,  # noqa: B023
                           what="passes while the vCPU runs")
                v.close()  # kicks the running vCPU, waits, unmaps its ring
                passes = tracker.passes
                wait_until(lambda: tracker.passes > passes + 3  # noqa: B023
                           or tracker.error is not None or not tracker.running,  # noqa: B023
                           what="passes after the close")
                r.stop(raise_errors=False)  # its thread met the closed vCPU
                assert tracker.error is None, repr(tracker.error)
                assert tracker.running




def test_a_vcpu_closing_while_its_ring_is_repaired_waits_for_the_repair(
        kvm: Kvm, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a collection the tracker recovers an overrun ring whose hole became visible.
    Another thread closing the vCPU at that moment must wait for the repair to end, not
    unmap the ring under it (that was a tracker error, KvmClosedError).  The burst guest
    overruns by construction (run on until a batch shows the hole), and the close is started
    at the repair itself, so the race happens every time; whether the close waited is
    checked by the ring's state when the repair runs."""
    from kvmio.dirty.ring import DirtyRing

    with Workload(kvm, mem_size=64 << 20, ring_entries=4096, max_writes=100) as w:
        assert isinstance(w.run_vcpu(0), Hlt)
        burst(w)
        v = w.vcpus[0]
        overrun_ring(v)  # completely full: the hole is not visible yet
        tracker = DirtyTracker(w.vm, "ring", interval=NO_WORKER)
        with tracker:
            assert tracker.take().wholly_dirty
            original = DirtyRing.recover_from_overrun
            closer: list[threading.Thread] = []
            seen: list[bool] = []

            def recover(r: DirtyRing) -> object:
                if closer:
                    return original(r)
                t = threading.Thread(target=v.close)
                t.start()
                closer.append(t)
                t.join(1.0)  # a close that does not wait ends well within this
                seen.append(r.closed)
                return original(r)

            monkeypatch.setattr(DirtyRing, "recover_from_overrun", recover)
            for _ in range(100):  # a batch that a host interrupt cut short shows no hole
                assert isinstance(v.run(), DirtyRingFull)  # pushes past the hole
                got = tracker.take()
                if closer:
                    break
            monkeypatch.undo()
            assert seen == [False], "the vCPU closed under the repair"
            assert got.wholly_dirty  # the overrun is still reported
            closer[0].join(30)
            assert not closer[0].is_alive() and v.closed  # and then it closed
            assert tracker.error is None, repr(tracker.error)
            tracker.take()  # the tracker goes on
            assert tracker.running
