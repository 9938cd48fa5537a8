"""Dirty pages per memory slot: :class:`PageSet`, the one page-set type of kvmio.

Collections (:meth:`kvmio.Vm.collect_dirty_pages`), the tracker, and the layers above them
(snapshots, migration) all speak in page sets: for each memory slot id, the sorted, distinct
page indices (``uint64``) inside that slot.  A page set is immutable; ``union`` makes a new
one.  Guest physical addresses need the slots' bases, which the caller passes in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from kvmio._abi import PAGE_SIZE
from kvmio.dirty.ring import DirtyEntries, sorted_unique
from kvmio.errors import KvmInvalidArgumentError

Pages = npt.NDArray[np.uint64]

_EMPTY: Pages = np.zeros(0, dtype=np.uint64)
_EMPTY.setflags(write=False)


def _sorted_distinct(a: npt.NDArray[Any]) -> Pages:
    """``a`` as sorted distinct uint64, without re-sorting data that is sorted already."""
    a = np.asarray(a, dtype=np.uint64).ravel()
    if len(a) < 2:
        return a
    d = a[1:] > a[:-1]
    if d.all():  # strictly increasing already: sorted and distinct
        return a
    return sorted_unique(a)


def _union2(a: Pages, b: Pages) -> Pages:
    if not len(a):
        return b
    if not len(b):
        return a
    return sorted_unique(np.concatenate((a, b)))


def coalesce(pages: npt.ArrayLike) -> tuple[Pages, Pages]:
    """Runs of consecutive page indices: ``(first_page, page_count)`` arrays.

    ``pages`` may be unsorted and hold duplicates.
    """
    p = _sorted_distinct(np.asarray(pages, dtype=np.uint64))
    if len(p) == 0:
        return _EMPTY.copy(), _EMPTY.copy()
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(p)]))
    return p[starts], (ends - starts).astype(np.uint64)


class PageSet(Mapping[int, Pages]):
    """Distinct dirty pages per memory slot: ``page_set[slot]`` is a sorted, distinct,
    read-only ``uint64`` array of page indices within that slot.  Slots without pages are
    absent.  Immutable: :meth:`union` returns a new set.
    """

    __slots__ = ("_pages",)

    def __init__(self, pages: Mapping[int, npt.ArrayLike] | None = None):
        if pages is not None and not isinstance(pages, Mapping):
            raise KvmInvalidArgumentError(
                f"pages must map slot ids to page indices, not {type(pages).__name__}")
        out: dict[int, Pages] = {}
        for slot, p in (pages or {}).items():
            if isinstance(slot, bool) or not isinstance(slot, int | np.integer) or slot < 0:
                raise KvmInvalidArgumentError(f"slot ids must be non-negative ints, not {slot!r}")
            try:
                arr = np.asarray(p)
            except ValueError as e:  # ragged input
                raise KvmInvalidArgumentError(f"pages of slot {slot}: {e}") from None
            if arr.size and (arr.dtype.kind not in "ui" or (arr.dtype.kind == "i"
                                                              and arr.min() < 0)):
                raise KvmInvalidArgumentError(
                    f"pages of slot {slot} must be non-negative integers, not {arr.dtype}")
            q = _sorted_distinct(arr)
            if len(q):
                q = q if not q.flags.writeable else q.copy()
                q.setflags(write=False)
                out[int(slot)] = q
        self._pages = out

    @classmethod
    def _trusted(cls, pages: dict[int, Pages]) -> PageSet:
        """From arrays known to be sorted, distinct uint64 (no checks, no copies)."""
        out = {}
        for slot, p in pages.items():
            if len(p):
                if p.flags.writeable:
                    p = p.view()
                    p.setflags(write=False)
                out[slot] = p
        return cls._of(out)

    @classmethod
    def _of(cls, pages: dict[int, Pages]) -> PageSet:
        """From non-empty, read-only, sorted, distinct uint64 arrays (taken as they are)."""
        s = cls.__new__(cls)
        s._pages = pages
        return s

    @classmethod
    def from_entries(cls, entries: DirtyEntries, slot_pages: Mapping[int, int]
                     ) -> tuple[PageSet, int]:
        """The distinct pages of harvested ring entries, and how many entries named a slot (or
        a page of it) that is not in ``slot_pages`` (slot id -> size in pages), or an address
        space kvmio never maps: memory deleted since the page was dirtied.  Never raises."""
        return cls.from_groups(entries.slot_groups(), slot_pages, entries)

    @classmethod
    def from_groups(cls, groups: Sequence[tuple[int, Pages, int]], slot_pages: Mapping[int, int],
                    entries: DirtyEntries | Callable[[], DirtyEntries]) -> tuple[PageSet, int]:
        """As :meth:`from_entries`, from ``entries`` already grouped by
        :meth:`DirtyEntries.slot_groups` (or by the compiled collection).  ``entries`` may be
        a function that returns them: it is called only to count entries beyond a slot's end."""
        out: dict[int, Pages] = {}
        dropped = 0
        for raw, pages, count in groups:
            slot = raw & 0xFFFF  # SlotId.decode(raw), without an object per group
            size = slot_pages.get(slot)
            if raw >> 16 or size is None:  # another address space, or no such slot
                dropped += count
                continue
            if int(pages[-1]) >= size:  # beyond: a deleted, smaller successor (sorted pages)
                if callable(entries):
                    entries = entries()
                sel = (entries.slots == raw) & (entries.offsets >= size)
                dropped += int(np.count_nonzero(sel))
                pages = pages[:int(np.searchsorted(pages, np.uint64(size)))]
            if len(pages):
                out[slot] = pages
        return cls._trusted(out), dropped

    @classmethod
    def from_bitmap(cls, slot: int, words: npt.NDArray[np.uint64], num_pages: int) -> PageSet:
        """One slot's pages from a little-endian u64 dirty bitmap (bit 0 = page 0)."""
        return cls._trusted({slot: bitmap_to_pages(words, num_pages)})

    @classmethod
    def from_mask(cls, masks: Mapping[int, npt.NDArray[np.bool_]]) -> PageSet:
        """From one boolean array per slot (``True`` = dirty)."""
        return cls._trusted({s: np.flatnonzero(m).astype(np.uint64) for s, m in masks.items()})

    # -- Mapping ----------------------------------------------------------------------------

    def __getitem__(self, slot: int) -> Pages:
        return self._pages[slot]

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._pages))

    def __len__(self) -> int:
        return len(self._pages)

    def __repr__(self) -> str:
        inner = ", ".join(f"{s}: {len(p)}" for s, p in sorted(self._pages.items()))
        return f"PageSet({{{inner}}} pages)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PageSet):
            return NotImplemented
        return self._pages.keys() == other._pages.keys() and all(
            np.array_equal(p, other._pages[s]) for s, p in self._pages.items())

    __hash__ = None  # type: ignore[assignment]

    # -- operations -------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Distinct pages over all slots."""
        return sum(len(p) for p in self._pages.values())

    def union(self, *others: PageSet) -> PageSet:
        """The pages in this set or any of ``others``."""
        out = dict(self._pages)
        for o in others:
            for s, p in o._pages.items():
                q = out.get(s)
                out[s] = p if q is None else _union2(q, p)
        return PageSet._trusted(out)

    def __or__(self, other: PageSet) -> PageSet:
        return self.union(other)

    def restrict(self, slot_pages: Mapping[int, int]) -> tuple[PageSet, int]:
        """Only the pages of slots in ``slot_pages`` (slot id -> pages) that lie inside them,
        and how many pages were left out."""
        out: dict[int, Pages] = {}
        dropped = 0
        for s, p in self._pages.items():
            size = slot_pages.get(s)
            if size is None:
                dropped += len(p)
                continue
            n = int(np.searchsorted(p, np.uint64(size)))
            dropped += len(p) - n
            if n:
                out[s] = p[:n]
        return PageSet._trusted(out), dropped

    def gpas(self, bases: Mapping[int, int]) -> Pages:
        """Guest physical address of every page, sorted (``bases``: slot id -> its guest
        physical address, e.g. ``{s: r.guest_phys_addr for s, r in vm.regions.items()}``)."""
        parts = [np.uint64(self._base(bases, s)) + p * np.uint64(PAGE_SIZE)
                 for s, p in self._pages.items()]
        if not parts:
            return _EMPTY.copy()
        return np.sort(np.concatenate(parts)).astype(np.uint64)

    def runs(self, slot: int) -> tuple[Pages, Pages]:
        """``(first_page, page_count)`` of the slot's runs of consecutive dirty pages."""
        return coalesce(self._pages.get(slot, _EMPTY))

    def ranges(self, bases: Mapping[int, int]) -> list[tuple[int, int]]:
        """``(gpa, length in bytes)`` of every run of consecutive dirty pages, in address
        order."""
        out: list[tuple[int, int]] = []
        for s in self._pages:
            first, count = self.runs(s)
            base = self._base(bases, s)
            out.extend(zip((base + first * np.uint64(PAGE_SIZE)).tolist(),
                           (count * np.uint64(PAGE_SIZE)).tolist(), strict=True))
        out.sort()
        return [(int(g), int(n)) for g, n in out]

    @staticmethod
    def _base(bases: Mapping[int, int], slot: int) -> int:
        try:
            return int(bases[slot])
        except KeyError:
            raise KvmInvalidArgumentError(f"no guest physical base for slot {slot}") from None


def bitmap_to_pages(words: npt.NDArray[np.uint64], num_pages: int) -> Pages:
    """Sorted indices of the set bits of a little-endian u64 bitmap (bit 0 = page 0).

    Only non-zero words are unpacked, so a sparse bitmap of a huge slot costs a scan of its
    words, not one byte per page.
    """
    nz = np.flatnonzero(words)
    if len(nz) == 0:
        return _EMPTY.copy()
    bits = np.unpackbits(words[nz].view(np.uint8), bitorder="little").reshape(-1, 64)
    row, col = np.nonzero(bits)
    pages = nz[row].astype(np.uint64) * np.uint64(64) + col.astype(np.uint64)
    return pages[pages < np.uint64(num_pages)]
