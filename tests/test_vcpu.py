"""Vcpu: every exit kind, answers written back, registers, kick(), bad use."""

from __future__ import annotations

import threading
import time

import pytest

from kvmio import (
    DirtyRingFull,
    FailEntry,
    Hlt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    Kvm,
    KvmClosedError,
    KvmError,
    KvmInvalidArgumentError,
    KvmStateError,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    SystemEventType,
    Unknown,
    Vcpu,
    Vm,
)
from kvmio._abi import KvmRun, lib
from kvmio.exits import VcpuExit
from kvmio.guests.modes import setup_protected_mode, setup_real_mode
from kvmio.guests.programs import program
from kvmio.x86 import DTable

from guests import boot, run_collecting, wait_until


def _protected(kvm: Kvm, code: bytes) -> tuple[Vm, Vcpu]:
    vm = kvm.create_vm()
    vm.add_memory_region(0, 1 << 20)
    vm.write_memory(0x10000, code)
    vcpu = vm.create_vcpu()
    setup_protected_mode(vcpu, vm, 0x10000)
    return vm, vcpu


def _real(kvm: Kvm, code: bytes) -> tuple[Vm, Vcpu]:
    vm = kvm.create_vm()
    vm.add_memory_region(0, 1 << 20)
    vm.write_memory(0x10000, code)
    vcpu = vm.create_vcpu()
    setup_real_mode(vcpu, 0x10000)
    return vm, vcpu


def test_hello_io_out_and_hlt(kvm: Kvm) -> None:
    vm, vcpu = boot(kvm, "hello")
    with vm:
        out, ex = run_collecting(vcpu)
        assert b"".join(out[0xE9]) == b"Hello from a kvmio guest!\n"
        assert [IoOut(0x501, 2, 1, (26).to_bytes(2, "little")).value] == [
            int.from_bytes(d, "little") for d in out[0x501]]
        assert ex == Hlt()


def test_io_in_answer_is_seen_by_guest(kvm: Kvm) -> None:
    # in al, 0x60 ; out 0x61, al ; in ax, dx (dx=0x1234) ; out 0x62, ax ; hlt
    code = bytes([0xE4, 0x60, 0xE6, 0x61, 0xBA, 0x34, 0x12, 0xED, 0xE7, 0x62, 0xF4])
    vm, vcpu = _real(kvm, code)
    with vm:
        ex = vcpu.run()
        assert isinstance(ex, IoIn) and (ex.port, ex.size, ex.count) == (0x60, 1, 1)
        ex.answer(0xA5)
        assert vcpu.run() == IoOut(0x61, 1, 1, b"\xa5")
        ex = vcpu.run()
        assert isinstance(ex, IoIn) and (ex.port, ex.size) == (0x1234, 2)
        ex.answer(b"\x0d\xf0")
        assert vcpu.run() == IoOut(0x62, 2, 1, b"\x0d\xf0")
        assert vcpu.run() == Hlt()


def test_unanswered_io_in_reads_zero_and_bad_answers(kvm: Kvm) -> None:
    code = bytes([0xE4, 0x60, 0xE6, 0x61, 0xE4, 0x60, 0xE6, 0x61, 0xF4])
    vm, vcpu = _real(kvm, code)
    with vm:
        ex = vcpu.run()
        assert isinstance(ex, IoIn)
        with pytest.raises(KvmInvalidArgumentError, match="needs 1 bytes"):
            ex.answer(b"\x01\x02")
        out = vcpu.run()
        assert isinstance(out, IoOut)
        stale = ex
        ex2 = vcpu.run()
        assert isinstance(ex2, IoIn)
        with pytest.raises(KvmStateError, match="no longer current"):
            stale.answer(1)


def test_mmio_read_answer_and_write(kvm: Kvm) -> None:
    # mov eax, [0x10000000] ; out 0x10, eax ; mov dword [0x10000000], 0x12345678 ; hlt
    code = bytes([0xA1, 0, 0, 0, 0x10, 0xE7, 0x10,
                  0xC7, 0x05, 0, 0, 0, 0x10, 0x78, 0x56, 0x34, 0x12, 0xF4])
    vm, vcpu = _protected(kvm, code)
    with vm:
        ex = vcpu.run()
        assert isinstance(ex, MmioRead) and (ex.address, ex.length) == (0x10000000, 4)
        ex.answer(0xDEADBEEF)
        assert vcpu.run() == IoOut(0x10, 4, 1, (0xDEADBEEF).to_bytes(4, "little"))
        w = vcpu.run()
        assert w == MmioWrite(0x10000000, (0x12345678).to_bytes(4, "little"))
        assert isinstance(w, MmioWrite) and w.value == 0x12345678
        assert vcpu.run() == Hlt()


def test_readonly_slot_write_becomes_mmio(kvm: Kvm) -> None:
    code = bytes([0xC7, 0x05, 0, 0, 0x20, 0, 0x11, 0x22, 0x33, 0x44, 0xA1, 0, 0, 0x20, 0,
                  0xE7, 0x10, 0xF4])
    vm, vcpu = _protected(kvm, code)
    with vm:
        ro = vm.add_memory_region(0x200000, 4096, readonly=True)
        ro.write(0x200000, b"\x01\x02\x03\x04")
        assert vcpu.run() == MmioWrite(0x200000, bytes([0x11, 0x22, 0x33, 0x44]))
        # The read is served from memory, which the guest write did not change.
        assert vcpu.run() == IoOut(0x10, 4, 1, b"\x01\x02\x03\x04")


def test_shutdown_on_triple_fault(kvm: Kvm) -> None:
    vm, vcpu = _protected(kvm, bytes([0x0F, 0x0B]))  # ud2 with no IDT
    with vm:
        s = vcpu.get_sregs()
        s.idt = DTable(0, 0)
        vcpu.set_sregs(s)
        assert vcpu.run() == Shutdown()


def test_internal_error_on_x87(kvm: Kvm) -> None:
    vm, vcpu = boot(kvm, "fpu")
    with vm:
        ex = vcpu.run()
        assert isinstance(ex, InternalError)
        assert ex.suberror == InternalError.EMULATION


@pytest.mark.fake
def test_decode_exits_this_host_cannot_produce(kvm: Kvm) -> None:
    """FAIL_ENTRY, SYSTEM_EVENT and unknown reasons, decoded from a hand-filled kvm_run (a fake:
    this host's KVM emulates every instruction and reports invalid state as SHUTDOWN)."""
    vm, vcpu = boot(kvm, "hello")
    with vm:
        fake = KvmRun.in_memory()  # a kvm_run in ordinary memory, filled in by hand
        run = fake.raw
        run.exit_reason = lib.KVM_EXIT_FAIL_ENTRY
        fe = lib.kvmio_run_fail_entry(run)
        fe.hardware_entry_failure_reason, fe.cpu = 0x21, 1
        assert vcpu._decode(fake) == FailEntry(0x21, 1)
        run.exit_reason = lib.KVM_EXIT_SYSTEM_EVENT
        se = lib.kvmio_run_system_event(run)
        se.type, se.ndata, se.data[0] = lib.KVM_SYSTEM_EVENT_RESET, 1, 7
        assert vcpu._decode(fake) == SystemEvent(SystemEventType.RESET, (7,))
        run.exit_reason = 77
        lib.kvmio_run_hw(run).hardware_exit_reason = 5
        assert vcpu._decode(fake) == Unknown(77, 5)
        run.exit_reason = lib.KVM_EXIT_DIRTY_RING_FULL
        assert vcpu._decode(fake) == DirtyRingFull()
        run.exit_reason = lib.KVM_EXIT_INTR
        assert vcpu._decode(fake) == Interrupted()
        run.exit_reason = lib.KVM_EXIT_IO
        io = lib.kvmio_run_io(run)
        io.direction, io.size, io.count, io.data_offset = lib.KVM_EXIT_IO_OUT, 4, 1, 1 << 30
        with pytest.raises(KvmError, match="outside kvm_run"):
            vcpu._decode(fake)
        io.direction = lib.KVM_EXIT_IO_IN
        with pytest.raises(KvmError, match="outside kvm_run"):
            vcpu._decode(fake)
        fake.close()
        with pytest.raises(KvmClosedError, match="kvm_run is unmapped"):
            vcpu._decode(fake)


def test_registers_round_trip(kvm: Kvm) -> None:
    vm, vcpu = boot(kvm, "probe64")
    with vm:
        r = vcpu.get_regs()
        r.rax, r.r15, r.rbx = 0x1122334455667788, 0xFFFF_FFFF_FFFF_FFFF, 42
        vcpu.set_regs(r)
        assert vcpu.get_regs() == r
        s = vcpu.get_sregs()
        assert s.cs.l == 1 and s.efer & (1 << 10)
        s2 = s.copy()
        s2.cr2 = 0xABC000
        vcpu.set_sregs(s2)
        assert vcpu.get_sregs().cr2 == 0xABC000
        assert s.cr2 != 0xABC000  # copy() is deep
        fpu = vcpu.get_fpu()
        vcpu.set_fpu(fpu)
        assert vcpu.get_fpu() == fpu
        with pytest.raises(KvmInvalidArgumentError, match="exactly"):
            vcpu.set_fpu(fpu[:-1])
        vcpu.set_msrs({0x174: 0x10})  # IA32_SYSENTER_CS
        assert vcpu.get_msrs([0x174]) == {0x174: 0x10}
        with pytest.raises(KvmError, match="cannot be read"):
            vcpu.get_msrs([0xDEAD0000])
        # Each setter changes a value that its getter then reads back (offsets from
        # <linux/kvm.h> and the SDM's FXSAVE layout).
        vcpu.set_cpuid2(kvm.get_supported_cpuid())  # XCR0 may hold what the CPUID offers
        xcrs = vcpu.get_xcrs()
        assert xcrs[0] & 1  # x87 state is always enabled in XCR0
        vcpu.set_xcrs({0: 0x3})  # x87 | SSE
        assert vcpu.get_xcrs()[0] == 0x3
        xs = bytearray(vcpu.get_xsave())
        assert len(xs) == 4096
        mxcsr = int.from_bytes(xs[24:28], "little")  # FXSAVE: MXCSR at byte 24
        xs[24:28] = (mxcsr ^ 0x1).to_bytes(4, "little")  # toggle the invalid-op flag
        bv = int.from_bytes(xs[512:520], "little")  # XSAVE header: XSTATE_BV
        xs[512:520] = (bv | 0x2).to_bytes(8, "little")  # the SSE state (MXCSR) is present
        vcpu.set_xsave(bytes(xs))
        assert int.from_bytes(vcpu.get_xsave()[24:28], "little") == mxcsr ^ 0x1
        ev = bytearray(vcpu.get_vcpu_events())
        assert ev[14] == 0  # nmi.masked (exception: 8 bytes, interrupt: 4, nmi.injected...)
        ev[14] = 1
        vcpu.set_vcpu_events(bytes(ev))
        assert vcpu.get_vcpu_events()[14] == 1
        dr = bytearray(vcpu.get_debugregs())
        dr[0:8] = (0x12345000).to_bytes(8, "little")  # db[0]
        vcpu.set_debugregs(bytes(dr))
        assert vcpu.get_debugregs()[0:8] == (0x12345000).to_bytes(8, "little")


def test_cpuid2_and_lapic(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        vm.create_pit2()
        vm.set_irq_line(4, True)
        vm.set_irq_line(4, False)
        vcpu = vm.create_vcpu()
        cpuid = kvm.get_supported_cpuid()
        vcpu.set_cpuid2(cpuid)
        got = vcpu.get_cpuid2()
        # KVM keeps what it set (it may drop leaves above the maximum basic leaf).
        assert {(e.function, e.index) for e in got} <= {(e.function, e.index) for e in cpuid}
        assert {e.function for e in got} >= {0, 1, 0x80000000, 0x80000001}
        lapic = bytearray(vcpu.get_lapic())
        assert len(lapic) == 1024
        lapic[0x80] = 0x20  # the task-priority register
        vcpu.set_lapic(bytes(lapic))
        got_lapic = vcpu.get_lapic()
        assert got_lapic[0x80] == 0x20
        assert got_lapic[0x20:0x24] == lapic[0x20:0x24]  # APIC ID register
        # MP states other than runnable need the in-kernel irqchip.
        assert vcpu.get_mp_state() == lib.KVM_MP_STATE_RUNNABLE
        vcpu.set_mp_state(lib.KVM_MP_STATE_HALTED)
        assert vcpu.get_mp_state() == lib.KVM_MP_STATE_HALTED
        vcpu.set_mp_state(lib.KVM_MP_STATE_RUNNABLE)
        assert vcpu.get_mp_state() == lib.KVM_MP_STATE_RUNNABLE


def test_clock(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vm.set_clock(5_000_000_000)
        assert 5_000_000_000 <= vm.get_clock() < 6_000_000_000


def test_kick_from_another_thread(kvm: Kvm) -> None:
    from kvmio.guests.workload import Workload

    with Workload(kvm, mem_size=64 << 20) as w:  # runs forever
        result: list[object] = []
        t = threading.Thread(target=lambda: result.append(w.vcpus[0].run()))
        t.start()
        wait_until(lambda: w.total_writes() > 0, what="the guest to run")
        assert t.is_alive() and w.vcpus[0].running
        w.vcpus[0].kick()
        t.join(30)
        assert not t.is_alive()
        assert result == [Interrupted()]
        assert w.total_writes() > 0
        assert not w.vcpus[0].immediate_exit
        # The vCPU runs on normally afterwards.
        before = w.total_writes()
        t = threading.Thread(target=lambda: result.append(w.vcpus[0].run()))
        t.start()
        wait_until(lambda: w.total_writes() > before, what="the guest to run on")
        w.vcpus[0].kick()
        t.join(30)
        assert not t.is_alive()


def test_kick_before_run_returns_at_once(kvm: Kvm) -> None:
    vm, vcpu = boot(kvm, "hello")
    with vm:
        vcpu.kick()
        assert vcpu.immediate_exit
        assert vcpu.run() == Interrupted()
        out, ex = run_collecting(vcpu)
        assert ex == Hlt() and out[0xE9]


def test_concurrent_run_and_close_while_running(kvm: Kvm) -> None:
    from kvmio.guests.workload import Workload

    with Workload(kvm, mem_size=64 << 20) as w:
        v = w.vcpus[0]
        results: list[object] = []
        t = threading.Thread(target=lambda: results.append(v.run()))
        t.start()
        wait_until(lambda: v.running, what="the vCPU to enter run()")
        with pytest.raises(KvmStateError, match="already running"):
            v.run()
        # close() from another thread stops the run (kick) and waits for it to return.
        v.close()
        assert not v.running and v.closed
        t.join(30)
        assert not t.is_alive()
        assert [type(r) for r in results] == [Interrupted]
        for call, match in [(v.run, "this Vcpu is closed"), (v.get_regs, "this Vcpu is closed"),
                            (v.kick, r"kvm_run is unmapped \(the vCPU is closed\)")]:
            with pytest.raises(KvmClosedError, match=match) as ei:
                call()
            assert ei.value.errno is None  # refused by kvmio, not an EBADF from a reused fd


def test_vcpu_ids(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        a = vm.create_vcpu()
        b = vm.create_vcpu()
        assert (a.id, b.id) == (0, 1)
        with pytest.raises(KvmInvalidArgumentError, match="already exists"):
            vm.create_vcpu(1)
        with pytest.raises(KvmInvalidArgumentError, match="out of range"):
            vm.create_vcpu(1 << 20)
        assert set(vm.vcpus) == {0, 1}


def test_kick_is_never_lost(kvm: Kvm) -> None:
    """Kicks before KVM_RUN, inside it (the guest seen running), and at random moments from two
    threads (which may land before, during or after it): every run that a kick could concern
    returns promptly."""
    import random

    from kvmio.guests.workload import Workload

    rng = random.Random(3)
    with Workload(kvm, mem_size=16 << 20) as w:  # a guest that never stops by itself
        v = w.vcpus[0]

        def kick_later(delay: float) -> None:
            time.sleep(delay)  # a random moment: the race is the point; nothing waits on it
            v.kick()

        for i in range(60):
            kind = ("before", "inside", "random")[i % 3]
            result: list[object] = []
            t = threading.Thread(target=lambda out=result: out.append(v.run()))
            kickers = [threading.Thread(target=kick_later, args=(rng.uniform(0, 0.004),))
                       for _ in range(2)] if kind == "random" else []
            if kind == "before":
                v.kick()
            t.start()
            if kind == "inside":
                # Inside KVM_RUN for sure: run() has begun and the guest's own write counter
                # moves (it moves only while the guest runs).
                wait_until(lambda: v.running, what="the vCPU to enter run()")
                before = w.writes(0)
                wait_until(lambda: w.writes(0) != before,  # noqa: B023
                           what="the guest to run")
                v.kick()
            for k in kickers:
                k.start()
            for k in kickers:
                k.join()
            t.join(5)
            assert not t.is_alive(), f"a kick ({kind}) was lost: run() did not return"
            assert result == [Interrupted()]
            # A kick that landed after run() returned is still pending: the next run returns
            # at once; drain it so that iterations stay independent.
            if v.immediate_exit:
                assert v.run() == Interrupted()


def test_xsave_uses_the_size_the_kernel_reports(kvm: Kvm) -> None:
    from kvmio import Cap

    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu()
        size = vm.check_extension(Cap.XSAVE2)
        assert vcpu.xsave_size == (size or 4096) >= 4096
        xs = vcpu.get_xsave()
        assert len(xs) == vcpu.xsave_size
        vcpu.set_xsave(xs)
        for bad in (xs[:-4], xs + bytes(4)):
            with pytest.raises(KvmInvalidArgumentError, match=f"is {vcpu.xsave_size} bytes"):
                vcpu.set_xsave(bad)


def test_an_io_exit_is_completed_without_running_on(kvm: Kvm) -> None:
    vm, vcpu = boot(kvm, "hello")
    with vm:
        assert not vcpu.exit_pending
        ex = vcpu.run()
        assert isinstance(ex, IoOut) and ex.port == 0xE9 and vcpu.exit_pending
        # KVM finishes the OUT only when it is re-entered; completing it runs nothing more.
        assert vcpu.complete_pending_exit() == 0
        assert not vcpu.exit_pending and not vcpu.immediate_exit
        after = vcpu.get_regs()
        loop = program("hello").code.index(bytes([0xEE, 0xE2]))  # out dx, al; loop
        assert after.rip == loop + 1 and after.rcx == 26  # at `loop`, which did not run yet
        assert vcpu.complete_pending_exit() == 0  # nothing pending: nothing happens
        assert vcpu.get_regs() == after
        out, last = run_collecting(vcpu)
        assert last == Hlt() and b"".join(out[0xE9]) == b"ello from a kvmio guest!\n"


def test_completing_a_string_instruction_item(kvm: Kvm) -> None:
    # rep outsb of 3 bytes from DS:SI, one exit per byte.
    code = bytes([0xBE, 0x20, 0x00,   # mov si, 0x20
                  0xB9, 0x03, 0x00,   # mov cx, 3
                  0xBA, 0xE9, 0x00,   # mov dx, 0xe9
                  0xF3, 0x6E,         # rep outsb
                  0xF4]).ljust(0x20, b"\0") + b"abc"
    vm, vcpu = _real(kvm, code)
    with vm:
        first = vcpu.run()
        assert isinstance(first, IoOut) and first.data == b"a"
        items: list[VcpuExit] = []
        vcpu.complete_pending_exit(items.append)
        assert not vcpu.exit_pending
        r = vcpu.get_regs()
        # Between two items the state is consistent: RCX and RSI count the items done, and
        # RIP is at the rep instruction, which goes on with the next one.
        done = 1 + len(items)
        assert (r.rcx, r.rsi) == (3 - done, 0x20 + done)
        assert r.rip == (9 if done < 3 else 11)
        rest = run_collecting(vcpu)
        assert b"".join(rest[0].get(0xE9, [])) == b"abc"[done:] and rest[1] == Hlt()


@pytest.mark.fake
def test_complete_pending_exit_hands_on_further_exits(kvm: Kvm,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A kernel may exit again while it completes an operation (the next item of a string
    # instruction that it does not restart between items); this host does not, so a fake
    # run() plays that kernel.
    vm, vcpu = boot(kvm, "hello")
    with vm:
        assert isinstance(vcpu.run(), IoOut)
        script: list[VcpuExit] = [IoOut(0xE9, 1, 1, b"b"), IoOut(0xE9, 1, 1, b"c"),
                                  Interrupted()]

        def fake_run() -> VcpuExit:
            assert vcpu.immediate_exit  # completion must never let the guest run on
            ex = script.pop(0)
            vcpu._exit_pending = not isinstance(ex, Interrupted)
            return ex

        monkeypatch.setattr(vcpu, "run", fake_run)
        with pytest.raises(KvmStateError, match="another exit"):
            vcpu.complete_pending_exit()
        assert vcpu.exit_pending and not vcpu.immediate_exit
        items: list[VcpuExit] = []
        assert vcpu.complete_pending_exit(items.append) == 1
        assert items == [IoOut(0xE9, 1, 1, b"c")] and not vcpu.exit_pending and not script


def test_vcpu_state_in_one_call(kvm: Kvm) -> None:
    from kvmio.vcpu import STATE_PARTS, decode_msrs, encode_cpuid, encode_msrs

    vm, vcpu = boot(kvm, "probe64")
    with vm:
        vcpu.set_cpuid2(kvm.get_supported_cpuid())
        msrs = vcpu.readable_msrs([0x10, 0xDEAD0000, 0x174, 0xDEAD0001, 0xC0000081])
        assert msrs == [0x10, 0x174, 0xC0000081]  # the kernel refuses made-up MSRs
        parts = [p for p in STATE_PARTS if p != "lapic"]  # no in-kernel irqchip here
        raw = vcpu.get_state(parts, msr_indices=msrs)
        assert list(raw) == parts
        assert [i for i, _ in decode_msrs(raw["msrs"])] == msrs
        assert raw["cpuid"] == encode_cpuid(vcpu.get_cpuid2())
        r = vcpu.get_regs()
        r.rax = 0x1234
        vcpu.set_regs(r)
        order = ["cpuid", "sregs", "regs", "xcrs", "xsave", "msrs", "vcpu_events", "mp_state",
                 "debugregs"]
        batch = Vcpu.prepare_state([(p, raw[p]) for p in order])
        vcpu.set_state(batch)
        assert vcpu.get_regs().rax != 0x1234
        assert vcpu.get_state(parts, msr_indices=msrs)["regs"] == raw["regs"]
        ex = vcpu.run()  # probe64 from its start: EFER's low half on port 0x10, LMA set
        assert isinstance(ex, IoOut) and ex.port == 0x10
        assert int.from_bytes(ex.data, "little") & (1 << 10)
        # One batch serves any vCPU, in turn (the native call's fd array is kept between
        # calls to the same fds, and remade for others): each gets the batch's registers.
        other = vm.create_vcpu(1)
        regs_only = Vcpu.prepare_state([("regs", raw["regs"])])
        for target in (other, vcpu, other, vcpu):
            for v in (vcpu, other):
                r = v.get_regs()
                r.rax = 0x5678
                v.set_regs(r)
            target.set_state(regs_only)
            assert target.get_state(["regs"])["regs"] == raw["regs"]
            bystander = vcpu if target is other else other
            assert bystander.get_regs().rax == 0x5678
        # Lengths are checked when the batch is built, and the XSAVE size when it is used.
        with pytest.raises(KvmInvalidArgumentError, match="144 bytes, not 143"):
            Vcpu.prepare_state([("regs", raw["regs"][:-1])])
        with pytest.raises(KvmInvalidArgumentError, match="nmsrs=3"):
            Vcpu.prepare_state([("msrs", raw["msrs"][:-1])])
        with pytest.raises(KvmInvalidArgumentError, match="no vCPU state part"):
            Vcpu.prepare_state([("pit2", b"")])
        big = Vcpu.prepare_state([("xsave", raw["xsave"] + bytes(64))])
        with pytest.raises(KvmInvalidArgumentError, match="the state holds"):
            vcpu.set_state(big)
        # A refused MSR names itself, and the writes before it stay done.
        bad = Vcpu.prepare_state([("regs", raw["regs"]),
                                  ("msrs", encode_msrs([(0x174, 7), (0xDEAD0000, 1)]))])
        with pytest.raises(KvmError, match="MSR 0xdead0000 cannot be set") as ei:
            vcpu.set_state(bad)
        assert ei.value.ioctl == "KVM_SET_MSRS"
        assert vcpu.get_msrs([0x174]) == {0x174: 7}


def test_encode_cpuid_round_trips_and_names_a_bad_field(kvm: Kvm) -> None:
    import numpy as np

    from kvmio.vcpu import decode_cpuid, encode_cpuid
    from kvmio.x86 import CpuidEntry

    cpuid = kvm.get_supported_cpuid()
    raw = encode_cpuid(cpuid)
    assert decode_cpuid(raw) == list(cpuid)
    assert int.from_bytes(raw[:4], "little") == len(cpuid)
    # The header and every entry's padding are zero: decode skips them, so read them here.
    entry = 40  # sizeof(struct kvm_cpuid_entry2)
    assert len(raw) == 8 + entry * len(cpuid) and raw[4:8] == bytes(4)
    assert all(raw[8 + k * entry + 28:8 + (k + 1) * entry] == bytes(12)
               for k in range(len(cpuid)))
    e = cpuid[0]
    numpy_ints = CpuidEntry(*(np.uint32(v) for v in (e.function, e.index, e.flags, e.eax,
                                                     e.ebx, e.ecx, e.edx)))
    assert encode_cpuid([numpy_ints, *cpuid[1:]]) == raw
    for bad, message in ((True, "eax must be an int, not bool"), (-1, "eax must be a u32"),
                         (1 << 32, "eax must be a u32"), (1.0, "eax must be an int, not float")):
        wrong = CpuidEntry(e.function, e.index, e.flags, bad, e.ebx, e.ecx, e.edx)
        with pytest.raises(KvmInvalidArgumentError, match=message):
            encode_cpuid([*cpuid[:3], wrong])
    with pytest.raises(KvmInvalidArgumentError, match="CPUID entry"):
        encode_cpuid([e, "not an entry"])  # type: ignore[list-item]


def test_cpuid_cannot_change_after_the_first_run(kvm: Kvm) -> None:
    import errno

    from kvmio.vcpu import encode_cpuid

    vm, vcpu = boot(kvm, "hello")
    with vm:
        cpuid = kvm.get_supported_cpuid()
        vcpu.set_cpuid2(cpuid)
        assert isinstance(vcpu.run(), IoOut)
        same = Vcpu.prepare_state([("cpuid", encode_cpuid(vcpu.get_cpuid2()))])
        vcpu.set_state(same)  # the installed CPUID: allowed (and skipped)
        other = [e if e.function != 0 else
                 type(e)(e.function, e.index, e.flags, e.eax, e.ebx ^ 1, e.ecx, e.edx)
                 for e in cpuid]
        with pytest.raises(KvmError) as ei:
            vcpu.set_state(Vcpu.prepare_state([("cpuid", encode_cpuid(other))]))
        # KVM accepts only the CPUID it has once the vCPU ran (EINVAL since Linux 5.17).
        assert ei.value.errno == errno.EINVAL and ei.value.ioctl == "KVM_SET_CPUID2"
