"""Benchmark: the DirtyTracker's cost per second of guest run, with the guest dirtying memory
as fast as it can (the built-in dirtier with no pace), in ring and bitmap mode.

Reported: seconds spent in tracker passes per second of guest run (as a percentage of one
core; passes run in the worker and, on ring-full exits, in vCPU threads), and the worker
thread's CPU time from /proc as a cross-check.  The reference is the guest run itself (the
same seconds), measured in the same run.  Goal: < 5% of one core.

Usage: python bench/tracker_overhead.py [--seconds S] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import time

from kvmio import Kvm
from kvmio.guests.workload import Workload
from kvmio.tracker import DirtyTracker


def _thread_cpu(native_id: int) -> float:
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def measure(kvm: Kvm, mode: str, vcpus: int, seconds: float) -> dict[str, float]:
    ring = 4096 if mode == "ring" else None
    with Workload(kvm, mem_size=1 << 30, vcpus=vcpus, shared=False, ring_entries=ring) as w:
        tracker = DirtyTracker(w.vm, mode, interval=0.05)  # type: ignore[arg-type]
        cb = tracker.on_ring_full if ring else None
        with tracker:
            worker = tracker.worker_thread
            assert worker is not None and worker.native_id is not None
            t0 = time.monotonic()
            with w.runner(on_ring_full=cb):
                time.sleep(seconds)  # the measurement period, not a synchronisation
                worker_cpu = _thread_cpu(worker.native_id)
            elapsed = time.monotonic() - t0
        return {"elapsed": elapsed, "passes": tracker.passes, "entries": tracker.entries,
                "pass_seconds": tracker.cpu_time, "worker_cpu": worker_cpu,
                "pages_per_second": w.total_writes() / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    print("| mode | vCPUs | guest writes/s | passes | tracker time per guest second | "
          "worker CPU (/proc) | goal |")
    print("|---|---|---|---|---|---|---|")
    with Kvm() as kvm:
        for mode in ("ring", "bitmap"):
            for vcpus in (1, 2):
                r = measure(kvm, mode, vcpus, args.seconds)
                print(f"| {mode} | {vcpus} | {r['pages_per_second']:,.0f} | {r['passes']} | "
                      f"{100 * r['pass_seconds'] / r['elapsed']:.1f}% | "
                      f"{100 * r['worker_cpu'] / r['elapsed']:.1f}% | < 5% |")


if __name__ == "__main__":
    main()
