"""Benchmark: resetting guest memory to a checkpoint (``MemoryCheckpoint.reset``) against a
full-memory copy, by dirty pages and guest size, in ring and bitmap mode.

What is measured, and how, is :mod:`kvmio.resetbench` (``kvmio bench reset`` runs the same
cells, with a plot): each cycle lets a long-mode guest write one 8-byte value into each of
``N`` distinct pages, then resets; the reference is a copy of every page the checkpoint holds.
Guests: 64 MiB and 1 GiB fully populated, and 64 GiB sparse (``MAP_NORESERVE``) with 1 GiB
populated, spread over all of it.

Reported per row: the p50 of the whole reset in wall time and in CPU time of the calling
thread, the p50 of its collection (harvest and reset of the ring, or GET_DIRTY_LOG) and of
the rest (restoring the pages, bookkeeping), the reference's p50 (wall), and the ratio
reset / reference; then how the reset grows with guest size.

Usage: python bench/reset.py [--repeat N] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json

from kvmio import Kvm
from kvmio.resetbench import (
    DEFAULT_DIRTY,
    DEFAULT_GUESTS,
    DEFAULT_REPEAT,
    MODES,
    ResetCell,
    measure_resets,
)


def show(c: ResetCell) -> None:
    print(f"{c.mode:6} {c.guest:14} {c.dirty:>6} dirty ({c.restored:>6} restored): "
          f"reset {c.reset_us:9.1f} us (cpu {c.reset_cpu_us:9.1f}; "
          f"collect {c.collect_us:8.1f} + rest {c.rest_us:8.1f}),"
          f" full copy {c.full_copy_us:10.1f} us, ratio {c.ratio:.4f}", flush=True)


def run(repeat: int, quick: bool) -> list[ResetCell]:
    guests = DEFAULT_GUESTS[:1] + DEFAULT_GUESTS[2:] if quick else DEFAULT_GUESTS
    dirty = (1, 100, 1_000) if quick else DEFAULT_DIRTY
    with Kvm() as kvm:
        return measure_resets(kvm, guests, dirty, repeat=repeat, progress=show)


def flatness(cells: list[ResetCell]) -> None:
    print("\nflatness: p50 reset by guest size, relative to the smallest guest")
    for mode in MODES:
        for n in DEFAULT_DIRTY:
            sel = [c for c in cells if c.mode == mode and c.dirty == n]
            if len(sel) < 2:
                continue
            base = sel[0].reset_us
            print(f"{mode:6} {n:>6} dirty: " + ", ".join(
                f"{c.guest} {c.reset_us / base:.2f}x" for c in sel))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=DEFAULT_REPEAT)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    cells = run(args.repeat, args.quick)
    flatness(cells)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([c.to_json() for c in cells], f, indent=1)


if __name__ == "__main__":
    main()
