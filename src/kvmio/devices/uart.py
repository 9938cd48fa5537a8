"""A 16550 UART (COM1 by default), enough for polling serial drivers.

Bytes written to THR are output (not while the divisor latch is selected, nor in loopback mode,
where they come back through RBR).  LSR reads ``0x60`` (transmitter empty), plus data-ready when
a looped-back byte waits in RBR; MSR reads carrier detect, data set ready and clear to send (in
loopback: the modem-control outputs wired back); IIR reads "no interrupt pending"; the other
registers read back what was written.  It never raises an interrupt and never receives from
outside.
"""

from __future__ import annotations

from collections.abc import Mapping

from kvmio.devices.base import DeviceEvent, DeviceState, Output, PortDevice, check_state

__all__ = ["COM1_BASE", "Uart16550"]

#: The first of COM1's eight ports.
COM1_BASE = 0x3F8

_LCR_DLAB = 0x80
_MCR_LOOP = 0x10

_FIELDS = {"ier": (0, 0x0F), "lcr": (0, 0xFF), "mcr": (0, 0x1F), "scr": (0, 0xFF),
           "fcr": (0, 0xFF), "dll": (0, 0xFF), "dlm": (0, 0xFF), "rbr": (0, 0xFF),
           "data_ready": (0, 1)}


class Uart16550(PortDevice):
    """The 16550 model described in the module docstring, at ports ``base`` .. ``base + 7``.

    Transmitted bytes are reported as :class:`~kvmio.devices.base.Output` events with source
    ``name`` (``"serial"``).
    """

    def __init__(self, base: int = COM1_BASE, *, name: str = "serial") -> None:
        self.base = base
        self.name = name
        self.ier = self.lcr = self.mcr = self.scr = self.fcr = 0
        self.dll, self.dlm = 12, 0  # 9600 baud
        self.rbr = 0
        self.data_ready = False

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(range(self.base, self.base + 8))

    @property
    def dlab(self) -> bool:
        """Whether the divisor latch is selected (LCR bit 7)."""
        return bool(self.lcr & _LCR_DLAB)

    def io_write(self, port: int, size: int, value: int) -> DeviceEvent | None:
        reg, value = port - self.base, value & 0xFF
        if reg == 0:
            if self.dlab:
                self.dll = value
            elif self.mcr & _MCR_LOOP:
                self.rbr, self.data_ready = value, True  # comes back on the receive side
            else:
                return Output(self.name, bytes([value]))
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

    def io_read(self, port: int, size: int) -> int:
        reg = port - self.base
        if reg == 0:
            if self.dlab:
                return self.dll
            value = self.rbr if self.data_ready else 0
            self.rbr, self.data_ready = 0, False
            return value
        if reg == 1:
            return self.dlm if self.dlab else self.ier
        if reg == 2:
            return 0x01 | (0xC0 if self.fcr & 1 else 0)  # no interrupt pending; FIFOs
        if reg == 3:
            return self.lcr
        if reg == 4:
            return self.mcr
        if reg == 5:
            return 0x60 | (1 if self.data_ready else 0)
        if reg == 6:
            if self.mcr & _MCR_LOOP:  # DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD
                m = self.mcr
                return ((m & 1) << 5) | ((m & 2) << 3) | ((m & 4) << 4) | ((m & 8) << 4)
            return 0xB0  # carrier detect, data set ready, clear to send
        return self.scr

    def state(self) -> DeviceState:
        return {"ier": self.ier, "lcr": self.lcr, "mcr": self.mcr, "scr": self.scr,
                "fcr": self.fcr, "dll": self.dll, "dlm": self.dlm, "rbr": self.rbr,
                "data_ready": int(self.data_ready)}

    def restore(self, state: Mapping[str, object]) -> None:
        s = check_state(f"{self.name} (16550)", state, _FIELDS)
        self.ier, self.lcr, self.mcr, self.scr = (int(s[k]) for k in ("ier", "lcr", "mcr", "scr"))
        self.fcr, self.dll, self.dlm, self.rbr = (int(s[k]) for k in ("fcr", "dll", "dlm", "rbr"))
        self.data_ready = bool(s["data_ready"])
