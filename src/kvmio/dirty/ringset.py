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
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from kvmio._abi import Mapping, PageRestore, ffi, lib
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
    #: Nanoseconds the KVM_RESET_DIRTY_RINGS calls of this collection took.
    reset_ns: int = 0

    @property
    def entries(self) -> int:
        """Entries taken in all."""
        return sum(len(g) for _, g in self.rings) + sum(len(o) for o in self.orphans)

    def all_entries(self) -> DirtyEntries:
        """Every entry, orphans first, then ring by ring."""
        return DirtyEntries.concat([*self.orphans, *(g for _, g in self.rings)])


class QuickHarvest:
    """What a clean :meth:`RingSet.collect_quick` took (harvested, reset exactly, deduped).

    ``groups``: sorted distinct pages per raw slot, ``(raw slot, pages, entries)``
    (read-only arrays of one page at least), and ``lasts`` the largest page of each;
    ``entries``: entries harvested in all; ``counts``: ``(vCPU id, entries)`` of each ring
    that had any, in harvest order; ``time``: ``time.monotonic()`` between the harvest and the
    reset; ``reset_ns``: what the reset calls took.  :meth:`entries_of` gives the raw entries
    (views of pooled buffers, valid until the next collection).
    """

    __slots__ = ("_offsets", "_slots", "counts", "entries", "groups", "lasts", "reset_ns",
                 "restored", "time")

    def __init__(self, groups: Sequence[tuple[int, npt.NDArray[np.uint64], int]], entries: int,
                 counts: Sequence[tuple[int, int]], t: float,
                 slots: npt.NDArray[np.uint32] | None = None,
                 offsets: npt.NDArray[np.uint64] | None = None, *, restored: bool = False,
                 lasts: Sequence[int] = (), reset_ns: int = 0):
        self.groups = groups
        self.lasts = lasts
        self.reset_ns = reset_ns
        #: Whether the call also restored the pages (``collect_quick(restore=)``); the groups
        #: are then empty.
        self.restored = restored
        self.entries = entries
        self.counts = counts
        self.time = t
        self._slots = slots
        self._offsets = offsets

    def entries_of(self, k: int | None = None) -> DirtyEntries:
        """The raw entries of ring ``k`` of :attr:`counts` (default: of all rings)."""
        if self._slots is None or self._offsets is None:
            return _NO_ENTRIES
        at = sum(n for _, n in self.counts[:k]) if k is not None else 0
        n = self.counts[k][1] if k is not None else self.entries
        return DirtyEntries(self._slots[at:at + n], self._offsets[at:at + n])


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
        self._out = ffi.new("struct kvmio_collect_out *")
        self._summary: Any = None  # what the quick collection reads back (see _prepare_native)
        # Bumped whenever a ring joins or leaves; the control array is good for the quick
        # collection only if it was built for every open ring at the current generation.
        self._gen = 0
        self._ctl_gen = -1

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
            self._gen += 1
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
            self._gen += 1
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
                self._count_reset(total, rings)
            return self._check_reset(total, expected, drain, rings, harvested, on_overrun)

    def _count_reset(self, total: int, rings: list[DirtyRing]) -> None:
        """``total`` entries were recycled by the kernel: no longer pending (orphans first)."""
        left = total
        take = min(left, self._orphan_pending)
        self._orphan_pending -= take
        left -= take
        for r in rings if left else ():
            left -= r.settle_reset(left)

    def _check_reset(self, total: int, expected: int, drain: bool, rings: list[DirtyRing],
                     harvested: list[DirtyRing], on_overrun: OverrunPolicy) -> int:
        """After the reset calls: start the accounting afresh and check ``total`` against
        ``expected`` (see :meth:`reset`)."""
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

    def _prepare_native(self, live: list[DirtyRing]) -> Any:
        """The control array for ``live`` (open rings) and output pools big enough for all."""
        if self._ctl_rings != live:
            # Control entries point into the rings' mappings: rebuilt whenever the set of open
            # rings differs (a closed ring is never in `live`), and they hold the rings, so an
            # id is never reused for another ring while cached.
            ctl = ffi.new("struct kvmio_ring_ctl[]", len(live))
            for k, ring in enumerate(live):
                ring.fill_native_ctl(ctl, k)
            # The quick collection's summary: total, each ring's count, five cells per group.
            cells = 1 + len(live) + 5 * _MAX_GROUPS
            summary = ffi.new("uint64_t[]", cells)
            self._out.summary, self._out.summary_cap = summary, cells
            self._ctl, self._ctl_rings, self._summary = ctl, list(live), summary
            self._capacity = sum(r.size for r in live)
        # `live` are open rings of this set: as many as are open means every one.
        self._ctl_gen = self._gen if len(live) == len(self._rings) else -1
        if self._pool is None or self._page_pool is None or self._pool.size < self._capacity:
            self._pool = _OutputPool(self._capacity)
            self._page_pool = _OutputPool(self._capacity, np.uint64)
        return self._ctl  # each ring keeps its entry's hole window current

    def _harvest_native(self, live: list[DirtyRing], on_overrun: OverrunPolicy,
                        harvested: list[tuple[DirtyRing, DirtyEntries]]
                        ) -> list[tuple[int, npt.NDArray[np.uint64], int]] | None:
        """Harvest ``live`` (open rings) in one native call, then let each ring account for
        its part; ``harvested`` receives ``(ring, entries)`` for every ring, also when one of
        them raises an overrun (raised after all were accounted for, so that the caller can
        give every ring's entries back)."""
        ctl = self._prepare_native(live)
        assert self._pool is not None and self._page_pool is not None
        slots, offsets, ps, po = self._pool.get_raw()
        pages, scratch, pp, pt, pbytes = self._page_pool.get_raw_bytes()
        g = self._group_cells
        # Safety: all four arrays hold the sum of the rings' sizes, the most the call writes,
        # and stay referenced during it; the group cells hold KVMIO_DEDUP_MAX_GROUPS each;
        # every ring is open (its mapping stays until close(), which needs our lock).
        ngroups = lib.kvmio_rings_collect(ctl, len(live), ps, po, self._signals, self._total,
                                          pp, pt, g, g + _MAX_GROUPS, g + 2 * _MAX_GROUPS,
                                          g + 3 * _MAX_GROUPS)
        del scratch
        return self._settle_native(live, ngroups, int(self._total[0]), on_overrun, harvested,
                                   slots, offsets, pages, pbytes)

    def _settle_native(self, live: list[DirtyRing], ngroups: int, total: int,
                       on_overrun: OverrunPolicy,
                       harvested: list[tuple[DirtyRing, DirtyEntries]],
                       slots: npt.NDArray[np.uint32], offsets: npt.NDArray[np.uint64],
                       pages: npt.NDArray[np.uint64], pbytes: Any
                       ) -> list[tuple[int, npt.NDArray[np.uint64], int]] | None:
        """Every ring's accounting for a native harvest of ``live`` into ``slots``/``offsets``
        (``ngroups`` > 0: the call grouped the entries into ``pages``, whose bytes ``pbytes``
        reads, and the group cells; 0: nothing harvested and no ring signalled anything)."""
        ctl = self._ctl
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
                g = self._group_cells
                groups = self._groups(((g[k], g[_MAX_GROUPS + k], g[2 * _MAX_GROUPS + k],
                                        g[3 * _MAX_GROUPS + k]) for k in range(ngroups)),
                                      total, pages, pbytes)
            del pages
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

    def _groups(self, cells: Iterable[Sequence[int]], total: int, pages: npt.NDArray[np.uint64],
                pbytes: Any) -> list[tuple[int, npt.NDArray[np.uint64], int]]:
        """The native call's groups, ``(raw slot, start, length, entries)`` cells: sorted
        distinct pages of every ring's entries per slot, in ``pages`` (whose bytes ``pbytes``
        reads).  Few pages (or few for the buffer) are copied out (as bytes: read-only arrays
        without a numpy call), so that they do not hold the pooled buffer; many are read-only
        views of it."""
        small = total < 1024 or 4 * total < self._capacity
        out = []
        for raw, start, length, entries in cells:
            if small:
                view = np.frombuffer(pbytes[8 * start:8 * (start + length)], np.uint64)
            else:
                view = pages[start:start + length]
                view.flags.writeable = False
            out.append((raw, view, entries))
        return out

    def quiet(self) -> bool:
        """Whether a collection of every ring needs no accounting beyond counting: nothing
        adopted, pending, noted or reported, every open ring :attr:`DirtyRing.quiet`, and the
        native control array built for exactly the open rings (by an earlier collection)."""
        with self.lock:
            return (self._ctl_gen == self._gen and not self._orphans
                    and not self._orphan_pending and not self._drain_next
                    and self._overrun_note is None and self._reset_report is None
                    and all(r.quiet for r in self._ctl_rings))

    def collect_quick(self, reset_fd: int, on_overrun: OverrunPolicy = "raise",
                      rings: list[DirtyRing] | None = None, restore: PageRestore | None = None
                      ) -> QuickHarvest | Harvest | None:
        """The whole harvest -> reset -> dedup of every open ring in one native call, when
        the set is :meth:`quiet` and ``rings`` is every open ring (its owner's list; default:
        every open ring, none of them owned by a harvester) (else ``None``, and nothing was
        done): KVM_RESET_DIRTY_RINGS
        is issued on ``reset_fd`` (the VM's fd, valid while the caller holds :attr:`lock`;
        -1: through the ``reset_ioctl`` the set was built with).  A clean result is a
        :class:`QuickHarvest`; anything else (a ring signalled, a reset failed or did not
        match, too many slots) is accounted for exactly as :meth:`harvest_and_reset` does,
        which raises or returns a :class:`Harvest`.

        With ``restore`` (bound, see :class:`kvmio._abi.PageRestore`), a clean collection
        also restores the pages in the same call, if every check passes
        (:attr:`QuickHarvest.restored`; ``restore.done``): its groups are then not built."""
        with self.lock:
            # quiet(), inline: this runs right after KVM_RUN, where every call costs.
            live = self._ctl_rings
            if (self._ctl_gen != self._gen or self._orphans or self._orphan_pending
                    or self._drain_next or self._overrun_note is not None
                    or self._reset_report is not None):
                return None
            for ring in live:
                if not ring.quiet or (rings is None and ring.taken):
                    return None
            if rings is not None and (len(rings) != len(live) or {id(x) for x in rings}
                                      != {id(x) for x in live}):
                return None
            out = self._out
            # First a probe, without buffers (an idle VM's collection is just that).
            # Safety: NULL buffers make the call read the rings only (mapped: see below);
            # a bound `restore` holds exports of everything its table points to (see
            # PageRestore.bind), and the call writes guest memory only at checked pages.
            # (A reset with pages to restore skips it: it expects a harvest.)
            if restore is None:
                r = lib.kvmio_rings_collect_reset(self._ctl, len(live), ffi.NULL, ffi.NULL,
                                                  ffi.NULL, ffi.NULL, self._group_cells,
                                                  reset_fd, lib.KVM_RESET_DIRTY_RINGS, out)
                if r == 0:
                    return QuickHarvest((), 0, (), out.harvested_at)
            assert self._pool is not None and self._page_pool is not None
            slots, offsets, ps, po = self._pool.get_raw()
            pages, scratch, pp, pt, pbytes = self._page_pool.get_raw_bytes()
            # Safety: as in _harvest_native (the same arrays, control array and rings); the
            # group cells hold 4 * KVMIO_DEDUP_MAX_GROUPS; out.summary (built with the control
            # array, for as many rings) has room for all the groups; reset_fd is the caller's
            # open fd.
            if restore is None:
                r = lib.kvmio_rings_collect_reset(self._ctl, len(live), ps, po, pp, pt,
                                                  self._group_cells, reset_fd,
                                                  lib.KVM_RESET_DIRTY_RINGS, out)
            else:
                r = lib.kvmio_rings_collect_restore(self._ctl, len(live), ps, po, pp, pt,
                                                    self._group_cells, reset_fd,
                                                    lib.KVM_RESET_DIRTY_RINGS, out,
                                                    *restore.args())
            del scratch
            restored = restore is not None and restore.done
            if r == 0:
                return QuickHarvest((), 0, (), out.harvested_at, restored=restored)
            if r > 0:
                # Right after KVM_RUN every Python step is slow (cold caches): the call left
                # what we need in the summary, read in one go.
                nr = len(live)
                summary = ffi.unpack(self._summary, 1 + nr + 5 * r)
                total = summary[0]
                counts = []
                for k in range(nr):
                    n = summary[1 + k]
                    if n:
                        ring = live[k]
                        ring.count_harvested(n)
                        counts.append((ring.vcpu_id, n))
                groups: list[tuple[int, npt.NDArray[np.uint64], int]] = []
                lasts: list[int] = []
                if not restored:  # five cells per group: slot, start, length, entries, last
                    base, end = 1 + nr, 1 + nr + 5 * r
                    groups = self._groups((summary[at:at + 4] for at in range(base, end, 5)),
                                          total, pages, pbytes)
                    lasts = summary[base + 4:end:5]
                return QuickHarvest(groups, total, counts, out.harvested_at, slots, offsets,
                                    restored=restored, lasts=lasts, reset_ns=out.reset_ns)
            return self._finish_quick(int(r), live, on_overrun, slots, offsets, pages, pbytes)

    def _finish_quick(self, code: int, live: list[DirtyRing], on_overrun: OverrunPolicy,
                      slots: npt.NDArray[np.uint32], offsets: npt.NDArray[np.uint64],
                      pages: npt.NDArray[np.uint64], pbytes: Any) -> Harvest:
        """The rest of a quick collection that was not clean, as :meth:`harvest_and_reset`."""
        out = self._out
        total, reset, reset_ns = int(out.total), int(out.reset), int(out.reset_ns)
        harvested: list[tuple[DirtyRing, DirtyEntries]] = []
        try:
            self._settle_native(live, code, total, on_overrun, harvested, slots, offsets,
                                pages, pbytes)
            if code in (lib.KVMIO_COLLECT_TOO_MANY_SLOTS, lib.KVMIO_COLLECT_RESET_MISMATCH):
                # The reset calls are done: count and check them as reset() would have.
                rings = list(self._rings.values())
                self._count_reset(reset, rings)
                self._check_reset(reset, total, False, rings,
                                  [ring for ring, got in harvested if len(got)], on_overrun)
            else:
                # Signalled, reset by the caller, or a reset call failed (after `reset`
                # entries): the rest of the reset goes through reset(), which raises the
                # kernel's error if it fails again.
                self._count_reset(reset, list(self._rings.values()))
                t0 = time.perf_counter_ns()
                self.reset(on_overrun=on_overrun)
                reset_ns += time.perf_counter_ns() - t0
        except BaseException:
            for ring, got in harvested:
                ring.give_back(got)
            raise
        return self._harvest_result(harvested, [], out.harvested_at, None, reset_ns)

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
                t0 = time.perf_counter_ns()
                self.reset(on_overrun=on_overrun)
                reset_ns = time.perf_counter_ns() - t0
            except BaseException:
                for ring, got in harvested:
                    ring.give_back(got)
                self.return_orphans(orphans)
                raise
            return self._harvest_result(harvested, orphans, t, groups, reset_ns)

    def _harvest_result(self, harvested: list[tuple[DirtyRing, DirtyEntries]],
                        orphans: list[DirtyEntries], t: float,
                        groups: list[tuple[int, npt.NDArray[np.uint64], int]] | None,
                        reset_ns: int = 0) -> Harvest:
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
        return Harvest(harvested, orphans, overruns, t, groups, reset_ns)
