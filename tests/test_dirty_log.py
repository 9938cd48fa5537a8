"""kvmio's port of the kernel's dirty_log_test (tools/testing/selftests/kvm/dirty_log_test.c).

Guest vCPUs write the current iteration number into the first 8 bytes of pseudo-random pages of
a 1 GiB tracked slot.  A collector thread harvests while they run, at random moments, and
whenever a vCPU's (deliberately small) ring fills up; at the end of each iteration the vCPUs are
stopped and the rest is collected.  Then every page is checked: reported dirty => holds the
current iteration; not reported => holds an older one.  kvmio itself checks reset == harvested
on every reset.  The guest's write density (~37 instructions per write) stays well above this
host's overrun threshold (16).

The same verification runs over three collector paths:

- ``raw``: the rings taken by the test, ``DirtyRing.harvest`` (partial, at random limits) and
  ``Vm.reset_dirty_rings``; or ``Vm.get_dirty_log`` (+ ``clear_dirty_log`` under manual
  protect);
- ``collect``: ``Vm.collect_dirty_pages`` (every ring harvested and reset, or every bitmap);
  ring-full exits are served alternately by the vCPU's own ``DirtyRing.drain`` (its entries
  wait in the ring for the next collection) and by waking the collector;
- ``tracker``: a running ``DirtyTracker`` (its worker harvests every 2 ms) with ``take()`` at
  random moments while the vCPUs run and once after they stopped; ring-full exits go to
  ``tracker.on_ring_full``.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from kvmio import Kvm, Vcpu
from kvmio.guests.workload import MEM_SLOT, Workload
from kvmio.tracker import DirtyTracker

from guests import wait_until

ITERATIONS = 50
#: The tracker's worker interval while the vCPUs run: several passes per iteration.
TRACKER_INTERVAL = 0.002
#: Guest writes each iteration waits for (so that every iteration does real work).
MIN_WRITES = 60
#: A worker that never wakes by itself (stop() still ends it at once).
NO_WORKER = 3600.0


@dataclass
class Stats:
    reported: int = 0
    ring_fulls: int = 0
    drains: int = 0  # ring-full exits served by the vCPU's own ring drain
    collections: int = 0
    writes: int = 0
    tracker_passes: int = 0


def dirty_log_test(kvm: Kvm, mode: str, vcpus: int, iterations: int = ITERATIONS,
                   seed: int = 1, collector: str = "raw") -> Stats:
    assert collector in ("raw", "collect", "tracker")
    rng = random.Random(seed)
    ring = mode == "ring"
    w = Workload(kvm, mem_size=1 << 30, vcpus=vcpus, ring_entries=256 if ring else None,
                 manual_protect=mode == "manual", value="generation", order="random",
                 seed=seed * 7919 + 1)
    stats = Stats()
    with w:
        assert w.instructions_per_write >= 24
        vm = w.vm
        rings = [v.take_dirty_ring() for v in w.vcpus] if ring and collector == "raw" else []
        tracker = None
        if collector == "tracker":
            tracker = DirtyTracker(vm, "ring" if ring else "bitmap", interval=TRACKER_INTERVAL)
            tracker.start()
        npages = w.mem.num_pages
        reported = np.zeros(npages, dtype=bool)
        cond = threading.Condition()
        resets = [0]
        wake = threading.Event()
        empty = np.zeros(0, dtype=np.uint64)

        def collect(partial: bool = False, final: bool = False) -> None:
            if collector == "raw" and ring:
                for r in rings:
                    got = r.harvest(limit=rng.randint(1, 256) if partial else None)
                    reported[got.offsets] = True
                vm.reset_dirty_rings()
            elif collector == "raw":
                pages = vm.get_dirty_log(MEM_SLOT)
                if mode == "manual" and len(pages):
                    vm.clear_dirty_log(MEM_SLOT, pages=pages)
                reported[pages] = True
            elif collector == "collect":
                d = vm.collect_dirty_pages(final=final)
                assert set(d.pages) <= {MEM_SLOT} and d.dropped == 0
                reported[d.pages.get(MEM_SLOT, empty)] = True
            else:
                assert tracker is not None
                ranges = tracker.take(final=final)
                assert ranges.wholly_dirty == frozenset()  # no overrun: the guest is lossless
                for gpa, length in ranges:
                    first = (gpa - w.mem.guest_phys_addr) // 4096
                    reported[first:first + length // 4096] = True
            stats.collections += 1
            with cond:
                resets[0] += 1
                cond.notify_all()

        def wait_for_collector() -> None:
            with cond:
                seen = resets[0]
                wake.set()
                if not cond.wait_for(lambda: resets[0] != seen, timeout=10):
                    raise AssertionError("collector did not serve a ring-full exit")

        full_lock = threading.Lock()

        def on_ring_full(vcpu: Vcpu) -> None:
            with full_lock:
                stats.ring_fulls += 1
                drain = collector == "collect" and stats.ring_fulls % 2 == 1
                stats.drains += drain
            if collector == "tracker":
                assert tracker is not None
                tracker.on_ring_full(vcpu)
            elif drain:
                assert vcpu.ring is not None
                vcpu.ring.drain()  # kept by the ring for the next collect_dirty_pages
            else:
                wait_for_collector()

        errors: list[BaseException] = []

        def vcpu_thread(j: int, stop: threading.Event) -> None:
            try:
                w.run_vcpu(j, stop, on_ring_full=on_ring_full if ring else None)
            except BaseException as e:
                errors.append(e)

        try:
            for it in range(1, iterations + 1):
                w.generation = it
                prev_reported = reported.copy()
                reported[:] = False
                stop_vcpus, stop_collector = threading.Event(), threading.Event()
                # Every tenth iteration in ring mode the collector harvests only when a
                # ring-full exit wakes it (the tracker's worker sleeps), and the iteration
                # lasts until one was served: ring-full exits happen by construction, however
                # busy the machine.
                only_on_full = ring and it % 10 == 1
                fulls_before = stats.ring_fulls
                if tracker is not None and ring:
                    interval = NO_WORKER if only_on_full else TRACKER_INTERVAL
                    if tracker.interval != interval:
                        tracker.stop()  # the vCPUs are stopped: restart the worker's clock
                        tracker.interval = interval
                        tracker.start()

                def collector_thread(stop: threading.Event = stop_collector,
                                     only_on_full: bool = only_on_full) -> None:
                    try:
                        while not stop.is_set():
                            wake.wait(None if only_on_full else rng.uniform(0, 0.004))
                            wake.clear()
                            if only_on_full and collector == "tracker":
                                continue  # tracker.on_ring_full harvests in the vCPU thread
                            collect(partial=rng.random() < 0.3)
                    except BaseException as e:
                        errors.append(e)

                threads = [threading.Thread(target=vcpu_thread, args=(j, stop_vcpus))
                           for j in range(vcpus)]
                ct = threading.Thread(target=collector_thread)
                writes_before, collections_before = w.total_writes(), stats.collections
                passes_before = tracker.passes if tracker is not None else 0
                ct.start()
                for t in threads:
                    t.start()
                if only_on_full:
                    wait_until(lambda: stats.ring_fulls > fulls_before or bool(errors),  # noqa: B023
                               what="a ring-full exit")
                else:
                    # Real work by construction, however busy the machine: writes, collections
                    # while the vCPUs run, and a worker pass; then a random moment more (where
                    # the stop falls is part of the test).
                    def worked(w0: int = writes_before, c0: int = collections_before,
                               p0: int = passes_before) -> bool:
                        return bool(errors) or (
                            w.total_writes() >= w0 + MIN_WRITES and stats.collections >= c0 + 3
                            and (tracker is None or tracker.passes > p0))

                    wait_until(worked,
                               what="writes, collections and a worker pass while the vCPUs run")
                    time.sleep(rng.uniform(0, 0.008))  # the random moment, not a synchronisation
                stop_vcpus.set()
                for v in w.vcpus:
                    v.kick()
                for t in threads:
                    t.join(30)
                stop_collector.set()
                wake.set()
                ct.join(30)
                assert not errors, errors
                # Final collection with every vCPU stopped: nothing is in flight any more.
                collect(final=True)
                words = w.mem.page_words()
                current = words == it
                stale = np.flatnonzero(reported & ~current)
                assert len(stale) == 0, (
                    f"iteration {it}: {len(stale)} reported pages are stale: pages {stale[:5]} "
                    f"hold {words[stale[:5]]}, reported last time: {prev_reported[stale[:5]]}")
                missed = np.flatnonzero(current & ~reported)
                assert len(missed) == 0, f"iteration {it}: {len(missed)} written pages not reported"
                assert words.max() <= it
                stats.reported += int(reported.sum())
            if tracker is not None:
                tracker.stop()
                assert tracker.error is None
                stats.tracker_passes = tracker.passes
        finally:
            if tracker is not None:
                tracker.close()
        stats.writes = w.total_writes()
    return stats


def _check_stats(stats: Stats, mode: str) -> None:
    # The test did real work: many writes, many pages, many collections while running.
    assert stats.writes > ITERATIONS * 50
    assert stats.reported > ITERATIONS * 20
    assert stats.collections > ITERATIONS * 2
    if mode == "ring":
        assert stats.ring_fulls > 0  # the small ring really filled up and was served


@pytest.mark.slow
@pytest.mark.parametrize("vcpus", [1, 2])
@pytest.mark.parametrize("mode", ["bitmap", "manual", "ring"])
def test_dirty_log(kvm: Kvm, mode: str, vcpus: int) -> None:
    _check_stats(dirty_log_test(kvm, mode, vcpus, seed=vcpus * 10 + len(mode)), mode)


@pytest.mark.slow
@pytest.mark.parametrize("vcpus", [1, 2])
@pytest.mark.parametrize("mode", ["bitmap", "manual", "ring"])
def test_dirty_log_through_collect_dirty_pages(kvm: Kvm, mode: str, vcpus: int) -> None:
    """The same proof through ``Vm.collect_dirty_pages``; in ring mode some ring-full exits are
    drained by the vCPU itself, and the next collection must report what the drain took."""
    stats = dirty_log_test(kvm, mode, vcpus, seed=vcpus * 10 + len(mode) + 100,
                           collector="collect")
    _check_stats(stats, mode)
    if mode == "ring":
        # Both ways of serving a ring-full exit were used (they alternate).
        assert stats.drains > 0 and stats.ring_fulls - stats.drains > 0


@pytest.mark.slow
@pytest.mark.parametrize("vcpus", [1, 2])
@pytest.mark.parametrize("mode", ["bitmap", "manual", "ring"])
def test_dirty_log_through_a_running_tracker(kvm: Kvm, mode: str, vcpus: int) -> None:
    """The same proof through a ``DirtyTracker`` whose worker harvests while ``take()`` is
    called at random moments; the take after the vCPUs stopped completes each iteration."""
    stats = dirty_log_test(kvm, mode, vcpus, seed=vcpus * 10 + len(mode) + 200,
                           collector="tracker")
    _check_stats(stats, mode)
    # The worker harvested too: more passes than takes and ring-full passes.
    assert stats.tracker_passes > stats.collections + stats.ring_fulls
