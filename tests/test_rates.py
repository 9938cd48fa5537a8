"""The tracker's dirty rate on a saturated working set, on a real guest: every window holds
exactly the working set (distinct pages, not writes), and the passes it counts are the ones
whose span is closest to the window, so the rate is not biased low by a late pass."""

from __future__ import annotations

from kvmio import Kvm
from kvmio.guests.workload import Workload
from kvmio.tracker import DirtyTracker

from guests import wait_until

PAGES = 64
WINDOW = 0.3
INTERVAL = 0.03


def test_a_saturated_working_set_counts_its_pages_over_the_closest_span(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, working_set=PAGES * 4096, order="sequential",
                  ring_entries=4096) as w:
        tracker = DirtyTracker(w.vm, interval=INTERVAL, window=WINDOW)
        with tracker, w.runner(on_ring_full=tracker.on_ring_full):
            # The guest sweeps its 64 pages in well under a millisecond: every pass sees all.
            wait_until(lambda: tracker.passes >= 30, what="thirty tracker passes")
        samples = list(tracker.samples)
    times = [0.0] + [s.time for s in samples]
    checked = 0
    for k, s in enumerate(samples):
        if s.time < 2 * WINDOW:
            continue
        # Distinct pages, not entries: the window holds exactly the working set.
        assert round(s.pages_per_second * s.span) == PAGES, s
        # The closest span: no pass boundary is nearer to `window` seconds back than the one
        # the rate starts at.
        starts = [s.time - t for t in times[:k + 1]]
        assert abs(s.span - WINDOW) <= min(abs(x - WINDOW) for x in starts) + 1e-9, s
        checked += 1
    assert checked >= 10
