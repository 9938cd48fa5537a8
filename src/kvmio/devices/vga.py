"""VGA text mode: the 80x25 screen in guest memory at ``0xB8000``, and the CRT controller's
index/data ports (``0x3D4``/``0x3D5``), where kernels set the cursor.

The text buffer is ordinary guest RAM (the guest writes it directly); :func:`render_vga_text`
reads it back as text, decoding code page 437 as the VGA font draws it.  :class:`VgaText` keeps
the CRT controller's registers so that a kernel reads back the cursor position it wrote (other
VGA ports are not modelled: they read 0 and ignore writes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from kvmio.devices.base import DeviceEvent, DeviceState, PortDevice, check_state
from kvmio.errors import KvmInvalidArgumentError

__all__ = [
    "CRTC_DATA_PORT",
    "CRTC_INDEX_PORT",
    "VGA_COLUMNS",
    "VGA_ROWS",
    "VGA_TEXT_ADDR",
    "VgaText",
    "render_vga_text",
]

#: VGA text buffer: guest physical address and geometry.
VGA_TEXT_ADDR = 0xB8000
VGA_COLUMNS = 80
VGA_ROWS = 25
VGA_TEXT_BYTES = VGA_COLUMNS * VGA_ROWS * 2

CRTC_INDEX_PORT = 0x3D4
CRTC_DATA_PORT = 0x3D5
#: CRT controller registers 0x00..0x18.
CRTC_REGISTERS = 0x19
_CURSOR_HIGH, _CURSOR_LOW = 0x0E, 0x0F


@runtime_checkable
class GuestMemory(Protocol):
    """Something that reads guest physical memory (a :class:`kvmio.vm.Vm`)."""

    def read_memory(self, gpa: int, length: int) -> bytes:
        """``length`` bytes at guest physical address ``gpa``."""
        ...


@runtime_checkable
class GuestRegion(Protocol):
    """A memory region read by guest physical address (a :class:`kvmio.memory.MemoryRegion`)."""

    def read(self, gpa: int, length: int) -> bytes:
        """``length`` bytes at guest physical address ``gpa``."""
        ...


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


def render_vga_text(source: GuestMemory | GuestRegion | bytes | bytearray | memoryview) -> str:
    """The VGA text screen (80x25 cells of character and attribute bytes at guest physical
    ``0xB8000``) as 25 lines joined by newlines, trailing spaces stripped from each line.

    ``source`` is a VM, the memory region holding the buffer, or the buffer's 4000 bytes.
    Characters are decoded from code page 437 as the VGA font draws them (``0x01`` is
    ``\u263a``, ``0xC9`` is ``\u2554``...); ``0x00`` and ``0xFF`` are blank; attributes are ignored.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        raw = bytes(source)
        if len(raw) < VGA_TEXT_BYTES:
            raise KvmInvalidArgumentError(
                f"a VGA text buffer is {VGA_TEXT_BYTES} bytes, got {len(raw)}")
    elif isinstance(source, GuestMemory):
        raw = source.read_memory(VGA_TEXT_ADDR, VGA_TEXT_BYTES)
    elif isinstance(source, GuestRegion):
        raw = source.read(VGA_TEXT_ADDR, VGA_TEXT_BYTES)
    else:
        raise KvmInvalidArgumentError(
            f"render_vga_text needs a VM, a memory region or bytes, not {type(source).__name__}")
    chars = raw[0:VGA_TEXT_BYTES:2]
    lines = []
    for row in range(VGA_ROWS):
        cells = chars[row * VGA_COLUMNS:(row + 1) * VGA_COLUMNS]
        lines.append("".join(_CP437[c] for c in cells).rstrip(" "))
    return "\n".join(lines)


class VgaText(PortDevice):
    """The CRT controller's index and data registers (see the module docstring)."""

    name = "vga"

    def __init__(self) -> None:
        self.crtc_index = 0
        self.crtc = bytearray(CRTC_REGISTERS)

    @property
    def ports(self) -> tuple[int, ...]:
        return (CRTC_INDEX_PORT, CRTC_DATA_PORT)

    @property
    def cursor(self) -> tuple[int, int]:
        """The cursor as ``(row, column)``, from CRT controller registers 0x0E/0x0F."""
        offset = (self.crtc[_CURSOR_HIGH] << 8) | self.crtc[_CURSOR_LOW]
        return divmod(offset, VGA_COLUMNS)

    def io_read(self, port: int, size: int) -> int:
        if port == CRTC_INDEX_PORT:
            value = self.crtc_index
            if size >= 2:
                value |= self._read_data() << 8
            return value
        return self._read_data()

    def _read_data(self) -> int:
        return self.crtc[self.crtc_index] if self.crtc_index < CRTC_REGISTERS else 0

    def io_write(self, port: int, size: int, value: int) -> DeviceEvent | None:
        if port == CRTC_INDEX_PORT:
            self.crtc_index = value & 0xFF
            if size >= 2:  # outw 0x3D4: index in the low byte, data in the high byte
                self._write_data(value >> 8 & 0xFF)
        else:
            self._write_data(value & 0xFF)
        return None

    def _write_data(self, value: int) -> None:
        if self.crtc_index < CRTC_REGISTERS:
            self.crtc[self.crtc_index] = value

    def render(self, source: GuestMemory | GuestRegion | bytes) -> str:
        """:func:`render_vga_text` of ``source``."""
        return render_vga_text(source)

    def state(self) -> DeviceState:
        return {"crtc_index": self.crtc_index, "crtc": bytes(self.crtc)}

    def restore(self, state: Mapping[str, object]) -> None:
        s = check_state(self.name, state, {"crtc_index": (0, 0xFF), "crtc": CRTC_REGISTERS})
        self.crtc_index = int(s["crtc_index"])
        self.crtc = bytearray(s["crtc"])
