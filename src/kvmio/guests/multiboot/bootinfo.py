"""The Multiboot information structure, memory map, command line and boot loader name."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmio._abi import PAGE_SIZE
from kvmio.errors import KvmInvalidArgumentError
from kvmio.guests.multiboot.image import HIGH_MEMORY_START, LOW_MEMORY_END
from kvmio.units import parse_size

if TYPE_CHECKING:
    from kvmio.vm import Vm

__all__ = [
    "DEFAULT_MEMORY",
    "MAX_MEMORY",
    "MIN_MEMORY",
    "BootInfoLayout",
    "MemoryMapEntry",
    "boot_info_layout",
    "check_memory",
    "memory_map",
    "parse_memory_size",
    "write_boot_info",
]

#: Information structure flag bits that kvmio sets.
INFO_MEMORY = 1 << 0
INFO_CMDLINE = 1 << 2
INFO_MMAP = 1 << 6
INFO_BOOT_LOADER_NAME = 1 << 9

#: Memory map entry types.
MEMORY_AVAILABLE = 1
MEMORY_RESERVED = 2

#: Size reserved for the information structure (through the framebuffer fields of spec
#: 0.6.96: 116 bytes, all zero unless set), then the memory map follows.
INFO_SIZE = 128
#: Longest command line, in bytes, without its terminating NUL.
MAX_CMDLINE = (16 << 10) - 1
#: ``mem_lower``: conventional memory in KiB, as QEMU reports it (the EBDA included).
MEM_LOWER_KIB = 640
#: The boot loader name passed to the kernel.
LOADER_NAME = "kvmio"

#: Default, smallest and largest guest RAM.  The ceiling keeps RAM clear of the 32-bit MMIO
#: area at the top of the 4 GiB space (where KVM's TSS pages also go).
DEFAULT_MEMORY = 128 << 20
MIN_MEMORY = 2 << 20
MAX_MEMORY = 3 << 30


@dataclass(frozen=True)
class MemoryMapEntry:
    """One Multiboot memory map entry (``type`` 1: available, 2: reserved)."""

    base: int
    length: int
    type: int

    def pack(self) -> bytes:
        """The 24-byte entry, ``size`` field (20) first."""
        return struct.pack("<IQQI", 20, self.base, self.length, self.type)


def check_memory(mem_size: int) -> None:
    """Refuse a guest RAM size the loader cannot lay out (not an int, or outside
    ``[MIN_MEMORY, MAX_MEMORY]``)."""
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
    check_memory(mem_size)
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


@dataclass(frozen=True)
class BootInfoLayout:
    """Where the boot information goes: one block starting at ``info`` (page-aligned), holding
    the information structure, then the memory map, the boot loader name and the command line;
    ``end`` is the first byte past it."""

    info: int
    mmap: int
    loader_name: int
    cmdline: int
    end: int


def boot_info_layout(mem_size: int, cmdline: str, kernel_end: int) -> BootInfoLayout:
    """Place the boot information after the loaded kernel, as QEMU's ``-kernel`` places its
    command line and boot loader name: at the first page boundary at or past ``kernel_end``
    (the end of the highest segment, bss included).  A block that would reach into the
    reserved hole below 1 MiB moves to 1 MiB.  Raises :class:`KvmInvalidArgumentError` when
    the block does not fit in guest memory.
    """
    check_memory(mem_size)
    raw = _encode_cmdline(cmdline)
    mmap_len = len(memory_map(mem_size)) * 24
    name_len = len(LOADER_NAME) + 1
    size = INFO_SIZE + mmap_len + name_len + len(raw)
    base = -(-kernel_end // PAGE_SIZE) * PAGE_SIZE
    if base < HIGH_MEMORY_START and base + size > LOW_MEMORY_END:
        base = HIGH_MEMORY_START
    if base + size > mem_size:
        raise KvmInvalidArgumentError(
            f"no room for the Multiboot information ({size} bytes) after the kernel, which "
            f"ends at {kernel_end:#x}: guest memory ends at {mem_size:#x}; give the guest "
            "more memory")
    mmap = base + INFO_SIZE
    return BootInfoLayout(base, mmap, mmap + mmap_len, mmap + mmap_len + name_len, base + size)


def write_boot_info(vm: Vm, mem_size: int, cmdline: str,
                    kernel_end: int = HIGH_MEMORY_START) -> int:
    """Write the Multiboot information structure, memory map, boot loader name and command line
    (UTF-8) into guest memory after the kernel (see :func:`boot_info_layout`); return the
    structure's address (for EBX).

    Flags: memory (``mem_lower`` 640 KiB, ``mem_upper`` the KiB from 1 MiB to the end of RAM),
    command line, memory map (:func:`memory_map`) and boot loader name (``"kvmio"``).
    """
    at = boot_info_layout(mem_size, cmdline, kernel_end)
    mmap = b"".join(e.pack() for e in memory_map(mem_size))
    info = bytearray(INFO_SIZE)
    flags = INFO_MEMORY | INFO_CMDLINE | INFO_MMAP | INFO_BOOT_LOADER_NAME
    struct.pack_into("<III", info, 0, flags, MEM_LOWER_KIB,
                     (mem_size - HIGH_MEMORY_START) // 1024)
    struct.pack_into("<I", info, 16, at.cmdline)
    struct.pack_into("<II", info, 44, len(mmap), at.mmap)
    struct.pack_into("<I", info, 64, at.loader_name)
    block = bytes(info) + mmap + LOADER_NAME.encode() + b"\0" + _encode_cmdline(cmdline)
    assert len(block) == at.end - at.info
    vm.write_memory(at.info, block)
    return at.info


def parse_memory_size(text: str) -> int:
    """Parse a memory size such as ``"128M"``, ``"1G"``, ``"64MiB"`` or ``"512"`` into bytes
    (:func:`kvmio.units.parse_size`: binary suffixes, a bare number means MiB, ``B`` bytes).

    Raises :class:`KvmInvalidArgumentError` for anything else.
    """
    return parse_size(text, what="memory size")
