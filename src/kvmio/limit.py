"""A dirty-rate limit per vCPU: :class:`DirtyLimit`.

A guest that dirties memory faster than it can be copied never finishes migrating, and a noisy
tenant may need a cap.  :class:`DirtyLimit` holds each vCPU's dirty rate (distinct pages per
second, charged from a :class:`~kvmio.tracker.DirtyTracker`'s passes) at or under a limit, by
pacing the vCPU from kvmio's run loop (a :class:`~kvmio.runner.Throttle` of a
:class:`~kvmio.runner.VcpuRunner`, or of :func:`~kvmio.runner.run_until_handled`): it does not
rely on ring-full exits, which cannot pace a guest on a host that emulates up to 1024
instructions past the ring's soft limit.

How it works, per vCPU (a token bucket whose charges are estimated, then corrected):

- the budget grows at the limit, and keeps at most :data:`BURST` seconds of it unused;
- each KVM_RUN is charged, while it runs, at the vCPU's dirtying speed (pages per second of
  run time, learnt from the tracker's passes); each tracker pass replaces that estimate with
  what the pass really found, so estimation errors do not accumulate;
- before each KVM_RUN the vCPU waits until its budget holds at least :data:`QUANTUM` seconds
  of the limit (or one shortest slice), then runs for as long as the budget covers at its
  speed (between :data:`MIN_SLICE` and :data:`MAX_SLICE`): a timer kicks it out at the end.

What is charged: in ring mode, the distinct pages each pass found in the vCPU's own ring.  In
bitmap mode the kernel does not say which vCPU wrote a page: each pass's distinct pages are
shared out among the vCPUs in proportion to the time each spent inside KVM_RUN during the pass
(exact for one vCPU; for several, a per-vCPU limit holds their shares).  A page written again
in a later pass is charged again (each pass's pages are what a migration must send again).
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from kvmio import _check
from kvmio._abi import PAGE_SIZE
from kvmio.errors import KvmClosedError, KvmInvalidArgumentError, KvmStateError
from kvmio.runner import VcpuRunner
from kvmio.tracker import DirtyTracker, RateSample

__all__ = ["BURST", "MAX_SLICE", "MIN_SLICE", "QUANTUM", "DirtyLimit", "LimitStatus"]

#: The clock (a module attribute, so that the accounting can be tested on a simulated one).
_now = time.monotonic

#: Shortest KVM_RUN slice of a throttled vCPU (seconds).
MIN_SLICE = 0.0002
#: Longest KVM_RUN slice of a vCPU that has a limit (seconds): also how soon a limit set on a
#: running vCPU holds, at worst.
MAX_SLICE = 0.05
#: A throttled vCPU waits until its budget holds this many seconds of its limit before it
#: runs again (fewer, longer waits than one per page).
QUANTUM = 0.02
#: The most unused budget a vCPU keeps, in seconds of its limit (its largest burst).
BURST = 0.05
#: The most debt a vCPU carries, in seconds of its limit: a guest that dirtied far more than
#: its speed estimate said (it sped up within one pass interval) is not frozen for longer
#: (what it dirtied beyond is forgiven, and counted in ``LimitStatus.forgiven``).
MAX_DEBT = 1.0
#: The speed estimate (pages per second of run time) forgets past runs with this time
#: constant, in seconds of run time.
SPEED_MEMORY = 0.02
#: Run time the passes must have measured before the speed estimate is used (seconds).
LEARN_RUN = 0.002


@dataclass(frozen=True)
class LimitStatus:
    """One vCPU under a :class:`DirtyLimit`."""

    vcpu: int
    #: The limit in bytes per second (``None``: none).
    limit: float | None
    #: Bytes charged per second over the limit's window (the tracker's window).
    rate: float
    #: Bytes per second the vCPU dirties while it runs (estimated from the passes; ``None``
    #: until a pass measured it).
    speed: float | None
    #: Seconds the vCPU waited for its budget, in total.
    throttled: float
    #: Seconds the vCPU spent inside KVM_RUN under this limit object, in total.
    run_time: float
    #: Pages charged in total.
    pages: int
    #: Pages dirtied beyond the most debt a vCPU carries (:data:`MAX_DEBT`): not charged.
    forgiven: int = 0


class _Account:
    """One vCPU's budget and what it was charged."""

    def __init__(self, now: float, window: float):
        self.limit: float | None = None  # pages per second
        self.credit = 0.0  # pages the vCPU may still dirty
        self.t_credit = now  # when credit was last brought up to date
        self.charged = 0.0  # estimated pages (est()) already taken from credit
        self.confirmed = 0.0  # pages the passes found
        self.confirmed_run = 0.0  # run time up to the last pass
        self.run_done = 0.0  # run time of the runs that ended
        self.run_started: float | None = None  # the run in progress
        self.bounded = False  # the run in progress has a slice bound
        self.synced = False  # a pass has been seen (the first only sets the baseline)
        self.num = 0.0  # speed estimate: pages ...
        self.den = 0.0  # ... over run seconds
        self.waiting_since: float | None = None
        self.wait_until = 0.0
        self.throttled = 0.0
        self.forgiven = 0.0  # pages of debt beyond MAX_DEBT, not charged
        self.history: collections.deque[tuple[float, float]] = collections.deque()
        self.window = window

    def speed(self) -> float | None:
        return self.num / self.den if self.den >= LEARN_RUN else None

    def run_time(self, now: float) -> float:
        started = self.run_started
        return self.run_done + (now - started if started is not None else 0.0)

    def est(self, now: float) -> float:
        """Pages dirtied so far: what the passes found, plus the runs since the last pass at
        the estimated speed."""
        speed = self.speed() or 0.0
        return self.confirmed + speed * max(0.0, self.run_time(now) - self.confirmed_run)

    def need(self) -> float:
        """Budget a vCPU waits for before it runs (pages): a quantum of its limit, or one
        shortest slice at its speed."""
        assert self.limit is not None
        return max((self.speed() or 0.0) * MIN_SLICE, self.limit * QUANTUM, 1.0)

    def refresh(self, now: float) -> None:
        """Grow the budget up to now and take what was dirtied since the last refresh."""
        used = self.est(now)
        if self.limit is not None and self.speed() is not None:  # (learning: charged nothing)
            cap = max(self.limit * BURST, 2 * self.need())
            self.credit = min(cap, self.credit + self.limit * max(0.0, now - self.t_credit))
            self.charge(used - self.charged)
        self.charged = used
        self.t_credit = now

    def charge(self, pages: float) -> None:
        """Take ``pages`` from the budget, down to the most debt allowed."""
        assert self.limit is not None
        self.credit -= pages
        floor = -self.limit * MAX_DEBT
        if self.credit < floor:
            self.forgiven += floor - self.credit
            self.credit = floor

    def stop_waiting(self, now: float) -> None:
        """Count the wait in progress, if any, as throttled time (up to what it was told)."""
        self.throttled = self.throttled_until(now)
        self.waiting_since = None

    def throttled_until(self, now: float) -> float:
        """Throttled seconds so far, the wait in progress included (up to what it was told:
        a vCPU thread that stopped asking does not count as waiting)."""
        extra = 0.0
        if self.waiting_since is not None:
            extra = max(0.0, min(now, self.wait_until) - self.waiting_since)
        return self.throttled + extra

    def set_limit(self, now: float, pages: float | None) -> bool:
        """Set the limit (pages per second, ``None``: none); returns whether the vCPU is in a
        run without a slice bound, which must be kicked for the limit to hold at once."""
        self.refresh(now)
        if pages is not None and self.limit is None:
            self.credit = 0.0  # a new limit starts with an empty budget
        self.limit = pages
        if pages is None:
            self.credit = 0.0
            self.stop_waiting(now)
        return pages is not None and self.run_started is not None and not self.bounded

    def admit(self, now: float) -> tuple[float, float | None]:
        """:meth:`DirtyLimit.admit` for this vCPU."""
        if self.run_started is not None:  # a run whose end was not reported: end it now
            self.ran(now)
        self.refresh(now)
        if self.limit is None:
            self.run_started, self.bounded = now, False
            return 0.0, None
        speed = self.speed()
        if speed is None:  # learning its speed: it runs, its pages are not charged
            self.run_started, self.bounded = now, True
            return 0.0, MAX_SLICE
        need = self.need()
        self.stop_waiting(now)
        if self.credit < need * (1 - 1e-9):  # (a budget grown to need, up to rounding, is)
            wait = (need - self.credit) / self.limit
            self.waiting_since, self.wait_until = now, now + wait
            return wait, None
        slice_ = self.credit / speed if speed > 0 else MAX_SLICE
        self.run_started, self.bounded = now, True
        return 0.0, min(max(slice_, MIN_SLICE), MAX_SLICE)

    def ran(self, now: float) -> None:
        """The run that :meth:`admit` let start has ended."""
        if self.run_started is not None:
            self.run_done += max(0.0, now - self.run_started)
            self.run_started = None

    def on_pass(self, now: float, found: float) -> bool:
        """A tracker pass found ``found`` pages of this vCPU: replace the estimate for the runs
        it covers with them, and learn the speed.  Returns whether the vCPU just learnt its
        speed inside a (learning) run, which should be kicked so that its limit holds."""
        self.refresh(now)
        before = self.est(now)
        learning = self.speed() is None
        run = self.run_time(now)
        if self.synced:
            self.confirmed += found
            dr = run - self.confirmed_run
            if dr > 0:  # weighted by run time: a short run barely moves it
                keep = math.exp(-dr / SPEED_MEMORY)
                self.num = keep * self.num + found
                self.den = keep * self.den + dr
            self.history.append((now, found))
            self.prune(now)
        self.synced = True  # the first pass only sets the baseline
        self.confirmed_run = run
        after = self.est(now)
        kick = False
        if self.limit is not None and not learning:
            self.charge(after - before)
        elif self.limit is not None and self.speed() is not None:
            self.credit = 0.0  # learnt: limited from now on, starting with no budget
            kick = self.run_started is not None  # in a learning run: end it now
        self.charged = after
        return kick

    def prune(self, now: float) -> None:
        """Forget the passes older than the window."""
        h = self.history
        while h and h[0][0] < now - self.window:
            h.popleft()

    def rate(self, now: float) -> float:
        """Pages charged per second over the window."""
        self.prune(now)
        return sum(n for _, n in self.history) / self.window


class DirtyLimit:
    """Dirty-rate limits per vCPU of a tracked VM, enforced by pacing its vCPUs.

    ``tracker``: the running :class:`~kvmio.tracker.DirtyTracker` of the VM (ring or bitmap
    mode), whose passes say what each vCPU dirtied.  ``runner``: the
    :class:`~kvmio.runner.VcpuRunner` of its vCPUs, which the limit paces (it becomes the
    runner's throttle); or pass the limit as ``throttle=`` to whatever runs the vCPUs (a
    runner's constructor, :func:`~kvmio.runner.run_until_handled`,
    :meth:`kvmio.guests.multiboot.MultibootMachine.run`).  A vCPU that no throttled loop runs
    is not held by its limit.

    Limits are in bytes per second (:meth:`set`) or pages per second (:meth:`set_pages`), for
    one vCPU or all; :meth:`cancel` lifts them, and the vCPUs waiting for budget run at once.
    :meth:`status` and :meth:`rate` say what each vCPU was charged.  :meth:`close` (or
    ``with``) lifts every limit and detaches from the tracker and the runner.

    Thread-safe: the vCPU threads, the tracker's worker and any other thread may use it at
    once.
    """

    def __init__(self, tracker: DirtyTracker, runner: VcpuRunner | None = None):
        if not isinstance(tracker, DirtyTracker):
            raise KvmStateError(
                f"a dirty limit needs the DirtyTracker of the VM (its passes measure what each "
                f"vCPU dirties), not {type(tracker).__name__}: start a DirtyTracker first")
        if runner is not None:
            _check.instance("runner", runner, VcpuRunner)
            mine = tracker.vm.vcpus
            for v in runner.vcpus:
                if mine.get(v.id) is not v:
                    raise KvmInvalidArgumentError(
                        f"the runner's vCPU {v.id} is not a vCPU of the tracker's VM")
        if tracker.error is not None:
            raise KvmStateError(f"the tracker failed: {tracker.error}")
        self._tracker = tracker
        self._vm = tracker.vm
        self._lock = threading.Lock()
        self._accounts: dict[int, _Account] = {}
        self._default: float | None = None  # pages per second, for every vCPU ...
        self._per: dict[int, float | None] = {}  # ... unless set (or cancelled) per vCPU
        self._wakers: list[Callable[[], None]] = []
        self._closed = False
        self._runner: VcpuRunner | None = None
        #: Every change of a limit: ``(time.monotonic(), vCPU or None for all, bytes per
        #: second or None when cancelled)``.
        self.changes: list[tuple[float, int | None, float | None]] = []
        now = _now()
        for vid in self._vm.vcpus:
            self._accounts[vid] = _Account(now, tracker.window)
        tracker.add_pass_listener(self._on_pass)
        if runner is not None:
            try:
                runner.set_throttle(self)
            except BaseException:
                tracker.remove_pass_listener(self._on_pass)
                raise
            self._runner = runner

    def __repr__(self) -> str:
        limits = {v: f"{b / (1 << 20):g} MiB/s" for v, b in self.limits.items()}
        return f"<DirtyLimit {limits or 'none'}{' closed' if self._closed else ''}>"

    # -- limits -----------------------------------------------------------------------------

    def set(self, bytes_per_second: float, vcpu: int | None = None) -> None:
        """Limit ``vcpu`` (every vCPU, also those created later, if ``None``) to
        ``bytes_per_second`` dirty bytes per second; it holds from the vCPU's next slice (a
        running vCPU is kicked).  Raises :class:`KvmInvalidArgumentError` for a limit that is
        not a positive finite number or a vCPU that does not exist, and
        :class:`KvmStateError` when the tracker is not running (nothing would measure the
        rate) or the limit is closed."""
        self._set(_rate("bytes_per_second", bytes_per_second) / PAGE_SIZE, vcpu)

    def set_pages(self, pages_per_second: float, vcpu: int | None = None) -> None:
        """:meth:`set` in pages per second."""
        self._set(_rate("pages_per_second", pages_per_second), vcpu)

    def cancel(self, vcpu: int | None = None) -> None:
        """Lift ``vcpu``'s limit (every limit if ``None``): the vCPU runs unthrottled from now
        on (a vCPU waiting for budget runs at once).  Raises :class:`KvmInvalidArgumentError`
        for a vCPU that does not exist."""
        self._set(None, vcpu)

    def _set(self, pages: float | None, vcpu: int | None) -> None:
        if vcpu is not None:
            vcpu = _check.integer("vcpu", vcpu)
            if vcpu not in self._vm.vcpus:
                raise KvmInvalidArgumentError(
                    f"vCPU {vcpu} does not exist (the VM has {sorted(self._vm.vcpus)})")
        kick = []
        with self._lock:
            if self._closed:
                raise KvmStateError("this dirty limit is closed")
            if pages is not None and not self._tracker.running:
                raise KvmStateError(
                    "the tracker is not running: a dirty limit needs its passes to measure "
                    "what the vCPUs dirty (start it first)")
            now = _now()
            for vid in self._vm.vcpus:
                self._account(vid, now)
            if vcpu is None:
                self._default = pages
                self._per.clear()
            else:
                self._per[vcpu] = pages
            for vid, a in self._accounts.items():
                if a.set_limit(now, self._per.get(vid, self._default)):
                    kick.append(vid)  # running without a slice bound: bound it now
            self.changes.append((now, vcpu, None if pages is None else pages * PAGE_SIZE))
        self._kick(kick)
        self._wake()

    def get(self, vcpu: int) -> float | None:
        """``vcpu``'s limit in bytes per second (``None``: none)."""
        vcpu = _check.integer("vcpu", vcpu)
        if vcpu not in self._vm.vcpus:
            raise KvmInvalidArgumentError(f"vCPU {vcpu} does not exist")
        with self._lock:
            pages = self._per.get(vcpu, self._default) if not self._closed else None
        return None if pages is None else pages * PAGE_SIZE

    @property
    def limits(self) -> dict[int, float]:
        """The limit of every limited vCPU, in bytes per second."""
        with self._lock:
            if self._closed:
                return {}
            out = {}
            for vid in sorted(set(self._vm.vcpus) | set(self._per)):
                pages = self._per.get(vid, self._default)
                if pages is not None:
                    out[vid] = pages * PAGE_SIZE
            return out

    # -- what was measured ------------------------------------------------------------------

    def status(self, vcpu: int) -> LimitStatus:
        """What ``vcpu`` was charged, how long it waited, its limit."""
        vcpu = _check.integer("vcpu", vcpu)
        now = _now()
        with self._lock:
            a = self._accounts.get(vcpu)
            if a is None:
                if vcpu not in self._vm.vcpus:
                    raise KvmInvalidArgumentError(f"vCPU {vcpu} does not exist")
                a = self._account(vcpu, now)
            speed = a.speed()
            return LimitStatus(vcpu, None if a.limit is None else a.limit * PAGE_SIZE,
                               a.rate(now) * PAGE_SIZE,
                               None if speed is None else speed * PAGE_SIZE,
                               a.throttled_until(now), a.run_time(now), round(a.confirmed),
                               round(a.forgiven))

    def rate(self, vcpu: int | None = None) -> float:
        """Bytes per second charged to ``vcpu`` (to all vCPUs if ``None``) over the window
        (the tracker's): distinct pages per pass, summed over the window's passes."""
        now = _now()
        with self._lock:
            if vcpu is None:
                return sum(a.rate(now) for a in self._accounts.values()) * PAGE_SIZE
            vcpu = _check.integer("vcpu", vcpu)
            a = self._accounts.get(vcpu)
            if a is None and vcpu not in self._vm.vcpus:
                raise KvmInvalidArgumentError(f"vCPU {vcpu} does not exist")
            return 0.0 if a is None else a.rate(now) * PAGE_SIZE

    # -- the throttle (called by the run loops) ---------------------------------------------

    def admit(self, vcpu_id: int) -> tuple[float, float | None]:
        """:meth:`kvmio.runner.Throttle.admit`: how long ``vcpu_id`` waits before its next
        run, or how long that run may last."""
        with self._lock:  # (the clock read under the lock: times reach an account in order)
            now = _now()
            return self._account(vcpu_id, now).admit(now)

    def ran(self, vcpu_id: int) -> None:
        """:meth:`kvmio.runner.Throttle.ran`: ``vcpu_id``'s run ended."""
        with self._lock:
            now = _now()
            a = self._accounts.get(vcpu_id)
            if a is not None:
                a.ran(now)

    def add_waker(self, wake: Callable[[], None]) -> None:
        """:meth:`kvmio.runner.Throttle.add_waker`."""
        with self._lock:
            self._wakers.append(wake)

    def remove_waker(self, wake: Callable[[], None]) -> None:
        """:meth:`kvmio.runner.Throttle.remove_waker`."""
        with self._lock, contextlib.suppress(ValueError):
            self._wakers.remove(wake)

    def _wake(self) -> None:
        with self._lock:
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    def _account(self, vid: int, now: float) -> _Account:
        a = self._accounts.get(vid)
        if a is None:
            a = self._accounts[vid] = _Account(now, self._tracker.window)
            a.limit = None if self._closed else self._per.get(vid, self._default)
        return a

    def _on_pass(self, sample: RateSample, harvested_at: float) -> None:
        """The tracker's pass listener: replace the estimated charges with what it found."""
        with self._lock:
            now = _now()
            for vid in sample.vcpu_pages:
                self._account(vid, now)
            learnt: list[int] = []
            runs = {vid: a.run_time(now) - a.confirmed_run for vid, a in self._accounts.items()}
            if self._tracker.mode == "ring":
                found = {vid: float(n) for vid, n in sample.vcpu_pages.items()}
            else:  # the VM's pages, shared out by time inside KVM_RUN
                total = sum(max(0.0, r) for r in runs.values())
                found = {vid: sample.pages * max(0.0, r) / total for vid, r in runs.items()} \
                    if total > 0 else {}
            for vid, a in self._accounts.items():
                if a.on_pass(now, found.get(vid, 0.0)):
                    learnt.append(vid)
        self._kick(learnt)
        self._wake()

    def _kick(self, vids: list[int]) -> None:
        """Kick these vCPUs out of KVM_RUN, so that their next run goes through admit()."""
        for vid in vids:
            v = self._vm.vcpus.get(vid)
            if v is not None:
                with contextlib.suppress(KvmClosedError):
                    v.kick()

    # -- lifetime ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Lift every limit (waiting vCPUs run at once), stop listening to the tracker and
        stop pacing the runner.  Closing again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            now = _now()
            for a in self._accounts.values():
                a.set_limit(now, None)
            self.changes.append((now, None, None))
        self._tracker.remove_pass_listener(self._on_pass)
        runner, self._runner = self._runner, None
        if runner is not None and runner.throttle is self:
            runner.set_throttle(None)
        self._wake()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _rate(name: str, value: object) -> float:
    """A limit: a positive finite real number (numpy scalars too)."""
    try:
        return _check.positive_float(name, value)
    except KvmInvalidArgumentError as e:
        raise KvmInvalidArgumentError(f"{e.message} (cancel() lifts a limit)") from None
