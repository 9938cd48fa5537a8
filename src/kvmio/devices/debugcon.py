"""The Bochs/QEMU debug console (port ``0xE9``) and QEMU's ``isa-debug-exit`` (port ``0xF4``).

- :class:`DebugConsole`: every byte written is output; reads return ``0xE9``, the value kernels
  test to detect the console (QEMU's ``readback``).
- :class:`DebugExitPort`: writing *v* (byte, word or dword: the whole value) asks to stop with
  exit code ``(v << 1) | 1``; reads return 0.

Neither has state beyond its configuration: their :meth:`state` is empty, and ``restore``
accepts only that.
"""

from __future__ import annotations

from collections.abc import Mapping

from kvmio.devices.base import (
    DebugExit,
    DeviceEvent,
    DeviceState,
    Output,
    PortDevice,
    check_state,
)

__all__ = ["DEBUGCON_PORT", "DEBUG_EXIT_PORT", "DebugConsole", "DebugExitPort"]

DEBUGCON_PORT = 0xE9
DEBUG_EXIT_PORT = 0xF4


class DebugConsole(PortDevice):
    """Port ``0xE9``: output bytes (as :class:`~kvmio.devices.base.Output` events with source
    ``name``, ``"debugcon"``)."""

    def __init__(self, port: int = DEBUGCON_PORT, *, name: str = "debugcon") -> None:
        self.port = port
        self.name = name

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.port,)

    def io_read(self, port: int, size: int) -> int:
        return DEBUGCON_PORT

    def io_write(self, port: int, size: int, value: int) -> DeviceEvent | None:
        return Output(self.name, bytes([value & 0xFF]))

    def state(self) -> DeviceState:
        return {}

    def restore(self, state: Mapping[str, object]) -> None:
        check_state(self.name, state, {})


class DebugExitPort(PortDevice):
    """Port ``0xF4``: a write is a :class:`~kvmio.devices.base.DebugExit` event."""

    def __init__(self, port: int = DEBUG_EXIT_PORT, *, name: str = "debug-exit") -> None:
        self.port = port
        self.name = name

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.port,)

    def io_write(self, port: int, size: int, value: int) -> DeviceEvent | None:
        return DebugExit(port, value)

    def state(self) -> DeviceState:
        return {}

    def restore(self, state: Mapping[str, object]) -> None:
        check_state(self.name, state, {})
