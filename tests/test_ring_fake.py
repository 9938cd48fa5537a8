"""Dirty-ring paths this x86 machine cannot exercise, through a FAKE ioctl layer.

KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP exists only on arm64 (x86 reports 0), and x86 offers both ring
capabilities where arm64 offers only ACQ_REL.  These tests wrap the real ioctl: capability
answers, the WITH_BITMAP enable and the backup bitmap's KVM_GET_DIRTY_LOG are faked, while the
ring itself stays the real kernel's.  Every test here is marked ``fake``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from kvmio import (
    Cap,
    DirtyRingError,
    Kvm,
    KvmError,
    KvmStateError,
    KvmUnsupportedError,
    _abi,
)
from kvmio._abi import lib
from kvmio.guests.workload import MEM_SLOT, Workload

pytestmark = pytest.mark.fake


class FakeKernel:
    """Wraps the real ioctl; answers some capability checks and the WITH_BITMAP calls."""

    def __init__(self, *, with_bitmap: int = 1, acq_rel: int | None = None,
                 legacy: int | None = None, bitmap_enable_errno: int | None = None):
        self.with_bitmap = with_bitmap
        self.acq_rel = acq_rel
        self.legacy = legacy
        self.bitmap_enable_errno = bitmap_enable_errno
        self.ring_enable_errno: int | None = None
        self.enabled: list[int] = []
        self.backup_pages: dict[int, list[int]] = {}
        self.get_dirty_log_calls = 0
        self.real_ioctl = _abi.ioctl
        self.real_get_dirty_log = _abi.get_dirty_log

    def ioctl(self, fd: int, request: int, arg: Any = 0, *, name: str) -> int:
        if request == lib.KVM_CHECK_EXTENSION:
            answers = {int(Cap.DIRTY_LOG_RING_WITH_BITMAP): self.with_bitmap,
                       int(Cap.DIRTY_LOG_RING_ACQ_REL): self.acq_rel,
                       int(Cap.DIRTY_LOG_RING): self.legacy}
            if answers.get(int(arg)) is not None:
                return int(answers[int(arg)])  # type: ignore[arg-type]
        if request == lib.KVM_ENABLE_CAP:
            cap = int(arg.cap)
            if cap in (Cap.DIRTY_LOG_RING_ACQ_REL, Cap.DIRTY_LOG_RING) and \
                    self.ring_enable_errno is not None:
                raise KvmError("refused", errno=self.ring_enable_errno, ioctl=name)
            if cap == Cap.DIRTY_LOG_RING_WITH_BITMAP:
                if self.bitmap_enable_errno is not None:
                    raise KvmError("refused", errno=self.bitmap_enable_errno, ioctl=name)
                self.enabled.append(cap)
                return 0
            r = self.real_ioctl(fd, request, arg, name=name)
            self.enabled.append(cap)
            return r
        return self.real_ioctl(fd, request, arg, name=name)

    def get_dirty_log(self, fd: int, slot: int, words: np.ndarray) -> None:
        """The backup bitmap: pages dirtied outside vCPU context, then cleared."""
        self.get_dirty_log_calls += 1
        for p in self.backup_pages.pop(slot, []):
            words[p // 64] |= np.uint64(1) << np.uint64(p % 64)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKernel]:
    fk = FakeKernel()
    monkeypatch.setattr(_abi, "ioctl", fk.ioctl)  # the one patch point every object uses
    monkeypatch.setattr(_abi, "get_dirty_log", fk.get_dirty_log)
    yield fk


def test_bitmap_enabled_after_the_ring(kvm: Kvm, fake: FakeKernel) -> None:
    with kvm.create_vm() as vm:
        cfg = vm.enable_dirty_ring(4096)
        assert cfg.with_bitmap and cfg.acq_rel and cfg.cap == Cap.DIRTY_LOG_RING_ACQ_REL
        assert fake.enabled == [Cap.DIRTY_LOG_RING_ACQ_REL, Cap.DIRTY_LOG_RING_WITH_BITMAP]


def test_bitmap_needs_no_memslot_yet(kvm: Kvm, fake: FakeKernel) -> None:
    with kvm.create_vm() as vm:
        vm.add_memory_region(0, 1 << 20)
        with pytest.raises(KvmStateError, match="before any memory slot"):
            vm.enable_dirty_ring(4096)
        # Checked before anything was enabled: the real kernel still takes a ring.
        assert vm.dirty_ring is None and fake.enabled == []
        cfg = vm.enable_dirty_ring(4096, with_bitmap=False)
        assert not cfg.with_bitmap and fake.enabled == [Cap.DIRTY_LOG_RING_ACQ_REL]


def test_bitmap_refused_after_ring_keeps_views_consistent(kvm: Kvm, fake: FakeKernel) -> None:
    fake.bitmap_enable_errno = 22
    with kvm.create_vm() as vm:
        with pytest.raises(DirtyRingError, match="ring is enabled, but") as ei:
            vm.enable_dirty_ring(1024)
        assert ei.value.errno == 22
        # kvmio reports what the kernel has: a ring without the backup bitmap...
        cfg = vm.dirty_ring
        assert cfg is not None and cfg.entries == 1024 and not cfg.with_bitmap
        # ...and vCPUs get their rings mapped.
        v = vm.create_vcpu()
        assert v.dirty_ring.size == 1024
        with pytest.raises(KvmStateError, match="already enabled"):
            vm.enable_dirty_ring(1024)


def test_bitmap_required_but_not_offered(kvm: Kvm, fake: FakeKernel) -> None:
    fake.with_bitmap = 0
    with kvm.create_vm() as vm:
        with pytest.raises(KvmUnsupportedError, match="WITH_BITMAP"):
            vm.enable_dirty_ring(4096, with_bitmap=True)
        assert vm.dirty_ring is None and fake.enabled == []


def test_legacy_only_kernel(kvm: Kvm, fake: FakeKernel) -> None:
    fake.acq_rel = 0
    with kvm.create_vm() as vm, pytest.raises(KvmUnsupportedError,
                                              match="needs KVM_CAP_DIRTY_LOG_RING_ACQ_REL"):
        vm.enable_dirty_ring(4096, with_bitmap=True)
    fake.with_bitmap = 0
    with kvm.create_vm() as vm:
        cfg = vm.enable_dirty_ring(4096)
        assert cfg.cap == Cap.DIRTY_LOG_RING and not cfg.acq_rel


def test_acq_rel_only_kernel_like_arm64(kvm: Kvm, fake: FakeKernel) -> None:
    fake.legacy = 0
    assert kvm.max_dirty_ring_bytes() == 1 << 20
    with kvm.create_vm() as vm:
        assert vm.max_dirty_ring_entries() == 65536
        assert vm.enable_dirty_ring(65536).cap == Cap.DIRTY_LOG_RING_ACQ_REL
    fake.acq_rel = 0
    assert kvm.max_dirty_ring_bytes() == 0
    with kvm.create_vm() as vm, pytest.raises(KvmUnsupportedError, match="no dirty ring"):
        vm.enable_dirty_ring()


def test_final_collection_reads_the_backup_bitmap_last(kvm: Kvm, fake: FakeKernel) -> None:
    with Workload(kvm, mem_size=16 << 20, ring_entries=4096, max_writes=300,
                  value="count") as w:
        assert w.vm.dirty_ring is not None and w.vm.dirty_ring.with_bitmap
        w.run_vcpu(0)
        fake.backup_pages[MEM_SLOT] = [5, 4000]  # e.g. written by an in-kernel device
        partial = w.vm.collect_dirty_pages()
        assert fake.get_dirty_log_calls == 0  # not final: the bitmap is left alone
        written = np.flatnonzero(w.mem.page_words())
        assert np.array_equal(partial.pages[MEM_SLOT], written)
        final = w.vm.collect_dirty_pages(final=True)
        assert fake.get_dirty_log_calls == 1
        assert final.pages[MEM_SLOT].tolist() == [5, 4000]
        # GET_DIRTY_LOG is allowed on a ring VM with the backup bitmap.
        assert len(w.vm.get_dirty_log(MEM_SLOT)) == 0


def test_ring_refused_by_the_kernel_leaves_no_ring(kvm: Kvm, fake: FakeKernel) -> None:
    """The kernel refuses the ring itself (e.g. ENOMEM): kvmio reports no ring, maps none, and
    tries nothing after it (no backup bitmap)."""
    fake.ring_enable_errno = 12
    with kvm.create_vm() as vm:
        with pytest.raises(DirtyRingError, match="refused a ring of 4096") as ei:
            vm.enable_dirty_ring(4096)
        assert ei.value.errno == 12
        assert vm.dirty_ring is None and fake.enabled == []
        v = vm.create_vcpu()
        assert v._ring is None
        with pytest.raises(KvmStateError, match="no dirty ring"):
            _ = v.dirty_ring
