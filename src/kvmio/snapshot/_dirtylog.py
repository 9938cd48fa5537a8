"""The VM's dirty log held by one consumer: what :class:`~kvmio.snapshot.memory.MemoryCheckpoint`
and :class:`~kvmio.snapshot.changelog.ChangeLog` share.

A consumer without a :class:`~kvmio.tracker.DirtyTracker` owns the log: every vCPU's dirty ring
(taken as vCPUs appear), or, without rings, the VM's bitmap claim.  With a tracker it owns
nothing (the tracker does) and turns the tracker's ranges into pages.  After a ring overran,
the rings are repaired with their vCPUs stopped.  :func:`give_back` returns everything,
also from a finaliser (it holds no reference to the consumer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from kvmio._abi import PAGE_SIZE
from kvmio.dirty.ring import DirtyRing
from kvmio.errors import KvmError, KvmStateError, SnapshotError
from kvmio.memory import HostWriteRecord, MemoryRegion, runs_to_pages
from kvmio.tracker import DirtyRanges
from kvmio.vm import DirtyLogClaim, Vm

Pages = npt.NDArray[np.uint64]


class LogHold:
    """The dirty log as ``who`` (e.g. ``"a MemoryCheckpoint"``) holds it; ``needs``: what it
    needs every guest write for, for the error when another harvester owns a ring.

    :attr:`rings` (every ring taken) and :attr:`claim` (a one-item list: a cell a finaliser
    can share) are what :func:`give_back` returns."""

    def __init__(self, vm: Vm, who: str, needs: str):
        self.vm = vm
        self.rings: list[DirtyRing] = []
        self.claim: list[DirtyLogClaim | None] = [None]
        self._who = who
        self._needs = needs
        self._open: list[DirtyRing] = []
        self._ring_vcpus: set[int] | None = None  # the vCPUs whose rings were looked at

    def own(self) -> None:
        """Take the log: the bitmap claim, or every vCPU's ring.  Raises
        :class:`SnapshotError` if someone else holds it (a tracker: pass it)."""
        if self.vm.ring_set is None:
            try:
                self.claim[0] = self.vm.claim_dirty_log(self._who)
            except KvmStateError as e:
                raise SnapshotError(f"{e.message}; pass that tracker as tracker=") from e
            return
        self.adopt_rings()

    def adopt_rings(self) -> list[DirtyRing]:
        """Take the ring of every vCPU not looked at yet (all of them at first, those created
        since later); the open rings to collect.  Without a vCPU created or closed since the
        last call, the same list, at the cost of one comparison."""
        vcpus = self.vm.vcpus
        if vcpus.keys() == self._ring_vcpus:
            return self._open
        have = {r.vcpu_id for r in self.rings}
        for vid, v in sorted(vcpus.items()):
            ring = v.ring
            if vid in have or ring is None:
                continue
            if ring.taken:
                raise SnapshotError(
                    f"the dirty ring of vCPU {vid} is owned by another harvester; "
                    f"{self._needs} needs every guest write: pass the DirtyTracker that holds "
                    "the rings as tracker=")
            self.rings.append(ring.take())
        self._open = [r for r in self.rings if not r.closed]
        self._ring_vcpus = set(vcpus)
        return self._open

    @staticmethod
    def out_of_step(rings: list[DirtyRing]) -> bool:
        """Whether a ring is out of step since an overrun (a hole or a shortfall pending)."""
        return any(r.hole_pending or r.shortfall for r in rings)

    @staticmethod
    def repair(rings: list[DirtyRing]) -> None:
        """Bring rings that overran back in step (their vCPUs stopped); errors are left for
        the next collection to report."""
        for ring in rings:
            with contextlib.suppress(KvmError):
                if ring.shortfall:
                    ring.resync()
                if ring.hole_pending:
                    ring.recover_from_overrun()


def tracker_pages(ranges: DirtyRanges, regions: Mapping[int, MemoryRegion],
                  skip: set[int]) -> dict[int, Pages]:
    """A tracker's dirty ranges as sorted page indices per slot of ``regions``, but for the
    slots in ``skip``."""
    page = np.uint64(PAGE_SIZE)
    out: dict[int, Pages] = {}
    for slot, sr in ranges.slots.items():
        if slot in skip or slot not in regions:
            continue
        first = (sr.gpas - np.uint64(regions[slot].guest_phys_addr)) // page
        out[slot] = runs_to_pages(first, sr.lengths // page)
    return out


def give_back(vm: Vm, rings: list[DirtyRing], records: list[HostWriteRecord],
              claim: list[DirtyLogClaim | None]) -> None:
    """Release the rings and the claim and close the records (a consumer's finaliser: also
    when it is dropped without close)."""
    for ring in rings:
        ring.release()
    rings.clear()
    for record in records:
        record.close()
    records.clear()
    if claim[0] is not None and not vm.closed:
        vm.release_dirty_log(claim[0])
    claim[0] = None
