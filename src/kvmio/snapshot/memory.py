"""The guest-memory half of checkpoint and reset: :class:`MemoryCheckpoint`.

:meth:`MemoryCheckpoint.take` copies the *populated* pages of every memory slot (a sparse
64 GiB slot with 10 MiB in use costs 10 MiB and milliseconds: see
:meth:`kvmio.Memory.populated_pages`), clears the dirty log, and opens a host-write record on
every slot.  :meth:`MemoryCheckpoint.reset` then brings guest memory back to the checkpoint,
exactly, at a cost that follows the pages changed since the checkpoint (or the last reset),
not the guest's size:

- the pages the dirty log reports (guest writes: ring or bitmap), plus
- the pages the host wrote through kvmio (:class:`kvmio.HostWriteRecord`; writes through raw
  views count only if marked with :meth:`kvmio.MemoryRegion.mark_dirty`),

each copied back from the checkpoint, or, if it held no data of its own at the checkpoint,
returned to that state (zero-filled, or discarded with ``madvise``: anonymous memory reads as
zero again and a private file mapping as the file).

**Where the dirty log comes from.**  By default the checkpoint becomes its VM's one dirty-log
consumer until :meth:`~MemoryCheckpoint.close`: in ring mode it takes every vCPU's ring (and
the rings of vCPUs created later, at the next reset), in bitmap mode it claims the log
(:meth:`kvmio.Vm.claim_dirty_log`); a second consumer is refused, as the README's "one
consumer" rule has it.  vCPU threads still serve their ring-full exits as usual
(:meth:`kvmio.dirty.ring.DirtyRing.drain` through :attr:`kvmio.Vcpu.ring`, which a
:class:`~kvmio.runner.VcpuRunner` does).  If a :class:`~kvmio.tracker.DirtyTracker` holds
the log, pass it as ``tracker=``: the checkpoint then takes its pages with
``tracker.take(final=True)``, and must be the tracker's only taker (a take by anyone else
would hide pages from the next reset).

**One native call where it can be.**  With the log trusted and no tracker, a reset hands the
stored pages and the host-written pages to :meth:`kvmio.Vm.collect_and_restore`, which
collects the rings (or the bitmaps) and copies every page back in the same call, all or
nothing; a collection that is not the clean common case comes back with nothing copied, and
the page-by-page path below restores it.

**Doubt means a full reset, never a wrong one.**  A ring overrun (reported by the collection,
or any :class:`~kvmio.errors.DirtyRingError`), a slot a tracker reports wholly dirty, or a
previous reset that did not finish (an exception, Ctrl-C) makes the reset compare every page
populated at the checkpoint and copy back those that differ, and return to unpopulated every
page populated now that was not then (path ``"full"``).  The overrun rings are repaired
(their vCPUs are held outside KVM_RUN) and collected again, so the next cycle's dirty set
starts afresh; an overrun whose hole only shows once the guest runs again is detected by
the next collection, which goes the full way once more.

vCPUs must be stopped (outside :meth:`kvmio.Vcpu.run`, e.g. a paused
:class:`~kvmio.runner.VcpuRunner`) until take or reset returns; both refuse
(:class:`~kvmio.errors.KvmStateError`) if one is running.  Take also holds them out while it
works; a reset only checks (holding costs a tenth of a small reset), so a vCPU started by
another thread while a reset works makes that reset wrong.  The slots must stay as they were
at the checkpoint, each dirty-logged (or read-only): a slot added, deleted or replaced since,
or its dirty logging off, is a :class:`~kvmio.errors.SnapshotError` at reset.  (Logging
turned off and on again between two resets cannot be seen, and loses the writes made
meanwhile: do not.)

Costs, on this project's 2-core host: ``bench/reset.py``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

import numpy as np
import numpy.typing as npt

from kvmio import _abi, _check
from kvmio._abi import PAGE_SIZE
from kvmio.dirty.pages import PageSet, coalesce
from kvmio.dirty.ring import DirtyRing, sorted_unique
from kvmio.errors import (
    DirtyRingError,
    KvmClosedError,
    KvmInvalidArgumentError,
    KvmStateError,
    SnapshotError,
)
from kvmio.memory import FileMemory, HostWriteRecord, MemoryRegion
from kvmio.snapshot._dirtylog import LogHold, give_back, tracker_pages
from kvmio.tracker import DirtyTracker
from kvmio.vm import DirtyPages, Vm

__all__ = ["MemoryCheckpoint", "ResetPath", "ResetStats"]

Pages = npt.NDArray[np.uint64]
#: How a reset found the pages to restore.
ResetPath = Literal["ring", "bitmap", "full"]

#: One guest page as one numpy item: gathers and scatters copy whole pages per index.
_PAGE = np.dtype((np.void, PAGE_SIZE))
#: Pages gathered at a time through the scratch buffer (1 MiB: stays in the caches, and
#: a fresh temporary of that size would cost a page fault per page on hosts like this one).
_CHUNK = 256
#: Runs of pages at least this long are discarded (``madvise``, which frees them) rather
#: than zero-filled where either would do.  Measured here: a run of 512 pages costs 46 us to
#: zero-fill and 194 us to discard, one page 0.7 us and 3.6 us; and a discarded page costs
#: the guest a page fault when it touches it again (a fuzzer's guest touches the same pages
#: every cycle), so only long runs, likely one-off, are discarded.
_DISCARD_RUN = 512
#: Up to this many pages, a reset copies page by page in Python (numpy's fixed costs would
#: dominate); more go through numpy's gathers and scatters.
_FEW = 24
#: A copy this large or larger goes on transparent huge pages (:func:`_page_store`).
_HUGE = 2 << 20
#: Where page copies start past a page boundary (see :func:`_page_store`).
_STORE_OFFSET = 64
#: In bitmap mode the fused reset restores this many pages at most (the room its list of pages
#: without a copy takes: 512 KiB); a larger dirty set goes page by page.
_FUSED_BITMAP_PAGES = 1 << 16
_EMPTY: Pages = np.zeros(0, dtype=np.uint64)
_EMPTY.setflags(write=False)
_ZERO_PAGE = bytes(PAGE_SIZE)


@dataclass(slots=True)
class ResetStats:
    """What one :meth:`MemoryCheckpoint.reset` did.  (Not frozen: a frozen dataclass costs
    two microseconds more to make here, a few percent of a small reset.)"""

    #: Pages restored: those the dirty log and the records named (copied back, or returned
    #: to unpopulated), or, on the full path, those found to differ.
    pages: int
    #: ``"ring"`` or ``"bitmap"``: the pages the dirty log and the host-write records named;
    #: ``"full"``: every populated page compared (see :attr:`reason`).
    path: ResetPath
    #: Wall-clock nanoseconds of the whole reset.
    ns: int
    #: Of which collecting the dirty log (harvest and reset of the rings, or the bitmaps);
    #: with a clean log, the one native call that collects and copies the pages back
    #: (:meth:`kvmio.Vm.collect_and_restore`).
    collect_ns: int = 0
    #: Distinct pages the dirty log reported (guest writes).
    dirty: int = 0
    #: Distinct pages the host wrote through kvmio (or marked).
    host: int = 0
    #: Slots restored whole (every slot for a full reset of the VM).
    full_slots: frozenset[int] = frozenset()
    #: Why the full path was taken (``None`` otherwise).
    reason: str | None = None


class _Slot:
    """One memory slot as the checkpoint keeps it: the populated pages and their data."""

    __slots__ = ("data", "data_bytes", "index", "record", "region", "runs", "zero")

    def __init__(self, region: MemoryRegion, index: Pages, data: npt.NDArray[np.void],
                 record: HostWriteRecord):
        self.region = region
        #: Sorted page indices that held data (not all zero) at the checkpoint.
        self.index = index
        #: Their contents, one ``_PAGE`` item per page, in the order of ``index``.
        self.data = data
        #: The same, as bytes (for slice copies).
        self.data_bytes = data.view(np.uint8).data
        self.record = record
        #: Whether a page not in ``index`` was zero (anonymous, memfd) rather than the file's.
        self.zero = region.memory.unpopulated_is_zero
        #: The runs of ``index`` (first page, pages, position in ``data``) if they are long
        #: (8 pages or more on average): a copy of all of them is then a few ``memcpy``.
        self.runs: list[tuple[int, int, int]] | None = None
        first, count = coalesce(index)
        if len(first) * 8 <= len(index):
            at = np.cumsum(count) - count
            self.runs = list(zip(first.tolist(), count.tolist(), at.tolist(), strict=True))

    def view(self) -> npt.NDArray[np.void]:
        """The slot's memory, one item per page (a fresh view: none is kept between calls,
        so that closing the VM unmaps at once)."""
        return np.frombuffer(self.region.memory.mapping.mm, dtype=_PAGE)


class MemoryCheckpoint:
    """A copy of a VM's guest memory that :meth:`reset` restores in O(changed pages).

    Made by :meth:`take` (see the module documentation for what it needs and guarantees).
    Use it as a context manager, or call :meth:`close` to give the dirty log back and free
    the copy; dropped without either, its finaliser gives the log back.
    """

    def __init__(self, vm: Vm, *, tracker: DirtyTracker | None = None):
        """The same as :meth:`take`, which reads better."""
        _check.instance("vm", vm, Vm)
        if tracker is not None:
            _check.instance("tracker", tracker, DirtyTracker)
            if tracker.vm is not vm:
                raise KvmInvalidArgumentError("the tracker tracks another VM")
        if vm.closed:
            raise KvmClosedError("this Vm is closed")
        self._vm = vm
        self._tracker = tracker
        self._lock = threading.Lock()
        self._log = LogHold(vm, "a MemoryCheckpoint", "a checkpoint")
        self._slots: dict[int, _Slot] = {}
        self._regions: dict[int, MemoryRegion] = {}  # as at the checkpoint
        self._records: list[HostWriteRecord] = []
        self._table: _abi.PageRestore | None = None  # the fused reset's, made at first use
        self._trusted = False  # whether the next reset may trust the log and the records
        self._log_clean = False  # whether the last collection left the log trustworthy
        self._closed = False
        self._scratch = _page_store(_CHUNK)
        self._scratch.view(np.uint8)[::PAGE_SIZE] = 1  # fault every page of it in now
        self._finalizer = weakref.finalize(self, give_back, vm, self._log.rings, self._records,
                                           self._log.claim)
        try:
            with self._held():
                regions = vm.regions
                for slot, r in sorted(regions.items()):
                    if not (r.log_dirty or r.readonly):
                        raise SnapshotError(
                            f"slot {slot} is not dirty-logged: a checkpoint resets only the pages "
                            "the dirty log reports; create it with log_dirty=True or turn "
                            "logging on (Vm.set_dirty_logging)")
                if tracker is None:  # else the tracker holds the log
                    self._log.own()
                # Records first: a host write from another thread while the pages are copied
                # is then in the record (restoring such a page is harmless, missing it not).
                records = {slot: r.record_host_writes() for slot, r in regions.items()}
                self._records.extend(records.values())
                self._collect()  # clear the log: from now on it means "since the checkpoint"
                for slot, r in sorted(regions.items()):
                    index, data = self._copy_slot(r)
                    self._slots[slot] = _Slot(r, index, data, records[slot])
                self._regions = regions
                self._trusted = self._log_clean
        except BaseException:
            self.close()
            raise

    @classmethod
    def take(cls, vm: Vm, *, tracker: DirtyTracker | None = None) -> MemoryCheckpoint:
        """Checkpoint the memory of ``vm``, whose vCPUs must be stopped.

        Takes the VM's dirty log (rings or bitmap claim) unless ``tracker`` holds it, clears
        it, opens a host-write record per slot, and copies every populated page.  Raises
        :class:`SnapshotError` if a slot is not dirty-logged (nor read-only) or the dirty log
        is held by someone else (pass the tracker that holds it), :class:`KvmStateError` if a
        vCPU is running.
        """
        return cls(vm, tracker=tracker)

    def _copy_slot(self, region: MemoryRegion) -> tuple[Pages, npt.NDArray[np.void]]:
        """The slot's populated pages and a copy of them; for memory whose unpopulated pages
        read as zero, pages that hold only zeros are left out (restored as unpopulated)."""
        pages = region.memory.populated_pages()
        view = np.frombuffer(region.memory.mapping.mm, dtype=_PAGE)
        if region.memory.unpopulated_is_zero and len(pages):
            keep = np.zeros(len(pages), dtype=bool)
            for a, b, chunk in self._gather(view, pages):
                keep[a:b] = chunk.view(np.uint64).reshape(b - a, -1).any(axis=1)
            pages = pages[keep]
        data = _page_store(len(pages))
        for a in range(0, len(pages), _CHUNK):
            np.take(view, pages[a:a + _CHUNK].astype(np.intp), out=data[a:a + _CHUNK],
                    mode="clip")
        pages.setflags(write=False)
        return pages, data

    def _gather(self, view: npt.NDArray[np.void], pages: Pages
                ) -> Iterator[tuple[int, int, npt.NDArray[np.void]]]:
        """``(a, b, copies of pages[a:b])`` chunk by chunk, through the scratch buffer (valid
        until the next chunk)."""
        for a in range(0, len(pages), _CHUNK):
            b = min(a + _CHUNK, len(pages))
            out = self._scratch[:b - a]
            np.take(view, pages[a:b].astype(np.intp), out=out, mode="clip")
            yield a, b, out

    # -- state ------------------------------------------------------------------------------

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.stored_pages} pages"
        return f"<MemoryCheckpoint slots={sorted(self._slots)} {state}>"

    @property
    def vm(self) -> Vm:
        """The VM checkpointed."""
        return self._vm

    @property
    def tracker(self) -> DirtyTracker | None:
        """The tracker the dirty log comes from, if any."""
        return self._tracker

    @property
    def slots(self) -> dict[int, MemoryRegion]:
        """The memory regions checkpointed, by slot id."""
        return {slot: s.region for slot, s in self._slots.items()}

    @property
    def stored_pages(self) -> int:
        """Pages the checkpoint holds a copy of (populated, and not all zero where unpopulated
        pages read as zero)."""
        return sum(len(s.index) for s in self._slots.values())

    @property
    def nbytes(self) -> int:
        """Bytes of host memory the copy takes."""
        return sum(s.data.nbytes + s.index.nbytes for s in self._slots.values())

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def stored(self, slot: int) -> tuple[Pages, npt.NDArray[np.uint8]]:
        """``(page indices, contents)`` the checkpoint holds for ``slot``: sorted indices and
        a read-only ``(pages, PAGE_SIZE)`` uint8 array (every other page was unpopulated)."""
        s = self._slot(slot)
        data = s.data.view(np.uint8).reshape(len(s.index), PAGE_SIZE)
        data.setflags(write=False)
        return s.index, data

    def _slot(self, slot: int) -> _Slot:
        self._check_open()
        try:
            return self._slots[_check.integer("slot", slot)]
        except KeyError:
            raise KvmInvalidArgumentError(f"slot {slot} is not in the checkpoint") from None

    def _check_open(self) -> None:
        if self._closed:
            raise KvmClosedError("this checkpoint is closed")

    def close(self) -> None:
        """Give the dirty log back (rings, claim), close the host-write records and free the
        copy (idempotent)."""
        with self._lock:
            self._closed = True
            self._finalizer()
            self._slots = {}
            if self._table is not None:
                self._table.close()
                self._table = None

    def __enter__(self) -> MemoryCheckpoint:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- reset ------------------------------------------------------------------------------

    def reset(self, vm: Vm | None = None) -> ResetStats:
        """Restore guest memory to the checkpoint, with the vCPUs stopped (``vm``, if given,
        must be the checkpoint's).  Returns what was done; see the module documentation for
        the paths.  Raises :class:`SnapshotError` if the slots changed since the checkpoint
        (nothing is restored then), :class:`KvmStateError` if a vCPU is running."""
        t0 = time.perf_counter_ns()
        if vm is not None and vm is not self._vm:
            raise KvmInvalidArgumentError("this checkpoint belongs to another VM")
        with self._lock:
            self._check_open()
            if self._vm.closed:
                raise KvmClosedError("the checkpoint's Vm is closed")
            # Checked, not held: holding every vCPU outside KVM_RUN costs more than a tenth of
            # a small reset here, and a paused runner's vCPUs stay out until resumed.  (take()
            # holds them, and the repairs after an overrun hold their own.)
            for v in self._vm.vcpus.values():
                if v.running:
                    raise KvmStateError(f"vCPU {v.id} is running; stop or pause the vCPUs "
                                        "before a memory reset")
            self._check_slots()
            trusted, self._trusted = self._trusted, False  # until this reset completes
            t1 = time.perf_counter_ns()
            hosts: list[Pages] | None = None
            if trusted and self._tracker is None:
                # Collection and copies in one native call, where the collection is clean.
                hosts = [s.record.take() for s in self._slots.values()]
                fused = self._fused(hosts)
                if isinstance(fused, ResetStats):
                    self._trusted = True
                    fused.ns = time.perf_counter_ns() - t0
                    return fused
                dirty, whole, reason = fused
            else:
                dirty, whole, reason = self._collect()
            t2 = time.perf_counter_ns()
            if not trusted:
                whole = set(self._slots)
                reason = reason or ("the log cannot be trusted since the checkpoint or an "
                                    "earlier reset (an overrun, or an interrupted reset)")
            restored = dirty_pages = host_pages = 0
            for k, (slot, s) in enumerate(self._slots.items()):
                host = s.record.take() if hosts is None else hosts[k]
                host_pages += len(host)
                if slot in whole:
                    restored += self._restore_whole(s)
                    continue
                logged = dirty.get(slot, _EMPTY)
                dirty_pages += len(logged)
                pages: Pages | list[int] = logged
                if len(host):
                    if len(logged) + len(host) <= _FEW:  # merged in Python: cheaper
                        pages = sorted({*logged.tolist(), *host.tolist()})
                    elif len(logged):
                        pages = sorted_unique(np.concatenate((logged, host)))
                    else:
                        pages = host
                if len(pages):
                    restored += self._restore(s, pages)
            self._trusted = self._log_clean
        path: ResetPath
        if whole:
            path = "full"
        elif self._tracker is not None:
            path = self._tracker.mode
        else:
            path = "bitmap" if self._vm.ring_set is None else "ring"
        return ResetStats(restored, path, time.perf_counter_ns() - t0, t2 - t1, dirty_pages,
                          host_pages, frozenset(whole), reason)

    def differences(self) -> PageSet:
        """The pages whose contents differ from the checkpoint now (with the vCPUs stopped):
        every page populated then or now is compared, so this costs what a full reset
        costs, without writing anything.  For tests and diagnostics."""
        with self._lock:
            self._check_open()
            with self._held():
                self._check_slots()
                return PageSet({slot: self._compare(s, write=False)[1]
                                for slot, s in self._slots.items()})

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        """Hold every vCPU outside KVM_RUN (their ``run()`` waits) for the block; refuse if
        one is in it now."""
        vcpus = self._vm.vcpus
        for v in vcpus.values():
            if v.running:
                raise KvmStateError(f"vCPU {v.id} is running; stop or pause the vCPUs before "
                                    "a memory checkpoint")
        with contextlib.ExitStack() as stack:
            for v in vcpus.values():
                stack.enter_context(v.outside_run())
            yield

    def _check_slots(self) -> None:
        regions = self._vm.regions
        if regions == self._regions:  # the same region objects in the same slots
            for slot, r in regions.items():
                if not (r.log_dirty or r.readonly):
                    raise SnapshotError(f"dirty logging of slot {slot} was turned off since the "
                                        "checkpoint; its guest writes are unknown")
            return
        added = sorted(regions.keys() - self._slots.keys())
        gone = sorted(self._slots.keys() - regions.keys())
        replaced = sorted(slot for slot in regions.keys() & self._slots.keys()
                          if regions[slot] is not self._slots[slot].region)
        what = "; ".join(f"{name} {', '.join(map(str, slots))}" for name, slots in
                         (("slots added:", added), ("slots deleted:", gone),
                          ("slots replaced:", replaced)) if slots)
        raise SnapshotError(f"the VM's memory slots changed since the checkpoint ({what}); "
                            "take a new checkpoint")

    # -- collecting -------------------------------------------------------------------------

    def _collect(self) -> tuple[Mapping[int, Pages], set[int], str | None]:
        """The pages dirtied since the last collection, the slots to restore whole, and why.
        Sets ``_log_clean``: whether the log can be trusted from here on."""
        self._log_clean = False
        tracker = self._tracker
        if tracker is not None:
            ranges = tracker.take(final=True)
            whole = set(ranges.wholly_dirty) & self._slots.keys()
            pages = tracker_pages(ranges, self._regions, whole)
            self._log_clean = True  # the tracker repairs its rings; doubt comes as `whole`
            why = None if not whole else (f"the tracker reported slots {sorted(whole)} wholly "
                                          "dirty (a ring overran)")
            return pages, whole, why
        vm = self._vm
        if vm.ring_set is None:
            got = vm.collect_dirty_pages(final=True, claim=self._log.claim[0])
            self._log_clean = True
            return got.pages, set(), None
        rings = self._log.adopt_rings()
        try:
            got = vm.collect_dirty_pages(final=True, rings=rings, on_overrun="report")
        except DirtyRingError as e:
            return self._after_overrun(rings, str(e))
        return self._judge(rings, got)

    def _fused(self, hosts: list[Pages]
               ) -> ResetStats | tuple[Mapping[int, Pages], set[int], str | None]:
        """Log trusted, no tracker: collect and restore in one native call
        (:meth:`kvmio.Vm.collect_and_restore`: the rings, or the bitmaps) with ``hosts`` (the
        host-written pages, one list per slot in slot order).  Returns what it restored, or,
        where the collection was not the clean common case (nothing restored then), what
        :meth:`_collect` returns (sets ``_log_clean`` as it does)."""
        self._log_clean = False
        vm = self._vm
        ring_set = vm.ring_set
        slots = list(self._slots.values())
        table = self._table
        if table is None:
            table = self._table = _abi.PageRestore(
                [(slot, s.data, s.index, _DISCARD_RUN if s.zero else 0)
                 for slot, s in self._slots.items()],
                None if ring_set is not None else
                [s.region.num_pages if s.region.log_dirty else 0 for s in slots])
        if ring_set is not None:
            rings = self._log.adopt_rings()
            capacity = ring_set.entries * len(rings)
        else:
            rings = []
            capacity = min(sum(s.region.num_pages for s in slots), _FUSED_BITMAP_PAGES)
        capacity += sum(len(h) for h in hosts)
        table.bind([s.region.memory.mapping for s in slots], hosts, capacity)
        t0 = time.perf_counter_ns()
        try:
            got = vm.collect_and_restore(table, rings=rings if ring_set is not None else None,
                                         claim=self._log.claim[0])
        except DirtyRingError as e:
            return self._after_overrun(rings, str(e))
        finally:
            table.unbind()
        call_ns = time.perf_counter_ns() - t0
        if got is not None:
            if ring_set is None:
                self._log_clean = True
                return got.pages, set(), None
            return self._judge(rings, got)
        restored = dirty = host = 0
        for k, s in enumerate(slots):
            n, logged, missing = table.counts(k)
            restored += n
            dirty += logged
            host += len(hosts[k])
            if missing:
                self._unpopulate(s, s.view(), table.missing(k))
        self._log_clean = True
        return ResetStats(restored, "ring" if ring_set is not None else "bitmap", 0, call_ns,
                          dirty, host)

    def _judge(self, rings: list[DirtyRing], got: DirtyPages
               ) -> tuple[Mapping[int, Pages], set[int], str | None]:
        """What a ring collection means for the reset (see :meth:`_collect`)."""
        if got.overruns:
            return self._after_overrun(rings, "; ".join(
                f"vCPU {vid}: {why}" for vid, why in sorted(got.overruns.items())))
        if LogHold.out_of_step(rings):
            return self._after_overrun(rings, "a dirty ring is out of step since an overrun")
        self._log_clean = True
        return got.pages, set(), None

    def _after_overrun(self, rings: list[DirtyRing], why: str
                       ) -> tuple[Mapping[int, Pages], set[int], str | None]:
        """Pages may have been lost: every slot is restored whole.  Repair the rings (their
        vCPUs are held outside KVM_RUN) and collect again, so that the log starts afresh."""
        LogHold.repair(rings)
        clean = False
        with contextlib.suppress(DirtyRingError):
            again = self._vm.collect_dirty_pages(final=True, rings=rings, on_overrun="report")
            clean = not again.overruns
        self._log_clean = clean and not LogHold.out_of_step(rings)
        return {}, set(self._slots), f"dirty ring overrun ({why})"

    # -- restoring --------------------------------------------------------------------------

    def _restore(self, s: _Slot, pages: Pages | list[int]) -> int:
        """Restore ``pages`` (sorted, distinct) of a slot; returns how many."""
        k = len(pages)
        pages = np.asarray(pages, dtype=np.uint64)
        if s.runs is not None and 2 * k >= len(s.index):
            # Half as many pages as the slot stores, or more: copying all stored pages back,
            # run by run, moves more bytes but costs less than scattering them (a scattered
            # page costs about twice a page of a long memcpy here).
            view = s.view()
            for first, count, at in s.runs:
                view[first:first + count] = s.data[at:at + count]
            pos = np.searchsorted(s.index, pages)
            hit = (s.index[np.minimum(pos, len(s.index) - 1)] == pages) if len(s.index) \
                else np.zeros(k, dtype=bool)
            if not hit.all():
                self._unpopulate(s, view, pages[~hit])
            return k
        # One compiled merge walk copies every stored page back; the pages it has none for
        # are returned to unpopulated here (zero-filled, or discarded when long runs).
        missing = _abi.restore_pages(s.region.memory.mapping, s.data, s.index, pages,
                                     zero=False)
        if len(missing):
            self._unpopulate(s, s.view(), missing)
        return k

    def _unpopulate(self, s: _Slot, view: npt.NDArray[np.void], pages: Pages) -> None:
        """Return ``pages`` (sorted, distinct; unpopulated at the checkpoint) to unpopulated:
        zero-filled where that is the same and faster, else discarded."""
        if s.zero and len(pages) < _DISCARD_RUN:  # no run long enough to discard
            view.view(np.uint8).reshape(-1, PAGE_SIZE)[pages.astype(np.intp)] = 0
            return
        first, count = coalesce(pages)
        if s.zero:
            short = count < _DISCARD_RUN
            raw = view.view(np.uint8)  # (a fill: broadcasting one page-sized item is slow)
            for f, c in zip(first[short].tolist(), count[short].tolist(), strict=True):
                raw[f * PAGE_SIZE:(f + c) * PAGE_SIZE].fill(0)
            first, count = first[~short], count[~short]
        for f, c in zip(first.tolist(), count.tolist(), strict=True):
            s.region.memory.discard(f, c)

    def _restore_whole(self, s: _Slot) -> int:
        """The full path for one slot: every page that differs from the checkpoint, or may."""
        count, _ = self._compare(s, write=True)
        return count

    def _compare(self, s: _Slot, *, write: bool) -> tuple[int, Pages]:
        """Compare the slot with the checkpoint: every stored page, and every page populated
        now that was not stored.  With ``write``, restore what differs (a page of a file
        mapping that is populated now but was not is discarded without comparing: the file
        is what it must read as).  Returns ``(pages restored or differing, those found to
        differ)``."""
        view = s.view()
        found: list[Pages] = []
        for a, b, now in self._gather(view, s.index):
            differ = (now.view(np.uint64).reshape(b - a, -1)
                      != s.data[a:b].view(np.uint64).reshape(b - a, -1)).any(axis=1)
            if differ.any():
                pages = s.index[a:b][differ]
                found.append(pages)
                if write:
                    view[pages.astype(np.intp)] = s.data[a:b][differ]
        extra = np.setdiff1d(s.region.memory.populated_pages(), s.index, assume_unique=True)
        restored = sum(len(p) for p in found)
        if s.zero:
            nonzero: list[Pages] = []
            for a, b, now in self._gather(view, extra):
                nz = now.view(np.uint64).reshape(b - a, -1).any(axis=1)
                if nz.any():
                    nonzero.append(extra[a:b][nz])
            found.extend(nonzero)
            if nonzero and write:
                pages = np.concatenate(nonzero)
                self._unpopulate(s, view, pages)
                restored += len(pages)
        elif len(extra):
            if write:
                self._unpopulate(s, view, extra)
                restored += len(extra)
            else:  # compare with the file's content: what discarding would bring back
                found.extend(self._differs_from_file(s, view, extra))
        diff = np.sort(np.concatenate(found)) if found else _EMPTY
        return restored, diff

    def _differs_from_file(self, s: _Slot, view: npt.NDArray[np.void],
                           pages: Pages) -> list[Pages]:
        """Of ``pages`` of a private file mapping, those whose own copy differs from the file
        (read with ``os.pread``; for :meth:`differences` only)."""
        memory = s.region.memory
        if not isinstance(memory, FileMemory):
            return [pages]
        out = []
        offset = memory.offset
        fd = os.open(memory.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for p in pages.tolist():
                if os.pread(fd, PAGE_SIZE, offset + p * PAGE_SIZE) != view[p].tobytes():
                    out.append(p)
        finally:
            os.close(fd)
        return [np.array(out, dtype=np.uint64)] if out else []


def _page_store(pages: int) -> npt.NDArray[np.void]:
    """Room for ``pages`` page copies, 64 bytes past a page boundary, and on transparent
    huge pages where the kernel gives them (for 2 MiB or more).

    The offset: guest memory is page aligned, and copying a page between two page-aligned
    buffers, or from a page-aligned one into one 16 bytes past (where ``malloc`` puts large
    numpy arrays), ran 2 and 10 times slower here than from 64 bytes past (the CPU's loads
    alias its stores to the same offsets in a page).  Huge pages: a reset reads scattered
    pages of the store, and with 2 MiB pages fewer of those reads miss the TLB (5-10% off a
    reset of 100 to 1,000 scattered pages here, about the noise of this host)."""
    size = pages * PAGE_SIZE
    store = _abi.Mapping(size + PAGE_SIZE, what="checkpoint copy")
    if size >= _HUGE:
        with contextlib.suppress(OSError):  # no THP: ordinary pages
            store.mm.madvise(mmap.MADV_HUGEPAGE)
    # The array holds the mapping (through its buffer): unmapped when the array goes.
    raw = np.frombuffer(store.mm, dtype=np.uint8, count=size, offset=_STORE_OFFSET)
    return raw.view(_PAGE)
