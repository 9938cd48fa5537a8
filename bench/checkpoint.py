"""Benchmark: a whole checkpoint reset (``Checkpoint.reset``: pending exit, memory, machine
state) and a run-then-reset loop, against the floors measured in the same run.

The guest and its write list are ``bench/reset.py``'s (:class:`kvmio.resetbench.ResetBench`:
a long-mode guest that writes one value into each of ``N`` chosen pages, then ``out``).  Per
row: the p50 of the whole reset (wall time), of its parts (finishing the exit, memory,
state), and two references from the same run: a full copy of the checkpoint's pages (the
reset without dirty tracking) and the same reset with the fused native call (collection
and page copies in one call) switched off, so that the pages are copied by the
page-by-page path after the collection, interleaved with the measured resets.  The loop row
runs the guest and resets it ``--repeat`` times and reports resets per second with the
guest's time excluded (and against the page-by-page path's), and whole iterations per
second.  The state's own ioctls are ``bench/state.py``'s.

Usage: python bench/checkpoint.py [--repeat N] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

from kvmio import Kvm
from kvmio.resetbench import DEFAULT_GUESTS, ResetBench
from kvmio.snapshot import Checkpoint


@contextlib.contextmanager
def page_by_page(ck: Checkpoint) -> Iterator[None]:
    """The checkpoint's memory reset without the fused native call (collection, then the
    page-by-page restore), for the paired reference.  (Patches the instance's
    private method: a benchmark-only switch.)"""
    memory: Any = ck.memory
    memory._fused = lambda hosts: memory._collect()
    try:
        yield
    finally:
        del memory._fused


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=21)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    guests = DEFAULT_GUESTS[:1] + DEFAULT_GUESTS[2:] if args.quick else DEFAULT_GUESTS
    print("| mode | guest | dirty | restored | reset p50 | exit / memory / state | "
          "full copy | reset / full copy | reset / page by page |")
    print("|---|---|---|---|---|---|---|---|---|")
    with Kvm() as kvm:
        for mode in ("ring", "bitmap"):
            for guest in guests:
                name = guest.label
                with ResetBench(kvm, mode, guest) as b:
                    b.checkpoint.close()  # the whole checkpoint below owns the dirty log instead
                    with Checkpoint.take(b.vm) as ck:
                        b.use(ck.memory)  # the reference copies the same stored pages
                        for n in ((1, 100) if args.quick else (1, 10, 100, 1000)):
                            pages = b.choose(n)
                            b.dirty(pages)
                            ck.reset()  # warm-up
                            reps, unfused = [], []
                            for _ in range(args.repeat):
                                b.dirty(pages)
                                reps.append(ck.reset())
                                b.dirty(pages)  # the same reset without the fused call
                                with page_by_page(ck):
                                    unfused.append(ck.reset().ns)
                            ref = []
                            for _ in range(max(3, args.repeat // 3)):
                                b.dirty(pages)
                                t0 = time.perf_counter_ns()
                                b.full_copy()
                                ref.append(time.perf_counter_ns() - t0)
                                ck.reset()
                            med = statistics.median
                            total = med(r.ns for r in reps)
                            print(f"| {mode} | {name} | {n} | {int(med(r.pages for r in reps))} "
                                  f"| {total / 1e3:.0f} us "
                                  f"| {med(r.exits_ns for r in reps) / 1e3:.0f} / "
                                  f"{med(r.memory.ns for r in reps) / 1e3:.0f} / "
                                  f"{med(r.state_ns for r in reps) / 1e3:.0f} us "
                                  f"| {med(ref) / 1e3:.0f} us | {total / med(ref):.4f} "
                                  f"| {f'{total / med(unfused):.2f}' if unfused else '-'} |",
                                  flush=True)
                        # The harness loop: run 100 pages, reset, again.
                        pages = b.choose(100)
                        runs, resets, plain = [], [], []
                        for _ in range(args.repeat):
                            t0 = time.perf_counter_ns()
                            b.dirty(pages)
                            t1 = time.perf_counter_ns()
                            resets.append(ck.reset().ns)
                            runs.append(t1 - t0)
                            b.dirty(pages)
                            with page_by_page(ck):
                                plain.append(ck.reset().ns)
                        rate = len(resets) / (sum(resets) / 1e9)
                        paired = f"{rate / (len(plain) / (sum(plain) / 1e9)):.2f}x the rate" \
                            if plain else "-"
                        print(f"| {mode} | {name} | loop of 100 pages | - | "
                              f"{rate:.0f} resets/s (guest "
                              f"excluded), {len(resets) / ((sum(resets) + sum(runs)) / 1e9):.0f}"
                              f" iterations/s | guest {statistics.median(runs) / 1e3:.0f} us "
                              f"| - | - | {paired} |", flush=True)


if __name__ == "__main__":
    main()
