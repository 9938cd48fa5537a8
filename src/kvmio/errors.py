"""kvmio's exceptions: one base type, :class:`KvmError`, and a few precise subclasses.

:class:`KvmError` derives from :class:`OSError`, so ``errno`` carries the kernel's error number
where there is one, and ``except OSError`` keeps working.  ``ioctl`` names the failing call.
"""

from __future__ import annotations

import errno as _errno
import os


class KvmError(OSError):
    """Base class of every error kvmio raises.

    ``errno`` is the kernel's error number (``None`` when kvmio itself refused the request) and
    ``ioctl`` the name of the failing call, if any.
    """

    def __init__(self, message: str, *, errno: int | None = None, ioctl: str | None = None):
        if errno is not None:
            super().__init__(errno, message)
        else:
            super().__init__(message)
        self.ioctl = ioctl
        self.message = message

    def __str__(self) -> str:
        parts = []
        if self.ioctl:
            parts.append(f"{self.ioctl}: ")
        parts.append(self.message)
        if self.errno is not None:
            parts.append(f" [errno {self.errno}: {_errno.errorcode.get(self.errno, '?')}]")
        return "".join(parts)


class KvmUnavailableError(KvmError):
    """``/dev/kvm`` is missing, not accessible, or not a KVM device."""


class KvmClosedError(KvmError):
    """An object was used after ``close()`` (or after its VM was closed)."""


class KvmUnsupportedError(KvmError):
    """The kernel does not offer a capability or feature that the call needs."""


class KvmInvalidArgumentError(KvmError, ValueError):
    """A request that breaks a rule of the KVM API; kvmio checks these before the kernel does."""


class KvmStateError(KvmError):
    """The call is valid in general but not now (e.g. enabling the dirty ring after a vCPU)."""


class DirtyRingError(KvmError):
    """A problem with a dirty-log ring."""


class DirtyRingOverrunError(DirtyRingError):
    """The kernel overwrote dirty-ring entries before they were harvested: pages may be lost.

    Treat the affected memory slots as wholly dirty (resynchronise them), and avoid it in future
    with a bigger ring, a lower guest write density, or bitmap mode.
    """

    def __init__(self, message: str, *, vcpu: int | None = None, lost: int | None = None,
                 harvested: int = 0):
        super().__init__(message)
        #: The vCPU whose ring overran, if known.
        self.vcpu = vcpu
        #: How many entries the counts disagree by, if known (reset mismatch).
        self.lost = lost
        #: How many entries the failing call had harvested.  They are not lost and not on the
        #: exception: the ring keeps them, and its next harvest (or collection) returns them.
        self.harvested = harvested


class SnapshotError(KvmError):
    """A snapshot or checkpoint that cannot be taken, restored or read.  For a machine state:
    one that cannot be captured, restored or read back: a state that does not
    fit the machine (other vCPU ids, an irqchip one has and the other lacks), a restore the
    kernel refused part-way (``errno`` and ``ioctl`` are the refused call's; the machine is
    then partly restored), or serialized bytes that are truncated, corrupted or of another
    format version."""

    def __init__(self, message: str, *, errno: int | None = None, ioctl: str | None = None,
                 vcpu: int | None = None):
        super().__init__(message, errno=errno, ioctl=ioctl)
        #: The vCPU concerned, if one is.
        self.vcpu = vcpu


class MigrationError(KvmError):
    """A migration that cannot go on: the connection failed or was cut, the stream is not a
    kvmio migration stream (truncated, corrupted, another version, a record that does not
    fit the machine it describes), the destination refused, or no switch-over fitted the
    downtime limit in time.  The source VM is left running (resumed); a destination never
    runs a VM it did not receive whole."""


class MigrationInDoubtError(MigrationError):
    """The source let the destination run the VM (it sent the go-ahead) but never heard that
    it does: the connection failed in the last round trip.  The destination may or may not
    run it, so the source is *not* resumed (two copies of one guest must never run): it stays
    paused, whole.  Resume it only once you know the destination does not run the VM."""


def from_errno(err: int, ioctl: str, what: str | None = None) -> KvmError:
    """The exception for a failed call that returned ``-err``."""
    msg = what or os.strerror(err)
    if err == _errno.EBADF:
        return KvmClosedError(f"{msg} (bad or closed file descriptor)", errno=err, ioctl=ioctl)
    return KvmError(msg, errno=err, ioctl=ioctl)
