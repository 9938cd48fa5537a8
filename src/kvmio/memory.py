"""Guest memory: host mappings (memory *backends*) registered as KVM memory slots.

A backend owns one host mapping; :meth:`kvmio.Vm.add_memory_region` only registers it:

- :class:`AnonymousMemory`: private anonymous memory, optionally ``MAP_NORESERVE`` (a guest far
  larger than host memory, pages allocated when touched); the default;
- :class:`MemfdMemory`: shared memory of a ``memfd`` (its :attr:`~MemfdMemory.fd` can be
  mapped again, e.g. by another process, and sees the guest's writes);
- :class:`FileMemory`: a file mapped ``MAP_SHARED`` (guest writes reach the file) or
  ``MAP_PRIVATE`` (copy-on-write: the file is never changed, and VMs mapping the same file
  share its page cache until they write, as snapshot restores do).

File mappings must not outlive their file's length: a file is checked to be long enough when
it is mapped, and must not be truncated while mapped (touching pages past the end of a file
kills a process with SIGBUS).

A backend knows which of its pages are *populated* (hold data of their own, as opposed to
reading as zero, or as the file's content for a private file mapping:
:meth:`Memory.populated_pages`) and can return pages to that state (:meth:`Memory.discard`),
so that a guest far larger than host memory can be copied and restored page by page.

Host writes: the kernel's dirty log sees only guest writes.  Writes that kvmio makes for the
host (:meth:`MemoryRegion.write`, :meth:`kvmio.Vm.write_memory` and what goes through them, such
as program loaders) are noted in every :class:`HostWriteRecord` of the region, for consumers
that must know every changed page (checkpoints); without a record they cost nothing extra.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
import threading
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import numpy.typing as npt

from kvmio import _abi
from kvmio._abi import PAGE_SIZE, Mapping, lib
from kvmio._check import buffer_bytes, integer
from kvmio.errors import KvmClosedError, KvmError, KvmInvalidArgumentError, KvmUnsupportedError

Pages = npt.NDArray[np.uint64]

#: Regions asked of one PAGEMAP_SCAN call (24 bytes each).
_SCAN_REGIONS = 4096
#: Pagemap entries read at a time where PAGEMAP_SCAN is missing (8 bytes each).
_PAGEMAP_CHUNK = 1 << 18
_PM_PRESENT = 1 << 63
_PM_SWAPPED = 1 << 62
_PM_FILE = 1 << 61
#: A transparent huge page of x86-64 (a PMD's span).
HUGE_PAGE = 2 << 20
#: Separate ranges of one memory :meth:`Memory.populate` marks for huge pages at most (each
#: may split the mapping into more kernel VMAs; a process may have 65,530 by default).
MAX_HUGE_RANGES = 1024


@dataclass(frozen=True)
class SlotId:
    """A decoded ``kvm_dirty_gfn.slot``/memslot id: ``(address_space << 16) | slot``."""

    address_space: int
    slot: int

    @classmethod
    def decode(cls, raw: int) -> SlotId:
        """Split a raw 32-bit slot value."""
        return cls(raw >> 16, raw & 0xFFFF)

    def encode(self) -> int:
        """The raw 32-bit value."""
        return (self.address_space << 16) | self.slot


def runs_to_pages(first: Pages, count: Pages) -> Pages:
    """Page indices of runs ``(first page, page count)`` (sorted if the runs are)."""
    n = count.astype(np.int64)
    total = int(n.sum())
    if total == 0:
        return np.zeros(0, dtype=np.uint64)
    starts = np.cumsum(n) - n  # where each run begins in the output
    out = np.arange(total, dtype=np.int64)
    out += np.repeat(first.astype(np.int64) - starts, n)
    return out.astype(np.uint64)


def _pagemap_populated(address: int, size: int, *, file_is_unpopulated: bool) -> Pages:
    """Pages of the mapping ``[address, address + size)`` of this process that are populated:
    present (and not the shared zero page) or swapped out, and with ``file_is_unpopulated``
    not a page of the mapped file itself (for private file mappings, whose unwritten pages
    read as the file).  Uses PAGEMAP_SCAN where the kernel has it (Linux 6.7: it walks only
    the page tables that exist, so a sparse 64 GiB mapping costs milliseconds), else reads
    ``/proc/self/pagemap`` (8 bytes per page, in chunks)."""
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _abi.HAS_PAGEMAP_SCAN:
            try:
                return _scan_populated(fd, address, size, file_is_unpopulated)
            except KvmError as e:
                if e.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
        return _read_populated(fd, address, size, file_is_unpopulated)
    finally:
        os.close(fd)


def _scan_populated(fd: int, address: int, size: int, file_is_unpopulated: bool) -> Pages:
    # Categories are matched after inverting `inverted`: "not the zero page" (and "not a file
    # page"), and present or swapped.
    not_these = _abi.PAGE_IS_PFNZERO | (_abi.PAGE_IS_FILE if file_is_unpopulated else 0)
    regions = np.zeros((_SCAN_REGIONS, 3), dtype=np.uint64)
    firsts: list[Pages] = []
    counts: list[Pages] = []
    start, end = address, address + size
    while start < end:
        n, walk_end = _abi.pagemap_scan(fd, start, end, regions, inverted=not_these,
                                        mask=not_these,
                                        anyof=_abi.PAGE_IS_PRESENT | _abi.PAGE_IS_SWAPPED)
        got = regions[:n]
        firsts.append((got[:, 0] - np.uint64(address)) // np.uint64(PAGE_SIZE))
        counts.append((got[:, 1] - got[:, 0]) // np.uint64(PAGE_SIZE))
        if n < _SCAN_REGIONS or walk_end >= end:
            break
        if walk_end <= start:
            raise KvmError(f"PAGEMAP_SCAN made no progress at {start:#x}", ioctl="PAGEMAP_SCAN")
        start = walk_end
    return runs_to_pages(np.concatenate(firsts), np.concatenate(counts))


def _read_populated(fd: int, address: int, size: int, file_is_unpopulated: bool) -> Pages:
    first = address // PAGE_SIZE
    total = size // PAGE_SIZE
    buf = np.empty(min(total, _PAGEMAP_CHUNK), dtype=np.uint64)
    parts: list[Pages] = []
    for at in range(0, total, _PAGEMAP_CHUNK):
        k = min(_PAGEMAP_CHUNK, total - at)
        b = buf[:k]
        view = b.data.cast("B")
        done = 0
        while done < k * 8:
            got = os.preadv(fd, [view[done:]], (first + at) * 8 + done)
            if got <= 0:
                raise KvmError("short read of /proc/self/pagemap", ioctl="pread")
            done += got
        if file_is_unpopulated:
            present = (b & np.uint64(_PM_PRESENT | _PM_FILE)) == np.uint64(_PM_PRESENT)
            pop = present | ((b & np.uint64(_PM_SWAPPED)) != 0)
        else:
            pop = b >= np.uint64(_PM_SWAPPED)  # bit 63 (present) or 62 (swapped)
        idx = np.flatnonzero(pop)
        if len(idx):
            parts.append(idx.astype(np.uint64) + np.uint64(at))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


class Memory:
    """A host mapping that can back a memory slot (see the module docs); ``close()`` unmaps."""

    kind = "memory"
    #: Whether a page that is not populated reads as zero (anonymous and memfd memory), so
    #: that writing zeros into it is as good as :meth:`discard`; not for file mappings.
    unpopulated_is_zero = True

    def __init__(self, mapping: Mapping, size: int):
        self.mapping = mapping
        self.size = size
        self._huge_end = -1  # where the last range marked for huge pages ended
        self._huge_ranges = 0  # ranges marked that did not continue the one before

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.size:#x} bytes{' closed' if self.closed else ''}>"

    @property
    def closed(self) -> bool:
        """Whether the memory was unmapped."""
        return self.mapping.closed

    def close(self) -> None:
        """Unmap (deferred by Python while views of the memory are alive)."""
        self.mapping.close()

    @property
    def num_pages(self) -> int:
        """Pages in the mapping."""
        return self.size // PAGE_SIZE

    def populated_pages(self) -> Pages:
        """Sorted indices of the pages that hold data of their own; every other page reads as
        it did when mapped (zero, or the file's content for a private file mapping).  A page
        may be listed and still hold zeros (the converse never happens)."""
        return _pagemap_populated(self.mapping.address, self.size, file_is_unpopulated=False)

    def discard(self, first_page: int, num_pages: int) -> None:
        """Return ``num_pages`` pages from ``first_page`` to their unpopulated content (zero,
        or the file's for a private file mapping) and free their memory (``madvise``).  KVM
        drops its own mappings of them: the guest sees the new content."""
        first_page, num_pages = self._check_pages(first_page, num_pages)
        self.mapping.mm.madvise(mmap.MADV_DONTNEED, first_page * PAGE_SIZE,
                                num_pages * PAGE_SIZE)

    def populate(self, first_page: int, num_pages: int, *, huge: bool = False) -> bool:
        """Fault ``num_pages`` pages from ``first_page`` in ahead of use, writable, without
        changing what they hold (``MADV_POPULATE_WRITE``), so that later writes take no page
        fault; the GIL is released meanwhile, so another thread can do it ahead of a writer.
        Returns ``False`` if the kernel could not (older than 5.14, or out of memory): it is
        only a hint.

        ``huge``: for memory about to be written whole (a stream or file being read in), the
        2 MiB blocks (of host addresses) that lie wholly inside the range go on transparent
        huge pages where the kernel gives them (``MADV_HUGEPAGE``): one fault and one zeroing
        per block instead of 512 (here 0.05 s instead of 0.2 s per 512 MiB).  No page outside
        the range is populated.  The blocks keep the mark: after pages in one were discarded,
        the kernel may make it whole again (at its next touch, or by ``khugepaged``), so its
        memory goes back to 2 MiB, never beyond what this call populated.  Every marked range
        that does not continue the one before splits the mapping (a kernel VMA each): after
        :data:`MAX_HUGE_RANGES` of them, the hint is not given any more.  Private anonymous
        memory only (ignored for other kinds)."""
        first_page, num_pages = self._check_pages(first_page, num_pages)
        if self.closed:
            raise KvmClosedError("this memory is closed")
        if not isinstance(huge, bool):
            raise KvmInvalidArgumentError(f"huge must be a bool, not {type(huge).__name__}")
        if not num_pages:
            return True
        if huge and self.kind == "anonymous":
            start, end = self.huge_blocks(first_page, num_pages)
            if start < end:
                if start != self._huge_end:
                    self._huge_ranges += 1
                if self._huge_ranges <= MAX_HUGE_RANGES:
                    # EINVAL: no THP in this kernel; small pages then, as without the hint.
                    with contextlib.suppress(OSError):
                        self.mapping.mm.madvise(mmap.MADV_HUGEPAGE, start * PAGE_SIZE,
                                                (end - start) * PAGE_SIZE)
                    self._huge_end = end
        return not self.mapping.populate(first_page * PAGE_SIZE, num_pages * PAGE_SIZE)

    def huge_blocks(self, first_page: int, num_pages: int) -> tuple[int, int]:
        """The pages ``[start, end)`` of the whole 2 MiB blocks of host addresses inside
        ``num_pages`` pages from ``first_page`` (``start >= end`` if there is none)."""
        first_page = integer("first_page", first_page)
        num_pages = integer("num_pages", num_pages)
        per = HUGE_PAGE // PAGE_SIZE
        into = self.huge_offset(first_page)
        end = first_page + num_pages
        return first_page + (per - into) % per, end - self.huge_offset(end)

    def huge_offset(self, page: int) -> int:
        """How many pages ``page`` lies past the start of its 2 MiB block of host addresses
        (0: a block starts there)."""
        page = integer("page", page)
        return (self.mapping.address // PAGE_SIZE + page) % (HUGE_PAGE // PAGE_SIZE)

    def _check_pages(self, first_page: int, num_pages: int) -> tuple[int, int]:
        first_page = integer("first_page", first_page)
        num_pages = integer("num_pages", num_pages)
        if first_page + num_pages > self.num_pages:
            raise KvmInvalidArgumentError(
                f"pages {first_page}+{num_pages} lie outside this memory's {self.num_pages}")
        return first_page, num_pages


def _size(size: object) -> int:
    size = integer("size", size)
    if size <= 0 or size % PAGE_SIZE:
        raise KvmInvalidArgumentError(
            f"memory size {size:#x} must be a positive multiple of {PAGE_SIZE:#x}")
    return size


class AnonymousMemory(Memory):
    """Private anonymous memory (zero-filled); ``noreserve`` maps it with MAP_NORESERVE."""

    kind = "anonymous"

    def __init__(self, size: int, *, noreserve: bool = False):
        size = _size(size)
        super().__init__(Mapping(size, noreserve=bool(noreserve), what="anonymous guest memory"),
                         size)


class MemfdMemory(Memory):
    """Shared memory of a new ``memfd`` of ``size`` bytes (zero-filled).  :attr:`fd` stays
    open until :meth:`close`, so the same memory can be mapped again."""

    kind = "memfd"

    def __init__(self, size: int, *, name: str = "kvmio-guest"):
        size = _size(size)
        if not isinstance(name, str):
            raise KvmInvalidArgumentError(f"name must be a str, not {type(name).__name__}")
        try:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
        except OSError as e:
            raise KvmError(f"memfd_create failed: {e.strerror}", errno=e.errno,
                           ioctl="memfd_create") from e
        try:
            os.ftruncate(fd, size)
            mapping = Mapping(size, fd=fd, shared=True, what="memfd guest memory")
        except OSError as e:
            os.close(fd)
            raise KvmError(f"cannot size the memfd to {size} bytes: {e.strerror}",
                           errno=e.errno, ioctl="ftruncate") from e
        except BaseException:
            os.close(fd)
            raise
        super().__init__(mapping, size)
        self._fd: int | None = fd

    @property
    def fd(self) -> int:
        """The memfd (raises once closed)."""
        if self._fd is None:
            raise KvmClosedError("this memfd memory is closed")
        return self._fd

    def populated_pages(self) -> Pages:
        """Sorted indices of the pages the memfd holds (its data extents, ``SEEK_DATA``): also
        pages written through another mapping of the fd; every other page reads as zero."""
        # A descriptor of its own, so that seeking leaves the offset of :attr:`fd` alone.
        fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            firsts: list[int] = []
            counts: list[int] = []
            pos = 0
            while pos < self.size:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:  # no data past pos
                        break
                    raise KvmError(f"SEEK_DATA on the memfd failed: {e.strerror}",
                                   errno=e.errno, ioctl="lseek") from e
                hole = min(os.lseek(fd, data, os.SEEK_HOLE), self.size)
                first = data // PAGE_SIZE
                firsts.append(first)
                counts.append(-(-hole // PAGE_SIZE) - first)
                pos = hole
        finally:
            os.close(fd)
        return runs_to_pages(np.array(firsts, dtype=np.uint64),
                              np.array(counts, dtype=np.uint64))

    def discard(self, first_page: int, num_pages: int) -> None:
        """Punch the pages out of the memfd (``MADV_REMOVE``): they read as zero and their
        memory is freed, for every mapping of the fd."""
        first_page, num_pages = self._check_pages(first_page, num_pages)
        self.mapping.mm.madvise(mmap.MADV_REMOVE, first_page * PAGE_SIZE, num_pages * PAGE_SIZE)

    def close(self) -> None:
        """Unmap and close the memfd."""
        super().close()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class FileMemory(Memory):
    """``size`` bytes of the regular file ``path`` from ``offset`` (page aligned), mapped
    ``MAP_SHARED`` (``shared=True``: guest writes reach the file) or ``MAP_PRIVATE``
    (copy-on-write, the default).  ``size`` defaults to the file's length from ``offset``.
    The file must be at least ``offset + size`` bytes long."""

    kind = "file"
    unpopulated_is_zero = False

    def __init__(self, path: str | os.PathLike[str], *, size: int | None = None,
                 offset: int = 0, shared: bool = False):
        offset = integer("offset", offset)
        if offset % PAGE_SIZE:
            raise KvmInvalidArgumentError(f"offset {offset:#x} is not page aligned")
        try:
            fd = os.open(os.fspath(path), (os.O_RDWR if shared else os.O_RDONLY) | os.O_CLOEXEC)
        except TypeError:
            raise KvmInvalidArgumentError(f"path must be a path, not {path!r}") from None
        except OSError as e:
            raise KvmInvalidArgumentError(f"cannot open {os.fspath(path)!r}: {e.strerror}",
                                          errno=e.errno) from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KvmInvalidArgumentError(f"{os.fspath(path)!r} is not a regular file")
            length = st.st_size - offset
            size = _size(length if size is None else size)
            if offset + size > st.st_size:
                raise KvmInvalidArgumentError(
                    f"{os.fspath(path)!r} holds {st.st_size} bytes, fewer than offset + size = "
                    f"{offset + size}: pages past its end could not be touched")
            # A private mapping of a read-only fd is still writable: writes are copied.
            mapping = Mapping(size, fd=fd, offset=offset, shared=shared,
                              what=f"file {os.fspath(path)!r}")
        finally:
            os.close(fd)  # the mapping keeps the file
        super().__init__(mapping, size)
        self.path = os.fspath(path)
        self.offset = offset
        self.shared = shared

    def populated_pages(self) -> Pages:
        """Private mapping: the pages written since mapping (copies of their own); every other
        page reads as the file.  Shared mapping: every page, since every page is the file's and
        kvmio cannot tell which of them were ever written."""
        if self.shared:
            return np.arange(self.num_pages, dtype=np.uint64)
        return _pagemap_populated(self.mapping.address, self.size, file_is_unpopulated=True)

    def discard(self, first_page: int, num_pages: int) -> None:
        """Private mapping: drop the pages' own copies, so that they read as the file again.
        A shared mapping has nothing to return to (raises :class:`KvmUnsupportedError`)."""
        if self.shared:
            raise KvmUnsupportedError("pages of a shared file mapping cannot be discarded: "
                                      "they are the file")
        super().discard(first_page, num_pages)


_NO_PAGES: Pages = np.zeros(0, dtype=np.uint64)
_NO_PAGES.setflags(write=False)


class HostWriteRecord:
    """The pages of one memory region that the host wrote through kvmio since the last
    :meth:`take` (from :meth:`MemoryRegion.record_host_writes`).

    Every write through :meth:`MemoryRegion.write` or :meth:`kvmio.Vm.write_memory` (and so
    through everything built on them: program and kernel loaders, boot information) marks the
    pages it touched, *after* writing them, in every open record of the region: a consumer
    that takes the record and then reads those pages sees the new data.  Writes through the
    raw views (:meth:`MemoryRegion.array`, :meth:`MemoryRegion.page_words`, the mapping
    itself) are not seen: mark them with :meth:`MemoryRegion.mark_dirty`.  Thread-safe.
    """

    __slots__ = ("_lock", "_pages", "_region")

    def __init__(self, region: MemoryRegion):
        self._lock = threading.Lock()
        self._pages: set[int] = set()
        self._region: MemoryRegion | None = region

    def __repr__(self) -> str:
        state = "closed" if self._region is None else f"slot {self._region.slot}"
        return f"<HostWriteRecord {state}, {len(self._pages)} pages>"

    # acquire/release rather than `with`: a third of the cost here, on the path of every
    # host write.
    def _add(self, first: int, end: int) -> None:
        self._lock.acquire()
        try:
            self._pages.update(range(first, end))
        finally:
            self._lock.release()

    def _add1(self, page: int) -> None:
        self._lock.acquire()
        try:
            self._pages.add(page)
        finally:
            self._lock.release()

    @property
    def pending(self) -> int:
        """Pages marked since the last :meth:`take`."""
        return len(self._pages)

    def take(self) -> Pages:
        """The pages marked since the last take (sorted, distinct page indices within the
        region; read-only and shared when empty), and start afresh.  Atomic: a page marked
        meanwhile is in this result or in the next one."""
        if not self._pages:  # the common case, without the lock (a concurrent mark: next take)
            return _NO_PAGES
        with self._lock:
            pages, self._pages = self._pages, set()
        if len(pages) <= 64:  # sorting a few in Python is cheaper than numpy's two calls
            return np.array(sorted(pages), dtype=np.uint64)
        out = np.fromiter(pages, dtype=np.uint64, count=len(pages))
        out.sort()
        return out

    @property
    def closed(self) -> bool:
        """Whether the record was closed (it is then no longer updated)."""
        return self._region is None

    def close(self) -> None:
        """Stop recording (idempotent); what was recorded can still be taken."""
        region, self._region = self._region, None
        if region is not None:
            region._drop_record(self)

    def __enter__(self) -> HostWriteRecord:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class MemoryRegion:
    """One KVM memory slot backed by a :class:`Memory` backend that this object owns.

    Created by :meth:`kvmio.Vm.add_memory_region`.  ``read``/``write`` take guest physical
    addresses; :meth:`array` returns a numpy view of the whole slot.  Views must be dropped before
    the VM closes for the memory to be unmapped at once (otherwise it is unmapped when they go).

    Host writes through :meth:`write` are noted in the region's :class:`HostWriteRecord`
    objects, if any (:meth:`record_host_writes`); writes through views are not (use
    :meth:`mark_dirty`).
    """

    def __init__(self, slot: int, guest_phys_addr: int, size: int, flags: int,
                 memory: Memory):
        self.slot = slot
        self.guest_phys_addr = guest_phys_addr
        self.size = size
        self.flags = flags
        #: The backend (anonymous, memfd or file).
        self.memory = memory
        self._mapping = memory.mapping
        # The open host-write records; replaced whole (never changed in place) under
        # _records_lock, so a write reads it without a lock, and without records pays one test.
        self._records: tuple[HostWriteRecord, ...] = ()
        self._records_lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"MemoryRegion(slot={self.slot}, gpa={self.guest_phys_addr:#x}, "
                f"size={self.size:#x}, flags={self.flags:#x})")

    @property
    def end(self) -> int:
        """First guest physical address past the slot."""
        return self.guest_phys_addr + self.size

    @property
    def log_dirty(self) -> bool:
        """Whether the slot is dirty-logged (KVM_MEM_LOG_DIRTY_PAGES)."""
        return bool(self.flags & lib.KVM_MEM_LOG_DIRTY_PAGES)

    @property
    def readonly(self) -> bool:
        """Whether the slot is read-only for the guest (KVM_MEM_READONLY)."""
        return bool(self.flags & lib.KVM_MEM_READONLY)

    @property
    def num_pages(self) -> int:
        """Pages in the slot."""
        return self.size // PAGE_SIZE

    @property
    def host_address(self) -> int:
        """Host virtual address of the slot's first byte."""
        return self._mapping.address

    @property
    def closed(self) -> bool:
        """Whether the slot was deleted (or its VM closed)."""
        return self._mapping.closed

    def contains(self, gpa: int, length: int = 1) -> bool:
        """Whether ``[gpa, gpa+length)`` lies inside the slot."""
        return self.guest_phys_addr <= gpa and gpa + length <= self.end

    def _offset(self, gpa: int, length: int) -> int:
        gpa = integer("gpa", gpa)
        length = integer("length", length, lo=None)
        if length < 0 or not self.contains(gpa, max(length, 1)):
            raise KvmInvalidArgumentError(
                f"guest range {gpa:#x}+{length:#x} is outside slot {self.slot} "
                f"[{self.guest_phys_addr:#x}, {self.end:#x})")
        return gpa - self.guest_phys_addr

    def read(self, gpa: int, length: int) -> bytes:
        """Copy ``length`` bytes at guest physical address ``gpa``."""
        off = self._offset(gpa, length)
        return self._mapping.mm[off:off + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` (any bytes-like object, e.g. a numpy array: its length counts bytes)
        at guest physical address ``gpa``.  The kernel's dirty log does not see host writes;
        the region's host-write records do (:meth:`record_host_writes`)."""
        mv = buffer_bytes("data", data)
        n = len(mv)
        off = self._offset(gpa, n)
        try:
            self._mapping.mm[off:off + n] = mv
        finally:  # after the write (a record taken meanwhile has it next time); even if it
            if self._records and n:  # failed part-way (marking too much is harmless)
                first = off // PAGE_SIZE
                if (off + n - 1) // PAGE_SIZE == first:  # one page: the common case, inline
                    for record in self._records:
                        record._add1(first)
                else:
                    self._mark(off, n)

    def _mark(self, off: int, length: int) -> None:
        first, end = off // PAGE_SIZE, (off + length - 1) // PAGE_SIZE + 1
        if end - first == 1:
            for record in self._records:
                record._add1(first)
        else:
            for record in self._records:
                record._add(first, end)

    def mark_dirty(self, gpa: int, length: int) -> None:
        """Note that the host changed ``[gpa, gpa+length)`` by other means than :meth:`write`
        (e.g. through :meth:`array`): every page it touches goes into the region's host-write
        records, as a write would."""
        length = integer("length", length)
        off = self._offset(gpa, length)
        if self._records and length:
            self._mark(off, length)

    def record_host_writes(self) -> HostWriteRecord:
        """A new :class:`HostWriteRecord` of this region: from now until it is closed, every
        host write through kvmio (and every :meth:`mark_dirty`) marks its pages there.  Each
        consumer takes its own record; a region without records pays nothing for them."""
        record = HostWriteRecord(self)
        with self._records_lock:
            self._records = (*self._records, record)
        return record

    def _drop_record(self, record: HostWriteRecord) -> None:
        with self._records_lock:
            self._records = tuple(r for r in self._records if r is not record)

    def array(self, dtype: npt.DTypeLike = np.uint8) -> npt.NDArray[np.generic]:
        """A writable numpy view of the whole slot (no copy).  Writes through it are not in
        the host-write records: follow them with :meth:`mark_dirty`."""
        return np.frombuffer(self._mapping.mm, dtype=dtype)

    def page_words(self) -> npt.NDArray[np.uint64]:
        """A view of the first 8 bytes of every page, as little-endian uint64 (no copy).
        Writes through it are not in the host-write records (see :meth:`mark_dirty`)."""
        a: npt.NDArray[np.uint64] = np.frombuffer(self._mapping.mm, dtype="<u8")
        return a.reshape(-1, PAGE_SIZE // 8)[:, 0]

    def page_gpa(self, page_index: int) -> int:
        """Guest physical address of page ``page_index`` of the slot."""
        page_index = integer("page_index", page_index, hi=self.num_pages)
        return self.guest_phys_addr + page_index * PAGE_SIZE

    def close(self) -> None:
        """Unmap the memory (done by the VM when the slot is deleted or the VM closes)."""
        self.memory.close()
