"""Vm: memory slots and their bookkeeping, enable_cap, lifetime."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from kvmio import (
    Cap,
    Kvm,
    KvmClosedError,
    KvmError,
    KvmInvalidArgumentError,
    KvmStateError,
    KvmUnsupportedError,
    MemoryRegion,
    SlotId,
)


def test_add_read_write_delete(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        r = vm.add_memory_region(0x100000, 0x10000)
        assert isinstance(r, MemoryRegion) and r.slot == 0 and r.num_pages == 16
        vm.write_memory(0x100ff8, b"12345678")
        assert vm.read_memory(0x100ff8, 8) == b"12345678"
        assert r.array(np.uint8)[0xFF8:0x1000].tobytes() == b"12345678"
        vm.write_memory(0x101000, b"\x01\x02\x03\x04\x05\x06\x07\x08")
        assert r.page_words()[1] == 0x0807060504030201  # first 8 bytes of page 1
        r2 = vm.add_memory_region(0x200000, 0x1000, log_dirty=True)
        assert r2.slot == 1 and vm.regions.keys() == {0, 1}
        vm.delete_memory_region(0)
        assert r.closed and vm.regions.keys() == {1}
        with pytest.raises(KvmInvalidArgumentError, match="not in one slot"):
            vm.read_memory(0x100000, 1)
        # The slot id and the range are free again.
        r3 = vm.add_memory_region(0x100000, 0x10000)
        assert r3.slot == 0


@pytest.mark.parametrize(
    ("gpa", "size", "match"),
    [(0, 0, "positive multiple"), (0, 100, "positive multiple"), (0x800, 4096, "page aligned"),
     (-4096, 4096, "guest_phys_addr must be >= 0"), (1 << 52, 4096, "52-bit")])
def test_bad_region_arguments(kvm: Kvm, gpa: int, size: int, match: str) -> None:
    with kvm.create_vm() as vm, pytest.raises(KvmInvalidArgumentError, match=match):
        vm.add_memory_region(gpa, size)


def test_overlap_and_slot_conflicts(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vm.add_memory_region(0x10000, 0x10000, slot=3)
        for gpa, size in [(0x10000, 0x1000), (0xF000, 0x2000), (0x1F000, 0x1000),
                          (0, 0x100000)]:
            with pytest.raises(KvmInvalidArgumentError, match="overlaps slot 3"):
                vm.add_memory_region(gpa, size)
        with pytest.raises(KvmInvalidArgumentError, match="already in use"):
            vm.add_memory_region(0x100000, 0x1000, slot=3)
        with pytest.raises(KvmInvalidArgumentError, match="out of range"):
            vm.add_memory_region(0x100000, 0x1000, slot=1 << 16)
        with pytest.raises(KvmInvalidArgumentError, match="no memory region"):
            vm.delete_memory_region(7)
        # Adjacent is fine.
        vm.add_memory_region(0x20000, 0x1000)
        vm.add_memory_region(0xF000, 0x1000)
        with pytest.raises(KvmInvalidArgumentError, match="outside slot"):
            vm.regions[3].read(0x1FFFF, 2)


def test_huge_sparse_region(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        r = vm.add_memory_region(1 << 32, 256 << 30, noreserve=True, log_dirty=True)
        vm.write_memory((1 << 32) + (200 << 30), b"far")
        assert r.read((1 << 32) + (200 << 30), 3) == b"far"


def test_enable_cap_every_arch_and_errors(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        with pytest.raises(KvmUnsupportedError, match="does not support capability") as ei:
            vm.enable_cap(100000)
        assert ei.value.errno == errno.EINVAL
        assert "KVM_ENABLE_CAP(100000)" in str(ei.value)
        # A supported capability with bad arguments is the kernel's EINVAL, not "unsupported".
        with pytest.raises(KvmError) as ei2:
            vm.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, 1 << 40)
        assert ei2.value.errno == errno.EINVAL
        assert not isinstance(ei2.value, KvmUnsupportedError)
        with pytest.raises(KvmInvalidArgumentError, match="at most 4"):
            vm.enable_cap(Cap.DIRTY_LOG_RING, 1, 2, 3, 4, 5)
        with pytest.raises(KvmInvalidArgumentError, match="u64"):
            vm.enable_cap(Cap.DIRTY_LOG_RING, -1)
        vm.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, 1)
        assert vm.check_extension(Cap.USER_MEMORY) == 1


def test_close_closes_everything(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    r = vm.add_memory_region(0, 0x10000)
    view = r.array()  # a live view: unmapping waits for it, nothing crashes
    v = vm.create_vcpu()
    vm.close()
    vm.close()
    assert vm.closed and v.closed and r.closed
    assert view[0] == 0
    del view
    # kvmio refuses each call itself (no errno: nothing reached the kernel), naming the object.
    for call, match in [(lambda: vm.add_memory_region(0, 4096), "this Vm is closed"),
                        (vm.create_vcpu, "this Vm is closed"),
                        (v.get_regs, "this Vcpu is closed"),
                        (lambda: r.read(0, 1), "memory is unmapped"),
                        (lambda: vm.check_extension(Cap.IRQCHIP), "this Vm is closed")]:
        with pytest.raises(KvmClosedError, match=match) as ei:
            call()
        assert ei.value.errno is None


def test_error_carries_errno_and_ioctl(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        with pytest.raises(KvmError) as ei:
            vm.create_irqchip()  # a second one
        e = ei.value
        assert isinstance(e, OSError) and e.errno == errno.EEXIST  # the kernel's answer
        assert e.ioctl == "KVM_CREATE_IRQCHIP" and "KVM_CREATE_IRQCHIP" in str(e)


def test_slot_id_codec() -> None:
    s = SlotId.decode((1 << 16) | 5)
    assert (s.address_space, s.slot) == (1, 5)
    assert s.encode() == (1 << 16) | 5


def test_bad_fd_is_a_clear_error(kvm: Kvm) -> None:
    """An fd closed behind kvmio's back: EBADF becomes KvmClosedError, never a crash."""
    import os

    vm = kvm.create_vm()
    os.close(vm.fd)
    with pytest.raises(KvmClosedError) as ei:
        vm.check_extension(Cap.IRQCHIP)
    assert ei.value.errno == errno.EBADF and "KVM_CHECK_EXTENSION" in str(ei.value)
    vm._fd = None  # already closed; let close() skip it


def test_x86_platform_addresses(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vm.set_identity_map_address(0xFFFBC000)
        vm.set_tss_address(0xFFFBD000)
        vm.create_vcpu()
        with pytest.raises(KvmError) as ei:
            vm.set_identity_map_address(0xFFFBC000)  # only before vCPUs exist
        assert ei.value.errno == errno.EINVAL and ei.value.ioctl == "KVM_SET_IDENTITY_MAP_ADDR"


def test_irqchip_state_round_trip(kvm: Kvm) -> None:
    from kvmio._abi import ffi
    from kvmio.vm import IRQCHIP_IOAPIC, IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE

    with kvm.create_vm() as vm:
        assert not vm.has_irqchip and not vm.has_pit
        with pytest.raises(KvmStateError, match="create_irqchip"):
            vm.get_irqchip(IRQCHIP_PIC_MASTER)
        vm.create_irqchip()
        assert vm.has_irqchip
        imr = ffi.offsetof("struct kvm_pic_state", "imr")
        ioapic_id = ffi.offsetof("struct kvm_ioapic_state", "id")
        for chip in (IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE):
            pic = bytearray(vm.get_irqchip(chip))
            assert len(pic) == 512
            pic[imr] = 0xA5 + chip
            vm.set_irqchip(chip, bytes(pic))
        assert vm.get_irqchip(IRQCHIP_PIC_MASTER)[imr] == 0xA5
        assert vm.get_irqchip(IRQCHIP_PIC_SLAVE)[imr] == 0xA6
        ioapic = bytearray(vm.get_irqchip(IRQCHIP_IOAPIC))
        base = int.from_bytes(ioapic[:8], "little")
        assert base == 0xFEC00000  # the IOAPIC's default base address
        ioapic[ioapic_id:ioapic_id + 4] = (3 << 24).to_bytes(4, "little")
        vm.set_irqchip(IRQCHIP_IOAPIC, bytes(ioapic))
        got = vm.get_irqchip(IRQCHIP_IOAPIC)
        assert int.from_bytes(got[ioapic_id:ioapic_id + 4], "little") == 3 << 24
        with pytest.raises(KvmInvalidArgumentError, match="512 bytes, not 511"):
            vm.set_irqchip(IRQCHIP_IOAPIC, bytes(ioapic[:-1]))
        with pytest.raises(KvmInvalidArgumentError, match="chip_id must be"):
            vm.get_irqchip(3)


def test_pit_state_round_trip(kvm: Kvm) -> None:
    from kvmio._abi import ffi

    with kvm.create_vm() as vm:
        vm.create_irqchip()
        with pytest.raises(KvmStateError, match="create_pit2"):
            vm.get_pit2()
        vm.create_pit2()
        assert vm.has_pit
        raw = vm.get_pit2()
        assert len(raw) == ffi.sizeof("struct kvm_pit_state2") == 112
        st = ffi.new("struct kvm_pit_state2 *")
        ffi.memmove(st, raw, len(raw))
        st.channels[0].count = 11932
        st.channels[0].mode = 2
        st.channels[0].rw_mode = 3
        vm.set_pit2(bytes(ffi.buffer(st)))
        got = ffi.new("struct kvm_pit_state2 *")
        ffi.memmove(got, vm.get_pit2(), 112)
        ch = got.channels[0]
        assert (ch.count, ch.mode, ch.rw_mode) == (11932, 2, 3)
        with pytest.raises(KvmInvalidArgumentError, match="exactly 112 bytes"):
            vm.set_pit2(raw + b"\0")


def test_clock_data_keeps_the_flags_the_kernel_wants(kvm: Kvm) -> None:
    from kvmio._abi import lib
    from kvmio.vm import ClockData

    with kvm.create_vm() as vm:
        vm.set_clock_data(ClockData(7_000_000_000, flags=lib.KVM_CLOCK_TSC_STABLE))
        cd = vm.get_clock_data()
        assert 7_000_000_000 <= cd.clock < 8_000_000_000
        assert cd.flags & ~vm.check_extension(Cap.ADJUST_CLOCK) == 0
        if cd.flags & lib.KVM_CLOCK_REALTIME:
            vm.set_clock_data(cd, realtime=True)  # the clock moves on by the real time since
            assert vm.get_clock_data().clock >= cd.clock
        else:
            with pytest.raises(KvmInvalidArgumentError, match="KVM_CLOCK_REALTIME"):
                vm.set_clock_data(cd, realtime=True)
        with pytest.raises(KvmInvalidArgumentError, match="u64"):
            ClockData(-1)


def test_vm_state_in_one_call(kvm: Kvm) -> None:
    from kvmio.vm import VM_STATE_PARTS, ClockData, Vm

    with kvm.create_vm() as vm:
        with pytest.raises(KvmStateError, match="no in-kernel irqchip"):
            vm.get_state(["clock", "pic_master"])
        vm.create_irqchip()
        vm.create_pit2()
        parts = list(VM_STATE_PARTS)
        raw = vm.get_state(parts)
        assert list(raw) == parts
        assert [len(raw[p]) for p in parts[1:]] == [512, 512, 512, 112]
        batch = Vm.prepare_state([("clock", ClockData(9_000_000_000))]
                                 + [(p, raw[p]) for p in parts[1:]])
        vm.set_state(batch)
        again = vm.get_state(parts)
        assert again["pic_master"] == raw["pic_master"] and again["ioapic"] == raw["ioapic"]
        assert 9_000_000_000 <= vm.get_clock() < 10_000_000_000
        with pytest.raises(KvmInvalidArgumentError, match="512 bytes"):
            Vm.prepare_state([("ioapic", raw["ioapic"][:100])])
        with pytest.raises(KvmInvalidArgumentError, match="given twice"):
            Vm.prepare_state([("pit2", raw["pit2"]), ("pit2", raw["pit2"])])
    with kvm.create_vm() as bare, pytest.raises(KvmStateError, match="no in-kernel irqchip"):
        bare.set_state(batch)  # refused before anything is written
