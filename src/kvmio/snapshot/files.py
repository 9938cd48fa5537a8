"""Snapshots on disk: full and diff layers, restored into a new VM lazily or eagerly.

Saving: :func:`save_snapshot` writes one full snapshot; a :class:`Snapshotter` writes a chain
(the first save full, each later one a *diff* holding only the pages changed since the
previous save, found through the dirty log and the host-write records, optionally copied
while the guest runs with a final pass under a paused :class:`~kvmio.runner.VcpuRunner`).
Restoring: :func:`restore_snapshot` builds a new VM with the snapshot's memory slots, irqchip,
PIT, dirty ring and vCPUs and restores the chain into it, mapping the full layer's memory
file ``MAP_PRIVATE`` (``lazy=True``: pages are read on first touch, and VMs restored from
one file share its page cache) or reading it (``lazy=False``).  :func:`merge_snapshots`
writes a chain as one full snapshot; :func:`inspect_snapshot` reads a layer's manifest and
checks its checksums.

Format (version 1)
------------------

A snapshot *layer* is a directory of four files:

==============  ================================================================================
``manifest``    One line ``kvmio-snapshot 1 xxh3=<16 hex digits> bytes=<n>``, then ``n`` bytes
                of JSON (UTF-8) whose XXH3-64 the line gives.  The JSON object says:
                ``format`` (``"kvmio-snapshot"``), ``version`` (1), ``id`` (128 random bits,
                32 hex digits), ``created`` (UTC), ``kind`` (``"full"`` or ``"diff"``),
                ``base`` (for a diff: the id of the layer it applies to, the XXH3-64 of that
                layer's manifest JSON, which covers every checksum of that layer, and a path
                hint to it, relative to this directory), ``machine`` (architecture, page
                size, memory slots with guest address, size and flags, vCPU ids, irqchip,
                PIT, dirty ring entries, TSS and identity-map addresses), ``memory`` (layout,
                whole slots, stored pages, checksum name ``"xxh3-64"``, chunk size, counts of
                runs and chunks, file size), ``index`` and ``state`` (each its size and
                XXH3-64), and ``guest`` (free-form JSON of whoever saved it, e.g. a Multiboot
                machine's command line).  Unknown or missing fields are refused.
``state``       :meth:`MachineState.to_bytes <kvmio.snapshot.state.MachineState.to_bytes>`:
                the VM's and every vCPU's state and the port devices', with its own magic,
                version and CRC-32 (see :mod:`kvmio.snapshot.state`).
``index``       Binary, little-endian: a 32-byte header (``KVMIOIX\\0``, version u16,
                layout u8 (0 image, 1 packed), 0 u8, runs u32, chunks u32, chunk size u32,
                0 u64), then the *runs* (32 bytes each: slot u32, flags u32 = 0, first page
                u64, pages u64, offset in the memory file u64), sorted by slot and page,
                never overlapping, then the *chunks* (24 bytes each: offset u64, length u64,
                XXH3-64 u64).
``memory``      The stored pages.  A full layer is an *image*: every slot's bytes one slot
                after the other in slot order, each page at its place, and pages not in a
                run are holes of a sparse file (zero pages are not stored).  A diff is
                *packed*: its pages one after the other, each run where its offset says.
==============  ================================================================================

What a layer means: for a slot of a full layer, or a slot a diff names in ``whole_slots``
(its changes were unknown, e.g. after a ring overrun), every page in a run holds the run's
bytes and every other page is zero; for any other slot of a diff, the runs' pages replace
those of the layer below and the rest comes from below.  A *chain* is a full layer and the
diffs on it, each on the one before; every layer of a chain has the same memory slots.

Checksums: XXH3-64 throughout (the ``xxhash`` package).  The manifest's first line covers
the JSON; the JSON covers the index and the state files (size and XXH3-64 each); the index
covers the memory file: one checksum per *chunk*, the runs' file ranges of one slot joined
where they touch and cut every ``chunk_bytes`` (1 MiB) from the start of each such extent,
so that a chunk belongs to one slot and a reader can check any slot alone.  The chunks are
exactly that cut of the runs (anything else is refused).  A diff names its base by id and
manifest checksum, so a layer applied to another base, or to a base that changed, is
refused.

Why XXH3 and not CRC-32 (``zlib.crc32``), measured on this project's host
(``bench/snapshot.py`` repeats it): CRC-32 runs at about 3.2 GB/s, XXH3-64 at 7.4 GB/s on
data out of the caches and about 30 GB/s on a diff's few MiB in the caches: a 1,000-page
diff's 4 MiB cost 1.6 ms of CRC-32 (a third of the 5 ms such a diff should take) and 0.13 ms
of XXH3.

Reading checks, in this order, before anything reaches guest memory: the manifest's line,
checksum and every field; the index's size and checksum, and every run's slot, bounds,
order, flags and offset (an image's at its place; a diff's tiling the file exactly) and the
chunks against the runs; the state's size, checksum and decoding, its vCPUs, irqchip and
PIT against the manifest; the memory file's size; for a chain, each diff's base id and
manifest checksum and the slots.  Memory checksums are checked as the pages are placed:
read (or mapped) and hashed one slot and layer at a time, before any VM is created; with a
lazy restore, hashing reads every stored chunk through the private mapping (pages come into
the page cache, shared, and are mapped read-only), and the file's data outside the runs
must read as zero.  ``verify=False`` skips the memory checksums and nothing else: the restore
then costs what mapping the file costs, and trusts its memory.  Any failure is a
:class:`~kvmio.errors.SnapshotError`; a failed restore closes everything it made.

A lazily restored VM reads its memory file while it runs: the file must stay as it is
(snapshot files are written read-only, mode 0444), and a truncated file would make the
guest's (or kvmio's) access to a page past its end fail (``SIGBUS`` for the host process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from kvmio._abi import ARCH, PAGE_SIZE
from kvmio._closing import Closing
from kvmio.devices import IoBus
from kvmio.dirty.pages import coalesce
from kvmio.dirty.ring import sorted_unique
from kvmio.errors import KvmError, KvmStateError, SnapshotError
from kvmio.exits import VcpuExit
from kvmio.memory import (
    HUGE_PAGE,
    AnonymousMemory,
    FileMemory,
    Memory,
    MemoryRegion,
    runs_to_pages,
)
from kvmio.runner import VcpuRunner
from kvmio.snapshot._layer import (
    CHUNK,
    CHUNK_BYTES,
    FORMAT_VERSION,
    HASH_NAME,
    INDEX,
    MANIFEST,
    MEMORY,
    PAGE_ITEM,
    RUN,
    STATE,
    BaseRef,
    FileRef,
    Layer,
    MachineLayout,
    SlotLayout,
    SnapshotInfo,
    canonical_chunks,
    encode_index,
    encode_manifest,
    guest_json,
    info_of,
    manifest_body,
    new_id,
    now_utc,
    read_layer,
    slot_chunk_hashes,
    xxh3,
)
from kvmio.snapshot.changelog import ChangeLog, Changes
from kvmio.snapshot.state import MachineState, capture, finish_pending_exits, restore
from kvmio.system import Kvm
from kvmio.tracker import DirtyTracker
from kvmio.vcpu import Vcpu
from kvmio.vm import Vm

__all__ = [
    "AS_SAVED",
    "CHUNK_BYTES",
    "FORMAT_VERSION",
    "HASH_NAME",
    "BaseRef",
    "ChainSpec",
    "FileRef",
    "MachineLayout",
    "RestoredVm",
    "SlotLayout",
    "SnapshotInfo",
    "Snapshotter",
    "build_vm",
    "inspect_snapshot",
    "machine_layout",
    "merge_snapshots",
    "read_chain",
    "restore_snapshot",
    "save_snapshot",
]

Pages = npt.NDArray[np.uint64]
#: Which layers to restore: the top layer's path (its bases are found through their path
#: hints), or every layer's path from the full one up.
ChainSpec = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

#: The longest chain read (a guard against base hints that loop).
MAX_CHAIN = 4096
#: Buffers per ``preadv``/``pwritev`` call (the kernel's IOV_MAX).
_IOV_MAX = 1024
#: Pages checked for zero at a time where they are scattered.
_SCAN = 256
#: Runs of at least this many pages are populated before an eager read (one huge page).
_HUGE_RUN = HUGE_PAGE // PAGE_SIZE
_PAGE_U64 = PAGE_SIZE // 8


# -- the machine as the manifest describes it ------------------------------------------------


def machine_layout(vm: Vm, vcpus: Iterable[Vcpu] | None = None) -> MachineLayout:
    """What a snapshot of ``vm`` (with ``vcpus``, default all) records of its build: memory
    slots, vCPU ids, irqchip, PIT, dirty ring, TSS and identity-map addresses."""
    ids = sorted(v.id for v in (vm.vcpus.values() if vcpus is None else vcpus))
    ring = vm.dirty_ring
    return MachineLayout(
        arch=ARCH, page_size=PAGE_SIZE,
        slots=tuple(SlotLayout(r.slot, r.guest_phys_addr, r.size, r.log_dirty, r.readonly)
                    for _, r in sorted(vm.regions.items())),
        vcpus=tuple(ids), irqchip=vm.has_irqchip, pit=vm.has_pit,
        dirty_ring=None if ring is None else ring.entries, tss_address=vm.tss_address,
        identity_map_address=vm.identity_map_address)


def _same_slots(a: MachineLayout, b: MachineLayout) -> bool:
    return [(s.slot, s.guest_phys_addr, s.size) for s in a.slots] == \
        [(s.slot, s.guest_phys_addr, s.size) for s in b.slots]


# -- file helpers ------------------------------------------------------------------------------


def _os_error(what: str, e: OSError) -> SnapshotError:
    return SnapshotError(f"{what}: {e.strerror or e}", errno=e.errno)


def _advance(part: list[memoryview], i: int, done: int) -> int:
    """After ``done`` bytes of ``part[i:]`` were transferred: the index of the first buffer
    not done, that buffer trimmed to what is left."""
    while done and i < len(part):
        n = len(part[i])
        if done >= n:
            done -= n
            i += 1
        else:
            part[i] = part[i][done:]
            done = 0
    return i


def _pwrite_all(fd: int, bufs: Sequence[memoryview], offset: int) -> None:
    """Write ``bufs`` one after the other at ``offset`` (``pwritev``; a short write goes on
    with the rest)."""
    for a in range(0, len(bufs), _IOV_MAX):
        part, i = list(bufs[a:a + _IOV_MAX]), 0
        while i < len(part):
            done = os.pwritev(fd, part[i:] if i else part, offset)
            offset += done
            i = _advance(part, i, done)


def _pread_all(fd: int, bufs: Sequence[memoryview], offset: int, what: str) -> None:
    """Fill ``bufs`` from ``offset`` (``preadv``); a short read is a :class:`SnapshotError`."""
    for a in range(0, len(bufs), _IOV_MAX):
        part, i = list(bufs[a:a + _IOV_MAX]), 0
        while i < len(part):
            done = os.preadv(fd, part[i:] if i else part, offset)
            if done <= 0:
                raise SnapshotError(f"{what}: the file ended early (truncated while read?)")
            offset += done
            i = _advance(part, i, done)


def _prepare_target(path: str | os.PathLike[str]) -> tuple[str, str]:
    """The snapshot directory to publish (it must not exist, or be an empty directory) and a
    new private directory beside it to write into."""
    try:
        target = os.path.abspath(os.fspath(path))
    except TypeError:
        raise SnapshotError(f"a snapshot path must be a path, not {path!r}") from None
    parent, name = os.path.split(target)
    if not os.path.isdir(parent):
        raise SnapshotError(f"cannot write a snapshot to {target!r}: directory {parent!r} "
                            "does not exist")
    if os.path.lexists(target) and not (os.path.isdir(target) and not os.path.islink(target)
                                        and not os.listdir(target)):
        raise SnapshotError(f"cannot write a snapshot to {target!r}: it exists (and is not an "
                            "empty directory)")
    try:
        tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise _os_error(f"cannot write a snapshot to {target!r}", e) from e
    return target, tmp


def _write_file(directory: str, name: str, data: bytes, durable: bool) -> None:
    fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL
                 | os.O_CLOEXEC, 0o444)
    try:
        _pwrite_all(fd, [memoryview(data)], 0)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: str, target: str, durable: bool) -> None:
    try:
        os.rename(tmp, target)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise SnapshotError(f"cannot write a snapshot to {target!r}: something was created "
                                "there meanwhile") from None
        raise _os_error(f"cannot write a snapshot to {target!r}", e) from e
    if durable:
        fd = os.open(os.path.dirname(target), os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- which pages hold data ---------------------------------------------------------------------


def _mapped_file(memory: FileMemory) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the file ``memory`` maps, from ``/proc/self/maps``."""
    start = f"{memory.mapping.address:x}-"
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if line.startswith(start):
                    fields = line.split(maxsplit=5)
                    major, minor = (int(x, 16) for x in fields[3].split(":"))
                    return os.makedev(major, minor), int(fields[4])
    except OSError:
        return None
    return None


def _file_data_pages(memory: FileMemory) -> Pages | None:
    """Pages of ``memory``'s file range that the file holds data for (``SEEK_DATA``), or
    ``None`` if the file at its path is not the one mapped any more."""
    try:
        fd = os.open(memory.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if _mapped_file(memory) != (st.st_dev, st.st_ino):
            return None
        firsts: list[int] = []
        counts: list[int] = []
        for a, b in _data_extents(fd, memory.offset, memory.offset + memory.size):
            first = (a - memory.offset) // PAGE_SIZE
            firsts.append(first)
            counts.append(-(-(b - memory.offset) // PAGE_SIZE) - first)
    finally:
        os.close(fd)
    return runs_to_pages(np.array(firsts, dtype=np.uint64), np.array(counts, dtype=np.uint64))


def _data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The file's data extents within ``[start, end)`` (``SEEK_DATA``/``SEEK_HOLE``); the
    whole range where the file system cannot tell."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            if e.errno == errno.EINVAL:  # no SEEK_DATA here: everything may hold data
                yield pos, end
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        pos = hole


def _candidates(memory: Memory) -> Pages:
    """Pages of ``memory`` that may hold something other than zero."""
    if isinstance(memory, FileMemory):
        data = _file_data_pages(memory)
        if data is None:  # the file is gone or replaced: every page may hold data
            return np.arange(memory.num_pages, dtype=np.uint64)
        if memory.shared:
            return data
        return sorted_unique(np.concatenate((data, memory.populated_pages())))
    return memory.populated_pages()


def _nonzero(memory: Memory, pages: Pages) -> Pages:
    """Those of ``pages`` (sorted, distinct) that hold a non-zero byte."""
    if not len(pages):
        return pages
    words = np.frombuffer(memory.mapping.mm, dtype=np.uint64).reshape(-1, _PAGE_U64)
    first, count = coalesce(pages)
    keep: list[Pages] = []
    long_runs = count >= 16
    for f, c in zip(first[long_runs].tolist(), count[long_runs].tolist(), strict=True):
        for a in range(f, f + c, _SCAN):
            b = min(a + _SCAN, f + c)
            nz = words[a:b].any(axis=1)
            if nz.any():
                keep.append(np.flatnonzero(nz).astype(np.uint64) + np.uint64(a))
    short = runs_to_pages(first[~long_runs], count[~long_runs])
    for a in range(0, len(short), _SCAN):
        idx = short[a:a + _SCAN]
        nz = words[idx.astype(np.intp)].any(axis=1)
        keep.append(idx[nz])
    del words
    return sorted_unique(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.uint64)


def _union(a: Pages | None, b: Pages) -> Pages:
    if a is None or not len(a):
        return b
    if not len(b):
        return a
    return sorted_unique(np.concatenate((a, b)))


# -- writing a layer ---------------------------------------------------------------------------


class _Writer:
    """Writes one layer's memory file and, at :meth:`finish`, its index, state and manifest
    into a private directory.  ``memories`` are the slots' memory by slot (guest memory, or
    memory being merged); the pages written are read from there."""

    def __init__(self, directory: str, kind: Literal["full", "diff"],
                 machine: MachineLayout, memories: Mapping[int, Memory]):
        self.dir = directory
        self.kind = kind
        self.machine = machine
        self.memories = dict(memories)
        self.views = {s: memoryview(m.mapping.mm) for s, m in self.memories.items()}
        self._page_views = {s: np.frombuffer(v, dtype=PAGE_ITEM) for s, v in self.views.items()}
        self._scratch: npt.NDArray[np.void] | None = None
        # chunks hashed as they were written: file offset -> (length, XXH3)
        self._hashes: dict[int, tuple[int, int]] = {}
        self.offsets = machine.image_offsets()
        self.whole: set[int] = set(self.memories) if kind == "full" else set()
        # image: the pages written, per slot; packed: also their offsets in the file
        self._pages: dict[int, Pages] = {}
        self._offs: dict[int, Pages] = {}
        self._end = 0
        self.fd = os.open(os.path.join(directory, MEMORY), os.O_RDWR | os.O_CREAT | os.O_EXCL
                          | os.O_CLOEXEC, 0o444)
        if kind == "full":
            try:
                os.ftruncate(self.fd, machine.image_bytes)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        self._page_views = {}
        for v in self.views.values():
            v.release()
        self.views = {}
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def write_whole(self, slot: int) -> None:
        """Every page of the slot that holds data, and every page written before (whatever it
        holds now): the slot is then the layer's entirely."""
        memory = self.memories[slot]
        pages = _union(self._pages.get(slot), _nonzero(memory, _candidates(memory)))
        self.whole.add(slot)
        self.write(slot, pages)

    def apply(self, changes: Changes) -> None:
        """Write what a collection found changed."""
        for slot in sorted(changes.whole):
            if slot in self.memories:
                self.write_whole(slot)
        for slot, pages in sorted(changes.pages.items()):
            if slot not in changes.whole and slot in self.memories and len(pages):
                self.write(slot, pages)

    def write(self, slot: int, pages: Pages) -> None:
        """Write the current bytes of ``pages`` (sorted, distinct) of ``slot``."""
        if not len(pages):
            return
        view = self.views[slot]
        if self.kind == "full":
            base = self.offsets[slot]
            first, count = coalesce(pages)
            for f, c in zip(first.tolist(), count.tolist(), strict=True):
                a = f * PAGE_SIZE
                _pwrite_all(self.fd, [view[a:a + c * PAGE_SIZE]], base + a)
            self._pages[slot] = _union(self._pages.get(slot), pages)
            return
        old_p = self._pages.get(slot)
        old_o = self._offs.get(slot)
        if old_p is None or old_o is None or not len(old_p):
            self._pages[slot], self._offs[slot] = pages, self._write_new(slot, pages)
            return
        pos = np.searchsorted(old_p, pages)
        hit = pos < len(old_p)
        hit[hit] = old_p[pos[hit]] == pages[hit]
        if hit.any():  # written by an earlier pass: again, in place
            self._hashes.clear()  # (rare: hashed again at the end, all of them)
            self._write_packed(view, pages[hit], old_o[pos[hit]])
        new = pages[~hit]
        if len(new):
            offs = self._write_new(slot, new)
            allp = np.concatenate((old_p, new))
            order = np.argsort(allp, kind="stable")
            self._pages[slot] = allp[order]
            self._offs[slot] = np.concatenate((old_o, offs))[order]

    def _write_new(self, slot: int, pages: Pages) -> Pages:
        """Append ``pages`` (sorted) of ``slot`` to the packed file, :data:`CHUNK_BYTES` at a
        time: each piece is gathered into a buffer, hashed there (the chunk of the file it
        becomes, if the chunks come out cut there) and written.  Measured here for 1,000
        scattered pages: 3.7 ms, against 5.0 ms for a ``pwritev`` straight from guest
        memory followed by the hashing; and the file sized first costs less to write into
        than one that grows with each write.  Returns the pages' file offsets."""
        n = len(pages)
        start = self._end
        self._end += n * PAGE_SIZE
        os.ftruncate(self.fd, self._end)
        per = CHUNK_BYTES // PAGE_SIZE
        if self._scratch is None:
            self._scratch = np.empty(per, dtype=PAGE_ITEM)
        src = self._page_views[slot]
        idx = pages.astype(np.intp)
        for a in range(0, n, per):
            c = min(per, n - a)
            buf = self._scratch[:c]
            np.take(src, idx[a:a + c], out=buf)
            self._hashes[start + a * PAGE_SIZE] = (c * PAGE_SIZE, xxh3(buf.data))
            _pwrite_all(self.fd, [buf.data.cast("B")], start + a * PAGE_SIZE)
        return np.uint64(start) + np.arange(n, dtype=np.uint64) * np.uint64(PAGE_SIZE)

    def _write_packed(self, view: memoryview, pages: Pages, offs: Pages) -> None:
        """``pages`` (sorted) to file offsets ``offs``: one ``pwritev`` per stretch of the file
        they fill one after the other, with one buffer per run of consecutive pages."""
        n = len(pages)
        brk_file = np.flatnonzero(offs[1:] != offs[:-1] + np.uint64(PAGE_SIZE)) + 1
        brk_page = np.flatnonzero(pages[1:] != pages[:-1] + np.uint64(1)) + 1
        # runs of consecutive pages at consecutive offsets, grouped by file stretches
        cuts = np.union1d(brk_file, brk_page).tolist()
        starts = [0, *cuts]
        ends = [*cuts, n]
        file_breaks = set(brk_file.tolist())
        pl, ol = pages.tolist(), offs.tolist()
        bufs: list[memoryview] = []
        at = ol[0]
        for a, b in zip(starts, ends, strict=True):
            if a in file_breaks:
                _pwrite_all(self.fd, bufs, at)
                bufs, at = [], ol[a]
            p = pl[a] * PAGE_SIZE
            bufs.append(view[p:p + (b - a) * PAGE_SIZE])
        _pwrite_all(self.fd, bufs, at)

    def _runs(self) -> npt.NDArray[np.void]:
        parts = []
        for slot in sorted(self._pages):
            pages = self._pages[slot]
            if not len(pages):
                continue
            if self.kind == "full":
                offs = np.uint64(self.offsets[slot]) + pages * np.uint64(PAGE_SIZE)
            else:
                offs = self._offs[slot]
            brk = np.flatnonzero((pages[1:] != pages[:-1] + np.uint64(1))
                                 | (offs[1:] != offs[:-1] + np.uint64(PAGE_SIZE))) + 1
            starts = np.concatenate(([0], brk)).astype(np.intp)
            ends = np.concatenate((brk, [len(pages)])).astype(np.intp)
            r = np.zeros(len(starts), dtype=RUN)
            r["slot"] = slot
            r["first"] = pages[starts]
            r["pages"] = ends - starts
            r["offset"] = offs[starts]
            parts.append(r)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=RUN)

    def finish(self, *, state: MachineState, base: BaseRef | None, guest: Mapping[str, Any],
               durable: bool) -> tuple[str, dict[str, Any]]:
        """Hash the chunks (from the memory the pages were written from, unchanged since),
        write the index, state and manifest; returns the manifest checksum and JSON."""
        runs = self._runs()
        by_off = runs[np.argsort(runs["offset"], kind="stable")]
        offs, lens = canonical_chunks(by_off["offset"], by_off["pages"] * np.uint64(PAGE_SIZE),
                                      by_off["slot"])
        chunks = np.zeros(len(offs), dtype=CHUNK)
        chunks["offset"], chunks["length"] = offs, lens
        if len(offs):
            # hashed as written where the chunks were cut there; the rest from memory now
            todo = np.ones(len(offs), dtype=bool)
            for i, (o, n) in enumerate(zip(offs.tolist(), lens.tolist(), strict=True)):
                got = self._hashes.get(o)
                if got is not None and got[0] == n:
                    chunks["hash"][i] = got[1]
                    todo[i] = False
            chunk_slots = by_off["slot"][np.searchsorted(by_off["offset"], offs,
                                                         side="right") - 1]
            for slot in np.unique(chunk_slots[todo]).tolist():
                mine = todo & (chunk_slots == slot)
                lo, hi = np.searchsorted(runs["slot"], [slot, slot + 1])
                chunks["hash"][mine] = slot_chunk_hashes(self.views[slot], runs[lo:hi],
                                                         offs[mine], lens[mine])
        stored = int(runs["pages"].sum()) if len(runs) else 0
        layout: Literal["image", "packed"] = "image" if self.kind == "full" else "packed"
        if durable:
            os.fsync(self.fd)
        mem_bytes = self.machine.image_bytes if self.kind == "full" else self._end
        index = encode_index(layout, runs, chunks)
        raw_state = state.to_bytes()
        _write_file(self.dir, INDEX, index, durable)
        _write_file(self.dir, STATE, raw_state, durable)
        body = manifest_body(
            id=new_id(), created=now_utc(), kind=self.kind, base=base, machine=self.machine,
            memory_layout=layout, whole_slots=self.whole, stored_pages=stored,
            memory=FileRef(mem_bytes), index=FileRef(len(index), f"{xxh3(index):016x}"),
            state=FileRef(len(raw_state), f"{xxh3(raw_state):016x}"), runs=len(runs),
            chunks=len(chunks), guest=guest)
        raw, h = encode_manifest(body)
        _write_file(self.dir, MANIFEST, raw, durable)
        return h, body


@contextlib.contextmanager
def _held(vcpus: Iterable[Vcpu]) -> Iterator[None]:
    """Every vCPU held outside KVM_RUN for the block; refused if one is in it now."""
    with contextlib.ExitStack() as stack:
        for v in vcpus:
            if v.running:
                raise KvmStateError(f"vCPU {v.id} is running; stop or pause the vCPUs before "
                                    "a snapshot (or pass their runner)")
            stack.enter_context(v.outside_run())
        yield


def _vcpu_list(vm: Vm, vcpus: Iterable[Vcpu] | Mapping[int, Vcpu] | None) -> list[Vcpu]:
    if vcpus is None:
        return [v for _, v in sorted(vm.vcpus.items())]
    items = list(vcpus.values()) if isinstance(vcpus, Mapping) else list(vcpus)
    return sorted(items, key=lambda v: v.id)


def _save(target: str, tmp: str, vm: Vm, vcpus: list[Vcpu], *, kind: Literal["full", "diff"],
          base: SnapshotInfo | None, changes_log: ChangeLog | None, devices: IoBus | None,
          guest: Mapping[str, Any], runner: VcpuRunner | None, live_passes: int,
          on_exit: Callable[[VcpuExit], None] | None, durable: bool) -> SnapshotInfo:
    """Write one layer into ``tmp`` and publish it as ``target`` (see :meth:`Snapshotter.save`)."""
    guest = guest_json(guest)
    machine = machine_layout(vm, vcpus)
    regions: dict[int, MemoryRegion] = vm.regions
    writer = _Writer(tmp, kind, machine, {s: r.memory for s, r in regions.items()})
    resume = False
    try:  # (the writer closes its file if it fails to set it up)
        first = True
        if (runner is not None and live_passes > 0 and runner.running and not runner.paused
                and changes_log is not None):
            for _ in range(live_passes):
                changes = changes_log.collect(final=False)
                if kind == "full" and first:
                    for slot in regions:
                        writer.write_whole(slot)
                else:
                    writer.apply(changes)
                first = False
            runner.pause()
            resume = True
        for v in vcpus:
            if v.running:
                raise KvmStateError(f"vCPU {v.id} is running; stop or pause the vCPUs before "
                                    "a snapshot (or pass their runner)")
        finish_pending_exits(vcpus, on_exit=on_exit)  # may write memory: before the last pass
        with _held(vm.vcpus.values()):
            if vm.regions != regions:
                raise SnapshotError("the VM's memory slots changed while the snapshot was "
                                    "taken")
            last = changes_log.collect(final=True) if changes_log is not None else None
            if kind == "full" and first:
                for slot in regions:
                    writer.write_whole(slot)
            elif last is not None:
                writer.apply(last)
            state = capture(vm, vcpus, devices=devices)
            ref = None if base is None else base.ref(relative_to=target)
            h, body = writer.finish(state=state, base=ref, guest=guest, durable=durable)
    finally:
        writer.close()
        if resume and runner is not None:
            runner.resume()
    _publish(tmp, target, durable)
    return info_of(body, h, target)


def save_snapshot(path: str | os.PathLike[str], vm: Vm,
                  vcpus: Iterable[Vcpu] | Mapping[int, Vcpu] | None = None, *,
                  devices: IoBus | None = None, guest: Mapping[str, Any] | None = None,
                  on_exit: Callable[[VcpuExit], None] | None = None,
                  durable: bool = False) -> SnapshotInfo:
    """Write a full snapshot of ``vm`` (its ``vcpus``, default all, stopped) to the new
    directory ``path`` and return what its manifest says.

    Guest memory: every page that holds data (zero pages become holes); machine state:
    :func:`~kvmio.snapshot.state.capture` with ``devices`` (an :class:`~kvmio.devices.IoBus`)
    if given; ``guest``: JSON metadata stored in the manifest.  Pending exits are finished
    first (:func:`~kvmio.snapshot.state.finish_pending_exits`; exits met go to ``on_exit``).
    ``path`` must not exist, or be an empty directory; the layer is written beside it and
    renamed into place, so a failed save leaves nothing.  ``durable`` syncs every file and
    the directory to disk.  For diffs, use a :class:`Snapshotter`.  Raises
    :class:`~kvmio.errors.SnapshotError` (a file that cannot be written: with its errno) or
    :class:`~kvmio.errors.KvmStateError` (a vCPU running).
    """
    target, tmp = _prepare_target(path)
    try:
        return _save(target, tmp, vm, _vcpu_list(vm, vcpus), kind="full", base=None,
                     changes_log=None, devices=devices, guest=guest or {}, runner=None,
                     live_passes=0, on_exit=on_exit, durable=durable)
    except OSError as e:
        if isinstance(e, KvmError):
            raise
        raise _os_error(f"cannot write a snapshot to {target!r}", e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_UNSET: Any = object()


class Snapshotter(Closing):
    """Snapshots of one VM as a chain: the first :meth:`save` is full, each later one a diff
    of the pages changed since the previous save.

    It becomes the VM's dirty-log consumer when made (every vCPU's ring, or the bitmap
    claim), unless ``tracker`` (a :class:`~kvmio.tracker.DirtyTracker` of the VM) holds the
    log, and then must be the tracker's only taker; it opens a host-write record on every
    slot.  Changes the log cannot name make a diff hold a slot whole (a slot that is not
    dirty-logged, a ring overrun): never a wrong diff.  A save after the memory slots
    changed, after a failed save, or with ``full=True``, is full.

    ``base``: the :class:`SnapshotInfo` of a snapshot the VM's memory equals now (one it was
    just restored from, see :class:`RestoredVm`), so that the first save is already a diff
    on it.  Make it before the guest runs or the host writes guest memory: guest writes
    wait in the dirty log for their consumer, but host writes are recorded only from then
    on.  ``devices`` and ``guest`` are saved with every layer (each save may override
    them).  Close it (or use ``with``) to give the dirty log back.
    """

    def __init__(self, vm: Vm, *, tracker: DirtyTracker | None = None,
                 devices: IoBus | None = None, guest: Mapping[str, Any] | None = None,
                 base: SnapshotInfo | None = None):
        if not isinstance(vm, Vm):
            raise SnapshotError(f"vm must be a Vm, not {type(vm).__name__}")
        if tracker is not None and tracker.vm is not vm:
            raise SnapshotError("the tracker tracks another VM")
        if base is not None and not _same_slots(base.machine, machine_layout(vm)):
            raise SnapshotError(f"the base {base.path!r} has other memory slots than this VM")
        self.vm = vm
        self.devices = devices
        self.guest = guest_json(guest)
        self._log = ChangeLog(vm, tracker=tracker)
        self._last = base
        self._doubt = base is None

    def __repr__(self) -> str:
        last = "none" if self._last is None else self._last.path
        return f"<Snapshotter last={last}{' closed' if self._log.closed else ''}>"

    @property
    def last(self) -> SnapshotInfo | None:
        """The layer the next diff applies to (the last one saved, or the base)."""
        return self._last

    def close(self) -> None:
        """Give the dirty log back and close the host-write records (idempotent)."""
        self._log.close()

    def save(self, path: str | os.PathLike[str],
             vcpus: Iterable[Vcpu] | Mapping[int, Vcpu] | None = None, *,
             devices: IoBus | None = _UNSET, guest: Mapping[str, Any] | None = _UNSET,
             full: bool = False, runner: VcpuRunner | None = None, live_passes: int = 1,
             on_exit: Callable[[VcpuExit], None] | None = None,
             durable: bool = False) -> SnapshotInfo:
        """Write the next layer to the new directory ``path`` (see :func:`save_snapshot` for
        ``vcpus``, ``on_exit``, ``durable`` and the errors) and return what its manifest says.

        With a running ``runner`` (a :class:`~kvmio.runner.VcpuRunner` of the vCPUs), the
        pages are first copied while the guest runs, ``live_passes`` times (each pass copies
        what changed since the one before), then the runner is paused for the last pass and
        the machine state, and resumed.  Without one, the vCPUs must be stopped.
        """
        if self._log.closed:
            raise SnapshotError("this Snapshotter is closed")
        if live_passes < 0:
            raise SnapshotError(f"live_passes must be >= 0, not {live_passes}")
        vm = self.vm
        last = self._last
        diff = (not full and last is not None and not self._doubt
                and _same_slots(last.machine, machine_layout(vm)))
        target, tmp = _prepare_target(path)
        self._doubt = True  # until this save is done: a failed one leaves the log consumed
        try:
            info = _save(target, tmp, vm, _vcpu_list(vm, vcpus),
                         kind="diff" if diff else "full", base=last if diff else None,
                         changes_log=self._log,
                         devices=self.devices if devices is _UNSET else devices,
                         guest=self.guest if guest is _UNSET else (guest or {}), runner=runner,
                         live_passes=live_passes, on_exit=on_exit, durable=durable)
        except OSError as e:
            if isinstance(e, KvmError):
                raise
            raise _os_error(f"cannot write a snapshot to {target!r}", e) from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._last = info
        self._doubt = False
        return info


# -- reading chains ----------------------------------------------------------------------------


def _load_chain(spec: ChainSpec) -> list[Layer]:
    """Every layer from the full one up to the top, read and checked, with their links."""
    if isinstance(spec, str | os.PathLike):
        layers = [read_layer(spec)]
        seen = {layers[0].info.id}
        while layers[0].info.base is not None:
            ref = layers[0].info.base
            if len(layers) >= MAX_CHAIN:
                raise SnapshotError(f"the chain is longer than {MAX_CHAIN} layers")
            if ref.path is None:
                raise SnapshotError(f"layer {layers[0].directory!r} does not say where its base "
                                    "is: give every layer's path")
            where = ref.path if os.path.isabs(ref.path) else \
                os.path.normpath(os.path.join(layers[0].directory, ref.path))
            try:
                base = read_layer(where)
            except SnapshotError as e:
                raise SnapshotError(f"the base of {layers[0].directory!r} ({where!r}): "
                                    f"{e}") from None
            if base.info.id in seen:
                raise SnapshotError(f"the chain loops at {where!r}")
            seen.add(base.info.id)
            _check_link(base, layers[0])
            layers.insert(0, base)
    else:
        paths = list(spec)
        if not paths:
            raise SnapshotError("no layers given")
        if len(paths) > MAX_CHAIN:
            raise SnapshotError(f"the chain is longer than {MAX_CHAIN} layers")
        layers = [read_layer(p) for p in paths]
        if layers[0].info.base is not None:
            raise SnapshotError(f"the first layer {layers[0].directory!r} is a diff; a chain "
                                "starts with a full snapshot")
        for lower, upper in itertools.pairwise(layers):
            if upper.info.base is None:
                raise SnapshotError(f"{upper.directory!r} is a full snapshot; only the first "
                                    "layer of a chain can be")
            _check_link(lower, upper)
    return layers


def _check_link(lower: Layer, upper: Layer) -> None:
    ref = upper.info.base
    assert ref is not None
    if ref.id != lower.info.id:
        raise SnapshotError(f"{upper.directory!r} is a diff on snapshot {ref.id}, not on "
                            f"{lower.directory!r} (snapshot {lower.info.id})")
    if ref.manifest_hash != lower.info.manifest_hash:
        raise SnapshotError(f"{upper.directory!r} is a diff on snapshot {ref.id}, but "
                            f"{lower.directory!r} has that id and another manifest (it was "
                            "changed since)")
    if not _same_slots(lower.info.machine, upper.info.machine):
        raise SnapshotError(f"{upper.directory!r} and its base {lower.directory!r} have other "
                            "memory slots")


def read_chain(path: ChainSpec) -> list[SnapshotInfo]:
    """What every layer of the chain ending at ``path`` says, from the full layer up (see
    :func:`restore_snapshot` for ``path``); metadata checked, memory not."""
    return [layer.info for layer in _load_chain(path)]


# -- memory from layers ------------------------------------------------------------------------


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise _os_error(f"cannot open {path!r}", e) from e


def _read_runs(layer: Layer, slot: int, view: memoryview, fd: int,
               fresh: Memory | None = None) -> None:
    """Read the slot's runs of ``layer`` into ``view`` (checked bounds: the index was).
    ``fresh``: the memory behind ``view``, if nothing was read into it yet: its long runs are
    populated first, on huge pages where whole blocks allow (a fault per 2 MiB, not per
    page)."""
    runs = layer.slot_runs(slot)
    if not len(runs):
        return
    if fresh is not None:
        for f, n in zip(runs["first"].tolist(), runs["pages"].tolist(), strict=True):
            if n >= _HUGE_RUN:
                fresh.populate(f, n, huge=True)
    order = np.argsort(runs["offset"], kind="stable")
    firsts = runs["first"][order].tolist()
    pages = runs["pages"][order].tolist()
    offs = runs["offset"][order].tolist()
    bufs: list[memoryview] = []
    at = end = offs[0]
    for f, n, o in zip(firsts, pages, offs, strict=True):
        if o != end:  # the file jumps: read what is gathered
            _pread_all(fd, bufs, at, f"memory of {layer.directory!r}")
            bufs, at = [], o
        a = f * PAGE_SIZE
        bufs.append(view[a:a + n * PAGE_SIZE])
        end = o + n * PAGE_SIZE
    _pread_all(fd, bufs, at, f"memory of {layer.directory!r}")


def _verify_slot(layer: Layer, slot: int, view: memoryview) -> None:
    """Check the chunks of ``slot`` of ``layer`` against the bytes in ``view`` (the slot's
    memory, where the layer's pages are now)."""
    chunks = layer.slot_chunks(slot)
    if not len(chunks):
        return
    got = slot_chunk_hashes(view, layer.slot_runs(slot), chunks["offset"], chunks["length"])
    bad = np.flatnonzero(got != chunks["hash"])
    if len(bad):
        i = int(bad[0])
        raise SnapshotError(f"memory of {layer.directory!r}: {len(bad)} chunk(s) of slot {slot} "
                            f"do not match their checksums (corrupted), the first at file "
                            f"offset {int(chunks['offset'][i]):#x}")


def _gaps(covered: list[tuple[int, int]], extents: Iterable[tuple[int, int]]
          ) -> Iterator[tuple[int, int]]:
    """The parts ``[pos, stop)`` of ``extents`` (data ranges ``[a, b)``, in order) that no
    ``(offset, length)`` of ``covered`` (sorted) covers."""
    covered = sorted(covered)
    i = 0
    for a, b in extents:
        pos = a
        while pos < b:
            while i < len(covered) and covered[i][0] + covered[i][1] <= pos:
                i += 1
            if i < len(covered) and covered[i][0] <= pos:
                pos = covered[i][0] + covered[i][1]
                continue
            stop = min(b, covered[i][0]) if i < len(covered) else b
            yield pos, stop
            pos = stop


def _check_holes(layer: Layer, slot: int, view: memoryview, fd: int, start: int,
                 size: int) -> None:
    """The file's data in ``[start, start+size)`` outside the slot's runs must be zero (the
    pages a lazy mapping shows there)."""
    runs = layer.slot_runs(slot)
    covered = list(zip((runs["offset"] - np.uint64(start)).tolist(),
                       (runs["pages"] * np.uint64(PAGE_SIZE)).tolist(), strict=True))
    extents = ((a - start, b - start) for a, b in _data_extents(fd, start, start + size))
    for pos, stop in _gaps(covered, extents):
        if any(view[pos:stop]) if stop - pos < 64 else np.frombuffer(
                view[pos:stop], dtype=np.uint8).any():
            raise SnapshotError(f"memory of {layer.directory!r}: data outside the stored "
                                f"runs of slot {slot} at file offset {start + pos:#x} "
                                "(corrupted)")


def _materialize(chain: list[Layer], *, lazy: bool, verify: bool) -> dict[int, Memory]:
    """Each slot's memory with the chain's content (see the module): a private mapping of
    the full layer's file where it can be (``lazy``), else anonymous memory; each layer's
    chunks checked as they are placed (``verify``).  Nothing is registered with a VM yet;
    everything made is closed on failure."""
    out: dict[int, Memory] = {}
    fds: dict[int, int] = {}
    try:
        offsets = chain[0].info.machine.image_offsets()
        for s in chain[-1].info.machine.slots:
            start = max(i for i, layer in enumerate(chain) if s.slot in layer.info.whole_slots)
            mapped = lazy and chain[start].info.memory_layout == "image"
            memory: Memory
            if mapped:
                try:
                    memory = FileMemory(chain[start].memory_path, offset=offsets[s.slot],
                                        size=s.size)
                except KvmError as e:
                    raise SnapshotError(f"cannot map {chain[start].memory_path!r}: "
                                        f"{e.message}", errno=e.errno) from None
            else:
                try:
                    memory = AnonymousMemory(s.size, noreserve=True)
                except KvmError as e:
                    raise SnapshotError(f"cannot map {s.size} bytes for slot {s.slot}: "
                                        f"{e.message}", errno=e.errno) from None
            out[s.slot] = memory
            view = memoryview(memory.mapping.mm)
            try:
                for i in range(start, len(chain)):
                    layer = chain[i]
                    fd = fds.get(i)
                    if fd is None:
                        fd = fds[i] = _open(layer.memory_path)
                    if not (mapped and i == start):
                        _read_runs(layer, s.slot, view, fd,
                                   memory if i == start else None)
                    if verify:
                        _verify_slot(layer, s.slot, view)
                        if mapped and i == start:
                            _check_holes(layer, s.slot, view, fd, offsets[s.slot], s.size)
                        elif layer.info.memory_layout == "image":  # not read, but must be 0
                            _check_holes_file(layer, s.slot, fd, offsets[s.slot], s.size,
                                              memoryview(bytearray(CHUNK_BYTES)))
            finally:
                view.release()
        return out
    except BaseException:
        for m in out.values():
            m.close()
        raise
    finally:
        for fd in fds.values():
            os.close(fd)


# -- restoring ---------------------------------------------------------------------------------


#: ``dirty_ring=`` default of :func:`restore_snapshot`: as the snapshot's VM had it.
AS_SAVED: Any = object()


class RestoredVm(Closing):
    """A VM built and restored from a snapshot chain (by :func:`restore_snapshot`): ``vm``,
    its ``vcpus`` by id, the ``state`` restored, the ``chain`` of layers (full first) and the
    port devices' state (``devices``: restored into the bus given, or for the caller to
    restore).  Closing it closes the VM."""

    def __init__(self, vm: Vm, vcpus: dict[int, Vcpu], state: MachineState,
                 chain: tuple[SnapshotInfo, ...]):
        self.vm = vm
        self.vcpus = vcpus
        self.state = state
        self.chain = chain

    def __repr__(self) -> str:
        return f"<RestoredVm {self.info.path!r} ({len(self.chain)} layers) {self.vm!r}>"

    @property
    def info(self) -> SnapshotInfo:
        """The top layer (a :class:`Snapshotter` made with ``base=`` this continues it)."""
        return self.chain[-1]

    @property
    def guest(self) -> Mapping[str, Any]:
        """The top layer's guest metadata."""
        return self.info.guest

    @property
    def devices(self) -> Mapping[str, Mapping[str, int | bytes]] | None:
        """The port devices' state, if the snapshot has it."""
        return self.state.devices

    def close(self) -> None:
        """Close the VM (idempotent)."""
        self.vm.close()


def restore_snapshot(kvm: Kvm, path: ChainSpec, *, lazy: bool = True, verify: bool = True,
                     devices: IoBus | None = None, dirty_ring: int | None = AS_SAVED,
                     log_dirty: bool | None = None,
                     guest_kind: str | None = None) -> RestoredVm:
    """Build a new VM from a snapshot and restore it; returns a :class:`RestoredVm`.

    ``path``: the top layer's directory (a diff's bases are found through the path each one
    records, relative to it), or the directories of every layer from the full one up.  The
    VM gets the snapshot's memory slots (``log_dirty`` overrides their dirty-logging flag),
    dirty ring (``dirty_ring``: entries, or ``None`` for none; default as saved), TSS and
    identity-map addresses, irqchip, PIT and vCPUs, then the machine state (and the port
    devices' state into ``devices`` if given; else it is left in :attr:`RestoredVm.devices`).

    ``lazy`` maps the full layer's memory file copy-on-write (pages read on first touch,
    the page cache shared by every VM restored from the file; diffs on it are read);
    ``lazy=False`` reads everything into anonymous memory.  ``verify`` (the default) checks
    every memory chunk's checksum as it is placed; ``verify=False`` trusts the memory file
    (every other check is still made).  ``guest_kind``: the ``kind`` the top layer's guest
    metadata must have (e.g. ``"multiboot"``), checked before anything is built.  Any refusal
    is a :class:`SnapshotError` and closes everything made; the kernel's own refusals (a
    state it does not take) carry its errno and ioctl.
    """
    chain = _load_chain(path)
    top = chain[-1].info
    if guest_kind is not None and top.guest.get("kind") != guest_kind:
        raise SnapshotError(f"{top.path!r} is not a snapshot of a {guest_kind} guest (its "
                            f"guest is {top.guest.get('kind')!r})")
    state = chain[-1].state
    memories = _materialize(chain, lazy=lazy, verify=verify)
    vm, vcpus = build_vm(kvm, top.machine, memories, dirty_ring=dirty_ring,
                         log_dirty=log_dirty, what=repr(top.path))
    try:
        target = state if devices is not None or state.devices is None else \
            MachineState(state.vm, state.vcpus, None)
        restore(target, vm, vcpus, devices=devices)
    except BaseException as e:
        vm.close()
        if isinstance(e, KvmError) and not isinstance(e, SnapshotError):
            raise SnapshotError(f"the VM could not be built as {top.path!r} says: {e.message}",
                                errno=e.errno, ioctl=e.ioctl) from e
        raise
    return RestoredVm(vm, vcpus, state, tuple(layer.info for layer in chain))


def build_vm(kvm: Kvm, machine: MachineLayout, memories: dict[int, Memory], *,
             dirty_ring: int | object | None = AS_SAVED, log_dirty: bool | None = None,
             what: str = "its layout") -> tuple[Vm, dict[int, Vcpu]]:
    """A new VM built as ``machine`` says, its slots backed by ``memories`` (one per slot id,
    handed to the VM: closed with it, or here if the build fails): dirty ring (``dirty_ring``:
    entries, ``None`` for none, default as the layout says), slots (``log_dirty`` overrides
    their flag), TSS and identity-map addresses, irqchip, PIT and vCPUs, in the order the
    kernel needs.  No state is restored.  A refusal raises :class:`SnapshotError` (naming
    ``what``) with everything made closed."""
    memories = dict(memories)
    try:
        vm = kvm.create_vm()
    except BaseException:
        for m in memories.values():
            m.close()
        raise
    try:
        ring = machine.dirty_ring if dirty_ring is AS_SAVED else dirty_ring
        if ring:
            vm.enable_dirty_ring(int(ring))  # type: ignore[call-overload]
        for s in machine.slots:  # before the irqchip: slot changes cost far more after it here
            vm.add_memory_region(s.guest_phys_addr, slot=s.slot, memory=memories[s.slot],
                                 log_dirty=s.log_dirty if log_dirty is None else log_dirty,
                                 readonly=s.readonly)
            del memories[s.slot]  # the VM owns it now
        if machine.tss_address is not None:
            vm.set_tss_address(machine.tss_address)
        if machine.identity_map_address is not None:
            vm.set_identity_map_address(machine.identity_map_address)
        if machine.irqchip:
            vm.create_irqchip()
        if machine.pit:
            vm.create_pit2()
        vcpus = {vid: vm.create_vcpu(vid) for vid in machine.vcpus}
    except BaseException as e:
        vm.close()
        for mem in memories.values():
            mem.close()
        if isinstance(e, KvmError) and not isinstance(e, SnapshotError):
            raise SnapshotError(f"the VM could not be built as {what} says: {e.message}",
                                errno=e.errno, ioctl=e.ioctl) from e
        raise
    return vm, vcpus


# -- inspecting and merging --------------------------------------------------------------------


def _verify_file(layer: Layer) -> None:
    """Check every memory chunk of ``layer`` by reading its file (and, for an image, that
    its data outside the runs is zero)."""
    if not len(layer.chunks) and layer.info.memory_layout == "packed":
        return
    fd = _open(layer.memory_path)
    try:
        buf = bytearray(layer.info.chunk_bytes)
        mv = memoryview(buf)
        offs = layer.chunks["offset"].tolist()
        lens = layer.chunks["length"].tolist()
        want = layer.chunks["hash"].tolist()
        for o, n, h in zip(offs, lens, want, strict=True):
            _pread_all(fd, [mv[:n]], o, f"memory of {layer.directory!r}")
            if xxh3(mv[:n]) != h:
                raise SnapshotError(f"memory of {layer.directory!r}: the chunk at file offset "
                                    f"{o:#x} does not match its checksum (corrupted)")
        if layer.info.memory_layout == "image":
            offsets = layer.info.machine.image_offsets()
            for s in layer.info.machine.slots:
                _check_holes_file(layer, s.slot, fd, offsets[s.slot], s.size, mv)
    finally:
        os.close(fd)


def _check_holes_file(layer: Layer, slot: int, fd: int, start: int, size: int,
                      buf: memoryview) -> None:
    """As :func:`_check_holes`, reading the file through ``buf`` instead of a mapping."""
    runs = layer.slot_runs(slot)
    covered = list(zip(runs["offset"].tolist(), (runs["pages"] * np.uint64(PAGE_SIZE)).tolist(),
                       strict=True))
    for pos, stop in _gaps(covered, _data_extents(fd, start, start + size)):
        while pos < stop:
            n = min(stop - pos, len(buf))
            _pread_all(fd, [buf[:n]], pos, f"memory of {layer.directory!r}")
            if np.frombuffer(buf[:n], dtype=np.uint8).any():
                raise SnapshotError(f"memory of {layer.directory!r}: data outside the stored "
                                    f"runs of slot {slot} at file offset {pos:#x} (corrupted)")
            pos += n


def inspect_snapshot(path: str | os.PathLike[str], *, verify: bool = True) -> SnapshotInfo:
    """What the layer at ``path`` (its directory or manifest) says, after checking its
    manifest, index and state, and with ``verify`` (the default) every memory chunk's
    checksum too (``checked`` says which).  Its bases are not read (see
    :func:`read_chain`).  Raises :class:`SnapshotError` at the first thing wrong."""
    layer = read_layer(path)
    if not verify:
        return layer.info
    _verify_file(layer)
    return _replace_checked(layer.info)


def _replace_checked(info: SnapshotInfo) -> SnapshotInfo:
    return dataclasses.replace(info, checked="all")


def merge_snapshots(path: ChainSpec, out: str | os.PathLike[str], *,
                    durable: bool = False) -> SnapshotInfo:
    """Write the chain ending at ``path`` (see :func:`restore_snapshot`) as one full snapshot
    to the new directory ``out``: the same memory, machine state and guest metadata as the
    top layer restored, in a new layer with no base.  Every layer's checksums are checked on
    the way.  Returns what the new manifest says."""
    chain = _load_chain(path)
    top = chain[-1]
    target, tmp = _prepare_target(out)
    memories: dict[int, Memory] = {}
    try:
        memories = _materialize(chain, lazy=False, verify=True)
        writer = _Writer(tmp, "full", top.info.machine, memories)
        try:
            for slot in memories:
                writer.write_whole(slot)
            h, body = writer.finish(state=top.state, base=None,
                                    guest=_thaw_guest(top.info.guest), durable=durable)
        finally:
            writer.close()
        _publish(tmp, target, durable)
        return info_of(body, h, target)
    except OSError as e:
        if isinstance(e, KvmError):
            raise
        raise _os_error(f"cannot write a snapshot to {target!r}", e) from e
    finally:
        for m in memories.values():
            m.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _thaw_guest(guest: Mapping[str, Any]) -> dict[str, Any]:
    return guest_json(guest)

