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
