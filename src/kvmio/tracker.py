"""A background dirty tracker: harvests while vCPUs run, coalesces dirty pages into ranges, and
measures the dirty rate (distinct pages per second over a sliding window, per VM and per vCPU).

This layer sits above :mod:`kvmio.vm` and :mod:`kvmio.dirty`; it adds no ioctl of its own.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import numpy as np
import numpy.typing as npt

from kvmio._abi import PAGE_SIZE
from kvmio.dirty.ring import DirtyEntries, DirtyRing, sorted_unique
from kvmio.errors import KvmInvalidArgumentError, KvmStateError
from kvmio.memory import MemoryRegion
from kvmio.vcpu import Vcpu
from kvmio.vm import Vm

Mode = Literal["ring", "bitmap", "auto"]

# --------------------------------------------------------------------------------------------
# Range tables


def coalesce(pages: npt.ArrayLike) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """Runs of consecutive page indices: ``(first_page, page_count)`` arrays.

    ``pages`` may be unsorted and hold duplicates.
    """
    p = np.unique(np.asarray(pages, dtype=np.uint64))
    if len(p) == 0:
        empty = np.zeros(0, dtype=np.uint64)
        return empty, empty.copy()
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(p)]))
    return p[starts], (ends - starts).astype(np.uint64)


@dataclass(frozen=True)
class SlotRanges:
    """The dirty runs of one memory slot: guest physical start and length in bytes."""

    slot: int
    gpas: npt.NDArray[np.uint64]
    lengths: npt.NDArray[np.uint64]
    pages: int

    def __len__(self) -> int:
        return len(self.gpas)


@dataclass(frozen=True)
class DirtyRanges:
    """What :meth:`DirtyTracker.take` returns: coalesced dirty runs, per slot and in total."""

    slots: dict[int, SlotRanges]

    @classmethod
    def from_pages(cls, pages: dict[int, npt.NDArray[np.uint64]],
                   bases: dict[int, int]) -> DirtyRanges:
        """From page indices per slot and each slot's guest physical base."""
        out = {}
        for slot, p in pages.items():
            first, count = coalesce(p)
            if len(first):
                out[slot] = SlotRanges(slot, np.uint64(bases[slot]) + first * np.uint64(PAGE_SIZE),
                                       count * np.uint64(PAGE_SIZE), int(count.sum()))
        return cls(out)

    @property
    def pages(self) -> int:
        """Dirty pages over all slots."""
        return sum(s.pages for s in self.slots.values())

    @property
    def bytes(self) -> int:
        """Dirty bytes over all slots."""
        return self.pages * PAGE_SIZE

    def __len__(self) -> int:
        return sum(len(s) for s in self.slots.values())

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """``(gpa, length)`` of every run, in address order."""
        runs = sorted((int(g), int(n)) for s in self.slots.values()
                      for g, n in zip(s.gpas, s.lengths, strict=True))
        return iter(runs)


# --------------------------------------------------------------------------------------------
# Sliding-window distinct counting


class WindowCounter:
    """Distinct pages seen over the passes of the last ``window`` seconds, updated per pass.

    Each page remembers the number of the pass that last saw it (a lazily allocated uint32
    array per slot, so untouched parts of a huge sparse slot cost nothing), and each pass in the
    window counts the pages whose latest sighting it is.  The window's distinct count is the sum
    of those counts; a pass costs O(pages in the pass).
    """

    def __init__(self, window: float):
        if not window > 0:
            raise KvmInvalidArgumentError("window must be positive")
        self.window = window
        self._stamps: dict[int, npt.NDArray[np.uint32]] = {}
        self._counts: dict[int, int] = {}  # pass number -> pages last seen by it (in window)
        self._starts: collections.deque[tuple[int, float]] = collections.deque()
        self._pass_no = 0
        self.distinct = 0

    def add(self, t_start: float, t_end: float, pages: dict[int, npt.NDArray[np.uint64]],
            slot_pages: dict[int, int]) -> tuple[int, float]:
        """Record one pass covering ``[t_start, t_end]`` that saw ``pages`` (distinct per slot;
        ``slot_pages`` gives each slot's size in pages).  Returns ``(distinct, seconds)`` for
        the window: the distinct pages of the passes in it, and the time those passes cover."""
        self._pass_no += 1
        p = self._pass_no
        self._starts.append((p, t_start))
        self._counts[p] = 0
        oldest = self._starts[0][0]
        for slot, idx in pages.items():
            if len(idx) == 0 or slot not in slot_pages:
                continue
            stamps = self._stamps.get(slot)
            if stamps is None or len(stamps) != slot_pages[slot]:  # new, or re-created

                # np.zeros maps lazily: only stamp pages for touched guest pages are allocated.
                stamps = self._stamps[slot] = np.zeros(slot_pages[slot], dtype=np.uint32)
            idx = idx[idx < np.uint64(len(stamps))]
            ix = idx.astype(np.intp)  # index with intp: uint64 indices are converted per use
            prev = stamps[ix]
            stamps[ix] = p
            again = prev[prev >= oldest]  # pages already counted by a pass in the window
            if len(again):
                counts = np.bincount(again - oldest)
                for off in np.flatnonzero(counts).tolist():
                    c = int(counts[off])
                    self._counts[oldest + off] -= c
                    self.distinct -= c
            self._counts[p] += len(idx)
            self.distinct += len(idx)
        while len(self._starts) > 1 and self._starts[1][1] <= t_end - self.window:
            q, _ = self._starts.popleft()
            self.distinct -= self._counts.pop(q)
        return self.distinct, t_end - self._starts[0][1]


# --------------------------------------------------------------------------------------------
# The tracker


@dataclass(frozen=True)
class RateSample:
    """One pass of the tracker: when, what it found, and the windowed rates at that time."""

    time: float
    pages: int
    entries: int
    pages_per_second: float
    vcpu_pages_per_second: dict[int, float] = field(default_factory=dict)

    @property
    def bytes_per_second(self) -> float:
        """The VM's dirty rate in bytes per second."""
        return self.pages_per_second * PAGE_SIZE


@dataclass(frozen=True)
class DirtyRate:
    """Distinct pages (and bytes) dirtied per second over the last ``window`` seconds."""

    pages_per_second: float
    vcpu_pages_per_second: dict[int, float]
    window: float

    @property
    def bytes_per_second(self) -> float:
        """Bytes per second."""
        return self.pages_per_second * PAGE_SIZE


class DirtyTracker:
    """Tracks dirty pages of a running VM in a background thread.

    In ``"ring"`` mode the tracker owns every vCPU's dirty ring (taken at :meth:`start`);
    vCPU threads pass their ring-full exits to :meth:`on_ring_full`, which harvests and resets
    at once in the calling thread.  In ``"bitmap"`` mode it polls KVM_GET_DIRTY_LOG (and clears
    with KVM_CLEAR_DIRTY_LOG under manual protect).  ``"auto"`` picks the ring when the VM has
    one.  Every ``interval`` seconds the worker harvests (no busy polling), accumulates per-slot
    bitmaps, and records a :class:`RateSample`.

    :meth:`take` returns everything dirtied since the previous take, already harvested and
    reset, so page contents may be read right after it.  The first error of any pass (e.g. a
    ring overrun), in the worker or in a vCPU thread, stops the tracker and is re-raised by
    ``take``, ``rate``, ``on_ring_full``, ``start`` and ``stop``; nothing harvested by a
    failed pass is lost: ``close()`` hands what the tracker collected since the last ``take``
    to the VM, whose next collection reports it.  To go on after an overrun: ``close()`` the
    tracker, recover the rings (:meth:`kvmio.DirtyRing.recover_from_overrun`), resynchronise,
    and start a new tracker.
    vCPUs created while tracking are adopted by the next pass.
    """

    def __init__(self, vm: Vm, mode: Mode = "auto", *, interval: float = 0.05,
                 window: float = 1.0, heatmap_bins: int = 128, history: int = 100_000):
        if mode not in ("ring", "bitmap", "auto"):
            raise KvmInvalidArgumentError(f"mode must be 'ring', 'bitmap' or 'auto', not {mode!r}")
        if not interval > 0:
            raise KvmInvalidArgumentError("interval must be positive")
        if heatmap_bins < 1:
            raise KvmInvalidArgumentError("heatmap_bins must be >= 1")
        if mode == "auto":
            mode = "ring" if vm.dirty_ring is not None else "bitmap"
        if mode == "ring" and vm.dirty_ring is None:
            raise KvmStateError("ring mode needs the dirty ring enabled on the VM")
        if mode == "bitmap" and vm.dirty_ring is not None:
            # vCPU writes go to the rings (the backup bitmap only holds writes made outside
            # vCPU context), so polling the bitmap would miss them, and full rings would stall.
            raise KvmStateError("bitmap mode is unavailable on a VM with the dirty ring; use "
                                "ring mode")
        self.vm = vm
        self.mode: Literal["ring", "bitmap"] = mode
        self.interval = interval
        self.window = window
        self._lock = threading.RLock()
        self._rings: dict[int, DirtyRing] = {}
        self._acc: dict[int, npt.NDArray[np.bool_]] = {}
        self._vm_window = WindowCounter(window)
        self._vcpu_windows: dict[int, WindowCounter] = {}
        self.samples: collections.deque[RateSample] = collections.deque(maxlen=history)
        self.heatmap_rows: collections.deque[npt.NDArray[np.int64]] = collections.deque(
            maxlen=history)
        self._bins = heatmap_bins
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._t0 = time.monotonic()
        self._last = self._t0
        self.passes = 0
        self.entries = 0
        #: Seconds spent in passes, in whichever thread ran them (wall clock: an upper bound on
        #: their CPU time; per-thread CPU clocks cost a system call each on some hosts).
        self.cpu_time = 0.0
        self._closed = False

    # -- lifetime ---------------------------------------------------------------------------

    def start(self) -> DirtyTracker:
        """Take the rings (ring mode) and start the worker thread."""
        with self._lock:
            if self._closed:
                raise KvmStateError("this tracker is closed")
            self._raise_error()
            if self._thread is not None:
                raise KvmStateError("the tracker is already running")
            if self.mode == "ring":
                if not self.vm.vcpus:
                    raise KvmStateError("create the vCPUs before starting a ring tracker")
                self._adopt_rings(check_all=True)
            self._t0 = self._last = time.monotonic()
            self._stop.clear()
            self._thread = threading.Thread(target=self._worker, name="kvmio-dirty-tracker",
                                            daemon=True)
            self._thread.start()
        return self

    def _adopt_rings(self, check_all: bool = False) -> None:
        """Take the ring of every vCPU not tracked yet (vCPUs may be created while tracking)."""
        vcpus = sorted(self.vm.vcpus.items())
        new = [(vid, v) for vid, v in vcpus if vid not in self._rings and v._ring is not None]
        if check_all:  # all or nothing
            for vid, v in new:
                if v._ring_taken:
                    raise KvmStateError(f"the dirty ring of vCPU {vid} is owned elsewhere")
        for vid, v in new:
            if not v._ring_taken:
                self._rings[vid] = v.take_dirty_ring()
                self._vcpu_windows[vid] = WindowCounter(self.window)

    def stop(self) -> None:
        """Stop the worker (after one last pass) and join it; re-raise a tracker error."""
        t = self._thread
        if t is not None:
            self._stop.set()
            t.join()
            self._thread = None
        self._raise_error()

    def close(self) -> None:
        """Stop, hand the rings back to their vCPUs, and hand the pages collected since the
        last :meth:`take` to the VM (its next :meth:`kvmio.Vm.collect_dirty_pages`, or the next
        tracker, reports them: they were harvested and reset already, so nothing else would).
        Re-raises a tracker error once; closing again does nothing."""
        if self._closed:
            return
        try:
            self.stop()
        finally:
            with self._lock:
                self._closed = True
                for vid, ring in self._rings.items():
                    vcpu = self.vm._vcpus.get(vid)
                    if vcpu is not None and vcpu._ring is ring:
                        vcpu._ring_taken = False
                self._rings.clear()
                acc, self._acc = self._acc, {}
                for slot, a in acc.items():
                    p = np.flatnonzero(a).astype(np.uint64)
                    if len(p):
                        self.vm._adopt_orphans(
                            DirtyEntries(np.full(len(p), slot, dtype=np.uint32), p), 0)

    def __enter__(self) -> DirtyTracker:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        if t is None:
            self.close()
        else:
            with contextlib.suppress(BaseException):  # the body's exception is the one to report
                self.close()

    @property
    def running(self) -> bool:
        """Whether the worker thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the worker, if any."""
        return self._error

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _worker(self) -> None:
        while True:
            stopping = self._stop.wait(self.interval)
            try:
                with self._lock:
                    if self._closed:
                        return
                    self._pass()
            except BaseException:
                return  # recorded by _pass (by whichever thread failed first)
            if stopping:
                return

    # -- passes -----------------------------------------------------------------------------

    def _pass(self, final: bool = False) -> None:
        """One pass; the first error of any pass (in any thread) stops the tracker and is
        recorded for the caller.  Caller holds the lock."""
        if self._closed:
            raise KvmStateError("this tracker is closed")
        self._raise_error()
        try:
            self._pass_inner(final)
        except Exception as e:
            if self._error is None:
                self._error = e
            raise

    def _pass_inner(self, final: bool) -> None:
        """Harvest + reset (or get + clear) once; caller holds the lock.  Entries harvested
        before a failure are handed back to their rings, so a failed pass loses nothing."""
        now = time.monotonic()
        regions = self.vm.regions
        per_vcpu: dict[int, dict[int, npt.NDArray[np.uint64]]] = {}
        pages: dict[int, npt.NDArray[np.uint64]] = {}
        entries = 0
        if self.mode == "ring":
            # Under the VM's ring lock from adoption to reset: no vCPU can close its ring in
            # between, so every ring harvested here is reset here.
            with self.vm._ring_lock:
                self._adopt_rings()
                harvested, orphans = self.vm._harvest_and_reset(list(self._rings.values()))
            # From here on nothing may raise: these pages are harvested and reset already.
            for ring, got in harvested:
                entries += len(got)
                if len(got):
                    per_vcpu[ring.vcpu_id] = {s.slot: p for s, p in got.distinct_pages().items()
                                              if s.address_space == 0}
            for o in orphans:
                entries += len(o)
                for sid, p in o.distinct_pages().items():
                    if sid.address_space == 0:
                        q = pages.get(sid.slot)
                        pages[sid.slot] = p if q is None else sorted_unique(np.concatenate((q, p)))
            for d in per_vcpu.values():
                for slot, p in d.items():
                    pages[slot] = (sorted_unique(np.concatenate((pages[slot], p)))
                                   if slot in pages else p)
            self._accumulate(pages, regions)
            if final and self.vm.dirty_ring is not None and self.vm.dirty_ring.with_bitmap:
                extra_pages: dict[int, npt.NDArray[np.uint64]] = {}
                for slot, region in regions.items():  # the backup bitmap, last
                    if region.log_dirty:
                        extra = self.vm.get_dirty_log(slot)
                        if len(extra):
                            extra_pages[slot] = extra
                            q = pages.get(slot)
                            pages[slot] = extra if q is None else np.union1d(q, extra)
                self._accumulate(extra_pages, regions)
        else:
            for o in self.vm._take_orphans():  # e.g. left by an earlier tracker
                for sid, p in o.distinct_pages().items():
                    if sid.address_space == 0:
                        self._accumulate({sid.slot: p}, regions)
            for slot, region in regions.items():
                if region.log_dirty:
                    logged = self.vm.get_dirty_log(slot)
                    if len(logged):
                        if self.vm.manual_dirty_log_protect:
                            self.vm.clear_dirty_log(slot, pages=logged)
                        pages[slot] = logged
                        self._accumulate({slot: logged}, regions)
        sizes = {s: r.num_pages for s, r in regions.items()}
        pages = {s: p[p < np.uint64(sizes[s])] for s, p in pages.items() if s in sizes}
        distinct, span = self._vm_window.add(self._last, now, pages, sizes)
        vrates = {}
        for vid, win in self._vcpu_windows.items():
            vd, vs = win.add(self._last, now, per_vcpu.get(vid, {}), sizes)
            vrates[vid] = vd / vs if vs > 0 else 0.0
        npages = sum(len(p) for p in pages.values())
        self.samples.append(RateSample(now - self._t0, npages, entries,
                                       distinct / span if span > 0 else 0.0, vrates))
        self.heatmap_rows.append(self._histogram(pages))
        self._last = now
        self.passes += 1
        self.entries += entries
        self.cpu_time += time.monotonic() - now

    def _accumulate(self, pages: dict[int, npt.NDArray[np.uint64]],
                    regions: dict[int, MemoryRegion]) -> None:
        """Add pages to the per-slot bitmaps; pages of slots that no longer exist (or beyond a
        smaller successor) are dropped.  Never raises."""
        for slot, p in pages.items():
            region = regions.get(slot)
            if region is None:
                continue
            acc = self._acc.get(slot)
            if acc is None or len(acc) != region.num_pages:  # new, or a re-created slot
                acc = self._acc[slot] = np.zeros(region.num_pages, dtype=np.bool_)
            acc[p[p < np.uint64(region.num_pages)]] = True

    def _histogram(self, pages: dict[int, npt.NDArray[np.uint64]]) -> npt.NDArray[np.int64]:
        lo, hi = self.tracked_span()
        regions = self.vm.regions
        if not pages or hi <= lo:
            return np.zeros(self._bins, dtype=np.int64)
        scale = self._bins / (hi - lo)
        idx = np.concatenate([
            ((regions[s].guest_phys_addr - lo + p.astype(np.float64) * PAGE_SIZE) * scale)
            .astype(np.int64) for s, p in pages.items()])
        return np.bincount(np.clip(idx, 0, self._bins - 1), minlength=self._bins)

    def tracked_span(self) -> tuple[int, int]:
        """``(lowest, highest)`` guest physical address of the dirty-logged slots."""
        rs = [r for r in self.vm.regions.values() if r.log_dirty]
        if not rs:
            return 0, 0
        return min(r.guest_phys_addr for r in rs), max(r.end for r in rs)

    # -- public operations ------------------------------------------------------------------

    def on_ring_full(self, vcpu: Vcpu) -> None:
        """For vCPU threads: call on KVM_EXIT_DIRTY_RING_FULL, then run the vCPU again.

        Harvests every ring and resets, in the calling thread, so the vCPU can re-enter at once
        and nothing is lost.  Re-raises a tracker error.  Once the tracker is closed (its rings
        handed back), the vCPU's own ring is harvested into its stash and reset instead.
        """
        if self.mode != "ring":
            raise KvmStateError("on_ring_full is for ring mode")
        with self._lock:
            if self._closed:
                vcpu._drain_own_ring()
                return
            self._pass()

    def take(self, *, final: bool = False) -> DirtyRanges:
        """Everything dirtied since the previous take (or start), harvested and reset already:
        the pages' contents may be read right after this returns.

        ``final=True`` (with the vCPUs stopped) also collects the ring's backup bitmap
        (WITH_BITMAP), as the last step."""
        with self._lock:
            self._pass(final)  # refuses once closed, re-raises a tracker error
            acc, self._acc = self._acc, {}
        regions = self.vm.regions
        pages = {s: np.flatnonzero(a).astype(np.uint64) for s, a in acc.items()}
        bases = {s: regions[s].guest_phys_addr for s in pages if s in regions}
        return DirtyRanges.from_pages({s: p for s, p in pages.items() if s in bases}, bases)

    def rate(self) -> DirtyRate:
        """The latest windowed dirty rate (VM and, in ring mode, per vCPU)."""
        self._raise_error()
        if not self.samples:
            return DirtyRate(0.0, {}, self.window)
        s = self.samples[-1]
        return DirtyRate(s.pages_per_second, dict(s.vcpu_pages_per_second), self.window)

    def heatmap(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], tuple[int, int]]:
        """``(times, counts[pass, bin], (lo, hi))``: dirty pages per address bin per pass."""
        times = np.array([s.time for s in self.samples], dtype=np.float64)
        rows = list(self.heatmap_rows)
        counts = np.vstack(rows) if rows else np.zeros((0, self._bins), dtype=np.int64)
        return times, counts, self.tracked_span()
