"""The raw layer: ioctls, mappings and pointers.

Every ``mmap`` and every pointer into memory that can go away (mappings, ``kvm_run``, numpy
buffers handed to the kernel) lives here or in :mod:`kvmio.dirty.ring`, each with a comment on
why it is safe.  The object modules above build ioctl arguments as owned, bounds-checked cffi
structs (``ffi.new``) and otherwise deal in Python values, ``bytes`` and numpy arrays.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import mmap
import os
import platform
import struct
import threading
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from kvmio._closing import Closing
from kvmio._native import ffi, lib
from kvmio.errors import KvmClosedError, KvmError, KvmInvalidArgumentError, from_errno

__all__ = ["ARCH", "IS_X86", "PAGE_SIZE", "FdOwner", "IoctlBatch", "Mapping", "PageRestore",
           "ffi", "ioctl", "lib", "pagemap_scan"]

PAGE_SIZE: int = mmap.PAGESIZE
ARCH: str = platform.machine().lower()
#: Whether the x86-only part of the binding (regs layout, MSRs, CPUID, LAPIC...) is compiled in.
IS_X86: bool = hasattr(lib, "KVM_GET_SUPPORTED_CPUID")

CData = Any  # a cffi pointer; cffi has no static types


def ioctl(fd: int, request: int, arg: CData | int = 0, *, name: str) -> int:
    """Issue ``ioctl(fd, request, arg)``; return its non-negative result or raise KvmError.

    ``arg`` is either a cffi pointer (the kernel reads/writes the struct it points to, which the
    caller keeps alive for the duration of the call) or an integer passed by value.  A call
    interrupted by a signal (EINTR) is issued again: a profiler's or the user's signal must not
    fail KVM_CREATE_VM.  (Python still runs its signal handlers between the attempts, so Ctrl-C
    raises KeyboardInterrupt here.)  KVM_RUN, where EINTR is a kick, uses :func:`ioctl_eintr`.
    """
    while True:
        if isinstance(arg, int):
            r = lib.kvmio_ioctl_val(fd, request, arg)
        else:
            r = lib.kvmio_ioctl(fd, request, arg)
        if r >= 0:
            return int(r)
        if r != -_errno.EINTR:
            raise from_errno(-r, name)


class IoctlBatch:
    """Ioctls with their argument buffers built once, issued in order by one native call
    (``kvmio_ioctl_batch``), stopping at the first that fails.

    ``entries`` are ``(ioctl name, argument, expected result)``: the argument is a cffi
    allocation (``ffi.new``) sized for the request, which the batch keeps; the expected result
    is the value the call must return (KVM_GET_MSRS and KVM_SET_MSRS return how many MSRs they
    handled), or -1 for any non-negative one.  ``payloads`` are, for each entry, the bytes the
    argument was built from (for writes) or ``b""``, so that a caller can compare what a batch
    would write without reading the C buffers back.  ``kind`` and ``info`` are the builder's
    notes (what object the batch is for, what to check before it is used).

    A batch goes to one fd; :meth:`chain` joins batches into one whose parts go each to its
    own fd (a VM's and its vCPUs'), still in one native call.

    Safety: the pointer array handed to C points into arguments the batch (or the batches it
    chains) owns for its whole life, each sized by the code that built it for its request;
    the caller holds the batch and every fd it passes open for the call.
    """

    def __init__(self, entries: list[tuple[str, CData, int]],
                 payloads: list[bytes] | None = None, *, kind: str = "",
                 info: dict[str, Any] | None = None):
        self.names: tuple[str, ...] = tuple(name for name, _, _ in entries)
        self._args = [arg for _, arg, _ in entries]
        self.payloads: tuple[bytes, ...] = tuple(payloads) if payloads is not None else \
            tuple(b"" for _ in entries)
        if len(self.payloads) != len(entries):
            raise ValueError("one payload per entry")
        self.kind = kind
        self.info: dict[str, Any] = dict(info or {})
        #: The batches this one chains (itself, for a plain batch), and where each starts.
        self.parts: tuple[IoctlBatch, ...] = (self,)
        self.starts: tuple[int, ...] = (0,)
        n = max(len(entries), 1)
        self._requests = ffi.new("unsigned long[]", n)
        self._pointers = ffi.new("void *[]", n)
        self._expect = ffi.new("int32_t[]", n)
        for k, (name, arg, expect) in enumerate(entries):
            self._requests[k] = int(getattr(lib, name))
            self._pointers[k] = ffi.cast("void *", arg)
            self._expect[k] = expect
        self._ends = ffi.new("uint32_t[]", [len(entries)])
        self._last: tuple[tuple[int, ...], tuple[int, ...], CData, CData] | None = None

    @classmethod
    def chain(cls, batches: list[IoctlBatch]) -> IoctlBatch:
        """One batch issuing ``batches`` one after the other, each on its own fd (see
        :meth:`run`).  It keeps the batches (and so their arguments) alive."""
        entries: list[tuple[str, CData, int]] = []
        payloads: list[bytes] = []
        starts: list[int] = []
        for b in batches:
            if len(b.parts) != 1:
                raise ValueError("chain plain batches")
            starts.append(len(entries))
            entries += [(name, b._args[k], int(b._expect[k])) for k, name in enumerate(b.names)]
            payloads += b.payloads
        out = cls(entries, payloads, kind="chain")
        out.parts = tuple(batches)
        out.starts = tuple(starts)
        out._ends = ffi.new("uint32_t[]", [*starts[1:], len(entries)])
        return out

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"<IoctlBatch {self.kind or '-'}: {', '.join(self.names)}>"

    def arg(self, k: int) -> CData:
        """The argument of entry ``k`` (the kernel's answer, after a read)."""
        return self._args[k]

    def part_of(self, k: int) -> tuple[int, int]:
        """``(part, entry within that part)`` of entry ``k`` of a chain."""
        part = max(i for i, s in enumerate(self.starts) if s <= k)
        return part, k - self.starts[part]

    def run(self, fds: int | list[int], skip: tuple[int, ...] = ()) -> tuple[int, int]:
        """Issue every entry (but those in ``skip``) in order: each part on its fd of
        ``fds`` (one fd for a plain batch).  Returns ``(index, result)``: the index of the
        first call that failed (``len(self)`` when none did) and its result (-errno, or a
        count other than the expected one; 0 when none failed)."""
        fd_list = (fds,) if isinstance(fds, int) else tuple(fds)
        skip = tuple(skip)  # compared with the last call's: a list changed in place would not
        if len(fd_list) != len(self.parts):
            raise ValueError(f"{len(self.parts)} fds needed, {len(fd_list)} given")
        # The fd array and the skip mask of the last call are kept (a reset writes the same
        # batch to the same fds again and again); each is read-only once made, so a call from
        # another thread at the same time at worst makes its own.
        last = self._last
        if last is None or last[0] != fd_list or last[1] != skip:
            mask = ffi.NULL
            if skip:
                mask = ffi.new("uint8_t[]", len(self.names))
                for k in skip:
                    mask[k] = 1
            last = self._last = (fd_list, skip, ffi.new("int[]", fd_list), mask)
        result = ffi.new("int32_t *")
        done = lib.kvmio_ioctl_batch(last[2], self._ends, len(fd_list), self._requests,
                                     self._pointers, self._expect, last[3], len(self.names),
                                     result)
        return int(done), int(result[0])


#: Bounded runs in progress at once, at most (over every thread of the process).
MAX_BOUNDED_RUNS = 256


def run_bounded(fd: int, run: KvmRun, seconds: float) -> tuple[int | None, bool]:
    """KVM_RUN for at most ``seconds`` (a per-thread kernel timer kicks the calling thread):
    ``(result, spare)``, result ``None`` on EINTR (the bound or a kick ended it); ``spare``:
    the timer set ``immediate_exit`` during the call (after a real exit: a spare kick, which
    the caller clears unless it was kicked meanwhile).  ``run`` is the vCPU's kvm_run, which
    the caller keeps mapped (it holds the vCPU's run) until this returns."""
    flag = ffi.new("int *")
    r = lib.kvmio_run_bounded(fd, lib.KVM_RUN, run.raw, max(1000, int(seconds * 1e9)), flag)
    if r == -_errno.EINTR:
        return None, bool(flag[0])
    if r == -_errno.EAGAIN:
        raise KvmError(f"more than {MAX_BOUNDED_RUNS} bounded runs at once",
                       errno=_errno.EAGAIN, ioctl="KVM_RUN")
    if r < 0:
        raise from_errno(-r, "KVM_RUN (bounded)")
    return int(r), bool(flag[0])


def ioctl_eintr(fd: int, request: int, *, name: str) -> int | None:
    """Like :func:`ioctl` with no argument, but return ``None`` on EINTR (a kicked KVM_RUN)."""
    r = lib.kvmio_ioctl_val(fd, request, 0)
    if r == -_errno.EINTR:
        return None
    if r < 0:
        raise from_errno(-r, name)
    return int(r)


_kick_lock = threading.Lock()
_kick_installed = False


def kick_signal() -> int:
    """The real-time signal used to kick vCPU threads, with its no-op handler installed."""
    global _kick_installed
    with _kick_lock:
        if not _kick_installed:
            r = lib.kvmio_install_kick_handler()
            if r < 0:
                raise from_errno(-r, "sigaction")
            _kick_installed = True
    return int(lib.kvmio_kick_signal())


class FdOwner(Closing):
    """Owns one file descriptor; ``close()`` is idempotent and later use raises KvmClosedError.

    Every ioctl goes through :meth:`_ioctl` (or holds :meth:`_acquire_fd` /
    :meth:`_release_fd` around its use), which counts the calls in flight; :meth:`_close_fd`
    refuses new calls, waits for those in flight, and only then closes the number.  So an fd
    number is never used after it was closed, not even by a call racing ``close()`` in another
    thread (the number could by then belong to another object, e.g. another vCPU).
    """

    _what = "object"

    def __init__(self, fd: int):
        self._fd: int | None = fd
        self._fd_cond = threading.Condition(threading.Lock())
        # Calls in flight, per thread: a hold that an asynchronous exception (Ctrl-C raised
        # between two bytecodes) leaked in the thread that now closes the object cannot be in
        # a system call, so close() waits only for other threads' holds.
        self._fd_users: dict[int, int] = {}
        self._fd_closing = False

    @property
    def fd(self) -> int:
        """The file descriptor (raises :class:`KvmClosedError` once closed).  Only valid while
        the object is open: kvmio's own calls hold it against a concurrent ``close()``."""
        if self._fd is None or self._fd_closing:
            raise KvmClosedError(f"this {self._what} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._fd is None or self._fd_closing

    def _acquire_fd(self) -> int:
        """The fd, held open until the matching :meth:`_release_fd`."""
        with self._fd_cond:
            if self._fd is None or self._fd_closing:
                raise KvmClosedError(f"this {self._what} is closed")
            me = threading.get_ident()
            self._fd_users[me] = self._fd_users.get(me, 0) + 1
            return self._fd

    def _release_fd(self) -> None:
        with self._fd_cond:
            me = threading.get_ident()
            left = self._fd_users.get(me, 0) - 1
            if left > 0:
                self._fd_users[me] = left
            else:
                self._fd_users.pop(me, None)
            if self._fd_closing:
                self._fd_cond.notify_all()

    def _others_in_flight(self) -> bool:
        """Under ``_fd_cond``: whether a thread other than this one holds the fd."""
        me = threading.get_ident()
        return any(t != me for t in self._fd_users)

    def _ioctl(self, request: int, arg: CData | int = 0, *, name: str) -> int:
        """:func:`ioctl` on this object's fd, held against a concurrent close."""
        fd = self._acquire_fd()
        try:
            return ioctl(fd, request, arg, name=name)
        finally:
            self._release_fd()

    def _run_batch(self, batch: IoctlBatch, skip: tuple[int, ...] = ()) -> tuple[int, int]:
        """:meth:`IoctlBatch.run` on this object's fd, held against a concurrent close."""
        fd = self._acquire_fd()
        try:
            return batch.run(fd, skip)
        finally:
            self._release_fd()

    def _close_fd(self, *, wake: Callable[[], None] | None = None,
                  before_close: Callable[[], None] | None = None) -> bool:
        """Refuse new calls, wait for the calls in flight (calling ``wake`` while waiting, e.g.
        to kick a vCPU out of KVM_RUN), run ``before_close``, and close the fd.  Returns
        whether this call closed it (False if it was closed already)."""
        with self._fd_cond:
            if self._fd is None or self._fd_closing:
                return False
            self._fd_closing = True
        try:
            while True:
                with self._fd_cond:
                    if not self._others_in_flight():
                        break
                # Not under _fd_cond: wake() takes the object's own locks (a vCPU's run lock,
                # which run() holds while it takes the fd).
                if wake is not None:
                    wake()
                with self._fd_cond:
                    if self._others_in_flight():
                        self._fd_cond.wait(0.05)
        except BaseException:
            # Interrupted (Ctrl-C) while calls were in flight: the object stays open, and
            # close() can be called again.
            with self._fd_cond:
                self._fd_closing = False
            raise
        try:
            if before_close is not None:
                before_close()
        finally:
            with self._fd_cond:
                fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)
        return True

    def __del__(self) -> None:
        # A finaliser for objects dropped without close(), as Python's own files have.
        if getattr(self, "_fd", None) is not None and not getattr(self, "_fd_closing", True):
            warnings.warn(f"unclosed {self._what} (fd {self._fd}); call close() or use 'with'",
                          ResourceWarning, source=self, stacklevel=2)
            with contextlib.suppress(Exception):
                self.close()


class Mapping:
    """An owned ``mmap`` with a C pointer to it.

    Safety: the pointer is obtained with ``ffi.from_buffer``, which holds a buffer export on the
    mmap; ``close()`` releases that export first and then unmaps.  So :attr:`ptr` (and
    :meth:`cast`) stays valid only until ``close()``: a user of it in C must either hold a
    lock that ``close()`` needs (the ring set's lock, for the rings) or take an export of its
    own for the call (``ffi.from_buffer(mapping.mm)``, as :func:`restore_pages` does).  While
    any export or view (memoryview, numpy array) of the mapping is alive, Python refuses to
    unmap it and the unmap waits for the last one.
    """

    def __init__(self, size: int, *, fd: int = -1, offset: int = 0, shared: bool = False,
                 noreserve: bool = False, what: str = "mapping"):
        flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        if fd == -1:
            flags |= mmap.MAP_ANONYMOUS
        if noreserve:
            flags |= int(lib.MAP_NORESERVE)
        try:
            self._mm: mmap.mmap | None = mmap.mmap(
                fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        except OSError as e:
            raise KvmError(f"cannot map {what} ({size} bytes): {e.strerror}",
                           errno=e.errno, ioctl="mmap") from e
        self.size = size
        self._what = what
        self._ptr: CData | None = ffi.from_buffer(self._mm)

    @property
    def mm(self) -> mmap.mmap:
        """The Python mmap object (raises once closed)."""
        if self._mm is None:
            raise KvmClosedError(f"this {self._what} is unmapped")
        return self._mm

    @property
    def ptr(self) -> CData:
        """A ``char *`` to the start of the mapping (raises once closed)."""
        if self._ptr is None:
            raise KvmClosedError(f"this {self._what} is unmapped")
        return self._ptr

    @property
    def address(self) -> int:
        """The host virtual address of the mapping."""
        return int(ffi.cast("uintptr_t", self.ptr))

    def cast(self, ctype: str) -> CData:
        """The mapping's start as a pointer of C type ``ctype``."""
        return ffi.cast(ctype, self.ptr)

    def populate(self, offset: int, length: int) -> int:
        """Fault ``length`` bytes from ``offset`` in, writable, without changing them
        (``MADV_POPULATE_WRITE``), with the GIL released; 0, or the ``errno`` the kernel
        gave (EINVAL: a kernel older than 5.14).  The caller checks the range."""
        # Safety: the export pins the mapping for the call (a close() meanwhile waits for
        # it); the range lies inside it (checked here too).
        if offset < 0 or length < 0 or offset + length > self.size:
            raise KvmInvalidArgumentError(f"bytes {offset}+{length} lie outside this "
                                          f"{self._what} of {self.size}")
        buf = ffi.from_buffer("uint8_t[]", self.mm)
        try:
            r = lib.kvmio_populate(buf + offset, length)
        finally:
            ffi.release(buf)
        return -int(r)

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._mm is None

    def close(self) -> None:
        """Unmap (deferred by Python while user views of the memory are alive)."""
        ptr, self._ptr = self._ptr, None
        mm, self._mm = self._mm, None
        if ptr is not None:
            ffi.release(ptr)
        if mm is not None:
            # If a view is still exported, mmap refuses (BufferError) and its finaliser unmaps
            # once the last view is dropped.
            with contextlib.suppress(BufferError):
                mm.close()


def restore_pages(dst: Mapping, store: npt.NDArray[Any], index: npt.NDArray[np.uint64],
                  pages: npt.NDArray[np.uint64], *, zero: bool) -> npt.NDArray[np.uint64]:
    """Copy stored pages back into ``dst`` (a checkpoint's reset): ``pages`` (sorted,
    distinct page indices of ``dst``) get their content from ``store`` (contiguous, 4096
    bytes per page, one per entry of ``index``, the sorted pages it holds), or zeros
    (``zero``) where ``store`` has none; returns the pages it has none for when not ``zero``.
    Raises :class:`KvmInvalidArgumentError` (nothing written) for a page beyond ``dst``,
    ``pages`` not strictly increasing, or a store that does not match its index."""
    if store.nbytes != len(index) * PAGE_SIZE or not store.flags.c_contiguous:
        raise KvmInvalidArgumentError("the page store does not match its index")
    if index.dtype != np.uint64 or pages.dtype != np.uint64:
        raise KvmInvalidArgumentError("page indices must be uint64 arrays")
    index = np.ascontiguousarray(index)
    pages = np.ascontiguousarray(pages)
    missing = np.empty(max(1, len(pages)), dtype=np.uint64)  # zeroed pages pass through it
    # Safety: every pointer comes from from_buffer, which pins its buffer for the call (the
    # guest memory too: a close() of its mapping meanwhile cannot unmap it, see Mapping);
    # the call reads `store` only at positions below len(index) (the merge walk), writes
    # `dst` only at pages below its size (every page checked first, in C, before any write)
    # and `missing` at most len(pages) items.
    d = ffi.from_buffer("uint8_t[]", dst.mm, require_writable=True)
    st = ffi.from_buffer("uint8_t[]", store)
    ix = ffi.from_buffer("uint64_t[]", index)
    pg = ffi.from_buffer("uint64_t[]", pages)
    mi = ffi.from_buffer("uint64_t[]", missing, require_writable=True)
    try:
        n = lib.kvmio_restore_pages(d, dst.size // PAGE_SIZE, st, ix, len(index), pg,
                                    len(pages), int(zero), mi)
    finally:
        for b in (d, st, ix, pg, mi):
            ffi.release(b)
    if n < 0:
        raise KvmInvalidArgumentError("a page to restore lies beyond the memory, or the pages "
                                      "are not sorted and distinct")
    return missing[:n]


class PageRestore:
    """A checkpoint's stored pages bound once for the fused reset (collection and page restore
    in one native call: :meth:`kvmio.Vm.collect_and_restore`).

    ``slots`` lists, per memory slot, ``(raw slot, store, index, zero_below)``: the slot id
    its ring entries carry, its stored pages (contiguous, 4096 bytes each) and their sorted
    page indices, and below how many pages without a stored copy the call zero-fills them
    (0: never; they are then listed in :meth:`missing`).  Guest memory and the host-written
    pages are bound for one call (:meth:`bind` ... :meth:`unbind`); after a call,
    :attr:`done` says whether it restored, and :meth:`counts` and :meth:`missing` what.
    """

    def __init__(self, slots: list[tuple[int, npt.NDArray[Any], npt.NDArray[np.uint64], int]],
                 bitmaps: list[int] | None = None):
        self._n = len(slots)
        self._table = ffi.new("struct kvmio_restore_slot[]", max(1, self._n))
        self._pins: list[CData] = []  # the stores and indices, for the object's lifetime
        self._bound: list[CData] = []  # guest memory and host pages, for one call
        self._done = ffi.new("int32_t *")
        self._fetched = ffi.new("uint32_t *")
        self._failed = ffi.new("uint32_t *")
        self._missing = np.zeros(0, dtype=np.uint64)
        self._missing_ptr: CData = ffi.NULL
        for entry in slots:
            if not (isinstance(entry, tuple) and len(entry) == 4):
                raise KvmInvalidArgumentError("each slot is (raw slot, store, index, zero_below)")
            raw, store, index, zero_below = entry
            if (not isinstance(raw, int) or isinstance(raw, bool) or not 0 <= raw < 1 << 32
                    or not isinstance(zero_below, int) or isinstance(zero_below, bool)
                    or not 0 <= zero_below < 1 << 32):
                raise KvmInvalidArgumentError("a raw slot and zero_below are u32 ints")
            if not isinstance(store, np.ndarray) or not isinstance(index, np.ndarray):
                raise KvmInvalidArgumentError("a store and its index are numpy arrays")
        if len({raw for raw, _, _, _ in slots}) != len(slots):
            raise KvmInvalidArgumentError("a slot is named twice")
        for k, (raw, store, index, zero_below) in enumerate(slots):
            if (index.dtype != np.uint64 or not index.flags.c_contiguous
                    or not store.flags.c_contiguous or store.nbytes != len(index) * PAGE_SIZE):
                raise KvmInvalidArgumentError("the page store does not match its index")
            if len(index) > 1 and not bool(np.all(index[1:] > index[:-1])):
                raise KvmInvalidArgumentError("the page index is not strictly increasing")
            t = self._table[k]
            t.raw_slot = raw
            t.zero_below = zero_below
            t.nindex = len(index)
            # Safety: the pins hold buffer exports of the checkpoint's own arrays (never
            # resized) until close(); the C call reads `store` only at positions below
            # `nindex` (its merge walk), and `index` only below `nindex`.
            if len(index):
                st = ffi.from_buffer("uint8_t[]", store)
                ix = ffi.from_buffer("uint64_t[]", index)
                self._pins += [st, ix]
                t.store, t.index = st, ix
        #: Per slot, its dirty bitmap (bitmap mode; ``None`` for a slot without one).
        self._bitmaps: list[npt.NDArray[np.uint64] | None] = [None] * self._n
        if bitmaps is not None:
            if len(bitmaps) != self._n:
                raise KvmInvalidArgumentError("one bitmap size per slot")
            for k, pages in enumerate(bitmaps):
                if not isinstance(pages, int) or isinstance(pages, bool) or pages < 0:
                    raise KvmInvalidArgumentError("a bitmap size is a number of pages >= 0")
                if pages == 0:
                    continue
                words = np.zeros((pages + 63) // 64, dtype=np.uint64)
                # Safety: pinned until close(); the kernel writes (and the C call reads) at
                # most ceil(bitmap_pages / 64) words, its size.
                bm = ffi.from_buffer("uint64_t[]", words, require_writable=True)
                self._pins.append(bm)
                self._bitmaps[k] = words
                self._table[k].bitmap, self._table[k].bitmap_pages = bm, pages

    @property
    def slots(self) -> int:
        """How many slots the table has."""
        return self._n

    def bind(self, memory: list[Mapping], extra: list[npt.NDArray[np.uint64]],
             capacity: int) -> None:
        """Bind, for one call, each slot's guest memory and host-written pages (sorted,
        distinct page indices: the C call checks them and restores nothing otherwise), with
        room for ``capacity`` pages without a stored copy (the call restores nothing if more
        pages are collected).  Call :meth:`unbind` after the call, always."""
        if len(memory) != self._n or len(extra) != self._n:
            raise KvmInvalidArgumentError("one memory and one page list per slot")
        if not all(isinstance(m, Mapping) for m in memory) or \
                not all(isinstance(e, np.ndarray) for e in extra):
            raise KvmInvalidArgumentError("memory is Mappings, page lists numpy arrays")
        if len(self._missing) < capacity:
            self._missing = np.zeros(max(capacity, 2 * len(self._missing)), dtype=np.uint64)
            self._missing_ptr = ffi.cast("uint64_t *", self._missing.ctypes.data)
        self._done[0] = 0
        try:
            for k in range(self._n):
                t = self._table[k]
                # Safety: from_buffer exports the mapping (a close() meanwhile cannot unmap
                # it) until unbind(); the C call writes it only at pages below dst_pages,
                # every one checked before any write.  The host pages are exported alike and
                # only read (below nextra).
                d = ffi.from_buffer("uint8_t[]", memory[k].mm, require_writable=True)
                self._bound.append(d)
                t.dst, t.dst_pages = d, memory[k].size // PAGE_SIZE
                e = extra[k]
                if e.dtype != np.uint64:
                    raise KvmInvalidArgumentError("page indices must be uint64 arrays")
                if len(e):
                    e = np.ascontiguousarray(e)
                    x = ffi.from_buffer("uint64_t[]", e)
                    self._bound.append(x)
                    t.extra, t.nextra = x, len(e)
                else:
                    t.extra, t.nextra = ffi.NULL, 0
        except BaseException:
            self.unbind()
            raise

    def unbind(self) -> None:
        """Release what :meth:`bind` exported (idempotent)."""
        bound, self._bound = self._bound, []
        for b in bound:
            ffi.release(b)
        for k in range(self._n):
            t = self._table[k]
            t.dst, t.dst_pages, t.extra, t.nextra = ffi.NULL, 0, ffi.NULL, 0

    def args(self) -> tuple[CData, int, CData, int, CData]:
        """The native call's last arguments: table, slots, missing buffer, its capacity,
        the done flag.  Safety: the missing buffer is this object's own array (kept until it
        is replaced by a larger one in bind(), never during a call); the C call writes at
        most its length."""
        return self._table, self._n, self._missing_ptr, len(self._missing), self._done

    @property
    def done(self) -> bool:
        """Whether the last call restored the pages (else it wrote nothing)."""
        return bool(self._done[0])

    def bitmap_slots(self) -> list[tuple[int, int, int]]:
        """``(table entry, raw slot, pages)`` of every slot with a dirty bitmap, in table
        order."""
        return [(k, int(self._table[k].raw_slot), int(self._table[k].bitmap_pages))
                for k in range(self._n) if self._bitmaps[k] is not None]

    def collect_bitmaps(self, fd: int, manual: bool) -> tuple[int, int, str]:
        """Bitmap mode, bound: KVM_GET_DIRTY_LOG (and KVM_CLEAR_DIRTY_LOG under ``manual``
        protect) of every slot with a bitmap, on the VM's ``fd`` (open for the call), then the
        restore as for the rings, all or nothing (:attr:`done`).  Returns ``(fetched, errno,
        ioctl)``: the table entries whose bitmaps were taken (their bits: :meth:`bitmap`;
        cleared in the kernel; also :attr:`fetched`, set even if this raises on the way out),
        the errno of the call that failed (0: none did) and its name.

        Precondition, the caller's: each bitmap's size in pages is its slot's in the kernel
        (the kernel writes ceil(pages / 64) words, which is what the bitmap holds)."""
        # Safety: everything the table points to is pinned (stores, bitmaps until close(),
        # memory and host pages until unbind()); the kernel writes each bitmap within its
        # size (the precondition above).
        r = lib.kvmio_bitmaps_collect_restore(fd, lib.KVM_GET_DIRTY_LOG, lib.KVM_CLEAR_DIRTY_LOG,
                                              int(manual), self._table, self._n,
                                              self._missing_ptr, len(self._missing),
                                              self._fetched, self._failed, self._done)
        name = {1: "KVM_GET_DIRTY_LOG", 2: "KVM_CLEAR_DIRTY_LOG"}.get(int(self._failed[0]), "")
        return int(self._fetched[0]), -int(r), name

    @property
    def fetched(self) -> int:
        """The table entries whose bitmaps the last :meth:`collect_bitmaps` took."""
        return int(self._fetched[0])

    def bitmap(self, k: int) -> npt.NDArray[np.uint64]:
        """A copy of slot ``k``'s bitmap as the last call took it (bit 0: page 0)."""
        words = self._bitmaps[k]
        if words is None:
            raise KvmInvalidArgumentError(f"slot entry {k} has no bitmap")
        return words.copy()

    def counts(self, k: int) -> tuple[int, int, int]:
        """``(restored, logged, missing)`` of slot ``k`` in the last call that restored:
        distinct pages restored (logged and host-written), distinct pages the rings named,
        and how many of the restored are in :meth:`missing`."""
        t = self._table[k]
        return int(t.restored), int(t.logged), int(t.nmissing)

    def missing(self, k: int) -> npt.NDArray[np.uint64]:
        """The pages of slot ``k`` the last call neither copied nor zero-filled (none stored;
        sorted, distinct; a copy)."""
        t = self._table[k]
        at, n = int(t.missing_at), int(t.nmissing)
        return self._missing[at:at + n].copy()

    def close(self) -> None:
        """Release the pins of the stores (idempotent); the table is unusable afterwards."""
        self.unbind()
        pins, self._pins = self._pins, []
        for p in pins:
            ffi.release(p)
        for k in range(self._n):
            t = self._table[k]
            t.store, t.index, t.nindex = ffi.NULL, ffi.NULL, 0
            t.bitmap, t.bitmap_pages = ffi.NULL, 0
        self._bitmaps = [None] * self._n


def new(ctype: str, init: Any = None) -> CData:
    """Allocate a zeroed C object (owned by the returned cdata)."""
    return ffi.new(ctype, init)


def struct_to_dict(obj: CData, fields: tuple[str, ...]) -> dict[str, int]:
    """Copy integer fields of a C struct into a dict."""
    return {f: int(getattr(obj, f)) for f in fields}


def to_bytes(obj: CData, ctype: str) -> bytes:
    """The raw bytes of a C struct."""
    return bytes(ffi.buffer(obj, ffi.sizeof(ctype)))


def from_bytes(ctype: str, data: bytes) -> CData:
    """A new C struct initialised from raw bytes (which must be exactly its size)."""
    size = ffi.sizeof(ctype)
    if len(data) != size:
        from kvmio.errors import KvmInvalidArgumentError

        raise KvmInvalidArgumentError(f"{ctype} needs exactly {size} bytes, got {len(data)}")
    obj = ffi.new(ctype + " *")
    ffi.memmove(obj, data, size)
    return obj


def struct_format(ctype: str, fields: tuple[str, ...]) -> struct.Struct:
    """A :class:`struct.Struct` (native byte order) that reads the unsigned integer ``fields``
    of ``ctype``, in that order, at the offsets and sizes the C compiler gave them, skipping
    padding and the other fields: for decoding arrays of small structs in bulk."""
    by_name = dict(ffi.typeof(ctype).fields or [])
    spec = sorted((by_name[f].offset, ffi.sizeof(by_name[f].type), f) for f in fields)
    if [f for _, _, f in spec] != list(fields):
        raise ValueError(f"{fields} are not in their order in {ctype}")
    fmt, pos = "=", 0
    for offset, size, _ in spec:
        fmt += "x" * (offset - pos) + {1: "B", 2: "H", 4: "I", 8: "Q"}[size]
        pos = offset + size
    return struct.Struct(fmt + "x" * (ffi.sizeof(ctype) - pos))


def get_dirty_log(fd: int, slot: int, words: Any) -> None:
    """KVM_GET_DIRTY_LOG into ``words`` (a C-contiguous numpy uint64 array, one bit per page).

    Safety: ``ffi.from_buffer`` pins ``words`` for the duration of the call, and the caller sized
    it for the whole slot (ceil(pages / 64) words), which is all the kernel writes.
    """
    buf = ffi.from_buffer("uint64_t[]", words, require_writable=True)
    dl = ffi.new("struct kvm_dirty_log *")
    dl.slot = slot
    dl.dirty_bitmap = buf
    try:
        ioctl(fd, lib.KVM_GET_DIRTY_LOG, dl, name="KVM_GET_DIRTY_LOG")
    except KvmError as e:
        if e.errno == _errno.ENXIO:
            from kvmio.errors import KvmStateError

            raise KvmStateError("KVM_GET_DIRTY_LOG is refused on a ring VM without the backup "
                                "bitmap", errno=e.errno, ioctl="KVM_GET_DIRTY_LOG") from e
        raise
    finally:
        ffi.release(buf)


def clear_dirty_log(fd: int, slot: int, first_page: int, num_pages: int, words: Any) -> None:
    """KVM_CLEAR_DIRTY_LOG with ``words`` (numpy uint64, bit 0 = ``first_page``).

    Safety: ``words`` holds ceil(num_pages / 64) words, the most the kernel reads; it is pinned
    by ``ffi.from_buffer`` during the call.
    """
    buf = ffi.from_buffer("uint64_t[]", words)
    cl = ffi.new("struct kvm_clear_dirty_log *")
    cl.slot = slot
    cl.first_page = first_page
    cl.num_pages = num_pages
    cl.dirty_bitmap = buf
    try:
        ioctl(fd, lib.KVM_CLEAR_DIRTY_LOG, cl, name="KVM_CLEAR_DIRTY_LOG")
    finally:
        ffi.release(buf)


# PAGEMAP_SCAN (Linux 6.7, <linux/fs.h>): the regions of a range of this process's memory
# whose pages are in chosen categories, without one pagemap entry per page.  The UAPI headers
# this module may be built against (Debian 12's 6.1) lack it, so its two structs and its number
# are spelled out here.  Both structs are arrays of __u64 only (no padding, the same on every
# architecture), and the kernel refuses the call (EINVAL) unless the first field is the size it
# expects, so a wrong layout is refused, never misread.
#   struct pm_scan_arg { __u64 size, flags, start, end, walk_end, vec, vec_len, max_pages,
#                        category_inverted, category_mask, category_anyof_mask, return_mask; };
#   struct page_region { __u64 start, end, categories; };
_PM_SCAN_ARG_WORDS = 12
_PAGE_REGION_WORDS = 3
#: _IOWR('f', 16, struct pm_scan_arg) in the generic ioctl encoding (x86 and arm64 use it).
_PAGEMAP_SCAN = (3 << 30) | ((_PM_SCAN_ARG_WORDS * 8) << 16) | (ord("f") << 8) | 16
#: Page categories of PAGEMAP_SCAN.
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
#: Whether this architecture encodes ioctl numbers as above (else the scan is not attempted).
HAS_PAGEMAP_SCAN = ARCH in ("x86_64", "amd64", "aarch64", "arm64")


def pagemap_scan(fd: int, start: int, end: int, regions: Any, *, inverted: int, mask: int,
                 anyof: int) -> tuple[int, int]:
    """One PAGEMAP_SCAN on ``fd`` (an open ``/proc/self/pagemap``) over the host addresses
    ``[start, end)``: the regions whose pages, with the ``inverted`` categories inverted, have
    every category of ``mask`` and one of ``anyof``.  Writes up to ``len(regions)`` regions into
    ``regions`` (a C-contiguous numpy uint64 array, three words per region: start, end,
    categories) and returns ``(regions written, address where the walk stopped)``; the walk
    stops early when ``regions`` is full.  Raises :class:`KvmError` with the kernel's errno
    (ENOTTY before Linux 6.7, EINVAL for a category it does not know).

    Safety: ``regions`` is pinned by ``ffi.from_buffer`` during the call and the argument block
    is an owned allocation; the kernel writes at most ``vec_len`` (the regions that fit in
    ``regions``) into the first and only ``walk_end`` into the second.
    """
    vec = ffi.from_buffer("uint64_t[]", regions, require_writable=True)
    try:
        n = len(vec) // _PAGE_REGION_WORDS
        arg = ffi.new(f"uint64_t[{_PM_SCAN_ARG_WORDS}]",
                      [_PM_SCAN_ARG_WORDS * 8, 0, start, end, 0, int(ffi.cast("uintptr_t", vec)),
                       n, 0, inverted, mask, anyof, 0])
        got = ioctl(fd, _PAGEMAP_SCAN, arg, name="PAGEMAP_SCAN")
    finally:
        ffi.release(vec)
    return got, int(arg[4])


class KvmRun:
    """A vCPU's shared ``struct kvm_run`` page; every access to it goes through this class.

    Safety: the pointer is into an owned :class:`Mapping` (or, for :meth:`in_memory`, an owned
    cffi allocation); every method checks that it is still open, and the vCPU serialises
    ``close()`` with ``run()``, decoding and answers under its run lock, so no access can follow
    the unmap.  Offsets reported by the kernel are bounds-checked against the mapping's size.
    """

    def __init__(self, mapping: Mapping | None, *, _buf: CData = None, _size: int = 0):
        self._map = mapping
        self._keep = _buf
        if mapping is not None:
            self.size = mapping.size
            self._base: CData = mapping.ptr
        else:
            self.size = _size
            self._base = _buf
        self._run: CData | None = ffi.cast("struct kvm_run *", self._base)

    @classmethod
    def in_memory(cls) -> KvmRun:
        """A zeroed kvm_run in ordinary memory (to test decoding of exits a host cannot
        produce)."""
        size = ffi.sizeof("struct kvm_run")
        return cls(None, _buf=ffi.new("char[]", size), _size=size)

    @property
    def raw(self) -> CData:
        """The ``struct kvm_run *`` (for a bounded run, whose kick handler sets its
        ``immediate_exit``, and for tests that fill in a fake exit)."""
        return self._r()

    def _r(self) -> CData:
        if self._run is None:
            raise KvmClosedError("this vCPU's kvm_run is unmapped (the vCPU is closed)")
        return self._run

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._run is None

    def close(self) -> None:
        """Forget the pointer, then unmap."""
        self._run = None
        if self._map is not None:
            self._map.close()

    @property
    def immediate_exit(self) -> bool:
        """``kvm_run.immediate_exit``."""
        return bool(self._r().immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self._r().immediate_exit = 1 if value else 0

    def read(self, offset: int, n: int) -> bytes:
        """Bytes at ``offset`` of the kvm_run area (bounds-checked)."""
        self._r()
        if offset < 0 or n < 0 or offset + n > self.size:
            raise KvmError(f"kernel reported data outside kvm_run ({offset}+{n})")
        return bytes(ffi.buffer(self._base + offset, n))

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of the kvm_run area (bounds-checked)."""
        self._r()
        if offset < 0 or offset + len(data) > self.size:
            raise KvmError(f"write outside kvm_run ({offset}+{len(data)})")
        ffi.memmove(self._base + offset, data, len(data))

    def decode(self) -> tuple[int, dict[str, Any]]:
        """``(exit_reason, fields)`` of the current exit, copied into Python values."""
        run = self._r()
        reason = int(run.exit_reason)
        f: dict[str, Any] = {}
        if reason == lib.KVM_EXIT_IO:
            io = lib.kvmio_run_io(run)
            f = {"out": int(io.direction) == lib.KVM_EXIT_IO_OUT, "size": int(io.size),
                 "port": int(io.port), "count": int(io.count), "offset": int(io.data_offset)}
            if f["out"]:
                f["data"] = self.read(f["offset"], f["size"] * f["count"])
            elif f["offset"] + f["size"] * f["count"] > self.size:
                raise KvmError("kernel reported I/O data outside kvm_run "
                               f"({f['offset']}+{f['size'] * f['count']})")
        elif reason == lib.KVM_EXIT_MMIO:
            m = lib.kvmio_run_mmio(run)
            length = min(int(m.len), 8)
            f = {"address": int(m.phys_addr), "length": length, "write": bool(m.is_write),
                 "data": bytes(m.data[0:length])}
        elif reason == lib.KVM_EXIT_FAIL_ENTRY:
            fe = lib.kvmio_run_fail_entry(run)
            f = {"reason": int(fe.hardware_entry_failure_reason), "cpu": int(fe.cpu)}
        elif reason == lib.KVM_EXIT_INTERNAL_ERROR:
            ie = lib.kvmio_run_internal(run)
            f = {"suberror": int(ie.suberror),
                 "data": tuple(int(ie.data[i]) for i in range(min(int(ie.ndata), 16)))}
        elif reason == lib.KVM_EXIT_SYSTEM_EVENT:
            se = lib.kvmio_run_system_event(run)
            f = {"type": int(se.type),
                 "data": tuple(int(se.data[i]) for i in range(min(int(se.ndata), 16)))}
        else:
            f = {"hardware_exit_reason": int(lib.kvmio_run_hw(run).hardware_exit_reason)}
        return reason, f

    def write_mmio_data(self, data: bytes) -> None:
        """Fill ``kvm_run.mmio.data`` (the value an MMIO read returns to the guest)."""
        if len(data) > 8:
            raise KvmError("MMIO data is at most 8 bytes")
        ffi.memmove(lib.kvmio_run_mmio(self._r()).data, data, len(data))
