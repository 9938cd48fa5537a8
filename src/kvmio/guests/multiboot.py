"""Boot Multiboot (v1) kernels the way QEMU's ``-kernel`` does, on one x86 vCPU.

The pieces, from the bottom up:

- :func:`parse_header` finds and checks the Multiboot header, :func:`parse_kernel` turns a
  kernel file (ELF32 ``EM_386``, or anything with the header's a.out kludge) into a
  :class:`KernelImage`: segments to copy to physical addresses, and an entry point;
- :func:`memory_map` and :func:`write_boot_info` build the Multiboot information structure;
- :class:`MultibootMachine` creates the VM (one memory slot of guest RAM from address 0), loads a
  kernel, enters it in the state the specification asks for, and runs it with a handful of
  emulated devices (see :meth:`MultibootMachine.run`); :func:`run_multiboot` does it all at once;
- :func:`render_vga_text` shows the VGA text screen.

Guest physical layout:

==========================  ======================================================
``0x500``                   GDT (flat 4 GiB code and data, written by the mode helper)
below ``0x7000``            initial stack (the spec leaves ESP undefined: kernels set their own)
``0x9000``                  Multiboot information structure (EBX points here)
``0x9100``                  memory map entries
``0x9200``                  boot loader name ``"kvmio"``
``0x9300`` .. ``0x10000``   command line (NUL-terminated)
``0x10000`` .. ``0x9FC00``  free for the kernel
``0x9FC00`` .. ``0x100000`` reserved hole (EBDA, VGA memory at ``0xB8000``, BIOS area)
``0x100000`` .. RAM end     free for the kernel
==========================  ======================================================

Kernel segments must lie in one of the two "free for the kernel" ranges.  The memory slot covers
the hole too, so the VGA text buffer is ordinary RAM that the host reads back.

Devices (everything is port I/O except the catch-all MMIO answer):

- port ``0xE9`` (Bochs/QEMU debug console): every byte written is output; reads return
  ``0xE9``, the value kernels test to detect the console (QEMU's ``readback``);
- COM1 (``0x3F8``..``0x3FF``): a small 16550 model.  Bytes written to THR are output (not while
  the divisor latch is selected, nor in loopback mode, where they come back through RBR); LSR
  reads ``0x60`` (transmitter empty), plus data-ready in loopback; the other registers read back
  what was written (IIR reads "no interrupt pending").  It never raises interrupts;
- port ``0xF4`` (QEMU ``isa-debug-exit``): writing *v* ends the run with exit code
  ``(v << 1) | 1``, *v* being the whole value written (byte, word or dword);
- reset requests (``0xFE`` written to the keyboard controller's port ``0x64``, or a write with
  bit 2 set to port ``0xCF9``) and the QEMU/Bochs ACPI power-off (``0x2000`` written to port
  ``0x604`` or ``0xB004``) end the run;
- every other port read, the keyboard controller's ``0x60``/``0x64`` included, returns **0**:
  all-zero is the idle state of the status bits that kernels busy-wait on (KBC "input buffer
  full", CMOS "update in progress"), so such loops end; every other port write is ignored;
- MMIO (guest physical addresses outside RAM): reads return all-ones bytes (``0xFF``...), as
  an empty bus does; writes are ignored.

There is no interrupt controller and no timer: nothing ever interrupts the guest.  A ``HLT``
therefore ends the run whatever the interrupt flag (with IF set the guest would wait forever);
:attr:`MultibootResult.detail` says which.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvmio._abi import IS_X86, PAGE_SIZE
from kvmio._closing import Closing
from kvmio.errors import (
    KvmError,
    KvmInvalidArgumentError,
    KvmStateError,
    KvmUnsupportedError,
)
from kvmio.exits import (
    DirtyRingFull,
    FailEntry,
    Hlt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    Unknown,
    VcpuExit,
)
from kvmio.guests.modes import setup_protected_mode
from kvmio.memory import MemoryRegion
from kvmio.vm import Vm
from kvmio.x86 import Regs

if TYPE_CHECKING:
    from kvmio.system import Kvm
    from kvmio.vcpu import Vcpu

__all__ = [
    "BOOTLOADER_MAGIC",
    "DEFAULT_MEMORY",
    "HEADER_MAGIC",
    "KernelImage",
    "LoadSegment",
    "MemoryMapEntry",
    "MultibootHeader",
    "MultibootMachine",
    "MultibootResult",
    "StopReason",
    "memory_map",
    "parse_header",
    "parse_kernel",
    "parse_memory_size",
    "render_vga_text",
    "run_multiboot",
    "write_boot_info",
]

# -- constants ------------------------------------------------------------------------------

#: The Multiboot header's magic number.
HEADER_MAGIC = 0x1BADB002
#: What EAX holds when the kernel is entered.
BOOTLOADER_MAGIC = 0x2BADB002
#: The header must lie (4-byte aligned) within this many bytes from the start of the file.
HEADER_SEARCH = 8192

#: Header flag bit 0: page-align modules (trivially met: kvmio loads no modules).
FLAG_PAGE_ALIGN = 1 << 0
#: Header flag bit 1: the kernel needs memory information (always provided).
FLAG_MEMORY_INFO = 1 << 1
#: Header flag bit 2: the kernel asks for a video mode.  Accepted but not honoured (as in
#: QEMU): the kernel gets VGA text mode and no VBE/framebuffer information, and the loader
#: records a warning.
FLAG_VIDEO_MODE = 1 << 2
#: Header flag bit 16: the a.out kludge (load addresses come from the header).
FLAG_AOUT_KLUDGE = 1 << 16
#: Required (low 16) flag bits kvmio understands; any other bit in 0..15 is refused.
SUPPORTED_REQUIRED_FLAGS = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE

#: Information structure flag bits that kvmio sets.
INFO_MEMORY = 1 << 0
INFO_CMDLINE = 1 << 2
INFO_MMAP = 1 << 6
INFO_BOOT_LOADER_NAME = 1 << 9

#: Memory map entry types.
MEMORY_AVAILABLE = 1
MEMORY_RESERVED = 2

#: Guest physical addresses of the boot information (see the module docstring).
INFO_ADDR = 0x9000
MMAP_ADDR = 0x9100
LOADER_NAME_ADDR = 0x9200
CMDLINE_ADDR = 0x9300
#: First byte past the loader's area; kernel segments may start here.
BOOT_AREA_END = 0x10000
#: Longest command line, in bytes, without its terminating NUL.
MAX_CMDLINE = BOOT_AREA_END - CMDLINE_ADDR - 1
#: Initial ESP (the specification leaves it undefined).
STACK_TOP = 0x7000
#: Base of the reserved hole below 1 MiB (the last KiB of conventional memory is the EBDA).
LOW_MEMORY_END = 0x9FC00
#: ``mem_lower``: conventional memory in KiB, as QEMU reports it (the EBDA included).
MEM_LOWER_KIB = 640
#: Start of extended memory.
HIGH_MEMORY_START = 0x100000
#: The boot loader name passed to the kernel.
LOADER_NAME = "kvmio"

#: Default, smallest and largest guest RAM.  The ceiling keeps RAM clear of the 32-bit MMIO
#: area at the top of the 4 GiB space (where KVM's TSS pages also go).
DEFAULT_MEMORY = 128 << 20
MIN_MEMORY = 2 << 20
MAX_MEMORY = 3 << 30

#: VGA text buffer: guest physical address and geometry.
VGA_TEXT_ADDR = 0xB8000
VGA_COLUMNS = 80
VGA_ROWS = 25

DEBUGCON_PORT = 0xE9
DEBUG_EXIT_PORT = 0xF4
COM1_BASE = 0x3F8
KBC_COMMAND_PORT = 0x64
RESET_CONTROL_PORT = 0xCF9
ACPI_POWEROFF_PORTS = (0x604, 0xB004)
ACPI_POWEROFF_VALUE = 0x2000

_RFLAGS_IF = 1 << 9

_ELF_MAGIC = b"\x7fELF"
_ELFCLASS32 = 1
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_ET_EXEC = 2
_EM_386 = 3
_EM_X86_64 = 62
_PT_LOAD = 1
_ELF32_EHDR = struct.Struct("<16sHHIIIIIHHHHHH")
_ELF32_PHDR = struct.Struct("<IIIIIIII")

_U32 = 1 << 32


# -- the header -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MultibootHeader:
    """A checked Multiboot header, found at file offset ``offset``.

    The a.out kludge fields (``header_addr`` ... ``entry_addr``) are ``None`` unless flag bit 16
    is set.
    """

    offset: int
    flags: int
    checksum: int
    header_addr: int | None = None
    load_addr: int | None = None
    load_end_addr: int | None = None
    bss_end_addr: int | None = None
    entry_addr: int | None = None

    @property
    def aout_kludge(self) -> bool:
        """Whether flag bit 16 is set: load addresses come from the header, not from ELF."""
        return bool(self.flags & FLAG_AOUT_KLUDGE)

    @property
    def wants_video_mode(self) -> bool:
        """Whether flag bit 2 is set (kvmio does not honour it; see :data:`FLAG_VIDEO_MODE`)."""
        return bool(self.flags & FLAG_VIDEO_MODE)


def parse_header(data: bytes) -> MultibootHeader:
    """Find the Multiboot header in a kernel file and check it.

    The header is the first 4-byte aligned magic ``0x1BADB002`` within the first 8192 bytes
    whose checksum is right (``magic + flags + checksum == 0`` modulo 2**32), as QEMU and GRUB
    search.  Raises :class:`KvmInvalidArgumentError` when there is none (naming a candidate whose
    checksum is wrong, if there was one), when the header requires a feature kvmio does not
    support (flag bits 3..15), or when the file ends inside the a.out kludge fields.
    """
    data = bytes(data)
    limit = min(len(data), HEADER_SEARCH)
    bad: tuple[int, int, int] | None = None
    for off in range(0, limit - 12 + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic != HEADER_MAGIC:
            continue
        if (magic + flags + checksum) % _U32 == 0:
            return _check_header(data, off, flags, checksum)
        if bad is None:
            bad = (off, flags, checksum)
    if bad is not None:
        off, flags, checksum = bad
        want = (-(HEADER_MAGIC + flags)) % _U32
        raise KvmInvalidArgumentError(
            f"bad Multiboot header checksum at offset {off:#x}: flags {flags:#010x}, checksum "
            f"{checksum:#010x} (expected {want:#010x}, so that magic + flags + checksum == 0)")
    if len(data) < 12:
        raise KvmInvalidArgumentError(
            f"not a Multiboot kernel: the file is only {len(data)} bytes long")
    raise KvmInvalidArgumentError(
        f"not a Multiboot kernel: no Multiboot header (magic {HEADER_MAGIC:#010x}, 4-byte "
        f"aligned) in the first {HEADER_SEARCH} bytes")


def _check_header(data: bytes, off: int, flags: int, checksum: int) -> MultibootHeader:
    unsupported = flags & 0xFFFF & ~SUPPORTED_REQUIRED_FLAGS
    if unsupported:
        bits = ", ".join(str(b) for b in range(16) if unsupported >> b & 1)
        raise KvmInvalidArgumentError(
            f"the Multiboot header (flags {flags:#010x}) requires features kvmio does not "
            f"support: flag bit(s) {bits} (supported required bits: 0 page-align modules, "
            "1 memory information, 2 video mode, which is accepted but not honoured)")
    if not flags & FLAG_AOUT_KLUDGE:
        return MultibootHeader(off, flags, checksum)
    if off + 32 > len(data):
        raise KvmInvalidArgumentError(
            f"truncated kernel: the file ends inside the a.out kludge fields of the Multiboot "
            f"header at offset {off:#x} ({len(data)} bytes, need {off + 32})")
    h_addr, l_addr, l_end, b_end, entry = struct.unpack_from("<5I", data, off + 12)
    return MultibootHeader(off, flags, checksum, h_addr, l_addr, l_end, b_end, entry)


# -- the kernel image -----------------------------------------------------------------------


@dataclass(frozen=True)
class LoadSegment:
    """``data`` goes to guest physical ``paddr``; ``[paddr + len(data), paddr + memsz)`` is
    zeroed (the bss)."""

    paddr: int
    memsz: int
    data: bytes = field(repr=False)

    @property
    def end(self) -> int:
        """First guest physical address past the segment."""
        return self.paddr + self.memsz


@dataclass(frozen=True)
class KernelImage:
    """A parsed kernel: what to load where, and where to start (a physical address).

    ``format`` is ``"elf"`` or ``"aout"`` (the a.out kludge); ``warnings`` lists things the
    kernel asked for that kvmio does not do.
    """

    header: MultibootHeader
    format: str
    entry: int
    segments: tuple[LoadSegment, ...]
    warnings: tuple[str, ...] = ()

    @property
    def start(self) -> int:
        """Lowest guest physical address the kernel occupies."""
        return min(s.paddr for s in self.segments)

    @property
    def end(self) -> int:
        """First guest physical address past the kernel (bss included)."""
        return max(s.end for s in self.segments)

    def check_placement(self, mem_size: int) -> None:
        """Raise :class:`KvmInvalidArgumentError` unless every segment lies in memory free for
        the kernel: ``[0x10000, 0x9FC00)`` or ``[1 MiB, mem_size)``."""
        for i, s in enumerate(self.segments):
            where = f"kernel segment {i} [{s.paddr:#x}, {s.end:#x})"
            if s.end > mem_size:
                raise KvmInvalidArgumentError(
                    f"{where} lies outside guest memory ({mem_size >> 20} MiB, ending at "
                    f"{mem_size:#x}); give the guest more memory")
            if s.paddr < BOOT_AREA_END:
                raise KvmInvalidArgumentError(
                    f"{where} overlaps the boot loader's area [0, {BOOT_AREA_END:#x}) (GDT, "
                    "stack and Multiboot information)")
            if s.paddr < HIGH_MEMORY_START and s.end > LOW_MEMORY_END:
                raise KvmInvalidArgumentError(
                    f"{where} overlaps the reserved hole [{LOW_MEMORY_END:#x}, "
                    f"{HIGH_MEMORY_START:#x}) (EBDA, VGA memory, BIOS area)")

    def load(self, vm: Vm) -> None:
        """Copy every segment into guest memory and zero its bss.

        Call :meth:`check_placement` first; this only needs the ranges to lie in memory slots.
        """
        for s in self.segments:
            vm.write_memory(s.paddr, s.data)
            bss = s.memsz - len(s.data)
            if bss > 0:
                vm.write_memory(s.paddr + len(s.data), bytes(bss))


def parse_kernel(data: bytes) -> KernelImage:
    """Parse a Multiboot kernel file: the header, then ELF32 program headers or the a.out
    kludge.

    Without the a.out kludge the file must be an ELF32 little-endian ``EM_386`` executable with
    at least one non-empty ``PT_LOAD`` segment; segments are loaded at ``p_paddr``, and an entry
    point that is a virtual address inside a segment is translated to its physical address (as
    GRUB does).  Raises :class:`KvmInvalidArgumentError` for anything malformed or truncated.
    """
    data = bytes(data)
    header = parse_header(data)
    warnings: list[str] = []
    if header.wants_video_mode:
        warnings.append(
            "the kernel asks for a video mode (Multiboot header flag bit 2); kvmio has no "
            "framebuffer: the kernel gets VGA text mode and no video information")
    if header.aout_kludge:
        entry, segments = _aout_segments(data, header)
        fmt = "aout"
    else:
        entry, segments = _elf_segments(data)
        fmt = "elf"
    return KernelImage(header, fmt, entry, segments, tuple(warnings))


def _aout_segments(data: bytes, h: MultibootHeader) -> tuple[int, tuple[LoadSegment, ...]]:
    assert h.header_addr is not None and h.load_addr is not None
    assert h.load_end_addr is not None and h.bss_end_addr is not None
    assert h.entry_addr is not None
    what = "Multiboot header (a.out kludge)"
    if h.load_addr > h.header_addr:
        raise KvmInvalidArgumentError(
            f"{what}: load_addr {h.load_addr:#x} is above header_addr {h.header_addr:#x}")
    file_start = h.offset - (h.header_addr - h.load_addr)
    if file_start < 0:
        raise KvmInvalidArgumentError(
            f"{what}: header_addr - load_addr = {h.header_addr - h.load_addr:#x} puts the start "
            f"of the text before the start of the file (the header is at offset {h.offset:#x})")
    if h.load_end_addr == 0:
        load_size = len(data) - file_start
    else:
        if h.load_end_addr <= h.load_addr:
            raise KvmInvalidArgumentError(
                f"{what}: load_end_addr {h.load_end_addr:#x} is not above load_addr "
                f"{h.load_addr:#x}")
        load_size = h.load_end_addr - h.load_addr
        if file_start + load_size > len(data):
            raise KvmInvalidArgumentError(
                f"truncated kernel: {what} loads {load_size:#x} bytes from file offset "
                f"{file_start:#x}, but the file is only {len(data):#x} bytes long")
    load_end = h.load_addr + load_size
    if h.bss_end_addr == 0:
        memsz = load_size
    elif h.bss_end_addr < load_end:
        raise KvmInvalidArgumentError(
            f"{what}: bss_end_addr {h.bss_end_addr:#x} is below the end of the loaded text "
            f"{load_end:#x}")
    else:
        memsz = h.bss_end_addr - h.load_addr
    if h.load_addr + memsz > _U32:
        raise KvmInvalidArgumentError(f"{what}: the kernel runs past 4 GiB")
    if not h.load_addr <= h.entry_addr < h.load_addr + memsz:
        raise KvmInvalidArgumentError(
            f"{what}: entry_addr {h.entry_addr:#x} is outside the loaded kernel "
            f"[{h.load_addr:#x}, {h.load_addr + memsz:#x})")
    seg = LoadSegment(h.load_addr, memsz, data[file_start:file_start + load_size])
    return h.entry_addr, (seg,)


def _elf_segments(data: bytes) -> tuple[int, tuple[LoadSegment, ...]]:
    if data[:4] != _ELF_MAGIC:
        raise KvmInvalidArgumentError(
            "not an ELF file, and the Multiboot header has no a.out kludge (flag bit 16): "
            "kvmio cannot tell where to load it")
    if len(data) < _ELF32_EHDR.size:
        raise KvmInvalidArgumentError(
            f"truncated kernel: {len(data)} bytes is too short for an ELF32 header")
    ident = data[:16]
    if ident[4] == _ELFCLASS64:
        raise KvmInvalidArgumentError(
            "the kernel is a 64-bit ELF file: Multiboot v1 loads ELF32 (build it for i386, or "
            "use the a.out kludge)")
    if ident[4] != _ELFCLASS32 or ident[5] != _ELFDATA2LSB:
        raise KvmInvalidArgumentError(
            f"unsupported ELF class/data ({ident[4]}, {ident[5]}): need ELF32 little-endian")
    (_, e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum, _, _,
     _) = _ELF32_EHDR.unpack_from(data)
    if e_machine != _EM_386:
        hint = " (x86-64: build the kernel for i386)" if e_machine == _EM_X86_64 else ""
        raise KvmInvalidArgumentError(
            f"the ELF kernel is for machine {e_machine}{hint}; Multiboot needs EM_386 (3)")
    if e_type != _ET_EXEC:
        raise KvmInvalidArgumentError(
            f"the ELF kernel has type {e_type}; Multiboot needs an executable (ET_EXEC, 2)")
    if e_phnum == 0:
        raise KvmInvalidArgumentError("the ELF kernel has no program headers")
    if e_phentsize < _ELF32_PHDR.size:
        raise KvmInvalidArgumentError(
            f"ELF program header entries of {e_phentsize} bytes are too small "
            f"(need {_ELF32_PHDR.size})")
    if e_phoff + e_phnum * e_phentsize > len(data):
        raise KvmInvalidArgumentError(
            f"truncated kernel: the ELF program headers end at {e_phoff + e_phnum * e_phentsize:#x}"
            f" but the file is only {len(data):#x} bytes long")
    segments: list[LoadSegment] = []
    entry: int | None = None
    for i in range(e_phnum):
        (p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _,
         _) = _ELF32_PHDR.unpack_from(data, e_phoff + i * e_phentsize)
        if p_type != _PT_LOAD or p_memsz == 0:
            continue
        where = f"ELF segment {i} (paddr {p_paddr:#x})"
        if p_filesz > p_memsz:
            raise KvmInvalidArgumentError(
                f"{where}: file size {p_filesz:#x} exceeds memory size {p_memsz:#x}")
        if p_offset + p_filesz > len(data):
            raise KvmInvalidArgumentError(
                f"truncated kernel: {where} needs file bytes up to {p_offset + p_filesz:#x} but "
                f"the file is only {len(data):#x} bytes long")
        if p_paddr + p_memsz > _U32:
            raise KvmInvalidArgumentError(f"{where}: runs past 4 GiB")
        seg = LoadSegment(p_paddr, p_memsz, data[p_offset:p_offset + p_filesz])
        for j, other in enumerate(segments):
            if seg.paddr < other.end and other.paddr < seg.end:
                raise KvmInvalidArgumentError(
                    f"{where} [{seg.paddr:#x}, {seg.end:#x}) overlaps loaded segment {j} "
                    f"[{other.paddr:#x}, {other.end:#x})")
        if entry is None:
            if p_paddr <= e_entry < p_paddr + p_memsz:
                entry = e_entry
            elif p_vaddr <= e_entry < p_vaddr + p_memsz:
                entry = e_entry - p_vaddr + p_paddr
        segments.append(seg)
    if not segments:
        raise KvmInvalidArgumentError("the ELF kernel has no loadable (PT_LOAD) segment")
    if entry is None:
        raise KvmInvalidArgumentError(
            f"the ELF entry point {e_entry:#x} is in no loadable segment")
    return entry, tuple(segments)


# -- boot information -----------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryMapEntry:
    """One Multiboot memory map entry (``type`` 1: available, 2: reserved)."""

    base: int
    length: int
    type: int

    def pack(self) -> bytes:
        """The 24-byte entry, ``size`` field (20) first."""
        return struct.pack("<IQQI", 20, self.base, self.length, self.type)


def _check_memory(mem_size: int) -> None:
    if isinstance(mem_size, bool) or not isinstance(mem_size, int):
        raise KvmInvalidArgumentError(f"guest memory must be an int, not {mem_size!r}")
    if not MIN_MEMORY <= mem_size <= MAX_MEMORY:
        raise KvmInvalidArgumentError(
            f"guest memory of {mem_size:#x} bytes is out of range: it must be between "
            f"{MIN_MEMORY >> 20} MiB and {MAX_MEMORY >> 30} GiB")
    if mem_size % PAGE_SIZE:
        raise KvmInvalidArgumentError(
            f"guest memory of {mem_size:#x} bytes is not a multiple of the page size "
            f"({PAGE_SIZE:#x})")


def memory_map(mem_size: int) -> list[MemoryMapEntry]:
    """The memory map a guest with ``mem_size`` bytes of RAM is given.

    Conventional memory below the EBDA is available, the EBDA and the BIOS area are reserved,
    the VGA/option-ROM range between them is not listed (as on a PC), and everything from 1 MiB
    to the end of RAM is available.
    """
    _check_memory(mem_size)
    return [
        MemoryMapEntry(0, LOW_MEMORY_END, MEMORY_AVAILABLE),
        MemoryMapEntry(LOW_MEMORY_END, 0xA0000 - LOW_MEMORY_END, MEMORY_RESERVED),
        MemoryMapEntry(0xF0000, HIGH_MEMORY_START - 0xF0000, MEMORY_RESERVED),
        MemoryMapEntry(HIGH_MEMORY_START, mem_size - HIGH_MEMORY_START, MEMORY_AVAILABLE),
    ]


def _encode_cmdline(cmdline: str) -> bytes:
    raw = cmdline.encode()
    if b"\0" in raw:
        raise KvmInvalidArgumentError("the kernel command line contains a NUL character")
    if len(raw) > MAX_CMDLINE:
        raise KvmInvalidArgumentError(
            f"the kernel command line is {len(raw)} bytes long; at most {MAX_CMDLINE} fit")
    return raw + b"\0"


def write_boot_info(vm: Vm, mem_size: int, cmdline: str) -> int:
    """Write the Multiboot information structure, memory map, command line (UTF-8) and boot
    loader name into guest memory; return the structure's address (for EBX).

    Flags: memory (``mem_lower`` 640 KiB, ``mem_upper`` the KiB from 1 MiB to the end of RAM),
    command line, memory map (:func:`memory_map`) and boot loader name (``"kvmio"``).
    """
    entries = memory_map(mem_size)
    raw_cmdline = _encode_cmdline(cmdline)
    mmap = b"".join(e.pack() for e in entries)
    info = bytearray(120)  # through the framebuffer fields of spec 0.6.96, all zero unless set
    flags = INFO_MEMORY | INFO_CMDLINE | INFO_MMAP | INFO_BOOT_LOADER_NAME
    struct.pack_into("<III", info, 0, flags, MEM_LOWER_KIB,
                     (mem_size - HIGH_MEMORY_START) // 1024)
    struct.pack_into("<I", info, 16, CMDLINE_ADDR)
    struct.pack_into("<II", info, 44, len(mmap), MMAP_ADDR)
    struct.pack_into("<I", info, 64, LOADER_NAME_ADDR)
    vm.write_memory(INFO_ADDR, bytes(BOOT_AREA_END - INFO_ADDR))
    vm.write_memory(INFO_ADDR, bytes(info))
    vm.write_memory(MMAP_ADDR, mmap)
    vm.write_memory(LOADER_NAME_ADDR, LOADER_NAME.encode() + b"\0")
    vm.write_memory(CMDLINE_ADDR, raw_cmdline)
    return INFO_ADDR


def parse_memory_size(text: str) -> int:
    """Parse a memory size such as ``"128M"``, ``"1G"``, ``"64MiB"`` or ``"512"`` into bytes.

    Suffixes ``K``, ``M``, ``G``, ``T`` (optionally followed by ``iB`` or ``B``) are binary
    (powers of 1024); a bare number means MiB, as for QEMU's ``-m``; a ``B`` alone means bytes.
    Raises :class:`KvmInvalidArgumentError` for anything else.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgtKMGT])(?:i?[bB])?|([bB]))?\s*", text)
    if m is None:
        raise KvmInvalidArgumentError(
            f"bad memory size {text!r}: use a number with an optional K, M, G or T suffix "
            "(e.g. 128M, 1G, 64MiB; a bare number means MiB)")
    number, unit, byte = m.groups()
    if byte:
        shift = 0
    elif unit:
        shift = 10 * ("kmgt".index(unit.lower()) + 1)
    else:
        shift = 20
    if "." in number:
        whole, frac = number.split(".")
        scale: int = 10 ** len(frac)
        value, rest = divmod(int(whole + frac) << shift, scale)
        if rest:
            raise KvmInvalidArgumentError(f"memory size {text!r} is not a whole number of bytes")
        return value
    return int(number) << shift


# -- VGA ------------------------------------------------------------------------------------

#: Code page 437 glyphs of the control characters 0x01..0x1F, as the VGA font draws them.
_CP437_LOW = "\u263a\u263b\u2665\u2666\u2663\u2660\u2022\u25d8\u25cb\u25d9\u2642\u2640\u266a" \
    "\u266b\u263c\u25ba\u25c4\u2195\u203c\u00b6\u00a7\u25ac\u21a8\u2191\u2193\u2192\u2190" \
    "\u221f\u2194\u25b2\u25bc"


def _cp437_table() -> list[str]:
    table = [" "] + list(_CP437_LOW) + [chr(c) for c in range(0x20, 0x7F)] + ["\u2302"]
    table += list(bytes(range(0x80, 0x100)).decode("cp437"))
    table[0xFF] = " "  # non-breaking space
    return table


_CP437 = _cp437_table()


def render_vga_text(source: Vm | MemoryRegion | bytes) -> str:
    """The VGA text screen (80x25 cells of character and attribute bytes at guest physical
    ``0xB8000``) as 25 lines joined by newlines, trailing spaces stripped from each line.

    ``source`` is a VM, the memory region holding the buffer, or the buffer's 4000 bytes.
    Characters are decoded from code page 437 as the VGA font draws them (``0x01`` is
    ``\u263a``, ``0xC9`` is ``\u2554``...); ``0x00`` and ``0xFF`` are blank; attributes are ignored.
    """
    size = VGA_COLUMNS * VGA_ROWS * 2
    if isinstance(source, Vm | MemoryRegion):
        raw = source.read_memory(VGA_TEXT_ADDR, size) if isinstance(source, Vm) \
            else source.read(VGA_TEXT_ADDR, size)
    else:
        raw = bytes(source)
        if len(raw) < size:
            raise KvmInvalidArgumentError(
                f"a VGA text buffer is {size} bytes, got {len(raw)}")
    chars = raw[0:size:2]
    lines = []
    for row in range(VGA_ROWS):
        cells = chars[row * VGA_COLUMNS:(row + 1) * VGA_COLUMNS]
        lines.append("".join(_CP437[c] for c in cells).rstrip(" "))
    return "\n".join(lines)


# -- running --------------------------------------------------------------------------------


class StopReason(enum.Enum):
    """Why :meth:`MultibootMachine.run` returned."""

    #: The kernel wrote to the ``isa-debug-exit`` port (``exit_code`` is set).
    DEBUG_EXIT = "debug-exit"
    #: The kernel executed HLT (nothing can wake it: there are no interrupts).
    HALTED = "halted"
    #: The guest shut down (a triple fault).
    SHUTDOWN = "shutdown"
    #: The kernel asked for a reset (keyboard controller or port 0xCF9).
    RESET = "reset"
    #: The kernel asked for power-off (ACPI PM1a control, QEMU/Bochs style).
    POWEROFF = "poweroff"
    #: KVM could not handle an exit (e.g. an instruction it cannot emulate).
    INTERNAL_ERROR = "internal-error"
    #: The hardware refused to enter the guest.
    FAIL_ENTRY = "fail-entry"
    #: KVM reported a system event (shutdown, reset, crash).
    SYSTEM_EVENT = "system-event"
    #: An exit kvmio does not handle.
    UNHANDLED_EXIT = "unhandled-exit"
    #: The timeout expired (the vCPU was kicked; the last exit is ``Interrupted``).
    TIMEOUT = "timeout"


#: Stops after which the vCPU cannot sensibly be run again.
_TERMINAL = frozenset({StopReason.SHUTDOWN, StopReason.RESET, StopReason.POWEROFF,
                       StopReason.INTERNAL_ERROR, StopReason.FAIL_ENTRY,
                       StopReason.SYSTEM_EVENT, StopReason.UNHANDLED_EXIT})


@dataclass(frozen=True)
class MultibootResult:
    """The outcome of a run.

    ``output`` is every byte written to the debug console and to COM1, in order (``debugcon``
    and ``serial`` hold each one's share); ``exit_code`` is ``(value << 1) | 1`` after a debug
    exit, else ``None``; ``exit`` is the last vCPU exit and ``regs`` the registers at the stop;
    ``vga_text`` is :func:`render_vga_text` of the screen at the stop.
    """

    reason: StopReason
    detail: str
    exit: VcpuExit
    output: bytes
    debugcon: bytes
    serial: bytes
    exit_code: int | None
    regs: Regs
    vga_text: str
    elapsed: float
    exits: int
    warnings: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line: why the run stopped, how long it took and how many exits it made."""
        return (f"{self.detail} after {self.elapsed:.2f} s ({self.exits} exits, "
                f"{len(self.output)} bytes of output)")


class _Uart:
    """The COM1 16550 model described in the module docstring."""

    def __init__(self) -> None:
        self.ier = self.lcr = self.mcr = self.scr = self.fcr = 0
        self.dll, self.dlm = 12, 0
        self.rbr: int | None = None

    @property
    def dlab(self) -> bool:
        return bool(self.lcr & 0x80)

    def write(self, reg: int, value: int) -> int | None:
        """Handle a register write; return the byte transmitted, if any."""
        if reg == 0:
            if self.dlab:
                self.dll = value
            elif self.mcr & 0x10:
                self.rbr = value  # loopback: the byte comes back on the receive side
            else:
                return value
        elif reg == 1:
            if self.dlab:
                self.dlm = value
            else:
                self.ier = value & 0x0F
        elif reg == 2:
            self.fcr = value
        elif reg == 3:
            self.lcr = value
        elif reg == 4:
            self.mcr = value & 0x1F
        elif reg == 7:
            self.scr = value
        return None

    def read(self, reg: int) -> int:
        """A register read."""
        if reg == 0:
            if self.dlab:
                return self.dll
            value, self.rbr = self.rbr or 0, None
            return value
        if reg == 1:
            return self.dlm if self.dlab else self.ier
        if reg == 2:
            return 0x01 | (0xC0 if self.fcr & 1 else 0)  # no interrupt pending
        if reg == 3:
            return self.lcr
        if reg == 4:
            return self.mcr
        if reg == 5:
            return 0x60 | (1 if self.rbr is not None else 0)
        if reg == 6:
            if self.mcr & 0x10:  # loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD
                m = self.mcr
                return ((m & 1) << 5) | ((m & 2) << 3) | ((m & 4) << 4) | ((m & 8) << 4)
            return 0xB0  # carrier detect, data set ready, clear to send
        return self.scr


@dataclass
class _Stop:
    reason: StopReason
    detail: str
    exit_code: int | None = None


class MultibootMachine(Closing):
    """A one-vCPU VM with a Multiboot kernel loaded and ready to run.

    ``kernel`` is the file's bytes or its path; ``mem`` the guest RAM in bytes (one memory slot
    from address 0); ``cmdline`` the text appended to the command line, which starts with
    ``name`` (default: the path as given, or ``"kernel"`` for bytes) as QEMU's does.  Raises
    :class:`KvmInvalidArgumentError` for a kernel that cannot be loaded (nothing is created
    then).  Close it (or use ``with``) to release the VM.
    """

    def __init__(self, kvm: Kvm, kernel: bytes | str | os.PathLike[str], *,
                 mem: int = DEFAULT_MEMORY, cmdline: str = "", name: str | None = None,
                 log_dirty: bool = False, ring_entries: int | None = None):
        if not IS_X86:
            raise KvmUnsupportedError("Multiboot kernels run only on x86_64 hosts")
        if isinstance(kernel, bytes | bytearray | memoryview):
            data = bytes(kernel)
            default_name = "kernel"
        else:
            path = os.fspath(kernel)
            default_name = path
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise KvmInvalidArgumentError(f"cannot read kernel {path!r}: {e.strerror}",
                                              errno=e.errno) from e
        _check_memory(mem)
        name = default_name if name is None else name
        self.cmdline = f"{name} {cmdline}" if cmdline else name
        _encode_cmdline(self.cmdline)
        self.image = parse_kernel(data)
        self.image.check_placement(mem)
        self.mem_size = mem
        self._uart = _Uart()
        self._terminal: StopReason | None = None
        self.vm = kvm.create_vm()
        try:
            self.vm.set_tss_address()
            if ring_entries is not None:
                self.vm.enable_dirty_ring(ring_entries)
            self.ram = self.vm.add_memory_region(0, mem, slot=0, noreserve=True,
                                                 log_dirty=log_dirty or ring_entries is not None)
            self.image.load(self.vm)
            self.info_addr = write_boot_info(self.vm, mem, self.cmdline)
            self.vcpu: Vcpu = self.vm.create_vcpu(0)
            with contextlib.suppress(KvmUnsupportedError):
                self.vcpu.set_cpuid2(kvm.get_supported_cpuid())
            setup_protected_mode(self.vcpu, self.vm, self.image.entry, stack=STACK_TOP)
            regs = self.vcpu.get_regs()
            regs.rax, regs.rbx, regs.rflags = BOOTLOADER_MAGIC, self.info_addr, 2
            self.vcpu.set_regs(regs)
        except BaseException:
            self.vm.close()
            raise

    def __repr__(self) -> str:
        return (f"<MultibootMachine {self.image.format} entry={self.image.entry:#x} "
                f"mem={self.mem_size >> 20} MiB {'closed' if self.vm.closed else 'open'}>")

    def close(self) -> None:
        """Close the VM (idempotent)."""
        self.vm.close()


    def vga_text(self) -> str:
        """The VGA text screen now (see :func:`render_vga_text`)."""
        return render_vga_text(self.vm)

    def run(self, *, timeout: float | None = None,
            on_output: Callable[[bytes], None] | None = None,
            on_ring_full: Callable[[Vcpu], None] | None = None) -> MultibootResult:
        """Run the kernel until it stops (see :class:`StopReason`) or ``timeout`` seconds pass.

        Output bytes are passed to ``on_output`` as they are written (and collected in the
        result).  The timeout is a :class:`threading.Timer` that kicks the vCPU; with
        ``timeout=None`` a kernel that never stops runs forever.  After a debug exit, a halt or a
        timeout the kernel may be run again (it resumes where it stopped); after any other stop
        this raises :class:`KvmStateError`.  With a dirty ring (``ring_entries``), ring-full
        exits go to ``on_ring_full`` (e.g. :meth:`kvmio.tracker.DirtyTracker.on_ring_full`), or
        else the vCPU's own ring is harvested (the entries are kept for its next harvest) and
        the rings are reset.
        """
        if self._terminal is not None:
            raise KvmStateError(f"the kernel cannot be resumed after a {self._terminal.value} "
                                "stop")
        if timeout is not None and timeout < 0:
            raise KvmInvalidArgumentError(f"timeout must be non-negative, not {timeout}")
        vcpu = self.vcpu
        lock = threading.Lock()
        finished = False
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            with lock:
                if finished:
                    return
                timed_out = True
                with contextlib.suppress(KvmError):
                    vcpu.kick()

        output = bytearray()
        debugcon = bytearray()
        serial = bytearray()

        def emit(sink: bytearray, data: bytes) -> None:
            sink += data
            output.extend(data)
            if on_output is not None:
                on_output(data)

        timer = threading.Timer(timeout, expire) if timeout is not None else None
        exits = 0
        start = time.monotonic()
        try:
            if timer is not None:
                timer.daemon = True
                timer.start()
            while True:
                ex = vcpu.run()
                exits += 1
                if isinstance(ex, DirtyRingFull) and self.vm.dirty_ring is not None:
                    if on_ring_full is not None:
                        on_ring_full(vcpu)
                    else:
                        vcpu.ring.drain() if vcpu.ring is not None else None
                    continue
                if isinstance(ex, Interrupted):
                    if timed_out:
                        stop = _Stop(StopReason.TIMEOUT, f"timeout ({timeout:g} s)")
                        break
                    continue  # a stray signal: carry on
                got = self._handle(ex, emit, debugcon, serial)
                if got is not None:
                    stop = got
                    break
        finally:
            with lock:
                finished = True
            if timer is not None:
                timer.cancel()
                timer.join()
            # A timer that fired as the run ended leaves its kick pending: drop it, so that a
            # resumed run is not cut short.  (Other threads' kicks stay pending.)
            if timed_out:
                with contextlib.suppress(KvmError):
                    vcpu.immediate_exit = False
        elapsed = time.monotonic() - start
        if stop.reason in _TERMINAL:
            self._terminal = stop.reason
        regs = vcpu.get_regs()
        return MultibootResult(
            reason=stop.reason, detail=stop.detail, exit=ex, output=bytes(output),
            debugcon=bytes(debugcon), serial=bytes(serial), exit_code=stop.exit_code,
            regs=regs, vga_text=self.vga_text(), elapsed=elapsed, exits=exits,
            warnings=self.image.warnings)

    def _handle(self, ex: VcpuExit, emit: Callable[[bytearray, bytes], None],
                debugcon: bytearray, serial: bytearray) -> _Stop | None:
        if isinstance(ex, IoOut):
            return self._port_write(ex, emit, debugcon, serial)
        if isinstance(ex, IoIn):
            self._port_read(ex)
            return None
        if isinstance(ex, MmioRead):
            ex.answer(b"\xff" * ex.length)
            return None
        if isinstance(ex, MmioWrite):
            return None
        regs = self.vcpu.get_regs()
        eip = regs.rip
        if isinstance(ex, Hlt):
            if regs.rflags & _RFLAGS_IF:
                return _Stop(StopReason.HALTED,
                             f"halted at EIP {eip:#x} with interrupts enabled (nothing here "
                             "ever interrupts, so it would wait forever)")
            return _Stop(StopReason.HALTED, f"halted at EIP {eip:#x} with interrupts disabled")
        if isinstance(ex, Shutdown):
            return _Stop(StopReason.SHUTDOWN, f"shutdown (triple fault) near EIP {eip:#x}")
        if isinstance(ex, InternalError):
            what = " (emulation failure)" if ex.suberror == InternalError.EMULATION else ""
            data = " ".join(f"{d:#x}" for d in ex.data)
            return _Stop(StopReason.INTERNAL_ERROR,
                         f"KVM internal error, suberror {ex.suberror}{what}, at EIP {eip:#x}"
                         + (f" (data {data})" if data else ""))
        if isinstance(ex, FailEntry):
            return _Stop(StopReason.FAIL_ENTRY,
                         f"VM entry failed (hardware reason "
                         f"{ex.hardware_entry_failure_reason:#x})")
        if isinstance(ex, SystemEvent):
            return _Stop(StopReason.SYSTEM_EVENT, f"KVM system event {ex.type}")
        assert isinstance(ex, DirtyRingFull | Unknown)
        return _Stop(StopReason.UNHANDLED_EXIT,
                     f"unhandled exit {type(ex).__name__} (reason {ex.reason}) at EIP {eip:#x}")

    def _port_write(self, ex: IoOut, emit: Callable[[bytearray, bytes], None],
                    debugcon: bytearray, serial: bytearray) -> _Stop | None:
        items = [int.from_bytes(ex.data[i:i + ex.size], "little")
                 for i in range(0, ex.size * ex.count, ex.size)]
        port = ex.port
        if port == DEBUGCON_PORT:
            emit(debugcon, bytes(v & 0xFF for v in items))
        elif COM1_BASE <= port < COM1_BASE + 8:
            sent = [b for b in (self._uart.write(port - COM1_BASE, v & 0xFF) for v in items)
                    if b is not None]
            if sent:
                emit(serial, bytes(sent))
        elif port == DEBUG_EXIT_PORT:
            code = (items[0] << 1) | 1
            return _Stop(StopReason.DEBUG_EXIT,
                         f"debug exit: the kernel wrote {items[0]:#x} to port "
                         f"{DEBUG_EXIT_PORT:#x} (exit code {code})", code)
        elif port == KBC_COMMAND_PORT and 0xFE in items:
            return _Stop(StopReason.RESET, "reset requested through the keyboard controller")
        elif port == RESET_CONTROL_PORT and any(v & 0x04 for v in items):
            return _Stop(StopReason.RESET, f"reset requested through port {port:#x}")
        elif port in ACPI_POWEROFF_PORTS and ex.size >= 2 and ACPI_POWEROFF_VALUE in items:
            return _Stop(StopReason.POWEROFF, f"ACPI power-off through port {port:#x}")
        return None

    def _port_read(self, ex: IoIn) -> None:
        if COM1_BASE <= ex.port < COM1_BASE + 8:
            reg = ex.port - COM1_BASE
            ex.answer(b"".join(self._uart.read(reg).to_bytes(ex.size, "little")
                               for _ in range(ex.count)))
        elif ex.port == DEBUGCON_PORT:
            ex.answer(DEBUGCON_PORT)
        else:
            ex.answer(0)


def run_multiboot(kvm: Kvm, kernel: bytes | str | os.PathLike[str], *,
                  mem: int = DEFAULT_MEMORY, cmdline: str = "", name: str | None = None,
                  timeout: float | None = None,
                  on_output: Callable[[bytes], None] | None = None) -> MultibootResult:
    """Load and run a Multiboot kernel in a new VM, closed afterwards; return the result.

    The arguments are those of :class:`MultibootMachine` and :meth:`MultibootMachine.run`.
    """
    with MultibootMachine(kvm, kernel, mem=mem, cmdline=cmdline, name=name) as machine:
        return machine.run(timeout=timeout, on_output=on_output)
