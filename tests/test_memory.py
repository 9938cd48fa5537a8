"""Memory backends (anonymous, memfd, file shared or private) registered as slots, on the real
/dev/kvm: a tiny real-mode guest writes through each, and the host checks where the write
landed."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from kvmio import (
    AnonymousMemory,
    FileMemory,
    Hlt,
    IoOut,
    Kvm,
    KvmClosedError,
    KvmInvalidArgumentError,
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
