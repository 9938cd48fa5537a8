"""Dirty-rate measurement of a running guest, and the ring-versus-bitmap collection benchmark.

Used by ``kvmio dirtyrate`` and ``kvmio bench ring-vs-bitmap``; plots are in :mod:`kvmio.plots`.

Ctrl-C (:class:`KeyboardInterrupt`) during a measurement stops the guest, joins every thread and
raises :class:`MeasurementInterrupted`, a :class:`KeyboardInterrupt` that carries the report of
what was measured until then (marked ``interrupted``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kvmio._abi import PAGE_SIZE
from kvmio.errors import KvmError, KvmInvalidArgumentError
from kvmio.exits import Hlt
from kvmio.guests.multiboot import MultibootMachine, MultibootResult, StopReason
from kvmio.guests.workload import Workload
from kvmio.limit import DirtyLimit
from kvmio.system import Kvm
from kvmio.tracker import DirtyTracker, Mode


@dataclass
class DirtyRateReport:
    """A dirty-rate measurement: configuration, the tracker's samples, a heatmap, a summary."""

    config: dict[str, Any]
    samples: list[dict[str, Any]]
    heatmap_times: list[float]
    heatmap_counts: list[list[int]]
    heatmap_span: tuple[int, int]
    duration: float
    tracker_cpu_seconds: float
    guest_writes: int | None = None
    stop: str = ""
    output: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: True if Ctrl-C ended the measurement early: the samples are those taken until then.
    interrupted: bool = False

    @property
    def mean_pages_per_second(self) -> float:
        """Mean of the windowed VM rate over the samples of the second half of the run."""
        rates = [s["pages_per_second"] for s in self.samples
                 if s["time"] >= self.duration / 2]
        return float(np.mean(rates)) if rates else 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        d = asdict(self)
        d["summary"] = {
            "mean_pages_per_second": self.mean_pages_per_second,
            "mean_bytes_per_second": self.mean_pages_per_second * PAGE_SIZE,
            "peak_pages_per_second": max((s["pages_per_second"] for s in self.samples),
                                         default=0.0),
            "samples": len(self.samples),
            "tracker_cpu_fraction": self.tracker_cpu_seconds / self.duration
            if self.duration else 0.0,
        }
        if self.guest_writes is not None and self.duration:
            d["summary"]["guest_writes_per_second"] = self.guest_writes / self.duration
        return d


def _limit_series(limit: DirtyLimit, t0: float, times: list[float],
                  vcpus: list[int]) -> list[dict[str, float]]:
    """The limit of each limited vCPU (bytes/s, keyed by vCPU id as a string) at each of
    ``times`` (seconds since ``t0``), replayed from the limit's changes."""
    out = []
    changes = sorted(limit.changes, key=lambda c: c[0])
    default: float | None = None
    per: dict[int, float | None] = {}
    k = 0
    for t in times:
        while k < len(changes) and changes[k][0] - t0 <= t:
            _, vid, value = changes[k]
            if vid is None:
                default, per = value, {}
            else:
                per[vid] = value
            k += 1
        now = {}
        for v in vcpus:
            value = per.get(v, default)
            if value is not None:
                now[str(v)] = value
        out.append(now)
    return out


def _report(tracker: DirtyTracker, config: dict[str, Any], duration: float,
            limit: DirtyLimit | None = None, **kw: Any) -> DirtyRateReport:
    times, counts, span = tracker.heatmap()
    samples: list[dict[str, Any]] = [{"time": s.time, "pages": s.pages, "entries": s.entries,
                "pages_per_second": s.pages_per_second, "bytes_per_second": s.bytes_per_second,
                "span": s.span,
                "vcpu_pages_per_second": {str(k): v for k, v in s.vcpu_pages_per_second.items()}}
               for s in tracker.samples]
    extra = kw.pop("extra", {})
    if limit is not None:
        vcpus = sorted(tracker.vm.vcpus)
        series = _limit_series(limit, tracker.started_at, [s["time"] for s in samples], vcpus)
        for sample, limits in zip(samples, series, strict=True):
            sample["limit_bytes_per_second"] = limits
        extra["limit"] = {
            "changes": [{"time": t - tracker.started_at, "vcpu": v, "bytes_per_second": b}
                        for t, v, b in limit.changes],
            "vcpus": {str(v): {"limit": st.limit, "throttled_seconds": st.throttled,
                               "run_seconds": st.run_time, "pages_charged": st.pages}
                      for v in vcpus for st in [limit.status(v)]},
        }
    # Ring overruns the tracker survived: when, which vCPU, why (pages were reported whole).
    extra["overruns"] = [{"time": t, "vcpu": v, "why": why}
                         for t, v, why in tracker.overrun_events]
    extra["ring_recoveries"] = tracker.recoveries
    return DirtyRateReport(config, samples, times.tolist(), counts.tolist(), span, duration,
                           tracker.cpu_time, extra=extra, **kw)


class MeasurementInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`measure_workload` or :func:`measure_kernel`.  The guest was stopped
    and every thread joined; :attr:`report` holds what was measured until then (its
    ``interrupted`` is true).  Being a :class:`KeyboardInterrupt`, it ends a program that does
    not catch it as Ctrl-C always did."""

    def __init__(self, report: DirtyRateReport):
        super().__init__("measurement interrupted")
        #: The partial report.
        self.report = report


Progress = Callable[[DirtyTracker, float], None]

#: Longest single run of a kernel under :func:`measure_kernel`: between runs it checks whether
#: Ctrl-C asked it to stop (a run cannot be ended from outside before its timeout).
KERNEL_RUN_SLICE = 0.25

#: How much of a kernel's output :func:`measure_kernel` keeps (the last bytes).
KERNEL_OUTPUT_KEPT = 1 << 20


def _watch(tracker: DirtyTracker, duration: float, progress: Progress | None,
           done: threading.Event, tick: float = 0.25,
           until: Callable[[], bool] | None = None) -> None:
    t0 = time.monotonic()
    while not done.is_set() and not (until is not None and until()):
        elapsed = time.monotonic() - t0
        if elapsed >= duration:
            break
        done.wait(min(tick, duration - elapsed))
        if progress is not None:
            progress(tracker, time.monotonic() - t0)


def _check_limit(limit: float | None, limit_vcpu: int | None, vcpus: int) -> None:
    if limit_vcpu is not None:
        if limit is None:
            raise KvmInvalidArgumentError("limit_vcpu needs a limit")
        if isinstance(limit_vcpu, bool) or not isinstance(limit_vcpu, int) or \
                not 0 <= limit_vcpu < vcpus:
            raise KvmInvalidArgumentError(
                f"limit_vcpu {limit_vcpu!r} does not exist (the guest has {vcpus} vCPU"
                f"{'s' if vcpus > 1 else ''})")


def measure_workload(kvm: Kvm, *, mem: int = 1 << 30, vcpus: int = 1,
                     working_set: int | None = None, order: str = "random", pace: int = 0,
                     mode: Mode = "ring", ring_entries: int = 4096, interval: float = 0.05,
                     window: float = 1.0, duration: float = 3.0, heatmap_bins: int = 128,
                     limit: float | None = None, limit_vcpu: int | None = None,
                     progress: Progress | None = None,
                     on_limit: Callable[[DirtyLimit], None] | None = None) -> DirtyRateReport:
    """Run the built-in dirtier for ``duration`` seconds under a :class:`DirtyTracker`.

    ``limit``: a dirty-rate limit in bytes per second (:class:`~kvmio.limit.DirtyLimit`) for
    vCPU ``limit_vcpu``, or for every vCPU if that is ``None``; the report's samples carry
    the limit in effect (``limit_bytes_per_second``).  ``on_limit(limit)`` is called once the
    limit holds (e.g. to show it live)."""
    if not duration > 0:
        raise KvmInvalidArgumentError("duration must be positive")
    _check_limit(limit, limit_vcpu, vcpus)
    use_ring = mode in ("ring", "auto")
    config = {"guest": "dirtier", "mem": mem, "vcpus": vcpus, "working_set": working_set or mem,
              "order": order, "pace": pace, "mode": "ring" if use_ring else "bitmap",
              "ring_entries": ring_entries if use_ring else None, "interval": interval,
              "window": window, "duration": duration, "limit": limit, "limit_vcpu": limit_vcpu}
    with Workload(kvm, mem_size=mem, vcpus=vcpus, working_set=working_set, order=order,
                  pace=pace, shared=False, ring_entries=ring_entries if use_ring else None) as w:
        tracker = DirtyTracker(w.vm, "ring" if use_ring else "bitmap", interval=interval,
                               window=window, heatmap_bins=heatmap_bins)
        interrupted = False
        limiter: DirtyLimit | None = None
        with tracker, w.runner(on_ring_full=tracker.on_ring_full if use_ring else None) as r:
            if limit is not None:
                limiter = DirtyLimit(tracker, r)
                limiter.set(limit, vcpu=limit_vcpu)
                if on_limit is not None:
                    on_limit(limiter)
            t0 = time.monotonic()
            done = threading.Event()
            try:
                _watch(tracker, duration, progress, done, until=lambda: not r.running)
            except KeyboardInterrupt:
                interrupted = True  # stop as at the end of the duration, and report
            r.stop()  # kick and join every vCPU thread; re-raises a vCPU thread's error
            elapsed = time.monotonic() - t0
        report = _report(tracker, config, elapsed, limiter, guest_writes=w.total_writes(),
                         stop="interrupted" if interrupted else "duration reached",
                         interrupted=interrupted)
        if limiter is not None:
            limiter.close()
    if interrupted:
        raise MeasurementInterrupted(report)
    return report


def measure_kernel(kvm: Kvm, kernel: str, *, mem: int, cmdline: str = "", mode: Mode = "ring",
                   ring_entries: int = 4096, interval: float = 0.05, window: float = 1.0,
                   duration: float = 3.0, heatmap_bins: int = 128,
                   limit: float | None = None,
                   on_output: Callable[[bytes], None] | None = None,
                   progress: Progress | None = None,
                   on_limit: Callable[[DirtyLimit], None] | None = None) -> DirtyRateReport:
    """Run a multiboot kernel for up to ``duration`` seconds under a :class:`DirtyTracker`
    (``limit``: its vCPU's dirty-rate limit in bytes per second, as
    :func:`measure_workload` takes it)."""
    if not duration > 0:
        raise KvmInvalidArgumentError("duration must be positive")
    use_ring = mode in ("ring", "auto")
    config = {"guest": kernel, "mem": mem, "cmdline": cmdline,
              "mode": "ring" if use_ring else "bitmap",
              "ring_entries": ring_entries if use_ring else None, "interval": interval,
              "window": window, "duration": duration, "limit": limit}
    # Guest RAM is dirty-logged from the moment tracking starts, not from boot (as a migration
    # turns logging on when it starts).
    with MultibootMachine(kvm, kernel, mem=mem, cmdline=cmdline, log_dirty=False,
                          ring_entries=ring_entries if use_ring else None) as m:
        tracker = DirtyTracker(m.vm, "ring" if use_ring else "bitmap", interval=interval,
                               window=window, heatmap_bins=heatmap_bins,
                               log_slots=[m.ram.slot])
        done = threading.Event()  # the kernel stopped (or its thread failed)
        stop = threading.Event()  # Ctrl-C: end the run at the end of the current slice
        results: list[MultibootResult] = []
        errors: list[BaseException] = []
        output = bytearray()

        def run() -> None:
            # The kernel runs in slices of at most KERNEL_RUN_SLICE seconds (it resumes where
            # it stopped), so that Ctrl-C in the main thread can end it between two slices.
            try:
                end = time.monotonic() + duration
                while not stop.is_set():
                    left = max(0.0, end - time.monotonic())
                    r = m.run(timeout=min(KERNEL_RUN_SLICE, left), on_output=on_output,
                              on_ring_full=tracker.on_ring_full if use_ring else None,
                              throttle=limiter)
                    results.append(r)
                    output.extend(r.output)
                    del output[:-KERNEL_OUTPUT_KEPT]
                    if r.reason is not StopReason.TIMEOUT or time.monotonic() >= end:
                        break
            except BaseException as e:
                errors.append(e)
            finally:
                done.set()

        interrupted = False
        limiter: DirtyLimit | None = None
        with tracker:
            if limit is not None:
                limiter = DirtyLimit(tracker)  # paces the kernel's run loop (throttle=)
                limiter.set(limit)
                if on_limit is not None:
                    on_limit(limiter)
            t0 = time.monotonic()
            th = threading.Thread(target=run, name="kvmio-dirtyrate-kernel", daemon=True)
            th.start()
            try:
                _watch(tracker, duration + 1.0, progress, done)
            except KeyboardInterrupt:
                interrupted = True
            finally:
                stop.set()
                th.join()
            elapsed = time.monotonic() - t0
        if errors:
            raise errors[0]
        last = results[-1] if results else None
        if interrupted:
            why = "interrupted"
        elif last is not None and last.reason is StopReason.TIMEOUT:
            why = f"timeout ({duration:g} s) after {elapsed:.2f} s"
        else:
            why = last.summary() if last is not None else "not run"
        report = _report(tracker, config, elapsed, limiter, stop=why,
                         output=bytes(output).decode("utf-8", "replace"),
                         interrupted=interrupted)
        if limiter is not None:
            limiter.close()
    if interrupted:
        raise MeasurementInterrupted(report)
    return report


# --------------------------------------------------------------------------------------------
# Ring versus bitmap


@dataclass(frozen=True)
class CollectionCost:
    """One cell of the ring-versus-bitmap benchmark (medians over the repeats)."""

    mode: str
    mem: int
    dirty: int
    seconds: float
    pages_found: int

    @property
    def ns_per_dirty_page(self) -> float:
        """Collection time per dirty page."""
        return self.seconds * 1e9 / max(self.dirty, 1)


def ring_vs_bitmap(kvm: Kvm, mems: list[int], dirty: list[int], *, repeat: int = 3,
                   progress: Callable[[CollectionCost], None] | None = None,
                   ) -> list[CollectionCost]:
    """Time one collection of ``dirty`` distinct pages spread over ``mem`` bytes of sparse
    guest memory, with the ring (harvest + reset, KVM_RESET_DIRTY_RINGS included) and with the
    bitmap (KVM_GET_DIRTY_LOG, which also re-protects, plus decoding)."""
    out = []
    for mem in mems:
        pages = mem // PAGE_SIZE
        for n in dirty:
            if n > pages or n > 65536 - 1024:
                raise KvmInvalidArgumentError(f"{n} dirty pages do not fit {mem} bytes or a ring")
            stride = max(1, pages // n)
            for mode in ("ring", "bitmap"):
                ring = 65536 if mode == "ring" else None
                times = []
                found = 0
                with Workload(kvm, mem_size=mem, order="sequential", stride=stride,
                              value="count", ring_entries=ring) as w:
                    for k in range(1, repeat + 1):
                        w.vm.write_memory(w.params_addr(0) + 80, (n * k).to_bytes(8, "little"))
                        ex = w.run_vcpu(0)
                        if not isinstance(ex, Hlt) or w.writes(0) != n * k:
                            raise KvmError(f"the benchmark guest stopped early ({ex}) after "
                                           f"{w.writes(0)} of {n * k} writes")
                        t0 = time.perf_counter()
                        if mode == "ring":
                            found = w.vm.collect_dirty_pages().count
                        else:
                            found = len(w.vm.get_dirty_log(w.mem.slot))
                        times.append(time.perf_counter() - t0)
                cell = CollectionCost(mode, mem, n, float(np.median(times)), found)
                if progress is not None:
                    progress(cell)
                out.append(cell)
    return out
