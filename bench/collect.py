"""Benchmark: a whole dirty-page collection (``Vm.collect_dirty_pages``) against C.

The reference is ``kvmio_collect_reference``, compiled into the same native module and called
on the same ring in the same run: the minimal C collection of one ring (harvest with
acquire/release, KVM_RESET_DIRTY_RINGS until the harvest is recycled, then the same grouping
by slot and the same dedup to sorted distinct pages).  For small collections the floor is the
C harvest plus the reset ioctl alone.  Results are ratios (kvmio / reference) measured in the
same run, and CPU time of the calling thread (``time.thread_time_ns``), so that a busy host
does not count other processes' time; never absolute goals, except the fixed cost of an empty
collection, which has no C counterpart worth the name (an empty ring is one load).

Rows:
- full collection, 60,000 kernel-pushed entries of a 65,536-entry ring, guest writing pages
  sequentially, then at random (distinct pages are fewer than entries);
- 100-page collection (4096-entry ring) against the floor (C harvest + one reset ioctl);
- empty collection, 1 vCPU, and the cost of each extra vCPU's ring (2 and 4 vCPUs);
- fixed dirty set (10,000 writes at random) in guest memory of 1 GiB to 256 GiB (sparse,
  MAP_NORESERVE): kvmio's own part (the collection's wall time minus the kernel's reset, which
  grows with the spread of the pages, timed inside the same collection) must stay flat.

Usage: python bench/collect.py [--repeat N] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kvmio import Kvm
from kvmio._abi import ffi, lib
from kvmio.guests.workload import Workload

clock = time.thread_time_ns


class Filler:
    """A workload guest that writes ``count`` more pages each time :meth:`fill` runs it."""

    def __init__(self, kvm: Kvm, *, ring: int, count: int, order: str, mem: int = 1 << 30,
                 vcpus: int = 1):
        self.w = Workload(kvm, mem_size=mem, ring_entries=ring, max_writes=count, order=order,
                          vcpus=vcpus)
        self.count = count
        self.target = 0

    def fill(self) -> None:
        self.target += self.count
        vm = self.w.vm
        vm.write_memory(self.w.params_addr(0) + 80, self.target.to_bytes(8, "little"))
        self.w.run_vcpu(0)

    def close(self) -> None:
        self.w.close()


def _reference_buffers(n: int) -> dict[str, Any]:
    arrays = {"slots": np.zeros(n, dtype=np.uint32), "offsets": np.zeros(n, dtype=np.uint64),
              "pages": np.zeros(n, dtype=np.uint64), "scratch": np.zeros(n, dtype=np.uint64)}
    for a in arrays.values():
        a.fill(0)  # fault the pages in now, as kvmio's pools do
    kinds = {"slots": "uint32_t[]"}
    return {k: (a, ffi.from_buffer(kinds.get(k, "uint64_t[]"), a)) for k, a in arrays.items()}


def reference_collect(f: Filler, bufs: dict[str, Any]) -> tuple[int, int]:
    """The C collection of vCPU 0's ring: (ns, entries)."""
    ring = f.w.vcpus[0].dirty_ring
    assert ring is not None
    harvested = ffi.new("uint32_t *")
    # Bench-only: the ring's own pointer and index, so both sides harvest the same memory.
    t0 = clock()
    groups = lib.kvmio_collect_reference(ring._gfns, ring.size, ring._index, f.w.vm.fd,
                                         lib.KVM_RESET_DIRTY_RINGS, bufs["slots"][1],
                                         bufs["offsets"][1], bufs["pages"][1],
                                         bufs["scratch"][1], harvested)
    dt = clock() - t0
    assert groups >= 0, groups
    return dt, int(harvested[0])


def reference_floor(f: Filler, bufs: dict[str, Any]) -> tuple[int, int]:
    """C harvest + one reset ioctl, no dedup: (ns, entries)."""
    ring = f.w.vcpus[0].dirty_ring
    assert ring is not None
    t0 = clock()
    n = lib.kvmio_ring_harvest_reference(ring._gfns, ring.size, ring._index,
                                         bufs["slots"][1], bufs["offsets"][1])
    r = lib.kvmio_ioctl_val(f.w.vm.fd, lib.KVM_RESET_DIRTY_RINGS, 0)
    dt = clock() - t0
    assert r == n, (r, n)
    return dt, int(n)


def kvmio_collect(f: Filler) -> tuple[int, int]:
    t0 = clock()
    got = f.w.vm.collect_dirty_pages()
    dt = clock() - t0
    return dt, got.entries


def paired(f: Filler, repeat: int, ref: Callable[[], tuple[int, int]]) -> tuple[float, float]:
    """Median ns of the reference and of kvmio, alternating on fresh fills of the ring."""
    rs, ks = [], []
    for _ in range(repeat):
        f.fill()
        dt, n = ref()
        assert n == f.count, (n, f.count)
        rs.append(dt)
        f.fill()
        dt, n = kvmio_collect(f)
        assert n == f.count, (n, f.count)
        ks.append(dt)
    return statistics.median(rs), statistics.median(ks)


def empty_cost(kvm: Kvm, vcpus: int, calls: int) -> float:
    """CPU ns of one empty collection on a VM with ``vcpus`` rings."""
    with kvm.create_vm() as vm:
        vm.enable_dirty_ring(4096)
        vm.add_memory_region(0, 1 << 20, log_dirty=True)
        for i in range(vcpus):
            vm.create_vcpu(i)
        for _ in range(calls // 10):
            vm.collect_dirty_pages()
        best = []
        for _ in range(5):
            t0 = clock()
            for _ in range(calls):
                vm.collect_dirty_pages()
            best.append((clock() - t0) / calls)
        return min(best)


def sparse_row(kvm: Kvm, mem: int, repeat: int) -> tuple[float, float]:
    """(kvmio's own ns, the kernel's reset ns) for 10,000 random writes over ``mem``: the
    collection's wall time minus its own KVM_RESET_DIRTY_RINGS calls
    (``DirtyPages.reset_ns``, timed around the calls in the same collection)."""
    f = Filler(kvm, ring=16384, count=10_000, order="random", mem=mem)
    try:
        own, resets = [], []
        for _ in range(repeat):
            f.fill()
            t0 = time.perf_counter_ns()
            got = f.w.vm.collect_dirty_pages()
            dt = time.perf_counter_ns() - t0
            assert got.entries == f.count
            own.append(dt - got.reset_ns)
            resets.append(got.reset_ns)
        return statistics.median(own), statistics.median(resets)
    finally:
        f.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and sizes")
    args = ap.parse_args()
    repeat = 3 if args.quick else args.repeat
    rows: list[tuple[str, str, str, str, str]] = []
    with Kvm() as kvm:
        for order in ("sequential", "random"):
            f = Filler(kvm, ring=65536, count=60_000, order=order)
            try:
                bufs = _reference_buffers(65536)
                r, k = paired(f, repeat, lambda f=f, b=bufs: reference_collect(f, b))
            finally:
                f.close()
            rows.append((f"full collection, 60,000 entries, {order}", f"{r / 1e3:.0f} us",
                         f"{k / 1e3:.0f} us", f"{k / r:.2f}x", "<= 1.3x"))
        f = Filler(kvm, ring=4096, count=100, order="sequential")
        try:
            bufs = _reference_buffers(4096)
            r, k = paired(f, repeat * 5, lambda f=f, b=bufs: reference_floor(f, b))
        finally:
            f.close()
        rows.append(("100-page collection vs harvest + reset floor", f"{r / 1e3:.1f} us",
                     f"{k / 1e3:.1f} us", f"{k / r:.2f}x", "<= 2x"))
        calls = 2000 if args.quick else 20000
        e1, e2, e4 = (empty_cost(kvm, n, calls) for n in (1, 2, 4))
        rows.append(("empty collection, 1 vCPU", "-", f"{e1 / 1e3:.2f} us", "-", "<= 5 us"))
        rows.append(("each extra vCPU ring (2 and 4 vCPUs)", "-",
                     f"{(e2 - e1) / 1e3:.2f} / {(e4 - e1) / 3e3:.2f} us", "-", "<= 2 us"))
        mems = [1 << 30, 256 << 30] if args.quick else [1 << 30, 16 << 30, 64 << 30, 256 << 30]
        base = None
        for mem in mems:
            own, reset = sparse_row(kvm, mem, repeat)
            base = base or own
            rows.append((f"10,000 random pages over {mem >> 30} GiB: kvmio's part "
                         f"(kernel reset {reset / 1e3:.0f} us)", "-", f"{own / 1e3:.0f} us",
                         f"{own / base:.2f}x of 1 GiB", "<= 1.2x"))
    head = ("case", "C reference", "kvmio", "ratio", "goal")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
