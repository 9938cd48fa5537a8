"""Benchmark: how close the tracker's dirty rate is to the workload's own count.

Two loads, each in ring and in bitmap mode (interval 0.05 s, window 1 s):
- saturated: the guest rewrites a working set of 256 pages over and over, far faster than a
  pass interval, so every window holds exactly those 256 distinct pages: the true rate is
  256 pages per window second;
- paced: the guest writes new pages sequentially over 1 GiB (never a page twice), so the true
  rate is its write rate, which it counts itself (read from guest memory at each sample).
The error is the tracker's mean rate over the samples taken after the first window, against
that truth over the same samples, in percent.  Goal: within 1%.

Usage: python bench/rates.py [--seconds S]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

from kvmio import Kvm
from kvmio.guests.workload import Workload
from kvmio.tracker import DirtyTracker

WINDOW = 1.0
INTERVAL = 0.05


def saturated(kvm: Kvm, mode: str, seconds: float) -> float:
    pages = 256
    with Workload(kvm, mem_size=64 << 20, working_set=pages * 4096, order="sequential",
                  ring_entries=4096 if mode == "ring" else None) as w:
        tracker = DirtyTracker(w.vm, mode=mode, interval=INTERVAL,  # type: ignore[arg-type]
                               window=WINDOW)
        with tracker, w.runner(on_ring_full=tracker.on_ring_full if mode == "ring" else None):
            time.sleep(seconds)  # the measurement's length: the tracker samples meanwhile
        rates = [s.pages_per_second for s in tracker.samples if s.time > WINDOW + INTERVAL]
    return 100 * (statistics.mean(rates) / (pages / WINDOW) - 1)


def paced(kvm: Kvm, mode: str, seconds: float) -> float:
    with Workload(kvm, mem_size=1 << 30, order="sequential", pace=40,
                  ring_entries=4096 if mode == "ring" else None) as w:
        tracker = DirtyTracker(w.vm, mode=mode, interval=INTERVAL,  # type: ignore[arg-type]
                               window=WINDOW)
        counts: list[tuple[float, int]] = []
        with tracker, w.runner(on_ring_full=tracker.on_ring_full if mode == "ring" else None):
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                counts.append((time.monotonic() - tracker.started_at, w.writes(0)))
                time.sleep(0.002)  # how often the guest's own counter is read
        samples = [s for s in tracker.samples if WINDOW + INTERVAL < s.time < counts[-1][0]]

    def writes_at(t: float) -> float:
        for (t0, c0), (t1, c1) in itertools.pairwise(counts):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c0
        return counts[-1][1]

    # The truth for each sample: the guest's writes over the span its passes cover.
    errs = [s.pages_per_second / ((writes_at(s.time) - writes_at(s.time - s.span)) / s.span) - 1
            for s in samples]
    return 100 * statistics.mean(errs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    print("| load | mode | tracker vs own count | goal |")
    print("|---|---|---|---|")
    with Kvm() as kvm:
        for name, fn in (("saturated, 256 pages", saturated), ("paced, sequential", paced)):
            for mode in ("ring", "bitmap"):
                err = fn(kvm, mode, args.seconds)
                print(f"| {name} | {mode} | {err:+.2f}% | within 1% |")


if __name__ == "__main__":
    main()
