"""Benchmark: how fast and how closely the dirty-rate limit (``kvmio.limit.DirtyLimit``) holds
a guest that dirties memory as fast as it can, and what a limit above the natural rate costs.

The guest is the built-in dirtier writing one new page per write (sequential order over 1 GiB
per vCPU: a write is a distinct dirty page), so its own write counter, read from guest memory
every 20 ms, is the truth.  The tracker runs with its defaults (interval 0.05 s, window 1 s).

Per mode (ring, bitmap) and limit (1, 4, 16, 64 MiB/s; a limit must be below the natural rate,
which the run measures first):
- settling: the first time after ``set()`` from which every 1 s rate (by the guest's counter,
  over [t - 1 s, t]) stays within max(10%, 0.5 MiB/s) of the limit (at least 1 s: the first
  window starts at ``set()``);
- steady state (2 s to 12 s after ``set()``): the mean and the largest error of the 1 s rates.
Beside them, QEMU's published dirty-limit test tolerance (tests/qtest/migration-test.c: the
rate within limit + 25 MB/s, checked over 20 s).

Idle limit: throughput with a limit of 4x the natural rate against none, alternated in the same
VM (1 s each, 20 pairs in ABBA order, over a 64 MiB working set whose pages were all written
once first): the median of the paired ratios (1.0 = no cost; a single 1 s rate varies by up to
10% on a shared host, hence the many pairs).

Usage: python bench/limit.py [--quick] [--json FILE] [--plot FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any

from kvmio import Kvm
from kvmio.guests.workload import Workload
from kvmio.limit import DirtyLimit
from kvmio.tracker import DirtyTracker

MiB = 1 << 20
PAGE = 4096
LIMITS = [1, 4, 16, 64]
QEMU_TOLERANCE = 25e6  # bytes/s above the limit (QEMU's migration-test dirty-limit check)


def band(limit: float) -> float:
    return max(0.1 * limit, 0.5 * MiB)


class Counter(threading.Thread):
    """Samples vCPU 0's write counter every ``every`` seconds (dropping samples whose read
    was held up, which have no precise time)."""

    def __init__(self, w: Workload, every: float = 0.02):
        super().__init__(daemon=True)
        self.w, self.every = w, every
        self.points: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            n = self.w.writes(0)
            t1 = time.monotonic()
            if t1 - t0 < 0.002:
                self.points.append(((t0 + t1) / 2, n))
            self.stop.wait(self.every)

    def rates(self, since: float, window: float = 1.0) -> list[tuple[float, float]]:
        """``(t - since, bytes/s over [t - window, t])`` for every sample ``t >= since +
        window``."""
        out, j, pts = [], 0, self.points
        for t, n in pts:
            if t < since + window:
                continue
            while j + 1 < len(pts) and pts[j + 1][0] <= t - window:
                j += 1
            t0, n0 = pts[j]
            if t - t0 >= 0.95 * window:
                out.append((t - since, (n - n0) * PAGE / (t - t0)))
        return out


def hold(kvm: Kvm, mode: str, limit_mib: float, seconds: float) -> dict[str, Any]:
    ring = mode == "ring"
    with Workload(kvm, mem_size=1 << 30, order="sequential",
                  ring_entries=4096 if ring else None) as w, \
            DirtyTracker(w.vm, mode) as t, \
            w.runner(on_ring_full=t.on_ring_full if ring else None) as r, \
            DirtyLimit(t, r) as lim:
        time.sleep(0.3)
        a, t0 = w.writes(0), time.monotonic()
        time.sleep(1.0)
        natural = (w.writes(0) - a) * PAGE / (time.monotonic() - t0)
        limit = min(limit_mib * MiB, 0.8 * natural)
        c = Counter(w)
        c.start()
        try:
            time.sleep(0.1)
            t_set = time.monotonic()
            lim.set(limit)
            time.sleep(seconds + 0.1)
        finally:
            c.stop.set()
            c.join()
        r.stop()
        rates = c.rates(t_set)
    tol = band(limit)
    outside = [t for t, x in rates if abs(x - limit) > tol]
    settle = max([t for t in outside if t < seconds], default=1.0)
    steady = [x for t, x in rates if 2.0 <= t <= seconds]
    errors = [(x - limit) / limit for x in steady]
    return {"mode": mode, "limit": limit, "asked": limit_mib * MiB, "natural": natural,
            "settling_s": settle, "mean_error": statistics.mean(errors),
            "max_abs_error": max(abs(e) for e in errors),
            "within_band": sum(abs(x - limit) <= tol for x in steady) / len(steady),
            "series": rates}


def idle_cost(kvm: Kvm, pairs: int, each: float) -> dict[str, Any]:
    # 64 MiB written over and over (after a warm-up that touched every page once): the rate
    # of a guest that dirties host memory for the first time is lower, and would drift.
    with Workload(kvm, mem_size=64 << 20, order="sequential", ring_entries=4096) as w, \
            DirtyTracker(w.vm, "ring") as t, w.runner(on_ring_full=t.on_ring_full) as r, \
            DirtyLimit(t, r) as lim:
        while w.writes(0) < 2 * (64 << 20) // PAGE:
            time.sleep(0.1)
        a, t0 = w.writes(0), time.monotonic()
        time.sleep(1.0)
        natural = (w.writes(0) - a) * PAGE / (time.monotonic() - t0)
        ratios, throttled = [], 0.0
        for k in range(pairs):
            got = {}
            for limited in ((False, True) if k % 2 == 0 else (True, False)):  # ABBA
                if limited:
                    lim.set(4 * natural)
                else:
                    lim.cancel()
                time.sleep(0.1)  # the limit's first quantum, not measured
                before = lim.status(0).throttled
                a, t0 = w.writes(0), time.monotonic()
                time.sleep(each)
                got[limited] = (w.writes(0) - a) / (time.monotonic() - t0)
                if limited:
                    throttled += lim.status(0).throttled - before
            ratios.append(got[True] / got[False])
        r.stop()
    return {"natural": natural, "ratios": ratios, "median_ratio": statistics.median(ratios),
            "throttled_s": throttled}


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100, sharey=True)
    for ax, mode in zip(axes, ("ring", "bitmap"), strict=True):
        for row in (r for r in rows if r["mode"] == mode):
            ts = [t for t, _ in row["series"]]
            (line,) = ax.plot(ts, [x / MiB for _, x in row["series"]], lw=1.2,
                              label=f"limit {row['limit'] / MiB:g} MiB/s")
            ax.axhline(row["limit"] / MiB, ls="--", lw=0.8, color=line.get_color())
            ax.fill_between(ts, (row["limit"] - band(row["limit"])) / MiB,
                            (row["limit"] + band(row["limit"])) / MiB,
                            color=line.get_color(), alpha=0.12, lw=0)
        ax.axvline(2.0, color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("seconds after set()")
        ax.set_title(f"{mode} mode: 1 s dirty rate by the guest's counter")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small", loc="upper right")
    axes[0].set_ylabel("MiB/s (band: max(10%, 0.5 MiB/s))")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 s per limit, 4 idle pairs")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    seconds = 4.0 if args.quick else 12.0
    kvm = Kvm()
    rows = []
    print(f"{'mode':6} {'limit':>10} {'natural':>10} {'settled':>8} {'mean err':>9} "
          f"{'max err':>8} {'in band':>8} {'QEMU band':>12}")
    for mode in ("ring", "bitmap"):
        for mib in LIMITS:
            row = hold(kvm, mode, mib, seconds)
            rows.append(row)
            print(f"{mode:6} {row['limit'] / MiB:>6.1f} MiB {row['natural'] / MiB:>6.1f} MiB "
                  f"{row['settling_s']:>7.2f}s {100 * row['mean_error']:>8.2f}% "
                  f"{100 * row['max_abs_error']:>7.2f}% {100 * row['within_band']:>7.1f}% "
                  f"{(row['limit'] + QEMU_TOLERANCE) / MiB:>8.1f} MiB", flush=True)
    idle = idle_cost(kvm, 4 if args.quick else 20, 1.0)
    print(f"idle limit (4x natural {idle['natural'] / MiB:.1f} MiB/s): throughput ratio "
          f"{idle['median_ratio']:.3f} (pairs {', '.join(f'{x:.3f}' for x in idle['ratios'])})"
          f", throttled {idle['throttled_s']:.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "idle": idle}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
