"""The vCPU runner on the real /dev/kvm: threads, ring-full routing, pause/resume/stop."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvmio import (
    DirtyRingError,
    Hlt,
    KvmClosedError,
    KvmInvalidArgumentError,
    KvmStateError,
    Vcpu,
    VcpuExit,
)
from kvmio.guests.workload import MEM_SLOT, Workload
from kvmio.runner import VcpuRunner, run_until_handled
from kvmio.system import Kvm

from guests import wait_until

pytestmark = pytest.mark.kvm


def test_run_all_runs_every_vcpu_to_its_halt(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, vcpus=2, max_writes=500, shared=False) as w:
        exits = w.run_all()
        assert [type(e) for e in exits] == [Hlt, Hlt]
        assert [w.writes(0), w.writes(1)] == [500, 500]  # the guest's own counters


def test_pause_holds_every_vcpu_outside_run_and_resume_continues(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, vcpus=2, shared=False, pace=20) as w:
        with w.runner() as r:
            wait_until(lambda: w.writes(0) > 0 and w.writes(1) > 0, what="both vCPUs to write")
            r.pause()
            assert r.paused
            assert not any(v.running for v in w.vcpus)
            before = [w.writes(0), w.writes(1)]
            # Paused vCPUs make no write: their registers can be read and set safely.
            regs = w.vcpus[0].get_regs()
            w.vcpus[0].set_regs(regs)
            assert [w.writes(0), w.writes(1)] == before
            r.resume()
            wait_until(lambda: w.writes(0) > before[0] and w.writes(1) > before[1],
                       what="both vCPUs to write again")
        assert not r.running  # stop() joined every thread
        assert r.exits == {0: None, 1: None}
        assert r.errors == {}


def test_threads_are_each_vcpus_own_and_report_its_cpu_time(kvm: Kvm) -> None:
    import threading
    import time

    with Workload(kvm, mem_size=16 << 20, vcpus=2, shared=False) as w:
        r = w.runner()
        assert r.threads == {}  # not started
        with r:
            th = r.threads
            assert sorted(th) == [0, 1]
            assert th[0] is not th[1] and all(t.is_alive() for t in th.values())
            # The thread that runs vCPU 0 (it is in KVM_RUN most of the time).
            wait_until(lambda: w.vcpus[0].running_thread == th[0].ident,
                       what="vCPU 0 to run in its thread")
            ident = th[1].ident
            assert ident is not None  # started
            clock = time.pthread_getcpuclockid(ident)
            a = time.clock_gettime(clock)
            wait_until(lambda: time.clock_gettime(clock) > a + 0.05,
                       what="vCPU 1's thread to use CPU time")
            assert threading.current_thread() not in th.values()
        assert not any(t.is_alive() for t in th.values())


def test_ring_full_is_served_for_a_ring_owned_by_a_harvester(kvm: Kvm) -> None:
    """The runner drains the ring of a vCPU whose ring was handed to a harvester; the owner's
    next harvest returns every entry (Vcpu.run_until_exit used to refuse such rings)."""
    with Workload(kvm, mem_size=16 << 20, ring_entries=256, max_writes=3000,
                  order="sequential", value="count") as w:
        ring = w.vcpus[0].take_dirty_ring()
        with w.runner() as r:
            r.wait()
        assert isinstance(r.exits[0], Hlt)
        got = ring.harvest()
        # Sequential writes to distinct pages: one entry per write the guest counted, none lost.
        assert len(got) == w.writes(0) == 3000
        w.vm.reset_dirty_rings()  # checks reset == harvested (drains and the owner's harvest)
        assert np.array_equal(np.unique(got.offsets), np.flatnonzero(w.mem.page_words()))
        ring.release()
        assert w.vm.collect_dirty_pages().count == 0


def test_handler_error_is_reraised_and_other_threads_stopped(kvm: Kvm) -> None:
    class Boom(Exception):
        pass

    def handler(vcpu: Vcpu, ex: VcpuExit) -> bool:
        if vcpu.id == 1:
            raise Boom("from the handler")
        return True

    with Workload(kvm, mem_size=16 << 20, vcpus=2, shared=False, report_every=50) as w:
        r = VcpuRunner(w.vcpus, handler)
        with pytest.raises(Boom, match="from the handler"), r:
            r.wait(60)
        assert not r.running
        assert isinstance(r.errors[1], Boom) and 0 not in r.errors
        r.stop()  # reported once: stopping again does not raise it again


def test_exception_in_the_body_is_not_masked_and_threads_are_joined(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, vcpus=2, shared=False) as w:
        r = w.runner()
        with pytest.raises(KeyboardInterrupt), r:
            wait_until(lambda: w.writes(0) > 0, what="the guest to write")
            raise KeyboardInterrupt  # as Ctrl-C would, while the vCPUs run
        assert not r.running
        assert all(not v.running for v in w.vcpus)


def test_closing_the_vm_under_a_runner_stops_its_threads(kvm: Kvm) -> None:
    w = Workload(kvm, mem_size=16 << 20, vcpus=2, shared=False)
    r = w.runner().start()
    wait_until(lambda: all(v.running for v in w.vcpus) or not r.running, what="vCPUs to run")
    w.close()  # kicks both vCPUs and waits for them to leave KVM_RUN
    with pytest.raises(KvmClosedError, match="this Vcpu is closed"):
        r.wait(60)  # raised as soon as one vCPU thread fails
    r.stop(raise_errors=False)  # joins the other one too
    assert not r.running
    # Each thread met the closed vCPU: as an error, or (once stop() was called) as the stop.
    assert r.errors and all(isinstance(e, KvmClosedError) for e in r.errors.values())


def test_run_until_handled_in_the_calling_thread(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, ring_entries=256, max_writes=1000,
                  value="count") as w:
        ex = run_until_handled(w.vcpus[0], w.exit_handler())
        assert isinstance(ex, Hlt)
        assert w.vm.collect_dirty_pages().count == np.count_nonzero(w.mem.page_words())
        assert w.vm.collect_dirty_pages().pages.get(MEM_SLOT) is None


def test_stuck_ring_full_without_a_harvester_raises(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, ring_entries=256) as w:
        r = VcpuRunner(w.vcpus, w.exit_handler(), on_ring_full=lambda v: None)
        with pytest.raises(DirtyRingError, match="nobody harvests"), r:
            r.wait(120)


def test_bad_arguments(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20) as w:
        with pytest.raises(KvmStateError, match="at least one vCPU"):
            VcpuRunner([])
        with pytest.raises(KvmStateError, match="once only"):
            VcpuRunner([w.vcpus[0], w.vcpus[0]])
        with pytest.raises(KvmInvalidArgumentError, match="vcpus item must be a Vcpu"):
            VcpuRunner([object()])  # type: ignore[list-item]
        with pytest.raises(KvmStateError, match="callable"):
            VcpuRunner(w.vcpus, 3)  # type: ignore[arg-type]
        with pytest.raises(KvmInvalidArgumentError, match="max_stuck"):
            VcpuRunner(w.vcpus, max_stuck=0)
        r = VcpuRunner(w.vcpus)
        with pytest.raises(KvmStateError, match="not started"):
            r.wait()
        with pytest.raises(KvmStateError, match="not started"):
            r.pause()
        with pytest.raises(KvmInvalidArgumentError, match="timeout"):
            r.wait(float("nan"))
        r.stop()  # stopping a runner that never started is harmless
        with pytest.raises(KvmStateError, match="started already"):
            r.start().start()
        r.stop()


class RunnerMachine(RuleBasedStateMachine):
    """pause/resume/stop in any order: paused means no guest progress and no vCPU in
    KVM_RUN; running means progress; after stop no thread is left."""

    def __init__(self) -> None:
        super().__init__()
        self.kvm = Kvm()
        self.w = Workload(self.kvm, mem_size=8 << 20, vcpus=2, shared=False, pace=40)
        self.r = self.w.runner().start()
        self.paused = False
        self.stopped = False

    def teardown(self) -> None:
        self.r.stop()
        assert not self.r.running
        self.w.close()
        self.kvm.close()

    def _writes(self) -> list[int]:
        return [self.w.writes(i) for i in range(2)]

    @precondition(lambda self: not self.stopped)
    @rule()
    def pause(self) -> None:
        self.r.pause(timeout=60)
        self.paused = True
        before = self._writes()
        assert not any(v.running for v in self.w.vcpus)
        assert self._writes() == before

    @precondition(lambda self: not self.stopped)
    @rule()
    def resume(self) -> None:
        before = self._writes()
        self.r.resume()
        self.paused = False
        wait_until(lambda: all(a > b for a, b in zip(self._writes(), before, strict=True)),
                   what="progress after resume")

    @rule()
    def stop(self) -> None:
        self.r.stop()
        self.stopped = True
        assert not self.r.running

    @invariant()
    def threads_alive_unless_stopped(self) -> None:
        assert self.r.running == (not self.stopped)


TestRunnerMachine = RunnerMachine.TestCase
TestRunnerMachine.settings = settings(max_examples=8, stateful_step_count=6, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])
TestRunnerMachine = pytest.mark.kvm(TestRunnerMachine)



def test_stopping_leaves_no_pending_kick(kvm: Kvm) -> None:
    """stop() and pause() kick vCPUs; none of those kicks may stay pending and cut the next
    run() of the same vCPU short."""
    with Workload(kvm, mem_size=16 << 20, vcpus=2, shared=False, pace=20) as w:
        for _ in range(5):
            with w.runner() as r:
                wait_until(lambda: w.writes(0) > 0, what="the guest to write")
                r.pause()
                r.resume()
        assert not any(v.immediate_exit for v in w.vcpus)
        target = w.writes(0) + 50
        w.vm.write_memory(w.params_addr(0) + 80, target.to_bytes(8, "little"))
        assert isinstance(w.run_vcpu(0), Hlt)  # not Interrupted
        assert w.writes(0) == target


def test_stop_or_pause_from_a_handler_is_refused_not_a_deadlock(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=16 << 20, report_every=20) as w:
        box: list[VcpuRunner] = []

        def handler(vcpu: Vcpu, ex: VcpuExit) -> bool:
            box[0].pause()  # would wait for this very thread
            return True

        r = VcpuRunner(w.vcpus, handler)
        box.append(r)
        with pytest.raises(KvmStateError, match="calling vCPU thread itself"), r:
            r.wait(60)
