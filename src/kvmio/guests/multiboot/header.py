"""The Multiboot (v1) header: finding it in a kernel file and checking it."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvmio.errors import KvmInvalidArgumentError

__all__ = [
    "BOOTLOADER_MAGIC",
    "FLAG_AOUT_KLUDGE",
    "FLAG_MEMORY_INFO",
    "FLAG_PAGE_ALIGN",
    "FLAG_VIDEO_MODE",
    "HEADER_MAGIC",
    "HEADER_SEARCH",
    "SUPPORTED_REQUIRED_FLAGS",
    "MultibootHeader",
    "parse_header",
]

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

_U32 = 1 << 32


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
