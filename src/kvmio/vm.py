"""The VM file descriptor: :class:`Vm` (memory slots, vCPUs, capabilities, dirty tracking)."""

from __future__ import annotations

import contextlib
import errno
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from kvmio import _abi
from kvmio._abi import IS_X86, PAGE_SIZE, FdOwner, Mapping, ffi, ioctl, lib
from kvmio.caps import Cap
from kvmio.dirty.ring import DirtyEntries
from kvmio.errors import (
    DirtyRingError,
    DirtyRingOverrunError,
    KvmError,
    KvmInvalidArgumentError,
    KvmStateError,
    KvmUnsupportedError,
)
from kvmio.memory import MemoryRegion

if TYPE_CHECKING:
    from kvmio.dirty.ring import DirtyRing
    from kvmio.system import Kvm
    from kvmio.vcpu import Vcpu

#: Entries the kernel keeps in reserve at the end of every ring (without Intel PML; with PML it
#: reserves 512 more, which only the kernel knows: its refusal then names that rule).
RING_RESERVED_ENTRIES = 64
#: Bytes per ``struct kvm_dirty_gfn``.
DIRTY_GFN_SIZE = 16
#: Default ring size: 4096 entries (64 KiB), the size the kernel documentation recommends.
DEFAULT_RING_ENTRIES = 4096


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

    pages: dict[int, npt.NDArray[np.uint64]]
    regions: dict[int, MemoryRegion]
    entries: int
    #: Entries for memory that no longer exists (a slot deleted, or replaced by a smaller one,
    #: since the page was dirtied).
    dropped: int = 0

    @property
    def count(self) -> int:
        """Distinct dirty pages over all slots."""
        return sum(len(p) for p in self.pages.values())

    def gpas(self) -> npt.NDArray[np.uint64]:
        """Guest physical addresses of every dirty page, sorted."""
        parts = [self.regions[s].guest_phys_addr + p.astype(np.uint64) * np.uint64(PAGE_SIZE)
                 for s, p in self.pages.items() if len(p)]
        if not parts:
            return np.zeros(0, dtype=np.uint64)
        return np.sort(np.concatenate(parts)).astype(np.uint64)


class Vm(FdOwner):
    """A virtual machine (from :meth:`kvmio.Kvm.create_vm`).

    Closing it closes its vCPUs and unmaps its memory.
    """

    _what = "Vm"

    def __init__(self, fd: int, kvm: Kvm):
        super().__init__(fd)
        self.kvm = kvm
        self._kvm_path = kvm.path
        self._vcpu_mmap_size = kvm.get_vcpu_mmap_size()
        self._max_vcpus = kvm.get_max_vcpus()
        self._max_vcpu_id = kvm.check_extension(Cap.MAX_VCPU_ID) or self._max_vcpus
        self._max_memslots = kvm.get_nr_memslots()
        self._regions: dict[int, MemoryRegion] = {}
        self._vcpus: dict[int, Vcpu] = {}
        self._lock = threading.RLock()
        # Dirty ring state.  ``_ring_lock`` serialises every harvest with every
        # KVM_RESET_DIRTY_RINGS, so that "reset count == harvested count" is exact.
        self._ring: DirtyRingConfig | None = None
        self._ring_lock = threading.RLock()
        # Entries left in the rings of closed vCPUs, and their part of the next reset's count.
        self._orphans: list[DirtyEntries] = []
        self._orphan_pending = 0
        self._overrun_note: str | None = None
        self._manual_protect = False
        self._initially_set = False

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<Vm {state} slots={sorted(self._regions)} vcpus={sorted(self._vcpus)}>"

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close every vCPU, unmap every memory region, and close the VM fd (idempotent)."""
        with self._lock:
            for vcpu in list(self._vcpus.values()):
                vcpu.close()
            self._vcpus.clear()
            # Dirty-log ioctls run under the ring lock: wait for one in flight (e.g. a tracker's)
            # before the fd number can be reused.
            with self._ring_lock:
                if self._fd is not None:
                    self._close_fd()
            for region in self._regions.values():
                region._close()
            self._regions.clear()


    # -- capabilities -----------------------------------------------------------------------

    def check_extension(self, cap: Cap | int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (answers may differ from the system fd's)."""
        return ioctl(self.fd, lib.KVM_CHECK_EXTENSION, int(cap), name="KVM_CHECK_EXTENSION")

    def enable_cap(self, cap: Cap | int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM (every architecture): up to four u64 arguments.

        Raises :class:`KvmUnsupportedError` (errno EINVAL) if the kernel does not offer the
        capability, and :class:`KvmError` with the kernel's errno if it refuses the arguments.
        """
        if len(args) > 4:
            raise KvmInvalidArgumentError("KVM_ENABLE_CAP takes at most 4 arguments")
        ec = ffi.new("struct kvm_enable_cap *")
        ec.cap = int(cap)
        ec.flags = flags
        for i, a in enumerate(args):
            if not 0 <= a < 1 << 64:
                raise KvmInvalidArgumentError(f"KVM_ENABLE_CAP argument {a} is not a u64")
            ec.args[i] = a
        name = f"KVM_ENABLE_CAP({_cap_name(cap)})"
        try:
            ioctl(self.fd, lib.KVM_ENABLE_CAP, ec, name=name)
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
        return dict(self._regions)

    def add_memory_region(self, guest_phys_addr: int, size: int, *, slot: int | None = None,
                          log_dirty: bool = False, readonly: bool = False,
                          noreserve: bool = False) -> MemoryRegion:
        """Map anonymous memory and register it as a memory slot (KVM_SET_USER_MEMORY_REGION).

        ``log_dirty`` sets KVM_MEM_LOG_DIRTY_PAGES (needed for dirty tracking, bitmap or ring);
        ``readonly`` sets KVM_MEM_READONLY (guest writes become MMIO exits); ``noreserve`` maps
        with MAP_NORESERVE so that a guest far larger than host memory can be created (pages are
        allocated only when touched).  Raises :class:`KvmInvalidArgumentError` for a misaligned
        or empty range, an overlap with another slot, or a slot id in use.
        """
        with self._lock:
            fd = self.fd
            if size <= 0 or size % PAGE_SIZE:
                raise KvmInvalidArgumentError(
                    f"memory size {size:#x} must be a positive multiple of {PAGE_SIZE:#x}")
            if guest_phys_addr < 0 or guest_phys_addr % PAGE_SIZE:
                raise KvmInvalidArgumentError(
                    f"guest physical address {guest_phys_addr:#x} is not page aligned")
            if guest_phys_addr + size > 1 << 52:
                raise KvmInvalidArgumentError("guest range exceeds the 52-bit physical space")
            if slot is None:
                slot = next(i for i in range(self._max_memslots + 1) if i not in self._regions)
            if not 0 <= slot < min(self._max_memslots, 1 << 16):
                raise KvmInvalidArgumentError(
                    f"slot {slot} is out of range (this kernel has {self._max_memslots} slots)")
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
            mapping = Mapping(size, noreserve=noreserve, what=f"guest memory slot {slot}")
            try:
                self._set_region(fd, slot, flags, guest_phys_addr, size, mapping.address)
            except BaseException:
                mapping.close()
                raise
            region = MemoryRegion(slot, guest_phys_addr, size, flags, mapping)
            self._regions[slot] = region
            return region

    @staticmethod
    def _set_region(fd: int, slot: int, flags: int, gpa: int, size: int, addr: int) -> None:
        mr = ffi.new("struct kvm_userspace_memory_region *")
        mr.slot = slot
        mr.flags = flags
        mr.guest_phys_addr = gpa
        mr.memory_size = size
        mr.userspace_addr = addr
        ioctl(fd, lib.KVM_SET_USER_MEMORY_REGION, mr, name="KVM_SET_USER_MEMORY_REGION")

    def delete_memory_region(self, slot: int) -> None:
        """Remove a memory slot from the guest and unmap its memory."""
        with self._lock:
            fd = self.fd
            region = self._regions.get(slot)
            if region is None:
                raise KvmInvalidArgumentError(f"no memory region in slot {slot}")
            self._set_region(fd, slot, 0, region.guest_phys_addr, 0, 0)
            del self._regions[slot]
            region._close()

    def region_at(self, gpa: int, length: int = 1) -> MemoryRegion:
        """The memory region holding guest range ``[gpa, gpa+length)``."""
        for r in self._regions.values():
            if r.contains(gpa, length):
                return r
        raise KvmInvalidArgumentError(f"guest range {gpa:#x}+{length:#x} is not in one slot")

    def read_memory(self, gpa: int, length: int) -> bytes:
        """Copy guest memory (within one slot)."""
        return self.region_at(gpa, max(length, 1)).read(gpa, length)

    def write_memory(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest memory (within one slot).  Host writes are not dirty-logged."""
        self.region_at(gpa, max(len(data), 1)).write(gpa, data)

    # -- vCPUs ------------------------------------------------------------------------------

    @property
    def vcpus(self) -> dict[int, Vcpu]:
        """vCPUs by id (a copy)."""
        return dict(self._vcpus)

    def create_vcpu(self, vcpu_id: int | None = None) -> Vcpu:
        """KVM_CREATE_VCPU.  With the dirty ring enabled, the vCPU's ring is mapped here."""
        from kvmio.dirty.ring import DirtyRing
        from kvmio.vcpu import Vcpu

        with self._lock:
            fd = self.fd
            if vcpu_id is None:
                vcpu_id = len(self._vcpus)
                while vcpu_id in self._vcpus:
                    vcpu_id += 1
            if not 0 <= vcpu_id < max(self._max_vcpu_id, 1):
                raise KvmInvalidArgumentError(
                    f"vCPU id {vcpu_id} is out of range (ids below {self._max_vcpu_id})")
            if vcpu_id in self._vcpus:
                raise KvmInvalidArgumentError(f"vCPU {vcpu_id} already exists")
            if len(self._vcpus) >= self._max_vcpus:
                raise KvmInvalidArgumentError(
                    f"this VM already has the maximum of {self._max_vcpus} vCPUs")
            vfd = ioctl(fd, lib.KVM_CREATE_VCPU, vcpu_id, name="KVM_CREATE_VCPU")
            try:
                run = Mapping(self._vcpu_mmap_size, fd=vfd, shared=True,
                              what=f"kvm_run of vCPU {vcpu_id}")
            except BaseException:
                _close_quietly(vfd)
                raise
            ring: DirtyRing | None = None
            if self._ring is not None:
                try:
                    ring = DirtyRing(self, vcpu_id, vfd, self._ring.entries)
                except BaseException:
                    run.close()
                    _close_quietly(vfd)
                    raise
            vcpu = Vcpu(self, vcpu_id, vfd, run, ring)
            self._vcpus[vcpu_id] = vcpu
            return vcpu

    def _forget_vcpu(self, vcpu_id: int) -> None:
        with self._lock:
            self._vcpus.pop(vcpu_id, None)

    # -- x86 platform -----------------------------------------------------------------------

    def set_tss_address(self, addr: int = 0xFFFBD000) -> None:
        """KVM_SET_TSS_ADDR (x86, Intel): three pages of guest physical space KVM may use."""
        self._x86("KVM_SET_TSS_ADDR")
        ioctl(self.fd, lib.KVM_SET_TSS_ADDR, addr, name="KVM_SET_TSS_ADDR")

    def set_identity_map_address(self, addr: int = 0xFFFBC000) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR (x86, Intel): one page KVM may use for real mode."""
        self._x86("KVM_SET_IDENTITY_MAP_ADDR")
        p = ffi.new("uint64_t *", addr)
        ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, p, name="KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: the in-kernel interrupt controller (PIC + IOAPIC on x86)."""
        ioctl(self.fd, lib.KVM_CREATE_IRQCHIP, name="KVM_CREATE_IRQCHIP")

    def create_pit2(self, speaker_dummy: bool = True) -> None:
        """KVM_CREATE_PIT2 (x86): the in-kernel i8254 timer (needs an irqchip)."""
        self._x86("KVM_CREATE_PIT2")
        cfg = ffi.new("struct kvm_pit_config *")
        cfg.flags = lib.KVM_PIT_SPEAKER_DUMMY if speaker_dummy else 0
        ioctl(self.fd, lib.KVM_CREATE_PIT2, cfg, name="KVM_CREATE_PIT2")

    def set_irq_line(self, irq: int, level: bool) -> None:
        """KVM_IRQ_LINE: raise or lower an interrupt line of the in-kernel irqchip."""
        il = ffi.new("struct kvm_irq_level *")
        il.irq = irq
        il.level = 1 if level else 0
        ioctl(self.fd, lib.KVM_IRQ_LINE, il, name="KVM_IRQ_LINE")

    def get_clock(self) -> int:
        """KVM_GET_CLOCK: the guest's kvmclock time in nanoseconds."""
        cd = ffi.new("struct kvm_clock_data *")
        ioctl(self.fd, lib.KVM_GET_CLOCK, cd, name="KVM_GET_CLOCK")
        return int(cd.clock)

    def set_clock(self, ns: int) -> None:
        """KVM_SET_CLOCK: set the guest's kvmclock time in nanoseconds."""
        cd = ffi.new("struct kvm_clock_data *")
        cd.clock = ns
        ioctl(self.fd, lib.KVM_SET_CLOCK, cd, name="KVM_SET_CLOCK")

    def _x86(self, what: str) -> None:
        if not IS_X86:
            raise KvmUnsupportedError(f"{what} exists only on x86_64")

    # -- dirty ring -------------------------------------------------------------------------

    @property
    def dirty_ring(self) -> DirtyRingConfig | None:
        """The enabled dirty ring, or ``None``."""
        return self._ring

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
            fd = self.fd
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
            if isinstance(entries, bool) or not isinstance(entries, int):
                raise KvmInvalidArgumentError(f"ring entries must be an int, not {entries!r}")
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
            if want_bitmap:
                try:
                    self.enable_cap(Cap.DIRTY_LOG_RING_WITH_BITMAP)
                except KvmError as e:
                    raise DirtyRingError(
                        "the dirty ring is enabled, but the kernel refused its backup bitmap "
                        f"({e}); memory dirtied outside vCPU context will not be reported",
                        errno=e.errno, ioctl="KVM_ENABLE_CAP") from e
                self._ring = DirtyRingConfig(cap, entries, nbytes, True, True)
            _ = fd
            return self._ring

    def _adopt_orphans(self, entries: DirtyEntries, pending: int) -> None:
        """Take over what a closing vCPU's ring still held (see DirtyRing._close)."""
        with self._ring_lock:
            if len(entries):
                self._orphans.append(entries)
            self._orphan_pending += pending

    def _note_overrun(self, vcpu_id: int) -> None:
        with self._ring_lock:
            self._overrun_note = (f"the dirty ring of vCPU {vcpu_id} was overrun when the vCPU "
                                  "closed")

    def _harvest_and_reset(self, rings: list[DirtyRing]
                           ) -> tuple[list[tuple[DirtyRing, DirtyEntries]], list[DirtyEntries]]:
        """Harvest every open ring of ``rings`` and take the orphans, then reset: one
        transaction under the ring lock.  If anything fails, everything harvested is handed
        back (to its ring, or to the orphans) for the next collection, and the error raised.
        Returns ``[(ring, entries)]`` and the orphans."""
        with self._ring_lock:
            harvested: list[tuple[DirtyRing, DirtyEntries]] = []
            orphans = self._take_orphans()
            try:
                for ring in rings:
                    if not ring.closed:  # a closed ring gave its entries to the orphans
                        harvested.append((ring, ring.harvest()))
                self.reset_dirty_rings()
            except BaseException:
                for ring, got in harvested:
                    ring._restash(got)
                self._return_orphans(orphans)
                raise
            return harvested, orphans

    def _take_orphans(self) -> list[DirtyEntries]:
        with self._ring_lock:
            out, self._orphans = self._orphans, []
            return out

    def _return_orphans(self, orphans: list[DirtyEntries]) -> None:
        """Give back orphans taken by a collection that then failed (they come first)."""
        with self._ring_lock:
            self._orphans[:0] = orphans

    def dirty_rings(self) -> dict[int, DirtyRing]:
        """Every vCPU's ring by vCPU id (for inspection; harvest through the owner)."""
        out = {}
        for vid, vcpu in dict(self._vcpus).items():
            r = vcpu._ring
            if r is not None:
                out[vid] = r
        return out

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: recycle every harvested entry of every vCPU's ring.

        Returns how many entries the kernel reset, and checks that this equals the entries
        harvested since the last reset.  The call is repeated until it returns 0, because a
        pending signal cuts it short without an error.  A mismatch raises
        :class:`DirtyRingOverrunError`.
        """
        with self._ring_lock:
            fd = self.fd
            if self._ring is None:
                raise KvmStateError("the dirty ring is not enabled on this VM")
            rings = list(self.dirty_rings().values())
            expected = sum(r._pending_reset for r in rings) + self._orphan_pending
            total = 0
            try:
                for _ in range(1 << 20):
                    n = ioctl(fd, lib.KVM_RESET_DIRTY_RINGS, name="KVM_RESET_DIRTY_RINGS")
                    if n == 0:
                        break
                    total += n
            finally:
                # Whatever the kernel reset is no longer pending, even if a later call failed.
                left = total
                take = min(left, self._orphan_pending)
                self._orphan_pending -= take
                left -= take
                for r in rings:
                    take = min(left, r._pending_reset)
                    r._pending_reset -= take
                    left -= take
            # Matched or not, the kernel has now reset everything it could: start afresh.
            self._orphan_pending = 0
            for r in rings:
                r._pending_reset = 0
            if total != expected:
                raise DirtyRingOverrunError(
                    f"KVM_RESET_DIRTY_RINGS reset {total} entries but {expected} were harvested "
                    "since the last reset: the ring's state is inconsistent and dirty pages may "
                    "have been lost; treat the tracked slots as wholly dirty, and use a bigger "
                    "ring or bitmap mode", lost=abs(expected - total))
            note, self._overrun_note = self._overrun_note, None
            if note is not None:
                raise DirtyRingOverrunError(
                    f"{note}: dirty pages may have been lost; treat the tracked slots as wholly "
                    "dirty and resynchronise them")
            return total

    def collect_dirty_pages(self, *, final: bool = False) -> DirtyPages:
        """Harvest every vCPU's ring, reset the rings, and only then return the dirty pages.

        This is the safe order: page contents read after this call are at least as new as the
        report, and later writes are reported by the next collection.  Rings taken by a
        harvester (:meth:`kvmio.Vcpu.take_dirty_ring`) cannot be collected here.  Entries of a
        running vCPU may still be in flight; for a complete final picture stop the vCPUs first
        and pass ``final=True``, which also collects the backup bitmap (WITH_BITMAP) last.

        Without a dirty ring, this collects the bitmap of every dirty-logged slot instead.
        """
        if self._ring is None:
            return self._collect_bitmaps()
        with self._ring_lock:
            vcpus = list(dict(self._vcpus).values())
            for vcpu in vcpus:  # check every ring before harvesting any
                if vcpu._ring is not None and vcpu._ring_taken:
                    raise KvmStateError(
                        f"the dirty ring of vCPU {vcpu.id} is owned by a harvester; collect "
                        "through that owner instead")
            harvested, orphans = self._harvest_and_reset(
                [v._ring for v in vcpus if v._ring is not None])
            parts = orphans + [got for _, got in harvested]
            all_entries = DirtyEntries.concat(parts)
            merged, dropped = _merge_entries(all_entries, self._regions)
            if final and self._ring.with_bitmap:
                for sid, region in self._regions.items():
                    if region.log_dirty:
                        extra = self.get_dirty_log(sid)
                        if len(extra):
                            merged[sid] = np.union1d(merged.get(sid, extra), extra)
            return DirtyPages(merged, dict(self._regions), len(all_entries), dropped)

    # -- dirty bitmap -----------------------------------------------------------------------

    def _tracked_region(self, slot: int) -> MemoryRegion:
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

    def get_dirty_log(self, slot: int) -> npt.NDArray[np.uint64]:
        """KVM_GET_DIRTY_LOG: sorted indices of the slot's dirty pages.

        Without manual protect this also clears the log and write-protects the pages again.
        On a ring VM it works only with the backup bitmap (WITH_BITMAP); otherwise the kernel
        answers ENXIO and kvmio raises :class:`KvmStateError` saying so.
        """
        region = self._tracked_region(slot)
        if self._ring is not None and not self._ring.with_bitmap:
            raise KvmStateError("KVM_GET_DIRTY_LOG is not available on a VM with the dirty ring "
                                "unless the backup bitmap (WITH_BITMAP) is enabled")
        words = np.zeros((region.num_pages + 63) // 64, dtype=np.uint64)
        with self._ring_lock:  # Vm.close() waits for it
            _abi.get_dirty_log(self.fd, slot, words)
        return bitmap_to_pages(words, region.num_pages)

    def clear_dirty_log(self, slot: int, first_page: int = 0, num_pages: int | None = None,
                        pages: npt.ArrayLike | None = None) -> None:
        """KVM_CLEAR_DIRTY_LOG (manual protect): clear and re-protect pages of a slot.

        Clears ``[first_page, first_page+num_pages)`` (default: to the end of the slot), or, if
        ``pages`` (page indices within the slot) is given, only those pages of that range.
        ``first_page`` must be a multiple of 64, and so must ``num_pages`` unless the range ends
        at the end of the slot.
        """
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
        bits = np.zeros(((num_pages + 63) // 64) * 64, dtype=np.uint8)
        if pages is None:
            bits[:num_pages] = 1
        else:
            idx = np.asarray(pages, dtype=np.int64).ravel()
            if len(idx) and (idx.min() < first_page or idx.max() >= first_page + num_pages):
                raise KvmInvalidArgumentError("pages lie outside the range being cleared")
            bits[idx - first_page] = 1
        words = np.packbits(bits, bitorder="little").view(np.uint64).copy()
        with self._ring_lock:  # Vm.close() waits for it
            _abi.clear_dirty_log(self.fd, slot, first_page, num_pages, words)

    def _collect_bitmaps(self) -> DirtyPages:
        orphans = self._take_orphans()  # e.g. pages a closed tracker had collected
        merged, dropped = _merge_entries(DirtyEntries.concat(orphans), self._regions)
        for sid, region in self._regions.items():
            if region.log_dirty:
                got = self.get_dirty_log(sid)
                if self._manual_protect and len(got):
                    self.clear_dirty_log(sid, 0, region.num_pages, got)
                if sid in merged:
                    got = np.union1d(merged[sid], got).astype(np.uint64)
                merged[sid] = got
        return DirtyPages(merged, dict(self._regions), 0, dropped)


def bitmap_to_pages(words: npt.NDArray[np.uint64], num_pages: int) -> npt.NDArray[np.uint64]:
    """Sorted indices of the set bits of a little-endian u64 bitmap (bit 0 = page 0).

    Only non-zero words are unpacked, so a sparse bitmap of a huge slot costs a scan of its
    words, not one byte per page.
    """
    nz = np.flatnonzero(words)
    if len(nz) == 0:
        return np.zeros(0, dtype=np.uint64)
    bits = np.unpackbits(words[nz].view(np.uint8), bitorder="little").reshape(-1, 64)
    row, col = np.nonzero(bits)
    pages = nz[row].astype(np.uint64) * np.uint64(64) + col.astype(np.uint64)
    return pages[pages < np.uint64(num_pages)]


def _merge_entries(entries: DirtyEntries, regions: dict[int, MemoryRegion]
                   ) -> tuple[dict[int, npt.NDArray[np.uint64]], int]:
    """Distinct sorted page offsets per slot id from harvested entries, and how many entries
    named a slot (or a page of it) that no longer exists, or an address space kvmio never maps.
    Runs after the reset, so it never raises."""
    out: dict[int, npt.NDArray[np.uint64]] = {}
    dropped = 0
    for sid, pages in entries.distinct_pages().items():
        region = regions.get(sid.slot)
        if sid.address_space != 0 or region is None:
            dropped += int(np.count_nonzero(entries.slots == sid.encode()))
            continue
        inside = pages < np.uint64(region.num_pages)  # beyond: a deleted, smaller successor
        if not inside.all():
            sel = (entries.slots == sid.encode()) & (entries.offsets >= region.num_pages)
            dropped += int(np.count_nonzero(sel))
            pages = pages[inside]
        if len(pages):
            out[sid.slot] = pages
    return out, dropped


def _cap_name(cap: Cap | int) -> str:
    try:
        return Cap(cap).name
    except ValueError:
        return str(int(cap))


def _close_quietly(fd: int) -> None:
    import os

    with contextlib.suppress(OSError):
        os.close(fd)
