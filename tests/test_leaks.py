"""No leaks: file descriptors and mappings before == after many VMs."""

from __future__ import annotations

import gc
import os

from kvmio import Kvm
from kvmio.guests.workload import Workload


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def test_no_fd_or_mapping_leaks(kvm: Kvm) -> None:
    # Warm up (lazy imports, the kick handler, allocator arenas).
    with Workload(kvm, mem_size=16 << 20, max_writes=10, ring_entries=4096) as w:
        w.run_all(timeout=10)
    gc.collect()
    fds, maps = _fds(), _maps()
    for i in range(40):
        with kvm.create_vm() as vm:
            if i % 2:
                vm.enable_dirty_ring(1024)
            vm.add_memory_region(0, 1 << 20)
            vm.add_memory_region(1 << 30, 1 << 30, noreserve=True, log_dirty=True)
            for _ in range(2):
                vm.create_vcpu()
            vm.delete_memory_region(0)
    with Workload(kvm, mem_size=16 << 20, max_writes=10, ring_entries=4096) as w:
        w.run_all(timeout=10)
    gc.collect()
    assert _fds() == fds
    assert _maps() <= maps + 2  # the allocator may keep an arena or two
