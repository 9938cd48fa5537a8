"""DirtyTracker on real guests: lossless with vCPUs in threads, rates against the guest's own
counters, range coalescing and window counting against simple models, errors, shutdown."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmio import DirtyRingOverrunError, Kvm, KvmInvalidArgumentError, KvmStateError
from kvmio.guests.workload import MEM_BASE, MEM_SLOT, Workload
from kvmio.runner import RingFullHandler
from kvmio.tracker import DirtyRanges, DirtyTracker, WindowCounter, coalesce

from guests import burst, wait_until

#: What a strict tracker raises at the burst guest's overrun (a full ring, or a hole).
OVERRUN = r"dirty ring of vCPU 0 overrun: .* dirty pages may have been lost"
SHORT_RESET = r"KVM_RESET_DIRTY_RINGS reset \d+ entries but \d+ were harvested"


def _ring_full(tracker: DirtyTracker) -> RingFullHandler | None:
    return tracker.on_ring_full if tracker.mode == "ring" else None


@pytest.mark.parametrize("mode", ["ring", "bitmap"])
def test_tracker_never_loses_a_page(kvm: Kvm, mode: str) -> None:
    rng = random.Random(5)
    with Workload(kvm, mem_size=1 << 30, vcpus=2, ring_entries=256 if mode == "ring" else None,
                  manual_protect=mode == "bitmap") as w:
        tracker = DirtyTracker(w.vm, mode=mode, interval=0.003)  # type: ignore[arg-type]
        assert tracker.mode == mode
        with tracker:
            total = 0
            for it in range(1, 21):
                w.generation = it
                with w.runner(on_ring_full=_ring_full(tracker)) as r:
                    # The guests run for a random number of writes (not a random time, which
                    # a busy machine would turn into no writes), and until the tracker has
                    # made a pass while they run.
                    target = w.total_writes() + rng.randint(100, 1500)
                    passes = tracker.passes
                    wait_until(lambda: (w.total_writes() >= target  # noqa: B023
                                        and tracker.passes > passes) or bool(r.errors),  # noqa: B023
                               what="writes and a pass while the guests run")
                assert not r.errors, r.errors
                ranges = tracker.take()
                reported = np.zeros(w.mem.num_pages, dtype=bool)
                for gpa, length in ranges:
                    first = (gpa - MEM_BASE) // 4096
                    reported[first:first + length // 4096] = True
                words = w.mem.page_words()
                assert (words[reported] == it).all(), f"iteration {it}: stale page reported"
                assert not ((words == it) & ~reported).any(), f"iteration {it}: page missed"
                assert ranges.pages == int(reported.sum())
                total += ranges.pages
            assert total > 20 * 50
            assert tracker.passes >= 2 * 20  # one pass while running, one take, per iteration


def _truth(points: list[tuple[float, int]], t: float, window: float) -> float:
    ts = np.array([p[0] for p in points])
    cs = np.array([p[1] for p in points], dtype=np.float64)
    return float(np.interp(t, ts, cs) - np.interp(t - window, ts, cs)) / window


def _sampling_gap(points: list[tuple[float, int]], t: float, window: float) -> float:
    """How far apart the guest-counter samples around ``t - window`` and ``t`` are: the truth
    interpolated between them is uncertain by up to that much time at each end (a busy machine
    delays the sampling thread)."""
    ts = np.array([p[0] for p in points])
    gap = 0.0
    for x in (t - window, t):
        i = int(np.searchsorted(ts, x))
        if 0 < i < len(ts):
            gap += float(ts[i] - ts[i - 1])
    return gap


@pytest.mark.parametrize("mode", ["ring", "bitmap"])
def test_rate_matches_the_guests_own_counters(kvm: Kvm, mode: str) -> None:
    """A sequential writer over 1 GiB never revisits a page within the window, so its true rate
    of distinct pages is its write rate, which it counts itself."""
    with Workload(kvm, mem_size=1 << 30, vcpus=2, shared=False, order="sequential",
                  ring_entries=4096 if mode == "ring" else None) as w:
        tracker = DirtyTracker(w.vm, mode=mode, interval=0.05, window=0.5)  # type: ignore[arg-type]
        points: list[list[tuple[float, int]]] = [[], [], []]
        def sample() -> None:
            t = time.monotonic() - tracker.started_at
            points[0].append((t, w.writes(0)))
            points[1].append((t, w.writes(1)))
            points[2].append((t, w.writes(0) + w.writes(1)))

        with tracker, w.runner(on_ring_full=_ring_full(tracker)) as r:
            t_end = time.monotonic() + 1.6
            while time.monotonic() < t_end:
                sample()
                time.sleep(0.005)  # the sampling period of the guest's counters
            tracker.stop()  # its last pass while the guests still write
            sample()  # the counters cover that pass
            r.stop()
            assert not r.errors
        samples = list(tracker.samples)
        assert samples[-1].time < points[2][-1][0]
        checked = 0
        for s in samples:
            if s.time <= 0.6:
                continue
            # The truth over the span the rate's passes cover (the window, give or take half a
            # pass interval).
            truth = _truth(points[2], s.time, s.span)
            # 5%, plus what the truth's own sampling cannot resolve (~2% on an idle machine).
            rel = 0.05 + _sampling_gap(points[2], s.time, s.span) / s.span
            assert s.pages_per_second == pytest.approx(truth, rel=rel), s
            assert s.bytes_per_second == s.pages_per_second * 4096
            if mode == "ring":
                for i in (0, 1):
                    assert s.vcpu_pages_per_second[i] == pytest.approx(
                        _truth(points[i], s.time, s.span), rel=rel)
            else:
                assert s.vcpu_pages_per_second == {}
            checked += 1
        assert checked >= 5
        # rate() is the last pass's measurement, checked against the counters above.
        rate = tracker.rate()
        assert rate.pages_per_second == samples[-1].pages_per_second
        assert rate.vcpu_pages_per_second == samples[-1].vcpu_pages_per_second
        assert rate.bytes_per_second == samples[-1].pages_per_second * 4096


def test_rate_counts_distinct_pages_not_entries(kvm: Kvm) -> None:
    """A guest hammering 16 pages pushes one ring entry per write; the rate counts 16 pages per
    pass at most, not the entries."""
    with Workload(kvm, mem_size=16 << 20, working_set=16 * 4096, order="sequential",
                  ring_entries=4096) as w:
        tracker = DirtyTracker(w.vm, interval=0.05, window=0.5)
        with tracker, w.runner(on_ring_full=tracker.on_ring_full):
            wait_until(lambda: tracker.passes >= 10, what="ten tracker passes")
        assert tracker.entries > 10 * tracker.passes * 16 / 10
        assert all(s.pages <= 16 for s in tracker.samples)
        assert max(s.entries for s in tracker.samples) > 16


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=200))
def test_coalesce_matches_model(pages: list[int]) -> None:
    first, count = coalesce(pages)
    model: list[tuple[int, int]] = []
    for p in sorted(set(pages)):
        if model and model[-1][0] + model[-1][1] == p:
            model[-1] = (model[-1][0], model[-1][1] + 1)
        else:
            model.append((p, 1))
    assert list(zip(first.tolist(), count.tolist(), strict=True)) == model
    r = DirtyRanges.from_pages({3: np.array(pages, dtype=np.uint64)}, {3: 1 << 20})
    assert r.pages == len(set(pages)) and r.bytes == r.pages * 4096
    assert list(r) == [((1 << 20) + a * 4096, n * 4096) for a, n in model]
    assert len(r) == len(model)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.001, 0.5), st.lists(st.integers(0, 63), max_size=20)),
                min_size=1, max_size=30),
       st.floats(0.05, 2.0))
def test_window_counter_matches_brute_force(passes: list[tuple[float, list[int]]],
                                            window: float) -> None:
    wc = WindowCounter(window)
    t = 0.0
    history: list[tuple[float, float, set[int]]] = []
    for dt, pages in passes:
        start, t = t, t + dt
        uniq = np.unique(np.array(pages, dtype=np.uint64))
        history.append((start, t, set(uniq.tolist())))
        distinct, span = wc.add(start, t, {0: uniq}, {0: 64})
        # The window keeps the newest passes whose span is closest to `window` seconds (the
        # shortest of equally close ones): brute force over every suffix of the history.
        best = min(range(len(history)),
                   key=lambda k: (round(abs(t - history[k][0] - window), 9), -k))
        kept = history[best:]
        assert span == pytest.approx(t - kept[0][0])
        assert distinct == len(set().union(*(h[2] for h in kept)))


def test_worker_error_reaches_the_caller(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=64 << 20, ring_entries=4096, max_writes=100) as w:
        tracker = DirtyTracker(w.vm, interval=0.01, strict=True)
        tracker.start()
        w.run_vcpu(0, on_ring_full=tracker.on_ring_full)  # 100 entries in the ring
        burst(w)
        # The ring found overrun, or (when the busy worker's harvest raced the kernel lapping
        # the ring) a reset that fell short: strict, either is the tracker's error.
        with pytest.raises(DirtyRingOverrunError, match=rf"{OVERRUN}|{SHORT_RESET}"):
            w.run_vcpu(0, on_ring_full=tracker.on_ring_full)
        wait_until(lambda: tracker.error is not None or not tracker.running,
                   what="the worker to stop on the error")
        err = tracker.error
        assert isinstance(err, DirtyRingOverrunError) and err.vcpu in (0, None)
        for call in (tracker.take, tracker.stop, tracker.close):
            with pytest.raises(DirtyRingOverrunError) as e:
                call()
            assert e.value is err


def test_lifecycle_and_bad_arguments(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, ring_entries=4096, max_writes=50,
                  value="count") as w:
        for kw, exc, msg in [
                ({"mode": "disk"}, KvmInvalidArgumentError, "mode must be 'ring', 'bitmap'"),
                ({"interval": 0}, KvmInvalidArgumentError, "interval must be a finite number"),
                ({"window": 0}, KvmInvalidArgumentError, "window must be a finite number"),
                ({"heatmap_bins": 0}, KvmInvalidArgumentError, "heatmap_bins must be >= 1"),
                ({"mode": "bitmap"}, KvmStateError, "bitmap mode is unavailable")]:
            with pytest.raises(exc, match=msg) as e:
                DirtyTracker(w.vm, **kw)  # type: ignore[arg-type]
            assert type(e.value) is exc
        tracker = DirtyTracker(w.vm, interval=0.1)
        assert tracker.mode == "ring" and not tracker.running
        tracker.start()
        assert tracker.running
        with pytest.raises(KvmStateError, match="the tracker is already running"):
            tracker.start()
        with pytest.raises(KvmStateError, match="dirty ring of vCPU 0 was handed to a harvester"):
            _ = w.vcpus[0].dirty_ring
        w.run_vcpu(0)
        t0, p0 = time.monotonic(), tracker.passes
        wait_until(lambda: tracker.passes >= p0 + 3, what="three passes")
        elapsed = time.monotonic() - t0
        # One pass per interval, never more (no busy polling); fewer on a busy machine.
        assert tracker.passes - p0 <= elapsed / tracker.interval + 2
        assert tracker.take().pages == len(np.flatnonzero(w.mem.page_words()))
        assert tracker.take().pages == 0
        threads = {t.name for t in threading.enumerate()}
        assert "kvmio-dirty-tracker" in threads
        tracker.close()
        assert not tracker.running
        assert "kvmio-dirty-tracker" not in {t.name for t in threading.enumerate()}
        _ = w.vcpus[0].dirty_ring  # handed back
        with pytest.raises(KvmStateError, match="this tracker is closed"):
            tracker.start()
        tracker.close()  # idempotent
    with kvm.create_vm() as vm:
        vm.enable_dirty_ring(4096)
        with pytest.raises(KvmStateError, match="create the vCPUs before starting"):
            DirtyTracker(vm).start()
    with kvm.create_vm() as vm, pytest.raises(KvmStateError,
                                              match="ring mode needs the dirty ring enabled"):
        DirtyTracker(vm, mode="ring")


def test_heatmap_shows_where_writes_land(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=64 << 20, working_set=8 << 20, order="sequential",
                  max_writes=2048) as w:
        with DirtyTracker(w.vm, mode="bitmap", interval=0.02, heatmap_bins=8) as tracker:
            w.run_vcpu(0)
            tracker.take()
        times, counts, (lo, hi) = tracker.heatmap()
        assert (lo, hi) == (MEM_BASE, MEM_BASE + (64 << 20))
        assert counts.shape == (len(times), 8)
        per_bin = counts.sum(axis=0)
        assert per_bin[0] == 2048 and per_bin[1:].sum() == 0  # all in the first 8 MiB


def test_take_covers_several_slots(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, max_writes=200, value="count") as w:
        extra = w.vm.add_memory_region(8 << 30, 1 << 20, log_dirty=True)
        with DirtyTracker(w.vm, mode="bitmap", interval=1.0) as tracker:
            w.run_vcpu(0)
            ranges = tracker.take()
        assert set(ranges.slots) == {MEM_SLOT}
        assert extra.slot not in ranges.slots
        assert ranges.slots[MEM_SLOT].pages == len(np.flatnonzero(w.mem.page_words()))


def test_vcpus_created_while_tracking_are_adopted(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, ring_entries=1024, max_writes=100,
                  value="count") as w, DirtyTracker(w.vm, interval=0.02) as tracker:
        late = w.vm.create_vcpu(5)  # after start
        wait_until(lambda: late.ring is not None and late.ring.taken,
                   what="the tracker to adopt the late vCPU's ring")
        with pytest.raises(KvmStateError, match="dirty ring of vCPU 5 was handed to a harvester"):
            _ = late.dirty_ring
        w.run_vcpu(0, on_ring_full=tracker.on_ring_full)
        assert tracker.take().pages == len(np.flatnonzero(w.mem.page_words()))


def test_error_in_a_vcpu_thread_pass_is_recorded(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=64 << 20, ring_entries=256, max_writes=100) as w:
        tracker = DirtyTracker(w.vm, interval=10.0, strict=True)  # the worker sleeps
        tracker.start()
        w.run_vcpu(0, on_ring_full=tracker.on_ring_full)
        burst(w)
        with pytest.raises(DirtyRingOverrunError, match=OVERRUN) as e:
            w.run_vcpu(0, on_ring_full=tracker.on_ring_full)  # the pass runs in this thread
        err = e.value
        assert tracker.error is err
        for call in (tracker.take, tracker.close):
            with pytest.raises(DirtyRingOverrunError) as e:
                call()
            assert e.value is err
        tracker.close()  # once is enough
        with pytest.raises(KvmStateError, match="this tracker is closed"):
            tracker.take()
        # The rings are back with their vCPUs (dirty_ring refuses a ring owned elsewhere),
        # which saw the overrun.
        ring = w.vcpus[0].dirty_ring
        assert not ring.taken and ring.overruns >= 1 and ring.last_overrun is not None


def test_close_hands_collected_pages_to_the_vm(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, ring_entries=1024, max_writes=300,
                  value="count") as w:
        tracker = DirtyTracker(w.vm, interval=0.01).start()
        p0 = tracker.passes
        w.run_vcpu(0, on_ring_full=tracker.on_ring_full)
        # The worker harvests and resets: the pages are then only in the tracker.
        wait_until(lambda: tracker.passes > p0 + 1, what="a pass after the run")
        tracker.close()
        d = w.vm.collect_dirty_pages()
        assert np.array_equal(d.pages[MEM_SLOT], np.flatnonzero(w.mem.page_words()))


def test_a_closed_tracker_never_takes_rings_back(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, ring_entries=256, max_writes=2000,
                  value="count") as w:
        tracker = DirtyTracker(w.vm, interval=5.0).start()
        tracker.close()
        w.run_vcpu(0, on_ring_full=tracker.on_ring_full)  # ring-full exits after the close
        ring = w.vcpus[0].dirty_ring  # still the vCPU's
        assert ring.harvested_total > 0
        d = w.vm.collect_dirty_pages()
        assert np.array_equal(d.pages[MEM_SLOT], np.flatnonzero(w.mem.page_words()))
        DirtyTracker(w.vm).start().close()  # the rings are free for a new tracker


def test_tracker_survives_a_recreated_slot(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, order="sequential", ring_entries=1024,
                  max_writes=600, value="count") as w, DirtyTracker(w.vm, interval=5.0) as tracker:
        w.run_vcpu(0, on_ring_full=tracker.on_ring_full)
        tracker.take()
        w.vm.write_memory(w.params_addr(0) + 80, (900).to_bytes(8, "little"))
        w.run_vcpu(0, on_ring_full=tracker.on_ring_full)  # pages 600..899, not harvested
        w.vm.delete_memory_region(MEM_SLOT)
        w.vm.add_memory_region(MEM_BASE, 700 * 4096, log_dirty=True)
        ranges = tracker.take()  # stale offsets beyond page 700 are dropped, no crash
        assert list(ranges) == [(MEM_BASE + 600 * 4096, 100 * 4096)]
        assert tracker.error is None
