"""Decoded vCPU exits: what :meth:`kvmio.Vcpu.run` returns."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmio._abi import lib
from kvmio.errors import KvmInvalidArgumentError, KvmStateError


class ExitReason(enum.IntEnum):
    """``kvm_run.exit_reason`` values that kvmio decodes."""

    UNKNOWN = lib.KVM_EXIT_UNKNOWN
    EXCEPTION = lib.KVM_EXIT_EXCEPTION
    IO = lib.KVM_EXIT_IO
    HYPERCALL = lib.KVM_EXIT_HYPERCALL
    DEBUG = lib.KVM_EXIT_DEBUG
    HLT = lib.KVM_EXIT_HLT
    MMIO = lib.KVM_EXIT_MMIO
    IRQ_WINDOW_OPEN = lib.KVM_EXIT_IRQ_WINDOW_OPEN
    SHUTDOWN = lib.KVM_EXIT_SHUTDOWN
    FAIL_ENTRY = lib.KVM_EXIT_FAIL_ENTRY
    INTR = lib.KVM_EXIT_INTR
    INTERNAL_ERROR = lib.KVM_EXIT_INTERNAL_ERROR
    SYSTEM_EVENT = lib.KVM_EXIT_SYSTEM_EVENT
    DIRTY_RING_FULL = lib.KVM_EXIT_DIRTY_RING_FULL


class SystemEventType(enum.IntEnum):
    """``KVM_SYSTEM_EVENT_*`` types."""

    SHUTDOWN = lib.KVM_SYSTEM_EVENT_SHUTDOWN
    RESET = lib.KVM_SYSTEM_EVENT_RESET
    CRASH = lib.KVM_SYSTEM_EVENT_CRASH


@dataclass(frozen=True)
class Exit:
    """Base of every decoded exit."""

    @property
    def reason(self) -> int:
        """The raw ``exit_reason``."""
        raise NotImplementedError


@dataclass(frozen=True)
class IoOut(Exit):
    """The guest wrote ``data`` (``count`` items of ``size`` bytes) to I/O ``port``."""

    port: int
    size: int
    count: int
    data: bytes

    @property
    def reason(self) -> int:
        """KVM_EXIT_IO."""
        return ExitReason.IO

    @property
    def value(self) -> int:
        """The first item written, as an unsigned little-endian integer."""
        return int.from_bytes(self.data[: self.size], "little")


@dataclass(frozen=True, eq=False)
class _Answerable(Exit):
    _answer: Callable[[bytes], None] = field(repr=False, compare=False)

    def answer(self, data: bytes | int) -> None:
        """Supply what the guest reads; call before the next :meth:`kvmio.Vcpu.run`.

        An int is encoded little-endian in the access size.
        """
        self._answer(self._encode(data))

    def _encode(self, data: bytes | int) -> bytes:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class IoIn(_Answerable):
    """The guest reads ``count`` items of ``size`` bytes from I/O ``port``: :meth:`answer` it
    (unanswered, the guest reads zeros)."""

    port: int = 0
    size: int = 0
    count: int = 0

    @property
    def reason(self) -> int:
        """KVM_EXIT_IO."""
        return ExitReason.IO

    def _encode(self, data: bytes | int) -> bytes:
        n = self.size * self.count
        if isinstance(data, int):
            data = (data & ((1 << (8 * self.size)) - 1)).to_bytes(self.size, "little") * self.count
        if len(data) != n:
            raise KvmInvalidArgumentError(f"port read needs {n} bytes, got {len(data)}")
        return data


@dataclass(frozen=True)
class MmioWrite(Exit):
    """The guest wrote ``data`` to unbacked (or read-only) guest physical address ``address``."""

    address: int
    data: bytes

    @property
    def reason(self) -> int:
        """KVM_EXIT_MMIO."""
        return ExitReason.MMIO

    @property
    def value(self) -> int:
        """``data`` as an unsigned little-endian integer."""
        return int.from_bytes(self.data, "little")


@dataclass(frozen=True, eq=False)
class MmioRead(_Answerable):
    """The guest reads ``length`` bytes at ``address``: :meth:`answer` it."""

    address: int = 0
    length: int = 0

    @property
    def reason(self) -> int:
        """KVM_EXIT_MMIO."""
        return ExitReason.MMIO

    def _encode(self, data: bytes | int) -> bytes:
        if isinstance(data, int):
            data = (data & ((1 << (8 * self.length)) - 1)).to_bytes(self.length, "little")
        if len(data) != self.length:
            raise KvmInvalidArgumentError(f"MMIO read needs {self.length} bytes, got {len(data)}")
        return data


@dataclass(frozen=True)
class Hlt(Exit):
    """The guest executed HLT (with no in-kernel irqchip to wait on)."""

    @property
    def reason(self) -> int:
        """KVM_EXIT_HLT."""
        return ExitReason.HLT


@dataclass(frozen=True)
class Shutdown(Exit):
    """The guest shut down (x86: triple fault)."""

    @property
    def reason(self) -> int:
        """KVM_EXIT_SHUTDOWN."""
        return ExitReason.SHUTDOWN


@dataclass(frozen=True)
class FailEntry(Exit):
    """The hardware refused to enter the guest (invalid guest state)."""

    hardware_entry_failure_reason: int
    cpu: int

    @property
    def reason(self) -> int:
        """KVM_EXIT_FAIL_ENTRY."""
        return ExitReason.FAIL_ENTRY


@dataclass(frozen=True)
class InternalError(Exit):
    """KVM could not handle the exit; ``suberror`` 1 is an emulation failure."""

    suberror: int
    data: tuple[int, ...]

    EMULATION = 1

    @property
    def reason(self) -> int:
        """KVM_EXIT_INTERNAL_ERROR."""
        return ExitReason.INTERNAL_ERROR


@dataclass(frozen=True)
class SystemEvent(Exit):
    """A system event (``type``: shutdown, reset, crash...) with its data words."""

    type: int
    data: tuple[int, ...]

    @property
    def reason(self) -> int:
        """KVM_EXIT_SYSTEM_EVENT."""
        return ExitReason.SYSTEM_EVENT


@dataclass(frozen=True)
class DirtyRingFull(Exit):
    """This vCPU's dirty ring is (soft-)full: harvest, reset, and run again."""

    @property
    def reason(self) -> int:
        """KVM_EXIT_DIRTY_RING_FULL."""
        return ExitReason.DIRTY_RING_FULL


@dataclass(frozen=True)
class Interrupted(Exit):
    """KVM_RUN returned early: the vCPU was kicked (signal or ``immediate_exit``)."""

    @property
    def reason(self) -> int:
        """KVM_EXIT_INTR."""
        return ExitReason.INTR


@dataclass(frozen=True)
class Unknown(Exit):
    """Any other exit: ``raw_reason`` is ``kvm_run.exit_reason``; ``hardware_exit_reason`` is
    meaningful for KVM_EXIT_UNKNOWN."""

    raw_reason: int
    hardware_exit_reason: int

    @property
    def reason(self) -> int:
        """The raw exit reason."""
        return self.raw_reason


VcpuExit = (IoOut | IoIn | MmioWrite | MmioRead | Hlt | Shutdown | FailEntry | InternalError
            | SystemEvent | DirtyRingFull | Interrupted | Unknown)


def stale_answer(_: bytes) -> None:
    """The answer function of an exit that is no longer the current one."""
    raise KvmStateError("this exit is no longer current: answer it before the next run()")
