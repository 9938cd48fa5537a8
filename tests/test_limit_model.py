"""The dirty-rate limit's accounting (one vCPU's budget in kvmio.limit) as a state machine on a
simulated clock, driven by hypothesis: a vCPU whose true dirtying speed changes, tracker
passes at a fixed interval that report what it really dirtied, slices that overrun their bound
(a late timer), idle periods, limits set, changed and cancelled.

Properties: a wait is finite and positive, a slice lies within [MIN_SLICE, MAX_SLICE]; the
pages confirmed are exactly the pages the passes reported; and from the moment a limit is set,
what the vCPU really dirtied never exceeds the limit's budget by more than the bucket's size,
one overrun slice and one pass interval of estimation error; while its speed stays the same
and it never idles, it is never held more than a bounded amount under the limit either.
No KVM needed: the accounting takes the time as an argument.
"""

from __future__ import annotations

import math

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvmio.limit import BURST, MAX_DEBT, MAX_SLICE, MIN_SLICE, QUANTUM, _Account

PASS = 0.05  # the tracker's interval
LATE = 0.003  # the most a slice overruns its bound


class Budget(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.t = 100.0
        self.acc = _Account(self.t, 1.0)
        self.speed = 20_000.0  # true pages per second of run time
        self.entry = 0.0  # true pages dirtied at once when a run starts (not per second)
        self.max_speed = self.speed
        self.admits = 0  # admit() calls since the limit was set
        self.woke: tuple[float, float] | None = None  # (time, total) when an idle ended
        self.carried = 0.0
        self.next_pass = self.t + PASS
        self.pending = 0.0  # dirtied since the last pass
        self.total = 0.0  # dirtied in all
        self.reported = 0.0  # what the passes reported after the first (the baseline)
        self.first_pass = True
        self.limit: float | None = None
        self.since: tuple[float, float] | None = None  # (time, total) when the limit was set
        self.steady = True  # same speed and no idle since the limit was set

    # -- the simulated vCPU and tracker ----------------------------------------------------

    def _pass(self) -> bool:
        kick = self.acc.on_pass(self.t, self.pending)
        if not self.first_pass:
            self.reported += self.pending
        self.first_pass = False
        self.pending = 0.0
        self.next_pass += PASS
        return kick

    def _advance(self, dt: float, running: bool) -> None:
        """Let ``dt`` seconds pass (passes included); a pass that says the vCPU must be
        kicked ends a run there."""
        end = self.t + dt
        while self.next_pass <= end:
            d = self.next_pass - self.t
            if running:
                self.pending += self.speed * d
                self.total += self.speed * d
            self.t = self.next_pass
            if self._pass() and running:
                return
        if running:
            self.pending += self.speed * (end - self.t)
            self.total += self.speed * (end - self.t)
        self.t = end

    def _step(self, late: float) -> None:
        wait, slice_ = self.acc.admit(self.t)
        self.admits += 1
        if wait > 0:
            assert math.isfinite(wait), wait
            assert slice_ is None
            # The runner waits for the budget or until a pass wakes it.
            self._advance(min(wait, self.next_pass - self.t), running=False)
            return
        if self.acc.limit is None:
            assert slice_ is None
            length = 0.03
        else:
            assert slice_ is not None and MIN_SLICE <= slice_ <= MAX_SLICE, slice_
            length = slice_ + late
        # Some guests dirty pages as soon as they re-enter: not in proportion to run time, so
        # the speed estimate is wrong for short slices and only the passes' counts are right.
        self.pending += self.entry
        self.total += self.entry
        self._advance(length, running=True)
        self.acc.ran(self.t)

    # -- rules ---------------------------------------------------------------------------

    @initialize(entry=st.sampled_from([0.0, 20.0]))
    def learn(self, entry: float) -> None:
        # Learnt on long runs: with pages dirtied at each entry, the speed learnt is then too
        # low for the short slices of a low limit, until the passes correct it.
        self.entry = entry
        for _ in range(20):  # 0.6 s unlimited: the speed is learnt
            self._step(0.0)
        assert self.acc.speed() is not None

    @rule(late=st.floats(0, LATE), n=st.integers(1, 200))
    def run(self, late: float, n: int) -> None:
        for _ in range(n):
            self._step(late)

    @rule(pages_per_second=st.floats(5.0, 20_000.0))
    def set_limit(self, pages_per_second: float) -> None:
        # Changing a limit keeps the budget left (at most the old bucket), and the pages of
        # the runs since the last pass count from the old limit's time.
        self.carried = max(0.0, self.acc.credit) + self.pending
        self.acc.set_limit(self.t, pages_per_second)
        self.limit = pages_per_second
        self.since = (self.t, self.total)
        self.steady = self.entry == 0
        self.admits = 0

    @rule()
    def cancel(self) -> None:
        self.acc.set_limit(self.t, None)
        self.limit = None
        self.since = None

    @rule(speed=st.floats(0.0, 50_000.0), entry=st.sampled_from([0.0, 0.0, 2.0, 20.0]))
    def change_speed(self, speed: float, entry: float) -> None:
        self.speed = speed
        self.entry = entry
        self.max_speed = max(self.max_speed, speed)
        self.steady = False

    @rule(seconds=st.floats(0.001, 2.0))
    def idle(self, seconds: float) -> None:
        """The vCPU is not run (its thread busy elsewhere, or the guest halted)."""
        self._advance(seconds, running=False)
        self.steady = False
        self.woke = (self.t, self.total - self.pending)

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def confirmed_is_what_the_passes_reported(self) -> None:
        assert math.isclose(self.acc.confirmed, self.reported, rel_tol=1e-9, abs_tol=1e-6)

    @invariant()
    def the_budget_holds(self) -> None:
        """What the passes confirmed since the limit was set stays within the limit's budget
        plus the bucket and one slice's overrun at the estimated speed: the estimates of the
        runs since the last pass may be wrong (they are replaced at the pass), the confirmed
        pages may not exceed the budget."""
        if self.limit is None or self.since is None:
            return
        t0, total0 = self.since
        confirmed = self.total - total0 - self.pending  # what the passes have reported
        est = self.acc.speed() or 0.0
        self.max_est = max(getattr(self, "max_est", 0.0), est)
        lim = self.limit
        cap = max(lim * BURST, 2 * max(self.max_est * MIN_SLICE, lim * QUANTUM, 1.0))
        # One slice sized on a speed estimate that is too low (the guest just sped up)
        # overshoots, at most by a longest slice at the true speed; the next pass turns the
        # overshoot into debt, which the vCPU pays by waiting.
        over = cap + self.max_speed * (MAX_SLICE + LATE) + self.max_est * MIN_SLICE \
            + self.entry + 1.0
        # (Debt beyond MAX_DEBT seconds of the limit is forgiven, by design, and counted.)
        over += self.acc.forgiven
        assert confirmed <= lim * (self.t - t0) + over + self.carried, (
            confirmed, lim * (self.t - t0), over, self.carried)
        # And from the end of the last idle period: a vCPU that was not run does not save up
        # more than the bucket for a burst after it.
        if self.woke is not None and self.woke[0] >= t0:
            tw, total_w = self.woke
            since = self.total - total_w - self.pending
            assert since <= lim * (self.t - tw) + 2 * over + self.carried, (
                since, lim * (self.t - tw), over)

    @invariant()
    def a_throttled_vcpu_wakes_rarely(self) -> None:
        """It waits for a quantum of budget (or a pass) between runs, not for each page."""
        if self.limit is None or self.since is None:
            return
        elapsed = self.t - self.since[0]
        assert self.admits <= elapsed * (2 / QUANTUM + 2 / PASS) + 10, (self.admits, elapsed)

    @invariant()
    def a_steady_vcpu_is_not_starved(self) -> None:
        if self.limit is None or self.since is None or not self.steady:
            return
        t0, total0 = self.since
        elapsed = self.t - t0
        lim = self.limit
        if elapsed < 1.0 or self.speed < 2 * lim:
            return
        dirtied = self.total - total0
        need = max(self.speed * MIN_SLICE, lim * QUANTUM, 1.0)
        under = 2 * need + self.speed * (PASS + MAX_SLICE + LATE) + lim * (PASS + QUANTUM)
        assert dirtied >= lim * elapsed - under, (dirtied, lim * elapsed, under)


TestBudget = Budget.TestCase
TestBudget.settings = settings(max_examples=150, stateful_step_count=25, deadline=None,
                               suppress_health_check=[HealthCheck.too_slow])


def test_a_pass_turns_an_underestimate_into_debt() -> None:
    """The estimate of a run is replaced by what the next pass found: pages the estimate
    missed become debt, which the vCPU pays by waiting (a sped-up guest cannot keep the
    overshoot of its estimated slices)."""
    t = 10.0
    acc = _Account(t, 1.0)
    acc.on_pass(t, 0.0)  # the baseline
    for _ in range(4):  # learn 20,000 pages/s on 40 ms runs
        assert acc.admit(t) == (0.0, None)
        t += 0.04
        acc.ran(t)
        acc.on_pass(t, 800.0)
    assert acc.speed() is not None and abs(acc.speed() - 20_000) < 1  # type: ignore[operator]
    acc.set_limit(t, 1000.0)
    bucket = 1000.0 * BURST
    t += 1.0  # the budget fills: the bucket
    wait, slice_ = acc.admit(t)
    assert wait == 0 and slice_ is not None
    assert abs(slice_ - bucket / 20_000) < 1e-9  # sized for the bucket at the learnt speed
    t += slice_
    acc.ran(t)
    # The guest ran ten times faster than learnt: the pass finds ten buckets' worth.
    acc.on_pass(t, 10 * bucket)
    wait, _ = acc.admit(t)
    # Nine buckets of debt, plus a quantum of budget (20 pages at 1,000 pages/s), at 1,000/s.
    assert abs(wait - (9 * bucket + 20) / 1000) < 0.01, wait


def test_debt_is_capped_so_a_guest_is_never_frozen_long() -> None:
    """A vCPU that learnt it dirties nothing, then dirties a million pages a second for one
    slice: the pass's debt is capped at MAX_DEBT seconds of its limit, the rest forgiven and
    counted, so it waits at most that long (not the minutes the whole debt would take)."""
    t = 10.0
    acc = _Account(t, 1.0)
    acc.on_pass(t, 0.0)
    for _ in range(4):
        acc.admit(t)
        t += 0.04
        acc.ran(t)
        acc.on_pass(t, 0.0)
    assert acc.speed() == 0.0
    acc.set_limit(t, 256.0)
    t += 0.1
    wait, slice_ = acc.admit(t)
    assert wait == 0 and slice_ == MAX_SLICE  # its speed says it dirties nothing
    t += slice_
    acc.ran(t)
    acc.on_pass(t, 50_000.0)
    wait, _ = acc.admit(t)
    # The debt, then the budget of one shortest slice at the speed just learnt.
    assert abs(wait - (MAX_DEBT + acc.need() / 256)) < 1e-6, wait
    assert acc.forgiven > 40_000
