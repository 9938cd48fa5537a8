"""The pages a VM changed since the last look, for a :class:`~kvmio.snapshot.files.Snapshotter`
and a migration (:mod:`kvmio.migration`).

:class:`ChangeLog` is a dirty-log consumer: it takes the log (every vCPU's ring, or the bitmap
claim) unless a :class:`~kvmio.tracker.DirtyTracker` holds it, opens a host-write record on
every slot, and :meth:`ChangeLog.collect` returns the pages changed since the previous call:
guest writes from the log plus host writes from the records.  Wherever it cannot know (a
ring overrun, a slot that is not dirty-logged, a slot added or replaced since), it names the
slot *whole* instead: the caller then treats every page of it.  Doubt never hides a page.

(:class:`kvmio.snapshot.memory.MemoryCheckpoint` consumes the log the same way for its own
resets; its collection is private to it.)
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from kvmio._abi import PAGE_SIZE
from kvmio.dirty.ring import DirtyRing, sorted_unique
from kvmio.errors import DirtyRingError, KvmError, KvmStateError, SnapshotError
from kvmio.memory import HostWriteRecord, MemoryRegion, runs_to_pages
from kvmio.tracker import DirtyTracker
from kvmio.vm import DirtyLogClaim, Vm

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
        self._rings: list[DirtyRing] = []
        self._ring_vcpus: set[int] | None = None
        self._claim: list[DirtyLogClaim | None] = [None]
        self._records: dict[int, tuple[MemoryRegion, HostWriteRecord]] = {}
        self._open: list[HostWriteRecord] = []  # every record opened, for the finaliser
        self._repair = False  # a ring overran: repair it at the next final collection
        self._finalizer = weakref.finalize(self, _give_back, vm, self._rings, self._open,
                                           self._claim)
        try:
            if tracker is None:
                if vm.ring_set is None:
                    try:
                        self._claim[0] = vm.claim_dirty_log("a Snapshotter")
                    except KvmStateError as e:
                        raise SnapshotError(f"{e.message}; pass that tracker as tracker=") from e
                else:
                    self._adopt_rings()
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

    def _adopt_rings(self) -> list[DirtyRing]:
        vcpus = self._vm.vcpus
        if vcpus.keys() != self._ring_vcpus:
            have = {r.vcpu_id for r in self._rings}
            for vid, v in sorted(vcpus.items()):
                ring = v.ring
                if vid in have or ring is None:
                    continue
                if ring.taken:
                    raise SnapshotError(
                        f"the dirty ring of vCPU {vid} is owned by another harvester; a diff "
                        "snapshot needs every guest write: pass the DirtyTracker that holds "
                        "the rings as tracker=")
                self._rings.append(ring.take())
            self._ring_vcpus = set(vcpus)
        return [r for r in self._rings if not r.closed]

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
            page = np.uint64(PAGE_SIZE)
            for slot, sr in ranges.slots.items():
                if slot in whole or slot not in regions:
                    continue
                first = (sr.gpas - np.uint64(regions[slot].guest_phys_addr)) // page
                out.pages[slot] = runs_to_pages(first, sr.lengths // page)
            return
        if vm.ring_set is None:
            got = vm.collect_dirty_pages(final=final, claim=self._claim[0])
            out.pages.update({s: p for s, p in got.pages.items() if s in regions})
            return
        rings = self._adopt_rings()
        if final and self._repair:
            self._repair_rings(rings)
        try:
            got = vm.collect_dirty_pages(final=final, rings=rings, on_overrun="report")
        except DirtyRingError as e:
            self._overran(out, rings, final, str(e), regions)
            return
        out.pages.update({s: p for s, p in got.pages.items() if s in regions})
        if got.overruns:
            self._overran(out, rings, final, "; ".join(
                f"vCPU {v}: {why}" for v, why in sorted(got.overruns.items())), regions)
        elif any(r.hole_pending or r.shortfall for r in rings):
            self._overran(out, rings, final, "a ring is out of step since an overrun", regions)

    def _overran(self, out: Changes, rings: list[DirtyRing], final: bool, why: str,
                 regions: dict[int, MemoryRegion]) -> None:
        """Pages may have been lost: every slot is whole.  With the vCPUs stopped, repair the
        rings and collect once more, so that the next collection starts afresh."""
        out.whole |= set(regions)
        out.why.append(f"a dirty ring overran ({why})")
        self._repair = True
        if final:
            self._repair_rings(rings)
            with contextlib.suppress(DirtyRingError):
                again = self._vm.collect_dirty_pages(final=True, rings=rings,
                                                     on_overrun="report")
                self._repair = bool(again.overruns) or any(r.hole_pending or r.shortfall
                                                           for r in rings)

    def _repair_rings(self, rings: list[DirtyRing]) -> None:
        for ring in rings:
            with contextlib.suppress(KvmError):
                if ring.shortfall:
                    ring.resync()
                if ring.hole_pending:
                    ring.recover_from_overrun()


def _give_back(vm: Vm, rings: list[DirtyRing], records: list[HostWriteRecord],
               claim: list[DirtyLogClaim | None]) -> None:
    for ring in rings:
        ring.release()
    rings.clear()
    for record in records:
        record.close()
    records.clear()
    if claim[0] is not None and not vm.closed:
        vm.release_dirty_log(claim[0])
    claim[0] = None
