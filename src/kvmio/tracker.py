"""A background dirty tracker: harvests while vCPUs run, coalesces dirty pages into ranges, and
measures the dirty rate (distinct pages per second over a sliding window, per VM and per vCPU).

This layer sits above :mod:`kvmio.vm` and :mod:`kvmio.dirty`; it adds no ioctl of its own.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import numpy as np
import numpy.typing as npt

from kvmio import _check
from kvmio._abi import PAGE_SIZE
from kvmio.dirty.pages import PageSet, coalesce
from kvmio.dirty.ring import DirtyEntries, DirtyRing
from kvmio.dirty.ringset import VM_WIDE
from kvmio.errors import KvmInvalidArgumentError, KvmStateError
from kvmio.memory import MemoryRegion
from kvmio.vcpu import Vcpu
from kvmio.vm import DirtyLogClaim, DirtyPages, Vm

__all__ = ["DirtyRanges", "DirtyRate", "DirtyTracker", "PassListener", "RateSample",
           "SlotRanges", "WindowCounter", "coalesce"]

Mode = Literal["ring", "bitmap", "auto"]

# --------------------------------------------------------------------------------------------
# Range tables


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
    """What :meth:`DirtyTracker.take` returns: coalesced dirty runs, per slot and in total.

    ``wholly_dirty`` names the slots reported whole because a ring overran since the previous
    take (the kernel overwrote entries, so which pages were written is unknown): the caller
    must treat (copy, compare, resend) the whole slot.
    """

    slots: dict[int, SlotRanges]
    wholly_dirty: frozenset[int] = frozenset()

    @classmethod
    def from_pages(cls, pages: Mapping[int, npt.NDArray[np.uint64]],
                   bases: Mapping[int, int]) -> DirtyRanges:
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
        the window: the distinct pages of the passes whose span is closest to the window, and
        the time those passes cover."""
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
        # Keep the passes whose span is closest to the window: drop the oldest while the span
        # without it is at least as close.  (Dropping it only once the next one starts before
        # the window did left the span up to a pass interval longer than the window whenever
        # a pass came a little late, and a saturated working set, whose distinct count does
        # not grow with the span, then read up to interval / window low.)
        while len(self._starts) > 1 and (abs(t_end - self._starts[1][1] - self.window)
                                         <= abs(t_end - self._starts[0][1] - self.window)):
            q, _ = self._starts.popleft()
            self.distinct -= self._counts.pop(q)
        return self.distinct, t_end - self._starts[0][1]


# --------------------------------------------------------------------------------------------
# The tracker

#: ``listener(sample, harvested_at)``: called after each pass with its :class:`RateSample` and
#: the ``time.monotonic()`` of its harvest (see :meth:`DirtyTracker.add_pass_listener`).
PassListener = Callable[["RateSample", float], None]


@dataclass(frozen=True)
class RateSample:
    """One pass of the tracker: when, what it found, and the windowed rates at that time."""

    time: float
    pages: int
    entries: int
    pages_per_second: float
    vcpu_pages_per_second: dict[int, float] = field(default_factory=dict)
    #: Seconds the rate's passes cover (the window, give or take half a pass interval): the
    #: rate is their distinct pages divided by this.
    span: float = 0.0
    #: Distinct pages this pass found in each vCPU's ring (ring mode; empty in bitmap mode,
    #: where the kernel does not say which vCPU wrote a page).
    vcpu_pages: dict[int, int] = field(default_factory=dict)

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
    reset, so page contents may be read right after it.

    Ring overruns (a guest that writes more pages in one emulation batch than the ring has
    room for, e.g. a kernel clearing its bss with ``rep stos``): by default the tracker
    survives them.  It notes the overrun (:attr:`overrun_events`), reports every dirty-logged
    slot whole in the next :meth:`take` (:attr:`DirtyRanges.wholly_dirty`), and recovers the
    ring from the vCPU's thread at its next ring-full exit (:meth:`on_ring_full`, when the
    vCPU is outside KVM_RUN as recovery needs; :attr:`recoveries` counts them).  A ring that
    lost more than it can recover leaves its vCPU stuck on ring-full, which the runner
    reports as :class:`DirtyRingOverrunError`.  With ``strict=True`` the first overrun is an
    error instead.

    The first error of any pass, in the worker or in a vCPU thread, stops the tracker and is
    re-raised by ``take``, ``rate``, ``on_ring_full``, ``start`` and ``stop``; nothing
    harvested by a failed pass is lost: ``close()`` hands what the tracker collected since the
    last ``take`` to the VM, whose next collection reports it.

    ``log_slots``: slots whose dirty logging the tracker turns on at :meth:`start` and off
    again at :meth:`close` (as a migration does), so that a guest runs unlogged until
    tracking starts.  vCPUs created while tracking are adopted by the next pass; slots may be
    added and deleted while it runs (pages of a deleted slot are counted in
    :attr:`dropped`).
    """

    def __init__(self, vm: Vm, mode: Mode = "auto", *, interval: float = 0.05,
                 window: float = 1.0, heatmap_bins: int = 128, history: int = 100_000,
                 strict: bool = False, log_slots: Iterable[int] = ()):
        _check.instance("vm", vm, Vm)
        if mode not in ("ring", "bitmap", "auto"):
            raise KvmInvalidArgumentError(f"mode must be 'ring', 'bitmap' or 'auto', not {mode!r}")
        interval = _check.positive_float("interval", interval)
        window = _check.positive_float("window", window)
        heatmap_bins = _check.integer("heatmap_bins", heatmap_bins, lo=1, hi=1 << 20)
        history = _check.integer("history", history, lo=1)
        log_slots = _check.sequence("log_slots", log_slots)
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
        #: Entries and pages collected for memory that no longer exists (deleted slots).
        self.dropped = 0
        #: Seconds spent in passes, in whichever thread ran them (wall clock: an upper bound on
        #: their CPU time; per-thread CPU clocks cost a system call each on some hosts).
        self.cpu_time = 0.0
        self._closed = False
        self._claim: DirtyLogClaim | None = None
        #: Ring mode: raise at the first overrun (True), or survive it (False: recover the
        #: ring, report the tracked slots as wholly dirty in the next take, go on).
        self.strict = bool(strict)
        #: Overruns survived: ``(time since start, vCPU id, why)``.
        self.overrun_events: list[tuple[float, int, str]] = []
        #: Rings recovered after an overrun.
        self.recoveries = 0
        self._wholly_dirty: set[int] = set()
        self._log_slots = sorted({_check.integer("log_slots item", s) for s in log_slots})
        regions = vm.regions
        for slot in self._log_slots:
            if slot not in regions:
                raise KvmInvalidArgumentError(f"log_slots names slot {slot}, which does not exist")
        self._logging_started: list[int] = []
        self._listeners: list[PassListener] = []

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
            elif self._claim is None:
                self._claim = self.vm.claim_dirty_log("a DirtyTracker")
            for slot in self._log_slots:  # dirty logging starts when tracking starts
                if not self.vm.regions[slot].log_dirty:
                    self.vm.set_dirty_logging(slot, True)
                    self._logging_started.append(slot)
            self._t0 = self._last = time.monotonic()
            self._stop.clear()
            self._thread = threading.Thread(
                target=DirtyTracker._worker, args=(weakref.ref(self), self._stop, self.interval),
                name="kvmio-dirty-tracker", daemon=True)
            self._thread.start()
        return self

    def _adopt_rings(self, check_all: bool = False) -> None:
        """Take the ring of every vCPU not tracked yet (vCPUs may be created while tracking)."""
        new = [(vid, v.ring) for vid, v in sorted(self.vm.vcpus.items())
               if vid not in self._rings and v.ring is not None]
        if check_all:  # all or nothing
            for vid, ring in new:
                if ring is not None and ring.taken:
                    raise KvmStateError(f"the dirty ring of vCPU {vid} is owned elsewhere")
        for vid, ring in new:
            if ring is not None and not ring.taken:
                self._rings[vid] = ring.take()
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
        """Stop, hand the rings (or the dirty-log claim) back, and hand the pages collected
        since the last :meth:`take` to the VM (:meth:`kvmio.Vm.adopt_dirty_pages`: its next
        collection, or the next tracker, reports them, since they were harvested and reset
        already).  Re-raises a tracker error once; closing again does nothing.

        The last pass of ``close()`` is not final: it does not read the backup bitmap
        (WITH_BITMAP).  For the complete picture, call ``take(final=True)`` with the vCPUs
        stopped before closing, or ``vm.collect_dirty_pages(final=True)`` after."""
        if self._closed:
            return
        try:
            self.stop()
        finally:
            with self._lock:
                self._closed = True
                for ring in self._rings.values():
                    ring.release()
                self._rings.clear()
                if self._claim is not None:
                    self.vm.release_dirty_log(self._claim)
                    self._claim = None
                self._hand_back_pages()  # first: turning logging off below may fail
                logging, self._logging_started = self._logging_started, []
                for slot in logging:
                    if not self.vm.closed and slot in self.vm.regions:
                        self.vm.set_dirty_logging(slot, False)

    def _hand_back_pages(self) -> None:
        """Give the pages collected since the last take (and slots owed whole) to the VM."""
        acc, self._acc = self._acc, {}
        whole, self._wholly_dirty = self._wholly_dirty, set()
        if self.vm.closed:
            return
        sizes = self.vm.slot_pages()
        pages = PageSet.from_mask(acc).union(PageSet(
            {s: np.arange(sizes[s], dtype=np.uint64) for s in whole if s in sizes}))
        if pages.count:
            self.vm.adopt_dirty_pages(pages)

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
    def started_at(self) -> float:
        """``time.monotonic()`` at :meth:`start`: sample times are seconds since then."""
        return self._t0

    @property
    def worker_thread(self) -> threading.Thread | None:
        """The worker thread while the tracker runs (e.g. to read its CPU time)."""
        return self._thread

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

    @staticmethod
    def _worker(ref: weakref.ReferenceType[DirtyTracker], stop: threading.Event,
                interval: float) -> None:
        # The thread holds the tracker only weakly between passes, so that a tracker dropped
        # without close() can be collected: its finaliser stops this thread.
        while True:
            stopping = stop.wait(interval)
            tracker = ref()
            if tracker is None:
                return
            try:
                with tracker._lock:
                    if tracker._closed:
                        return
                    tracker._pass()
            except BaseException:
                return  # recorded by _pass (by whichever thread failed first)
            finally:
                del tracker
            if stopping:
                return

    def __del__(self) -> None:
        # A tracker dropped without close(): stop its thread and give its rings back, with a
        # ResourceWarning as Python's own files do.
        if getattr(self, "_closed", True) or getattr(self, "_thread", None) is None:
            return
        warnings.warn("unclosed DirtyTracker; call close() or use 'with'", ResourceWarning,
                      source=self, stacklevel=2)
        self._stop.set()
        with contextlib.suppress(Exception):
            self._closed = True
            for ring in self._rings.values():
                ring.release()
            if self._claim is not None:
                self.vm.release_dirty_log(self._claim)
            self._hand_back_pages()

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
        """One collection (harvest + reset, or get + clear) through the VM; caller holds the
        lock.  The VM hands back whatever a failed collection had harvested, so a failed pass
        loses nothing."""
        t_start = time.monotonic()
        with contextlib.ExitStack() as holds:
            if self.mode == "ring":
                got = self._collect_rings(holds, final)
            else:
                got = self.vm.collect_dirty_pages(claim=self._claim)
            # The pass covers the time up to its harvest: stamp it with the harvest's own time,
            # not before or after the collection (under load a collection can wait, or be
            # preempted after harvesting, and its pages would be credited to the wrong span).
            # From here on nothing may raise: the pages are harvested and reset already.
            now = got.harvested_at
            sizes = {slot: r.num_pages for slot, r in got.regions.items()}  # as collected
            pages, dropped = got.pages.restrict(sizes)
            self.dropped += got.dropped + dropped
            self._accumulate(pages, sizes)
            for vid, why in got.overruns.items():
                self._note_overrun(now, vid, why)
            if self.mode == "ring" and not self.strict:
                self._repair_rings(now)
        distinct, span = self._vm_window.add(self._last, now, dict(pages), sizes)
        vrates, vpages = {}, {}
        for vid, win in self._vcpu_windows.items():
            mine = got.per_vcpu.get(vid, PageSet())
            vd, vs = win.add(self._last, now, dict(mine), sizes)
            vrates[vid] = vd / vs if vs > 0 else 0.0
            vpages[vid] = mine.count
        sample = RateSample(now - self._t0, pages.count, got.entries,
                            distinct / span if span > 0 else 0.0, vrates, span, vpages)
        self.samples.append(sample)
        self.heatmap_rows.append(self._histogram(pages, got.regions))
        self._last = now
        self.passes += 1
        self.entries += got.entries
        self.cpu_time += time.monotonic() - t_start
        for listener in list(self._listeners):
            listener(sample, now)  # an error stops the tracker, as any pass error does

    def _collect_rings(self, holds: contextlib.ExitStack, final: bool) -> DirtyPages:
        """Harvest and reset the tracked rings.  A ring that overran is harvested only with its
        vCPU held outside KVM_RUN (its hold stays in ``holds`` until the pass ends): harvested
        while the kernel laps it, a reset can stop short and leave it out of step.  Such a
        ring whose vCPU is inside KVM_RUN now waits for a later pass (its vCPU's ring-full
        exit, or a pause), and its slots stay wholly dirty meanwhile."""
        rs = self.vm.ring_set
        assert rs is not None
        with rs.lock:  # no vCPU can close its ring between adoption and harvest
            self._adopt_rings()
            rings, held = [], []
            for ring in self._rings.values():
                if ring.suspect and not self.strict and not ring.closed:
                    try:
                        holds.enter_context(ring.hold_vcpu())
                    except KvmStateError:  # inside KVM_RUN: not now
                        self._note_overrun(time.monotonic(), ring.vcpu_id, "", record=False)
                        continue
                    if ring.shortfall:  # back in step first, then harvest from there
                        self._take_repaired(ring.resync())
                    held.append(ring)
                rings.append(ring)
            got = self.vm.collect_dirty_pages(final=final, rings=rings,
                                              on_overrun="raise" if self.strict else "report")
            for ring in held:
                if ring.vcpu_id not in got.overruns and VM_WIDE not in got.overruns:
                    ring.mark_in_step()  # harvested and reset while held, cleanly
            return got

    def _repair_rings(self, now: float) -> None:
        """After a collection: recover the overrun rings whose vCPUs are outside KVM_RUN.
        Under the ring set's lock, as the collection: a vCPU closing meanwhile (which needs
        that lock to unmap its ring) waits for the repair, and is not unmapped under it."""
        rs = self.vm.ring_set
        assert rs is not None
        with rs.lock:
            for ring in list(self._rings.values()):
                if ring.closed:  # its vCPU closed: the ring set reported what it held
                    continue
                if ring.shortfall or ring.hole_pending:
                    # Out of step or stopped at a hole: entries past it are not harvested
                    # until repaired, so every tracked slot stays wholly dirty meanwhile.
                    self._note_overrun(now, ring.vcpu_id, "", record=False)
                    with contextlib.suppress(KvmStateError):  # its vCPU is inside KVM_RUN
                        if ring.shortfall:
                            self._take_repaired(ring.resync())
                        if ring.hole_pending:
                            self._recover(ring)

    def _note_overrun(self, now: float, vcpu_id: int, why: str, record: bool = True) -> None:
        """A ring overran (non-strict mode): its lost entries could name any tracked page, so
        every dirty-logged slot is reported whole by the next take.  Never raises."""
        if record:
            self.overrun_events.append((now - self._t0, vcpu_id, why))
        for slot, region in self.vm.regions.items():
            if region.log_dirty:
                self._wholly_dirty.add(slot)

    def _accumulate(self, pages: PageSet, sizes: dict[int, int]) -> None:
        """Add pages to the per-slot bitmaps (a slot re-created with another size starts
        afresh).  Never raises."""
        for slot, p in pages.items():
            size = sizes.get(slot)
            if size is None:
                continue
            acc = self._acc.get(slot)
            if acc is None or len(acc) != size:  # new, or a re-created slot
                acc = self._acc[slot] = np.zeros(size, dtype=np.bool_)
            acc[p] = True

    def _histogram(self, pages: PageSet,
                   regions: Mapping[int, MemoryRegion]) -> npt.NDArray[np.int64]:
        lo, hi = self._span(regions)
        parts = [((regions[s].guest_phys_addr - lo + p.astype(np.float64) * PAGE_SIZE)
                  * (self._bins / (hi - lo))).astype(np.int64)
                 for s, p in pages.items() if s in regions and hi > lo]
        if not parts:
            return np.zeros(self._bins, dtype=np.int64)
        idx = np.concatenate(parts)
        return np.bincount(np.clip(idx, 0, self._bins - 1), minlength=self._bins)

    def tracked_span(self) -> tuple[int, int]:
        """``(lowest, highest)`` guest physical address of the dirty-logged slots (and of the
        ``log_slots``, also once the tracker closed and turned their logging off)."""
        return self._span(self.vm.regions)

    def _span(self, regions: Mapping[int, MemoryRegion]) -> tuple[int, int]:
        rs = [r for s, r in regions.items() if r.log_dirty or s in self._log_slots]
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
            ring = vcpu.ring
            if self._closed:
                if ring is not None:
                    ring.drain()
                return
            if (not self.strict and ring is not None and self._rings.get(vcpu.id) is ring
                    and ring.stuck()):
                # Overrun by more than the ring's soft limit (a rep stos over many pages):
                # nothing to harvest, the kernel still counts the lost entries.  Step past
                # them, a soft limit at a time, at each such exit (no pass needed: this ring
                # has nothing, and the worker collects the others).
                first = not ring.suspect
                skipped = ring.recover_stuck()
                self._note_overrun(time.monotonic(), vcpu.id,
                                   f"the ring was stuck full: {skipped} lost entries skipped",
                                   record=first)
                return
            self._pass()  # recovers this vCPU's ring if it overran (it is outside KVM_RUN)

    def _recover(self, ring: DirtyRing) -> None:
        """Recover an overrun ring while its vCPU is outside KVM_RUN (raises KvmStateError
        when it is inside); what the recovery harvests is accumulated.  A ring with nothing
        past its hole cannot be recovered yet: if that lasts, its vCPU stays stuck on
        ring-full, which the runner reports as an overrun error."""
        self._take_repaired(ring.recover_from_overrun())
        if not ring.hole_pending:
            self.recoveries += 1

    def _take_repaired(self, got: DirtyEntries) -> None:
        """Accumulate entries that a ring repair harvested."""
        sizes = self.vm.slot_pages()
        pages, dropped = PageSet.from_entries(got, sizes)
        self.dropped += dropped
        self._accumulate(pages, sizes)
        self.entries += len(got)

    def take(self, *, final: bool = False) -> DirtyRanges:
        """Everything dirtied since the previous take (or start), harvested and reset already:
        the pages' contents may be read right after this returns.

        ``final=True`` (with the vCPUs stopped) also collects the ring's backup bitmap
        (WITH_BITMAP), as the last step."""
        with self._lock:
            self._pass(final)  # refuses once closed, re-raises a tracker error
            acc, self._acc = self._acc, {}
            whole, self._wholly_dirty = self._wholly_dirty, set()
            regions = self.vm.regions
        whole &= set(regions)
        pages, _ = PageSet.from_mask({s: a for s, a in acc.items() if s not in whole}).restrict(
            {s: r.num_pages for s, r in regions.items()})
        ranges = DirtyRanges.from_pages(pages, {s: r.guest_phys_addr
                                                for s, r in regions.items()})
        slots = dict(ranges.slots)
        for s in whole:  # one run each, never materialised page by page
            r = regions[s]
            slots[s] = SlotRanges(s, np.array([r.guest_phys_addr], dtype=np.uint64),
                                  np.array([r.size], dtype=np.uint64), r.num_pages)
        return DirtyRanges(slots, frozenset(whole))

    def add_pass_listener(self, listener: PassListener) -> None:
        """Call ``listener(sample, harvested_at)`` after every pass, in the thread that ran it
        (the worker, or a vCPU thread in :meth:`on_ring_full`), with the tracker's lock held:
        it must be quick and must not call back into the tracker's passes.  An exception it
        raises stops the tracker like any error of a pass (the pass's pages are kept)."""
        if not callable(listener):
            raise KvmInvalidArgumentError("a pass listener must be callable")
        with self._lock:
            self._listeners.append(listener)

    def remove_pass_listener(self, listener: PassListener) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        with self._lock, contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def rate(self) -> DirtyRate:
        """The latest windowed dirty rate (VM and, in ring mode, per vCPU)."""
        self._raise_error()
        with self._lock:
            if not self.samples:
                return DirtyRate(0.0, {}, self.window)
            s = self.samples[-1]
        return DirtyRate(s.pages_per_second, dict(s.vcpu_pages_per_second), self.window)

    def heatmap(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], tuple[int, int]]:
        """``(times, counts[pass, bin], (lo, hi))``: dirty pages per address bin per pass."""
        with self._lock:  # a pass may append meanwhile
            times = np.array([s.time for s in self.samples], dtype=np.float64)
            rows = list(self.heatmap_rows)
        counts = np.vstack(rows) if rows else np.zeros((0, self._bins), dtype=np.int64)
        return times, counts, self.tracked_span()
