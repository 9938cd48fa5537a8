"""Dirty-ring paths this x86 machine cannot exercise, through a FAKE ioctl layer.

KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP exists only on arm64 (x86 reports 0), and x86 offers both ring
capabilities where arm64 offers only ACQ_REL.  These tests wrap the real ioctl: capability
answers, the WITH_BITMAP enable and the backup bitmap's KVM_GET_DIRTY_LOG are faked, while the
ring itself stays the real kernel's.  Every test here is marked ``fake``.

The fake also records what a kernel would see, in order (:attr:`FakeKernel.calls`): every ioctl,
with the role of its fd (``system``, ``vm``, ``vcpu<id>``), and every harvest of a vCPU's ring.
A harvest is memory writes, not an ioctl, so the fake maps each vCPU's ring itself (read-only,
as a second view of the kernel's pages) and looks at it before and after every ioctl: entries
that turned RESET since its last look were harvested in between (only user space writes RESET;
the kernel writes DIRTY when it publishes and 0 when KVM_RESET_DIRTY_RINGS recycles).  Each call
also notes how many entries were dirty and how many harvested-but-not-recycled at that moment.
"""

from __future__ import annotations

import errno
import mmap
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
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
from kvmio._abi import PAGE_SIZE, lib
from kvmio.dirty.ring import GFN_DTYPE
from kvmio.errors import from_errno
from kvmio.guests.workload import LOW_SLOT, MEM_SLOT, Workload
from kvmio.tracker import DirtyTracker

pytestmark = pytest.mark.fake

DIRTY = int(lib.KVM_DIRTY_GFN_F_DIRTY)
RESET = int(lib.KVM_DIRTY_GFN_F_RESET)
#: What :attr:`FakeKernel.calls` records for a ring harvest (it is no ioctl).
HARVEST = "ring harvested"
RING_CAPS = (int(Cap.DIRTY_LOG_RING_ACQ_REL), int(Cap.DIRTY_LOG_RING))


@dataclass(frozen=True)
class Call:
    """One thing the fake kernel saw: an ioctl on a ``vm``/``vcpu<id>``/``system`` fd, or a
    harvest of a vCPU's ring (``what == HARVEST``, ``detail`` = entries harvested)."""

    role: str
    what: str
    #: The slot of a KVM_GET_DIRTY_LOG, the entries of a harvest.
    detail: int | None = None
    #: Ring entries over all vCPUs, when the call was made: published and not harvested...
    dirty: int = 0
    #: ...and harvested (RESET) but not yet recycled by KVM_RESET_DIRTY_RINGS.
    harvested: int = 0

    def __repr__(self) -> str:
        d = "" if self.detail is None else f"({self.detail})"
        return f"{self.role}:{self.what}{d}[dirty={self.dirty},harvested={self.harvested}]"


class FakeKernel:
    """Wraps the real ioctl; answers some capability checks and the WITH_BITMAP calls, and
    records every ioctl and ring harvest in :attr:`calls`."""

    def __init__(self, *, with_bitmap: int = 1, acq_rel: int | None = None,
                 legacy: int | None = None, bitmap_enable_errno: int | None = None):
        self.with_bitmap = with_bitmap
        self.acq_rel = acq_rel
        self.legacy = legacy
        self.bitmap_enable_errno = bitmap_enable_errno
        self.ring_enable_errno: int | None = None
        self.enabled: list[int] = []
        self.backup_pages: dict[int, list[int]] = {}
        #: Slot -> errno that the next KVM_GET_DIRTY_LOG of that slot fails with.
        self.get_dirty_log_errno: dict[int, int] = {}
        self.calls: list[Call] = []
        self.roles: dict[int, str] = {}
        self.ring_bytes: dict[int, int] = {}  # VM fd -> ring size enabled on it
        self.rings: dict[str, mmap.mmap] = {}  # vCPU role -> the fake's view of its ring
        self.seen: dict[str, npt.NDArray[np.uint32]] = {}  # ... and its flags at the last look
        self.real_ioctl = _abi.ioctl
        self.real_ioctl_eintr = _abi.ioctl_eintr

    # -- what the kernel sees -------------------------------------------------------------

    def _flags(self, role: str) -> npt.NDArray[np.uint32]:
        return np.frombuffer(self.rings[role], dtype=GFN_DTYPE)["flags"].copy()

    def look(self) -> None:
        """Record the harvest of every ring whose entries turned RESET since the last look."""
        for role in self.rings:
            now = self._flags(role)
            new = int(np.count_nonzero((now & RESET) & ~(self.seen[role] & RESET)))
            self.seen[role] = now
            if new:
                self._record(role, HARVEST, new)

    def _record(self, role: str, what: str, detail: int | None = None) -> None:
        dirty = harvested = 0
        for r in self.rings:
            flags = self.seen[r]
            dirty += int(np.count_nonzero(flags == DIRTY))
            harvested += int(np.count_nonzero(flags & RESET))
        self.calls.append(Call(role, what, detail, dirty, harvested))

    def _call(self, fd: int, name: str, detail: int | None = None) -> None:
        self.look()
        self._record(self.roles.get(fd, f"fd {fd}"), name, detail)

    def _map_ring(self, vm_fd: int, vcpu_fd: int, vcpu_id: int) -> None:
        role = f"vcpu{vcpu_id}"
        self.roles[vcpu_fd] = role
        nbytes = self.ring_bytes.get(vm_fd)
        if nbytes is None:
            return
        offset = int(lib.KVM_DIRTY_LOG_PAGE_OFFSET) * PAGE_SIZE
        self.rings[role] = mmap.mmap(vcpu_fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ,
                                     offset=offset)
        self.seen[role] = self._flags(role)

    def close(self) -> None:
        for m in self.rings.values():
            m.close()
        self.rings.clear()

    def since(self, mark: int) -> list[Call]:
        """What the kernel saw after ``mark`` (a ``len(calls)``), up to now."""
        self.look()
        return self.calls[mark:]

    # -- the patched entry points ---------------------------------------------------------

    def ioctl(self, fd: int, request: int, arg: Any = 0, *, name: str) -> int:
        self._call(fd, name)
        try:
            return self._ioctl(fd, request, arg, name=name)
        finally:
            self.look()

    def _ioctl(self, fd: int, request: int, arg: Any, *, name: str) -> int:
        if request == lib.KVM_CHECK_EXTENSION:
            answers = {int(Cap.DIRTY_LOG_RING_WITH_BITMAP): self.with_bitmap,
                       int(Cap.DIRTY_LOG_RING_ACQ_REL): self.acq_rel,
                       int(Cap.DIRTY_LOG_RING): self.legacy}
            if answers.get(int(arg)) is not None:
                return int(answers[int(arg)])  # type: ignore[arg-type]
        if request == lib.KVM_ENABLE_CAP:
            cap = int(arg.cap)
            if cap in RING_CAPS and self.ring_enable_errno is not None:
                raise KvmError("refused", errno=self.ring_enable_errno, ioctl=name)
            if cap == Cap.DIRTY_LOG_RING_WITH_BITMAP:
                if self.bitmap_enable_errno is not None:
                    raise KvmError("refused", errno=self.bitmap_enable_errno, ioctl=name)
                self.enabled.append(cap)
                return 0
            r = self.real_ioctl(fd, request, arg, name=name)
            self.enabled.append(cap)
            if cap in RING_CAPS:
                self.ring_bytes[fd] = int(arg.args[0])
            return r
        r = self.real_ioctl(fd, request, arg, name=name)
        if request == lib.KVM_CREATE_VM:
            self.roles[fd], self.roles[r] = "system", "vm"
        elif request == lib.KVM_CREATE_VCPU:
            self._map_ring(fd, r, int(arg))
        return r

    def ioctl_eintr(self, fd: int, request: int, *, name: str) -> int | None:
        self._call(fd, name)
        try:
            return self.real_ioctl_eintr(fd, request, name=name)
        finally:
            self.look()

    def get_dirty_log(self, fd: int, slot: int, words: np.ndarray) -> None:
        """The backup bitmap: pages dirtied outside vCPU context, then cleared."""
        self._call(fd, "KVM_GET_DIRTY_LOG", slot)
        err = self.get_dirty_log_errno.pop(slot, None)
        if err is not None:
            raise from_errno(err, "KVM_GET_DIRTY_LOG")
        for p in self.backup_pages.pop(slot, []):
            words[p // 64] |= np.uint64(1) << np.uint64(p % 64)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKernel]:
    fk = FakeKernel()
    monkeypatch.setattr(_abi, "ioctl", fk.ioctl)  # the one patch point every object uses
    monkeypatch.setattr(_abi, "ioctl_eintr", fk.ioctl_eintr)  # KVM_RUN
    monkeypatch.setattr(_abi, "get_dirty_log", fk.get_dirty_log)
    try:
        yield fk
    finally:
        fk.close()


def _exactly(ei: pytest.ExceptionInfo[KvmError], kind: type[KvmError], *,
             errno: int | None) -> None:
    """The error is ``kind`` itself (not a subclass, e.g. not an overrun for a DirtyRingError)
    and carries ``errno``: the kernel's, or ``None`` for a rule kvmio checks before asking."""
    assert type(ei.value) is kind, f"{type(ei.value).__name__}, not {kind.__name__}: {ei.value}"
    assert ei.value.errno == errno, ei.value


def test_bitmap_enabled_after_the_ring(kvm: Kvm, fake: FakeKernel) -> None:
    with kvm.create_vm() as vm:
        cfg = vm.enable_dirty_ring(4096)
        assert cfg.with_bitmap and cfg.acq_rel and cfg.cap == Cap.DIRTY_LOG_RING_ACQ_REL
        assert fake.enabled == [Cap.DIRTY_LOG_RING_ACQ_REL, Cap.DIRTY_LOG_RING_WITH_BITMAP]


def test_bitmap_needs_no_memslot_yet(kvm: Kvm, fake: FakeKernel) -> None:
    with kvm.create_vm() as vm:
        vm.add_memory_region(0, 1 << 20)
        with pytest.raises(KvmStateError, match="backup bitmap must be enabled before any "
                                                "memory slot exists") as ei:
            vm.enable_dirty_ring(4096)
        _exactly(ei, KvmStateError, errno=None)
        # Checked before anything was enabled: the real kernel still takes a ring.
        assert vm.dirty_ring is None and fake.enabled == []
        cfg = vm.enable_dirty_ring(4096, with_bitmap=False)
        assert not cfg.with_bitmap and fake.enabled == [Cap.DIRTY_LOG_RING_ACQ_REL]


def test_bitmap_refused_after_ring_keeps_views_consistent(kvm: Kvm, fake: FakeKernel) -> None:
    fake.bitmap_enable_errno = errno.EINVAL
    with kvm.create_vm() as vm:
        with pytest.raises(DirtyRingError, match="the dirty ring is enabled, but the kernel "
                                                 "refused its backup bitmap") as ei:
            vm.enable_dirty_ring(1024)
        _exactly(ei, DirtyRingError, errno=errno.EINVAL)
        assert ei.value.ioctl == "KVM_ENABLE_CAP"
        # kvmio reports what the kernel has: a ring without the backup bitmap...
        cfg = vm.dirty_ring
        assert cfg is not None and cfg.entries == 1024 and not cfg.with_bitmap
        # ...and vCPUs get their rings mapped.
        v = vm.create_vcpu()
        assert v.dirty_ring.size == 1024
        with pytest.raises(KvmStateError,
                           match="the dirty ring is already enabled on this VM") as ei2:
            vm.enable_dirty_ring(1024)
        _exactly(ei2, KvmStateError, errno=None)


def test_bitmap_required_but_not_offered(kvm: Kvm, fake: FakeKernel) -> None:
    fake.with_bitmap = 0
    with kvm.create_vm() as vm:
        with pytest.raises(KvmUnsupportedError, match="this kernel does not offer "
                                                      "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP") as ei:
            vm.enable_dirty_ring(4096, with_bitmap=True)
        _exactly(ei, KvmUnsupportedError, errno=None)
        assert vm.dirty_ring is None and fake.enabled == []


def test_legacy_only_kernel(kvm: Kvm, fake: FakeKernel) -> None:
    fake.acq_rel = 0
    with kvm.create_vm() as vm:
        with pytest.raises(KvmUnsupportedError,
                           match="the backup bitmap needs KVM_CAP_DIRTY_LOG_RING_ACQ_REL") as ei:
            vm.enable_dirty_ring(4096, with_bitmap=True)
        _exactly(ei, KvmUnsupportedError, errno=None)
        assert vm.dirty_ring is None and fake.enabled == []
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
    with kvm.create_vm() as vm:
        with pytest.raises(KvmUnsupportedError, match=re.escape(
                "this kernel offers no dirty ring (KVM_CAP_DIRTY_LOG_RING[_ACQ_REL] is 0)")) as ei:
            vm.enable_dirty_ring()
        _exactly(ei, KvmUnsupportedError, errno=None)


#: A second dirty-logged slot (the workload's slot 0 is not logged, its MEM_SLOT is).
EXTRA_SLOT = 2
EXTRA_GPA = 2 << 30


def _ring_workload(kvm: Kvm, vcpus: int) -> Workload:
    """vCPUs writing 300 pages each into their own part of MEM_SLOT; a ring with the backup
    bitmap; logged slots MEM_SLOT and EXTRA_SLOT, unlogged LOW_SLOT."""
    w = Workload(kvm, mem_size=16 << 20, vcpus=vcpus, shared=False, ring_entries=4096,
                 max_writes=300, value="count")
    w.vm.add_memory_region(EXTRA_GPA, 1 << 20, slot=EXTRA_SLOT, log_dirty=True)
    assert w.vm.dirty_ring is not None and w.vm.dirty_ring.with_bitmap
    assert {s for s, r in w.vm.regions.items() if r.log_dirty} == {MEM_SLOT, EXTRA_SLOT}
    return w


def _check_harvest_then_reset(calls: list[Call], rings: set[str]) -> list[Call]:
    """``calls`` start with a harvest of each of ``rings`` (each once, nothing else between),
    then KVM_RESET_DIRTY_RINGS (repeated while its sum is short of the harvest), made with no
    entry left dirty in any ring; with no ring harvested there is nothing to recycle, and no
    reset.  Returns the calls after the resets."""
    n = len(rings)
    harvests = calls[:n]
    assert [c.what for c in harvests] == [HARVEST] * n, f"not {sorted(rings)} first: {calls}"
    assert {c.role for c in harvests} == rings, calls
    k = n
    while k < len(calls) and calls[k].what == "KVM_RESET_DIRTY_RINGS":
        assert calls[k].role == "vm" and calls[k].dirty == 0, calls
        k += 1
    assert k > n or n == 0, f"no KVM_RESET_DIRTY_RINGS right after the harvests: {calls}"
    assert n > 0 or k == 0, f"a reset with nothing harvested: {calls}"
    return calls[k:]


def _check_final_order(calls: list[Call], rings: set[str]) -> None:
    """The WITH_BITMAP rule: every ring harvested, then KVM_RESET_DIRTY_RINGS, then
    KVM_GET_DIRTY_LOG of every dirty-logged slot (each once), as the very last step, with every
    ring entry harvested and recycled by then; nothing after it."""
    rest = _check_harvest_then_reset(calls, rings)
    assert [(c.role, c.what) for c in rest] == [("vm", "KVM_GET_DIRTY_LOG")] * 2, \
        f"after the reset, not the bitmap of the two logged slots and nothing else: {calls}"
    assert sorted(c.detail for c in rest if c.detail is not None) == [MEM_SLOT, EXTRA_SLOT]
    assert all(c.dirty == c.harvested == 0 for c in rest), calls


def test_final_collection_reads_the_backup_bitmap_last(kvm: Kvm, fake: FakeKernel) -> None:
    with _ring_workload(kvm, vcpus=4) as w:
        for i in (0, 1):
            w.run_vcpu(i)
        fake.backup_pages = {MEM_SLOT: [5, 4000], EXTRA_SLOT: [7]}  # e.g. an in-kernel device
        mark = len(fake.calls)
        partial = w.vm.collect_dirty_pages()
        # Not final: the rings are harvested and reset, and the bitmap is left alone.
        rest = _check_harvest_then_reset(fake.since(mark), {"vcpu0", "vcpu1"})
        assert rest == [], f"a non-final collection read the bitmap: {fake.calls[mark:]}"
        first = np.flatnonzero(w.mem.page_words())
        assert np.array_equal(partial.pages[MEM_SLOT], first)
        assert sorted(partial.per_vcpu) == [0, 1] and EXTRA_SLOT not in partial.pages

        for i in (2, 3):
            w.run_vcpu(i)
        mark = len(fake.calls)
        final = w.vm.collect_dirty_pages(final=True)
        _check_final_order(fake.since(mark), {"vcpu2", "vcpu3"})
        second = np.setdiff1d(np.flatnonzero(w.mem.page_words()), first)
        assert sorted(final.per_vcpu) == [2, 3]
        assert np.array_equal(final.pages[MEM_SLOT], np.union1d(second, [5, 4000]))
        assert final.pages[EXTRA_SLOT].tolist() == [7]
        assert LOW_SLOT not in final.pages
        # GET_DIRTY_LOG is allowed on a ring VM with the backup bitmap.
        assert len(w.vm.get_dirty_log(MEM_SLOT)) == 0


def test_tracker_final_take_reads_the_backup_bitmap_last(kvm: Kvm, fake: FakeKernel) -> None:
    with _ring_workload(kvm, vcpus=2) as w:
        tracker = DirtyTracker(w.vm, "ring", interval=3600).start()  # no pass of its own
        try:
            for i in (0, 1):
                w.run_vcpu(i)
            fake.backup_pages = {MEM_SLOT: [5, 4000], EXTRA_SLOT: [7]}
            mark = len(fake.calls)
            ranges = tracker.take(final=True)
            _check_final_order(fake.since(mark), {"vcpu0", "vcpu1"})
        finally:
            tracker.close()
        written = np.flatnonzero(w.mem.page_words())
        mem = ranges.slots[MEM_SLOT]
        pages = np.concatenate([np.arange(g, g + n, PAGE_SIZE, dtype=np.uint64)
                                for g, n in zip(mem.gpas, mem.lengths, strict=True)])
        expected = np.union1d(written, [5, 4000]).astype(np.uint64)
        assert np.array_equal((pages - np.uint64(w.mem.guest_phys_addr)) // PAGE_SIZE, expected)
        extra = ranges.slots[EXTRA_SLOT]
        assert (extra.gpas.tolist(), extra.lengths.tolist()) == ([EXTRA_GPA + 7 * PAGE_SIZE],
                                                                  [PAGE_SIZE])


def test_tracker_close_leaves_the_backup_bitmap_to_the_final_collection(
        kvm: Kvm, fake: FakeKernel) -> None:
    """A tracker's close runs one last pass, which is not final: it harvests and resets the
    rings but leaves the backup bitmap, and hands its pages to the VM.  The VM's final
    collection then reads the bitmap last and reports both."""
    with _ring_workload(kvm, vcpus=2) as w:
        tracker = DirtyTracker(w.vm, "ring", interval=3600).start()
        for i in (0, 1):
            w.run_vcpu(i)
        fake.backup_pages = {MEM_SLOT: [5, 4000], EXTRA_SLOT: [7]}
        mark = len(fake.calls)
        tracker.close()
        rest = _check_harvest_then_reset(fake.since(mark), {"vcpu0", "vcpu1"})
        assert rest == [], f"the tracker's close read the bitmap: {fake.calls[mark:]}"
        mark = len(fake.calls)
        final = w.vm.collect_dirty_pages(final=True)
        _check_final_order(fake.since(mark), set())  # the rings were empty
        written = np.flatnonzero(w.mem.page_words())
        assert np.array_equal(final.pages[MEM_SLOT], np.union1d(written, [5, 4000]))
        assert final.pages[EXTRA_SLOT].tolist() == [7]


def test_failed_bitmap_read_keeps_the_slots_already_read(kvm: Kvm, fake: FakeKernel) -> None:
    """A final collection whose bitmap read fails part-way loses nothing: the rings' pages and
    the bitmaps read before the failure are reported by the next collection, as
    ``_collect_bitmaps`` does for bitmap mode."""
    with _ring_workload(kvm, vcpus=1) as w:
        w.run_vcpu(0)
        fake.backup_pages = {MEM_SLOT: [5, 4000], EXTRA_SLOT: [7]}
        fake.get_dirty_log_errno[EXTRA_SLOT] = errno.EFAULT  # read after MEM_SLOT's
        with pytest.raises(KvmError, match="Bad address") as ei:
            w.vm.collect_dirty_pages(final=True)
        _exactly(ei, KvmError, errno=errno.EFAULT)
        assert MEM_SLOT not in fake.backup_pages  # read, so cleared in the kernel
        again = w.vm.collect_dirty_pages(final=True)
        written = np.flatnonzero(w.mem.page_words())
        assert again.pages[EXTRA_SLOT].tolist() == [7]
        assert np.array_equal(again.pages[MEM_SLOT], np.union1d(written, [5, 4000]))


def test_ring_refused_by_the_kernel_leaves_no_ring(kvm: Kvm, fake: FakeKernel) -> None:
    """The kernel refuses the ring itself (e.g. ENOMEM): kvmio reports no ring, maps none, and
    tries nothing after it (no backup bitmap)."""
    fake.ring_enable_errno = errno.ENOMEM
    with kvm.create_vm() as vm:
        with pytest.raises(DirtyRingError,
                           match="the kernel refused a ring of 4096 entries") as ei:
            vm.enable_dirty_ring(4096)
        _exactly(ei, DirtyRingError, errno=errno.ENOMEM)
        assert ei.value.ioctl == "KVM_ENABLE_CAP"
        assert vm.dirty_ring is None and fake.enabled == []
        v = vm.create_vcpu()
        assert v._ring is None
        with pytest.raises(KvmStateError, match="vCPU 0 has no dirty ring") as ei2:
            _ = v.dirty_ring
        _exactly(ei2, KvmStateError, errno=None)
