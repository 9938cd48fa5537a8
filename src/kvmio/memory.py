"""Guest memory: anonymous host mappings registered as KVM memory slots."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kvmio._abi import PAGE_SIZE, Mapping, lib
from kvmio._check import buffer_bytes, integer
from kvmio.errors import KvmInvalidArgumentError


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


class MemoryRegion:
    """One KVM memory slot backed by an anonymous host mapping that this object owns.

    Created by :meth:`kvmio.Vm.add_memory_region`.  ``read``/``write`` take guest physical
    addresses; :meth:`array` returns a numpy view of the whole slot.  Views must be dropped before
    the VM closes for the memory to be unmapped at once (otherwise it is unmapped when they go).
    """

    def __init__(self, slot: int, guest_phys_addr: int, size: int, flags: int,
                 mapping: Mapping):
        self.slot = slot
        self.guest_phys_addr = guest_phys_addr
        self.size = size
        self.flags = flags
        self._mapping = mapping

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
        self._mapping.close()
