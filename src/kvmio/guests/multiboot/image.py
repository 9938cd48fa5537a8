"""Kernel images: ELF32 and a.out-kludge parsing, and placement in guest memory.

:func:`parse_kernel` turns a kernel file (ELF32 ``EM_386``, or anything with the header's a.out
kludge) into a :class:`KernelImage`: segments to copy to physical addresses, and an entry point.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvmio.errors import KvmInvalidArgumentError
from kvmio.guests.multiboot.header import MultibootHeader, parse_header

if TYPE_CHECKING:
    from kvmio.vm import Vm

__all__ = [
    "BOOT_AREA_END",
    "HIGH_MEMORY_START",
    "LOW_MEMORY_END",
    "KernelImage",
    "LoadSegment",
    "parse_kernel",
    "read_kernel_file",
]

#: First byte past the loader's own low area; kernel segments may start here.
BOOT_AREA_END = 0x10000
#: Base of the reserved hole below 1 MiB (the last KiB of conventional memory is the EBDA).
LOW_MEMORY_END = 0x9FC00
#: Start of extended memory.
HIGH_MEMORY_START = 0x100000

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


def read_kernel_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """Read a kernel file of at most ``limit`` bytes (the guest's memory: a larger file cannot
    be loaded).

    The file is opened without blocking (a FIFO would otherwise wait for a writer) and checked
    with ``fstat`` before anything is read: anything but a regular file (a FIFO, a device such
    as ``/dev/zero``, a directory) is refused, and so is a file larger than ``limit``.  At most
    ``limit + 1`` bytes are then read, so a file that grows meanwhile is refused too.  Raises
    :class:`KvmInvalidArgumentError` naming the problem.
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise KvmInvalidArgumentError(f"cannot read kernel {path!r}: {e.strerror}",
                                      errno=e.errno) from e
    try:
        _check_kernel_fd(fd, path, limit)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise KvmInvalidArgumentError(f"cannot read kernel {path!r}: {e.strerror}",
                                          errno=e.errno) from e
    if len(data) > limit:
        raise KvmInvalidArgumentError(
            f"kernel {path!r} grew past guest memory ({limit} bytes) while it was read")
    return data


def _check_kernel_fd(fd: int, path: str, limit: int) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else
                "a FIFO" if stat.S_ISFIFO(st.st_mode) else
                "a character device" if stat.S_ISCHR(st.st_mode) else
                "a block device" if stat.S_ISBLK(st.st_mode) else
                "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise KvmInvalidArgumentError(
            f"cannot load kernel {path!r}: it is {kind}; a kernel must be a regular file")
    if st.st_size > limit:
        raise KvmInvalidArgumentError(
            f"kernel {path!r} is {st.st_size} bytes, larger than guest memory ({limit} "
            "bytes): it cannot be loaded")


@dataclass(frozen=True)
class LoadSegment:
    """``data`` goes to guest physical ``paddr``; ``[paddr + len(data), paddr + memsz)`` is
    the bss, which must read as zero (it is left untouched in fresh guest RAM)."""

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
                    "and stack)")
            if s.paddr < HIGH_MEMORY_START and s.end > LOW_MEMORY_END:
                raise KvmInvalidArgumentError(
                    f"{where} overlaps the reserved hole [{LOW_MEMORY_END:#x}, "
                    f"{HIGH_MEMORY_START:#x}) (EBDA, VGA memory, BIOS area)")

    def load(self, vm: Vm) -> None:
        """Copy the file bytes of every segment into guest memory.

        The bss (``memsz`` beyond the file bytes) is not written: guest RAM is fresh anonymous
        memory, already zero, so writing zeros would only make the host commit memory for it
        (a 100-byte file may declare a bss of gigabytes).  Load into fresh RAM only.  Call
        :meth:`check_placement` first; this only needs the ranges to lie in memory slots.
        """
        for s in self.segments:
            if s.data:
                vm.write_memory(s.paddr, s.data)


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
    phdr_index: list[int] = []  # the program header of each loaded segment
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
        phdr_index.append(i)
        if entry is None:
            if p_paddr <= e_entry < p_paddr + p_memsz:
                entry = e_entry
            elif p_vaddr <= e_entry < p_vaddr + p_memsz:
                entry = e_entry - p_vaddr + p_paddr
        segments.append(seg)
    if not segments:
        raise KvmInvalidArgumentError("the ELF kernel has no loadable (PT_LOAD) segment")
    _check_overlaps(segments, phdr_index)
    if entry is None:
        raise KvmInvalidArgumentError(
            f"the ELF entry point {e_entry:#x} is in no loadable segment")
    return entry, tuple(segments)


def _check_overlaps(segments: list[LoadSegment], phdr_index: list[int]) -> None:
    """Refuse segments that overlap, in O(n log n): sorted by address, a segment overlaps an
    earlier one exactly when it starts before the furthest end seen so far.  The error names
    the later segment (in file order) as the one that overlaps."""
    order = sorted(range(len(segments)), key=lambda k: (segments[k].paddr, k))
    reach = -1  # index (into segments) of the segment ending furthest so far
    for k in order:
        if reach >= 0 and segments[k].paddr < segments[reach].end:
            a, b = (reach, k) if reach < k else (k, reach)
            seg, other = segments[b], segments[a]
            raise KvmInvalidArgumentError(
                f"ELF segment {phdr_index[b]} (paddr {seg.paddr:#x}) [{seg.paddr:#x}, "
                f"{seg.end:#x}) overlaps loaded segment {a} [{other.paddr:#x}, {other.end:#x})")
        if reach < 0 or segments[k].end > segments[reach].end:
            reach = k
