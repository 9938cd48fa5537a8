"""kvmio's port of the kernel's dirty_log_test (tools/testing/selftests/kvm/dirty_log_test.c).

Guest vCPUs write the current iteration number into the first 8 bytes of pseudo-random pages of
a 1 GiB tracked slot.  A collector thread harvests while they run, at random moments, and
whenever a vCPU's (deliberately small) ring fills up; at the end of each iteration the vCPUs are
stopped and the rest is collected.  Then every page is checked: reported dirty => holds the
current iteration; not reported => holds an older one.  kvmio itself checks reset == harvested
on every reset.  The guest's write density (~37 instructions per write) stays well above this
host's overrun threshold (16).
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

from guests import wait_until

ITERATIONS = 50


@dataclass
class Stats:
    reported: int = 0
    ring_fulls: int = 0
    collections: int = 0
    writes: int = 0


def dirty_log_test(kvm: Kvm, mode: str, vcpus: int, iterations: int = ITERATIONS,
                   seed: int = 1) -> Stats:
    rng = random.Random(seed)
    ring = mode == "ring"
    w = Workload(kvm, mem_size=1 << 30, vcpus=vcpus, ring_entries=256 if ring else None,
                 manual_protect=mode == "manual", value="generation", order="random",
                 seed=seed * 7919 + 1)
    stats = Stats()
    with w:
        assert w.instructions_per_write >= 24
        vm = w.vm
        rings = [v.take_dirty_ring() for v in w.vcpus] if ring else []
        npages = w.mem.num_pages
        reported = np.zeros(npages, dtype=bool)
        cond = threading.Condition()
        resets = [0]
        wake = threading.Event()

        def collect(partial: bool = False) -> None:
            if ring:
                for r in rings:
                    got = r.harvest(limit=rng.randint(1, 256) if partial else None)
                    reported[got.offsets] = True
                vm.reset_dirty_rings()
            else:
                pages = vm.get_dirty_log(MEM_SLOT)
                if mode == "manual" and len(pages):
                    vm.clear_dirty_log(MEM_SLOT, pages=pages)
                reported[pages] = True
            stats.collections += 1
            with cond:
                resets[0] += 1
                cond.notify_all()

        def on_ring_full(vcpu: Vcpu) -> None:
            stats.ring_fulls += 1
            with cond:
                seen = resets[0]
                wake.set()
                if not cond.wait_for(lambda: resets[0] != seen, timeout=10):
                    raise AssertionError("collector did not serve a ring-full exit")

        errors: list[BaseException] = []

        def vcpu_thread(j: int, stop: threading.Event) -> None:
            try:
                w.run_vcpu(j, stop, on_ring_full=on_ring_full if ring else None)
            except BaseException as e:
                errors.append(e)

        for it in range(1, iterations + 1):
            w.generation = it
            prev_reported = reported.copy()
            reported[:] = False
            stop_vcpus, stop_collector = threading.Event(), threading.Event()
            # Every tenth iteration in ring mode the collector harvests only when a ring-full
            # exit wakes it, and the iteration lasts until one was served: ring-full exits
            # happen by construction, however busy the machine.
            only_on_full = ring and it % 10 == 1
            fulls_before = stats.ring_fulls

            def collector(stop: threading.Event = stop_collector,
                          only_on_full: bool = only_on_full) -> None:
                try:
                    while not stop.is_set():
                        wake.wait(None if only_on_full else rng.uniform(0, 0.004))
                        wake.clear()
                        collect(partial=rng.random() < 0.3)
                except BaseException as e:
                    errors.append(e)

            threads = [threading.Thread(target=vcpu_thread, args=(j, stop_vcpus))
                       for j in range(vcpus)]
            ct = threading.Thread(target=collector)
            ct.start()
            for t in threads:
                t.start()
            if only_on_full:
                wait_until(lambda: stats.ring_fulls > fulls_before or bool(errors),  # noqa: B023
                           what="a ring-full exit")
            else:
                time.sleep(rng.uniform(0.002, 0.012))  # how long the vCPUs run
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
            collect()
            words = w.mem.page_words()
            current = words == it
            stale = np.flatnonzero(reported & ~current)
            assert len(stale) == 0, (
                f"iteration {it}: {len(stale)} reported pages are stale: pages {stale[:5]} hold "
                f"{words[stale[:5]]}, reported last time: {prev_reported[stale[:5]]}")
            missed = np.flatnonzero(current & ~reported)
            assert len(missed) == 0, f"iteration {it}: {len(missed)} written pages not reported"
            assert words.max() <= it
            stats.reported += int(reported.sum())
        stats.writes = w.total_writes()
    return stats


@pytest.mark.slow
@pytest.mark.parametrize("vcpus", [1, 2])
@pytest.mark.parametrize("mode", ["bitmap", "manual", "ring"])
def test_dirty_log(kvm: Kvm, mode: str, vcpus: int) -> None:
    stats = dirty_log_test(kvm, mode, vcpus, seed=vcpus * 10 + len(mode))
    # The test did real work: many writes, many pages, many collections while running.
    assert stats.writes > ITERATIONS * 50
    assert stats.reported > ITERATIONS * 20
    assert stats.collections > ITERATIONS * 2
    if mode == "ring":
        assert stats.ring_fulls > 0  # the small ring really filled up and was served
