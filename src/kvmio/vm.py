"""The VM file descriptor: :class:`Vm` (memory slots, vCPUs, capabilities, dirty logging).

The VM keeps its ioctls and its registries (slots, vCPUs); the dirty-ring accounting lives in
its :class:`~kvmio.dirty.ringset.RingSet`, page sets in :mod:`kvmio.dirty.pages`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from kvmio import _abi, _check
from kvmio._abi import IS_X86, PAGE_SIZE, FdOwner, IoctlBatch, Mapping, PageRestore, ffi, lib
from kvmio.caps import Cap
from kvmio.dirty.pages import PageSet, bitmap_to_pages
from kvmio.dirty.ring import GFN_SIZE, DirtyEntries, DirtyRing, OverrunPolicy
from kvmio.dirty.ringset import Harvest, QuickHarvest, RingSet
from kvmio.errors import (
    DirtyRingError,
    KvmClosedError,
    KvmError,
    KvmInvalidArgumentError,
    KvmStateError,
    KvmUnsupportedError,
    SnapshotError,
    from_errno,
)
from kvmio.memory import AnonymousMemory, Memory, MemoryRegion
from kvmio.vcpu import Vcpu
from kvmio.vcpu import _batch_error as _vcpu_batch_error

__all__ = ["DEFAULT_RING_ENTRIES", "IRQCHIP_IOAPIC", "IRQCHIP_PIC_MASTER", "IRQCHIP_PIC_SLAVE",
           "IRQCHIP_STATE_SIZE", "PIT_STATE_SIZE", "RING_RESERVED_ENTRIES", "VM_STATE_PARTS",
           "ClockData", "DirtyLogClaim", "DirtyPages", "DirtyRingConfig", "StateWriter", "Vm",
           "VmLimits",
           "bitmap_to_pages", "decode_clock"]

#: Entries the kernel keeps in reserve at the end of every ring (without Intel PML; with PML it
#: reserves 512 more, which only the kernel knows: its refusal then names that rule).
RING_RESERVED_ENTRIES = 64
#: Bytes per ``struct kvm_dirty_gfn`` (from the C compiler).
DIRTY_GFN_SIZE = GFN_SIZE
#: Default ring size: 4096 entries (64 KiB), the size the kernel documentation recommends.
DEFAULT_RING_ENTRIES = 4096
#: The empty page set of empty collections (page sets are immutable, so one serves all).
_NO_PAGES = PageSet()

#: ``chip_id`` of KVM_GET_IRQCHIP / KVM_SET_IRQCHIP (x86): the two 8259 PICs and the IOAPIC.
IRQCHIP_PIC_MASTER = 0
IRQCHIP_PIC_SLAVE = 1
IRQCHIP_IOAPIC = 2
#: Bytes of an irqchip's state (the ``chip`` union of ``struct kvm_irqchip``).
IRQCHIP_STATE_SIZE = 512
#: Bytes of a PIT's state (``struct kvm_pit_state2``; 0 where there is none).
PIT_STATE_SIZE: int = ffi.sizeof("struct kvm_pit_state2") if IS_X86 else 0

#: The parts of a VM's state (x86) that :meth:`Vm.get_state` reads and
#: :meth:`Vm.prepare_state` / :meth:`Vm.set_state` write: part -> (GET ioctl, SET ioctl).
#: ``clock`` is a ``struct kvm_clock_data``, the irqchips :data:`IRQCHIP_STATE_SIZE` bytes
#: each (they need :meth:`Vm.create_irqchip`), ``pit2`` a ``struct kvm_pit_state2`` (it
#: needs :meth:`Vm.create_pit2`).
VM_STATE_PARTS: dict[str, tuple[str, str]] = {
    "clock": ("KVM_GET_CLOCK", "KVM_SET_CLOCK"),
    "pic_master": ("KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP"),
    "pic_slave": ("KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP"),
    "ioapic": ("KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP"),
    "pit2": ("KVM_GET_PIT2", "KVM_SET_PIT2"),
}
_CHIP_IDS = {"pic_master": IRQCHIP_PIC_MASTER, "pic_slave": IRQCHIP_PIC_SLAVE,
             "ioapic": IRQCHIP_IOAPIC}


@dataclass(frozen=True)
class ClockData:
    """``struct kvm_clock_data`` (KVM_GET_CLOCK): the guest's kvmclock in nanoseconds, the
    ``KVM_CLOCK_*`` flags saying which other fields are valid, the host's CLOCK_REALTIME
    (``KVM_CLOCK_REALTIME``) and TSC (``KVM_CLOCK_HOST_TSC``) at the moment it was read."""

    clock: int
    flags: int = 0
    realtime: int = 0
    host_tsc: int = 0

    def __post_init__(self) -> None:
        for name in ("clock", "realtime", "host_tsc"):
            _check.u64(f"ClockData.{name}", getattr(self, name))
        _check.u32("ClockData.flags", self.flags)


@dataclass(frozen=True)
class VmLimits:
    """What a VM needs to know of its system: the limits its ``Kvm`` reported."""

    vcpu_mmap_size: int
    max_vcpus: int
    max_vcpu_id: int
    max_memslots: int
    #: KVM_GET_MSR_INDEX_LIST (x86; a system ioctl): the MSRs KVM can save and restore, which
    #: a snapshot of this VM reads.
    msr_index_list: tuple[int, ...] = ()


@dataclass(frozen=True)
class DirtyRingConfig:
    """What :meth:`Vm.enable_dirty_ring` enabled."""

    cap: Cap
    entries: int
    bytes: int
    acq_rel: bool
    with_bitmap: bool


@dataclass(frozen=True)
class DirtyPages:
    """Pages dirtied since the previous collection, per memory slot (sorted, distinct).

    Returned only after the rings were reset (or the bitmap cleared), so reading the pages'
    contents now is safe: a later write is reported again by the next collection.
    """

    pages: PageSet
    regions: dict[int, MemoryRegion]
    #: Ring entries harvested (0 in bitmap mode).
    entries: int
    #: Entries for memory that no longer exists (a slot deleted, or replaced by a smaller one,
    #: since the page was dirtied).
    dropped: int = 0
    #: Ring mode: the pages each vCPU's ring reported, by vCPU id (entries of closed vCPUs and
    #: pages handed over with :meth:`Vm.adopt_dirty_pages` are only in :attr:`pages`).
    per_vcpu: dict[int, PageSet] = field(default_factory=dict)
    #: With ``on_overrun="report"``: rings found overrun by this collection (vCPU id -> why).
    #: Pages may have been lost: treat the tracked slots as wholly dirty.
    overruns: dict[int, str] = field(default_factory=dict)
    #: ``time.monotonic()`` when the rings were harvested (or the bitmaps read): the end of the
    #: period this collection covers, for rates.
    harvested_at: float = 0.0
    #: Ring mode: nanoseconds the kernel took to recycle the harvested entries
    #: (KVM_RESET_DIRTY_RINGS, which write-protects their pages again; it grows with how far
    #: the pages spread), part of the collection's own time.  0 in bitmap mode.
    reset_ns: int = 0

    @property
    def count(self) -> int:
        """Distinct dirty pages over all slots."""
        return self.pages.count

    @classmethod
    def _make(cls, pages: PageSet, regions: dict[int, MemoryRegion], entries: int,
              dropped: int, per_vcpu: dict[int, PageSet], harvested_at: float,
              reset_ns: int = 0) -> DirtyPages:
        """A result without overruns, made without the dataclass's field-by-field
        ``__init__`` (a quarter of an idle collection's cost): the same attributes."""
        obj = object.__new__(cls)
        obj.__dict__.update(pages=pages, regions=regions, entries=entries, dropped=dropped,
                            per_vcpu=per_vcpu, overruns={}, harvested_at=harvested_at,
                            reset_ns=reset_ns)
        return obj

    def gpas(self) -> npt.NDArray[np.uint64]:
        """Guest physical addresses of every dirty page, sorted."""
        return self.pages.gpas({s: r.guest_phys_addr for s, r in self.regions.items()})

    def ranges(self) -> list[tuple[int, int]]:
        """``(gpa, length in bytes)`` of every run of consecutive dirty pages."""
        return self.pages.ranges({s: r.guest_phys_addr for s, r in self.regions.items()})


class DirtyLogClaim:
    """Proof of exclusive use of a VM's dirty log (from :meth:`Vm.claim_dirty_log`).

    While a claim is held, only calls that pass it may read or clear the dirty bitmap or
    collect, so a second consumer cannot silently take pages from the first.
    """

    def __init__(self, vm_fd: int, holder: str):
        self.holder = holder
        self._vm_fd = vm_fd
        self.released = False

    def __repr__(self) -> str:
        return f"<DirtyLogClaim by {self.holder}{' released' if self.released else ''}>"


class Vm(FdOwner):
    """A virtual machine (from :meth:`kvmio.Kvm.create_vm`).

    Closing it stops and closes its vCPUs and unmaps its memory.  A VM holds no link to the
    ``Kvm`` that created it: it keeps the limits it was given (:class:`VmLimits`).
    """

    _what = "Vm"

    def __init__(self, fd: int, limits: VmLimits):
        super().__init__(fd)
        self.limits = limits
        self._regions: dict[int, MemoryRegion] = {}
        self._slot_sizes: dict[int, int] = {}  # size in pages by slot, rebuilt on every change
        self._vcpus: dict[int, Vcpu] = {}
        self._used_vcpu_ids: set[int] = set()
        self._lock = threading.RLock()
        self._ring: DirtyRingConfig | None = None
        self._ring_set: RingSet | None = None
        self._claim: DirtyLogClaim | None = None
        self._unreported = PageSet()
        self._manual_protect = False
        self._initially_set = False
        self._irqchip = False
        self._pit = False
        self._tss_address: int | None = None
        self._identity_map_address: int | None = None
        self._xsave_size: int | None = None  # KVM_CAP_XSAVE2, asked at the first vCPU
        self._get_batches: dict[tuple[str, ...], IoctlBatch] = {}  # the last state read

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<Vm {state} slots={sorted(self._regions)} vcpus={sorted(self._vcpus)}>"

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop and close every vCPU (a ``run()`` in another thread is kicked and returns; that
        thread's next ``run()`` raises :class:`KvmClosedError`), wait for calls in flight,
        unmap every memory region, and close the VM fd (idempotent)."""
        with self._lock:
            vcpus = list(self._vcpus.values())
        for vcpu in vcpus:
            vcpu.close()

        def unmap() -> None:
            with self._lock:
                for region in self._regions.values():
                    region.close()
                self._regions.clear()
                self._slot_sizes = {}
                self._vcpus.clear()

        # Under the ring set's lock: a collection holding it may use the fd without holding it
        # (see collect_dirty_pages).
        with self._ring_set.lock if self._ring_set is not None else contextlib.nullcontext():
            self._close_fd(before_close=unmap)

    def _check_open(self) -> None:
        if self.closed:
            raise KvmClosedError("this Vm is closed")

    # -- capabilities -----------------------------------------------------------------------

    def check_extension(self, cap: Cap | int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (answers may differ from the system fd's)."""
        cap = _check.u32("cap", cap)
        return self._ioctl(lib.KVM_CHECK_EXTENSION, cap, name="KVM_CHECK_EXTENSION")

    def enable_cap(self, cap: Cap | int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM (every architecture): up to four u64 arguments.

        Raises :class:`KvmUnsupportedError` (errno EINVAL) if the kernel does not offer the
        capability, and :class:`KvmError` with the kernel's errno if it refuses the arguments.
        """
        cap = _check.u32("cap", cap)
        if len(args) > 4:
            raise KvmInvalidArgumentError("KVM_ENABLE_CAP takes at most 4 arguments")
        ec = ffi.new("struct kvm_enable_cap *")
        ec.cap = cap
        ec.flags = _check.u32("flags", flags)
        for i, a in enumerate(args):
            ec.args[i] = _check.u64(f"KVM_ENABLE_CAP argument {i}", a)
        name = f"KVM_ENABLE_CAP({_cap_name(cap)})"
        try:
            self._ioctl(lib.KVM_ENABLE_CAP, ec, name=name)
        except KvmError as e:
            if e.errno == errno.EINVAL and self.check_extension(cap) == 0:
                raise KvmUnsupportedError(
                    f"this kernel does not support capability {_cap_name(cap)} on a VM",
                    errno=e.errno, ioctl=name) from e
            raise

    # -- memory -----------------------------------------------------------------------------

    @property
    def regions(self) -> dict[int, MemoryRegion]:
        """Memory regions by slot id (a copy)."""
        with self._lock:
            return dict(self._regions)

    def slot_pages(self) -> dict[int, int]:
        """Size in pages of every slot, by slot id."""
        with self._lock:
            return {s: r.num_pages for s, r in self._regions.items()}

    def add_memory_region(self, guest_phys_addr: int, size: int | None = None, *,
                          slot: int | None = None, log_dirty: bool = False,
                          readonly: bool = False, noreserve: bool = False,
                          memory: Memory | None = None) -> MemoryRegion:
        """Register host memory as a memory slot (KVM_SET_USER_MEMORY_REGION).

        ``memory`` is the backend (:class:`~kvmio.memory.AnonymousMemory`,
        :class:`~kvmio.memory.MemfdMemory` or :class:`~kvmio.memory.FileMemory`; ``size`` may
        then be omitted, and must match if given); without it, anonymous memory of ``size``
        bytes is mapped.  The region owns the backend from then on: deleting the slot or
        closing the VM unmaps it.

        ``log_dirty`` sets KVM_MEM_LOG_DIRTY_PAGES (needed for dirty tracking, bitmap or ring);
        ``readonly`` sets KVM_MEM_READONLY (guest writes become MMIO exits); ``noreserve`` maps
        with MAP_NORESERVE so that a guest far larger than host memory can be created (pages are
        allocated only when touched).  Raises :class:`KvmInvalidArgumentError` for a misaligned
        or empty range, an overlap with another slot, a slot id in use, or an argument of the
        wrong type.
        """
        guest_phys_addr = _check.integer("guest_phys_addr", guest_phys_addr)
        if memory is not None:
            _check.instance("memory", memory, Memory)
            if memory.closed:
                raise KvmInvalidArgumentError("memory is closed (or registered and deleted)")
            if size is not None and _check.integer("size", size) != memory.size:
                raise KvmInvalidArgumentError(
                    f"size {size:#x} does not match the memory's {memory.size:#x} bytes")
            if noreserve:
                raise KvmInvalidArgumentError("noreserve applies to anonymous memory only")
            size = memory.size
        if size is None:
            raise KvmInvalidArgumentError("give the size, or the memory to register")
        size = _check.integer("size", size)
        if slot is not None:
            slot = _check.integer("slot", slot)
        with self._lock:
            self._check_open()
            if size <= 0 or size % PAGE_SIZE:
                raise KvmInvalidArgumentError(
                    f"memory size {size:#x} must be a positive multiple of {PAGE_SIZE:#x}")
            if guest_phys_addr % PAGE_SIZE:
                raise KvmInvalidArgumentError(
                    f"guest physical address {guest_phys_addr:#x} is not page aligned")
            if guest_phys_addr + size > 1 << 52:
                raise KvmInvalidArgumentError("guest range exceeds the 52-bit physical space")
            max_slots = self.limits.max_memslots
            if slot is None:
                slot = next(i for i in range(max_slots + 1) if i not in self._regions)
            if not 0 <= slot < min(max_slots, 1 << 16):
                raise KvmInvalidArgumentError(
                    f"slot {slot} is out of range (this kernel has {max_slots} slots)")
            if slot in self._regions:
                raise KvmInvalidArgumentError(f"slot {slot} is already in use")
            for r in self._regions.values():
                if guest_phys_addr < r.end and r.guest_phys_addr < guest_phys_addr + size:
                    raise KvmInvalidArgumentError(
                        f"guest range [{guest_phys_addr:#x}, {guest_phys_addr + size:#x}) "
                        f"overlaps slot {r.slot} [{r.guest_phys_addr:#x}, {r.end:#x})")
            flags = 0
            if log_dirty:
                flags |= lib.KVM_MEM_LOG_DIRTY_PAGES
            if readonly:
                if not self.check_extension(Cap.READONLY_MEM):
                    raise KvmUnsupportedError("read-only memory slots need KVM_CAP_READONLY_MEM")
                flags |= lib.KVM_MEM_READONLY
            if memory is not None and any(r.memory is memory for r in self._regions.values()):
                raise KvmInvalidArgumentError("this memory already backs another slot")
            owned = memory if memory is not None else AnonymousMemory(size, noreserve=noreserve)
            try:
                self._set_region(slot, flags, guest_phys_addr, size, owned.mapping.address)
            except BaseException:
                if memory is None:
                    owned.close()
                raise
            region = MemoryRegion(slot, guest_phys_addr, size, flags, owned)
            self._regions[slot] = region
            self._slot_sizes = {s: r.num_pages for s, r in self._regions.items()}
            return region

    def _set_region(self, slot: int, flags: int, gpa: int, size: int, addr: int) -> None:
        mr = ffi.new("struct kvm_userspace_memory_region *")
        mr.slot = slot
        mr.flags = flags
        mr.guest_phys_addr = gpa
        mr.memory_size = size
        mr.userspace_addr = addr
        self._ioctl(lib.KVM_SET_USER_MEMORY_REGION, mr, name="KVM_SET_USER_MEMORY_REGION")

    def set_dirty_logging(self, slot: int, enabled: bool) -> None:
        """Turn KVM_MEM_LOG_DIRTY_PAGES on or off for an existing slot (as a migration starts
        or ends: a guest runs at full speed until tracking starts).  Turning it on starts the
        dirty log afresh."""
        slot = _check.integer("slot", slot)
        with self._lock:
            region = self._regions.get(slot)
            if region is None:
                raise KvmInvalidArgumentError(f"no memory region in slot {slot}")
            flags = region.flags | lib.KVM_MEM_LOG_DIRTY_PAGES if enabled else \
                region.flags & ~lib.KVM_MEM_LOG_DIRTY_PAGES
            if flags == region.flags:
                return
            self._set_region(slot, flags, region.guest_phys_addr, region.size,
                             region.host_address)
            region.flags = flags

    def delete_memory_region(self, slot: int) -> None:
        """Remove a memory slot from the guest and unmap its memory.  Dirty pages of the slot
        not collected yet are counted as dropped by the next collection."""
        slot = _check.integer("slot", slot)
        with self._lock:
            self._check_open()
            region = self._regions.get(slot)
            if region is None:
                raise KvmInvalidArgumentError(f"no memory region in slot {slot}")
            self._set_region(slot, 0, region.guest_phys_addr, 0, 0)
            del self._regions[slot]
            self._slot_sizes = {s: r.num_pages for s, r in self._regions.items()}
            region.close()

    def region_at(self, gpa: int, length: int = 1) -> MemoryRegion:
        """The memory region holding guest range ``[gpa, gpa+length)``."""
        gpa = _check.integer("gpa", gpa)
        length = _check.integer("length", length)
        for r in self.regions.values():
            if r.contains(gpa, length):
                return r
        raise KvmInvalidArgumentError(f"guest range {gpa:#x}+{length:#x} is not in one slot")

    def read_memory(self, gpa: int, length: int) -> bytes:
        """Copy guest memory (within one slot)."""
        length = _check.integer("length", length)
        return self.region_at(gpa, max(length, 1)).read(gpa, length)

    def write_memory(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest memory (within one slot).  ``data`` is any bytes-like object; its length
        counts bytes.  Host writes are not in the kernel's dirty log; they are in the slot's
        host-write records (:meth:`kvmio.MemoryRegion.record_host_writes`)."""
        mv = _check.buffer_bytes("data", data)
        self.region_at(gpa, max(len(mv), 1)).write(gpa, mv)

    def mark_dirty(self, gpa: int, length: int) -> None:
        """Note a host change of ``[gpa, gpa+length)`` (within one slot) made without
        :meth:`write_memory`, e.g. through :meth:`kvmio.MemoryRegion.array`: its pages go into
        the slot's host-write records (:meth:`kvmio.MemoryRegion.mark_dirty`)."""
        length = _check.integer("length", length)
        self.region_at(gpa, max(length, 1)).mark_dirty(gpa, length)

    # -- vCPUs ------------------------------------------------------------------------------

    @property
    def vcpus(self) -> dict[int, Vcpu]:
        """Open vCPUs by id (a copy)."""
        with self._lock:
            return dict(self._vcpus)

    def create_vcpu(self, vcpu_id: int | None = None) -> Vcpu:
        """KVM_CREATE_VCPU.  With the dirty ring enabled, the vCPU's ring is mapped here.

        Without ``vcpu_id`` the lowest id never used in this VM is taken: KVM keeps a closed
        vCPU's id (and counts it against the maximum) until the VM is closed, so an id can be
        used once only; asking for a used one raises :class:`KvmStateError`.
        """
        if vcpu_id is not None:
            vcpu_id = _check.integer("vcpu_id", vcpu_id)
        # Lock order (everywhere): a tracker's lock, then the ring set's, then the VM's, then
        # an object's fd condition.  Mapping the ring takes the ring set's lock.
        ring_lock = self._ring_set.lock if self._ring_set is not None else contextlib.nullcontext()
        with ring_lock, self._lock:
            self._check_open()
            if vcpu_id is None:
                vcpu_id = 0
                while vcpu_id in self._used_vcpu_ids:
                    vcpu_id += 1
            max_id = max(self.limits.max_vcpu_id, 1)
            if not 0 <= vcpu_id < max_id:
                raise KvmInvalidArgumentError(
                    f"vCPU id {vcpu_id} is out of range (ids below {max_id})")
            if vcpu_id in self._vcpus:
                raise KvmInvalidArgumentError(f"vCPU {vcpu_id} already exists")
            if vcpu_id in self._used_vcpu_ids:
                raise KvmStateError(f"vCPU id {vcpu_id} belonged to a closed vCPU; KVM keeps it "
                                    "until the VM is closed")
            if len(self._used_vcpu_ids) >= self.limits.max_vcpus:
                raise KvmInvalidArgumentError(
                    f"this VM already had the maximum of {self.limits.max_vcpus} vCPUs (closed "
                    "ones count until the VM is closed)")
            vfd = self._ioctl(lib.KVM_CREATE_VCPU, vcpu_id, name="KVM_CREATE_VCPU")
            self._used_vcpu_ids.add(vcpu_id)
            try:
                run = Mapping(self.limits.vcpu_mmap_size, fd=vfd, shared=True,
                              what=f"kvm_run of vCPU {vcpu_id}")
            except BaseException:
                _close_quietly(vfd)
                raise
            try:
                vcpu = Vcpu(vcpu_id, vfd, run, ring_set=self._ring_set,
                            on_close=self._vcpu_closed, xsave_size=self._xsave_area_size())
            except BaseException:
                run.close()
                _close_quietly(vfd)
                raise
            self._vcpus[vcpu_id] = vcpu
            return vcpu

    def _xsave_area_size(self) -> int | None:
        """What KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) says (the bytes KVM_GET_XSAVE2 writes and
        KVM_SET_XSAVE reads), or ``None`` without it (x86 only; asked once)."""
        if not IS_X86:
            return None
        if self._xsave_size is None:
            self._xsave_size = self.check_extension(Cap.XSAVE2)
        return self._xsave_size or None

    def _vcpu_closed(self, vcpu_id: int) -> None:
        with self._lock:
            self._vcpus.pop(vcpu_id, None)

    # -- x86 platform -----------------------------------------------------------------------

    def set_tss_address(self, addr: int = 0xFFFBD000) -> None:
        """KVM_SET_TSS_ADDR (x86, Intel): three pages of guest physical space KVM may use."""
        self._x86("KVM_SET_TSS_ADDR")
        addr = _check.u32("addr", addr)
        self._ioctl(lib.KVM_SET_TSS_ADDR, addr, name="KVM_SET_TSS_ADDR")
        self._tss_address = addr

    def set_identity_map_address(self, addr: int = 0xFFFBC000) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR (x86, Intel): one page KVM may use for real mode."""
        self._x86("KVM_SET_IDENTITY_MAP_ADDR")
        p = ffi.new("uint64_t *", _check.u64("addr", addr))
        self._ioctl(lib.KVM_SET_IDENTITY_MAP_ADDR, p, name="KVM_SET_IDENTITY_MAP_ADDR")
        self._identity_map_address = int(p[0])

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: the in-kernel interrupt controller (PIC + IOAPIC on x86)."""
        self._ioctl(lib.KVM_CREATE_IRQCHIP, name="KVM_CREATE_IRQCHIP")
        self._irqchip = True

    def create_pit2(self, speaker_dummy: bool = True) -> None:
        """KVM_CREATE_PIT2 (x86): the in-kernel i8254 timer (needs an irqchip)."""
        self._x86("KVM_CREATE_PIT2")
        cfg = ffi.new("struct kvm_pit_config *")
        cfg.flags = lib.KVM_PIT_SPEAKER_DUMMY if speaker_dummy else 0
        self._ioctl(lib.KVM_CREATE_PIT2, cfg, name="KVM_CREATE_PIT2")
        self._pit = True

    @property
    def has_irqchip(self) -> bool:
        """Whether :meth:`create_irqchip` made the in-kernel PICs, IOAPIC and local APICs."""
        return self._irqchip

    @property
    def has_pit(self) -> bool:
        """Whether :meth:`create_pit2` made the in-kernel PIT."""
        return self._pit

    @property
    def tss_address(self) -> int | None:
        """The address given to :meth:`set_tss_address`, or ``None`` if it was not called
        (a VM restored from a snapshot is given the same)."""
        return self._tss_address

    @property
    def identity_map_address(self) -> int | None:
        """The address given to :meth:`set_identity_map_address`, or ``None``."""
        return self._identity_map_address

    def _irqchip_arg(self, chip_id: int, what: str) -> Any:
        self._x86(what)
        chip_id = _check.integer("chip_id", chip_id)
        if chip_id not in _CHIP_IDS.values():
            raise KvmInvalidArgumentError(
                f"chip_id must be {IRQCHIP_PIC_MASTER} (PIC master), {IRQCHIP_PIC_SLAVE} (PIC "
                f"slave) or {IRQCHIP_IOAPIC} (IOAPIC), not {chip_id}")
        if not self._irqchip:
            raise KvmStateError(f"{what} needs the in-kernel irqchip (create_irqchip())")
        chip = ffi.new("struct kvm_irqchip *")
        chip.chip_id = chip_id
        return chip

    def get_irqchip(self, chip_id: int) -> bytes:
        """KVM_GET_IRQCHIP (x86, needs :meth:`create_irqchip`): the raw state of one chip,
        :data:`IRQCHIP_STATE_SIZE` bytes (``struct kvm_pic_state`` or ``struct
        kvm_ioapic_state`` at its start).  ``chip_id`` is :data:`IRQCHIP_PIC_MASTER`,
        :data:`IRQCHIP_PIC_SLAVE` or :data:`IRQCHIP_IOAPIC`."""
        chip = self._irqchip_arg(chip_id, "KVM_GET_IRQCHIP")
        self._ioctl(lib.KVM_GET_IRQCHIP, chip, name="KVM_GET_IRQCHIP")
        return _irqchip_data(chip)

    def set_irqchip(self, chip_id: int, data: bytes) -> None:
        """KVM_SET_IRQCHIP (x86, needs :meth:`create_irqchip`): restore one chip from what
        :meth:`get_irqchip` returned (exactly :data:`IRQCHIP_STATE_SIZE` bytes)."""
        chip = self._irqchip_arg(chip_id, "KVM_SET_IRQCHIP")
        _fill_irqchip(chip, bytes(_check.buffer_bytes("data", data)))
        self._ioctl(lib.KVM_SET_IRQCHIP, chip, name="KVM_SET_IRQCHIP")

    def _pit_check(self, what: str) -> None:
        self._x86(what)
        if not self._pit:
            raise KvmStateError(f"{what} needs the in-kernel PIT (create_pit2())")

    def get_pit2(self) -> bytes:
        """KVM_GET_PIT2 (x86, needs :meth:`create_pit2`): the raw ``struct kvm_pit_state2``
        (three channels and the flags)."""
        self._pit_check("KVM_GET_PIT2")
        st = ffi.new("struct kvm_pit_state2 *")
        self._ioctl(lib.KVM_GET_PIT2, st, name="KVM_GET_PIT2")
        return _abi.to_bytes(st, "struct kvm_pit_state2")

    def set_pit2(self, data: bytes) -> None:
        """KVM_SET_PIT2 (x86, needs :meth:`create_pit2`) from a raw ``struct kvm_pit_state2``.
        The kernel reloads each channel's count, so its countdown starts again now."""
        self._pit_check("KVM_SET_PIT2")
        st = _abi.from_bytes("struct kvm_pit_state2", bytes(_check.buffer_bytes("data", data)))
        self._ioctl(lib.KVM_SET_PIT2, st, name="KVM_SET_PIT2")

    def set_irq_line(self, irq: int, level: bool) -> None:
        """KVM_IRQ_LINE: raise or lower an interrupt line of the in-kernel irqchip."""
        il = ffi.new("struct kvm_irq_level *")
        il.irq = _check.u32("irq", irq)
        il.level = 1 if level else 0
        self._ioctl(lib.KVM_IRQ_LINE, il, name="KVM_IRQ_LINE")

    def get_clock(self) -> int:
        """KVM_GET_CLOCK: the guest's kvmclock time in nanoseconds."""
        return self.get_clock_data().clock

    def set_clock(self, ns: int) -> None:
        """KVM_SET_CLOCK: set the guest's kvmclock time in nanoseconds (no flags)."""
        self.set_clock_data(ClockData(_check.u64("ns", ns)))

    def get_clock_data(self) -> ClockData:
        """KVM_GET_CLOCK (KVM_CAP_ADJUST_CLOCK): the clock with its flags, and the host's
        real time and TSC where the flags say the kernel filled them in."""
        cd = ffi.new("struct kvm_clock_data *")
        self._ioctl(lib.KVM_GET_CLOCK, cd, name="KVM_GET_CLOCK")
        return _clock_data(cd)

    def set_clock_data(self, data: ClockData, *, realtime: bool = False) -> None:
        """KVM_SET_CLOCK: set kvmclock to ``data.clock``.

        Only the flag the kernel acts on is passed: with ``realtime`` (which needs
        ``KVM_CLOCK_REALTIME`` in ``data.flags``, i.e. a clock read by a kernel that reported
        the host's real time), ``KVM_CLOCK_REALTIME`` and ``data.realtime``, so the kernel adds
        the real time passed since the clock was read (a migration); otherwise no flag, and
        the clock is exactly ``data.clock`` (a reset).  The other flags KVM_GET_CLOCK reports
        (``KVM_CLOCK_TSC_STABLE``, ``KVM_CLOCK_HOST_TSC``) describe the read; kernels before
        5.16 refuse any flag on KVM_SET_CLOCK, so kvmio never passes them back."""
        self._ioctl(lib.KVM_SET_CLOCK, _clock_arg(data, realtime), name="KVM_SET_CLOCK")

    # -- the whole VM state, one native call each way ---------------------------------------

    def get_state(self, parts: Sequence[str]) -> dict[str, bytes]:
        """Read the given :data:`VM_STATE_PARTS`, in the order given, in one native call
        (x86); returns each part's raw bytes.  Parts this VM lacks (an irqchip or PIT it did
        not create) raise :class:`KvmStateError` before anything is read."""
        self._x86("reading the VM state")
        parts = tuple(_check.sequence("parts", parts))
        for part in parts:
            self._check_part(part)
        with self._lock:
            batch = self._get_batches.get(parts)
            if batch is None:
                batch = self._build_get_batch(parts)
                self._get_batches = {parts: batch}
            done, result = self._run_batch(batch)
            if done < len(batch):
                raise from_errno(-result, batch.names[done])
            out: dict[str, bytes] = {}
            for k, part in enumerate(parts):
                arg = batch.arg(k)
                if part == "clock":
                    out[part] = _abi.to_bytes(arg, "struct kvm_clock_data")
                elif part == "pit2":
                    out[part] = _abi.to_bytes(arg, "struct kvm_pit_state2")
                else:
                    out[part] = _irqchip_data(arg)
        return out

    def _build_get_batch(self, parts: tuple[str, ...]) -> IoctlBatch:
        entries: list[tuple[str, Any, int]] = []
        for part in parts:
            get, _ = VM_STATE_PARTS[part]
            if part == "clock":
                arg = ffi.new("struct kvm_clock_data *")
            elif part == "pit2":
                arg = ffi.new("struct kvm_pit_state2 *")
            else:
                arg = ffi.new("struct kvm_irqchip *")
                arg.chip_id = _CHIP_IDS[part]
            entries.append((get, arg, -1))
        if len(set(parts)) != len(parts):
            raise KvmInvalidArgumentError(f"a state part is named twice in {parts}")
        return IoctlBatch(entries)

    def _check_part(self, part: str) -> None:
        if part not in VM_STATE_PARTS:
            raise KvmInvalidArgumentError(f"no VM state part {part!r}; choose from "
                                          f"{', '.join(VM_STATE_PARTS)}")
        if part in _CHIP_IDS and not self._irqchip:
            raise KvmStateError(f"this VM has no in-kernel irqchip, so no {part} state")
        if part == "pit2" and not self._pit:
            raise KvmStateError("this VM has no in-kernel PIT, so no pit2 state")

    @staticmethod
    def prepare_state(parts: Sequence[tuple[str, bytes | ClockData]]) -> IoctlBatch:
        """Build, once, the writes of a VM state for :meth:`set_state`: ``(part, value)``
        pairs of :data:`VM_STATE_PARTS` in the order they are to be written; the clock is a
        :class:`ClockData` (set as :meth:`set_clock_data` without ``realtime`` does), the
        others raw bytes as :meth:`get_state` returns them.  Every length is checked here
        (:class:`KvmInvalidArgumentError`)."""
        if not IS_X86:
            raise KvmUnsupportedError("VM states exist only on x86_64")
        entries: list[tuple[str, Any, int]] = []
        payloads: list[bytes] = []
        seen: list[str] = []
        for part, value in _check.named_parts("parts", parts, VM_STATE_PARTS, "VM state part"):
            seen.append(part)
            _, setter = VM_STATE_PARTS[part]
            if part == "clock":
                arg = _clock_arg(_check.instance("clock", value, ClockData), False)
                raw = _abi.to_bytes(arg, "struct kvm_clock_data")
            else:
                raw = bytes(_check.buffer_bytes(part, value))
                if part == "pit2":
                    arg = _abi.from_bytes("struct kvm_pit_state2", raw)
                else:
                    arg = ffi.new("struct kvm_irqchip *")
                    arg.chip_id = _CHIP_IDS[part]
                    _fill_irqchip(arg, raw)
            entries.append((setter, arg, -1))
            payloads.append(raw)
        return IoctlBatch(entries, payloads, kind="vm", info={"parts": tuple(seen)})

    def set_state(self, batch: IoctlBatch) -> None:
        """Write a VM state prepared by :meth:`prepare_state`, in its order, in one native
        call.  Parts this VM lacks raise :class:`KvmStateError` before anything is written;
        the first ioctl that fails raises :class:`KvmError` naming it (the parts before it
        are written)."""
        self._x86("writing the VM state")
        self._check_state_batch(batch)
        done, result = self._run_batch(batch)
        if done < len(batch):
            raise from_errno(-result, batch.names[done])

    def _check_state_batch(self, batch: IoctlBatch) -> None:
        _check.instance("batch", batch, IoctlBatch)
        if batch.kind != "vm":
            raise KvmInvalidArgumentError("not a VM state write; build the batch with "
                                          "Vm.prepare_state")
        for part in batch.info["parts"]:
            self._check_part(part)

    @staticmethod
    def chain_states(vm_state: IoctlBatch, vcpu_states: Sequence[IoctlBatch]) -> IoctlBatch:
        """Join a VM's prepared state (:meth:`prepare_state`, possibly of no parts) and one
        prepared state per vCPU (:meth:`kvmio.Vcpu.prepare_state`) for :meth:`set_states`."""
        _check.instance("vm_state", vm_state, IoctlBatch)
        if vm_state.kind != "vm" or any(
                _check.instance("vcpu state", b, IoctlBatch).kind != "vcpu" for b in vcpu_states):
            raise KvmInvalidArgumentError("chain a VM state and vCPU states (prepare_state)")
        return IoctlBatch.chain([vm_state, *vcpu_states])

    def set_states(self, batch: IoctlBatch, vcpus: Sequence[Vcpu]) -> None:
        """Write this VM's state and its vCPUs', in that order, in one native call: ``batch``
        is :meth:`chain_states` of a VM state and one state per vCPU of ``vcpus`` (in the
        same order).  The same as ``self.state_writer(batch, vcpus).write()``."""
        self.state_writer(batch, vcpus).write()

    def state_writer(self, batch: IoctlBatch, vcpus: Sequence[Vcpu]) -> StateWriter:
        """Bind a chained state (:meth:`chain_states`) to this VM and ``vcpus``, checking
        once what :meth:`set_state` and :meth:`kvmio.Vcpu.set_state` check, so that
        :meth:`StateWriter.write` re-applies it (a reset) with little more than the ioctls."""
        self._x86("writing the machine state")
        return StateWriter(self, batch, vcpus)

    def _x86(self, what: str) -> None:
        if not IS_X86:
            raise KvmUnsupportedError(f"{what} exists only on x86_64")

    # -- dirty ring -------------------------------------------------------------------------

    @property
    def dirty_ring(self) -> DirtyRingConfig | None:
        """The enabled dirty ring, or ``None``."""
        return self._ring

    @property
    def ring_set(self) -> RingSet | None:
        """The rings' shared accounting (lock, resets, orphans), or ``None`` without a ring."""
        return self._ring_set

    def max_dirty_ring_entries(self) -> int:
        """The largest ring (in entries) this VM could enable; 0 if unsupported."""
        b = max(self.check_extension(Cap.DIRTY_LOG_RING_ACQ_REL),
                self.check_extension(Cap.DIRTY_LOG_RING))
        return b // DIRTY_GFN_SIZE

    def enable_dirty_ring(self, entries: int | None = None, *,
                          with_bitmap: bool | None = None) -> DirtyRingConfig:
        """Enable the dirty-log ring with ``entries`` entries per vCPU (default 4096).

        Uses KVM_CAP_DIRTY_LOG_RING_ACQ_REL where offered, else KVM_CAP_DIRTY_LOG_RING.  With
        ``with_bitmap=None`` the backup bitmap (KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) is turned on
        whenever the kernel offers it; ``True`` insists on it, ``False`` declines it.  Every rule
        is checked before the kernel is asked, and the error names the broken rule: the VM must
        have no vCPU yet (and no memory slot, for the bitmap), the ring must not be enabled
        already, ``entries`` must be a power of two, hold at least a page and more than the
        kernel's reserved entries, and fit the kernel's maximum.  If the backup bitmap fails
        after the ring was enabled, ``dirty_ring`` still reports the ring (vCPUs get it mapped)
        and the error says so.
        """
        with self._lock:
            self._check_open()
            if self._ring is not None:
                raise KvmStateError("the dirty ring is already enabled on this VM (rule: "
                                    "enable once)")
            if self._vcpus:
                raise KvmStateError("the dirty ring must be enabled before any vCPU is created")
            acq = self.check_extension(Cap.DIRTY_LOG_RING_ACQ_REL)
            legacy = self.check_extension(Cap.DIRTY_LOG_RING)
            if not acq and not legacy:
                raise KvmUnsupportedError("this kernel offers no dirty ring "
                                          "(KVM_CAP_DIRTY_LOG_RING[_ACQ_REL] is 0)")
            cap = Cap.DIRTY_LOG_RING_ACQ_REL if acq else Cap.DIRTY_LOG_RING
            max_bytes = acq or legacy
            if entries is None:
                entries = min(DEFAULT_RING_ENTRIES, max_bytes // DIRTY_GFN_SIZE)
            entries = _check.integer("entries", entries, lo=None)
            nbytes = entries * DIRTY_GFN_SIZE
            if entries <= 0 or entries & (entries - 1):
                raise KvmInvalidArgumentError(f"ring size {entries} entries is not a power of two")
            if nbytes < PAGE_SIZE:
                raise KvmInvalidArgumentError(
                    f"ring of {entries} entries ({nbytes} bytes) is smaller than a page "
                    f"({PAGE_SIZE} bytes, {PAGE_SIZE // DIRTY_GFN_SIZE} entries)")
            if entries <= RING_RESERVED_ENTRIES:
                raise KvmInvalidArgumentError(
                    f"ring of {entries} entries leaves nothing beyond the kernel's "
                    f"{RING_RESERVED_ENTRIES} reserved entries")
            if nbytes > max_bytes:
                raise KvmInvalidArgumentError(
                    f"ring of {entries} entries ({nbytes} bytes) exceeds this kernel's maximum "
                    f"of {max_bytes // DIRTY_GFN_SIZE} entries ({max_bytes} bytes)")
            bitmap_offered = self.check_extension(Cap.DIRTY_LOG_RING_WITH_BITMAP) > 0
            if with_bitmap and not bitmap_offered:
                raise KvmUnsupportedError("this kernel does not offer "
                                          "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP")
            want_bitmap = bitmap_offered if with_bitmap is None else with_bitmap
            if want_bitmap and cap != Cap.DIRTY_LOG_RING_ACQ_REL:
                raise KvmUnsupportedError("the backup bitmap needs KVM_CAP_DIRTY_LOG_RING_ACQ_REL")
            if want_bitmap and self._regions:
                raise KvmStateError(
                    "the dirty ring's backup bitmap must be enabled before any memory slot "
                    "exists; enable the ring first (or pass with_bitmap=False)")
            try:
                self.enable_cap(cap, nbytes)
            except KvmError as e:
                hint = ""
                if e.errno == errno.EINVAL and entries < 1024:
                    hint = (" (with Intel PML the kernel reserves 576 entries, so rings need at "
                            "least 1024 entries there)")
                raise DirtyRingError(
                    f"the kernel refused a ring of {entries} entries ({nbytes} bytes): {e}{hint}",
                    errno=e.errno, ioctl="KVM_ENABLE_CAP") from e
            self._ring = DirtyRingConfig(cap, entries, nbytes, cap == Cap.DIRTY_LOG_RING_ACQ_REL,
                                         False)
            self._ring_set = RingSet(entries, self._reset_ioctl)
            if want_bitmap:
                try:
                    self.enable_cap(Cap.DIRTY_LOG_RING_WITH_BITMAP)
                except KvmError as e:
                    raise DirtyRingError(
                        "the dirty ring is enabled, but the kernel refused its backup bitmap "
                        f"({e}); memory dirtied outside vCPU context will not be reported",
                        errno=e.errno, ioctl="KVM_ENABLE_CAP") from e
                self._ring = DirtyRingConfig(cap, entries, nbytes, True, True)
            return self._ring

    def _reset_ioctl(self) -> int:
        return self._ioctl(lib.KVM_RESET_DIRTY_RINGS, name="KVM_RESET_DIRTY_RINGS")

    def dirty_rings(self) -> dict[int, DirtyRing]:
        """Every open vCPU's ring by vCPU id (for inspection; harvest through the owner)."""
        return {} if self._ring_set is None else self._ring_set.rings

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: recycle every harvested entry of every vCPU's ring.

        Returns how many entries the kernel reset, and checks that this equals the entries
        harvested since the last reset (see :meth:`kvmio.dirty.ringset.RingSet.reset`).  The
        call is repeated until it returns 0, because a pending signal cuts it short without an
        error.  A mismatch raises :class:`DirtyRingOverrunError`.
        """
        if self._ring_set is None:
            self._check_open()
            raise KvmStateError("the dirty ring is not enabled on this VM")
        return self._ring_set.reset()

    def adopt_dirty_pages(self, pages: PageSet) -> None:
        """Hand over pages that were harvested and reset (or cleared) already but not reported
        to anyone: the next collection reports them.  A tracker that closes uses this, so
        nothing it collected is lost."""
        _check.instance("pages", pages, PageSet)
        with self._lock:
            self._unreported = self._unreported.union(pages)

    # -- claiming the dirty log -------------------------------------------------------------

    def claim_dirty_log(self, holder: str = "a dirty tracker") -> DirtyLogClaim:
        """Take exclusive use of the dirty log (bitmap mode), as a ring's owner has its ring:
        until :meth:`release_dirty_log`, :meth:`get_dirty_log`, :meth:`clear_dirty_log` and
        :meth:`collect_dirty_pages` refuse callers that do not pass the claim."""
        with self._lock:
            self._check_open()
            if self._claim is not None:
                raise KvmStateError(f"the dirty log is already claimed by {self._claim.holder}")
            self._claim = DirtyLogClaim(self.fd, holder)
            return self._claim

    def release_dirty_log(self, claim: DirtyLogClaim) -> None:
        """Give up a claim (idempotent for the claim's holder)."""
        with self._lock:
            if self._claim is claim:
                self._claim = None
                claim.released = True

    def _check_claim(self, claim: DirtyLogClaim | None) -> None:
        if claim is not None:
            _check.instance("claim", claim, DirtyLogClaim)
        if self._claim is not None and claim is not self._claim:
            raise KvmStateError(f"the dirty log is claimed by {self._claim.holder}; a second "
                                "consumer would take its pages. Collect through that owner")
        if claim is not None and claim is not self._claim:
            raise KvmStateError("this dirty-log claim was released")

    # -- collection -------------------------------------------------------------------------

    def collect_dirty_pages(self, *, final: bool = False, rings: Iterable[DirtyRing] | None = None,
                            claim: DirtyLogClaim | None = None,
                            on_overrun: OverrunPolicy = "raise") -> DirtyPages:
        """Harvest every vCPU's ring, reset the rings, and only then return the dirty pages.

        This is the safe order: page contents read after this call are at least as new as the
        report, and later writes are reported by the next collection.  Rings taken by a
        harvester (:meth:`kvmio.Vcpu.take_dirty_ring`) are collected only by that owner, which
        passes them as ``rings`` (then only those rings are harvested; the reset and the
        entries left by closed vCPUs are the VM's).  Entries of a running vCPU may still be in
        flight; for a complete final picture stop the vCPUs first and pass ``final=True``,
        which also collects the backup bitmap (WITH_BITMAP) last.

        A ring found overrun raises :class:`DirtyRingOverrunError` (what was harvested is kept
        for the next collection); with ``on_overrun="report"`` the collection completes and
        names the overrun rings in :attr:`DirtyPages.overruns` instead, for an owner that
        recovers them (see :class:`kvmio.tracker.DirtyTracker`).

        Without a dirty ring, this collects the bitmap of every dirty-logged slot instead (and
        clears it under manual protect); ``claim`` is the caller's
        :meth:`claim_dirty_log`, if the log is claimed.
        """
        if self._ring_set is None:
            return self._collect_bitmaps(claim)
        got = self._collect_rings(final, rings, on_overrun, None)
        assert got is not None
        return got

    def collect_and_restore(self, restore: PageRestore, *,
                            rings: Iterable[DirtyRing] | None = None,
                            claim: DirtyLogClaim | None = None) -> DirtyPages | None:
        """A checkpoint's reset in one native call where it can be: the same collection as
        ``collect_dirty_pages(final=True, rings=rings, claim=claim, on_overrun="report")``,
        which, when it is the clean common case, also copies back in the same call the
        stored page of every page collected and of every host-written page bound to
        ``restore`` (see :class:`kvmio._abi.PageRestore`, bound by the caller).  In bitmap
        mode the table must hold a bitmap for exactly the VM's dirty-logged slots, each of
        its slot's size (else this is ``collect_dirty_pages``).

        Returns ``None`` when it did (``restore`` says what), else the
        :class:`DirtyPages` collected, with nothing restored: all or nothing, the caller
        restores them itself.  Raises as :meth:`collect_dirty_pages` does."""
        _check.instance("restore", restore, PageRestore)
        if self._ring_set is None:
            return self._collect_and_restore_bitmaps(restore, claim)
        return self._collect_rings(True, rings, "report", restore)

    def _collect_and_restore_bitmaps(self, restore: PageRestore, claim: DirtyLogClaim | None
                                     ) -> DirtyPages | None:
        with self._lock:  # slots cannot change meanwhile
            self._check_claim(claim)
            regions = self.regions
            logged = sorted((slot, r.num_pages) for slot, r in regions.items() if r.log_dirty)
            entries = restore.bitmap_slots()
            if self._unreported or sorted((raw, n) for _, raw, n in entries) != logged:
                return self._collect_bitmaps(claim)
            def taken(fetched: int) -> PageSet:
                """The pages of the bitmaps the call took (table entries below ``fetched``)."""
                return PageSet().union(*(PageSet.from_bitmap(raw, restore.bitmap(k), n)
                                         for k, raw, n in entries if k < fetched))

            fd = self._acquire_fd()
            try:
                fetched, err, name = restore.collect_bitmaps(fd, self._manual_protect)
                if restore.done:
                    return None
                # Nothing restored: the bitmaps taken are the caller's pages (or, if a call
                # failed, kept for the next collection, as collect_dirty_pages keeps them).
                pages = taken(fetched)
            except BaseException:
                # Interrupted (Ctrl-C) after the kernel gave its bits: keep them, as
                # collect_dirty_pages does (a page reported twice is harmless, one lost not).
                self._unreported = taken(restore.fetched)
                raise
            finally:
                self._release_fd()
            if err:
                self._unreported = pages
                raise from_errno(err, name)
            return DirtyPages(pages, regions, 0, 0, harvested_at=time.monotonic())

    def _collect_rings(self, final: bool, rings: Iterable[DirtyRing] | None,
                       on_overrun: OverrunPolicy, restore: PageRestore | None
                       ) -> DirtyPages | None:
        """collect_dirty_pages() in ring mode; ``None`` when ``restore`` restored it all."""
        ring_set = self._ring_set
        assert ring_set is not None
        if rings is not None:
            rings = list(rings)
        with ring_set.lock:
            if not self._unreported and not (
                    final and self._ring is not None and self._ring.with_bitmap):
                # The common case in one native call (see RingSet.collect_quick); None when
                # some ring needs more than counting (or is taken): the general path below.
                # The fd stays open while we hold the ring set's lock: close() takes it.
                fd = self._fd
                if fd is None or self._fd_closing:
                    raise KvmClosedError("this Vm is closed")
                quick = ring_set.collect_quick(fd, on_overrun, rings, restore)
                if isinstance(quick, QuickHarvest):
                    return None if quick.restored else self._quick_pages(quick)
                if quick is not None:
                    return self._harvest_pages(quick, False)
            self._check_open()
            if rings is None:
                todo = ring_set.open_rings()
                for ring in todo:  # check every ring before harvesting any
                    if ring.taken:
                        raise KvmStateError(
                            f"the dirty ring of vCPU {ring.vcpu_id} is owned by a harvester; "
                            "collect through that owner instead")
            else:
                todo = [_check.instance("rings item", r, DirtyRing) for r in rings]
                for ring in todo:
                    if ring.ring_set is not ring_set:
                        raise KvmInvalidArgumentError(
                            f"the ring of vCPU {ring.vcpu_id} belongs to another VM")
            harvest = ring_set.harvest_and_reset(todo, on_overrun=on_overrun)
            return self._harvest_pages(
                harvest, final and self._ring is not None and self._ring.with_bitmap)

    def _quick_pages(self, quick: QuickHarvest) -> DirtyPages:
        """The result of a clean quick collection (nothing adopted or unreported)."""
        regions = dict(self._regions)
        if not quick.entries:
            return DirtyPages._make(_NO_PAGES, regions, 0, 0, {}, quick.time)
        sizes = self._slot_sizes
        by_slot = {}
        for (raw, p, _), last in zip(quick.groups, quick.lasts, strict=True):
            size = sizes.get(raw)  # None too for a raw id with address-space bits
            if size is None or last >= size:  # memory deleted since: count what drops
                pages, dropped = PageSet.from_groups(quick.groups, sizes, quick.entries_of)
                break
            by_slot[raw] = p
        else:
            pages, dropped = PageSet._of(by_slot), 0
        if len(quick.counts) == 1:
            per_vcpu = {quick.counts[0][0]: pages}
        else:
            per_vcpu = {vcpu: PageSet.from_entries(quick.entries_of(k), sizes)[0]
                        for k, (vcpu, _) in enumerate(quick.counts)}
        return DirtyPages._make(pages, regions, quick.entries, dropped, per_vcpu, quick.time,
                                quick.reset_ns)

    def _harvest_pages(self, harvest: Harvest, with_bitmap: bool) -> DirtyPages:
        """The result of a harvest and reset (under the ring set's lock)."""
        # From here on nothing may raise: the entries are harvested and reset already.
        regions = self.regions
        if not with_bitmap and not harvest.orphans and not self._unreported and not any(
                len(got) for _, got in harvest.rings):
            return DirtyPages(_NO_PAGES, regions, 0, 0, {}, harvest.overruns, harvest.time,
                              harvest.reset_ns)
        sizes = {slot: r.num_pages for slot, r in regions.items()}
        per_vcpu: dict[int, PageSet] = {}
        dropped = 0
        busy = [(ring, got) for ring, got in harvest.rings if len(got)]
        if harvest.groups is not None and not harvest.orphans and not self._unreported:
            # The compiled collection grouped every ring's entries already.
            pages, dropped = PageSet.from_groups(
                harvest.groups, sizes,
                busy[0][1] if len(busy) == 1 else DirtyEntries.concat([g for _, g in busy]))
            if len(busy) == 1:
                per_vcpu[busy[0][0].vcpu_id] = pages
            else:
                for ring, got in busy:
                    per_vcpu[ring.vcpu_id] = PageSet.from_entries(got, sizes)[0]
        else:
            for ring, got in busy:
                ps, d = PageSet.from_entries(got, sizes)
                per_vcpu[ring.vcpu_id] = ps
                dropped += d
            if len(per_vcpu) == 1 and not harvest.orphans and not self._unreported:
                pages = next(iter(per_vcpu.values()))  # one source: nothing to merge
            else:
                orphans, d = PageSet.from_entries(DirtyEntries.concat(harvest.orphans),
                                                  sizes)
                dropped += d
                with self._lock:
                    unreported, self._unreported = self._unreported, PageSet()
                unreported, _ = unreported.restrict(sizes)
                pages = orphans.union(unreported, *per_vcpu.values())
        if with_bitmap:
            return self._with_backup_bitmap(pages, regions, harvest, dropped, per_vcpu)
        return DirtyPages(pages, regions, harvest.entries, dropped, per_vcpu,
                          harvest.overruns, harvest.time, harvest.reset_ns)

    def _with_backup_bitmap(self, pages: PageSet, regions: dict[int, MemoryRegion],
                            harvest: Harvest, dropped: int,
                            per_vcpu: dict[int, PageSet]) -> DirtyPages:
        """The last step of a final collection with WITH_BITMAP: the backup bitmap of every
        dirty-logged slot, after the rings were harvested and reset."""
        extra: list[PageSet] = []
        try:
            for slot, r in regions.items():
                if r.log_dirty:
                    extra.append(self._get_log(slot, r.num_pages))
        except BaseException:
            # The rings were reset and the bitmaps read so far cleared by the kernel: keep all
            # of their pages for the next collection.
            self.adopt_dirty_pages(pages.union(*extra))
            raise
        return DirtyPages(pages.union(*extra), regions, harvest.entries, dropped, per_vcpu,
                          harvest.overruns, harvest.time, harvest.reset_ns)

    def _collect_bitmaps(self, claim: DirtyLogClaim | None) -> DirtyPages:
        with self._lock:  # slots cannot change during a bitmap collection
            self._check_claim(claim)
            unreported, self._unreported = self._unreported, PageSet()
            regions = self.regions
            unreported, dropped = unreported.restrict(
                {slot: r.num_pages for slot, r in regions.items()})
            parts = [unreported]
            try:
                for slot, r in regions.items():
                    if not r.log_dirty:
                        continue
                    got = self._get_log(slot, r.num_pages)
                    if self._manual_protect and got.count:
                        self._clear_pages(slot, r.num_pages, got[slot])
                    parts.append(got)
            except BaseException:
                self._unreported = PageSet().union(*parts)  # keep what was taken
                raise
            t = time.monotonic()
            return DirtyPages(PageSet().union(*parts), regions, 0, dropped, harvested_at=t)

    # -- dirty bitmap -----------------------------------------------------------------------

    def _tracked_region(self, slot: int) -> MemoryRegion:
        slot = _check.integer("slot", slot)
        region = self._regions.get(slot)
        if region is None:
            raise KvmInvalidArgumentError(f"no memory region in slot {slot}")
        if not region.flags & lib.KVM_MEM_LOG_DIRTY_PAGES:
            raise KvmInvalidArgumentError(
                f"slot {slot} was created without log_dirty=True; it has no dirty log")
        return region

    def enable_manual_dirty_log_protect(self, initially_set: bool = False) -> None:
        """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: GET_DIRTY_LOG no longer clears; pages are
        re-protected only by :meth:`clear_dirty_log`.  ``initially_set`` starts every page of a
        new slot as dirty (so the first pass copies everything without write faults)."""
        avail = self.check_extension(Cap.MANUAL_DIRTY_LOG_PROTECT2)
        if not avail:
            raise KvmUnsupportedError("this kernel lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
        flags = int(lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        if initially_set:
            if not avail & lib.KVM_DIRTY_LOG_INITIALLY_SET:
                raise KvmUnsupportedError("this kernel lacks KVM_DIRTY_LOG_INITIALLY_SET")
            flags |= int(lib.KVM_DIRTY_LOG_INITIALLY_SET)
        self.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, flags)
        self._manual_protect = True
        self._initially_set = initially_set

    @property
    def manual_dirty_log_protect(self) -> bool:
        """Whether manual protect is on (GET_DIRTY_LOG does not clear)."""
        return self._manual_protect

    def get_dirty_log(self, slot: int, *,
                      claim: DirtyLogClaim | None = None) -> npt.NDArray[np.uint64]:
        """KVM_GET_DIRTY_LOG: sorted indices of the slot's dirty pages.

        Without manual protect this also clears the log and write-protects the pages again.
        On a ring VM it works only with the backup bitmap (WITH_BITMAP); otherwise the kernel
        answers ENXIO and kvmio raises :class:`KvmStateError` saying so.  While the log is
        claimed (:meth:`claim_dirty_log`), only the claim's holder may call it.
        """
        with self._lock:
            self._check_claim(claim)
            region = self._tracked_region(slot)
            if self._ring is not None and not self._ring.with_bitmap:
                raise KvmStateError("KVM_GET_DIRTY_LOG is not available on a VM with the dirty "
                                    "ring unless the backup bitmap (WITH_BITMAP) is enabled")
            return self._get_log(region.slot, region.num_pages).get(
                region.slot, np.zeros(0, dtype=np.uint64))

    def _get_log(self, slot: int, num_pages: int) -> PageSet:
        words = np.zeros((num_pages + 63) // 64, dtype=np.uint64)
        fd = self._acquire_fd()
        try:
            _abi.get_dirty_log(fd, slot, words)
        finally:
            self._release_fd()
        return PageSet.from_bitmap(slot, words, num_pages)

    def clear_dirty_log(self, slot: int, first_page: int = 0, num_pages: int | None = None,
                        pages: npt.ArrayLike | None = None, *,
                        claim: DirtyLogClaim | None = None) -> None:
        """KVM_CLEAR_DIRTY_LOG (manual protect): clear and re-protect pages of a slot.

        Clears ``[first_page, first_page+num_pages)`` (default: to the end of the slot), or, if
        ``pages`` (integer page indices within the slot) is given, only those pages of that
        range.  ``first_page`` must be a multiple of 64, and so must ``num_pages`` unless the
        range ends at the end of the slot.
        """
        first_page = _check.integer("first_page", first_page, lo=None)
        if num_pages is not None:
            num_pages = _check.integer("num_pages", num_pages, lo=None)
        idx = None if pages is None else _check.index_array("pages", pages)
        with self._lock:
            self._check_claim(claim)
            region = self._tracked_region(slot)
            if not self._manual_protect:
                raise KvmStateError("KVM_CLEAR_DIRTY_LOG needs manual protect "
                                    "(enable_manual_dirty_log_protect())")
            total = region.num_pages
            if num_pages is None:
                num_pages = total - first_page
            if first_page < 0 or num_pages <= 0 or first_page + num_pages > total:
                raise KvmInvalidArgumentError(
                    f"page range {first_page}+{num_pages} is outside slot {slot} ({total} pages)")
            if first_page % 64:
                raise KvmInvalidArgumentError(f"first_page {first_page} is not a multiple of 64")
            if num_pages % 64 and first_page + num_pages != total:
                raise KvmInvalidArgumentError(
                    f"num_pages {num_pages} must be a multiple of 64 unless the range ends at the "
                    f"end of the slot (page {total})")
            if idx is not None and len(idx) and (idx.min() < first_page
                                                 or idx.max() >= first_page + num_pages):
                raise KvmInvalidArgumentError("pages lie outside the range being cleared")
            self._clear(region.slot, first_page, num_pages, idx)

    def _clear_pages(self, slot: int, total: int, pages: npt.NDArray[np.uint64]) -> None:
        self._clear(slot, 0, total, pages.astype(np.int64))

    def _clear(self, slot: int, first_page: int, num_pages: int,
               idx: npt.NDArray[np.int64] | None) -> None:
        bits = np.zeros(((num_pages + 63) // 64) * 64, dtype=np.uint8)
        if idx is None:
            bits[:num_pages] = 1
        else:
            bits[idx - first_page] = 1
        words = np.packbits(bits, bitorder="little").view(np.uint64).copy()
        fd = self._acquire_fd()
        try:
            _abi.clear_dirty_log(fd, slot, first_page, num_pages, words)
        finally:
            self._release_fd()


class StateWriter:
    """A VM's and its vCPUs' prepared states bound to them (from :meth:`Vm.state_writer`),
    checked once.  :meth:`write` writes them in one native call."""

    def __init__(self, vm: Vm, batch: IoctlBatch, vcpus: Sequence[Vcpu]):
        _check.instance("batch", batch, IoctlBatch)
        vcpus = [_check.instance("vcpu", v, Vcpu) for v in _check.sequence("vcpus", vcpus)]
        if batch.kind != "chain" or len(batch.parts) != len(vcpus) + 1:
            raise KvmInvalidArgumentError(f"batch must chain a VM state and {len(vcpus)} vCPU "
                                          "states (Vm.chain_states)")
        vm._check_state_batch(batch.parts[0])
        for v, b in zip(vcpus, batch.parts[1:], strict=True):
            v._check_state_batch(b)
        self.vm = vm
        self.vcpus: tuple[Vcpu, ...] = tuple(vcpus)
        self.batch = batch
        # (vCPU, its part, where the part starts) for the CPUID bookkeeping.
        self._cpuid = [(v, b, start) for v, b, start in
                       zip(vcpus, batch.parts[1:], batch.starts[1:], strict=True)
                       if b.info["cpuid"]]
        self._owners: tuple[FdOwner, ...] = (vm, *vcpus)

    def write(self) -> None:
        """Write the states, the VM's first: a vCPU's CPUID is skipped when it is the one
        installed (see :meth:`kvmio.Vcpu.set_state`), and the vCPUs are held outside
        ``run()`` meanwhile (one inside it raises :class:`KvmStateError`).  The first ioctl
        the kernel refuses raises :class:`~kvmio.errors.SnapshotError` naming the VM or the
        vCPU, with the ioctl and errno; the writes before it are done (the machine is partly
        written: write it again, or discard it)."""
        skip = tuple(start for v, b, start in self._cpuid if v._cpuid_skippable(b))
        held: list[Vcpu] = []
        fds: list[int] = []
        try:
            for v in self.vcpus:  # no run() may start while the state is half written
                v._hold()
                held.append(v)
            for o in self._owners:
                fds.append(o._acquire_fd())
            done, result = self.batch.run(fds, skip)
        finally:
            for o in self._owners[:len(fds)]:
                o._release_fd()
            for v in held:
                v._unhold()
        for v, b, start in self._cpuid:
            v._cpuid_written(b, (0,) if start in skip else (), done - start)
        if done < len(self.batch):
            raise self._error(done, result)

    def _error(self, done: int, result: int) -> SnapshotError:
        batch = self.batch
        part, k = batch.part_of(done)
        written = ["the VM", *(f"vCPU {v.id}" for v in self.vcpus)][:part]
        if part == 0:
            cause: KvmError = from_errno(-result, batch.names[done])
        else:
            cause = _vcpu_batch_error(batch.parts[part], k, result)
        vcpu = None if part == 0 else self.vcpus[part - 1].id
        where = "the VM" if vcpu is None else f"vCPU {vcpu}"
        return SnapshotError(
            f"writing the state of {where} failed at {cause.ioctl}: {cause.message}; "
            f"{', '.join(written) or 'nothing'} written before it: the machine is partly "
            "written (write it again, or discard it)", errno=cause.errno, ioctl=cause.ioctl,
            vcpu=vcpu)


def _irqchip_data(chip: Any) -> bytes:
    # Safety: the helper points into `chip`, which holds IRQCHIP_STATE_SIZE bytes there.
    return bytes(ffi.buffer(lib.kvmio_irqchip_data(chip), IRQCHIP_STATE_SIZE))


def _fill_irqchip(chip: Any, raw: bytes) -> None:
    if len(raw) != IRQCHIP_STATE_SIZE:
        raise KvmInvalidArgumentError(
            f"an irqchip state is {IRQCHIP_STATE_SIZE} bytes, not {len(raw)}")
    # Safety: exactly the size of the chip union the helper points to.
    ffi.memmove(lib.kvmio_irqchip_data(chip), raw, IRQCHIP_STATE_SIZE)


def _clock_data(cd: Any) -> ClockData:
    return ClockData(int(cd.clock), int(cd.flags), int(cd.realtime), int(cd.host_tsc))


def decode_clock(raw: bytes) -> ClockData:
    """The :class:`ClockData` of a raw ``struct kvm_clock_data`` (as :meth:`Vm.get_state`
    returns the ``clock`` part)."""
    return _clock_data(_abi.from_bytes("struct kvm_clock_data", raw))


def _clock_arg(data: ClockData, realtime: bool) -> Any:
    _check.instance("data", data, ClockData)
    cd = ffi.new("struct kvm_clock_data *")
    cd.clock = data.clock
    if realtime:
        if not data.flags & lib.KVM_CLOCK_REALTIME:
            raise KvmInvalidArgumentError("realtime=True needs a clock read with "
                                          "KVM_CLOCK_REALTIME in its flags")
        cd.flags = lib.KVM_CLOCK_REALTIME
        cd.realtime = data.realtime
    return cd


def _cap_name(cap: Cap | int) -> str:
    try:
        return Cap(cap).name
    except ValueError:
        return str(int(cap))


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
