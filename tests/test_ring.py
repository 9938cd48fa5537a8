"""The dirty ring on the real kernel: enabling rules, mapping, ownership, harvest, reset,
ring-full exits, overrun detection and recovery, and resets cut short by signals."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import time

import numpy as np
import pytest

from kvmio import (
    Cap,
    DirtyRingError,
    DirtyRingFull,
    DirtyRingOverrunError,
    Hlt,
    IoOut,
    Kvm,
    KvmClosedError,
    KvmError,
    KvmInvalidArgumentError,
    KvmStateError,
    SlotId,
)
from kvmio._abi import kick_signal
from kvmio.guests.modes import setup_protected_mode
from kvmio.guests.workload import MEM_BASE, MEM_SLOT, Workload

from guests import burst, overrun_ring, soft_limit, wait_until


@pytest.mark.parametrize(
    ("entries", "exc", "match"),
    [(3000, KvmInvalidArgumentError, "power of two"),
     (128, KvmInvalidArgumentError, "smaller than a page"),
     (1 << 17, KvmInvalidArgumentError, "exceeds this kernel's maximum"),
     (0, KvmInvalidArgumentError, "power of two"),
     (-4, KvmInvalidArgumentError, "power of two"),
     (True, KvmInvalidArgumentError, "must be an int")])
def test_enable_rules_checked_first(kvm: Kvm, entries: int, exc: type, match: str) -> None:
    with kvm.create_vm() as vm:
        with pytest.raises(exc, match=match):
            vm.enable_dirty_ring(entries)
        assert vm.dirty_ring is None
        # Nothing was half-done: a valid ring can still be enabled, and the kernel has it now
        # (it takes a ring once only: the same valid request is refused afterwards).
        assert vm.enable_dirty_ring(4096) == vm.dirty_ring
        with pytest.raises(KvmError) as ei:
            vm.enable_cap(Cap.DIRTY_LOG_RING_ACQ_REL, 4096 * 16)
        assert ei.value.errno == errno.EINVAL


def test_kernel_agrees_with_the_rules(kvm: Kvm) -> None:
    """The rules kvmio checks are the kernel's (measured on this machine's kernel)."""
    for nbytes, err in [(2048, errno.EINVAL), (12288, errno.EINVAL), (2 << 20, errno.E2BIG)]:
        with kvm.create_vm() as vm, pytest.raises(KvmError) as ei:
            vm.enable_cap(Cap.DIRTY_LOG_RING_ACQ_REL, nbytes)
        assert ei.value.errno == err
    with kvm.create_vm() as vm:
        vm.create_vcpu()
        with pytest.raises(KvmError) as ei:
            vm.enable_cap(Cap.DIRTY_LOG_RING_ACQ_REL, 65536)
        assert ei.value.errno == errno.EINVAL


def test_enable_defaults_and_state_rules(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        assert vm.max_dirty_ring_entries() == kvm.max_dirty_ring_bytes() // 16
        cfg = vm.enable_dirty_ring()
        assert cfg.cap == Cap.DIRTY_LOG_RING_ACQ_REL and cfg.acq_rel
        assert (cfg.entries, cfg.bytes, cfg.with_bitmap) == (4096, 65536, False)
        assert vm.dirty_ring == cfg
        with pytest.raises(KvmStateError, match="already enabled"):
            vm.enable_dirty_ring(4096)
        # The kernel's ring has that size: a guest writing one new page per iteration gets
        # its first ring-full exit once the soft limit of a 4096-entry ring is used.
        vm.add_memory_region(0, 1 << 20)
        tracked = vm.add_memory_region(1 << 20, 32 << 20, log_dirty=True)
        # mov edi, 1 MiB; 1: mov [edi], edi; add edi, 4096; (a delay: mov ecx, 16;
        # 2: dec ecx; jnz 2b); jmp 1b.  ~35 instructions per write: fewer writes per
        # emulation batch than the ring's reserve, so the exit comes before the ring is full.
        vm.write_memory(0x10000, bytes([0xBF, 0x00, 0x00, 0x10, 0x00, 0x89, 0x3F,
                                        0x81, 0xC7, 0x00, 0x10, 0x00, 0x00,
                                        0xB9, 0x10, 0x00, 0x00, 0x00, 0x49, 0x75, 0xFD,
                                        0xEB, 0xEE]))
        v = vm.create_vcpu()
        setup_protected_mode(v, vm, 0x10000)
        assert isinstance(v.run(), DirtyRingFull)
        written = int(np.count_nonzero(tracked.page_words()))  # the guest's own record
        assert v.dirty_ring.count_dirty() == written  # one entry per (distinct) page
        assert soft_limit(4096) <= written <= 4096
    with kvm.create_vm() as vm:
        vm.create_vcpu()
        with pytest.raises(KvmStateError, match="before any vCPU"):
            vm.enable_dirty_ring(4096)
        assert vm.dirty_ring is None
    with kvm.create_vm() as vm:
        with pytest.raises(KvmStateError, match="not enabled"):
            vm.reset_dirty_rings()
        v = vm.create_vcpu()
        with pytest.raises(KvmStateError, match="no dirty ring"):
            _ = v.dirty_ring


def test_bitmap_on_a_ring_vm_is_refused(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vm.enable_dirty_ring(4096)
        vm.add_memory_region(0, 1 << 20, log_dirty=True)
        with pytest.raises(KvmStateError, match="backup bitmap"):
            vm.get_dirty_log(0)
        # The kernel's own answer, for the record: ENXIO.
        words = np.zeros(4, dtype=np.uint64)
        from kvmio import _abi

        with pytest.raises(KvmStateError) as ei:
            _abi.get_dirty_log(vm.fd, 0, words)
        assert ei.value.errno == errno.ENXIO


def test_rings_mapped_and_owned(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, vcpus=2, ring_entries=1024, max_writes=200,
                  order="sequential", value="count") as w:
        rings = w.vm.dirty_rings()
        assert set(rings) == {0, 1} and all(r.size == 1024 for r in rings.values())
        ring = w.vcpus[0].take_dirty_ring()
        with pytest.raises(KvmStateError, match="handed to a harvester"):
            w.vcpus[0].take_dirty_ring()
        with pytest.raises(KvmStateError, match="handed to a harvester"):
            _ = w.vcpus[0].dirty_ring
        with pytest.raises(KvmStateError, match="owned by a harvester"):
            w.vm.collect_dirty_pages()
        w.run_vcpu(0, on_ring_full=lambda v: None)
        # The harvester thread owns the ring: harvest there.
        result: list[object] = []
        t = threading.Thread(target=lambda: result.append(ring.harvest()))
        t.start()
        t.join()
        got = result[0]
        # Sequential writes to distinct pages: one entry per write the guest counted.
        assert len(got) == w.writes(0) > 0
        assert ring.pending_reset == len(got)
        assert w.vm.reset_dirty_rings() == len(got)  # the kernel's count
        pages = got.distinct_pages()  # type: ignore[attr-defined]
        assert set(pages) == {SlotId(0, MEM_SLOT)}
        words = w.mem.page_words()
        assert np.array_equal(np.flatnonzero(words), pages[SlotId(0, MEM_SLOT)])
        assert all(s == SlotId(0, MEM_SLOT) for s, _ in got)  # plain iteration
        gpas = got.gpas(w.vm.regions)  # type: ignore[attr-defined]
        assert np.array_equal(gpas, MEM_BASE + got.offsets * 4096)  # type: ignore[attr-defined]
        with pytest.raises(DirtyRingError, match="unknown memory slot"):
            got.gpas({})  # type: ignore[attr-defined]
        w.vm.close()
        with pytest.raises(KvmClosedError, match="closed"):
            ring.harvest()


def test_harvest_limit_resumes_in_order(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, ring_entries=4096, max_writes=500,
                  order="sequential", value="count") as w:
        w.run_vcpu(0)
        ring = w.vcpus[0].dirty_ring
        parts = [ring.harvest(limit=100) for _ in range(5)]
        assert [len(p) for p in parts] == [100] * 5
        assert len(ring.harvest()) == 0
        offsets = np.concatenate([p.offsets for p in parts])
        assert offsets.tolist() == list(range(500))  # sequential guest: ring order = write order
        assert ring.index == w.writes(0) == 500
        assert w.vm.reset_dirty_rings() == 500  # the kernel's count
        with pytest.raises(KvmInvalidArgumentError, match="limit must be an int >= 0"):
            ring.harvest(limit=-1)


def test_reset_then_write_is_reported_again(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, working_set=4 * 4096, order="sequential",
                  ring_entries=4096, max_writes=4) as w:
        w.run_vcpu(0)
        first = w.vm.collect_dirty_pages()
        assert first.pages[MEM_SLOT].tolist() == [0, 1, 2, 3]
        assert w.vm.collect_dirty_pages().count == 0  # nothing new
        # Run 4 more writes over the same pages: reported again after the reset.
        w.params[0].max_writes = 8
        w.vm.write_memory(w.params_addr(0) + 80, (8).to_bytes(8, "little"))
        w.run_vcpu(0)
        again = w.vm.collect_dirty_pages()
        assert again.pages[MEM_SLOT].tolist() == [0, 1, 2, 3]
        assert again.gpas().tolist() == [MEM_BASE + i * 4096 for i in range(4)]


def test_ring_full_exits_are_handled_without_loss(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=64 << 20, ring_entries=256, max_writes=2000,
                  value="count") as w:
        v = w.vcpus[0]
        ring = v.dirty_ring
        drained = []
        while True:
            ex = v.run()
            if isinstance(ex, DirtyRingFull):
                dirty = ring.count_dirty()
                # The kernel's rule: it exits ring-full once the soft limit is used; the
                # ring never holds more than its size.
                assert soft_limit(ring.size) <= dirty <= ring.size
                drained.append(ring.drain())  # harvests into the ring's stash, and resets
                assert drained[-1] == dirty
                continue
            if isinstance(ex, Hlt):
                break
            assert isinstance(ex, IoOut), ex  # the guest's report that it is done
        rest = ring.count_dirty()
        assert rest < ring.size
        # Every write the guest counted is one entry (they were drained or still wait), so
        # there were as many ring-full exits as the soft limit dictates.
        writes = w.writes(0)
        assert sum(drained) + rest == writes == 2000
        assert (writes - ring.size) / ring.size <= len(drained) <= writes // soft_limit(ring.size)
        d = w.vm.collect_dirty_pages()
        assert d.entries == writes
        assert np.array_equal(np.flatnonzero(w.mem.page_words()), d.pages[MEM_SLOT])


def test_overrun_is_detected_and_recoverable(kvm: Kvm) -> None:
    """A guest writing a page every ~4 instructions overruns the ring on this host (the
    emulator ignores soft-full within a 1024-instruction batch): kvmio must say so, and the
    ring must be usable again after recovery."""
    with Workload(kvm, mem_size=64 << 20, ring_entries=4096, max_writes=100,
                  value="count") as w:
        v = w.vcpus[0]
        # 100 entries first, so that the burst's 1024-instruction batches do not end exactly at
        # the ring's end.  Each batch pushes ~740 entries, so what is lost (fill - size) stays
        # below the soft limit and the hole shows once the kernel publishes past it.
        assert isinstance(w.run_vcpu(0), Hlt)
        saved = v.get_regs()
        burst(w)
        with pytest.raises(DirtyRingOverrunError, match="lost") as ei:
            v.run_until_exit()
        assert ei.value.vcpu == 0
        assert "bigger ring" in str(ei.value) and "bitmap" in str(ei.value)
        w.vm.reset_dirty_rings()
        # The overwritten entries are still counted by the kernel: running on, the next harvest
        # finds the hole.
        v.set_regs(saved)
        w.vm.write_memory(w.params_addr(0) + 80, (3000).to_bytes(8, "little"))
        with pytest.raises(DirtyRingOverrunError, match="hole"):
            w.run_vcpu(0)
            w.vm.collect_dirty_pages()
        # Recover with the vCPU stopped; from then on the ring is lossless again.
        v.dirty_ring.recover_from_overrun()
        assert v.dirty_ring.pending_reset == 0
        assert v.dirty_ring.lost_total > 0  # what the kernel counted but we never saw
        w.mem.array()[:] = 0
        before = w.writes(0)
        w.vm.write_memory(w.params_addr(0) + 80, (before + 3000).to_bytes(8, "little"))
        assert isinstance(w.run_vcpu(0), Hlt) and w.writes(0) == before + 3000
        d = w.vm.collect_dirty_pages(final=True)
        assert np.array_equal(np.flatnonzero(w.mem.page_words()), d.pages[MEM_SLOT])


def test_overrun_beyond_the_soft_limit_is_reported_not_looped(kvm: Kvm) -> None:
    """A small ring and a dense burst lose more than the soft limit.  Running on, the vCPU
    either exits ring-full forever with nothing to harvest, or (when a host interrupt cut a
    batch short and the burst laps the ring again) overruns once more: either way kvmio
    reports it and never loops."""
    with Workload(kvm, mem_size=64 << 20, ring_entries=256, max_writes=100) as w:
        assert isinstance(w.run_vcpu(0), Hlt)
        burst(w)
        with pytest.raises(DirtyRingOverrunError, match="lost"):
            w.vcpus[0].run_until_exit()
        w.vm.reset_dirty_rings()
        with pytest.raises(DirtyRingOverrunError,
                           match=r"nothing to harvest|hole|filled completely"):
            w.vcpus[0].run_until_exit()


def test_unserved_ring_full_is_reported_not_looped(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=64 << 20, ring_entries=256) as w:
        w.vcpus[0].take_dirty_ring()  # nobody harvests: ring-full forever
        with pytest.raises(DirtyRingError, match="nobody harvests") as ei:
            w.run_vcpu(0, on_ring_full=lambda v: None)
        assert not isinstance(ei.value, DirtyRingOverrunError)


@pytest.mark.fake
def test_run_until_exit_stuck_with_nothing_to_harvest(kvm: Kvm,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """FAKE run(): ring-full forever with an empty ring (what an overrun leaves behind when the
    lost entries exceed the soft limit; hard to arrange on purpose on a real kernel)."""
    with Workload(kvm, mem_size=16 << 20, ring_entries=256) as w:
        v = w.vcpus[0]
        calls = []
        monkeypatch.setattr(v, "run", lambda: calls.append(1) or DirtyRingFull())
        with pytest.raises(DirtyRingOverrunError, match="nothing to harvest") as ei:
            v.run_until_exit(max_stuck=4)
        assert len(calls) == 4 and ei.value.vcpu == 0


def test_run_until_exit_handles_ring_full_and_keeps_entries(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=64 << 20, ring_entries=256, max_writes=1000,
                  value="count") as w:
        v = w.vcpus[0]
        while True:
            ex = v.run_until_exit()
            if isinstance(ex, Hlt):
                break
        ring = v.dirty_ring
        stashed = ring.harvested_total  # harvested on ring-full exits; the rest waits
        rest = ring.count_dirty()
        # More writes than the ring holds: ring-full exits were served, and nothing is lost.
        assert stashed > 0 and rest < ring.size
        assert stashed + rest == w.writes(0) == 1000
        # Kept, and reported by the collection with the rest.
        d = w.vm.collect_dirty_pages()
        assert d.entries == w.writes(0)
        assert np.array_equal(np.flatnonzero(w.mem.page_words()), d.pages[MEM_SLOT])


def test_recover_refused_while_running(kvm: Kvm) -> None:
    # A big ring, so that the guest stays inside KVM_RUN (no ring-full exit) for ~1 s.
    with Workload(kvm, mem_size=16 << 20, ring_entries=65536) as w:
        v = w.vcpus[0]
        t = threading.Thread(target=v.run)
        t.start()
        wait_until(lambda: v.running, what="the vCPU to enter run()")
        try:
            with pytest.raises(KvmStateError, match="inside run"):
                v.dirty_ring.recover_from_overrun()
        finally:
            v.kick()
            t.join()


def test_reset_cut_short_by_signals_still_adds_up(kvm: Kvm,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A pending signal makes KVM_RESET_DIRTY_RINGS return a partial count without error;
    kvmio repeats the call, so the sum equals what was harvested.  Each KVM_RESET_DIRTY_RINGS
    is recorded, so the test knows whether a reset really was cut short; rounds repeat until
    one was (a round whose signals all missed the reset proves nothing)."""
    n = 60_000
    with Workload(kvm, mem_size=1 << 30, ring_entries=65536, max_writes=n, pace=0,
                  order="sequential") as w:
        ring_set = w.vm._ring_set
        assert ring_set is not None
        real_reset = ring_set._reset_ioctl
        counts: list[int] = []

        def recorded_reset() -> int:
            got = real_reset()
            counts.append(got)
            return got

        monkeypatch.setattr(ring_set, "_reset_ioctl", recorded_reset)
        main = threading.get_ident()
        sig = kick_signal()
        for rnd in range(1, 21):
            w.vm.write_memory(w.params_addr(0) + 80, (rnd * n).to_bytes(8, "little"))
            assert isinstance(w.run_vcpu(0), Hlt) and w.writes(0) == rnd * n
            got = w.vcpus[0].dirty_ring.harvest()
            # Sequential over distinct pages in a round: one entry per write on any host.
            assert len(got) == n
            stop = threading.Event()

            def pester() -> None:
                # Real-time priority (we are root in CI): the pester runs whenever it wakes,
                # however busy the machine, so its signals do land inside the reset.
                with contextlib.suppress(PermissionError, OSError):
                    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
                while not stop.is_set():  # noqa: B023
                    signal.pthread_kill(main, sig)
                    time.sleep(0.00005)  # the signal rate, not a synchronisation

            t = threading.Thread(target=pester)
            counts.clear()
            t.start()
            try:
                assert w.vm.reset_dirty_rings() == n
            finally:
                stop.set()
                t.join()
            # Repeated while the sum was short of the harvest, and not once more after.
            assert sum(counts) == n and 0 not in counts and sum(counts[:-1]) < n
            if len(counts) > 1:  # at least one partial count: the repeat was needed
                break
        else:
            pytest.fail("no reset was ever cut short by a signal: the repeat went untested")


def test_reset_mismatch_is_an_error(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, ring_entries=4096, max_writes=100) as w:
        w.run_vcpu(0)
        ring = w.vcpus[0].dirty_ring
        ring.harvest()
        ring._pending_reset += 5  # kvmio's count disagrees with the kernel's
        with pytest.raises(DirtyRingOverrunError, match="reset 100 entries but 105"):
            w.vm.reset_dirty_rings()


def test_results_are_never_overwritten_by_later_harvests(kvm: Kvm) -> None:
    """Harvest output buffers are reused only once nothing refers to them any more."""
    with Workload(kvm, mem_size=64 << 20, ring_entries=4096, max_writes=2000,
                  order="sequential", value="count") as w:
        ring = w.vcpus[0].dirty_ring
        w.run_vcpu(0)
        first = ring.harvest()
        w.vm.reset_dirty_rings()
        tail = first.offsets[1500:]  # a derived view keeps the buffer alive too
        kept = first.offsets.copy()
        del first
        results = []
        for k in range(2, 6):
            w.vm.write_memory(w.params_addr(0) + 80, (2000 * k).to_bytes(8, "little"))
            w.run_vcpu(0)
            results.append(ring.harvest())
            w.vm.reset_dirty_rings()
            assert np.array_equal(tail, kept[1500:])
        for k, got in enumerate(results, start=2):
            assert got.offsets.tolist() == list(range(2000 * (k - 1), 2000 * k))


def test_closing_a_vcpu_keeps_its_dirty_pages(kvm: Kvm) -> None:
    """KVM keeps a closed vCPU's ring until the VM goes: its entries are still reported and
    still counted by the next reset."""
    with Workload(kvm, mem_size=16 << 20, vcpus=2, shared=False, ring_entries=1024,
                  max_writes=300, order="sequential", value="count") as w:
        w.run_all(timeout=30)
        first = w.vcpus[1].dirty_ring.harvest(limit=100)  # some harvested, some still waiting
        w.vcpus[1].close()
        d = w.vm.collect_dirty_pages()  # reset == harvested still holds
        # Sequential writes to distinct pages: one entry per write the guests counted.
        assert len(first) == 100 and d.entries == w.total_writes() - 100 == 500
        reported = np.union1d(d.pages[MEM_SLOT], first.offsets)
        assert np.array_equal(np.flatnonzero(w.mem.page_words()), reported)


def test_deleted_slot_entries_are_dropped_not_fatal(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, ring_entries=1024, max_writes=50,
                  order="sequential") as w:
        w.run_vcpu(0)
        w.vm.delete_memory_region(MEM_SLOT)
        d = w.vm.collect_dirty_pages()
        # One entry per write the guest counted (distinct pages), every one for the gone slot.
        assert d.dropped == d.entries == w.writes(0) == 50 and d.count == 0


def test_collect_checks_every_ring_before_harvesting(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, vcpus=2, shared=False, ring_entries=1024,
                  max_writes=100, order="sequential", value="count") as w:
        w.run_all(timeout=30)
        w.vcpus[1].take_dirty_ring()
        with pytest.raises(KvmStateError, match="vCPU 1"):
            w.vm.collect_dirty_pages()
        # vCPU 0's ring was not touched by the refused collection: every write it counted
        # (distinct pages) is still there to harvest.
        ring = w.vcpus[0].dirty_ring
        assert ring.index == 0 and len(ring.harvest()) == w.writes(0) == 100


def test_entries_harvested_by_a_failing_call_are_kept(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=64 << 20, ring_entries=256, max_writes=100,
                  value="count") as w:
        v = w.vcpus[0]
        assert isinstance(w.run_vcpu(0), Hlt)
        burst(w)
        with pytest.raises(DirtyRingOverrunError, match="overrun") as ei:
            v.run_until_exit()
        ring = v.dirty_ring
        # The burst's writes lap the ring before the exit, so the kernel wrote every entry
        # since the last reset: the failing harvest took a completely full ring.
        assert ei.value.harvested == ring.size
        # The ring kept them, and what earlier ring-full exits drained (a host interrupt can
        # end the first batch below the ring's end): every entry harvested from this ring is
        # returned now, once (not on the exception).
        again = ring.harvest()
        assert len(again) == ring.harvested_total >= ei.value.harvested
        # And they are real: every page they name was written by the guest (the dirtier
        # writes its count, the burst 0xAA; untouched pages are zero).
        assert np.all(w.mem.page_words()[again.offsets.astype(np.int64)] != 0)


def test_recreated_smaller_slot_drops_stale_offsets(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, order="sequential", ring_entries=1024,
                  max_writes=600, value="count") as w:
        w.run_vcpu(0)  # pages 0..599 of slot 1
        w.vm.delete_memory_region(MEM_SLOT)
        w.vm.add_memory_region(MEM_BASE, 512 * 4096, log_dirty=True)  # slot 1 again, smaller
        d = w.vm.collect_dirty_pages()  # after the reset: never raises
        # Pages 0..writes-1 were written (sequential): those past the new end are dropped.
        assert d.dropped == w.writes(0) - 512 == 88
        assert d.pages[MEM_SLOT].tolist() == list(range(512))


def test_overrun_of_a_closing_vcpu_is_reported_by_the_next_reset(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=64 << 20, ring_entries=256, max_writes=100) as w:
        assert isinstance(w.run_vcpu(0), Hlt)
        burst(w)
        v = w.vcpus[0]
        overrun_ring(v)  # the ring is completely full
        v.close()
        with pytest.raises(DirtyRingOverrunError, match="overrun when the vCPU closed"):
            w.vm.collect_dirty_pages()
        assert w.vm.reset_dirty_rings() == 0  # reported once; accounting consistent
