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
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kvmio._abi import PAGE_SIZE, Mapping, lib
from kvmio._check import buffer_bytes, integer
from kvmio.errors import KvmClosedError, KvmError, KvmInvalidArgumentError


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


class Memory:
    """A host mapping that can back a memory slot (see the module docs); ``close()`` unmaps."""

    kind = "memory"

    def __init__(self, mapping: Mapping, size: int):
        self.mapping = mapping
        self.size = size

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.size:#x} bytes{' closed' if self.closed else ''}>"

    @property
    def closed(self) -> bool:
        """Whether the memory was unmapped."""
        return self.mapping.closed

    def close(self) -> None:
        """Unmap (deferred by Python while views of the memory are alive)."""
        self.mapping.close()


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


class MemoryRegion:
    """One KVM memory slot backed by a :class:`Memory` backend that this object owns.

    Created by :meth:`kvmio.Vm.add_memory_region`.  ``read``/``write`` take guest physical
    addresses; :meth:`array` returns a numpy view of the whole slot.  Views must be dropped before
    the VM closes for the memory to be unmapped at once (otherwise it is unmapped when they go).
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
        at guest physical address ``gpa`` (not dirty-logged: host writes are not guest
        writes)."""
        mv = buffer_bytes("data", data)
        off = self._offset(gpa, len(mv))
        self._mapping.mm[off:off + len(mv)] = mv

    def array(self, dtype: npt.DTypeLike = np.uint8) -> npt.NDArray[np.generic]:
        """A writable numpy view of the whole slot (no copy)."""
        return np.frombuffer(self._mapping.mm, dtype=dtype)

    def page_words(self) -> npt.NDArray[np.uint64]:
        """A view of the first 8 bytes of every page, as little-endian uint64 (no copy)."""
        a: npt.NDArray[np.uint64] = np.frombuffer(self._mapping.mm, dtype="<u8")
        return a.reshape(-1, PAGE_SIZE // 8)[:, 0]

    def page_gpa(self, page_index: int) -> int:
        """Guest physical address of page ``page_index`` of the slot."""
        page_index = integer("page_index", page_index, hi=self.num_pages)
        return self.guest_phys_addr + page_index * PAGE_SIZE

    def close(self) -> None:
        """Unmap the memory (done by the VM when the slot is deleted or the VM closes)."""
        self.memory.close()
