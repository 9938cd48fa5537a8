"""The base under misuse, on the real /dev/kvm: objects used from two threads, closed while in
use, dropped without close(), given wrong types, interrupted by signals."""

from __future__ import annotations

import array
import gc
import os
import signal
import threading

import numpy as np
import pytest

from kvmio import (
    Hlt,
    Interrupted,
    Kvm,
    KvmClosedError,
    KvmError,
    KvmInvalidArgumentError,
    KvmStateError,
    PageSet,
    Regs,
    Vcpu,
    Vm,
    _abi,
)
from kvmio.guests.workload import MEM_SLOT, Workload
from kvmio.tracker import DirtyTracker
from kvmio.vcpu import kick_running

from guests import wait_until

pytestmark = pytest.mark.kvm


def _fd_target(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return None


# -- closing while another thread uses the object ---------------------------------------------


def test_an_ioctl_racing_close_never_reaches_the_vcpu_that_reused_the_fd(kvm: Kvm) -> None:
    """A reader hammers get_regs() on vCPU A while the main thread closes A and creates B,
    which gets A's fd number back.  The reader must see KvmClosedError, never B's registers
    (before calls held the fd against close(), it could read B's rip, and set_regs would have
    corrupted B)."""
    rounds = 0
    while rounds < 200:  # without the fix, a few hundred rounds always caught the reader
        with kvm.create_vm() as vm:
            rounds += _race_round(vm, min(50, vm.limits.max_vcpus // 2))


def _race_round(vm: Vm, n: int) -> int:
    vm.add_memory_region(0, 1 << 20)
    next_id = 0
    for _ in range(n):
        a = vm.create_vcpu(next_id)
        regs = a.get_regs()
        regs.rip = 0x1111
        a.set_regs(regs)
        seen: list[int] = []
        ended: list[BaseException] = []

        def reader() -> None:
            while True:
                try:
                    seen.append(a.get_regs().rip)  # noqa: B023
                except KvmClosedError as e:
                    ended.append(e)  # noqa: B023
                    return

        t = threading.Thread(target=reader)
        t.start()
        wait_until(lambda: len(seen) > 5, what="the reader to run")  # noqa: B023
        fd = a.fd
        a.close()
        b = vm.create_vcpu(next_id + 1)
        next_id += 2
        assert b.fd == fd  # the number was reused: the race is real
        regs = b.get_regs()
        regs.rip = 0x2222
        b.set_regs(regs)
        t.join(30)
        assert not t.is_alive() and len(ended) == 1
        assert set(seen) == {0x1111}
        b.close()
    return n


def test_closing_a_vm_with_a_vcpu_in_run_stops_it(kvm: Kvm) -> None:
    w = Workload(kvm, mem_size=16 << 20)
    out: list[object] = []

    def run() -> None:
        try:
            out.append(w.vcpus[0].run())
            out.append(w.vcpus[0].run())
        except KvmError as e:
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    wait_until(lambda: w.vcpus[0].running, what="the vCPU to enter run()")
    w.close()  # kicks the vCPU and waits for run() to return
    t.join(30)
    assert not t.is_alive()
    assert type(out[-1]) is KvmClosedError  # its next run() found the vCPU closed


def test_with_block_exception_is_never_masked_by_close(kvm: Kvm) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom) as ei, kvm.create_vm() as vm:
        vm.add_memory_region(0, 1 << 20)
        vm.create_vcpu()
        vm.close()  # close() inside the block: the with's close() is then a no-op
        raise Boom
    assert not getattr(ei.value, "__notes__", None)

    class Failing(Kvm):
        def close(self) -> None:
            super().close()
            raise KvmError("close failed")

    with pytest.raises(Boom) as ei2, Failing():
        raise Boom
    assert ei2.value.__notes__ == ["while closing Failing: KvmError: close failed"]


# -- dropped without close() ------------------------------------------------------------------


def test_dropped_objects_are_closed_with_a_resource_warning(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    vm.add_memory_region(0, 1 << 20)
    vcpu = vm.create_vcpu()
    vm_fd, vcpu_fd = vm.fd, vcpu.fd
    assert _fd_target(vm_fd) == "anon_inode:kvm-vm"
    assert _fd_target(vcpu_fd) == "anon_inode:kvm-vcpu:0"
    with pytest.warns(ResourceWarning, match="unclosed Vm"):
        del vm, vcpu
        gc.collect()
    assert _fd_target(vm_fd) != "anon_inode:kvm-vm"
    assert _fd_target(vcpu_fd) != "anon_inode:kvm-vcpu:0"


def test_a_dropped_tracker_stops_its_thread_with_a_resource_warning(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, ring_entries=4096) as w:
        tracker = DirtyTracker(w.vm, interval=0.01).start()
        thread = tracker.worker_thread
        assert thread is not None and thread.is_alive()
        with pytest.warns(ResourceWarning, match="unclosed DirtyTracker"):
            del tracker
            gc.collect()
        thread.join(30)
        assert not thread.is_alive()
        assert not w.vcpus[0].ring.taken  # type: ignore[union-attr]  # the ring came back


# -- two consumers, slots changing under a tracker --------------------------------------------


def test_a_second_consumer_beside_a_bitmap_tracker_is_refused(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, max_writes=300, value="count") as w:
        tracker = DirtyTracker(w.vm, "bitmap", interval=3600).start()
        w.run_vcpu(0)
        with pytest.raises(KvmStateError, match="claimed by a DirtyTracker"):
            w.vm.collect_dirty_pages()
        with pytest.raises(KvmStateError, match="claimed"):
            w.vm.get_dirty_log(MEM_SLOT)
        with pytest.raises(KvmStateError, match="already claimed"):
            w.vm.claim_dirty_log()
        tracker.close()  # what it collected goes to the VM, whose next collection reports it
        d = w.vm.collect_dirty_pages()
        assert np.array_equal(d.pages[MEM_SLOT], np.flatnonzero(w.mem.page_words()))


@pytest.mark.parametrize("mode", ["ring", "bitmap"])
def test_slots_added_and_deleted_while_a_tracker_runs(kvm: Kvm, mode: str) -> None:
    ring = 4096 if mode == "ring" else None
    with Workload(kvm, mem_size=16 << 20, ring_entries=ring, pace=30) as w:
        tracker = DirtyTracker(w.vm, mode, interval=0.001)  # type: ignore[arg-type]
        with tracker, w.runner(on_ring_full=tracker.on_ring_full if ring else None) as r:
            for k in range(20):
                passes = tracker.passes
                region = w.vm.add_memory_region((8 << 30) + (k << 20), 1 << 20, slot=5,
                                                log_dirty=True)
                wait_until(lambda: tracker.passes > passes + 1,  # noqa: B023
                           what="two tracker passes")
                region.write(region.guest_phys_addr, b"x")  # host writes are not logged
                w.vm.delete_memory_region(5)
            assert tracker.error is None and r.errors == {}
            got = tracker.take()
            assert MEM_SLOT in got.slots and 5 not in got.slots
            times, counts, _ = tracker.heatmap()
            assert len(times) == len(counts) > 0


def test_heatmap_and_rate_while_passes_run(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, ring_entries=4096, pace=10) as w:
        tracker = DirtyTracker(w.vm, interval=0.0005, history=50)
        with tracker, w.runner(on_ring_full=tracker.on_ring_full):
            wait_until(lambda: tracker.passes > 60, what="the history to wrap")
            for _ in range(300):  # each races the worker's appends
                times, counts, _ = tracker.heatmap()
                assert len(times) == len(counts) <= 50
                assert tracker.rate().pages_per_second >= 0


# -- wrong types and values -------------------------------------------------------------------


def test_wrong_types_raise_invalid_argument_naming_the_argument(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, ring_entries=4096, manual_protect=True) as w:
        vm, v = w.vm, w.vcpus[0]
        cases = [
            (lambda: vm.add_memory_region("0", 4096), "guest_phys_addr must be an int"),  # type: ignore[arg-type]
            (lambda: vm.add_memory_region(0, 4096.0), "size must be an int"),  # type: ignore[arg-type]
            (lambda: vm.create_vcpu(1.5), "vcpu_id must be an int"),  # type: ignore[arg-type]
            (lambda: v.set_regs(None), "regs must be a Regs"),  # type: ignore[arg-type]
            (lambda: v.set_regs(Regs(rax=-1)), "rax must be a u64"),
            (lambda: v.set_msrs({0x10: -1}), "must be a u64"),
            (lambda: v.set_msrs({"x": 1}), "MSR index must be an int"),  # type: ignore[dict-item]
            (lambda: v.get_msrs([1 << 40]), "MSR index must be a u32"),
            (lambda: v.set_mp_state("halted"), "state must be an int"),  # type: ignore[arg-type]
            (lambda: v.dirty_ring.harvest(limit=-1), "limit must be an int >= 0"),
            (lambda: v.dirty_ring.harvest(limit=2.5), "limit must be an int"),  # type: ignore[arg-type]
            (lambda: vm.write_memory(1 << 30, 7), "data must be bytes-like"),  # type: ignore[arg-type]
            (lambda: vm.read_memory(1 << 30, "8"), "length must be an int"),  # type: ignore[arg-type]
            (lambda: vm.enable_cap("x"), "cap must be an int"),  # type: ignore[arg-type]
            (lambda: vm.set_clock(-5), "ns must be a u64"),
            (lambda: kvm.check_extension(None), "cap must be an int"),  # type: ignore[arg-type]
            (lambda: kvm.get_supported_cpuid(0), "max_entries must be >= 1"),
            (lambda: Workload(kvm, order="diagonal"), "order must be one of sequential, random"),
            (lambda: Workload(kvm, value=7), "value must be one of"),
            (lambda: PageSet({0: [1.5]}), "non-negative integers"),
        ]
        for call, match in cases:
            with pytest.raises(KvmInvalidArgumentError, match=match):
                call()


def test_clear_dirty_log_refuses_fractional_pages(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vm.enable_manual_dirty_log_protect()
        vm.add_memory_region(0, 1 << 20, slot=0, log_dirty=True)
        with pytest.raises(KvmInvalidArgumentError, match="pages must hold integers"):
            vm.clear_dirty_log(0, pages=[1.7])
        with pytest.raises(KvmInvalidArgumentError, match="negative"):
            vm.clear_dirty_log(0, pages=np.array([-1]))
        with pytest.raises(KvmInvalidArgumentError, match="first_page must be an int"):
            vm.clear_dirty_log(0, first_page=0.0)  # type: ignore[arg-type]
        vm.clear_dirty_log(0, pages=np.array([3], dtype=np.uint16))  # any integer dtype


def test_supported_cpuid_grows_from_a_tiny_buffer(kvm: Kvm) -> None:
    assert kvm.get_supported_cpuid(1) == kvm.get_supported_cpuid()


def test_writes_count_bytes_whatever_the_item_size(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        r = vm.add_memory_region(0, 1 << 20)
        words = np.array([0x11223344, 0x55667788, 1, 2], dtype=np.uint32)
        r.write(0x100, words)  # 16 bytes, not 4
        assert r.read(0x100, 16) == words.tobytes()
        vm.write_memory(0x200, memoryview(array.array("I", [7, 8])))
        assert vm.read_memory(0x200, 8) == array.array("I", [7, 8]).tobytes()
        with pytest.raises(KvmInvalidArgumentError, match="outside slot"):
            r.write((1 << 20) - 8, words)  # 16 bytes from 8 bytes before the end


def test_vcpu_ids_are_never_reused_within_a_vm(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        v0 = vm.create_vcpu()
        v0.close()
        v1 = vm.create_vcpu()  # KVM keeps id 0 until the VM goes
        assert v1.id == 1
        with pytest.raises(KvmStateError, match="belonged to a closed vCPU"):
            vm.create_vcpu(0)


# -- signals ----------------------------------------------------------------------------------


def test_ioctls_are_retried_when_a_signal_interrupts_them(kvm: Kvm) -> None:
    """A profiler's timer signal interrupts system calls (no SA_RESTART with Python's
    handlers); every ioctl but KVM_RUN is issued again, so none fails with EINTR."""
    hits = []
    old = signal.signal(signal.SIGALRM, lambda *_: hits.append(1))
    signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
    try:
        for _ in range(150):
            with kvm.create_vm() as vm:
                vm.add_memory_region(0, 1 << 20, log_dirty=True)
                vm.create_vcpu().get_regs()
                vm.get_dirty_log(0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    assert len(hits) > 10  # the signals really came


def test_vcpus_created_while_collections_run_do_not_deadlock(kvm: Kvm) -> None:
    """create_vcpu maps the ring under the ring set's lock, and collections read the VM's
    slots under it: both take the locks in one order (pytest-timeout fails a deadlock)."""
    with Workload(kvm, mem_size=16 << 20, ring_entries=4096, pace=30) as w:
        tracker = DirtyTracker(w.vm, interval=0.0002)
        with tracker, w.runner(on_ring_full=tracker.on_ring_full):
            for i in range(1, 40):
                passes = tracker.passes
                v = w.vm.create_vcpu(i)
                wait_until(lambda: tracker.passes > passes, what="a pass")  # noqa: B023
                assert v.ring is not None
            wait_until(lambda: all(v.ring is not None and v.ring.taken
                                   for v in w.vm.vcpus.values()), what="every ring adopted")
            assert tracker.error is None


def test_more_wrong_types(kvm: Kvm) -> None:
    from kvmio import CpuidEntry, MemfdMemory
    from kvmio.runner import VcpuRunner

    with Workload(kvm, mem_size=16 << 20, ring_entries=4096) as w:
        v = w.vcpus[0]
        cases = [
            (lambda: w.vm.check_extension(1 << 70), "cap must be a u32"),
            (lambda: kvm.check_extension(1 << 70), "cap must be a u32"),
            (lambda: kvm.create_vm(1 << 70), "vm_type must be a u32"),
            (lambda: v.set_cpuid2([CpuidEntry(0, 0, 0, -1, 0, 0, 0)]), "eax must be a u32"),
            (lambda: v.set_cpuid2([CpuidEntry(0, 0, 0, 1.5, 0, 0, 0)]),  # type: ignore[arg-type]
             "eax must be an int"),
            (lambda: v.set_cpuid2(None), "entries must be a sequence"),  # type: ignore[arg-type]
            (lambda: v.get_msrs(5), "indices must be a sequence"),  # type: ignore[arg-type]
            (lambda: v.set_fpu("x"), "data must be bytes-like"),  # type: ignore[arg-type]
            (lambda: v.set_lapic(None), "data must be bytes-like"),  # type: ignore[arg-type]
            (lambda: DirtyTracker(w.vm, interval="1"), "interval must be a number"),  # type: ignore[arg-type]
            (lambda: DirtyTracker(w.vm, window=float("nan")), "window must be a finite"),
            (lambda: DirtyTracker(w.vm, log_slots=5), "log_slots must be a sequence"),  # type: ignore[arg-type]
            (lambda: DirtyTracker(w.vm, history=-1), "history must be >= 1"),
            (lambda: DirtyTracker(w.vm, heatmap_bins=1.5), "heatmap_bins must be an int"),  # type: ignore[arg-type]
            (lambda: Workload(kvm, vcpus="2"), "vcpus must be an int"),  # type: ignore[arg-type]
            (lambda: Workload(kvm, mem_size="x"), "mem_size must be an int"),  # type: ignore[arg-type]
            (lambda: Workload(kvm, pace=1.5), "pace must be an int"),  # type: ignore[arg-type]
            (lambda: VcpuRunner(v), "vcpus must be a sequence"),  # type: ignore[arg-type]
            (lambda: PageSet(5), "pages must map slot ids"),  # type: ignore[arg-type]
            (lambda: PageSet({0: [[1], [2, 3]]}), "pages of slot 0"),
            (lambda: MemfdMemory(4096, name=5), "name must be a str"),  # type: ignore[arg-type]
        ]
        for call, match in cases:
            with pytest.raises(KvmInvalidArgumentError, match=match):
                call()


@pytest.mark.timeout(60)
def test_a_ctrl_c_raised_inside_run_leaves_the_vcpu_usable_and_closable(
        kvm: Kvm, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C raises KeyboardInterrupt between any two bytecodes of the main thread, also
    inside Vcpu.run() right after it took the vCPU's fd.  The vCPU must not stay "running",
    a later run() must work, and close() from the same thread must not wait for a call that
    is not in flight (it used to wait for ever: `kvmio run` and `kvmio bench` hung at Ctrl-C)."""
    with Workload(kvm, mem_size=16 << 20, max_writes=10) as w:
        v = w.vcpus[0]
        real = Vcpu._acquire_fd

        def interrupted(self: Vcpu) -> int:
            real(self)  # the fd is held ...
            raise KeyboardInterrupt  # ... and Ctrl-C lands before run() notes it

        monkeypatch.setattr(Vcpu, "_acquire_fd", interrupted)
        with pytest.raises(KeyboardInterrupt):
            v.run()
        monkeypatch.undo()
        assert not v.running
        assert isinstance(w.run_vcpu(0), Hlt) and w.writes(0) == 10  # still usable

        def after_kvm_run(*a: object, **k: object) -> None:
            raise KeyboardInterrupt  # Ctrl-C right as KVM_RUN returns

        monkeypatch.setattr(_abi, "ioctl_eintr", after_kvm_run)
        with pytest.raises(KeyboardInterrupt):
            v.run()
        monkeypatch.undo()
        assert not v.running
    assert v.closed and w.vm.closed  # the with block closed everything, without waiting


def test_kick_running_reaches_the_vcpus_in_kvm_run_of_one_thread(kvm: Kvm) -> None:
    """What the command line's Ctrl-C helper calls: every vCPU inside KVM_RUN in the given
    thread is kicked, others are left alone, whether or not anyone registered them."""
    with Workload(kvm, mem_size=16 << 20) as w:  # the guest writes for ever
        v = w.vcpus[0]
        got: list[object] = []
        t = threading.Thread(target=lambda: got.append(w.run_vcpu(0)))
        t.start()
        wait_until(lambda: v.running_thread == t.ident, what="the vCPU inside KVM_RUN")
        assert kick_running(threading.get_ident()) == 0  # nothing runs in this thread
        assert t.is_alive()
        assert kick_running(t.ident) == 1
        t.join(30)
        assert not t.is_alive() and isinstance(got[0], Interrupted)
        assert kick_running() == 0  # nothing inside run() any more
