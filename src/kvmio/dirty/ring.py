"""The dirty-log ring of one vCPU: harvesting with acquire/release ordering, in compiled code.

Life of an entry (Documentation/virt/kvm/api.rst): free (0) -> dirty (1, written by KVM) ->
harvested (2, RESET, written here) -> free again (by KVM_RESET_DIRTY_RINGS).  :meth:`harvest`
takes entries in ring order, never skipping one, and resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from collections.abc import Mapping as Mapping_
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from kvmio._abi import PAGE_SIZE, Mapping, ffi, lib
from kvmio.errors import (
    DirtyRingError,
    DirtyRingOverrunError,
    KvmClosedError,
    KvmInvalidArgumentError,
    KvmStateError,
)
from kvmio.memory import MemoryRegion, SlotId

if TYPE_CHECKING:
    from kvmio.dirty.ringset import RingSet

#: What a harvest does when it finds the ring overrun: raise DirtyRingOverrunError, or report
#: it (noted on the ring) and return what it took.
OverrunPolicy = Literal["raise", "report"]

#: Bytes per ``struct kvm_dirty_gfn`` (from the C compiler).
GFN_SIZE: int = ffi.sizeof("struct kvm_dirty_gfn")

#: numpy dtype of ``struct kvm_dirty_gfn`` (checked against the C layout by the layout test).
GFN_DTYPE = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])
#: Why a harvest stopped.
STOP_EMPTY = int(lib.KVMIO_RING_STOP_EMPTY)
STOP_LIMIT = int(lib.KVMIO_RING_STOP_LIMIT)
STOP_HOLE = int(lib.KVMIO_RING_STOP_HOLE)
#: The bits of a harvest's stop value that say why it stopped (one of the three above).
STOP_MASK = int(lib.KVMIO_RING_STOP_MASK)
#: Flag in a harvest's stop value: the entry just before the index was dirty, so the kernel
#: had published a whole ring (or more) past the index: a full ring at best, an overrun at
#: worst.  Checked in O(1) at the start of every harvest, limited or not.
STOP_LAPPED = int(lib.KVMIO_RING_LAPPED)
#: Entries the kernel may keep in reserve beyond the soft limit on any host (64, plus 512 with
#: Intel PML): a stuck ring is advanced by at most ``size - this`` entries at a time.
MAX_RESERVED_ENTRIES = 576

_EMPTY_SLOTS = np.zeros(0, dtype=np.uint32)
_EMPTY_OFFSETS = np.zeros(0, dtype=np.uint64)
_EMPTY_SLOTS.setflags(write=False)
_EMPTY_OFFSETS.setflags(write=False)


def sorted_unique(a: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """``np.unique`` by sorting (faster than numpy 2's hash-based unique for page lists)."""
    s = np.sort(a)
    if len(s) < 2:
        return s
    keep = np.empty(len(s), dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


@dataclass(frozen=True)
class DirtyEntries:
    """Harvested ring entries in ring order: raw ``slot`` values and page ``offsets``.

    Entries may repeat a page (each guest write can push its own entry).
    """

    slots: npt.NDArray[np.uint32]
    offsets: npt.NDArray[np.uint64]

    def __len__(self) -> int:
        return len(self.slots)

    def __iter__(self) -> Iterator[tuple[SlotId, int]]:
        for s, o in zip(self.slots.tolist(), self.offsets.tolist(), strict=True):
            yield SlotId.decode(s), o

    @staticmethod
    def concat(parts: list[DirtyEntries]) -> DirtyEntries:
        """Entries of several harvests, in order."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return DirtyEntries(_EMPTY_SLOTS, _EMPTY_OFFSETS)
        if len(parts) == 1:
            return parts[0]
        return DirtyEntries(np.concatenate([p.slots for p in parts]),
                            np.concatenate([p.offsets for p in parts]))

    def gpas(self, regions: Mapping_[int, MemoryRegion]) -> npt.NDArray[np.uint64]:
        """Guest physical address of each entry's page (``regions``: ``Vm.regions``).

        Raises :class:`DirtyRingError` for an entry naming an unknown slot or address space.
        """
        out = np.empty(len(self.slots), dtype=np.uint64)
        for raw in np.unique(self.slots).tolist():
            sid = SlotId.decode(raw)
            region = regions.get(sid.slot)
            if sid.address_space != 0 or region is None:
                raise DirtyRingError(f"ring entry names unknown memory slot {sid}")
            sel = self.slots == raw
            out[sel] = np.uint64(region.guest_phys_addr) + self.offsets[sel] * np.uint64(PAGE_SIZE)
        return out

    def copy(self) -> DirtyEntries:
        """A copy that owns its memory."""
        return DirtyEntries(self.slots.copy(), self.offsets.copy())

    def distinct_pages(self) -> dict[SlotId, npt.NDArray[np.uint64]]:
        """Sorted distinct page offsets per slot."""
        return {SlotId.decode(raw): pages for raw, pages, _ in self.slot_groups()}

    def slot_groups(self) -> list[tuple[int, npt.NDArray[np.uint64], int]]:
        """``(raw slot, sorted distinct offsets, entries)`` per slot, in order of first
        appearance, in compiled code (already sorted runs are detected and not sorted again;
        others are radix-sorted).  The offsets are read-only views of one array per call."""
        n = len(self.slots)
        if n == 0:
            return []
        return _dedup(self.slots, self.offsets, n)


_NO_ENTRIES = DirtyEntries(_EMPTY_SLOTS, _EMPTY_OFFSETS)

#: Up to this many entries, page arrays are allocated fresh (cheap when small); beyond, they
#: come from a per-thread pool of prefaulted buffers reused once the caller dropped them.
_POOL_FROM = 4096
_MAX_GROUPS = int(lib.KVMIO_DEDUP_MAX_GROUPS)


class _DedupBuffers(threading.local):
    """Per-thread working memory of the dedup: group arrays, and page and scratch buffers."""

    def __init__(self) -> None:
        self.groups = ffi.new("uint32_t[]", 4 * _MAX_GROUPS)
        self.gslot = self.groups
        self.gstart = self.groups + _MAX_GROUPS
        self.glen = self.groups + 2 * _MAX_GROUPS
        self.gentries = self.groups + 3 * _MAX_GROUPS
        self.scratch = np.zeros(0, dtype=np.uint64)
        self.pool: _OutputPool | None = None

    def buffers(self, n: int) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
        """A page buffer that nobody else holds and a scratch buffer, ``n`` items at least:
        for few entries a fresh page array and a scratch array kept here; for many, a pair
        from an output pool of prefaulted buffers (reused once the caller dropped the pages)."""
        if n < _POOL_FROM:
            if len(self.scratch) < n:
                self.scratch = np.zeros(max(n, 2 * len(self.scratch)), dtype=np.uint64)
            return np.empty(n, dtype=np.uint64), self.scratch
        if self.pool is None or self.pool.size < n:
            self.pool = _OutputPool(max(n, 65536), np.uint64)
        return self.pool.get()


_dedup_buffers = _DedupBuffers()


def _dedup(slots: npt.NDArray[np.uint32], offsets: npt.NDArray[np.uint64], n: int
           ) -> list[tuple[int, npt.NDArray[np.uint64], int]]:
    b = _dedup_buffers
    pages, scratch = b.buffers(n)
    if slots.dtype != np.uint32 or not slots.flags.c_contiguous:
        slots = np.ascontiguousarray(slots, dtype=np.uint32)
    if offsets.dtype != np.uint64 or not offsets.flags.c_contiguous:
        offsets = np.ascontiguousarray(offsets, dtype=np.uint64)
    ps = ffi.from_buffer("uint32_t[]", slots)
    po = ffi.from_buffer("uint64_t[]", offsets)
    pp = ffi.from_buffer("uint64_t[]", pages, require_writable=True)
    pt = ffi.from_buffer("uint64_t[]", scratch, require_writable=True)
    try:
        # Safety: every buffer is pinned by from_buffer for the call and holds n items (the
        # pools give at least n); the group arrays hold KVMIO_DEDUP_MAX_GROUPS each.
        groups = int(lib.kvmio_dedup(ps, po, n, pp, pt, b.gslot, b.gstart, b.glen,
                                     b.gentries))
    finally:
        ffi.release(ps)
        ffi.release(po)
        ffi.release(pp)
        ffi.release(pt)
    if groups < 0:  # more slots than the native grouping holds: group with numpy
        out = []
        for raw in np.unique(slots).tolist():
            sel = offsets[slots == raw]
            one = _dedup(np.full(len(sel), raw, dtype=np.uint32), sel, len(sel))
            out.append(one[0])
        return out
    out = []
    for g in range(groups):
        start = int(b.gstart[g])
        view = pages[start:start + int(b.glen[g])]
        view.flags.writeable = False
        out.append((int(b.gslot[g]), view, int(b.gentries[g])))
    return out

_GIL = getattr(sys, "_is_gil_enabled", lambda: True)()


class _OutputPool:
    """Reusable output arrays for harvests, so that a steady harvest loop neither allocates nor
    page-faults (a fresh 768 KiB array costs ~200 page faults, ~1 us each on this host).

    A pair is reused only when nothing but the pool refers to it: every numpy view of an array
    (however derived) keeps a reference to it, so its reference count tells.  Two pairs let
    ``got = ring.harvest()`` reuse the pair the previous result does not hold.  (Code that keeps
    only a raw address of a result, e.g. ``arr.ctypes.data``, must keep the array too.)  On a
    free-threaded Python, reference counts prove nothing, and fresh arrays are used instead.
    """

    def __init__(self, size: int, first: type[np.unsignedinteger[Any]] = np.uint32):
        self.size = size
        self._first = first  # the first array's type (slots; or uint64 for pages + scratch)
        self._pairs: list[tuple[npt.NDArray[Any], npt.NDArray[np.uint64]]] = []
        # C pointers to each pair's data, made once: plain addresses that hold no reference,
        # so they do not disturb the reference counts; valid while the pair lives, and a pair
        # is handed out only together with its pointers.
        self._ptrs: list[tuple[Any, Any, Any]] = []
        self._baseline = -1

    @staticmethod
    def _pointers(pair: tuple[npt.NDArray[Any], npt.NDArray[np.uint64]]) -> tuple[Any, Any, Any]:
        """C pointers to the pair's data, and a cffi buffer over the first array's bytes
        (slicing it copies out without a numpy call).  Safety: they hold no reference to the
        arrays; they are handed out only with the pair, which the caller keeps referenced
        while it uses them."""
        first = "uint64_t *" if pair[0].dtype == np.uint64 else "uint32_t *"
        p0 = ffi.cast(first, pair[0].ctypes.data)
        return p0, ffi.cast("uint64_t *", pair[1].ctypes.data), ffi.buffer(p0, pair[0].nbytes)

    def get_raw(self) -> tuple[npt.NDArray[Any], npt.NDArray[np.uint64], Any, Any]:
        """A free pair and C pointers to its data (``size`` items each).  The caller keeps the
        pair referenced for as long as it uses the pointers."""
        if not _GIL:
            pair = self.get()
            return (*pair, *self._pointers(pair)[:2])
        k = self._free()
        return (*self._pairs[k], *self._ptrs[k][:2])

    def get_raw_bytes(self) -> tuple[npt.NDArray[Any], npt.NDArray[np.uint64], Any, Any, Any]:
        """As :meth:`get_raw`, plus a cffi buffer over the first array's bytes."""
        if not _GIL:
            pair = self.get()
            return (*pair, *self._pointers(pair))
        k = self._free()
        return (*self._pairs[k], *self._ptrs[k])

    def _refs(self, k: int) -> tuple[int, int]:
        # The same expression is used to calibrate and to check, so the temporary references
        # it creates cancel out.
        return sys.getrefcount(self._pairs[k][0]), sys.getrefcount(self._pairs[k][1])

    def get(self) -> tuple[npt.NDArray[Any], npt.NDArray[np.uint64]]:
        """A free pair (``size`` items each)."""
        if not _GIL:  # reference counts are no proof of ownership without the GIL
            return np.empty(self.size, dtype=self._first), np.empty(self.size, dtype=np.uint64)
        return self._pairs[self._free()]

    def _free(self) -> int:
        """The index of a pair nothing but the pool refers to, allocating one if none is."""
        baseline = self._baseline
        for k in range(len(self._pairs)):
            if self._refs(k) == (baseline, baseline):
                return k
        pair = (np.empty(self.size, dtype=self._first), np.empty(self.size, dtype=np.uint64))
        pair[0].fill(0)  # fault the pages in now, once (np.zeros would leave them untouched)
        pair[1].fill(0)
        if len(self._pairs) >= 2:
            self._pairs.pop(0)  # held by the caller now; the pool forgets it
            self._ptrs.pop(0)
        self._pairs.append(pair)
        self._ptrs.append(self._pointers(pair))
        del pair
        self._baseline = self._refs(len(self._pairs) - 1)[0]
        return len(self._pairs) - 1


def _harvest_raw(gfns: object, size: int, index: object, stop: object, limit: int,
                 out: tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint64]] | None = None,
                 window: int | None = None,
                 ) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint64], int]:
    """Run the compiled harvester on ``gfns`` (a ``struct kvm_dirty_gfn *`` of ``size``
    entries) into ``out`` (or new arrays); returns (slots, offsets, n).

    Safety: both output arrays hold at least ``limit <= size`` items, the most the C loop
    writes, and are pinned by ``from_buffer`` during the call; the caller guarantees ``gfns``
    is valid.
    """
    if out is None:
        slots = np.empty(limit, dtype=np.uint32)
        offsets = np.empty(limit, dtype=np.uint64)
    else:
        slots, offsets = out
        if len(slots) < limit or len(offsets) < limit:
            raise KvmInvalidArgumentError("output arrays are smaller than the limit")
    ps = ffi.from_buffer("uint32_t[]", slots, require_writable=True)
    po = ffi.from_buffer("uint64_t[]", offsets, require_writable=True)
    try:
        n = int(lib.kvmio_ring_harvest(gfns, size, index, limit, ps, po, stop,
                                       size - 1 if window is None else window))
    finally:
        ffi.release(ps)
        ffi.release(po)
    return slots, offsets, n


def harvest_array(ring: npt.NDArray[np.void], index: int, limit: int | None = None, *,
                  window: int | None = None) -> tuple[DirtyEntries, int, int]:
    """Run the compiled harvester on a ring held in a numpy array of :data:`GFN_DTYPE`.

    For testing the protocol against a model, and for benchmarks.  Returns
    ``(entries, new_index, stop)`` where ``stop & STOP_MASK`` is :data:`STOP_EMPTY`,
    :data:`STOP_LIMIT` or :data:`STOP_HOLE`, and ``stop & STOP_LAPPED`` says whether the ring
    was lapped.  ``window``: how far past the index to look for a hole (default: the whole
    ring; 0: not at all).
    """
    size = len(ring)
    if ring.dtype != GFN_DTYPE or not ring.flags.c_contiguous or not ring.flags.writeable:
        raise KvmInvalidArgumentError("ring must be a writable C-contiguous array of GFN_DTYPE")
    if size == 0 or size & (size - 1):
        raise KvmInvalidArgumentError("ring size must be a power of two")
    limit = size if limit is None else min(limit, size)
    if limit < 0:
        raise KvmInvalidArgumentError("limit must be >= 0")
    # Safety: the pointer covers exactly `size` entries of the pinned array.
    buf = ffi.from_buffer("struct kvm_dirty_gfn[]", ring, require_writable=True)
    idx = ffi.new("uint32_t *", index & 0xFFFFFFFF)
    stop = ffi.new("int *", 0)
    try:
        if limit == 0:
            return DirtyEntries(_EMPTY_SLOTS, _EMPTY_OFFSETS), index, STOP_LIMIT
        slots, offsets, n = _harvest_raw(buf, size, idx, stop, limit, window=window)
    finally:
        ffi.release(buf)
    return DirtyEntries(slots[:n], offsets[:n]), int(idx[0]), int(stop[0])


def _no_guard() -> AbstractContextManager[None]:
    return contextlib.nullcontext()


class DirtyRing:
    """One vCPU's dirty ring, mapped ``MAP_SHARED`` at ``KVM_DIRTY_LOG_PAGE_OFFSET`` pages.

    Created with its vCPU (:meth:`kvmio.Vm.create_vcpu`) once the ring is enabled, through the
    VM's :class:`~kvmio.dirty.ringset.RingSet`; reach it through :attr:`kvmio.Vcpu.dirty_ring`
    or hand it to another thread with :meth:`kvmio.Vcpu.take_dirty_ring`.  Every harvest holds
    the ring set's lock, as do :meth:`RingSet.reset` and :meth:`close`, so a harvest never
    races a reset's accounting nor touches an unmapped ring: after close it raises
    :class:`KvmClosedError`.

    ``outside_run`` is a context-manager factory from the ring's vCPU: entering it raises
    :class:`KvmStateError` while the vCPU is inside ``run()`` and keeps ``run()`` out until it
    exits (:meth:`recover_from_overrun` needs the vCPU stopped).
    """

    def __init__(self, ring_set: RingSet, vcpu_id: int, vcpu_fd: int, entries: int, *,
                 outside_run: Callable[[], AbstractContextManager[None]] = _no_guard,
                 memory: Mapping | None = None):
        self.ring_set = ring_set
        self.vcpu_id = vcpu_id
        self.size = entries
        self._lock = ring_set.lock
        self._outside_run = outside_run
        if memory is None:
            offset = int(lib.KVM_DIRTY_LOG_PAGE_OFFSET) * PAGE_SIZE
            memory = Mapping(entries * GFN_SIZE, fd=vcpu_fd, offset=offset, shared=True,
                             what=f"dirty ring of vCPU {vcpu_id}")
        elif memory.size < entries * GFN_SIZE:
            raise KvmInvalidArgumentError(
                f"a ring of {entries} entries needs {entries * GFN_SIZE} bytes of memory, not "
                f"{memory.size}")
        self._map: Mapping | None = memory
        # Safety: the pointer is into self._map, which stays mapped until close(), and every use
        # of it below happens under self._lock after checking that _map is not None.
        self._gfns = self._map.cast("struct kvm_dirty_gfn *")
        self._index = ffi.new("uint32_t *", 0)
        self._stop = ffi.new("int *", 0)
        self._pending_reset = 0
        self._stash: list[DirtyEntries] = []
        self._pool = _OutputPool(entries)
        self._taken = False
        #: Entries harvested from this ring since it was mapped.
        self.harvested_total = 0
        #: Entries that :meth:`recover_from_overrun` skipped (counted by the kernel, but
        #: overwritten before they were harvested).
        self.lost_total = 0
        #: Overruns detected on this ring (raised, or reported with ``on_overrun="report"``).
        self.overruns = 0
        #: Why the last overrun was detected (``None`` if none was).
        self.last_overrun: str | None = None
        #: Whether a harvest stopped at a hole that :meth:`recover_from_overrun` has not yet
        #: skipped: harvests stay stuck there until it is recovered.
        self.hole_pending = False
        self._reported_now: str | None = None
        self._suspect = False  # overran, and not repaired since: harvest with the vCPU held
        # A signal of an overrun was seen (a lapped or full ring, a short reset, a stuck
        # ring): a hole may exist from then on, so hole scans cover the whole ring.  Before
        # that none can (see kvmio_ring_harvest), and harvests do not scan at all.
        self._ctl_entry: Any = None  # the ring set's native control entry for this ring
        self._wide = False
        self._lapped = False  # a harvest since the last reset found the ring completely full
        self._shortfall = 0  # ours, harvested, that the kernel has not recycled (see resync)
        self._epoch = 0  # bumped by every repair that moves the kernel's reset index
        self._run_snapshot: tuple[int, int, int, int] | None = None

    def __repr__(self) -> str:
        return f"<DirtyRing vcpu={self.vcpu_id} size={self.size} index={self.index}>"

    @property
    def index(self) -> int:
        """The free-running harvest index (entries harvested so far, modulo 2**32)."""
        return int(self._index[0])

    @property
    def pending_reset(self) -> int:
        """Entries harvested since the last KVM_RESET_DIRTY_RINGS."""
        return self._pending_reset

    @property
    def progress(self) -> int:
        """Entries the harvester has moved past: harvested, or skipped as lost."""
        return self.harvested_total + self.lost_total

    def before_run(self) -> None:
        """Called by the vCPU just before KVM_RUN: remember where the ring stood, so that
        :meth:`stuck` can tell what happened since.  Read without the lock (a KVM_RUN must not
        wait for a harvest): progress is read first, and every update raises the pending count
        before the progress, so a torn read can only make :meth:`stuck` say no."""
        progress = self.progress
        self._run_snapshot = (progress, self._pending_reset, self._shortfall, self._epoch)

    def stuck(self) -> bool:
        """After a ring-full exit, in the vCPU's thread: whether the ring is stuck, i.e. the
        kernel counts at least its soft limit of entries that nobody can harvest (they were
        overwritten).  True only if, since the KVM_RUN that exited, nobody harvested or reset
        anything of this ring, nothing was pending a reset, and nothing is dirty now: then the
        kernel's count of used entries, which was at least the soft limit at the exit, is
        entirely lost entries."""
        with self._lock:
            if self._map is None or self._run_snapshot is None:
                return False
            progress, pending, shortfall, epoch = self._run_snapshot
            return (pending == 0 and self._pending_reset == 0 and progress == self.progress
                    and shortfall == 0 and self._shortfall == 0 and epoch == self._epoch
                    and not self._stash
                    and int(lib.kvmio_ring_count_dirty(self._gfns, self.size)) == 0)

    def recover_stuck(self) -> int:
        """Advance a :meth:`stuck` ring past lost entries, with its vCPU outside KVM_RUN:
        mark at most the soft limit's worth of entries harvested (never more than the kernel
        counts as used, so its reset index cannot pass its dirty index) and reset.  Returns
        how many were skipped (counted in :attr:`lost_total`).  Call it again at the next
        stuck ring-full exit until the ring moves; then a hole (if any) shows, and
        :meth:`recover_from_overrun` finishes the job.  The lost writes stay lost: treat the
        tracked slots as wholly dirty."""
        with self._outside_run(), self._lock:
            if not self.stuck():
                raise KvmStateError(f"the dirty ring of vCPU {self.vcpu_id} is not stuck")
            count = max(self.size - MAX_RESERVED_ENTRIES, self.size // 4)
            lib.kvmio_ring_mark_harvested(self._gfns, self.size, self._index, count)
            self._pending_reset += count
            self.lost_total += count
            self._suspect = self._wide = True
            self.hole_pending = False
            self._run_snapshot = None
            self._epoch += 1
            self.ring_set.reset()
            return count

    @property
    def suspect(self) -> bool:
        """Whether the ring overran and was not repaired since (:meth:`recover_from_overrun`).
        Harvesting it while its vCPU runs could race the kernel lapping it: an owner should
        harvest it only inside :meth:`hold_vcpu` until then."""
        return self._suspect

    def hold_vcpu(self) -> AbstractContextManager[None]:
        """Hold the ring's vCPU outside KVM_RUN for a block (raises :class:`KvmStateError` if
        it is inside now; its ``run()`` waits for the block to end).  Other vCPU ioctls (an
        MSR write, say) may still push entries meanwhile; the repairs assume nobody makes
        them during the hold."""
        return self._outside_run()

    @property
    def shortfall(self) -> int:
        """Entries harvested here that the kernel has not recycled: a reset stopped short
        because the kernel overwrote some of them (a lapped ring harvested while its vCPU ran).
        Until :meth:`resync` (with the vCPU outside KVM_RUN) the ring is out of step."""
        return self._shortfall

    @property
    def lapped(self) -> bool:
        """Whether a harvest since the last reset found the ring completely full."""
        return self._lapped

    def add_shortfall(self, n: int) -> None:
        """Called by the ring set: the last reset recycled ``n`` of this ring's entries
        fewer than were harvested."""
        with self._lock:
            self._shortfall += n
            self._suspect = self._wide = True

    def resync(self) -> DirtyEntries:
        """Bring a ring with a :attr:`shortfall` back in step, with its vCPU outside KVM_RUN:
        take the entries the kernel wrote again over ours before its reset reached them, mark
        them harvested, and reset, so that the kernel recycles everything up to our index.
        Returns what was taken (real entries: report them).  A shortfall of a whole ring or
        more cannot be resynchronised (raises :class:`DirtyRingOverrunError`)."""
        with self._outside_run(), self._lock:
            self._check()
            short = self._shortfall
            if short == 0:
                return DirtyEntries(_EMPTY_SLOTS, _EMPTY_OFFSETS)
            if short > self.size:
                raise DirtyRingOverrunError(
                    f"dirty ring of vCPU {self.vcpu_id}: the kernel recycled {short} entries "
                    "fewer than were harvested, more than a whole ring: it cannot be brought back "
                    "in step; use bitmap mode or a bigger ring", vcpu=self.vcpu_id)
            slots = np.empty(short, dtype=np.uint32)
            offsets = np.empty(short, dtype=np.uint64)
            ps = ffi.from_buffer("uint32_t[]", slots, require_writable=True)
            po = ffi.from_buffer("uint64_t[]", offsets, require_writable=True)
            try:
                # Safety: both arrays hold `short` items, the most the sweep writes; the ring
                # pointer is valid (checked above, under the lock that close() needs).
                n = int(lib.kvmio_ring_sweep(self._gfns, self.size,
                                             (self.index - short) & 0xFFFFFFFF, short, ps, po))
            finally:
                ffi.release(ps)
                ffi.release(po)
            self._shortfall = 0
            self._pending_reset += short
            self.harvested_total += n
            self._epoch += 1
            self._run_snapshot = None
            swept = DirtyEntries(slots[:n].copy(), offsets[:n].copy())
            try:
                self.ring_set.reset()
            except BaseException:
                if len(swept):
                    self._stash.insert(0, swept)  # marked harvested: the next harvest has them
                raise
            return swept

    def mark_in_step(self) -> None:
        """For an owner that harvested and reset this ring with its vCPU held outside KVM_RUN
        and found no hole, no shortfall and no full ring: the ring is in step with the kernel
        again, and harvests while its vCPU runs are safe again (hole scans still cover the
        whole ring)."""
        with self._lock:
            if not (self.hole_pending or self._shortfall or self._lapped):
                self._suspect = False

    @property
    def quiet(self) -> bool:
        """Nothing pending a reset, stashed, suspect, lapped, short of a reset, reported or
        closed: a collection of this ring needs no accounting beyond counting what it took
        (the ring set's quick collection, under its lock).  Ownership is the caller's check."""
        return not (self._pending_reset or self._stash or self._suspect or self._lapped
                    or self._shortfall or self.hole_pending or self._reported_now is not None
                    or self._map is None)

    def count_harvested(self, n: int) -> None:
        """Count ``n`` entries that the ring set's quick collection took from this ring and
        the kernel recycled, exactly (under the ring set's lock)."""
        self.harvested_total += n

    def settle_reset(self, n: int) -> int:
        """Count ``n`` entries as recycled by a reset (called by the ring set under its lock);
        returns how many of them this ring accounted for."""
        with self._lock:
            take = min(n, self._pending_reset)
            self._pending_reset -= take
            return take

    def forget_pending(self) -> None:
        """After a reset: start counting afresh."""
        with self._lock:
            self._pending_reset = 0
            self._lapped = False

    @property
    def closed(self) -> bool:
        """Whether the ring was unmapped (its vCPU or VM closed)."""
        return self._map is None

    # -- ownership --------------------------------------------------------------------------

    @property
    def taken(self) -> bool:
        """Whether a harvester owns the ring (see :meth:`kvmio.Vcpu.take_dirty_ring`)."""
        return self._taken

    def take(self) -> DirtyRing:
        """Become the ring's one owner; raises :class:`KvmStateError` if it has one."""
        with self._lock:
            self._check()
            if self._taken:
                raise KvmStateError(f"the dirty ring of vCPU {self.vcpu_id} is already owned "
                                    "by a harvester")
            self._taken = True
            return self

    def release(self) -> None:
        """Give the ring back to its vCPU (the owner is done with it)."""
        with self._lock:
            self._taken = False

    # -- lifetime ---------------------------------------------------------------------------

    def _check(self) -> None:
        if self._map is None:
            raise KvmClosedError(f"the dirty ring of vCPU {self.vcpu_id} is closed (its vCPU or "
                                 "VM was closed)")

    def close(self) -> None:
        """Unmap (idempotent; called when the vCPU closes).  What is still in the ring or the
        stash goes to the ring set, which reports it with the next collection and counts it
        in the next reset (KVM keeps the vCPU's ring until the VM is destroyed, and
        KVM_RESET_DIRTY_RINGS still recycles it)."""
        with self._lock:
            if self._map is None:
                return
            left = self._harvest_locked(self.size, check=False)
            stop = int(self._stop[0])
            overrun = (stop & STOP_MASK == STOP_HOLE or bool(stop & STOP_LAPPED)
                       or self._pending_reset >= self.size
                       or self._shortfall > 0 or self.hole_pending)
            parts = [*self._stash, left.copy()]
            self._stash.clear()
            self.ring_set.detach(self, DirtyEntries.concat(parts), self._pending_reset,
                                 overrun=overrun)
            self._pending_reset = 0
            m, self._map = self._map, None
            self._gfns = None
            m.close()

    # -- harvesting -------------------------------------------------------------------------

    def harvest(self, limit: int | None = None, *,
                on_overrun: OverrunPolicy = "raise") -> DirtyEntries:
        """Take up to ``limit`` dirty entries (default: all), in ring order.

        Each entry is read after a load-acquire of its flags and then marked harvested with a
        store-release, in compiled code.  Harvesting stops at the first entry that is not dirty
        (or at ``limit``) and resumes there next time.  Entries that a ring-full exit's
        :meth:`drain` took come first.

        ``limit`` applies to the ring; entries already stashed come in addition.

        Raises :class:`DirtyRingOverrunError` when the ring shows that the kernel overwrote
        entries: a hole (the entry at the index is not dirty but a later one is) or a completely
        full ring since the last reset.  What was harvested is kept: the next harvest returns
        it (the exception only counts it, in ``harvested``).  With ``on_overrun="report"`` the
        harvest returns what it took instead, and notes the overrun (:attr:`overruns`,
        :attr:`last_overrun`, :attr:`hole_pending`, and :meth:`take_overrun_report`) for an
        owner that recovers the ring itself.
        """
        if on_overrun not in ("raise", "report"):
            raise KvmInvalidArgumentError(
                f"on_overrun must be 'raise' or 'report', not {on_overrun!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 0):
            raise KvmInvalidArgumentError(f"limit must be an int >= 0 or None, not {limit!r}")
        with self._lock:
            got = self._harvest_locked(self.size if limit is None else limit,
                                       report=on_overrun == "report")
            if self._stash:
                got = DirtyEntries.concat([*self._stash, got])
                self._stash.clear()
            return got

    def __iter__(self) -> Iterator[tuple[SlotId, int]]:
        """Harvest everything now available and iterate over ``(SlotId, page offset)``."""
        return iter(self.harvest())

    def _harvest_locked(self, limit: int, check: bool = True,
                        report: bool = False) -> DirtyEntries:
        self._check()
        limit = min(limit, self.size)
        if limit == 0:
            return DirtyEntries(_EMPTY_SLOTS, _EMPTY_OFFSETS)
        # The ring pointer is valid: checked above, and close() needs the lock we hold.
        # Once an overrun was signalled, a hole can be as long as the ring: scan all of it from
        # then on (about 1.5 us per empty harvest of a 4096-entry ring here); before, a hole
        # cannot exist (see kvmio_ring_harvest), so there is nothing to scan.
        slots, offsets, n = _harvest_raw(self._gfns, self.size, self._index, self._stop, limit,
                                         self._pool.get(), self.hole_window)
        return self._settle(slots, offsets, n, check, report)

    @property
    def _wide(self) -> bool:
        return self._wide_scan

    @_wide.setter
    def _wide(self, wide: bool) -> None:
        self._wide_scan = wide
        if self._ctl_entry is not None:  # keep the ring set's native control entry current
            self._ctl_entry[1].window = self.hole_window

    @property
    def hole_window(self) -> int:
        """How far past the index an empty harvest looks for a hole: the whole ring once an
        overrun was signalled, else 0 (see ``kvmio_ring_harvest``)."""
        return self.size - 1 if self._wide else 0

    def fill_native_ctl(self, ctl: object, k: int) -> None:
        """Point entry ``k`` of a ``struct kvmio_ring_ctl[]`` at this ring, for the ring set's
        harvest of every ring in one native call (``kvmio_rings_collect``).  Under the lock, on
        an open ring: the pointers stay valid until :meth:`close`, which needs the lock, and
        the ring set refills its control array after any ring closed.  The ring keeps the
        array (an owning cdata) and writes its hole window there whenever it changes."""
        self._check()
        arr: Any = ctl
        c = arr[k]  # a view into `arr`, valid while `arr` lives: kept below
        c.gfns = self._gfns
        c.index = self._index
        c.stop = self._stop
        c.size = self.size
        c.window = self.hole_window
        self._ctl_entry = (arr, c)  # from now on, a change of window is written there too

    def keep_harvested(self, slots: npt.NDArray[np.uint32], offsets: npt.NDArray[np.uint64],
                       n: int) -> None:
        """For the ring set: ``n`` entries a native call harvested from this ring, which a
        failure (a Ctrl-C, say) kept from being accounted for: count them and keep copies for
        the next harvest, so that they are neither lost nor left out of the reset count."""
        with self._lock:
            self._pending_reset += n
            self.harvested_total += n
            if n:
                self._stash.append(DirtyEntries(slots[:n].copy(), offsets[:n].copy()))

    def mark_suspect(self) -> None:
        """For the ring set: a reset did not match and this ring may be to blame: harvest it
        only with its vCPU held until it is repaired, and scan all of it for holes."""
        with self._lock:
            self._suspect = self._wide = True

    @property
    def has_stash(self) -> bool:
        """Whether entries taken earlier (by a ring-full drain, or given back by a failed
        collection) wait to be returned by the next harvest."""
        return bool(self._stash)

    def settle_native(self, slots: npt.NDArray[np.uint32], offsets: npt.NDArray[np.uint64],
                      n: int, *, on_overrun: OverrunPolicy = "raise",
                      copy: bool = True) -> DirtyEntries:
        """Account for a harvest that ``kvmio_rings_collect`` made of this ring (under the
        ring set's lock): ``n`` entries in ``slots``/``offsets``, its stop value in the ring's
        own cell.  Checks for an overrun and returns the entries, stashed ones first, exactly
        as :meth:`harvest` does.  ``copy=False`` returns views of ``slots``/``offsets`` even
        for few entries (for a caller that drops them before its next harvest)."""
        got = self._settle(slots, offsets, n, True, on_overrun == "report", copy)
        if self._stash:
            got = DirtyEntries.concat([*self._stash, got])
            self._stash.clear()
        return got

    def _settle(self, slots: npt.NDArray[np.uint32], offsets: npt.NDArray[np.uint64], n: int,
                check: bool, report: bool, copy: bool = True) -> DirtyEntries:
        stop = int(self._stop[0])
        if n == 0 and stop == STOP_EMPTY:  # caught up, nothing new: no accounting to do
            return _NO_ENTRIES
        lapped = bool(stop & STOP_LAPPED)
        stop &= STOP_MASK
        self._pending_reset += n
        self.harvested_total += n
        if copy and n < self.size // 4:
            # Small results are copied so they do not pin a pool pair.
            got = DirtyEntries(slots[:n].copy(), offsets[:n].copy())
        else:
            got = DirtyEntries(slots[:n], offsets[:n])
        if not check:
            return got
        why = None
        if stop == STOP_HOLE:
            why = "an entry the kernel should have published is missing (a hole in the ring)"
            new = not self.hole_pending  # a hole stays until recovered: count it once
            self.hole_pending = True
        elif self._pending_reset >= self.size > self._pending_reset - n:  # reported once
            why = (f"the ring filled completely ({self._pending_reset} of {self.size} entries "
                   "since the last reset)")
            new = True
            self._lapped = True
        elif lapped:
            why = (f"the kernel published a whole ring ({self.size} entries) or more past the "
                   "harvest index")
            new = not self._lapped  # reported once until the next reset
            self._lapped = True
        if why is None:
            return got
        self._suspect = self._wide = True
        if new:
            self.overruns += 1
            self.last_overrun = why
        if not report:
            self._overrun(got, why)
        elif new:
            self._reported_now = why
        return got

    def take_overrun_report(self) -> str | None:
        """The overrun noted by harvests with ``on_overrun="report"`` since the last call (and
        forget it): what a collection reports to the ring's owner."""
        with self._lock:
            why, self._reported_now = self._reported_now, None
            return why

    def _overrun(self, got: DirtyEntries, why: str) -> None:
        kept = got.copy()
        if len(kept):
            self._stash.append(kept)  # harvested (flags are RESET): keep them for the caller
        raise DirtyRingOverrunError(
            f"dirty ring of vCPU {self.vcpu_id} overrun: {why}; the kernel overwrote entries, so "
            "dirty pages may have been lost. Treat the tracked slots as wholly dirty and "
            "resynchronise them; to avoid it use a bigger ring, a guest that writes fewer pages "
            "per burst, or bitmap mode", vcpu=self.vcpu_id, harvested=len(kept))

    def give_back(self, got: DirtyEntries) -> None:
        """Return entries harvested by a collection that then failed (they come first in the
        next harvest).  A ring closed meanwhile hands them to its ring set instead."""
        with self._lock:
            if not len(got):
                return
            if self._map is None:
                self.ring_set.adopt(got.copy())
            else:
                self._stash.insert(0, got.copy())

    def drain(self) -> int:
        """Serve a ring-full exit: harvest everything into the ring's own pending entries (its
        next :meth:`harvest`, or the next collection, returns them) and reset the VM's rings.
        Safe from any thread, whoever owns the ring.  Returns how many entries were taken."""
        with self._lock:
            got = self._harvest_locked(self.size)
            if len(got):
                self._stash.append(got.copy())  # copies: they must not pin the output pool
            self.ring_set.reset()
            return len(got)

    def count_dirty(self) -> int:
        """How many entries are dirty right now (not yet harvested); for diagnostics."""
        with self._lock:
            self._check()
            return int(lib.kvmio_ring_count_dirty(self._gfns, self.size))

    def recover_from_overrun(self) -> DirtyEntries:
        """After :class:`DirtyRingOverrunError`: make the ring usable again.

        With the vCPU outside ``run()`` (it does not work on a running vCPU; raises
        :class:`KvmStateError` then), marks every hole (entries the kernel counted but
        overwrote) as harvested, harvests what follows, and resets the VM's rings, so that the
        kernel's reset index catches up with ours.  Returns the entries harvested on the way.
        The writes behind the lost entries stay lost: treat the tracked slots as wholly dirty
        and resynchronise them.

        The hole must be visible: a dirty entry must follow it.  After an overrun reported as a
        *full* ring, run the vCPU on until a harvest reports the hole, then recover.  If more
        than the ring's soft limit was lost, the vCPU is stuck on ring-full with nothing to
        harvest and nothing ever shows past the hole: that ring cannot be recovered (the kernel
        resets every entry marked harvested, whatever its own dirty index says, so blind
        marking would corrupt its state); use bitmap mode or a bigger ring.
        """
        with self._outside_run():
            return self._recover()

    def _recover(self) -> DirtyEntries:
        with self._lock:
            self._check()
            parts = list(self._stash)
            self._stash.clear()
            lost_before = self.lost_total
            for _ in range(self.size):
                skipped = int(lib.kvmio_ring_skip_hole(self._gfns, self.size, self._index))
                self._pending_reset += skipped
                self.lost_total += skipped
                if skipped:
                    self.hole_pending = False
                got = self._harvest_locked(self.size, check=False)
                parts.append(got.copy())
                if skipped == 0 and len(got) == 0:
                    break
            try:
                self.ring_set.reset()
            except BaseException:
                self._stash[:0] = [p for p in parts if len(p)]
                raise
            if not self.hole_pending and not self._shortfall:
                self._suspect = False  # repaired: concurrent harvests are safe again
            if self.lost_total != lost_before or any(len(p) for p in parts):
                self._epoch += 1
            return DirtyEntries.concat(parts)
