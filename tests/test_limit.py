"""The dirty-rate limit (kvmio.limit.DirtyLimit) on real guests: each vCPU's rate, by the
guest's own write counter, settles at its limit within 2 s and stays there; cancel lifts it at
once; a limit above the natural rate costs nothing; no page is lost while throttled; bad
input is refused.  Also the run loop's pacing: Vcpu.run(max_time=...) and the runner's
throttle hooks.

The guests write one new page per write (sequential order over a working set far larger than
a second of writes), so the guest's counter of writes is its count of distinct dirty pages.
The limits tested must be below the natural rate: on a busy machine the natural rate can fall
under 64 MiB/s, and the highest limit is then set to half the natural rate measured in the
same run (the assertion message says which limit was held).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from kvmio import Interrupted, IoOut, Kvm, KvmInvalidArgumentError, KvmStateError
from kvmio.guests.workload import MEM_BASE, Workload
from kvmio.limit import MAX_SLICE, DirtyLimit
from kvmio.runner import VcpuRunner, run_until_handled
from kvmio.tracker import DirtyTracker, RateSample

from guests import wait_until

MiB = 1 << 20
PAGE = 4096


def _tolerance(limit: float) -> float:
    """The issue's band: within max(10%, 0.5 MiB/s) of the limit."""
    return max(0.1 * limit, 0.5 * MiB)


class Sampler:
    """Reads every vCPU's write counter every ``every`` seconds in a thread; with the runner
    and the limit, also each vCPU thread's CPU time and its time waiting for budget, so that
    a window where the host did not give the vCPU a CPU can be told apart (see
    :meth:`starved`)."""

    def __init__(self, w: Workload, every: float = 0.05, runner: VcpuRunner | None = None,
                 limit: DirtyLimit | None = None):
        self.w = w
        self.points: list[tuple[float, list[int]]] = []
        #: (time, per vCPU: thread CPU seconds + seconds waiting for budget)
        self.busy: list[tuple[float, list[float]]] = []
        self._runner, self._limit = runner, limit
        self._stop = threading.Event()
        self._every = every
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            counts = [self.w.writes(i) for i in range(len(self.w.vcpus))]
            t1 = time.monotonic()
            # A sample whose reading was held up (the thread preempted on a busy host) has no
            # precise time: dropped, rather than counted as a burst and then a dip.
            if t1 - t0 < 0.002:
                self.points.append(((t0 + t1) / 2, counts))
            if self._runner is not None and self._limit is not None:
                self.busy.append((time.monotonic(), self._busy()))
            self._stop.wait(self._every)

    def _busy(self) -> list[float]:
        assert self._runner is not None and self._limit is not None
        out = []
        for vid, th in sorted(self._runner.threads.items()):
            cpu = 0.0
            # Only a live thread's clock (an ended one's pthread id is gone); the sampler
            # stops before the runner does.
            if th.ident is not None and th.is_alive():
                with contextlib.suppress(OSError):
                    cpu = time.clock_gettime(time.pthread_getcpuclockid(th.ident))
            out.append(cpu + self._limit.status(vid).throttled)
        return out

    def starved(self, vcpu: int, t: float, window: float = 1.0) -> float:
        """The share of ``[t - window, t]`` that vCPU ``vcpu``'s thread neither ran nor waited
        for budget: the time it waited for a CPU the host gave to others (0 if unknown)."""
        pts = [(u, b[vcpu]) for u, b in self.busy if t - window <= u <= t]
        if len(pts) < 2 or pts[-1][0] - pts[0][0] < 0.9 * window:
            return 0.0
        (u0, b0), (u1, b1) = pts[0], pts[-1]
        return max(0.0, 1.0 - (b1 - b0) / (u1 - u0))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def rates(self, vcpu: int, start: float, end: float, window: float = 1.0
              ) -> list[tuple[float, float]]:
        """``(t, bytes/s over [t - window, t])`` for the samples with ``start <= t <= end``
        (times relative to the sampler's monotonic clock), by the guest's counter."""
        pts = self.points
        out = []
        j = 0
        for t, ws in pts:
            if not start <= t <= end:
                continue
            while j + 1 < len(pts) and pts[j + 1][0] <= t - window:
                j += 1
            t0, w0 = pts[j]
            if t - t0 < window * 0.95:
                continue
            out.append((t, (ws[vcpu] - w0[vcpu]) * PAGE / (t - t0)))
        return out


def _natural(w: Workload, seconds: float = 1.0) -> list[float]:
    """Each vCPU's unthrottled rate (bytes/s) by its counter, over ``seconds``."""
    a = [w.writes(i) for i in range(len(w.vcpus))]
    t0 = time.monotonic()
    time.sleep(seconds)
    b = [w.writes(i) for i in range(len(w.vcpus))]
    dt = time.monotonic() - t0
    return [(y - x) * PAGE / dt for x, y in zip(a, b, strict=True)]


def _in_band(rate: float, limit: float, starved: float) -> bool:
    """Within the band, or short of it by no more than the share of the window a busy host
    kept the vCPU from a CPU (see :func:`_check_held`)."""
    tol = _tolerance(limit)
    return rate - limit <= tol and limit - rate <= tol + starved * limit


def _check_held(s: Sampler, vcpu: int, limit: float, t_set: float, hold: float) -> None:
    """Every 1 s rate from 2 s after the limit was set until ``hold`` seconds after that is
    within the band.  A limit is an upper bound the vCPU is paced to: a window in which a busy
    host kept it from a CPU for a share of the time (:meth:`Sampler.starved`) may fall short
    of the limit by that share, and no more (nor may any window go above the band)."""
    rates = s.rates(vcpu, t_set + 2.0, t_set + 2.0 + hold)
    assert len(rates) >= hold / 0.5, "too few samples"
    tol = _tolerance(limit)
    bad = [(round(t - t_set, 2), round(r / MiB, 2), round(s.starved(vcpu, t), 3))
           for t, r in rates if not _in_band(r, limit, s.starved(vcpu, t))]
    assert not bad, (f"vCPU {vcpu} limited to {limit / MiB:g} MiB/s left the band "
                     f"(+-{tol / MiB:.2f} MiB/s) at (seconds after set, MiB/s, share starved "
                     f"of a CPU): {bad[:10]}")


def _workload(kvm: Kvm, vcpus: int, ring: bool) -> Workload:
    # 1 GiB per vCPU written in order: ~20 s of writes at the natural rate before a page is
    # written again.
    return Workload(kvm, mem_size=vcpus << 30, vcpus=vcpus, order="sequential", shared=False,
                    ring_entries=4096 if ring else None)


@pytest.mark.timeout(120)
def test_two_vcpus_hold_their_own_limits_then_cancel_restores_the_natural_rate(
        kvm: Kvm) -> None:
    """Ring mode, per vCPU: 1 MiB/s and 4 MiB/s at once, each settled within 2 s and held for
    10 s by the guest's counter (and by the tracker's figure); cancel lifts them at once."""
    limits = [1 * MiB, 4 * MiB]
    with _workload(kvm, 2, ring=True) as w, DirtyTracker(w.vm, "ring") as t, \
            w.runner(on_ring_full=t.on_ring_full) as r, DirtyLimit(t, r) as lim, \
            Sampler(w, runner=r, limit=lim) as s:
        natural = _natural(w)
        assert min(natural) > 2 * max(limits), f"natural rates {natural} too low to limit"
        t_set = time.monotonic()
        for vid, limit in enumerate(limits):
            lim.set(limit, vcpu=vid)
        assert lim.limits == {0: limits[0], 1: limits[1]}
        time.sleep(12.2)
        for vid, limit in enumerate(limits):
            _check_held(s, vid, limit, t_set, 10.0)
            st = lim.status(vid)
            starved = s.starved(vid, time.monotonic())
            assert st.limit == limit
            assert _in_band(st.rate, limit, starved), (st, starved)
            tracked = t.rate().vcpu_pages_per_second[vid] * PAGE
            assert _in_band(tracked, limit, starved), (tracked, starved)
            assert st.throttled > 5.0  # it spent most of the time waiting for its budget
        lim.cancel()
        assert lim.limits == {}
        t_cancel = time.monotonic()
        time.sleep(2.3)
        # Within one period (a slice, MAX_SLICE) of the cancel, the vCPUs run unthrottled: the
        # first second after it is about as fast as the next (both under the same host load;
        # two vCPU threads and two busy processes on two CPUs made one such second 0.73x the
        # next with no limit left, hence 0.6x).
        for vid in range(2):
            first = s.rates(vid, t_cancel + MAX_SLICE + 1.0, math.inf)
            second = s.rates(vid, t_cancel + MAX_SLICE + 2.0, math.inf)
            assert first and second, "no sample after the cancel"
            assert first[0][1] > 0.6 * second[0][1], (first[0], second[0])
            assert first[0][1] > 4 * limits[vid]
            # ... and near the rate it had before any limit (measured under the same load; a
            # cancel that left a limit of a fraction of it in place would fail here).
            assert first[0][1] > 0.6 * natural[vid], (first[0], natural[vid])
        assert not r.errors


@pytest.mark.timeout(120)
def test_high_limits_hold_on_two_vcpus(kvm: Kvm,
                                      record_property: Callable[[str, object], None]) -> None:
    """Ring mode: 16 MiB/s and 64 MiB/s.  64 MiB/s is a limit only on a vCPU faster than it:
    where the machine is too busy for 1.25x that (two CPU hogs beside the suite bring a vCPU
    here to about 66 MiB/s), half the natural rate is held instead; the limit held is
    recorded (``limit_held``, in the JUnit XML) and named by any failure."""
    with _workload(kvm, 2, ring=True) as w, DirtyTracker(w.vm, "ring") as t, \
            w.runner(on_ring_full=t.on_ring_full) as r, DirtyLimit(t, r) as lim, \
            Sampler(w, runner=r, limit=lim) as s:
        natural = _natural(w)
        limits = [16 * MiB, 64 * MiB]
        if natural[1] < 1.25 * limits[1]:
            limits[1] = 0.5 * natural[1]
        record_property("limit_held", f"{limits[1] / MiB:.1f} MiB/s "
                                      f"(natural {natural[1] / MiB:.1f} MiB/s)")
        assert natural[0] > 1.5 * limits[0], f"natural rates {natural} too low to limit"
        t_set = time.monotonic()
        for vid, limit in enumerate(limits):
            lim.set(limit, vcpu=vid)
        time.sleep(12.2)
        for vid, limit in enumerate(limits):
            _check_held(s, vid, limit, t_set, 10.0)
        assert not r.errors


@pytest.mark.timeout(60)
def test_bitmap_mode_holds_the_vms_limit(kvm: Kvm) -> None:
    """Bitmap mode: the kernel does not say which vCPU wrote a page; with one vCPU its share
    is the whole VM's."""
    limit = 4 * MiB
    with _workload(kvm, 1, ring=False) as w, DirtyTracker(w.vm, "bitmap") as t, \
            w.runner() as r, DirtyLimit(t, r) as lim, \
            Sampler(w, runner=r, limit=lim) as s:
        wait_until(lambda: w.writes(0) > 0, what="the guest to write")
        t_set = time.monotonic()
        lim.set(limit)  # every vCPU
        time.sleep(7.2)
        _check_held(s, 0, limit, t_set, 5.0)
        assert _in_band(lim.rate(), limit, s.starved(0, time.monotonic())), lim.rate()
        assert not r.errors


@pytest.mark.timeout(60)
def test_a_limit_above_the_natural_rate_changes_nothing(kvm: Kvm) -> None:
    """Structural: once learnt, a vCPU whose limit is above its speed never waits for budget
    (the throughput cost is measured by bench/limit.py, not here)."""
    with _workload(kvm, 1, ring=True) as w, DirtyTracker(w.vm, "ring") as t, \
            w.runner(on_ring_full=t.on_ring_full) as r, DirtyLimit(t, r) as lim:
        natural = _natural(w)[0]
        lim.set(4 * natural)
        wait_until(lambda: lim.status(0).speed is not None, what="the speed to be learnt")
        time.sleep(0.2)
        before = lim.status(0).throttled
        a = w.writes(0)
        time.sleep(2.0)
        st = lim.status(0)
        assert st.throttled - before < 0.02, st  # no wait for budget at all
        assert (w.writes(0) - a) * PAGE / 2.0 > 0.7 * natural  # and it ran as before
        assert not r.errors


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["ring", "bitmap"])
def test_no_page_is_lost_while_throttled(kvm: Kvm, mode: str) -> None:
    """The tracker's lossless check (every page the guest wrote this iteration is reported,
    no other), with the limit on, a small ring (ring-full exits) and random pages."""
    rng = random.Random(11)
    ring = mode == "ring"
    with Workload(kvm, mem_size=1 << 30, vcpus=2, ring_entries=256 if ring else None) as w, \
            DirtyTracker(w.vm, mode, interval=0.01) as t:  # type: ignore[arg-type]
        for it in range(1, 6):
            w.generation = it
            with w.runner(on_ring_full=t.on_ring_full if ring else None) as r, \
                    DirtyLimit(t, r) as lim:
                lim.set(8 * MiB)
                lim.set(2 * MiB, vcpu=1)
                # A new limit lets the vCPUs run free until their speed is learnt: the writes
                # counted are those made once both were paced.
                wait_until(lambda: (lim.status(0).throttled > 0
                                    and lim.status(1).throttled > 0) or bool(r.errors),
                           what="both vCPUs to be throttled")
                target = w.total_writes() + rng.randint(300, 1500)
                wait_until(lambda: w.total_writes() >= target or bool(r.errors),  # noqa: B023
                           what="writes while throttled")
            assert not r.errors, r.errors
            ranges = t.take()
            reported = np.zeros(w.mem.num_pages, dtype=bool)
            for gpa, length in ranges:
                first = (gpa - MEM_BASE) // PAGE
                reported[first:first + length // PAGE] = True
            words = w.mem.page_words()
            assert (words[reported] == it).all(), f"iteration {it}: stale page reported"
            assert not ((words == it) & ~reported).any(), f"iteration {it}: page missed"


def test_bad_limits_and_misuse_are_refused(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, vcpus=2, ring_entries=256) as w:
        with pytest.raises(KvmStateError, match="needs the DirtyTracker"):
            DirtyLimit(w.vm)  # type: ignore[arg-type]
        t = DirtyTracker(w.vm, "ring")
        lim = DirtyLimit(t)
        with pytest.raises(KvmStateError, match="tracker is not running"):
            lim.set(MiB)
        with t:
            for bad in (0, -1.0, math.nan, math.inf, -math.inf):
                with pytest.raises(KvmInvalidArgumentError, match=r"finite number > 0"):
                    lim.set(bad)
            for wrong in ("1M", None, True, [1]):
                with pytest.raises(KvmInvalidArgumentError, match="must be a number"):
                    lim.set(wrong)  # type: ignore[arg-type]
            with pytest.raises(KvmInvalidArgumentError, match="vCPU 7 does not exist"):
                lim.set(MiB, vcpu=7)
            with pytest.raises(KvmInvalidArgumentError, match="vCPU 7 does not exist"):
                lim.cancel(vcpu=7)
            with pytest.raises(KvmInvalidArgumentError):
                lim.set(MiB, vcpu="0")  # type: ignore[arg-type]
            with pytest.raises(KvmInvalidArgumentError, match="does not exist"):
                lim.status(9)
            lim.set_pages(100, vcpu=1)
            assert lim.limits == {1: 100 * PAGE}
            assert lim.get(0) is None and lim.get(1) == 100 * PAGE
            lim.set(2 * MiB)  # every vCPU: replaces the per-vCPU limit
            assert lim.limits == {0: 2 * MiB, 1: 2 * MiB}
            lim.cancel(vcpu=0)
            assert lim.limits == {1: 2 * MiB}
            runner = w.runner()
            other = DirtyLimit(t, runner)
            with pytest.raises(KvmStateError, match="has a throttle already"):
                DirtyLimit(t, runner)
            assert runner.throttle is other
            other.close()
            assert runner.throttle is None
            lim.close()
            lim.close()  # idempotent
            assert lim.limits == {} and lim.closed
            with pytest.raises(KvmStateError, match="closed"):
                lim.set(MiB)


def test_bounded_run_returns_interrupted_and_the_guest_goes_on(kvm: Kvm) -> None:
    """Vcpu.run(max_time=...): a guest that never exits is brought back by the bound, every
    time, and runs between the bounds."""
    with Workload(kvm, mem_size=16 << 20) as w:
        v = w.vcpus[0]
        for k in range(30):
            before = w.writes(0)
            ex = v.run(max_time=0.002 if k % 2 else 0.0002)
            assert isinstance(ex, Interrupted)
            assert w.writes(0) >= before
        assert w.writes(0) > 0
        for bad in (0, -1, math.nan, math.inf, "1", True, 1e9):
            with pytest.raises(KvmInvalidArgumentError):
                v.run(max_time=bad)  # type: ignore[arg-type]


def test_a_kick_ends_a_bounded_run_early(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20) as w:
        v = w.vcpus[0]
        done = threading.Event()
        result: list[object] = []

        def run() -> None:
            result.append(v.run(max_time=3600.0))
            done.set()

        th = threading.Thread(target=run)
        th.start()
        wait_until(lambda: v.running, what="the vCPU to enter KVM_RUN")
        v.kick()
        assert done.wait(10), "a kick did not end the bounded run"
        th.join()
        assert isinstance(result[0], Interrupted)


class _Recorder:
    """A throttle that admits every run for a fixed slice after a first wait, and records."""

    def __init__(self, wait: float, slice_: float):
        self.wait, self.slice = wait, slice_
        self.blocked = False  # every admit says wait while set
        self.admitted = 0
        self.ended = 0
        self.waits = 0
        self.wakers: list[object] = []
        self.lock = threading.Lock()

    def admit(self, vcpu_id: int) -> tuple[float, float | None]:
        with self.lock:
            if self.waits == 0 or self.blocked:
                self.waits += 1
                return self.wait, None
            self.admitted += 1
            return 0.0, self.slice

    def ran(self, vcpu_id: int) -> None:
        with self.lock:
            self.ended += 1

    def add_waker(self, wake: object) -> None:
        self.wakers.append(wake)

    def remove_waker(self, wake: object) -> None:
        self.wakers.remove(wake)


def test_the_runner_calls_its_throttle_around_every_run(kvm: Kvm) -> None:
    rec = _Recorder(wait=0.01, slice_=0.001)
    with Workload(kvm, mem_size=16 << 20) as w:
        with VcpuRunner(w.vcpus, w.exit_handler(), throttle=rec) as r:
            assert len(rec.wakers) == 1
            wait_until(lambda: rec.admitted > 50, what="slices")
            r.pause()  # a throttled runner still pauses and resumes
            n = w.writes(0)
            assert w.writes(0) == n
            r.resume()
            wait_until(lambda: w.writes(0) > n, what="writes after resume")
        assert rec.ended == rec.admitted  # every admitted run was reported ended
        assert rec.waits == 1
        assert rec.wakers == [] and r.throttle is None  # stop() let go of the throttle
        with pytest.raises(KvmStateError, match=r"needs the method admit\(\)"):
            VcpuRunner(w.vcpus, throttle=object())  # type: ignore[arg-type]


def test_run_until_handled_paces_and_stays_kickable(kvm: Kvm) -> None:
    rec = _Recorder(wait=60.0, slice_=0.001)
    rec.blocked = True
    with Workload(kvm, mem_size=16 << 20) as w:
        v = w.vcpus[0]
        kicker = threading.Timer(0.2, v.kick)  # ends the (endless) wait for budget
        kicker.start()
        t0 = time.monotonic()
        ex = run_until_handled(v, w.exit_handler(), throttle=rec)
        kicker.join()
        assert isinstance(ex, Interrupted)
        assert time.monotonic() - t0 >= 0.15  # it waited until the kick ...
        assert rec.admitted == rec.ended == 0  # ... and never ran
        assert w.writes(0) == 0
        rec.blocked = False
        for _ in range(20):  # then each slice's end returns Interrupted
            assert isinstance(run_until_handled(v, w.exit_handler(), throttle=rec),
                              Interrupted)
        assert rec.admitted == rec.ended >= 20


def test_a_bounded_runs_late_timer_leaves_no_kick_behind(kvm: Kvm) -> None:
    """A guest that exits all the time (OUT in a loop) under bounds of microseconds: the
    bound's timer often fires just as a real exit returns; that is nobody's kick, and the
    next run (unbounded) must not return Interrupted for it."""
    with kvm.create_vm() as vm:
        mem = vm.add_memory_region(0, 1 << 20)
        mem.write(0x1000, bytes([0xE6, 0xE9, 0xEB, 0xFC]))  # out 0xe9, al; jmp back
        v = vm.create_vcpu()
        sregs = v.get_sregs()
        sregs.cs.base = sregs.cs.selector = 0
        v.set_sregs(sregs)
        regs = v.get_regs()
        regs.rip = 0x1000
        v.set_regs(regs)
        outs = interrupted = 0
        end = time.monotonic() + 1.5
        k = 0
        while time.monotonic() < end:
            ex = v.run(max_time=(1e-6, 3e-6, 8e-6, 2e-5)[k % 4])
            k += 1
            if isinstance(ex, IoOut):
                outs += 1
                assert not v.immediate_exit, "a real exit left a kick pending"
                assert isinstance(v.run(), IoOut)  # unbounded: the next OUT, not Interrupted
            else:
                interrupted += 1
        assert outs > 100 and interrupted > 100  # both kinds of ends happened
        v.kick()  # a kick of its own is never lost, bounded run or not
        assert isinstance(v.run(max_time=10.0), Interrupted)


def test_removing_the_throttle_releases_a_waiting_vcpu_at_once(kvm: Kvm) -> None:
    rec = _Recorder(wait=600.0, slice_=0.001)
    rec.blocked = True  # every admit: wait ten minutes
    with Workload(kvm, mem_size=16 << 20) as w, \
            VcpuRunner(w.vcpus, w.exit_handler(), throttle=rec) as r:
        wait_until(lambda: rec.waits >= 1, what="the vCPU to wait for budget")
        time.sleep(0.1)
        assert w.writes(0) == 0
        r.set_throttle(None)
        wait_until(lambda: w.writes(0) > 0, timeout=20, what="the vCPU to run unthrottled")


def test_a_closed_limit_releases_waiting_vcpus_and_new_vcpus_get_the_limit(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=1 << 30, order="sequential", ring_entries=4096) as w, \
            DirtyTracker(w.vm, "ring") as t, w.runner(on_ring_full=t.on_ring_full) as r:
        lim = DirtyLimit(t, r)
        lim.set(np.float64(PAGE))  # one page per second (numpy scalars are numbers too)
        wait_until(lambda: lim.status(0).throttled > 0.2, what="the vCPU to be throttled")
        before = w.writes(0)
        lim.close()
        wait_until(lambda: w.writes(0) > before + 1000, timeout=20,
                   what="the vCPU to run free after close()")
        assert r.throttle is None
    with Workload(kvm, mem_size=16 << 20, ring_entries=4096) as w, \
            DirtyTracker(w.vm, "ring") as t, DirtyLimit(t) as lim:
        lim.set(MiB)
        v = w.vm.create_vcpu(5)
        assert lim.get(v.id) == MiB and lim.limits == {0: MiB, 5: MiB}
        with pytest.raises(KvmInvalidArgumentError, match="does not exist"):
            lim.get(6)
        with Workload(kvm, mem_size=16 << 20) as other, \
                pytest.raises(KvmInvalidArgumentError, match="not a vCPU of the tracker"):
            DirtyLimit(t, other.runner())


def test_pass_listeners_see_each_pass_and_a_failing_one_stops_the_tracker(kvm: Kvm) -> None:
    seen: list[tuple[int, dict[int, int], float]] = []
    with Workload(kvm, mem_size=1 << 30, vcpus=2, shared=False, order="sequential",
                  ring_entries=4096) as w, DirtyTracker(w.vm, "ring") as t:
        r = w.runner(on_ring_full=t.on_ring_full).start()

        def listen(sample: RateSample, harvested_at: float) -> None:
            seen.append((sample.pages, dict(sample.vcpu_pages), harvested_at))

        t.add_pass_listener(listen)
        wait_until(lambda: len(seen) > 5, what="passes")
        t.remove_pass_listener(listen)
        t.remove_pass_listener(listen)  # not an error
        n = len(seen)
        time.sleep(0.2)
        assert len(seen) == n
        busy = [(pages, per) for pages, per, _ in seen if pages]
        assert busy
        for pages, per in busy:  # disjoint working sets: per-vCPU pages add up
            assert set(per) == {0, 1} and sum(per.values()) == pages
        assert all(b >= a for (_, _, a), (_, _, b) in itertools.pairwise(seen))

        def fail(sample: RateSample, harvested_at: float) -> None:
            raise RuntimeError("listener failed")

        with pytest.raises(KvmInvalidArgumentError):
            t.add_pass_listener(42)  # type: ignore[arg-type]
        t.add_pass_listener(fail)
        wait_until(lambda: t.error is not None, what="the listener's error")
        with pytest.raises(RuntimeError, match="listener failed"):
            t.take()
        # (Leaving the block closes the tracker, which raises its error once more.)
        t.remove_pass_listener(fail)
        r.stop(raise_errors=False)  # (a ring-full exit since re-raised the tracker's error)
        with pytest.raises(RuntimeError, match="listener failed"):
            t.close()


def test_a_throttle_that_is_not_one_is_refused(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20) as w:
        for bad in (object(), 5):
            with pytest.raises(KvmStateError, match="needs the method"):
                run_until_handled(w.vcpus[0], throttle=bad)  # type: ignore[arg-type]
