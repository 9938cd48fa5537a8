"""The machine state apart from guest memory: what :func:`capture` reads and :func:`restore`
writes back, in memory (:class:`MachineState`) or as bytes (:meth:`MachineState.to_bytes`).

A :class:`MachineState` holds a :class:`VmState` (kvmclock; with the in-kernel irqchip the
two PICs and the IOAPIC; with the in-kernel PIT its channels), a :class:`VcpuState` per vCPU
id, and the port devices' state (:meth:`kvmio.devices.IoBus.state`) if it was given.  States
are immutable; each keeps the kernel structs it will write, built once on its first restore,
so that a reset re-applies them in one native call per object without encoding anything.

Restore order
-------------

:func:`restore` follows this table from top to bottom, and nothing else does; the code's
copy of it is :data:`VM_RESTORE_ORDER` and :data:`VCPU_RESTORE_ORDER` (a test checks the two
agree).  Guest memory is another module's part; where it goes is step 0.

====  ========================  ==========================================================
step  what (ioctl)              why there
====  ========================  ==========================================================
0     pending exits             An I/O or MMIO exit is finished by the kernel only at the
                                next KVM_RUN (api.rst, ``kvm_run``: "the corresponding
                                operations are complete (and guest state is consistent)
                                only after userspace has re-entered the kernel"); an
                                emulated one is finished by re-running the emulator on
                                the old instruction, which can write its results over
                                restored registers, and a string input over memory.  Each
                                target vCPU re-enters with ``immediate_exit`` set first
                                (the exits met are discarded), as the kernel's selftests
                                do before they save a state (``vcpu_run_complete_io``);
                                restore guest memory after this step
                                (:func:`finish_pending_exits`).
1     port devices              Userspace only; checked, then applied (``IoBus.restore``
                                changes nothing on error), before the kernel is touched.
2     ``clock``                 KVM_SET_CLOCK, to exactly the captured value (no
                                KVM_CLOCK_REALTIME: kvmclock does not move on across a
                                restore).  VM-wide state goes before the vCPUs', as
                                Firecracker does (``vm.rs`` ``restore_state`` before
                                ``vcpu.rs`` ``restore_state``) and QEMU does for the
                                in-kernel PICs, IOAPIC and PIT (loaded with the devices,
                                before it puts the CPUs' registers).  No kernel rule
                                orders the clock against the vCPUs.
3     ``pic_master``,           KVM_SET_IRQCHIP.
      ``pic_slave``, ``ioapic``
4     ``pit2``                  KVM_SET_PIT2, after the irqchips: the kernel reloads every
                                channel's count, and the timer it restarts fires into them
                                (a tick before them would land in PIC state that is then
                                overwritten; Firecracker sets the PIT first).
5     ``cpuid``                 KVM_SET_CPUID2 first of a vCPU's: KVM checks CR4 bits
                                (SREGS), XCR0, XSAVE features and MSRs against the guest's
                                CPUID; once a vCPU ran, KVM accepts only the CPUID it has
                                (api.rst; selftest ``cpuid_test``).  Skipped when the
                                vCPU is known to have it (``Vcpu.set_state``).
6     ``sregs``                 Segments, CR0/CR3/CR4, EFER and the APIC base: the mode
                                before the registers, as QEMU's
                                ``kvm_arch_put_registers`` puts them (Firecracker puts the
                                registers first; the kernel has no rule between the two).
7     ``regs``                  After SREGS; before VCPU_EVENTS, because KVM_SET_REGS
                                drops a pending exception (Firecracker
                                ``restore_state``).
8     ``xcrs``                  XCR0 (checked against the CPUID) before the XSAVE area
                                whose components it enables, so that the area is loaded
                                under the XCR0 it was saved with.  No kernel rule orders
                                the two (KVM checks the area against what the host
                                supports, not XCR0); QEMU and Firecracker write XSAVE
                                first.
9     ``xsave``                 KVM_SET_XSAVE, at the size KVM_CAP_XSAVE2 reports (the
                                FPU/SSE state is in it); KVM_SET_FPU instead where the
                                kernel has no XSAVE.
10    ``lapic``                 KVM_SET_LAPIC after SREGS, which sets the APIC base MSR
                                (enabled, x2APIC); before the MSRs, because the
                                TSC-deadline MSR only holds with the LAPIC's timer in
                                deadline mode (Firecracker ``restore_state``).
11    ``msrs``                  KVM_SET_MSRS in the kernel's list order, with
                                IA32_TSC_DEADLINE last, after IA32_TSC (Firecracker's
                                ``DEFERRED_MSRS``: KVM reads the TSC to arm the timer).
12    ``vcpu_events``           After REGS (see 7): pending exception, interrupt, NMI,
                                SMI, interrupt shadow, SMM.
13    ``mp_state``              After SREGS (KVM_SET_SREGS makes a BSP at the reset vector
                                runnable) and after VCPU_EVENTS (KVM refuses
                                INIT_RECEIVED or SIPI_RECEIVED while a restored SMM
                                latches INIT); QEMU's order.
14    ``debugregs``             Last, as QEMU puts them (after VCPU_EVENTS).
====  ========================  ==========================================================

A set ioctl the kernel refuses stops the restore and raises :class:`SnapshotError` with the
ioctl and errno; the steps before it are done, and the error says the machine is partly
restored (restore it again, or discard it).

Capture order
-------------

:data:`VCPU_CAPTURE_ORDER`: ``mp_state`` first, because KVM_GET_MP_STATE lets the LAPIC
accept pending INIT/SIPI events, which can reset the vCPU (QEMU's
``kvm_arch_get_registers``: "KVM_GET_MPSTATE can modify CS and RIP, call it before
KVM_GET_REGS and KVM_GET_SREGS"; Firecracker's ``save_state`` reads it first of all);
``vcpu_events`` next (QEMU reads them first), because without KVM_CAP_EXCEPTION_PAYLOAD
reading them delivers a pending exception's payload into CR2 or DR6, which SREGS and
DEBUGREGS must then show; then the rest, MSRs last.  A vCPU must be outside KVM_RUN and have
no pending exit (:attr:`kvmio.Vcpu.exit_pending`): :func:`capture` raises
:class:`~kvmio.errors.KvmStateError` otherwise.

MSRs: every MSR of KVM_GET_MSR_INDEX_LIST (``Vm.limits.msr_index_list``) that the vCPU's
KVM_GET_MSRS actually reads and its KVM_SET_MSRS takes back.  The kernel lists some that a
vCPU refuses (features its CPUID lacks), and reads some it then refuses to have written (this
project's CI host: MSR_KVM_POLL_CONTROL).  The subset is found once per vCPU and CPUID, and
kept for later captures: one KVM_GET_MSRS plus one per unreadable MSR, then one KVM_SET_MSRS
writing back the values just read (all but IA32_TSC) plus one per refused MSR.  That first
capture of a vCPU is therefore not free of writes: each MSR gets the value it had.

Serialized form
---------------

``magic (8) | version u16 | reserved u16 = 0 | payload length u32 | crc32 u32 | payload``,
little-endian; the CRC covers the header's first 16 bytes and the payload.  The payload is a
sequence of ``tag u16 | length u32 | value`` records, a vCPU's nested in its own record.
:meth:`MachineState.from_bytes` checks the magic, version, reserved field, length and CRC
before it reads anything, bounds-checks every length, and raises :class:`SnapshotError` (and
nothing else) for any input it does not accept.
"""

from __future__ import annotations

import contextlib
import struct
import weakref
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from kvmio._abi import IS_X86, IoctlBatch
from kvmio.caps import Cap
from kvmio.devices import IoBus
from kvmio.errors import (
    KvmInvalidArgumentError,
    KvmStateError,
    KvmUnsupportedError,
    SnapshotError,
)
from kvmio.exits import IoIn, MmioRead, VcpuExit
from kvmio.vcpu import (
    XSAVE_LEGACY_SIZE,
    Vcpu,
    decode_cpuid,
    decode_mp_state,
    decode_msrs,
    decode_xcrs,
    encode_cpuid,
    encode_mp_state,
    encode_msrs,
    encode_xcrs,
    state_part_size,
)
from kvmio.vm import IRQCHIP_STATE_SIZE, PIT_STATE_SIZE, ClockData, Vm, decode_clock
from kvmio.x86 import CpuidEntry, Regs, Sregs

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "VCPU_CAPTURE_ORDER",
    "VCPU_RESTORE_ORDER",
    "VM_RESTORE_ORDER",
    "MachineState",
    "Restorer",
    "VcpuState",
    "VmState",
    "capture",
    "finish_pending_exits",
    "restore",
]

#: The VM's part of the restore table (steps 2-4), in order.
VM_RESTORE_ORDER: tuple[str, ...] = ("clock", "pic_master", "pic_slave", "ioapic", "pit2")
#: Each vCPU's part of the restore table (steps 5-14), in order.
VCPU_RESTORE_ORDER: tuple[str, ...] = ("cpuid", "sregs", "regs", "xcrs", "xsave", "lapic",
                                       "msrs", "vcpu_events", "mp_state", "debugregs")
#: The order in which a vCPU's state is read (see "Capture order").
VCPU_CAPTURE_ORDER: tuple[str, ...] = ("mp_state", "vcpu_events", "regs", "sregs", "xcrs",
                                       "xsave", "fpu", "lapic", "debugregs", "cpuid", "msrs")

#: IA32_TSC and IA32_TSC_DEADLINE: the deadline is written after the TSC (step 11).
MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0

#: The serialized form's first bytes, and the version this kvmio writes and reads.
MAGIC = b"KVMIOMS\x00"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sHHII")

#: How many exits a pending exit may lead to while it is finished for a restore.
_MAX_DISCARDED_EXITS = 1 << 16


def _frozen_map(items: Iterable[tuple[int, int]], what: str) -> Mapping[int, int]:
    out: dict[int, int] = {}
    for k, v in items:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < 1 << 32:
            raise KvmInvalidArgumentError(f"{what} index {k!r} is not a u32")
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 64:
            raise KvmInvalidArgumentError(f"{what} {k:#x} value {v!r} is not a u64")
        if k in out:
            raise KvmInvalidArgumentError(f"{what} {k:#x} is given twice")
        out[k] = v
    return MappingProxyType(out)


def _check_raw(name: str, value: object, size: int | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, bytes):
        raise KvmInvalidArgumentError(f"{name} must be bytes, not {type(value).__name__}")
    if size is not None and len(value) != size:
        raise KvmInvalidArgumentError(f"{name} must be {size} bytes, not {len(value)}")


@dataclass(frozen=True, eq=True, repr=False)
class VcpuState:
    """One vCPU's state (x86): raw kernel structs where the kernel's are kept as they are,
    plain values where they have a natural form.

    ``regs``, ``sregs``, ``fpu``, ``vcpu_events``, ``debugregs``: the raw ``struct kvm_*``;
    ``xsave``: the XSAVE area (``None`` where the kernel has no XSAVE; ``fpu`` holds the same
    x87/SSE state and is written only then); ``lapic``: the 1 KiB register page with the
    in-kernel irqchip, else ``None``; ``xcrs`` and ``msrs``: values by index (the MSRs in the
    kernel's list order); ``mp_state``: a ``KVM_MP_STATE_*``; ``cpuid``: the CPUID entries.
    Every size is checked here (:class:`~kvmio.errors.KvmInvalidArgumentError`).
    """

    regs: bytes
    sregs: bytes
    fpu: bytes
    xsave: bytes | None
    xcrs: Mapping[int, int]
    msrs: Mapping[int, int]
    lapic: bytes | None
    vcpu_events: bytes
    mp_state: int
    debugregs: bytes
    cpuid: tuple[CpuidEntry, ...]
    _batch: list[IoctlBatch] = field(default_factory=list, init=False, repr=False,
                                     compare=False)

    def __post_init__(self) -> None:
        if not IS_X86:
            raise KvmUnsupportedError("vCPU states exist only on x86_64")
        for name in ("regs", "sregs", "fpu", "vcpu_events", "debugregs"):
            _check_raw(name, getattr(self, name), state_part_size(name))
        _check_raw("lapic", self.lapic, state_part_size("lapic"), optional=True)
        _check_raw("xsave", self.xsave, None, optional=True)
        if self.xsave is not None and (len(self.xsave) < XSAVE_LEGACY_SIZE
                                       or len(self.xsave) % 4):
            raise KvmInvalidArgumentError(
                f"an XSAVE area is a multiple of 4 bytes, at least {XSAVE_LEGACY_SIZE}, not "
                f"{len(self.xsave)}")
        if isinstance(self.mp_state, bool) or not isinstance(self.mp_state, int) or \
                not 0 <= self.mp_state < 1 << 32:
            raise KvmInvalidArgumentError(f"mp_state {self.mp_state!r} is not a u32")
        if not isinstance(self.xcrs, Mapping) or not isinstance(self.msrs, Mapping):
            raise KvmInvalidArgumentError("xcrs and msrs must be mappings of index to value")
        object.__setattr__(self, "xcrs", _frozen_map(self.xcrs.items(), "XCR"))
        object.__setattr__(self, "msrs", _frozen_map(self.msrs.items(), "MSR"))
        cpuid = tuple(self.cpuid)
        if any(not isinstance(e, CpuidEntry) for e in cpuid):
            raise KvmInvalidArgumentError("cpuid must hold CpuidEntry values")
        object.__setattr__(self, "cpuid", cpuid)

    @classmethod
    def _from_kernel(cls, **values: Any) -> VcpuState:
        """A state from values the kernel just gave, in the forms and sizes its structs have
        (a capture): nothing to check, and checking ~60 values costs a capture dearly."""
        self = object.__new__(cls)
        for name, value in values.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_batch", [])
        return self

    def __repr__(self) -> str:
        return (f"<VcpuState rip={self.registers().rip:#x} mp_state={self.mp_state} "
                f"msrs={len(self.msrs)} cpuid={len(self.cpuid)} "
                f"xsave={'-' if self.xsave is None else len(self.xsave)} "
                f"lapic={'yes' if self.lapic is not None else 'no'}>")

    def registers(self) -> Regs:
        """The general-purpose registers, decoded."""
        return Regs.from_bytes(self.regs)

    def special_registers(self) -> Sregs:
        """The special registers (segments, control registers...), decoded."""
        return Sregs.from_bytes(self.sregs)

    def restore_parts(self) -> list[tuple[str, bytes]]:
        """The raw writes of this state, in the restore table's order (steps 5-14)."""
        parts: list[tuple[str, bytes]] = []
        for part in VCPU_RESTORE_ORDER:
            if part == "cpuid":
                parts.append(("cpuid", encode_cpuid(self.cpuid)))
            elif part == "xcrs":
                parts.append(("xcrs", encode_xcrs(self.xcrs)))
            elif part == "xsave":
                parts.append(("xsave", self.xsave) if self.xsave is not None
                             else ("fpu", self.fpu))
            elif part == "lapic":
                if self.lapic is not None:
                    parts.append(("lapic", self.lapic))
            elif part == "msrs":
                items = list(self.msrs.items())
                tail = [(i, v) for i, v in items if i == MSR_IA32_TSC_DEADLINE]
                parts.append(("msrs", encode_msrs([(i, v) for i, v in items
                                                   if i != MSR_IA32_TSC_DEADLINE] + tail)))
            elif part == "mp_state":
                parts.append(("mp_state", encode_mp_state(self.mp_state)))
            else:
                parts.append((part, getattr(self, part)))
        return parts

    def batch(self) -> IoctlBatch:
        """The prepared writes (:meth:`kvmio.Vcpu.prepare_state`), built on first use."""
        if not self._batch:
            self._batch.append(Vcpu.prepare_state(self.restore_parts()))
        return self._batch[0]


@dataclass(frozen=True, eq=True, repr=False)
class VmState:
    """The VM-wide state (x86): kvmclock, and the raw states of the in-kernel PICs and IOAPIC
    (all three, or ``None`` without the irqchip) and PIT (``None`` without one)."""

    clock: ClockData
    pic_master: bytes | None = None
    pic_slave: bytes | None = None
    ioapic: bytes | None = None
    pit2: bytes | None = None
    _batch: list[IoctlBatch] = field(default_factory=list, init=False, repr=False,
                                     compare=False)

    def __post_init__(self) -> None:
        if not IS_X86:
            raise KvmUnsupportedError("VM states exist only on x86_64")
        if not isinstance(self.clock, ClockData):
            raise KvmInvalidArgumentError("clock must be a ClockData")
        chips = (self.pic_master, self.pic_slave, self.ioapic)
        if any(c is None for c in chips) and any(c is not None for c in chips):
            raise KvmInvalidArgumentError("the PICs and the IOAPIC come together (the "
                                          "in-kernel irqchip), or not at all")
        for name in ("pic_master", "pic_slave", "ioapic"):
            _check_raw(name, getattr(self, name), IRQCHIP_STATE_SIZE, optional=True)
        _check_raw("pit2", self.pit2, PIT_STATE_SIZE, optional=True)
        if self.pit2 is not None and self.pic_master is None:
            raise KvmInvalidArgumentError("a PIT state needs the irqchip's (KVM's PIT needs "
                                          "the in-kernel irqchip)")

    def __repr__(self) -> str:
        return (f"<VmState clock={self.clock.clock} irqchip={self.has_irqchip} "
                f"pit={self.has_pit}>")

    @property
    def has_irqchip(self) -> bool:
        """Whether the state has the in-kernel irqchip's."""
        return self.pic_master is not None

    @property
    def has_pit(self) -> bool:
        """Whether the state has the in-kernel PIT's."""
        return self.pit2 is not None

    def restore_parts(self) -> list[tuple[str, bytes | ClockData]]:
        """The writes of this state, in the restore table's order (steps 2-4)."""
        parts: list[tuple[str, bytes | ClockData]] = []
        for part in VM_RESTORE_ORDER:
            value = getattr(self, part)
            if value is not None:
                parts.append((part, value))
        return parts

    def batch(self) -> IoctlBatch:
        """The prepared writes (:meth:`kvmio.Vm.prepare_state`), built on first use."""
        if not self._batch:
            self._batch.append(Vm.prepare_state(self.restore_parts()))
        return self._batch[0]


DevicesState = Mapping[str, Mapping[str, int | bytes]]


def _frozen_devices(devices: Mapping[str, Mapping[str, object]]) -> DevicesState:
    if not isinstance(devices, Mapping):
        raise KvmInvalidArgumentError("devices must map device names to their states")
    out: dict[str, Mapping[str, int | bytes]] = {}
    for name, st in devices.items():
        if not isinstance(name, str) or not isinstance(st, Mapping):
            raise KvmInvalidArgumentError("devices must map device names to their states")
        fields: dict[str, int | bytes] = {}
        for key, value in st.items():
            if not isinstance(key, str):
                raise KvmInvalidArgumentError(f"device {name!r}: field names are strings")
            if isinstance(value, bool) or not isinstance(value, int | bytes):
                raise KvmInvalidArgumentError(
                    f"device {name!r}: {key} must be an int or bytes, not "
                    f"{type(value).__name__}")
            fields[key] = value
        out[name] = MappingProxyType(fields)
    return MappingProxyType(out)


@dataclass(frozen=True, eq=True, repr=False)
class MachineState:
    """A machine's state apart from guest memory: the VM's, each vCPU's by id, and the port
    devices' (``None`` if no bus was given to :func:`capture`)."""

    vm: VmState
    vcpus: Mapping[int, VcpuState]
    devices: DevicesState | None = None
    _plan: list[IoctlBatch] = field(default_factory=list, init=False, repr=False,
                                    compare=False)
    _restorers: list[Restorer] = field(default_factory=list, init=False, repr=False,
                                       compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.vm, VmState):
            raise KvmInvalidArgumentError("vm must be a VmState")
        if not isinstance(self.vcpus, Mapping) or not self.vcpus:
            raise KvmInvalidArgumentError("vcpus must map vCPU ids to at least one VcpuState")
        vcpus: dict[int, VcpuState] = {}
        for vid, st in sorted(self.vcpus.items()):
            if isinstance(vid, bool) or not isinstance(vid, int) or not 0 <= vid < 1 << 32:
                raise KvmInvalidArgumentError(f"vCPU id {vid!r} is not a u32")
            if not isinstance(st, VcpuState):
                raise KvmInvalidArgumentError(f"vCPU {vid}'s state must be a VcpuState")
            if (st.lapic is not None) != self.vm.has_irqchip:
                raise KvmInvalidArgumentError(
                    f"vCPU {vid} {'has' if st.lapic is not None else 'lacks'} a LAPIC state "
                    f"but the VM {'has' if self.vm.has_irqchip else 'lacks'} the irqchip")
            vcpus[vid] = st
        object.__setattr__(self, "vcpus", MappingProxyType(vcpus))
        if self.devices is not None:
            object.__setattr__(self, "devices", _frozen_devices(self.devices))

    def __repr__(self) -> str:
        devices = "-" if self.devices is None else ",".join(self.devices)
        return f"<MachineState {self.vm!r} vcpus={list(self.vcpus)} devices={devices}>"

    @classmethod
    def capture(cls, vm: Vm, vcpus: Iterable[Vcpu] | Mapping[int, Vcpu], *,
                devices: IoBus | None = None,
                msr_indices: Iterable[int] | None = None) -> MachineState:
        """:func:`capture`."""
        return capture(vm, vcpus, devices=devices, msr_indices=msr_indices)

    def restore(self, vm: Vm, vcpus: Iterable[Vcpu] | Mapping[int, Vcpu], *,
                devices: IoBus | None = None) -> None:
        """:func:`restore` this state."""
        restore(self, vm, vcpus, devices=devices)

    def restorer(self, vm: Vm, vcpus: Iterable[Vcpu] | Mapping[int, Vcpu], *,
                 devices: IoBus | None = None) -> Restorer:
        """This state bound to a machine, checked once: :meth:`Restorer.restore` re-applies
        it as :func:`restore` does, with the least work around the ioctls (a reset loop)."""
        return Restorer(self, vm, vcpus, devices)

    def plan(self) -> IoctlBatch:
        """Every write of the state (steps 2-14) as one prepared batch
        (:meth:`kvmio.Vm.chain_states`: the VM's, then each vCPU's in id order), built on
        first use and kept."""
        if not self._plan:
            self._plan.append(Vm.chain_states(self.vm.batch(),
                                              [v.batch() for v in self.vcpus.values()]))
        return self._plan[0]

    def to_bytes(self) -> bytes:
        """The serialized state (see "Serialized form"): versioned, checksummed."""
        return _encode(self)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> MachineState:
        """Read back :meth:`to_bytes`' output.  Raises :class:`SnapshotError`, and nothing
        else, for anything truncated, altered, of another format or version, or holding a
        state that cannot be."""
        try:
            raw = bytes(data)
        except TypeError:
            raise SnapshotError(f"a serialized state is bytes, not {type(data).__name__}") \
                from None
        return _decode(raw)


# -- capture ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MsrChoice:
    candidates: tuple[int, ...]
    cpuid: bytes
    entries: tuple[CpuidEntry, ...]
    saved: tuple[int, ...]


#: Per vCPU: the MSRs it saves, for the candidates and CPUID they were found with (and that
#: CPUID decoded, which a capture otherwise decodes again each time).
_MSR_CHOICES: weakref.WeakKeyDictionary[Vcpu, _MsrChoice] = weakref.WeakKeyDictionary()


def _saved_msrs(v: Vcpu, candidates: tuple[int, ...]) -> tuple[int, ...]:
    """The candidates ``v`` reads and takes back: those it reads, less those KVM_SET_MSRS
    refuses when given the value just read (IA32_TSC is not written: the host may always set
    it, and writing it back would move the guest's TSC by the time passed since it was
    read)."""
    readable = v.readable_msrs(list(candidates))
    values = v.get_msrs(readable)
    writable = set(v.writable_msrs([(i, values[i]) for i in readable if i != MSR_IA32_TSC]))
    return tuple(i for i in readable if i == MSR_IA32_TSC or i in writable)


def _vcpu_list(vm: Vm, vcpus: Iterable[Vcpu] | Mapping[int, Vcpu]) -> list[Vcpu]:
    if not isinstance(vm, Vm):
        raise KvmInvalidArgumentError(f"vm must be a Vm, not {type(vm).__name__}")
    items = list(vcpus.values()) if isinstance(vcpus, Mapping) else list(vcpus)
    mine = vm.vcpus
    seen: set[int] = set()
    for v in items:
        if not isinstance(v, Vcpu):
            raise KvmInvalidArgumentError(f"vcpus must be Vcpu objects, not {type(v).__name__}")
        if mine.get(v.id) is not v:
            raise KvmInvalidArgumentError(f"vCPU {v.id} is not an open vCPU of this VM")
        if v.id in seen:
            raise KvmInvalidArgumentError(f"vCPU {v.id} is given twice")
        seen.add(v.id)
    if not items:
        raise KvmInvalidArgumentError("give at least one vCPU")
    return sorted(items, key=lambda v: v.id)


def capture(vm: Vm, vcpus: Iterable[Vcpu] | Mapping[int, Vcpu], *,
            devices: IoBus | None = None,
            msr_indices: Iterable[int] | None = None) -> MachineState:
    """Read the state of ``vm`` and of ``vcpus`` (an iterable of them, or ``vm.vcpus``), and
    ``devices.state()`` if a bus is given.

    Every vCPU must be outside KVM_RUN (it is held there while its state is read) and have no
    pending exit: both raise :class:`~kvmio.errors.KvmStateError` (finish an exit with
    :meth:`kvmio.Vcpu.complete_pending_exit`).  ``msr_indices`` are the MSRs to consider
    (default: the kernel's list, ``vm.limits.msr_index_list``); those a vCPU cannot read are
    left out.  x86 only.
    """
    if not IS_X86:
        raise KvmUnsupportedError("machine states exist only on x86_64")
    targets = _vcpu_list(vm, vcpus)
    if devices is not None and not isinstance(devices, IoBus):
        raise KvmInvalidArgumentError(f"devices must be an IoBus, not {type(devices).__name__}")
    candidates = tuple(vm.limits.msr_index_list if msr_indices is None else msr_indices)
    if not candidates and msr_indices is None:
        raise KvmStateError("this VM does not know the kernel's MSR list (it was not created "
                            "by Kvm.create_vm); pass msr_indices")
    vm_parts = ["clock"]
    if vm.has_irqchip:
        vm_parts += ["pic_master", "pic_slave", "ioapic"]
    if vm.has_pit:
        vm_parts.append("pit2")
    parts = [p for p in VCPU_CAPTURE_ORDER if p != "msrs"
             and (p != "lapic" or vm.has_irqchip)
             and (p != "xsave" or vm.check_extension(Cap.XSAVE))]
    with contextlib.ExitStack() as stack:
        for v in targets:
            stack.enter_context(v.outside_run())  # KvmStateError if a thread is in KVM_RUN
        for v in targets:
            if v.exit_pending:
                raise KvmStateError(
                    f"vCPU {v.id} stopped at an exit that KVM finishes only at the next "
                    "KVM_RUN, so its registers are not consistent yet: call "
                    "complete_pending_exit() first")
        raw_vm = vm.get_state(vm_parts)
        states: dict[int, VcpuState] = {}
        for v in targets:
            raw = v.get_state(parts)
            choice = _MSR_CHOICES.get(v)
            if choice is None or choice.candidates != candidates or choice.cpuid != raw["cpuid"]:
                choice = _MsrChoice(candidates, raw["cpuid"], tuple(decode_cpuid(raw["cpuid"])),
                                    _saved_msrs(v, candidates))
                _MSR_CHOICES[v] = choice
            msrs = v.get_state(["msrs"], msr_indices=choice.saved)["msrs"]
            states[v.id] = VcpuState._from_kernel(
                regs=raw["regs"], sregs=raw["sregs"], fpu=raw["fpu"], xsave=raw.get("xsave"),
                xcrs=MappingProxyType(decode_xcrs(raw["xcrs"])),
                msrs=MappingProxyType(dict(decode_msrs(msrs))), lapic=raw.get("lapic"),
                vcpu_events=raw["vcpu_events"], mp_state=decode_mp_state(raw["mp_state"]),
                debugregs=raw["debugregs"], cpuid=choice.entries)
        state = VmState(decode_clock(raw_vm["clock"]), raw_vm.get("pic_master"),
                        raw_vm.get("pic_slave"),
                        raw_vm.get("ioapic"), raw_vm.get("pit2"))
        dev = devices.state() if devices is not None else None
    return MachineState(state, states, dev)


# -- restore ------------------------------------------------------------------------------------


def _discard(ex: VcpuExit) -> None:
    """An exit met while a pending one is finished for a restore: its future is discarded,
    so reads get zeros and writes go nowhere."""
    if isinstance(ex, IoIn):
        ex.answer(bytes(ex.size * ex.count))
    elif isinstance(ex, MmioRead):
        ex.answer(bytes(ex.length))


def finish_pending_exits(vcpus: Iterable[Vcpu], *,
                         on_exit: Callable[[VcpuExit], None] | None = None) -> None:
    """Step 0 of the restore table: finish every pending exit of ``vcpus`` (see
    :attr:`kvmio.Vcpu.exit_pending`) without running their guests further.  Exits met on the
    way go to ``on_exit``, or are discarded (reads answered with zeros).  :func:`restore`
    calls it; call it yourself before restoring guest memory, which a pending string input
    would otherwise write after it was restored."""
    for v in vcpus:
        if v.exit_pending:
            try:
                v.complete_pending_exit(on_exit or _discard, max_exits=_MAX_DISCARDED_EXITS)
            except KvmStateError as e:
                raise SnapshotError(f"vCPU {v.id}'s pending exit cannot be finished: {e}",
                                    vcpu=v.id) from e


def restore(state: MachineState, vm: Vm, vcpus: Iterable[Vcpu] | Mapping[int, Vcpu], *,
            devices: IoBus | None = None) -> None:
    """Write ``state`` back into ``vm``, ``vcpus`` (the same ids as the state's) and
    ``devices`` (required exactly when the state has device state), in the order of the
    restore table above.  The same VM, or a new one built the same way, may be the target.

    A machine that does not fit the state raises :class:`SnapshotError` before anything is
    written: other vCPU ids, an irqchip or PIT in one and not the other, another XSAVE size,
    other devices.  A vCPU inside KVM_RUN raises :class:`~kvmio.errors.KvmStateError`.  An
    ioctl the kernel refuses raises :class:`SnapshotError` carrying its name and errno; the
    steps before it are done.  A state remembers the last machine it was restored into
    (:meth:`MachineState.restorer`), so that restoring it there again checks nothing twice.
    """
    if not isinstance(state, MachineState):
        raise KvmInvalidArgumentError(f"state must be a MachineState, not "
                                      f"{type(state).__name__}")
    targets = list(vcpus.values() if isinstance(vcpus, Mapping) else vcpus)
    last = state._restorers[0] if state._restorers else None
    if last is None or not last.fits(vm, targets, devices):
        last = Restorer(state, vm, targets, devices)
        state._restorers[:] = [last]
    last.restore()


class Restorer:
    """A :class:`MachineState` bound to a machine, every check done once (see
    :func:`restore`); :meth:`restore` then re-applies it with little more than one native
    call (a reset).  Made by :meth:`MachineState.restorer`."""

    def __init__(self, state: MachineState, vm: Vm, vcpus: Iterable[Vcpu] | Mapping[int, Vcpu],
                 devices: IoBus | None = None):
        targets = _vcpu_list(vm, vcpus)
        ids = [v.id for v in targets]
        if ids != list(state.vcpus):
            raise SnapshotError(f"the state has vCPUs {list(state.vcpus)}; the machine has "
                                f"{ids}")
        for what, mine, theirs in (("irqchip", vm.has_irqchip, state.vm.has_irqchip),
                                   ("PIT", vm.has_pit, state.vm.has_pit)):
            if mine != theirs:
                raise SnapshotError(f"the state was captured {'with' if theirs else 'without'} "
                                    f"the in-kernel {what}; this VM has "
                                    f"{'one' if mine else 'none'}")
        for v in targets:
            xsave = state.vcpus[v.id].xsave
            if xsave is not None and len(xsave) != v.xsave_size:
                raise SnapshotError(f"vCPU {v.id}'s XSAVE area is {v.xsave_size} bytes; the "
                                    f"state holds {len(xsave)}", vcpu=v.id)
        if devices is not None and not isinstance(devices, IoBus):
            raise KvmInvalidArgumentError(f"devices must be an IoBus, not "
                                          f"{type(devices).__name__}")
        if (devices is None) != (state.devices is None):
            raise SnapshotError("the state holds device state: pass the IoBus to restore it "
                                "into" if devices is None else
                                "the state holds no device state to restore into this IoBus")
        if devices is not None and set(devices.devices) != set(state.devices or ()):
            raise SnapshotError(f"the state holds devices {sorted(state.devices or ())}; the "
                                f"bus has {sorted(devices.devices)}")
        self.state = state
        self.vm = vm
        self.vcpus: tuple[Vcpu, ...] = tuple(targets)
        self.devices = devices
        self._ids = frozenset(id(v) for v in targets)
        self._writer = vm.state_writer(state.plan(), targets)

    def fits(self, vm: Vm, vcpus: list[Vcpu], devices: IoBus | None) -> bool:
        """Whether this restorer is for exactly that machine (the same objects)."""
        return (vm is self.vm and devices is self.devices and len(vcpus) == len(self.vcpus)
                and {id(v) for v in vcpus} == self._ids)

    def restore(self) -> None:
        """Write the state back: step 0 (pending exits), the devices, then steps 2-14 in one
        native call.  Raises as :func:`restore` does."""
        if self.vm.has_pit != self.state.vm.has_pit:  # the one part a VM may gain later
            raise SnapshotError("the VM gained an in-kernel PIT since this restorer was made; "
                                "the state has none")
        for v in self.vcpus:
            if v.exit_pending:
                finish_pending_exits(self.vcpus)
                break
        if self.devices is not None:
            assert self.state.devices is not None
            try:
                self.devices.restore(self.state.devices)
            except KvmInvalidArgumentError as e:
                raise SnapshotError(f"the device state does not fit this bus: {e}") from e
        self._writer.write()  # steps 2-14


# -- serialized form ----------------------------------------------------------------------------

# Record tags: the machine's (top level), and a vCPU's (inside its VCPU record).
_T_CLOCK, _T_PIC_MASTER, _T_PIC_SLAVE, _T_IOAPIC, _T_PIT2 = 1, 2, 3, 4, 5
_T_VCPU, _T_DEVICES = 16, 32
_VM_RAW = {_T_PIC_MASTER: "pic_master", _T_PIC_SLAVE: "pic_slave", _T_IOAPIC: "ioapic",
           _T_PIT2: "pit2"}
_VCPU_RAW = {1: "regs", 2: "sregs", 3: "fpu", 4: "xsave", 7: "lapic", 8: "vcpu_events",
             10: "debugregs"}
_V_XCRS, _V_MSRS, _V_MP_STATE, _V_CPUID = 5, 6, 9, 11
_RECORD = struct.Struct("<HI")
_CLOCK = struct.Struct("<QIQQ")
_PAIR = struct.Struct("<IQ")
_CPUID_ENTRY = struct.Struct("<7I")
_U32 = struct.Struct("<I")


def _record(tag: int, value: bytes) -> bytes:
    return _RECORD.pack(tag, len(value)) + value


def _pairs(items: Iterable[tuple[int, int]]) -> bytes:
    body = [_PAIR.pack(k, v) for k, v in items]
    return _U32.pack(len(body)) + b"".join(body)


def _text(s: str) -> bytes:
    raw = s.encode()
    if len(raw) > 0xFFFF:
        raise KvmInvalidArgumentError(f"name {s[:40]!r}... is too long to serialize")
    return struct.pack("<H", len(raw)) + raw


def _encode_devices(devices: DevicesState) -> bytes:
    out = [_U32.pack(len(devices))]
    for name, fields in devices.items():
        out += [_text(name), _U32.pack(len(fields))]
        for key, value in fields.items():
            out.append(_text(key))
            if isinstance(value, int):
                raw = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "little",
                                     signed=True)
                out += [b"\x00", struct.pack("<H", len(raw)), raw]
            else:
                out += [b"\x01", _U32.pack(len(value)), value]
    return b"".join(out)


def _encode(state: MachineState) -> bytes:
    vm = state.vm
    c = vm.clock
    out = [_record(_T_CLOCK, _CLOCK.pack(c.clock, c.flags, c.realtime, c.host_tsc))]
    for tag, name in _VM_RAW.items():
        value = getattr(vm, name)
        if value is not None:
            out.append(_record(tag, value))
    for vid, v in state.vcpus.items():
        body = [_U32.pack(vid)]
        for tag, name in _VCPU_RAW.items():
            value = getattr(v, name)
            if value is not None:
                body.append(_record(tag, value))
        body += [_record(_V_XCRS, _pairs(v.xcrs.items())),
                 _record(_V_MSRS, _pairs(v.msrs.items())),
                 _record(_V_MP_STATE, _U32.pack(v.mp_state)),
                 _record(_V_CPUID, _U32.pack(len(v.cpuid)) + b"".join(
                     _CPUID_ENTRY.pack(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                     for e in v.cpuid))]
        out.append(_record(_T_VCPU, b"".join(body)))
    if state.devices is not None:
        out.append(_record(_T_DEVICES, _encode_devices(state.devices)))
    payload = b"".join(out)
    if len(payload) >= 1 << 32:
        raise KvmInvalidArgumentError("the state is too large to serialize")
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(payload), 0)[:-4]
    return head + _U32.pack(zlib.crc32(payload, zlib.crc32(head))) + payload


class _Reader:
    """Bounds-checked reads from a part of the serialized state; every short read or
    leftover byte is a :class:`SnapshotError` naming ``what``."""

    def __init__(self, data: bytes, what: str):
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise SnapshotError(f"truncated {self.what}: {n} bytes wanted at {self.pos}, "
                                f"{len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: struct.Struct) -> tuple[Any, ...]:
        return fmt.unpack(self.take(fmt.size))

    def u32(self) -> int:
        return int(self.unpack(_U32)[0])

    def text(self) -> str:
        (n,) = struct.unpack("<H", self.take(2))
        try:
            return self.take(n).decode()
        except UnicodeDecodeError:
            raise SnapshotError(f"a name in the {self.what} is not UTF-8") from None

    def at_end(self) -> bool:
        return self.pos == len(self.data)

    def records(self) -> dict[int, list[bytes]]:
        """Every ``tag | length | value`` record to the end, by tag (in order)."""
        out: dict[int, list[bytes]] = {}
        while not self.at_end():
            tag, n = self.unpack(_RECORD)
            out.setdefault(tag, []).append(self.take(n))
        return out

    def pairs(self) -> list[tuple[int, int]]:
        n = self.u32()
        if n * _PAIR.size != len(self.data) - self.pos:
            raise SnapshotError(f"the {self.what} counts {n} entries but holds "
                                f"{len(self.data) - self.pos} bytes")
        out = list(_PAIR.iter_unpack(self.data[self.pos:]))  # the length is checked above
        self.pos = len(self.data)
        return out


def _one(records: dict[int, list[bytes]], tag: int, what: str, *,
         required: bool = True) -> bytes | None:
    got = records.pop(tag, [])
    if len(got) > 1:
        raise SnapshotError(f"the {what} is given {len(got)} times")
    if not got:
        if required:
            raise SnapshotError(f"the {what} is missing")
        return None
    return got[0]


def _decode_vcpu(raw: bytes) -> tuple[int, VcpuState]:
    r = _Reader(raw, "vCPU record")
    vid = r.u32()
    what = f"vCPU {vid}"
    recs = _Reader(raw[r.pos:], f"{what}'s records").records()
    values: dict[str, Any] = {}
    for tag, name in _VCPU_RAW.items():
        values[name] = _one(recs, tag, f"{what}'s {name}", required=name not in ("xsave",
                                                                                 "lapic"))
    xcrs = _Reader(_one(recs, _V_XCRS, f"{what}'s xcrs") or b"", f"{what}'s xcrs").pairs()
    msrs = _Reader(_one(recs, _V_MSRS, f"{what}'s msrs") or b"", f"{what}'s msrs").pairs()
    mp = _Reader(_one(recs, _V_MP_STATE, f"{what}'s mp_state") or b"", f"{what}'s mp_state")
    mp_state = mp.u32()
    if not mp.at_end():
        raise SnapshotError(f"{what}'s mp_state has extra bytes")
    cr = _Reader(_one(recs, _V_CPUID, f"{what}'s cpuid") or b"", f"{what}'s cpuid")
    n = cr.u32()
    if n * _CPUID_ENTRY.size != len(cr.data) - cr.pos:
        raise SnapshotError(f"{what}'s cpuid counts {n} entries but holds "
                            f"{len(cr.data) - cr.pos} bytes")
    cpuid = tuple(CpuidEntry(*e) for e in _CPUID_ENTRY.iter_unpack(cr.data[cr.pos:]))
    if recs:
        raise SnapshotError(f"{what} has records of unknown kinds {sorted(recs)}")
    for label, items in (("XCR", xcrs), ("MSR", msrs)):
        if len({k for k, _ in items}) != len(items):
            raise SnapshotError(f"{what} gives an {label} twice")
    return vid, VcpuState(xcrs=dict(xcrs), msrs=dict(msrs), mp_state=mp_state, cpuid=cpuid,
                          **values)


def _decode_devices(raw: bytes) -> dict[str, dict[str, int | bytes]]:
    r = _Reader(raw, "device state")
    out: dict[str, dict[str, int | bytes]] = {}
    for _ in range(r.u32()):
        name = r.text()
        if name in out:
            raise SnapshotError(f"device {name!r} is given twice")
        fields: dict[str, int | bytes] = {}
        for _ in range(r.u32()):
            key = r.text()
            if key in fields:
                raise SnapshotError(f"device {name!r} gives {key} twice")
            kind = r.take(1)
            if kind == b"\x00":
                (n,) = struct.unpack("<H", r.take(2))
                fields[key] = int.from_bytes(r.take(n), "little", signed=True)
            elif kind == b"\x01":
                fields[key] = r.take(r.u32())
            else:
                raise SnapshotError(f"device {name!r}: {key} has an unknown kind {kind!r}")
        out[name] = fields
    if not r.at_end():
        raise SnapshotError("the device state has extra bytes")
    return out


def _decode(data: bytes) -> MachineState:
    if len(data) < _HEADER.size:
        raise SnapshotError(f"a serialized state starts with a {_HEADER.size}-byte header; "
                            f"got {len(data)} bytes")
    magic, version, reserved, length, crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError("not a kvmio machine state (wrong magic)")
    if version != FORMAT_VERSION:
        raise SnapshotError(f"a machine state of format version {version}; this kvmio reads "
                            f"version {FORMAT_VERSION}")
    if reserved:
        raise SnapshotError("the header's reserved field is not zero")
    payload = data[_HEADER.size:]
    if length != len(payload):
        raise SnapshotError(f"the header announces {length} bytes of state; "
                            f"{len(payload)} follow (truncated or extended)")
    if zlib.crc32(payload, zlib.crc32(data[:_HEADER.size - 4])) != crc:
        raise SnapshotError("the state's checksum does not match: it was altered")
    try:
        recs = _Reader(payload, "state").records()
        c = _Reader(_one(recs, _T_CLOCK, "clock") or b"", "clock")
        clock = ClockData(*c.unpack(_CLOCK))
        if not c.at_end():
            raise SnapshotError("the clock has extra bytes")
        chips = {name: _one(recs, tag, name, required=False) for tag, name in _VM_RAW.items()}
        vm = VmState(clock, **chips)
        vcpus: dict[int, VcpuState] = {}
        for raw in recs.pop(_T_VCPU, []):
            vid, st = _decode_vcpu(raw)
            if vid in vcpus:
                raise SnapshotError(f"vCPU {vid} is given twice")
            vcpus[vid] = st
        dev = _one(recs, _T_DEVICES, "device state", required=False)
        devices = _decode_devices(dev) if dev is not None else None
        if recs:
            raise SnapshotError(f"the state has records of unknown kinds {sorted(recs)}")
        return MachineState(vm, vcpus, devices)
    except KvmInvalidArgumentError as e:
        raise SnapshotError(f"the serialized state holds an impossible state: {e}") from e
