"""The rings of one VM as one object: :class:`RingSet`.

KVM_RESET_DIRTY_RINGS is a VM ioctl that recycles the harvested entries of *every* vCPU's ring,
so the accounting that makes "reset count == harvested count" checkable is per VM: one lock
that serialises every harvest with every reset, the count each ring harvested since the last
reset, what the rings of closed vCPUs still held (their *orphans*), and overruns noticed when a
ring closed.  The ring set also runs the harvest -> reset transaction that every collection
uses.  It knows nothing of the VM object: the VM hands it the reset ioctl when it builds it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from kvmio._abi import Mapping, ffi, lib
from kvmio.dirty.ring import (
    _MAX_GROUPS,
    _NO_ENTRIES,
    DirtyEntries,
    DirtyRing,
    OverrunPolicy,
    _no_guard,
    _OutputPool,
)
from kvmio.errors import DirtyRingOverrunError, KvmInvalidArgumentError, KvmStateError

#: The key of :attr:`Harvest.overruns` for an overrun not tied to one open ring.
VM_WIDE = -1

#: How many times a reset is repeated at most (each repeat follows a partial count that a
#: pending signal caused; the kernel returns 0 once nothing is left).
_MAX_RESET_CALLS = 1 << 20


@dataclass(frozen=True)
class Harvest:
    """What :meth:`RingSet.harvest_and_reset` took: per ring, and the orphans of closed rings."""

    rings: list[tuple[DirtyRing, DirtyEntries]]
    orphans: list[DirtyEntries]
    #: With ``on_overrun="report"``: the rings found overrun by this harvest (vCPU id -> why;
    #: :data:`VM_WIDE` for a reset whose count did not match, or a closed vCPU's ring).
    overruns: dict[int, str] = field(default_factory=dict)
    #: ``time.monotonic()`` right after the rings were harvested (before the reset): the end
    #: of the period the harvest covers.
    time: float = 0.0
    #: The open rings' entries as sorted distinct pages, ``(raw slot, pages, entries)`` per
    #: slot, when the compiled collection made them (no ring signalled anything); else
    #: ``None``.  Orphans are not in it.
    groups: list[tuple[int, npt.NDArray[np.uint64], int]] | None = None

    @property
    def entries(self) -> int:
        """Entries taken in all."""
        return sum(len(g) for _, g in self.rings) + sum(len(o) for o in self.orphans)

    def all_entries(self) -> DirtyEntries:
        """Every entry, orphans first, then ring by ring."""
        return DirtyEntries.concat([*self.orphans, *(g for _, g in self.rings)])


class RingSet:
    """The dirty rings of one VM and their shared accounting.

    ``reset_ioctl`` issues KVM_RESET_DIRTY_RINGS once and returns the kernel's count.
    """

    def __init__(self, entries: int, reset_ioctl: Callable[[], int]):
        self.entries = entries
        #: Serialises every harvest with every reset (re-entrant).
        self.lock = threading.RLock()
        self._reset_ioctl = reset_ioctl
        self._rings: dict[int, DirtyRing] = {}
        self._orphans: list[DirtyEntries] = []
        self._orphan_pending = 0
        self._overrun_note: str | None = None
        self._reset_report: tuple[int, str] | None = None
        # The native harvest of every ring: a control array for the open rings, the rings it
        # was filled for, one output pool for all of them, and the call's signal cell.
        self._ctl: Any = None
        self._ctl_rings: list[DirtyRing] = []
        self._drain_next = False  # the last reset did not match: recycle all at the next
        self._capacity = 0
        self._pool: _OutputPool | None = None
        self._signals = ffi.new("int *", 0)
        self._total = ffi.new("uint32_t *", 0)
        self._page_pool: _OutputPool | None = None
        self._group_cells = ffi.new("uint32_t[]", 4 * _MAX_GROUPS)

    def __repr__(self) -> str:
        return f"<RingSet entries={self.entries} rings={sorted(self._rings)}>"

    # -- rings ------------------------------------------------------------------------------

    def map_ring(self, vcpu_id: int, vcpu_fd: int, *,
                 outside_run: Callable[[], AbstractContextManager[None]] = _no_guard,
                 memory: Mapping | None = None) -> DirtyRing:
        """Map vCPU ``vcpu_id``'s ring (from its fd) and add it to the set.

        ``memory``: ring memory to use instead of the vCPU's (the ring takes it over and unmaps
        it on close): for models of the kernel's ring protocol, whose ``reset_ioctl`` is the
        model's reset; ``vcpu_fd`` is then unused."""
        with self.lock:
            if vcpu_id in self._rings:
                raise KvmStateError(f"vCPU {vcpu_id} already has a ring in this set")
            ring = DirtyRing(self, vcpu_id, vcpu_fd, self.entries, outside_run=outside_run,
                             memory=memory)
            self._rings[vcpu_id] = ring
            return ring

    def open_rings(self) -> list[DirtyRing]:
        """The open rings, in vCPU creation order (a new list)."""
        with self.lock:
            return list(self._rings.values())

    @property
    def rings(self) -> dict[int, DirtyRing]:
        """The open rings by vCPU id (a copy)."""
        with self.lock:
            return dict(self._rings)

    def detach(self, ring: DirtyRing, left: DirtyEntries, pending: int, *,
               overrun: bool = False) -> None:
        """A closing ring leaves the set: what it still held (``left``, harvested and not yet
        reported) is reported by the next collection, its ``pending`` count is checked by the
        next reset, and an ``overrun`` it can no longer report is raised by the next reset."""
        with self.lock:
            if self._rings.get(ring.vcpu_id) is ring:
                del self._rings[ring.vcpu_id]
            if len(left):
                self._orphans.append(left)
            self._orphan_pending += pending
            if overrun:
                self._overrun_note = (f"the dirty ring of vCPU {ring.vcpu_id} was overrun when "
                                      "the vCPU closed")

    # -- orphans ----------------------------------------------------------------------------

    def adopt(self, entries: DirtyEntries) -> None:
        """Keep entries that were harvested and reset already but not reported yet (e.g. the
        pages a tracker collected when it closes); the next collection reports them."""
        if len(entries):
            with self.lock:
                self._orphans.append(entries)

    def take_orphans(self) -> list[DirtyEntries]:
        """Everything adopted so far (and forget it)."""
        with self.lock:
            out, self._orphans = self._orphans, []
            return out

    def return_orphans(self, orphans: list[DirtyEntries]) -> None:
        """Give back orphans taken by a collection that then failed (they come first)."""
        with self.lock:
            self._orphans[:0] = orphans

    # -- reset and the transaction ----------------------------------------------------------

    def pending_reset(self) -> int:
        """Entries harvested (from open and closed rings) since the last reset."""
        with self.lock:
            return sum(r.pending_reset for r in self._rings.values()) + self._orphan_pending

    def reset(self, *, on_overrun: OverrunPolicy = "raise") -> int:
        """KVM_RESET_DIRTY_RINGS: recycle every harvested entry of every ring, and check that
        the kernel's count equals the entries harvested since the last reset.

        The call is repeated until it returns 0, because a pending signal cuts it short without
        an error.  A mismatch, or an overrun noted when a ring closed, raises
        :class:`DirtyRingOverrunError` (with ``on_overrun="report"`` it is kept for
        :meth:`take_reset_report` instead); the accounting starts afresh either way.
        """
        with self.lock:
            rings = list(self._rings.values())
            expected = sum(r.pending_reset for r in rings) + self._orphan_pending
            drain, self._drain_next = self._drain_next, False
            if (expected == 0 and self._overrun_note is None and not drain
                    and not any(r.lapped for r in rings)):
                return 0  # nothing harvested, nothing noted: nothing to recycle or check
            harvested = [r for r in rings if r.pending_reset]
            total = 0
            try:
                # Nothing harvested: nothing for the kernel to recycle, no call needed.  Else
                # repeat only while the sum is short of the harvest (a signal cut it short).
                # After a mismatch (drain), until the kernel returns 0: entries it left marked
                # harvested then are recycled now.
                for _ in range(_MAX_RESET_CALLS if expected or drain else 0):
                    n = self._reset_ioctl()
                    total += n
                    if n == 0 or (total >= expected and not drain):
                        break
            finally:
                # Whatever the kernel reset is no longer pending, even if a later call failed.
                left = total
                take = min(left, self._orphan_pending)
                self._orphan_pending -= take
                left -= take
                for r in rings if left else ():
                    left -= r.settle_reset(left)
            # Matched or not, the kernel has now reset everything it could: start afresh.
            # Which ring a short reset is to blame on: the only ring harvested since the last
            # reset, or else the only one of them found full (lapped).  A ring that harvested
            # nothing contributed nothing to the walk, so it cannot be short.
            lapped = [r for r in harvested if r.lapped]
            suspects = harvested if len(harvested) == 1 else lapped
            self._orphan_pending = 0
            for r in rings:
                r.forget_pending()
            note, self._overrun_note = self._overrun_note, None
            if total != expected and not (drain and total > expected):
                why = (f"KVM_RESET_DIRTY_RINGS reset {total} entries but {expected} were "
                       "harvested since the last reset")
                # Short because the kernel overwrote some harvested entries of a lapped ring
                # before the reset reached them: if one ring can be to blame, it owes the
                # difference, and resync() brings it back in step once its vCPU is out.
                if on_overrun == "report" and total < expected and len(suspects) == 1:
                    suspects[0].add_shortfall(expected - total)
                    self._reset_report = (suspects[0].vcpu_id, why)
                    return total
                # No ring can be blamed alone: every ring harvested since the last reset may
                # be out of step (hole scans over the whole ring from now on), and the next
                # reset recycles everything it can, uncounted entries included.
                for r in harvested:
                    r.mark_suspect()
                self._drain_next = True
                raise DirtyRingOverrunError(
                    f"{why}: the ring's state is inconsistent and dirty pages may have been "
                    "lost; treat the tracked slots as wholly dirty, and use a bigger ring or "
                    "bitmap mode", lost=abs(expected - total))
            if note is not None:
                if on_overrun == "report":
                    self._reset_report = (VM_WIDE, note)
                    return total
                raise DirtyRingOverrunError(
                    f"{note}: dirty pages may have been lost; treat the tracked slots as wholly "
                    "dirty and resynchronise them")
            return total

    def _harvest_native(self, live: list[DirtyRing], on_overrun: OverrunPolicy,
                        harvested: list[tuple[DirtyRing, DirtyEntries]]
                        ) -> list[tuple[int, npt.NDArray[np.uint64], int]] | None:
        """Harvest ``live`` (open rings) in one native call, then let each ring account for
        its part; ``harvested`` receives ``(ring, entries)`` for every ring, also when one of
        them raises an overrun (raised after all were accounted for, so that the caller can
        give every ring's entries back)."""
        if self._ctl_rings != live:
            # Control entries point into the rings' mappings: rebuilt whenever the set of open
            # rings differs (a closed ring is never in `live`), and they hold the rings, so an
            # id is never reused for another ring while cached.
            ctl = ffi.new("struct kvmio_ring_ctl[]", len(live))
            for k, ring in enumerate(live):
                ring.fill_native_ctl(ctl, k)
            self._ctl, self._ctl_rings = ctl, list(live)
            self._capacity = sum(r.size for r in live)
        else:
            ctl = self._ctl  # each ring keeps its entry's hole window current
        if self._pool is None or self._page_pool is None or self._pool.size < self._capacity:
            self._pool = _OutputPool(self._capacity)
            self._page_pool = _OutputPool(self._capacity, np.uint64)
        slots, offsets, ps, po = self._pool.get_raw()
        pages, scratch, pp, pt = self._page_pool.get_raw()
        g = self._group_cells
        # Safety: all four arrays hold the sum of the rings' sizes, the most the call writes,
        # and stay referenced during it; the group cells hold KVMIO_DEDUP_MAX_GROUPS each;
        # every ring is open (its mapping stays until close(), which needs our lock).
        ngroups = lib.kvmio_rings_collect(ctl, len(live), ps, po, self._signals, self._total,
                                          pp, pt, g, g + _MAX_GROUPS, g + 2 * _MAX_GROUPS,
                                          g + 3 * _MAX_GROUPS)
        # From here on every ring's entries are marked harvested but not yet accounted for:
        # whatever is raised (a Ctrl-C included), the rings not settled yet keep theirs.
        settled = 0
        try:
            if ngroups == 0:  # every ring caught up, nothing new
                for ring in live:
                    harvested.append((ring, ring.settle_native(slots, offsets, 0,
                                                               on_overrun=on_overrun)
                                      if ring.has_stash else _NO_ENTRIES))
                    settled += 1
                return None
            groups = None
            if ngroups > 0:
                # Sorted distinct pages of every ring's entries.  Few pages (or few for the
                # buffer) are copied, so that they do not hold the pooled buffer; many are
                # read-only views of it.
                total = int(self._total[0])
                small = total < 1024 or 4 * total < self._capacity
                out = []
                for k in range(ngroups):
                    start = int(g[_MAX_GROUPS + k])
                    view = pages[start:start + int(g[2 * _MAX_GROUPS + k])]
                    if small:
                        view = view.copy()
                    view.flags.writeable = False
                    out.append((int(g[k]), view, int(g[3 * _MAX_GROUPS + k])))
                groups = out
            del pages, scratch
            if groups is not None and any(r.has_stash for r in live):
                groups = None  # stashed entries come first in their rings: the groups lack them
            first_error: BaseException | None = None
            at = 0
            for k, ring in enumerate(live):
                n = int(ctl[k].n)
                try:
                    # Views: the Harvest that holds them is dropped before the next collection.
                    got = ring.settle_native(slots[at:at + n], offsets[at:at + n], n,
                                             on_overrun=on_overrun, copy=False)
                except DirtyRingOverrunError as e:  # the ring kept its entries (its stash)
                    first_error = first_error or e
                    got = _NO_ENTRIES
                harvested.append((ring, got))
                settled += 1
                at += n
        except BaseException:
            at = sum(int(ctl[k].n) for k in range(settled))
            for k in range(settled, len(live)):
                n = int(ctl[k].n)
                live[k].keep_harvested(slots[at:at + n], offsets[at:at + n], n)
                at += n
            raise
        if first_error is not None:
            raise first_error
        return groups

    def take_reset_report(self) -> tuple[int, str] | None:
        """``(vCPU id or VM_WIDE, why)`` of the overrun a reset with ``on_overrun="report"``
        noted (and forget it)."""
        with self.lock:
            got, self._reset_report = self._reset_report, None
            return got

    def harvest_and_reset(self, rings: Iterable[DirtyRing] | None = None, *,
                          on_overrun: OverrunPolicy = "raise") -> Harvest:
        """Harvest ``rings`` (default: every open ring) and take the orphans, then reset: one
        transaction under the lock.  If anything fails, everything harvested is given back (to
        its ring, or to the orphans) for the next collection, and the error raised.  Rings
        that closed meanwhile are skipped (they gave their entries to the orphans).  With
        ``on_overrun="report"`` an overrun ring does not fail the transaction: it is named in
        :attr:`Harvest.overruns` (its owner recovers it, see
        :meth:`DirtyRing.recover_from_overrun`)."""
        with self.lock:
            if rings is None:
                todo = list(self._rings.values())
            else:
                todo = list(dict.fromkeys(rings))  # each ring once
                for r in todo:
                    if not isinstance(r, DirtyRing) or r.ring_set is not self:
                        raise KvmInvalidArgumentError(
                            f"{r!r} is not a ring of this ring set")
            live = [r for r in todo if not r.closed]
            harvested: list[tuple[DirtyRing, DirtyEntries]] = []
            orphans = self.take_orphans()
            groups = None
            try:
                if live:
                    groups = self._harvest_native(live, on_overrun, harvested)
                t = time.monotonic()
                self.reset(on_overrun=on_overrun)
            except BaseException:
                for ring, got in harvested:
                    ring.give_back(got)
                self.return_orphans(orphans)
                raise
            overruns = {}
            for ring, got in harvested:
                if not len(got) and not ring.overruns:
                    continue  # never overran: nothing to report
                why = ring.take_overrun_report()
                if why is not None:
                    overruns[ring.vcpu_id] = why
            report = self.take_reset_report()
            if report is not None:
                overruns[report[0]] = report[1]
            return Harvest(harvested, orphans, overruns, t, groups)
