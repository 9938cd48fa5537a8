"""An x86 I/O port bus: routes port reads and writes to the devices that claim them."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

from kvmio.devices.base import DeviceEvent, DeviceState, PortDevice
from kvmio.errors import KvmInvalidArgumentError

__all__ = ["IoBus"]


class IoBus:
    """Port devices by port.  A port nobody claims reads as 0 and ignores writes, which is the
    idle state of the status bits kernels busy-wait on (keyboard controller "input buffer full",
    CMOS "update in progress"), so such loops end."""

    def __init__(self, devices: Iterable[PortDevice] = ()) -> None:
        self._by_port: dict[int, PortDevice] = {}
        self._devices: dict[str, PortDevice] = {}
        for d in devices:
            self.add(d)

    def add(self, device: PortDevice) -> None:
        """Attach ``device``; its name and ports must be free."""
        if device.name in self._devices:
            raise KvmInvalidArgumentError(f"a device named {device.name!r} is already attached")
        taken = [p for p in device.ports if p in self._by_port]
        if taken:
            raise KvmInvalidArgumentError(
                f"{device.name}: port(s) {', '.join(f'{p:#x}' for p in taken)} already belong "
                f"to {self._by_port[taken[0]].name}")
        self._devices[device.name] = device
        for p in device.ports:
            self._by_port[p] = device

    @property
    def devices(self) -> dict[str, PortDevice]:
        """The attached devices by name (a copy)."""
        return dict(self._devices)

    def read(self, port: int, size: int) -> int:
        """One read; unclaimed ports read 0."""
        d = self._by_port.get(port)
        return 0 if d is None else d.io_read(port, size) & ((1 << (8 * size)) - 1)

    def write(self, port: int, size: int, value: int) -> DeviceEvent | None:
        """One write; unclaimed ports ignore it."""
        d = self._by_port.get(port)
        return None if d is None else d.io_write(port, size, value)

    def state(self) -> dict[str, DeviceState]:
        """Every device's state, by device name."""
        return {name: d.state() for name, d in self._devices.items()}

    def restore(self, state: Mapping[str, Mapping[str, object]]) -> None:
        """Restore every device from :meth:`state`'s output.  All states are checked (on
        scratch copies) before any device changes."""
        if not isinstance(state, Mapping) or set(state) != set(self._devices):
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise KvmInvalidArgumentError(
                f"bad bus state: expected the devices {sorted(self._devices)}, got {got}")
        for name, d in self._devices.items():
            copy.copy(d).restore(state[name])  # check first: restore changes nothing on error
        for name, d in self._devices.items():
            d.restore(state[name])
