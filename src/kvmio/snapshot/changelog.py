"""The pages a VM changed since the last look, for a :class:`~kvmio.snapshot.files.Snapshotter`
and a migration (:mod:`kvmio.migration`).

:class:`ChangeLog` is a dirty-log consumer: it takes the log (every vCPU's ring, or the bitmap
claim) unless a :class:`~kvmio.tracker.DirtyTracker` holds it, opens a host-write record on
every slot, and :meth:`ChangeLog.collect` returns the pages changed since the previous call:
guest writes from the log plus host writes from the records.  Wherever it cannot know (a
ring overrun, a slot that is not dirty-logged, a slot added or replaced since), it names the
slot *whole* instead: the caller then treats every page of it.  Doubt never hides a page.

(:class:`kvmio.snapshot.memory.MemoryCheckpoint` consumes the log the same way for its own
resets, through the same holder, ``kvmio.snapshot._dirtylog``.)
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from kvmio.dirty.ring import DirtyRing, sorted_unique
from kvmio.errors import DirtyRingError, SnapshotError
from kvmio.memory import HostWriteRecord, MemoryRegion
from kvmio.snapshot._dirtylog import LogHold, give_back, tracker_pages
from kvmio.tracker import DirtyTracker
from kvmio.vm import Vm

__all__ = ["ChangeLog", "Changes"]

Pages = npt.NDArray[np.uint64]


@dataclass
class Changes:
    """What :meth:`ChangeLog.collect` found: changed pages per slot (sorted, distinct), the
    slots to treat whole, and why they are."""

    pages: dict[int, Pages] = field(default_factory=dict)
    whole: set[int] = field(default_factory=set)
    why: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Changed pages named (whole slots not counted)."""
        return sum(len(p) for s, p in self.pages.items() if s not in self.whole)


class ChangeLog:
    """The pages ``vm`` changed since the last :meth:`collect` (see the module).  Close it to
    give the dirty log back; dropped without closing, its finaliser does."""

    def __init__(self, vm: Vm, *, tracker: DirtyTracker | None = None):
        self._vm = vm
        self._tracker = tracker
        self._log = LogHold(vm, "a Snapshotter", "a diff snapshot")
        self._records: dict[int, tuple[MemoryRegion, HostWriteRecord]] = {}
        self._open: list[HostWriteRecord] = []  # every record opened, for the finaliser
        self._repair = False  # a ring overran: repair it at the next final collection
        self._finalizer = weakref.finalize(self, give_back, vm, self._log.rings, self._open,
                                           self._log.claim)
        try:
            if tracker is None:  # else the tracker holds the log
                self._log.own()
            self._sync_records()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Give the rings or the claim back and close the records (idempotent)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return not self._finalizer.alive

    def _sync_records(self) -> set[int]:
        """A host-write record for every slot; returns the slots that had none (new, or
        replaced since the last collection), whose changes are unknown."""
        regions = self._vm.regions
        fresh: set[int] = set()
        for slot in list(self._records):
            region, record = self._records[slot]
            if regions.get(slot) is not region:
                record.close()
                del self._records[slot]
        for slot, region in regions.items():
            if slot not in self._records:
                record = region.record_host_writes()
                self._open.append(record)
                self._records[slot] = (region, record)
                fresh.add(slot)
        self._open[:] = [r for _, r in self._records.values()]
        return fresh

    def collect(self, *, final: bool) -> Changes:
        """The pages changed since the previous collection (or since this log was made).
        ``final``: the vCPUs are stopped (held outside KVM_RUN by the caller), so the picture
        is complete and overrun rings can be repaired."""
        if self.closed:
            raise SnapshotError("this change log is closed")
        out = Changes()
        fresh = self._sync_records()
        if fresh:
            out.whole |= fresh
            out.why.append(f"slots {sorted(fresh)} are new since the last snapshot")
        regions = self._vm.regions
        self._collect_log(out, final, regions)
        for slot, region in regions.items():
            if not (region.log_dirty or region.readonly):
                out.whole.add(slot)
        unlogged = sorted(s for s, r in regions.items() if not (r.log_dirty or r.readonly))
        if unlogged:
            out.why.append(f"slots {unlogged} are not dirty-logged")
        for slot, (_, record) in self._records.items():
            host = record.take()
            if not len(host):
                continue
            guest = out.pages.get(slot)
            out.pages[slot] = host if guest is None or not len(guest) else \
                sorted_unique(np.concatenate((guest, host)))
        return out

    def _collect_log(self, out: Changes, final: bool, regions: dict[int, MemoryRegion]) -> None:
        vm = self._vm
        tracker = self._tracker
        if tracker is not None:
            ranges = tracker.take(final=final)
            whole = set(ranges.wholly_dirty) & set(regions)
            if whole:
                out.whole |= whole
                out.why.append(f"the tracker reported slots {sorted(whole)} wholly dirty "
                               "(a ring overran)")
            out.pages.update(tracker_pages(ranges, regions, whole))
            return
        if vm.ring_set is None:
            got = vm.collect_dirty_pages(final=final, claim=self._log.claim[0])
            out.pages.update({s: p for s, p in got.pages.items() if s in regions})
            return
        rings = self._log.adopt_rings()
        if final and self._repair:
            LogHold.repair(rings)
        try:
            got = vm.collect_dirty_pages(final=final, rings=rings, on_overrun="report")
        except DirtyRingError as e:
            self._overran(out, rings, final, str(e), regions)
            return
        out.pages.update({s: p for s, p in got.pages.items() if s in regions})
        if got.overruns:
            self._overran(out, rings, final, "; ".join(
                f"vCPU {v}: {why}" for v, why in sorted(got.overruns.items())), regions)
        elif LogHold.out_of_step(rings):
            self._overran(out, rings, final, "a ring is out of step since an overrun", regions)

    def _overran(self, out: Changes, rings: list[DirtyRing], final: bool, why: str,
                 regions: dict[int, MemoryRegion]) -> None:
        """Pages may have been lost: every slot is whole.  With the vCPUs stopped, repair the
        rings and collect once more, so that the next collection starts afresh."""
        out.whole |= set(regions)
        out.why.append(f"a dirty ring overran ({why})")
        self._repair = True
        if final:
            LogHold.repair(rings)
            with contextlib.suppress(DirtyRingError):
                again = self._vm.collect_dirty_pages(final=True, rings=rings,
                                                     on_overrun="report")
                self._repair = bool(again.overruns) or LogHold.out_of_step(rings)
