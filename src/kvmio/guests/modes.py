"""Put an x86 vCPU into real mode, 32-bit flat protected mode, or 64-bit long mode.

Long mode builds identity-mapped page tables (2 MiB pages) in guest memory, so a guest of any
size up to 512 GiB, sparse (MAP_NORESERVE) or not, sees its physical memory at the same
virtual addresses.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from kvmio.errors import KvmInvalidArgumentError
from kvmio.x86 import (
    CR0_ET,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    DTable,
    Regs,
    Segment,
)

if TYPE_CHECKING:
    from kvmio.vcpu import Vcpu
    from kvmio.vm import Vm

#: Where the mode helpers put the GDT (three descriptors: null, code, data).
GDT_ADDR = 0x500
#: Default base of the long-mode page tables (PML4, PDPT, then one PD per GiB).
PAGE_TABLE_ADDR = 0x100000
#: Largest identity map (one PDPT).
MAX_IDENTITY_MAP = 512 << 30

_PTE_P = 1 << 0
_PTE_RW = 1 << 1
_PTE_PS = 1 << 7

CODE_SELECTOR = 0x08
DATA_SELECTOR = 0x10


def _gdt(long_mode: bool) -> bytes:
    # Flat 4 GiB descriptors: code (execute/read, accessed) and data (read/write, accessed).
    code = 0x00AF9B000000FFFF if long_mode else 0x00CF9B000000FFFF
    data = 0x00CF93000000FFFF
    return struct.pack("<3Q", 0, code, data)


def _flat(selector: int, code: bool, long_mode: bool) -> Segment:
    return Segment(base=0, limit=0xFFFFFFFF, selector=selector, type=11 if code else 3,
                   present=1, dpl=0, db=0 if (code and long_mode) else 1, s=1,
                   l=1 if (code and long_mode) else 0, g=1)


def setup_real_mode(vcpu: Vcpu, entry: int, *, stack: int = 0x7000) -> None:
    """Real mode at physical ``entry`` (< 1 MiB).

    CS:IP is ``(entry >> 4):(entry & 0xF)``, and DS, ES, FS, GS and SS equal CS, so a
    position-independent 16-bit program addresses its own data from offset 0.
    """
    if not 0 <= entry < 0x100000:
        raise KvmInvalidArgumentError(f"real-mode entry {entry:#x} is above 1 MiB")
    seg = entry >> 4
    s = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        sg = getattr(s, name)
        sg.base, sg.selector, sg.limit = seg << 4, seg, 0xFFFF
    s.cr0 &= ~(CR0_PE | CR0_PG)
    vcpu.set_sregs(s)
    stack_off = (stack - (seg << 4)) & 0xFFFF
    vcpu.set_regs(Regs(rip=entry & 0xF, rsp=stack_off, rflags=2))


def setup_protected_mode(vcpu: Vcpu, vm: Vm, entry: int, *, stack: int = 0x7000,
                         write_gdt: bool = True) -> None:
    """32-bit flat protected mode, paging off, interrupts off, at ``entry``.

    CS is a 4 GiB execute/read segment, DS/ES/FS/GS/SS 4 GiB read/write segments, all with base
    0.  With ``write_gdt`` a matching GDT is written at :data:`GDT_ADDR` so the guest may reload
    its segment registers.
    """
    s = vcpu.get_sregs()
    if write_gdt:
        vm.write_memory(GDT_ADDR, _gdt(False))
        s.gdt = DTable(GDT_ADDR, 3 * 8 - 1)
    s.cs = _flat(CODE_SELECTOR, True, False)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(s, name, _flat(DATA_SELECTOR, False, False))
    s.cr0 = (s.cr0 | CR0_PE | CR0_ET | CR0_NE) & ~CR0_PG
    s.efer = 0
    vcpu.set_sregs(s)
    vcpu.set_regs(Regs(rip=entry, rsp=stack, rflags=2))


def identity_page_tables(size: int, base: int = PAGE_TABLE_ADDR) -> tuple[bytes, int]:
    """Page tables identity-mapping ``[0, size)`` with 2 MiB pages, to be placed at ``base``.

    Returns ``(bytes, cr3)``: PML4 at ``base``, PDPT at ``base + 4 KiB``, then one PD per GiB.
    """
    if size <= 0 or size > MAX_IDENTITY_MAP:
        raise KvmInvalidArgumentError(f"identity map of {size:#x} bytes: must be 1 B..512 GiB")
    if base % 4096:
        raise KvmInvalidArgumentError("page tables must be page aligned")
    gib = (size + (1 << 30) - 1) >> 30
    pml4 = struct.pack("<Q", (base + 0x1000) | _PTE_P | _PTE_RW).ljust(4096, b"\0")
    pdpt = b"".join(struct.pack("<Q", (base + 0x2000 + i * 0x1000) | _PTE_P | _PTE_RW)
                    for i in range(gib)).ljust(4096, b"\0")
    pds = bytearray(gib * 4096)
    entries = (size + (2 << 20) - 1) >> 21
    struct.pack_into(f"<{entries}Q", pds, 0,
                     *[(i << 21) | _PTE_P | _PTE_RW | _PTE_PS for i in range(entries)])
    return pml4 + pdpt + bytes(pds), base


def page_tables_size(size: int) -> int:
    """Bytes of guest memory :func:`identity_page_tables` needs for an identity map of ``size``."""
    return (2 + ((size + (1 << 30) - 1) >> 30)) * 4096


def setup_long_mode(vcpu: Vcpu, vm: Vm, entry: int, *, identity_map: int | None = None,
                    page_tables: int = PAGE_TABLE_ADDR, stack: int = 0x7000,
                    write_tables: bool = True) -> None:
    """64-bit long mode with paging, at ``entry``, identity-mapping ``identity_map`` bytes.

    ``identity_map`` defaults to the end of the highest memory slot.  The page tables are
    written at ``page_tables`` (which must lie in guest memory) unless ``write_tables`` is
    false (e.g. for a second vCPU sharing them).
    """
    if identity_map is None:
        identity_map = max((r.end for r in vm.regions.values()), default=0)
    if write_tables:
        tables, _ = identity_page_tables(identity_map, page_tables)
        vm.write_memory(page_tables, tables)
        vm.write_memory(GDT_ADDR, _gdt(True))
    s = vcpu.get_sregs()
    s.gdt = DTable(GDT_ADDR, 3 * 8 - 1)
    s.cs = _flat(CODE_SELECTOR, True, True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(s, name, _flat(DATA_SELECTOR, False, True))
    s.cr3 = page_tables
    s.cr4 |= CR4_PAE
    s.cr0 |= CR0_PE | CR0_PG | CR0_ET | CR0_NE
    s.efer |= EFER_LME | EFER_LMA
    vcpu.set_sregs(s)
    vcpu.set_regs(Regs(rip=entry, rsp=stack, rflags=2))
