"""kvmio: drive Linux KVM from Python through /dev/kvm, with lossless dirty page tracking.

The objects follow the kernel's: :class:`Kvm` (``/dev/kvm``) creates a :class:`Vm`, which owns
memory slots and creates :class:`Vcpu` objects; each vCPU has a dirty ring once
:meth:`Vm.enable_dirty_ring` was called.
"""

from kvmio.caps import Cap
from kvmio.dirty.pages import PageSet
from kvmio.dirty.ring import DirtyEntries, DirtyRing
from kvmio.dirty.ringset import RingSet
from kvmio.errors import (
    DirtyRingError,
    DirtyRingOverrunError,
    KvmClosedError,
    KvmError,
    KvmInvalidArgumentError,
    KvmStateError,
    KvmUnavailableError,
    KvmUnsupportedError,
    MigrationError,
    MigrationInDoubtError,
    SnapshotError,
)
from kvmio.exits import (
    DirtyRingFull,
    Exit,
    ExitReason,
    FailEntry,
    Hlt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    SystemEventType,
    Unknown,
    VcpuExit,
)
from kvmio.memory import (
    AnonymousMemory,
    FileMemory,
    HostWriteRecord,
    MemfdMemory,
    Memory,
    MemoryRegion,
    SlotId,
)
from kvmio.system import API_VERSION, Kvm
from kvmio.vcpu import Vcpu
from kvmio.vm import DirtyLogClaim, DirtyPages, DirtyRingConfig, Vm, VmLimits
from kvmio.x86 import CpuidEntry, DTable, Regs, Segment, Sregs

__version__ = "0.1.0"

__all__ = [
    "API_VERSION",
    "AnonymousMemory",
    "Cap",
    "CpuidEntry",
    "DTable",
    "DirtyEntries",
    "DirtyLogClaim",
    "DirtyPages",
    "DirtyRing",
    "DirtyRingConfig",
    "DirtyRingError",
    "DirtyRingFull",
    "DirtyRingOverrunError",
    "Exit",
    "ExitReason",
    "FailEntry",
    "FileMemory",
    "Hlt",
    "HostWriteRecord",
    "InternalError",
    "Interrupted",
    "IoIn",
    "IoOut",
    "Kvm",
    "KvmClosedError",
    "KvmError",
    "KvmInvalidArgumentError",
    "KvmStateError",
    "KvmUnavailableError",
    "KvmUnsupportedError",
    "MemfdMemory",
    "Memory",
    "MemoryRegion",
    "MigrationError",
    "MigrationInDoubtError",
    "MmioRead",
    "MmioWrite",
    "PageSet",
    "Regs",
    "RingSet",
    "Segment",
    "Shutdown",
    "SlotId",
    "SnapshotError",
    "Sregs",
    "SystemEvent",
    "SystemEventType",
    "Unknown",
    "Vcpu",
    "VcpuExit",
    "Vm",
    "VmLimits",
    "__version__",
]
