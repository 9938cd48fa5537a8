"""kvmio.snapshot.state: the machine state (no guest memory) captured, restored and serialized.

Restores are checked by behaviour: a guest run on from a capture point must make the same
exits with the same registers as the first time, in the same VM and in a new one (the test
copies guest memory itself; memory is another module's part).
"""

from __future__ import annotations

import errno
import re
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmio.snapshot.state as state_module
from kvmio import (
    Interrupted,
    IoOut,
    Kvm,
    KvmInvalidArgumentError,
    KvmStateError,
    SnapshotError,
    Vcpu,
    Vm,
)
from kvmio._abi import ffi
from kvmio.devices import IoBus
from kvmio.exits import VcpuExit
from kvmio.guests.modes import setup_long_mode, setup_protected_mode, setup_real_mode
from kvmio.guests.multiboot import MultibootMachine, StopReason
from kvmio.snapshot import FORMAT_VERSION, MachineState, VcpuState, VmState, capture, restore
from kvmio.snapshot.state import (
    MAGIC,
    MSR_IA32_TSC,
    MSR_IA32_TSC_DEADLINE,
    VCPU_RESTORE_ORDER,
    VM_RESTORE_ORDER,
    finish_pending_exits,
)
from kvmio.vcpu import STATE_PARTS, decode_msrs, state_part_size
from kvmio.vm import IRQCHIP_STATE_SIZE, PIT_STATE_SIZE, VM_STATE_PARTS, ClockData
from kvmio.x86 import CpuidEntry, Regs

from guests import wait_until
from test_multiboot import kernels  # noqa: F401  (the session's test kernels, a fixture)

MIB = 1 << 20
MEM = 4 * MIB
CODE = 0x10000
COUNTER = 0x18000

#: A loop whose bytes mean the same in real, protected and long mode (ModR/M 07 is [bx] in
#: 16-bit code and [edi]/[rdi] in 32/64-bit code): 20 times, increment the counter in memory,
#: add it to CX/ECX, and report the counter (port 0xE9) and the sum (port 0xEA); then say it
#: is done on port 0xEB (an exit also with the in-kernel irqchip, which keeps HLT) and halt.
LOOP = bytes([
    0xFF, 0x07,        # inc word/dword [bx | edi | rdi]
    0x8B, 0x07,        # mov ax/eax, [...]
    0x01, 0xC1,        # add cx/ecx, ax/eax
    0xE7, 0xE9,        # out 0xe9, ax/eax
    0x89, 0xC8,        # mov ax/eax, cx/ecx
    0xE7, 0xEA,        # out 0xea, ax/eax
    0x83, 0x3F, 0x14,  # cmp word/dword [...], 20
    0x72, 0xEF,        # jb loop (-17)
    0xE6, 0xEB,        # out 0xeb, al
    0xF4,              # hlt
])
DONE_PORT = 0xEB


def _machine(kvm: Kvm, mode: str, *, irqchip: bool = False,
             memory: Callable[[Vm], None] | None = None) -> tuple[Vm, Vcpu]:
    """The loop guest in ``mode``; ``memory(vm)`` adds the memory (default: MEM bytes at 0,
    unlogged), before any vCPU exists."""
    vm = kvm.create_vm()
    vm.set_tss_address()
    if irqchip:
        vm.create_irqchip()
    if memory is None:
        vm.add_memory_region(0, MEM)
    else:
        memory(vm)
    vm.write_memory(CODE, LOOP)
    vcpu = vm.create_vcpu()
    vcpu.set_cpuid2(kvm.get_supported_cpuid())
    if mode == "real":
        setup_real_mode(vcpu, CODE)  # DS = CS = 0x1000
        r = vcpu.get_regs()
        r.rbx = COUNTER - CODE
    else:
        (setup_protected_mode if mode == "protected" else setup_long_mode)(vcpu, vm, CODE)
        r = vcpu.get_regs()
        r.rdi = COUNTER
    vcpu.set_regs(r)
    return vm, vcpu


def _trace(vcpu: Vcpu, limit: int = 200) -> list[tuple[VcpuExit, Regs]]:
    """Run to the loop's end; every exit with the registers at it (after its operation
    completed)."""
    out: list[tuple[VcpuExit, Regs]] = []
    for _ in range(limit):
        ex = vcpu.run()
        vcpu.complete_pending_exit()
        out.append((ex, vcpu.get_regs()))
        if isinstance(ex, IoOut) and ex.port == DONE_PORT:
            return out
        assert isinstance(ex, IoOut), ex
    raise AssertionError("the guest did not finish")


@pytest.mark.parametrize("mode", ["real", "protected", "long"])
@pytest.mark.parametrize("target", ["same VM", "new VM"])
def test_a_restored_guest_makes_the_same_exits(kvm: Kvm, mode: str, target: str) -> None:
    vm, vcpu = _machine(kvm, mode)
    with vm:
        for _ in range(9):  # to the middle of an iteration: the counter's report
            ex = vcpu.run()
            assert isinstance(ex, IoOut)
        assert ex.port == 0xE9 and vcpu.exit_pending
        with pytest.raises(KvmStateError, match="complete_pending_exit"):
            capture(vm, [vcpu])
        vcpu.complete_pending_exit()
        saved = capture(vm, [vcpu])
        memory = vm.read_memory(0, MEM)
        at_capture = vcpu.get_regs()
        assert saved.vcpus[0].registers() == at_capture
        first = _trace(vcpu)
        assert len(first) == 2 * (20 - 5) + 1 + 1  # the sum of iteration 5, 15 more, done
        assert vcpu.get_regs() != at_capture and vm.read_memory(0, MEM) != memory
        if target == "same VM":
            vm.write_memory(0, memory)
            restore(saved, vm, [vcpu])
            assert vcpu.get_regs() == at_capture
            assert _trace(vcpu) == first
        else:
            vm2, vcpu2 = _machine(kvm, mode)
            with vm2:
                vm2.write_memory(0, memory)
                restore(saved, vm2, vm2.vcpus)
                assert vcpu2.get_regs() == at_capture
                assert vcpu2.get_sregs() == vcpu.get_sregs()
                assert _trace(vcpu2) == first


def test_restore_twice_and_across_a_round_trip(kvm: Kvm) -> None:
    vm, vcpu = _machine(kvm, "long")
    with vm:
        vcpu.run()
        vcpu.complete_pending_exit()
        saved = capture(vm, vm.vcpus)
        again = MachineState.from_bytes(saved.to_bytes())
        assert again == saved and again is not saved
        assert again.vcpus[0].msrs == saved.vcpus[0].msrs
        memory = vm.read_memory(0, MEM)
        first = _trace(vcpu)
        for state in (saved, again, saved):  # a state serves any number of restores
            vm.write_memory(0, memory)
            restore(state, vm, vm.vcpus)
            assert _trace(vcpu) == first


# -- a Multiboot kernel with the in-kernel irqchip and PIT ------------------------------------


class _Stop(Exception):
    pass


def _device_handler(machine: MultibootMachine,
                    out: list[bytes]) -> Callable[[VcpuExit], None]:
    def on_exit(ex: VcpuExit) -> None:  # exits met while an exit is completed
        if isinstance(ex, IoOut):
            for i in range(0, len(ex.data), ex.size):
                machine.bus.write(ex.port, ex.size, int.from_bytes(ex.data[i:i + ex.size],
                                                                   "little"))
            out.append(ex.data)
    return on_exit


def test_a_multiboot_kernel_with_irqchip_and_pit_goes_on_after_a_restore(
        kvm: Kvm, kernels: dict[str, Path]) -> None:  # noqa: F811
    # The timer kernel programs the PIC and the PIT (100 Hz), prints "tick " from its IRQ0
    # handler three times and exits with 0x10.  Capture it inside the first handler, right
    # after its "tick ": the PIC has IRQ0 in service, the PIT counts, the LAPIC passes the
    # PIC's interrupts on.
    with MultibootMachine(kvm, kernels["timer"], mem=MEM) as m:
        seen: list[bytes] = []

        def on_output(data: bytes) -> None:
            seen.append(data)
            if b"".join(seen) == b"tick ":
                raise _Stop

        with pytest.raises(_Stop):
            m.run(timeout=20, on_output=on_output)
        m.vcpu.complete_pending_exit(_device_handler(m, seen))
        saved = capture(m.vm, m.vm.vcpus, devices=m.bus)
        memory = m.vm.read_memory(0, MEM)
        assert saved.vm.has_irqchip and saved.vm.has_pit and saved.devices is not None
        assert saved.vcpus[0].lapic is not None
        pic = ffi.new("struct kvm_pic_state *")
        ffi.memmove(pic, saved.vm.pic_master, ffi.sizeof(pic[0]))
        assert (pic.irq_base, pic.imr, pic.isr) == (0x20, 0xFE, 0x01)  # IRQ0 in service
        pit = ffi.new("struct kvm_pit_state2 *")
        ffi.memmove(pit, saved.vm.pit2, PIT_STATE_SIZE)
        assert (pit.channels[0].count, pit.channels[0].mode) == (11932, 2)
        assert MachineState.from_bytes(saved.to_bytes()) == saved

        # The uninterrupted run.
        rest = m.run(timeout=20)
        assert (rest.reason, rest.exit_code) == (StopReason.DEBUG_EXIT, (0x10 << 1) | 1)
        assert rest.output == b"tick tick \n"

        # The same VM, after it ran on to its end.
        m.vm.write_memory(0, memory)
        restore(saved, m.vm, m.vm.vcpus, devices=m.bus)
        again = m.run(timeout=20)
        assert (again.reason, again.exit_code, again.output) == (
            rest.reason, rest.exit_code, rest.output)

    # A new VM of the same layout.
    with MultibootMachine(kvm, kernels["timer"], mem=MEM) as m2:
        m2.vm.write_memory(0, memory)
        restore(saved, m2.vm, m2.vm.vcpus, devices=m2.bus)
        other = m2.run(timeout=20)
        assert (other.reason, other.exit_code, other.output) == (
            rest.reason, rest.exit_code, rest.output)

    # Without the VM's part (PICs, IOAPIC, PIT), the same memory and vCPU state go nowhere:
    # nothing programs the timer again, so no tick comes.
    with MultibootMachine(kvm, kernels["timer"], mem=MEM) as m3:
        m3.vm.write_memory(0, memory)
        vcpu_only = Vcpu.prepare_state(saved.vcpus[0].restore_parts())
        m3.vcpu.set_state(vcpu_only)
        stuck = m3.run(timeout=1)
        assert stuck.reason is StopReason.TIMEOUT and stuck.output == b""


# -- what does not fit, and misuse ------------------------------------------------------------


def test_a_state_restores_only_into_a_machine_of_its_shape(kvm: Kvm) -> None:
    vm, vcpu = _machine(kvm, "protected")
    with vm:
        saved = capture(vm, [vcpu])
        with kvm.create_vm() as other:
            other.add_memory_region(0, MEM)
            v1 = other.create_vcpu(1)
            with pytest.raises(SnapshotError, match=r"vCPUs \[0\]; the machine has \[1\]"):
                restore(saved, other, [v1])
        vm2, vcpu2 = _machine(kvm, "protected", irqchip=True)
        with vm2:
            with pytest.raises(SnapshotError, match="without the in-kernel irqchip"):
                restore(saved, vm2, [vcpu2])
            with_chip = capture(vm2, [vcpu2])
            with pytest.raises(SnapshotError, match="with the in-kernel irqchip"):
                restore(with_chip, vm, [vcpu])
        big = VcpuState(**{**_fields(saved.vcpus[0]), "xsave": bytes(vcpu.xsave_size + 64)})
        wrong = MachineState(saved.vm, {0: big})
        with pytest.raises(SnapshotError, match="XSAVE area") as ei:
            restore(wrong, vm, [vcpu])
        assert ei.value.vcpu == 0
        with pytest.raises(KvmInvalidArgumentError, match="not an open vCPU of this VM"):
            restore(saved, vm, [vcpu2])
        with pytest.raises(SnapshotError, match="pass the IoBus"):
            restore(MachineState(saved.vm, saved.vcpus, {}), vm, [vcpu], devices=None)
        with pytest.raises(SnapshotError, match="no device state"):
            restore(saved, vm, [vcpu], devices=IoBus())


def _fields(s: VcpuState) -> dict[str, object]:
    return {name: getattr(s, name) for name in ("regs", "sregs", "fpu", "xsave", "xcrs",
                                                "msrs", "lapic", "vcpu_events", "mp_state",
                                                "debugregs", "cpuid")}


def test_sizes_are_checked_when_a_state_is_made() -> None:
    good = _synthetic()
    v = good.vcpus[0]
    for name in ("regs", "sregs", "fpu", "vcpu_events", "debugregs", "lapic"):
        size = state_part_size(name)
        assert size is not None
        with pytest.raises(KvmInvalidArgumentError, match=f"{name} must be {size} bytes"):
            VcpuState(**{**_fields(v), name: bytes(size - 1)})
    with pytest.raises(KvmInvalidArgumentError, match="an XSAVE area"):
        VcpuState(**{**_fields(v), "xsave": bytes(4095)})
    with pytest.raises(KvmInvalidArgumentError, match="is not a u64"):
        VcpuState(**{**_fields(v), "msrs": {0x10: -1}})
    with pytest.raises(KvmInvalidArgumentError, match="pic_slave must be 512 bytes"):
        VmState(ClockData(1), bytes(512), bytes(511), bytes(512))
    with pytest.raises(KvmInvalidArgumentError, match="come together"):
        VmState(ClockData(1), bytes(512), None, None)
    with pytest.raises(KvmInvalidArgumentError, match="lacks the irqchip"):
        MachineState(VmState(ClockData(1)), {0: _synthetic(irqchip=True).vcpus[0]})
    assert not isinstance(v.msrs, dict)  # read-only: a prepared state cannot go stale
    with pytest.raises(TypeError):
        v.msrs[0x10] = 1  # type: ignore[index]


def test_capture_refuses_a_vcpu_inside_kvm_run(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vm.add_memory_region(0, MEM)
        vm.write_memory(CODE, b"\xEB\xFE")  # jmp $
        vcpu = vm.create_vcpu()
        setup_real_mode(vcpu, CODE)
        result: list[VcpuExit] = []
        t = threading.Thread(target=lambda: result.append(vcpu.run()))
        t.start()
        try:
            wait_until(lambda: vcpu.running_thread is not None, what="the vCPU to run")
            with pytest.raises(KvmStateError, match="inside run"):
                capture(vm, [vcpu])
        finally:
            vcpu.kick()
            t.join(30)
        assert result == [Interrupted()]
        saved = capture(vm, [vcpu])  # outside KVM_RUN again
        restore(saved, vm, [vcpu])


def test_msrs_are_those_the_vcpu_reads_and_takes_back(kvm: Kvm) -> None:
    vm, vcpu = _machine(kvm, "long")
    with vm:
        saved = capture(vm, [vcpu], msr_indices=[MSR_IA32_TSC, 0xDEAD0000, 0x174,
                                                  MSR_IA32_TSC_DEADLINE])
        got = list(saved.vcpus[0].msrs)
        assert 0xDEAD0000 not in got  # there is no such MSR: the kernel refuses it
        assert got[:2] == [MSR_IA32_TSC, 0x174]  # in the order asked
        full = capture(vm, [vcpu])
        assert set(full.vcpus[0].msrs) <= set(vm.limits.msr_index_list)
        assert MSR_IA32_TSC in full.vcpus[0].msrs
        restore(full, vm, [vcpu])  # every saved MSR is taken back


def test_msr_tsc_deadline_is_written_last() -> None:
    v = _synthetic(irqchip=True).vcpus[0]
    parts = dict(v.restore_parts())
    order = [i for i, _ in decode_msrs(parts["msrs"])]
    assert next(iter(v.msrs)) == MSR_IA32_TSC_DEADLINE and order[-1] == MSR_IA32_TSC_DEADLINE
    assert order.index(MSR_IA32_TSC) < order.index(MSR_IA32_TSC_DEADLINE)


def test_a_refused_write_says_the_machine_is_partly_restored(kvm: Kvm) -> None:
    vm, vcpu = _machine(kvm, "real")
    with vm:
        saved = capture(vm, [vcpu])
        bad = VcpuState(**{**_fields(saved.vcpus[0]),
                           "msrs": {**saved.vcpus[0].msrs, 0xDEAD0000: 1}})
        with pytest.raises(SnapshotError, match="partly written") as ei:
            restore(MachineState(saved.vm, {0: bad}), vm, [vcpu])
        assert (ei.value.ioctl, ei.value.vcpu) == ("KVM_SET_MSRS", 0)
        assert "0xdead0000" in str(ei.value)
        # The kernel's refusal keeps its errno: another CPUID after the vCPU ran.
        assert isinstance(vcpu.run(), IoOut)
        vcpu.complete_pending_exit()
        cpuid = [e if e.function != 0 else CpuidEntry(e.function, e.index, e.flags, e.eax,
                                                       e.ebx ^ 1, e.ecx, e.edx)
                 for e in saved.vcpus[0].cpuid]
        other = VcpuState(**{**_fields(saved.vcpus[0]), "cpuid": tuple(cpuid)})
        with pytest.raises(SnapshotError) as ei:
            restore(MachineState(saved.vm, {0: other}), vm, [vcpu])
        assert (ei.value.errno, ei.value.ioctl) == (errno.EINVAL, "KVM_SET_CPUID2")
        assert "the VM written before it" in str(ei.value)
        restore(saved, vm, [vcpu])  # the right one still goes back


def test_restore_finishes_a_pending_exit_first(kvm: Kvm) -> None:
    vm, vcpu = _machine(kvm, "protected")
    with vm:
        vcpu.run()
        vcpu.complete_pending_exit()
        saved = capture(vm, [vcpu])
        memory = vm.read_memory(0, MEM)
        first = _trace(vcpu)
        for by_hand in (True, False):
            vm.write_memory(0, memory)
            restore(saved, vm, [vcpu])
            for _ in range(5):  # stop at an exit and leave it pending: KVM would finish it
                ex = vcpu.run()  # at the next KVM_RUN, over the restored state
            assert isinstance(ex, IoOut) and vcpu.exit_pending
            if by_hand:
                finish_pending_exits([vcpu])  # step 0, before guest memory
                assert not vcpu.exit_pending
            vm.write_memory(0, memory)
            restore(saved, vm, [vcpu])  # does step 0 itself if need be
            assert not vcpu.exit_pending
            assert _trace(vcpu) == first


def test_a_restorer_checks_once_and_follows_the_machine(kvm: Kvm) -> None:
    vm, vcpu = _machine(kvm, "long", irqchip=True)
    with vm:
        vcpu.run()
        vcpu.complete_pending_exit()
        saved = capture(vm, [vcpu])
        memory = vm.read_memory(0, MEM)
        first = _trace(vcpu)
        r = saved.restorer(vm, [vcpu])
        for _ in range(3):
            vm.write_memory(0, memory)
            r.restore()
            assert _trace(vcpu) == first
        vm.create_pit2()  # a PIT the state knows nothing of would run on untouched
        with pytest.raises(SnapshotError, match="gained an in-kernel PIT"):
            r.restore()
        with pytest.raises(SnapshotError, match="without the in-kernel PIT"):
            restore(saved, vm, [vcpu])


# -- the documented order is the order the code writes ------------------------------------------


def test_the_restore_table_is_the_order_the_code_follows() -> None:
    doc = state_module.__doc__ or ""
    table = doc[doc.index("Restore order"):doc.index("Capture order")]
    rows = [line for line in table.splitlines() if re.match(r"^(\d+| {4,})\s", line)]
    documented = re.findall(r"``(\w+)``", "\n".join(line[:32] for line in rows))
    assert documented == [*VM_RESTORE_ORDER, *VCPU_RESTORE_ORDER]
    # And the batch the restore issues has exactly that order of ioctls.
    s = _synthetic(irqchip=True)
    setters = [VM_STATE_PARTS[p][1] for p in VM_RESTORE_ORDER]
    setters += [STATE_PARTS[p][1] for p in VCPU_RESTORE_ORDER]
    assert list(s.plan().names) == setters
    no_chip = _synthetic()
    assert "KVM_SET_IRQCHIP" not in no_chip.plan().names
    assert "KVM_SET_LAPIC" not in no_chip.plan().names


# -- serialized form ----------------------------------------------------------------------------


def _synthetic(*, irqchip: bool = False, vcpus: int = 1) -> MachineState:
    """A state of the right shape made without a kernel (for the serialization tests)."""

    def raw(part: str, fill: int) -> bytes:
        size = state_part_size(part)
        assert size is not None
        return bytes((fill + i) & 0xFF for i in range(size))

    chips = [bytes([k]) * IRQCHIP_STATE_SIZE for k in (1, 2, 3)] if irqchip else [None] * 3
    vm = VmState(ClockData(123456789, 0, 0, 0), *chips,
                 pit2=bytes(range(PIT_STATE_SIZE)) if irqchip else None)
    msrs = {MSR_IA32_TSC_DEADLINE: 5, 0x174: 0x10, MSR_IA32_TSC: 1 << 40, 0xC0000081: 7}
    states = {}
    for vid in range(vcpus):
        states[vid] = VcpuState(
            regs=raw("regs", vid), sregs=raw("sregs", 1), fpu=raw("fpu", 2),
            xsave=bytes(4096), xcrs={0: 3}, msrs=msrs,
            lapic=raw("lapic", 3) if irqchip else None, vcpu_events=raw("vcpu_events", 4),
            mp_state=0, debugregs=raw("debugregs", 5),
            cpuid=(CpuidEntry(0, 0, 0, 0xD, 1, 2, 3), CpuidEntry(1, 0, 0, 4, 5, 6, 7)))
    devices = {"uart": {"lcr": 3, "scratch": b"\x01\x02"}, "debugcon": {}}
    return MachineState(vm, states, devices if irqchip else None)


SAMPLES = [_synthetic(), _synthetic(irqchip=True, vcpus=2)]
HEADER = struct.calcsize("<8sHHII")
BLOBS = [s.to_bytes() for s in SAMPLES]


def test_round_trip_of_the_serialized_form() -> None:
    for s, blob in zip(SAMPLES, BLOBS, strict=True):
        assert blob[:8] == MAGIC
        back = MachineState.from_bytes(blob)
        assert back == s and back.to_bytes() == blob
        assert MachineState.from_bytes(bytearray(blob)) == s


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_flipped_byte_is_refused(data: st.DataObject) -> None:
    blob = bytearray(data.draw(st.sampled_from(BLOBS)))
    at = data.draw(st.integers(0, len(blob) - 1))
    blob[at] ^= data.draw(st.integers(1, 255))
    with pytest.raises(SnapshotError):
        MachineState.from_bytes(bytes(blob))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_truncation_or_extension_is_refused(data: st.DataObject) -> None:
    blob = data.draw(st.sampled_from(BLOBS))
    if data.draw(st.booleans()):
        cut = blob[:data.draw(st.integers(0, len(blob) - 1))]
    else:
        cut = blob + data.draw(st.binary(min_size=1, max_size=64))
    with pytest.raises(SnapshotError):
        MachineState.from_bytes(cut)


def _reseal(payload: bytes, version: int = FORMAT_VERSION, magic: bytes = MAGIC) -> bytes:
    head = struct.pack("<8sHHI", magic, version, 0, len(payload))
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_crafted_payload_with_a_valid_checksum_raises_only_snapshot_errors(
        data: st.DataObject) -> None:
    # Past the checksum every length is still bounds-checked: corrupt the payload, then seal
    # it again, so that the decoder itself meets the damage.
    payload = bytearray(data.draw(st.sampled_from(BLOBS))[HEADER:])
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, max(len(payload) - 1, 0)))
        if kind == "flip" and payload:
            payload[at] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del payload[at:at + data.draw(st.integers(1, 64))]
        else:
            payload[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    try:
        got = MachineState.from_bytes(_reseal(bytes(payload)))
    except SnapshotError:
        return
    assert isinstance(got, MachineState)  # a damage that still reads as a valid state


def test_header_fields_are_checked() -> None:
    payload = BLOBS[0][HEADER:]
    assert MachineState.from_bytes(_reseal(payload)) == SAMPLES[0]
    with pytest.raises(SnapshotError, match="version 2; this kvmio reads version 1"):
        MachineState.from_bytes(_reseal(payload, version=2))
    with pytest.raises(SnapshotError, match="wrong magic"):
        MachineState.from_bytes(_reseal(payload, magic=b"KVMIOXX\x00"))
    with pytest.raises(SnapshotError, match="header"):
        MachineState.from_bytes(b"KVMIO")
    with pytest.raises(SnapshotError, match="bytes, not str"):
        MachineState.from_bytes("text")  # type: ignore[arg-type]
    with pytest.raises(SnapshotError, match="is missing"):
        MachineState.from_bytes(_reseal(b""))


def test_the_snapshot_layer_uses_no_cffi_or_ctypes() -> None:
    # Pointers live in kvmio._abi, kvmio.vm, kvmio.vcpu (and the dirty ring): this layer
    # hands the kernel only what those built.
    import ast

    import kvmio.snapshot

    for path in Path(kvmio.snapshot.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            bad = [n for n in names if n.split(".")[0] in ("cffi", "ctypes")
                   or n.startswith("kvmio._native") or n.endswith((".ffi", ".lib"))]
            assert not bad, f"{path.name} imports {bad}"
