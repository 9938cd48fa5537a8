"""Running vCPUs in threads: :class:`VcpuRunner`.

One thread per vCPU runs ``Vcpu.run()`` in a loop and hands every exit to a handler.  The
runner serves what every user of a running VM needs and used to write by hand:

- ring-full exits (KVM_EXIT_DIRTY_RING_FULL) go to ``on_ring_full`` (a tracker's), or else the
  vCPU's own ring is drained (:meth:`kvmio.DirtyRing.drain`: the entries stay with the ring for
  its owner, whoever that is); a vCPU that keeps exiting ring-full with nothing to harvest had
  its ring overrun, which raises :class:`DirtyRingOverrunError` instead of spinning;
- :meth:`VcpuRunner.pause` returns once every vCPU is outside KVM_RUN with its last exit
  handled (what a snapshot or a migration's final pass needs), :meth:`VcpuRunner.resume`
  lets them go on;
- :meth:`VcpuRunner.stop` kicks every vCPU and joins every thread: no thread is ever left
  behind, also when the caller is unwinding from an exception or Ctrl-C (``with`` does it);
- a :class:`Throttle` (e.g. :class:`kvmio.limit.DirtyLimit`) paces the vCPUs from the run
  loop: before each KVM_RUN it says how long the vCPU thread waits first and how long the
  run may last at most (``Vcpu.run(max_time=...)``: a kernel timer ends it), and it is told
  when each run ends.

The handler decides what an exit means: it returns ``True`` to run the vCPU again, ``False`` to
end that vCPU's thread (its exit is kept in :attr:`VcpuRunner.exits`).  An exception in a
handler (or in ``run()``) ends that vCPU's thread, is kept in :attr:`VcpuRunner.errors`, and is
re-raised by :meth:`VcpuRunner.wait` and :meth:`VcpuRunner.stop`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Protocol, Self

from kvmio import _check
from kvmio.errors import (
    DirtyRingError,
    DirtyRingOverrunError,
    KvmClosedError,
    KvmStateError,
)
from kvmio.exits import DirtyRingFull, Interrupted, VcpuExit
from kvmio.vcpu import RING_FULL_STUCK_LIMIT, Vcpu

__all__ = ["ExitHandler", "RingFullHandler", "Throttle", "VcpuRunner", "check_throttle",
           "run_until_handled", "stop_on_any_exit"]

#: ``handler(vcpu, exit) -> run again?``
ExitHandler = Callable[[Vcpu, VcpuExit], bool]
#: ``on_ring_full(vcpu)``: harvest and reset so the vCPU can re-enter.
RingFullHandler = Callable[[Vcpu], None]


def stop_on_any_exit(vcpu: Vcpu, ex: VcpuExit) -> bool:
    """The default handler: every exit the runner does not serve itself ends the vCPU."""
    return False


class Throttle(Protocol):
    """Paces vCPUs from the run loop (:class:`VcpuRunner`, :func:`run_until_handled`).

    The loop calls :meth:`admit` before each KVM_RUN and :meth:`ran` after it; a throttle
    calls the wakers it was given (:meth:`add_waker`) when a waiting vCPU should ask again
    (its budget changed).  Every method is called from vCPU threads and must be thread-safe
    and quick; none may raise for a well-formed call.
    """

    def admit(self, vcpu_id: int) -> tuple[float, float | None]:
        """``(wait, slice)``: ``wait > 0`` means do not run yet, ask again after ``wait``
        seconds (or when woken); ``wait == 0`` means the run starts now and lasts at most
        ``slice`` seconds (``None``: unbounded).  Each admission is followed by one
        :meth:`ran`."""
        ...

    def ran(self, vcpu_id: int) -> None:
        """The run that :meth:`admit` let start has ended (KVM_RUN returned)."""
        ...

    def add_waker(self, wake: Callable[[], None]) -> None:
        """Call ``wake()`` whenever waiting vCPUs should call :meth:`admit` again."""
        ...

    def remove_waker(self, wake: Callable[[], None]) -> None:
        """Stop calling ``wake``."""
        ...




class _State:
    """One vCPU's thread and what it reported."""

    def __init__(self, vcpu: Vcpu):
        self.vcpu = vcpu
        self.thread: threading.Thread | None = None
        self.parked = False
        self.done = False
        self.exit: VcpuExit | None = None
        self.error: BaseException | None = None
        # Ring-full bookkeeping: consecutive ring-full exits that found nothing to harvest.
        self.stuck = 0
        self.last_harvested = -1


def check_throttle(throttle: object) -> None:
    """Raise :class:`KvmStateError` unless ``throttle`` has the :class:`Throttle` methods."""
    for name in ("admit", "ran", "add_waker", "remove_waker"):
        if not callable(getattr(throttle, name, None)):
            raise KvmStateError(f"a throttle needs the method {name}(); "
                                f"{type(throttle).__name__} has none")


class VcpuRunner:
    """Runs ``vcpus``, each in its own thread, until each one's handler ends it or
    :meth:`stop` is called.  Use it as a context manager (``with VcpuRunner(...) as r:``), or
    call :meth:`start` and then :meth:`stop` (or :meth:`close`).

    ``max_stuck``: ring-full exits in a row with nothing to harvest (and no harvest by anyone
    in between) before the ring is declared overrun.  ``throttle``: paces the vCPUs (see
    :class:`Throttle` and :meth:`set_throttle`).
    """

    def __init__(self, vcpus: Sequence[Vcpu], handler: ExitHandler = stop_on_any_exit, *,
                 on_ring_full: RingFullHandler | None = None,
                 max_stuck: int = RING_FULL_STUCK_LIMIT, name: str = "kvmio-vcpu",
                 throttle: Throttle | None = None):
        vcpus = _check.sequence("vcpus", vcpus)
        if not vcpus:
            raise KvmStateError("a runner needs at least one vCPU")
        for v in vcpus:
            _check.instance("vcpus item", v, Vcpu)
        if len({v.id for v in vcpus}) != len(vcpus):
            raise KvmStateError("a vCPU may be given to a runner once only")
        if not callable(handler):
            raise KvmStateError("handler must be callable")
        self._handler = handler
        self._on_ring_full = on_ring_full
        self._max_stuck = _check.integer("max_stuck", max_stuck, lo=1)
        self._name = name
        self._states = {v.id: _State(v) for v in vcpus}
        self._cond = threading.Condition()
        self._pause = False
        self._stop = False
        self._started = False
        self._reported = False
        self._throttle: Throttle | None = None
        self._wakes = 0  # wake-ups for vCPU threads waiting for a throttle's budget
        if throttle is not None:
            self.set_throttle(throttle)

    def __repr__(self) -> str:
        return (f"<VcpuRunner vcpus={sorted(self._states)} "
                f"{'paused' if self._pause else 'stopping' if self._stop else 'running'}>")

    # -- lifetime ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Start one thread per vCPU."""
        with self._cond:
            if self._started:
                raise KvmStateError("this runner was started already")
            self._started = True
            for vid, st in self._states.items():
                st.thread = threading.Thread(target=self._loop, args=(st,),
                                             name=f"{self._name}-{vid}", daemon=True)
        for st in self._states.values():
            assert st.thread is not None
            st.thread.start()
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        if v is None:
            self.stop()
            return
        try:  # the body's exception (Ctrl-C included) is the one to report
            self.stop()
        except Exception as e:
            v.add_note(f"while stopping the vCPUs: {type(e).__name__}: {e}")

    def stop(self, *, raise_errors: bool = True) -> None:
        """Kick every vCPU out of KVM_RUN and join every thread (idempotent), and let go of
        the throttle, if any.  Re-raises the first error a vCPU thread met, unless
        ``raise_errors`` is false."""
        self._check_not_a_vcpu_thread("stop")
        with self._cond:
            self._stop = True
            self._pause = False
            self._cond.notify_all()
        self._kick_all()
        for st in self._states.values():
            t = st.thread
            while t is not None and t.is_alive():
                t.join(0.05)
                if t.is_alive():  # a kick can land before run(): repeat until the thread is out
                    self._kick(st)
        self.set_throttle(None)  # nothing left to pace: the throttle lets go of this runner
        if raise_errors:
            self._raise_first()

    close = stop

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every vCPU thread has ended (each one's handler ended it); returns
        whether they all did within ``timeout`` seconds.  As soon as a vCPU thread fails, its
        error is raised (the other vCPUs go on until :meth:`stop`)."""
        if timeout is not None:
            timeout = _check.positive_float("timeout", timeout, allow_zero=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        for st in self._states.values():
            t = st.thread
            if t is None:
                raise KvmStateError("the runner was not started")
            while t.is_alive():
                self._raise_first()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                t.join(0.1 if left is None else min(0.1, left))  # stays responsive to Ctrl-C
        self._raise_first()
        return True

    def _raise_first(self) -> None:
        """Raise the first vCPU thread's error, once (stop() after a wait() that raised it, or
        a with-block's exit after an explicit stop(), does not raise it again)."""
        if self._reported:
            return
        for st in self._states.values():
            if st.error is not None:
                self._reported = True
                raise st.error

    # -- pacing -----------------------------------------------------------------------------

    @property
    def throttle(self) -> Throttle | None:
        """The :class:`Throttle` pacing the vCPUs, if any."""
        return self._throttle

    def set_throttle(self, throttle: Throttle | None) -> None:
        """Pace the vCPUs with ``throttle`` from their next KVM_RUN on (``None``: stop pacing;
        a vCPU waiting for its budget runs at once).  One throttle at a time: replacing one
        with another raises :class:`KvmStateError` (remove the first with ``None``)."""
        if throttle is not None:
            check_throttle(throttle)
        with self._cond:
            old = self._throttle
            if throttle is not None and old is not None and old is not throttle:
                raise KvmStateError("this runner has a throttle already; remove it first "
                                    "(set_throttle(None))")
            if old is throttle:
                return
            self._throttle = throttle
            self._wakes += 1
            self._cond.notify_all()
        if old is not None:
            old.remove_waker(self._wake)
        if throttle is not None:
            throttle.add_waker(self._wake)
            if self._started and not self._stop:
                self._kick_all()  # runs that began unpaced go through the throttle now

    def _wake(self) -> None:
        with self._cond:
            self._wakes += 1
            self._cond.notify_all()

    def _wait_budget(self, seconds: float, wakes: int, throttle: Throttle) -> None:
        """A throttled vCPU thread waits for its budget: until ``seconds`` pass, the throttle
        wakes it, or a pause or stop needs it.  ``wakes`` is the wake-up count from before the
        throttle was asked: a wake-up since then (or another throttle) means ask again now."""
        with self._cond:
            if not (self._pause or self._stop) and self._wakes == wakes and \
                    self._throttle is throttle:
                self._cond.wait(seconds)

    # -- pause and resume -------------------------------------------------------------------

    def pause(self, timeout: float | None = None) -> None:
        """Return once every vCPU is outside KVM_RUN with its last exit handled (or its thread
        ended).  The vCPUs stay out until :meth:`resume`.  Raises :class:`KvmStateError` if
        they are not all out after ``timeout`` seconds (they are resumed then)."""
        if timeout is not None:
            timeout = _check.positive_float("timeout", timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        self._check_not_a_vcpu_thread("pause")
        with self._cond:
            if not self._started:
                raise KvmStateError("the runner was not started")
            self._pause = True
            self._cond.notify_all()  # vCPU threads waiting for a throttle's budget
        while True:
            self._kick_all()
            with self._cond:
                if all(st.parked or st.done for st in self._states.values()):
                    return
                if deadline is not None and time.monotonic() > deadline:
                    self._pause = False
                    self._cond.notify_all()
                    raise KvmStateError(f"the vCPUs did not pause within {timeout:g} s")
                self._cond.wait(0.05)

    def resume(self) -> None:
        """Let paused vCPUs run again."""
        with self._cond:
            self._pause = False
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        """Whether every vCPU is parked outside KVM_RUN (or ended)."""
        with self._cond:
            return self._pause and all(st.parked or st.done for st in self._states.values())

    # -- what happened ----------------------------------------------------------------------

    @property
    def vcpus(self) -> list[Vcpu]:
        """The vCPUs, in the order given."""
        return [st.vcpu for st in self._states.values()]

    @property
    def threads(self) -> dict[int, threading.Thread]:
        """The thread of each vCPU, by vCPU id (empty before :meth:`start`): e.g. to pin it to
        a CPU (its ``native_id``) or read its CPU time (``time.pthread_getcpuclockid`` of its
        ``ident``)."""
        return {vid: st.thread for vid, st in self._states.items() if st.thread is not None}

    @property
    def running(self) -> bool:
        """Whether any vCPU thread is still alive."""
        return any(st.thread is not None and st.thread.is_alive()
                   for st in self._states.values())

    @property
    def exits(self) -> dict[int, VcpuExit | None]:
        """The exit that ended each vCPU's thread, by vCPU id (``None``: still running, stopped
        by :meth:`stop`, or ended by an error)."""
        return {vid: st.exit for vid, st in self._states.items()}

    @property
    def errors(self) -> dict[int, BaseException]:
        """The error that ended a vCPU's thread, by vCPU id."""
        return {vid: st.error for vid, st in self._states.items() if st.error is not None}

    # -- the threads ------------------------------------------------------------------------

    def _kick(self, st: _State) -> None:
        with contextlib.suppress(KvmClosedError):
            st.vcpu.kick()

    def _kick_all(self) -> None:
        # Parked threads wait on the condition, not in KVM_RUN: a kick would only stay pending
        # (immediate_exit) and cut a later run() short.
        for st in self._states.values():
            if not st.done and not st.parked:
                self._kick(st)

    def _check_not_a_vcpu_thread(self, what: str) -> None:
        me = threading.current_thread()
        if any(st.thread is me for st in self._states.values()):
            raise KvmStateError(f"{what}() would wait for the calling vCPU thread itself; call it "
                                "from another thread (a handler ends its vCPU by returning False)")

    def _park(self, st: _State) -> bool:
        """Wait while paused; returns False once the runner stops."""
        with self._cond:
            if self._pause and not self._stop:
                st.parked = True
                self._cond.notify_all()
                while self._pause and not self._stop:
                    self._cond.wait()
                st.parked = False
            return not self._stop

    def _loop(self, st: _State) -> None:
        vcpu = st.vcpu
        try:
            while self._park(st):
                throttle, wakes = self._throttle, self._wakes
                try:
                    if throttle is None:
                        ex = vcpu.run()
                    else:
                        got = _paced_run(vcpu, throttle)
                        if isinstance(got, float):
                            self._wait_budget(got, wakes, throttle)
                            continue
                        ex = got
                except KvmClosedError:
                    if self._stop:
                        return
                    raise
                if isinstance(ex, Interrupted):
                    continue  # a kick: pause, stop, or a stray signal
                if isinstance(ex, DirtyRingFull) and vcpu.ring is not None:
                    _serve_ring_full(st, self._on_ring_full, self._max_stuck)
                    continue
                if not self._handler(vcpu, ex):
                    st.exit = ex
                    return
        except BaseException as e:  # kept for wait()/stop(), which re-raise it
            st.error = e
        finally:
            if self._stop:
                # A stop's kick may have landed outside KVM_RUN: leave the vCPU with no
                # pending kick, so that whoever runs it next is not cut short.
                with contextlib.suppress(KvmClosedError):
                    vcpu.immediate_exit = False
            with self._cond:
                st.done = True
                st.parked = False
                self._cond.notify_all()


def _serve_ring_full(st: _State, on_ring_full: RingFullHandler | None, max_stuck: int) -> None:
    ring = st.vcpu.ring
    assert ring is not None
    if on_ring_full is not None:
        on_ring_full(st.vcpu)
    else:
        ring.drain()
    # Progress = someone harvested since the last ring-full exit.  None, repeatedly, with
    # nothing left to harvest: the ring was overrun and the vCPU is stuck on it for good.
    harvested = ring.progress
    st.stuck = st.stuck + 1 if harvested == st.last_harvested else 0
    st.last_harvested = harvested
    if st.stuck >= max_stuck:
        waiting = ring.count_dirty()
        if waiting:
            raise DirtyRingError(
                f"vCPU {st.vcpu.id} keeps exiting with a full dirty ring that nobody harvests "
                f"({waiting} entries waiting): its ring-full handler must harvest and reset")
        raise DirtyRingOverrunError(
            f"vCPU {st.vcpu.id} keeps exiting with a full dirty ring but nothing is left to "
            "harvest: the ring was overrun and dirty pages were lost; treat the tracked slots "
            "as wholly dirty, and use a bigger ring, a lower write density, or bitmap mode",
            vcpu=st.vcpu.id)


def _paced_run(vcpu: Vcpu, throttle: Throttle) -> VcpuExit | float:
    """One throttled step: the exit of a run bounded by the throttle's slice, or the seconds
    to wait for the budget first."""
    wait, slice_ = throttle.admit(vcpu.id)
    if wait > 0:
        return float(wait)
    try:
        return vcpu.run(max_time=slice_)
    finally:
        throttle.ran(vcpu.id)


#: Longest wait of :func:`run_until_handled` for a throttle's budget before it looks for a
#: kick again (its caller's way to end it early).
KICK_POLL = 0.01


def run_until_handled(vcpu: Vcpu, handler: ExitHandler = stop_on_any_exit, *,
                      on_ring_full: RingFullHandler | None = None,
                      max_stuck: int = RING_FULL_STUCK_LIMIT,
                      throttle: Throttle | None = None) -> VcpuExit:
    """Run one vCPU in the calling thread with the runner's exit routing, until ``handler``
    returns ``False`` (that exit is returned).  Kicks (``Interrupted``) end it too; with a
    ``throttle``, so do the kicks that end its slices (call again to go on).  While the
    throttle makes the vCPU wait, a kick ends the wait within :data:`KICK_POLL` seconds."""
    st = _State(vcpu)
    max_stuck = _check.integer("max_stuck", max_stuck, lo=1)
    if throttle is not None:
        check_throttle(throttle)
    while True:
        if throttle is None:
            ex = vcpu.run()
        else:
            got = _paced_run(vcpu, throttle)
            if isinstance(got, float):
                if vcpu.immediate_exit:  # kicked while waiting: the run returns at once
                    ex = vcpu.run()
                else:
                    time.sleep(min(got, KICK_POLL))
                    continue
            else:
                ex = got
        if isinstance(ex, DirtyRingFull) and vcpu.ring is not None:
            _serve_ring_full(st, on_ring_full, max_stuck)
            continue
        if isinstance(ex, Interrupted) or not handler(vcpu, ex):
            return ex

