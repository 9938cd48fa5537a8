"""Memory backends (anonymous, memfd, file shared or private) registered as slots, on the real
/dev/kvm: a tiny real-mode guest writes through each, and the host checks where the write
landed."""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmio import (
    AnonymousMemory,
    FileMemory,
    Hlt,
    IoOut,
    Kvm,
    KvmClosedError,
    KvmInvalidArgumentError,
    KvmUnsupportedError,
    MemfdMemory,
    Memory,
    Vm,
)

pytestmark = pytest.mark.kvm

SIZE = 1 << 20
#: mov al, 'A'; out 0xE9, al; mov byte [0x5000], 1; hlt   (real mode, at 0x1000)
CODE = bytes([0xB0, 0x41, 0xE6, 0xE9, 0xC6, 0x06, 0x00, 0x50, 0x01, 0xF4])


def _run_guest(vm: Vm) -> None:
    """Load CODE at 0x1000 of slot 0 and run it: it writes byte 1 at guest 0x5000."""
    vm.write_memory(0x1000, CODE)
    v = vm.create_vcpu()
    s = v.get_sregs()
    s.cs.base = s.cs.selector = 0
    v.set_sregs(s)
    r = v.get_regs()
    r.rip = 0x1000
    v.set_regs(r)
    assert v.run() == IoOut(0xE9, 1, 1, b"A")
    assert isinstance(v.run(), Hlt)


def test_memfd_memory_is_shared_with_another_mapping(kvm: Kvm) -> None:
    mem = MemfdMemory(SIZE)
    other = mmap.mmap(mem.fd, SIZE, mmap.MAP_SHARED)  # e.g. another process's view
    try:
        with kvm.create_vm() as vm:
            vm.add_memory_region(0, memory=mem, log_dirty=True)
            _run_guest(vm)
            assert other[0x5000] == 1  # the guest's write, seen through the other mapping
            assert vm.collect_dirty_pages().pages[0].tolist() == [5]
        assert mem.closed
        with pytest.raises(KvmClosedError, match="memfd memory is closed"):
            _ = mem.fd
    finally:
        other.close()


def test_private_file_memory_never_changes_the_file(kvm: Kvm, tmp_path: Path) -> None:
    f = tmp_path / "image"
    f.write_bytes(b"\x07" * SIZE)
    with kvm.create_vm() as a, kvm.create_vm() as b:
        ra = a.add_memory_region(0, memory=FileMemory(f), log_dirty=True)
        rb = b.add_memory_region(0, memory=FileMemory(f))  # a clone from the same file
        assert ra.read(0x5000, 1) == b"\x07" == rb.read(0x5000, 1)
        _run_guest(a)
        assert ra.read(0x5000, 1) == b"\x01"  # copy-on-write: a's own page
        assert rb.read(0x5000, 1) == b"\x07"  # the clone still sees the file
        assert a.collect_dirty_pages().pages[0].tolist() == [5]
    assert f.read_bytes() == b"\x07" * SIZE


def test_shared_file_memory_writes_reach_the_file(kvm: Kvm, tmp_path: Path) -> None:
    f = tmp_path / "ram"
    f.write_bytes(bytes(2 * SIZE))
    with kvm.create_vm() as vm:
        vm.add_memory_region(0, SIZE, memory=FileMemory(f, size=SIZE, offset=SIZE, shared=True))
        _run_guest(vm)
    data = f.read_bytes()
    assert data[SIZE + 0x5000] == 1 and data[0x5000] == 0  # at the offset, nowhere else


def test_anonymous_memory_is_the_default(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        r = vm.add_memory_region(0, SIZE)
        assert isinstance(r.memory, AnonymousMemory)
        r2 = vm.add_memory_region(SIZE, memory=AnonymousMemory(SIZE, noreserve=True))
        assert r2.size == SIZE and not np.any(r2.array())


def test_bad_backends_are_refused(kvm: Kvm, tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(bytes(4096))
    with pytest.raises(KvmInvalidArgumentError, match="fewer than offset"):
        FileMemory(short, size=SIZE)
    with pytest.raises(KvmInvalidArgumentError, match="not page aligned"):
        FileMemory(short, offset=100)
    with pytest.raises(KvmInvalidArgumentError, match="No such file"):
        FileMemory(tmp_path / "missing")
    with pytest.raises(KvmInvalidArgumentError, match="not a regular file"):
        FileMemory(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(KvmInvalidArgumentError, match="not a regular file"):
        FileMemory(tmp_path / "fifo", shared=True)
    with pytest.raises(KvmInvalidArgumentError, match="positive multiple"):
        FileMemory(short, size=0)
    with pytest.raises(KvmInvalidArgumentError, match="positive multiple"):
        MemfdMemory(100)
    with pytest.raises(KvmInvalidArgumentError, match="size must be an int"):
        AnonymousMemory("1M")  # type: ignore[arg-type]
    with kvm.create_vm() as vm:
        mem = MemfdMemory(SIZE)
        with pytest.raises(KvmInvalidArgumentError, match="does not match"):
            vm.add_memory_region(0, 2 * SIZE, memory=mem)
        with pytest.raises(KvmInvalidArgumentError, match="noreserve"):
            vm.add_memory_region(0, memory=mem, noreserve=True)
        with pytest.raises(KvmInvalidArgumentError, match="memory must be a Memory"):
            vm.add_memory_region(0, memory=b"x")  # type: ignore[arg-type]
        with pytest.raises(KvmInvalidArgumentError, match="give the size"):
            vm.add_memory_region(0)
        vm.add_memory_region(0, memory=mem)
        with pytest.raises(KvmInvalidArgumentError, match="already backs"):
            vm.add_memory_region(SIZE, memory=mem)
        vm.delete_memory_region(0)
        with pytest.raises(KvmInvalidArgumentError, match="closed"):
            vm.add_memory_region(0, memory=mem)
    assert issubclass(MemfdMemory, Memory)


# -- host-write records and populated pages ---------------------------------------------------


def test_host_writes_are_recorded_per_record(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        r = vm.add_memory_region(0, SIZE)
        vm.write_memory(0x3000, b"before any record")  # nobody records: nothing kept
        rec = r.record_host_writes()
        assert rec.take().tolist() == [] and not rec.take().flags.writeable
        vm.write_memory(0x5000, b"x")
        r.write(0x6FFF, b"ab")  # straddles pages 6 and 7
        vm.write_memory(0x2000, bytes(3 * 4096))  # pages 2, 3, 4
        vm.write_memory(0x9000, b"")  # nothing written, nothing marked
        vm.mark_dirty(0xA008, 8)  # e.g. a write through array()
        r.array()[0xB000] = 1  # a raw view: not recorded...
        assert rec.pending == 7
        other = r.record_host_writes()  # a second consumer sees only what comes after it
        got = rec.take()
        assert got.dtype == np.uint64 and got.tolist() == [2, 3, 4, 5, 6, 7, 10]
        assert rec.take().tolist() == []
        r.mark_dirty(0xB000, 1)  # ...until marked
        assert rec.take().tolist() == [11] and other.take().tolist() == [11]
        rec.close()
        vm.write_memory(0x1000, b"y")
        assert rec.closed and rec.take().tolist() == [] and other.take().tolist() == [1]
        with pytest.raises(KvmInvalidArgumentError, match="outside slot"):
            r.mark_dirty(SIZE - 8, 16)
        with other:
            pass
        assert other.closed and r._records == ()


def test_host_write_records_are_thread_safe(kvm: Kvm) -> None:
    import threading

    with kvm.create_vm() as vm:
        r = vm.add_memory_region(0, SIZE)
        rec = r.record_host_writes()
        pages = SIZE // 4096
        taken: list[np.ndarray] = []
        done = threading.Event()

        def taker() -> None:
            while not done.is_set():
                taken.append(rec.take())

        t = threading.Thread(target=taker)
        t.start()
        for i in range(3 * pages):
            vm.write_memory((i % pages) * 4096, b"z")
        done.set()
        t.join()
        taken.append(rec.take())
        assert set(np.concatenate(taken).tolist()) == set(range(pages))


def test_populate_faults_pages_in_without_changing_them(tmp_path: Path) -> None:
    big = AnonymousMemory(8 << 30, noreserve=True)
    try:
        a = np.frombuffer(big.mapping.mm, dtype=np.uint8)
        a[5 * 4096 + 1] = 42  # data of its own before the populate
        if not big.populate(3, 4):  # only a hint: a kernel before 5.14 cannot
            release = tuple(int(x) for x in os.uname().release.split(".")[:2])
            assert release < (5, 14), f"populate failed on Linux {os.uname().release}"
            return
        assert big.populated_pages().tolist() == [3, 4, 5, 6]
        assert a[5 * 4096 + 1] == 42 and not a[3 * 4096:5 * 4096].any()
        assert big.populate(0, 0) is True and big.populated_pages().tolist() == [3, 4, 5, 6]
        del a
        with pytest.raises(KvmInvalidArgumentError, match="outside"):
            big.populate(big.size // 4096 - 1, 2)
        with pytest.raises(KvmInvalidArgumentError, match="first_page"):
            big.populate(-1, 1)
        with pytest.raises(KvmInvalidArgumentError, match="num_pages"):
            big.populate(0, "2")  # type: ignore[arg-type]
    finally:
        big.close()
    with pytest.raises(KvmClosedError):
        big.populate(0, 1)
    f = tmp_path / "image"
    f.write_bytes(b"\x07" * SIZE)
    private = FileMemory(f)
    try:  # a private file mapping: populated as private copies of the file's bytes
        assert private.populate(1, 2) is True
        assert private.populated_pages().tolist() == [1, 2]
        p = np.frombuffer(private.mapping.mm, dtype=np.uint8)
        assert int(p[4096:3 * 4096].min()) == 7
        del p
    finally:
        private.close()


def test_populated_pages_of_each_backend(kvm: Kvm, tmp_path: Path) -> None:
    big = AnonymousMemory(8 << 30, noreserve=True)
    try:
        assert big.populated_pages().tolist() == []
        a = np.frombuffer(big.mapping.mm, dtype=np.uint8)
        a[0] = 1
        a[7 * 4096 + 5] = 1
        _ = int(a[9 * 4096])  # read only: the zero page, holds no data of its own
        a[big.size - 1] = 1
        last = big.size // 4096 - 1
        assert big.populated_pages().tolist() in ([0, 7, last], [0, 7, 9, last])
        big.discard(7, 1)  # back to zero, memory freed
        assert a[7 * 4096 + 5] == 0 and 7 not in big.populated_pages().tolist()
        del a
    finally:
        big.close()
    mem = MemfdMemory(SIZE)
    other = mmap.mmap(mem.fd, SIZE, mmap.MAP_SHARED)  # another process's view, say
    try:
        other[3 * 4096] = 1  # never touched through kvmio's own mapping
        other[SIZE - 1] = 1
        assert mem.populated_pages().tolist() == [3, SIZE // 4096 - 1]
        mem.discard(3, 1)  # a hole again, for every mapping
        assert mem.populated_pages().tolist() == [SIZE // 4096 - 1]
        assert other[3 * 4096] == 0  # (reading a memfd's hole allocates the page again)
        assert os.lseek(mem.fd, 0, os.SEEK_CUR) == 0  # the fd's offset is left alone
    finally:
        other.close()
        mem.close()
    f = tmp_path / "image"
    f.write_bytes(b"\x07" * SIZE)
    private = FileMemory(f)
    shared = FileMemory(f, shared=True)
    try:
        assert not private.unpopulated_is_zero
        p = np.frombuffer(private.mapping.mm, dtype=np.uint8)
        assert int(p.sum()) == 7 * SIZE  # every page read: file pages, not data of its own
        p[2 * 4096] = 9  # a private copy
        assert private.populated_pages().tolist() == [2]
        private.discard(2, 1)
        assert p[2 * 4096] == 7 and private.populated_pages().tolist() == []
        del p
        assert len(shared.populated_pages()) == SIZE // 4096  # all of it is the file
        with pytest.raises(KvmUnsupportedError, match="shared file"):
            shared.discard(0, 1)
        with pytest.raises(KvmInvalidArgumentError, match="outside"):
            private.discard(SIZE // 4096, 1)
    finally:
        private.close()
        shared.close()
    assert f.read_bytes() == b"\x07" * SIZE


def test_populated_pages_without_pagemap_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel lacks PAGEMAP_SCAN (before Linux 6.7) /proc/self/pagemap is read."""
    from kvmio import _abi
    from kvmio.errors import KvmError

    def refuse(*args: object, **kwargs: object) -> tuple[int, int]:
        raise KvmError("no such ioctl", errno=25, ioctl="PAGEMAP_SCAN")  # ENOTTY

    mem = AnonymousMemory(1 << 30, noreserve=True)
    try:
        a = np.frombuffer(mem.mapping.mm, dtype=np.uint8)
        for page in (1, 2, 100, 70000):
            a[page * 4096] = 1
        fast = mem.populated_pages()
        monkeypatch.setattr(_abi, "pagemap_scan", refuse)
        assert mem.populated_pages().tolist() == fast.tolist() == [1, 2, 100, 70000]
        del a
    finally:
        mem.close()


def _thp_mode() -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``), or None
    without THP (madvise(MADV_HUGEPAGE) then fails, and ``populate(huge=True)`` marks
    nothing)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else None


THP = _thp_mode()


def _huge_flagged(address: int, size: int) -> list[tuple[int, int]]:
    """The parts of ``[address, address + size)`` whose mappings carry MADV_HUGEPAGE (the
    ``hg`` VmFlag of /proc/self/smaps), as (start, end) addresses."""
    out = []
    start = end = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                start, end = max(lo, address), min(hi, address + size)
            elif head == "VmFlags:" and start is not None and end is not None and start < end \
                    and "hg" in line.split()[1:]:
                if out and out[-1][1] == start:  # adjacent mappings: one range
                    out[-1] = (out[-1][0], end)
                else:
                    out.append((start, end))
    return out


def test_populate_huge_marks_only_whole_blocks_inside_the_range() -> None:
    mem = AnonymousMemory(64 << 20, noreserve=True)
    try:
        per = (2 << 20) // 4096
        base = mem.mapping.address // 4096
        a = np.frombuffer(mem.mapping.mm, dtype=np.uint8)
        first = per - base % per + 100  # 100 pages into a block: two whole blocks follow
        a[(first + 7) * 4096] = 9
        count = 3 * per
        assert mem.populate(first, count, huge=True)
        assert a[(first + 7) * 4096] == 9 and int(a.sum()) == 9  # nothing else changed
        got = mem.populated_pages()
        # Every page of the range, and none outside it (with THP "always", the write above
        # may have faulted its whole block in, pages before the range too).
        if THP == "always":
            assert set(got.tolist()) >= set(range(first, first + count))
        else:
            assert got.tolist() == list(range(first, first + count))
        start, end = mem.huge_blocks(first, count)
        assert (start, end) == (first - 100 + per, first - 100 + 3 * per)
        flagged = _huge_flagged(mem.mapping.address, mem.size)
        if THP is not None:
            assert flagged == [(mem.mapping.address + start * 4096,
                                mem.mapping.address + end * 4096)]
        del a
        # A range holding no whole block marks nothing more, and a kind that is not private
        # anonymous memory takes the hint without effect.
        s0, e0 = mem.huge_blocks(first + count, per - 1)
        assert s0 >= e0
        with pytest.raises(KvmInvalidArgumentError, match="first_page"):
            mem.huge_blocks(-1, 1)
        assert mem.huge_offset(start) == 0 and mem.huge_offset(first) == 100
        with pytest.raises(KvmInvalidArgumentError, match="page"):
            mem.huge_offset("3")  # type: ignore[arg-type]
        # numpy integers (page indices often are): the same, as plain ints.
        assert mem.populate(np.uint64(first), np.uint64(10), huge=True)
        assert mem.huge_blocks(np.uint64(first), np.uint64(count)) == (start, end)
        assert mem.populate(first + count, per - 1, huge=True)
        assert _huge_flagged(mem.mapping.address, mem.size) == flagged
        with pytest.raises(KvmInvalidArgumentError, match="huge"):
            mem.populate(0, 1, huge="yes")  # type: ignore[arg-type]
    finally:
        mem.close()
    shared = MemfdMemory(8 << 20)
    try:
        assert shared.populate(0, 2048, huge=True)
        assert _huge_flagged(shared.mapping.address, shared.size) == []
        assert shared.populated_pages().tolist() == list(range(2048))
    finally:
        shared.close()


@given(address_page=st.integers(0, 1 << 30), first=st.integers(0, 1 << 20),
       count=st.integers(0, 1 << 13))
def test_huge_blocks_are_the_whole_aligned_blocks_inside(address_page: int, first: int,
                                                        count: int) -> None:
    per = 512
    # Only the mapping's address matters: a Memory over a stand-in mapping anywhere.
    fake = Memory.__new__(Memory)
    fake.mapping = SimpleNamespace(address=address_page * 4096)  # type: ignore[assignment]
    start, end = fake.huge_blocks(first, count)
    assert fake.huge_offset(first) == (address_page + first) % per
    blocks = [b for b in range(first, first + count)
              if (address_page + b) % per == 0 and b + per <= first + count]
    if not blocks:
        assert start >= end
    else:
        assert (start, end) == (blocks[0], blocks[-1] + per)


def test_populate_huge_marks_a_bounded_number_of_separate_ranges(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each marked range that does not continue the one before may split the mapping into
    more kernel VMAs: after MAX_HUGE_RANGES of them the hint is not given (the pages are
    still populated); a range continuing the last one does not count."""
    import kvmio.memory

    monkeypatch.setattr(kvmio.memory, "MAX_HUGE_RANGES", 2)
    mem = AnonymousMemory(64 << 20, noreserve=True)
    try:
        per = 512
        first = per - (mem.mapping.address // 4096) % per  # a block boundary
        blocks = [0, 1, 3, 5]  # the second continues the first; then gaps between
        for b in blocks:
            assert mem.populate(first + b * per, per, huge=True)
        got = set(mem.populated_pages().tolist())
        assert got == {p for b in blocks for p in range(first + b * per, first + (b + 1) * per)}
        if THP is not None:
            base = mem.mapping.address + first * 4096
            block = per * 4096
            assert _huge_flagged(mem.mapping.address, mem.size) == [
                (base, base + 2 * block), (base + 3 * block, base + 4 * block)]
    finally:
        mem.close()
