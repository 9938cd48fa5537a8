"""Guests in real, protected and long mode, and a 64 GiB sparse long-mode guest."""

from __future__ import annotations

import os

import pytest

from kvmio import Hlt, Kvm, KvmInvalidArgumentError
from kvmio.guests.modes import (
    identity_page_tables,
    page_tables_size,
    setup_long_mode,
    setup_real_mode,
)
from kvmio.guests.programs import program

from guests import boot, run_collecting


def _val(out: dict[int, list[bytes]], port: int) -> int:
    return int.from_bytes(out[port][0], "little")


def test_real_mode(kvm: Kvm) -> None:
    vm, vcpu = boot(kvm, "hello")
    with vm:
        s = vcpu.get_sregs()
        assert s.cr0 & 1 == 0 and s.cs.base == 0x10000
        out, ex = run_collecting(vcpu)
        assert ex == Hlt() and b"".join(out[0xE9]).startswith(b"Hello")


def test_protected_mode(kvm: Kvm) -> None:
    vm, vcpu = boot(kvm, "probe32", rdi=0x3FF000)
    with vm:
        out, ex = run_collecting(vcpu)
        assert ex == Hlt()
        cr0 = _val(out, 0x10)
        assert cr0 & 1 and not cr0 & (1 << 31)  # PE on, paging off
        assert _val(out, 0x11) == 0xC0FFEE11
        assert vm.read_memory(0x3FF000, 4) == (0xC0FFEE11).to_bytes(4, "little")


def test_long_mode(kvm: Kvm) -> None:
    vm, vcpu = boot(kvm, "probe64", rdi=0x200008, rsi=0x0123456789ABCDEF)
    with vm:
        out, ex = run_collecting(vcpu)
        assert ex == Hlt()
        assert _val(out, 0x10) & (1 << 10)  # EFER.LMA
        assert _val(out, 0x11) == 0x89ABCDEF and _val(out, 0x12) == 0x01234567


def test_64_gib_sparse_guest(kvm: Kvm) -> None:
    size = 64 << 30
    rss0 = _rss()
    with kvm.create_vm() as vm:
        vm.add_memory_region(0, 4 << 20)
        vm.add_memory_region(4 << 20, size - (4 << 20), noreserve=True, log_dirty=True)
        prog = program("probe64")
        prog.load(vm)
        vcpu = vm.create_vcpu()
        setup_long_mode(vcpu, vm, prog.base)
        top = size - 8
        r = vcpu.get_regs()
        r.rdi, r.rsi = top, 0xFEEDFACE_CAFEF00D
        vcpu.set_regs(r)
        out, ex = run_collecting(vcpu)
        assert ex == Hlt()
        assert _val(out, 0x12) == 0xFEEDFACE
        assert vm.read_memory(top, 8) == (0xFEEDFACE_CAFEF00D).to_bytes(8, "little")
        # Only touched pages were allocated: the process's resident memory now, with the
        # 64 GiB guest mapped and written at both ends, grew by far less than the guest.
        assert _rss() - rss0 < 64 << 20


def _rss() -> int:
    """Resident memory of this process now, in bytes (not a peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_page_tables() -> None:
    tables, cr3 = identity_page_tables(3 << 30, 0x100000)
    assert cr3 == 0x100000 and len(tables) == page_tables_size(3 << 30) == 5 * 4096
    pml4 = int.from_bytes(tables[0:8], "little")
    assert pml4 & ~0xFFF == 0x101000 and pml4 & 3 == 3
    last_pde = int.from_bytes(tables[4 * 4096 + 511 * 8: 4 * 4096 + 512 * 8], "little")
    assert last_pde & ~0xFFF == (3 << 30) - (2 << 20) and last_pde & 0x80
    with pytest.raises(KvmInvalidArgumentError, match=r"must be 1 B\.\.512 GiB"):
        identity_page_tables(0)
    with pytest.raises(KvmInvalidArgumentError, match=r"must be 1 B\.\.512 GiB"):
        identity_page_tables((512 << 30) + 4096)  # one page more than 512 GiB
    identity_page_tables(512 << 30)  # the largest allowed
    with pytest.raises(KvmInvalidArgumentError, match="page aligned"):
        identity_page_tables(1 << 30, 0x100800)


def test_real_mode_entry_must_be_below_1mib(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu()
        with pytest.raises(KvmInvalidArgumentError, match="1 MiB"):
            setup_real_mode(vcpu, 0x100000)
