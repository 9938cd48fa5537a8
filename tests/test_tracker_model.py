"""DirtyTracker's lifecycle as a hypothesis state machine on a real guest: start, stop, take,
close and guest writes in any order.  take() must return exactly the pages written since the
previous take, whether or not the worker runs; start/take after close and a second start are
refused; stop is always allowed."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvmio import Hlt, Kvm, KvmStateError
from kvmio.guests.workload import Workload
from kvmio.tracker import DirtyTracker

pytestmark = pytest.mark.kvm
PAGES = 64


class TrackerLife(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.kvm = Kvm()
        self.w = Workload(self.kvm, mem_size=PAGES * 4096, order="sequential", value="count",
                          ring_entries=4096, max_writes=0)
        self.w.vm.write_memory(self.w.params_addr(0) + 80, (1).to_bytes(8, "little"))
        self.tracker = DirtyTracker(self.w.vm, interval=0.005)
        self.written = 0
        self.since_take: set[int] = set()
        self.running = False
        self.closed = False

    def teardown(self) -> None:
        if not self.closed:
            self.tracker.close()
        self.w.close()
        self.kvm.close()

    @rule(n=st.integers(1, 40))
    def guest_writes(self, n: int) -> None:
        target = self.written + n
        self.w.vm.write_memory(self.w.params_addr(0) + 80, target.to_bytes(8, "little"))
        assert isinstance(self.w.run_vcpu(0, on_ring_full=self.tracker.on_ring_full), Hlt)
        assert self.w.writes(0) == target
        self.since_take |= {k % PAGES for k in range(self.written, target)}
        self.written = target

    @rule()
    def start(self) -> None:
        if self.closed or self.running:
            match = "is closed" if self.closed else "already running"
            with pytest.raises(KvmStateError, match=match):
                self.tracker.start()
        else:
            self.tracker.start()
            self.running = True

    @rule()
    def stop(self) -> None:
        self.tracker.stop()
        self.running = False

    @rule()
    def take(self) -> None:
        if self.closed:
            with pytest.raises(KvmStateError, match="closed"):
                self.tracker.take()
            return
        got = self.tracker.take()
        pages = set()
        for gpa, length in got:
            first = (gpa - self.w.mem_base) // 4096
            pages |= set(range(first, first + length // 4096))
        assert pages == self.since_take
        self.since_take = set()

    @rule()
    def close(self) -> None:
        self.tracker.close()
        self.closed, self.running = True, False

    @invariant()
    def state(self) -> None:
        assert self.tracker.running == self.running
        assert self.tracker.error is None


TrackerLife.TestCase.settings = settings(max_examples=25, stateful_step_count=12,
                                         deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
test_tracker_life = TrackerLife.TestCase
