"""What the emulated devices share: the port-device interface, the events a write can report,
and the checking of saved state.

Devices sit below the guest code: they import only :mod:`kvmio.errors`, :mod:`kvmio.exits` and
:mod:`kvmio._abi`, never a VM or vCPU.  Whoever runs the vCPU decodes its exits and calls
:meth:`PortDevice.io_read` / :meth:`PortDevice.io_write` (through an
:class:`~kvmio.devices.bus.IoBus`), and acts on the events they return.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

from kvmio.errors import KvmInvalidArgumentError

__all__ = [
    "DebugExit",
    "DeviceEvent",
    "DeviceState",
    "Output",
    "PortDevice",
    "PowerOff",
    "ResetRequest",
    "check_state",
]

#: A device's saved state: plain values only (ints, and bytes for register files), so that it
#: can be written as JSON (bytes as hex or base64) or packed into a snapshot.
DeviceState = dict[str, int | bytes]


@dataclass(frozen=True)
class Output:
    """Bytes the guest sent to the outside world (``source`` names the device)."""

    source: str
    data: bytes


@dataclass(frozen=True)
class DebugExit:
    """The guest wrote ``value`` to an ``isa-debug-exit`` port: it asks to stop with exit code
    ``(value << 1) | 1``."""

    port: int
    value: int

    @property
    def exit_code(self) -> int:
        """``(value << 1) | 1``, as QEMU's ``isa-debug-exit`` computes it."""
        return (self.value << 1) | 1


@dataclass(frozen=True)
class ResetRequest:
    """The guest asked for a reset (``detail`` says how)."""

    detail: str


@dataclass(frozen=True)
class PowerOff:
    """The guest asked to be powered off (``detail`` says how)."""

    detail: str


DeviceEvent = Output | DebugExit | ResetRequest | PowerOff


class PortDevice(ABC):
    """A device on the x86 I/O port bus.

    ``ports`` are the ports it claims.  Accesses come one item at a time (a ``rep outsb`` of
    *n* bytes is *n* writes); ``size`` is 1, 2 or 4 bytes and ``value`` the item, zero-extended.
    """

    #: Short name, used as the key of the device's state in a bus's state.
    name: str = "device"

    @property
    @abstractmethod
    def ports(self) -> tuple[int, ...]:
        """The I/O ports this device answers."""

    def io_read(self, port: int, size: int) -> int:
        """A read of ``size`` bytes from ``port``; the default reads 0."""
        return 0

    @abstractmethod
    def io_write(self, port: int, size: int, value: int) -> DeviceEvent | None:
        """A write of ``value`` (``size`` bytes) to ``port``; returns what it caused, if
        anything the machine must act on."""

    @abstractmethod
    def state(self) -> DeviceState:
        """The device's state as plain values (see :data:`DeviceState`)."""

    @abstractmethod
    def restore(self, state: Mapping[str, object]) -> None:
        """Put the device in a state returned by :meth:`state` (of a device configured the
        same way).  Raises :class:`KvmInvalidArgumentError`, changing nothing, when the state
        is not one this device can have."""


#: A field of a state: an int in ``(low, high)`` inclusive, or bytes of exactly that length.
FieldSpec = tuple[int, int] | int


def check_state(device: str, state: object, fields: Mapping[str, FieldSpec]) -> DeviceState:
    """Check a state given to ``restore`` against ``fields`` and return a clean copy.

    Every field must be present and no other; ints must be ints (not bools) within their
    range; bytes fields must be ``bytes``/``bytearray`` of their exact length.  Raises
    :class:`KvmInvalidArgumentError` naming the device and the field.
    """
    if not isinstance(state, Mapping):
        raise KvmInvalidArgumentError(
            f"{device} state must be a mapping, not {type(state).__name__}")
    keys = set(state)
    missing = sorted(set(fields) - keys)
    extra = sorted(str(k) for k in keys - set(fields))
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
            ([f"unknown {', '.join(extra)}"] if extra else [])
        raise KvmInvalidArgumentError(f"bad {device} state: {'; '.join(parts)}")
    out: DeviceState = {}
    for key, spec in fields.items():
        value = state[key]
        if isinstance(spec, tuple):
            low, high = spec
            if isinstance(value, bool) or not isinstance(value, int):
                raise KvmInvalidArgumentError(
                    f"bad {device} state: {key} must be an int, not {type(value).__name__}")
            if not low <= value <= high:
                raise KvmInvalidArgumentError(
                    f"bad {device} state: {key}={value} is outside [{low}, {high}]")
            out[key] = value
        else:
            if not isinstance(value, bytes | bytearray):
                raise KvmInvalidArgumentError(
                    f"bad {device} state: {key} must be bytes, not {type(value).__name__}")
            if len(value) != spec:
                raise KvmInvalidArgumentError(
                    f"bad {device} state: {key} must be {spec} bytes, not {len(value)}")
            out[key] = bytes(value)
    return out
