"""Reset and power-off requests, as a PC and QEMU's machines take them.

- Reset: ``0xFE`` written to the keyboard controller's command port ``0x64``, or a write with
  bit 2 set to the reset control register at ``0xCF9`` (which keeps bits 1 and 3, "system
  reset" and "full reset", and reads them back).
- Power-off: ``0x2000`` (SLP_EN with sleep type 0) written as a word or dword to the QEMU/Bochs
  ACPI PM1a control ports ``0x604`` or ``0xB004``.

Other writes to these ports are ignored and reads return 0 (the keyboard controller's status
included: "input buffer empty", so the usual wait-before-command loops end), except ``0xCF9``.
"""

from __future__ import annotations

from collections.abc import Mapping

from kvmio.devices.base import (
    DeviceEvent,
    DeviceState,
    PortDevice,
    PowerOff,
    ResetRequest,
    check_state,
)
from kvmio.errors import KvmInvalidArgumentError

__all__ = [
    "ACPI_POWEROFF_PORTS",
    "ACPI_POWEROFF_VALUE",
    "KBC_COMMAND_PORT",
    "RESET_CONTROL_PORT",
    "PowerControl",
]

KBC_COMMAND_PORT = 0x64
KBC_RESET_COMMAND = 0xFE
RESET_CONTROL_PORT = 0xCF9
ACPI_POWEROFF_PORTS = (0x604, 0xB004)
ACPI_POWEROFF_VALUE = 0x2000

_RCR_RESET = 0x04
_RCR_KEPT = 0x0A  # system reset (bit 1) and full reset (bit 3)


class PowerControl(PortDevice):
    """The reset and power-off ports described in the module docstring."""

    name = "power"

    def __init__(self) -> None:
        self.rcr = 0

    @property
    def ports(self) -> tuple[int, ...]:
        return (KBC_COMMAND_PORT, RESET_CONTROL_PORT, *ACPI_POWEROFF_PORTS)

    def io_read(self, port: int, size: int) -> int:
        return self.rcr if port == RESET_CONTROL_PORT else 0

    def io_write(self, port: int, size: int, value: int) -> DeviceEvent | None:
        if port == KBC_COMMAND_PORT and value == KBC_RESET_COMMAND:
            return ResetRequest("reset requested through the keyboard controller")
        if port == RESET_CONTROL_PORT:
            self.rcr = value & _RCR_KEPT
            if value & _RCR_RESET:
                return ResetRequest(f"reset requested through port {port:#x}")
        if port in ACPI_POWEROFF_PORTS and size >= 2 and value == ACPI_POWEROFF_VALUE:
            return PowerOff(f"ACPI power-off through port {port:#x}")
        return None

    def state(self) -> DeviceState:
        return {"rcr": self.rcr}

    def restore(self, state: Mapping[str, object]) -> None:
        s = check_state(self.name, state, {"rcr": (0, 0xFF)})
        rcr = int(s["rcr"])
        if rcr & ~_RCR_KEPT:
            raise KvmInvalidArgumentError(
                f"bad {self.name} state: rcr={rcr:#x} has bits other than 1 and 3 set")
        self.rcr = rcr
