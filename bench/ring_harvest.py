"""Benchmark: dirty-ring harvest, and harvest + reset, per entry, against a C reference loop.

The reference is ``kvmio_ring_harvest_reference``: the minimal correct C harvester (load-acquire
the flags, copy slot/offset, store-release RESET) compiled into the same native module, called
on the same ring in the same run.  Results are ratios (kvmio / reference), never absolute goals.

kvmio returns fresh numpy arrays to the caller (from a pool of prefaulted buffers that it reuses
once the caller has dropped the previous result), so both sides write to warm memory.

Rows:
- harvest, in-memory ring: a 65536-entry ring in ordinary memory, filled synthetically.
- harvest, kernel ring: the real mmapped ring of a vCPU, holding entries the kernel pushed for a
  guest's writes (60,000 per fill; the soft limit of a 65536-entry ring is 65472).
- harvest + reset, kernel ring: the above plus KVM_RESET_DIRTY_RINGS (repeated until it returns
  0); kvmio also checks reset == harvested.

Times are CPU time of the calling thread (time.thread_time_ns), so that other processes on a
busy host do not count.

Usage: python bench/ring_harvest.py [--repeat N] [--markdown]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from kvmio import Kvm
from kvmio._abi import ffi, lib
from kvmio.dirty.ring import GFN_DTYPE, harvest_array
from kvmio.guests.workload import Workload

RING = 65536
FILL = 60_000


# The reference harvests into one preallocated, already-faulted buffer, as a C program would.
_REF_SLOTS = np.zeros(RING, dtype=np.uint32)
_REF_OFFSETS = np.zeros(RING, dtype=np.uint64)


def _reference(gfns: object, size: int, index: int) -> tuple[int, float]:
    ps = ffi.from_buffer("uint32_t[]", _REF_SLOTS)
    po = ffi.from_buffer("uint64_t[]", _REF_OFFSETS)
    idx = ffi.new("uint32_t *", index)
    t0 = time.thread_time_ns()
    n = lib.kvmio_ring_harvest_reference(gfns, size, idx, ps, po)
    dt = time.thread_time_ns() - t0
    return int(n), dt


def bench_memory(repeat: int) -> tuple[float, float]:
    ring = np.zeros(RING, dtype=GFN_DTYPE)
    buf = ffi.from_buffer("struct kvm_dirty_gfn[]", ring)
    ref, ours = [], []
    for _ in range(repeat):
        lib.kvmio_ring_fill(buf, RING, 0, RING, 1, 0)
        n, dt = _reference(buf, RING, 0)
        assert n == RING
        ref.append(dt / n)
        lib.kvmio_ring_fill(buf, RING, 0, RING, 1, 0)
        t0 = time.thread_time_ns()
        got, _, _ = harvest_array(ring, 0)
        dt = time.thread_time_ns() - t0
        assert len(got) == RING
        ours.append(dt / RING)
    return statistics.median(ref), statistics.median(ours)


def bench_kernel(kvm: Kvm, repeat: int) -> dict[str, tuple[float, float]]:
    res: dict[str, tuple[list[float], list[float]]] = {"harvest": ([], []), "reset": ([], [])}
    with Workload(kvm, mem_size=1 << 30, ring_entries=RING, max_writes=FILL) as w:
        ring = w.vcpus[0].dirty_ring
        target = 0
        for k in range(2 * repeat):
            target += FILL
            w.vm.write_memory(w.params_addr(0) + 80, target.to_bytes(8, "little"))
            w.run_vcpu(0)
            if k % 2 == 0:  # reference: C loop, then the raw ioctl until it returns 0
                # Bench-only: the ring's own pointer, so both harvest the same memory.
                n, dt = _reference(ring._gfns, RING, ring.index)
                ring._index[0] = (ring.index + n) & 0xFFFFFFFF
                t0 = time.thread_time_ns()
                total = 0
                while (r := lib.kvmio_ioctl_val(w.vm.fd, lib.KVM_RESET_DIRTY_RINGS, 0)) > 0:
                    total += r
                dr = time.thread_time_ns() - t0
                assert n == FILL and total == FILL, (n, total)
                res["harvest"][0].append(dt / n)
                res["reset"][0].append((dt + dr) / n)
            else:  # kvmio
                t0 = time.thread_time_ns()
                got = ring.harvest()
                t1 = time.thread_time_ns()
                assert w.vm.reset_dirty_rings() == FILL
                t2 = time.thread_time_ns()
                assert len(got) == FILL
                res["harvest"][1].append((t1 - t0) / FILL)
                res["reset"][1].append((t2 - t0) / FILL)
    return {k: (statistics.median(a), statistics.median(b)) for k, (a, b) in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--markdown", action="store_true", help="print a README table")
    args = ap.parse_args()
    rows = []
    ref, ours = bench_memory(max(args.repeat, 3) * 3)
    rows.append(("harvest, in-memory ring (65536)", ref, ours, 1.5))
    with Kvm() as kvm:
        k = bench_kernel(kvm, args.repeat)
    rows.append(("harvest, kernel ring (60000)", *k["harvest"], 1.5))
    rows.append(("harvest + reset, kernel ring (60000)", *k["reset"], 1.2))
    head = ("case", "C reference ns/entry", "kvmio ns/entry", "ratio", "goal")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, r, o, goal in rows:
        print(f"| {name} | {r:.2f} | {o:.2f} | {o / r:.2f}x | <= {goal}x |")


if __name__ == "__main__":
    main()
