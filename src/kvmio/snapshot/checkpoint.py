"""A whole machine in memory, and a reset that restores only what changed: :class:`Checkpoint`.

A checkpoint is the two halves of this package bound together: the machine state
(:mod:`kvmio.snapshot.state`: clock, irqchip, PIT, every vCPU's registers, MSRs, LAPIC...,
and the port devices) and guest memory (:mod:`kvmio.snapshot.memory`: the populated pages,
and the dirty log and host-write records that name what changed since).
:meth:`Checkpoint.reset` puts the machine back exactly, in this order:

1. every vCPU's pending exit is finished (KVM completes an I/O or MMIO exit only at the next
   KVM_RUN, and would otherwise write the old instruction's result after the restore);
2. guest memory: the pages changed since the checkpoint or the last reset (ring, bitmap, or
   a full compare on any doubt: :attr:`ResetReport.path` says which);
3. the machine state, in the order the table in :mod:`kvmio.snapshot.state` documents.

:class:`ResetLoop` runs a vCPU from the checkpoint until an exit (or a time budget), resets,
and runs again, with statistics per reset: what fuzzers and test harnesses do thousands of
times a second.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType

from kvmio import _check
from kvmio.devices.bus import IoBus
from kvmio.errors import KvmClosedError, KvmError, KvmInvalidArgumentError
from kvmio.exits import Interrupted, VcpuExit
from kvmio.runner import ExitHandler, RingFullHandler, run_until_handled, stop_on_any_exit
from kvmio.snapshot.memory import MemoryCheckpoint, ResetPath, ResetStats
from kvmio.snapshot.state import MachineState, Restorer, capture, finish_pending_exits
from kvmio.tracker import DirtyTracker
from kvmio.vcpu import Vcpu
from kvmio.vm import Vm

__all__ = ["Checkpoint", "Iteration", "LoopStats", "ResetLoop", "ResetReport"]


@dataclass(slots=True)
class ResetReport:
    """What one :meth:`Checkpoint.reset` did: the memory part (:class:`ResetStats`) and the
    time of each step, in wall-clock nanoseconds."""

    #: The memory reset: pages restored, the path (``"ring"``, ``"bitmap"`` or ``"full"``),
    #: and why a full one was needed.
    memory: ResetStats
    #: Finishing the vCPUs' pending exits.
    exits_ns: int
    #: Restoring the machine state.
    state_ns: int
    #: The whole reset.
    ns: int

    @property
    def pages(self) -> int:
        """Pages restored."""
        return self.memory.pages

    @property
    def path(self) -> ResetPath:
        """How the memory reset found its pages."""
        return self.memory.path


class Checkpoint:
    """A machine's state and memory at one moment, kept in memory (see the module docs).

    Made by :meth:`take` with every vCPU stopped (outside :meth:`kvmio.Vcpu.run`).  While the
    checkpoint is open it is the VM's dirty-log consumer (or takes pages from ``tracker``):
    see :class:`~kvmio.snapshot.memory.MemoryCheckpoint`.  Close it (or use ``with``) to
    release the log and the copy of memory.
    """

    def __init__(self, vm: Vm, vcpus: tuple[Vcpu, ...], state: MachineState,
                 memory: MemoryCheckpoint, restorer: Restorer,
                 on_reset: Callable[[], None] | None = None):
        self._on_reset = on_reset
        self._vm = vm
        self._vcpus = vcpus
        self.state = state
        self.memory = memory
        self._restorer = restorer
        self._lock = threading.Lock()

    @classmethod
    def take(cls, vm: Vm, vcpus: Iterable[Vcpu] | Mapping[int, Vcpu] | None = None, *,
             devices: IoBus | None = None, tracker: DirtyTracker | None = None,
             on_exit: Callable[[VcpuExit], None] | None = None,
             on_reset: Callable[[], None] | None = None) -> Checkpoint:
        """Checkpoint ``vm`` with ``vcpus`` (default: all of them) and the port ``devices``.

        A vCPU stopped at an exit that KVM has not finished yet (an I/O or MMIO read it
        answered) is first run to the end of that instruction, without running the guest on
        (exits met on the way go to ``on_exit``).  ``on_reset()`` is called at the end of
        every reset: for state of the caller's own that must come back too (a machine's
        Python-side flags, say).  Raises :class:`~kvmio.KvmStateError` if a vCPU is running,
        and :class:`~kvmio.SnapshotError` if a slot is not dirty-logged."""
        _check.instance("vm", vm, Vm)
        targets = tuple(vm.vcpus.values() if vcpus is None else
                        vcpus.values() if isinstance(vcpus, Mapping) else vcpus)
        for v in targets:
            _check.instance("vcpus item", v, Vcpu)
        finish_pending_exits(targets, on_exit=on_exit)
        state = capture(vm, targets, devices=devices)
        restorer = state.restorer(vm, targets, devices=devices)
        memory = MemoryCheckpoint.take(vm, tracker=tracker)
        if on_reset is not None and not callable(on_reset):
            raise KvmInvalidArgumentError("on_reset must be callable")
        return cls(vm, targets, state, memory, restorer, on_reset)

    def __repr__(self) -> str:
        return (f"<Checkpoint vcpus={[v.id for v in self._vcpus]} "
                f"pages={self.memory.stored_pages} {'closed' if self.closed else 'open'}>")

    @property
    def vm(self) -> Vm:
        """The checkpointed VM."""
        return self._vm

    @property
    def vcpus(self) -> tuple[Vcpu, ...]:
        """The checkpointed vCPUs."""
        return self._vcpus

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self.memory.closed

    def reset(self) -> ResetReport:
        """Bring the machine back to the checkpoint: pending exits, memory, state (see the
        module docs).  vCPUs must be stopped: one that a thread runs raises
        :class:`~kvmio.errors.KvmStateError` before memory or state is touched, and every
        vCPU is held outside ``run()`` until the reset ends.  Safe to call again after an
        error (a reset that did not finish makes the next one compare all memory)."""
        with self._lock:
            if self.memory.closed:
                raise KvmClosedError("this checkpoint is closed")
            t0 = time.perf_counter_ns()
            finish_pending_exits(self._vcpus)  # may run them briefly: before the hold
            t1 = time.perf_counter_ns()
            # Held by hand, not through an ExitStack: right after KVM_RUN, where every Python
            # frame is slow, that cost 23 us more per reset here.
            held = []
            try:
                for v in self._vcpus:
                    hold = v.outside_run()
                    hold.__enter__()  # KvmStateError if a thread runs it
                    held.append(hold)
                mem = self.memory.reset()
                t2 = time.perf_counter_ns()
                self._restorer.restore()
                if self._on_reset is not None:
                    self._on_reset()
            finally:
                for hold in reversed(held):
                    hold.__exit__(None, None, None)
            t3 = time.perf_counter_ns()
            return ResetReport(mem, t1 - t0, t3 - t2, t3 - t0)

    def close(self) -> None:
        """Release the dirty log and the copy of memory (idempotent)."""
        with self._lock:
            self.memory.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class Iteration:
    """One run-then-reset of a :class:`ResetLoop`."""

    #: The exit the run ended at (:class:`~kvmio.Interrupted` when the budget ran out).
    exit: VcpuExit
    #: Whether the time budget ended the run.
    timed_out: bool
    #: Wall-clock nanoseconds of the run (guest time, and the exits handled on the way).
    run_ns: int
    #: The reset that followed.
    reset: ResetReport


@dataclass(frozen=True)
class LoopStats:
    """What :meth:`ResetLoop.run` did: every iteration, and summaries of the resets."""

    iterations: list[Iteration] = field(default_factory=list)

    @property
    def resets_per_second(self) -> float:
        """Resets per second of reset time alone (guest time excluded)."""
        total = sum(i.reset.ns for i in self.iterations)
        return len(self.iterations) / (total / 1e9) if total else 0.0

    @property
    def iterations_per_second(self) -> float:
        """Run-and-reset cycles per second of run and reset time."""
        total = sum(i.reset.ns + i.run_ns for i in self.iterations)
        return len(self.iterations) / (total / 1e9) if total else 0.0

    def reset_ns(self, q: float = 0.5) -> float:
        """The ``q`` quantile of the reset times (0.5: the median)."""
        if not self.iterations:
            return 0.0
        values = sorted(i.reset.ns for i in self.iterations)
        if q == 0.5:
            return float(statistics.median(values))
        return float(values[min(len(values) - 1, int(q * len(values)))])

    def paths(self) -> dict[str, int]:
        """How many resets took each path."""
        out: dict[str, int] = {}
        for i in self.iterations:
            out[i.reset.path] = out.get(i.reset.path, 0) + 1
        return out


class _Budget:
    """One thread that kicks the vCPU when a run's time budget is over (a thread per run
    would cost more than a small reset)."""

    def __init__(self, vcpu: Vcpu, seconds: float):
        self.vcpu = vcpu
        self.seconds = seconds
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._closed = False
        self.fired = False
        self._thread = threading.Thread(target=self._watch, name=f"kvmio-budget-{vcpu.id}",
                                        daemon=True)
        self._thread.start()

    def arm(self) -> None:
        with self._cond:
            self.fired = False
            self._deadline = time.monotonic() + self.seconds
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None

    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._deadline = None
                self.fired = True
                try:
                    self.vcpu.kick()
                except KvmError:  # closed: no run left to end
                    return

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()


class ResetLoop:
    """Run ``vcpu`` from ``checkpoint`` until an exit that ``handler`` does not continue
    from (or ``budget`` seconds), reset, and again: a harness's loop.

    ``handler(vcpu, exit) -> run on?`` serves exits (default: every exit ends the run);
    ring-full exits are served as :func:`~kvmio.runner.run_until_handled` does (they go to
    ``on_ring_full``, or the ring is drained for the checkpoint's next reset).  Close it (or
    use ``with``) to stop its budget thread; the checkpoint stays open.
    """

    def __init__(self, checkpoint: Checkpoint, vcpu: Vcpu | None = None, *,
                 handler: ExitHandler = stop_on_any_exit, budget: float | None = None,
                 on_ring_full: RingFullHandler | None = None):
        self.checkpoint = _check.instance("checkpoint", checkpoint, Checkpoint)
        if vcpu is None:
            if len(checkpoint.vcpus) != 1:
                raise KvmInvalidArgumentError(
                    f"the checkpoint has {len(checkpoint.vcpus)} vCPUs: name the one to run")
            vcpu = checkpoint.vcpus[0]
        _check.instance("vcpu", vcpu, Vcpu)
        if vcpu not in checkpoint.vcpus:
            raise KvmInvalidArgumentError(f"vCPU {vcpu.id} is not in the checkpoint")
        if not callable(handler):
            raise KvmInvalidArgumentError("handler must be callable")
        self.vcpu = vcpu
        self.handler = handler
        self.on_ring_full = on_ring_full
        self._budget = (None if budget is None else
                        _Budget(vcpu, _check.positive_float("budget", budget)))

    def run_once(self, prepare: Callable[[Vm], None] | None = None) -> Iteration:
        """``prepare(vm)`` (e.g. write the next input through ``vm.write_memory``, which the
        next reset undoes), run to an exit, reset."""
        if prepare is not None:
            prepare(self.checkpoint.vm)
        budget = self._budget
        t0 = time.perf_counter_ns()
        if budget is not None:
            budget.arm()
        ex: VcpuExit | None = None
        try:
            ex = run_until_handled(self.vcpu, self.handler, on_ring_full=self.on_ring_full)
        finally:
            if budget is not None:
                budget.disarm()
                if budget.fired and not isinstance(ex, Interrupted):
                    # The budget ran out as the run ended at an exit (or failed): its kick
                    # is still pending and would end the next run at once.  Take it back.
                    with contextlib.suppress(KvmClosedError):
                        self.vcpu.immediate_exit = False
        t1 = time.perf_counter_ns()
        timed_out = isinstance(ex, Interrupted) and budget is not None and budget.fired
        assert ex is not None
        return Iteration(ex, timed_out, t1 - t0, self.checkpoint.reset())

    def run(self, iterations: int, prepare: Callable[[Vm, int], None] | None = None
            ) -> LoopStats:
        """:meth:`run_once` ``iterations`` times; ``prepare(vm, i)`` before run ``i``."""
        n = _check.integer("iterations", iterations, lo=0)
        stats = LoopStats()
        for i in range(n):
            if prepare is not None:
                prepare(self.checkpoint.vm, i)
            stats.iterations.append(self.run_once())
        return stats

    def close(self) -> None:
        """Stop the budget thread (idempotent)."""
        if self._budget is not None:
            self._budget.close()
            self._budget = None

    def __enter__(self) -> ResetLoop:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
